//! `covata-gateway demo-upstream`, which the benchmarks and the PGO training proxy to:
//! it reads each upload before answering, so the connection carries the next request.

mod common;
use common::wire::{content_length, read_head, within};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Reads one answer and its Content-Length body; returns the head.
async fn answer(stream: &mut (impl tokio::io::AsyncRead + Unpin), buf: &mut Vec<u8>) -> String {
    let head = read_head(stream, buf)
        .await
        .expect("closed before an answer");
    let length = content_length(&head);
    while buf.len() < length {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed in the body");
        buf.extend_from_slice(&chunk[..n]);
    }
    buf.drain(..length);
    head
}

#[tokio::test]
async fn an_upload_is_read_and_the_connection_kept() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(covata_gateway::demo::serve(vec![listener], Some(64)));
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let (mut read, mut write) = stream.split();
    let mut buf = Vec::new();
    // Far more than one read: answered unread (as before), hyper gave the connection up
    // and this upload failed part-way.
    let body = vec![b'u'; 4 << 20];
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    within(10, async {
        let send = async {
            write.write_all(head.as_bytes()).await?;
            write.write_all(&body).await
        };
        let (sent, first) = tokio::join!(send, answer(&mut read, &mut buf));
        sent.expect("the upload was not all read");
        assert!(first.starts_with("HTTP/1.1 200"), "{first}");
        write
            .write_all(b"GET /again HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let second = answer(&mut read, &mut buf).await;
        assert!(second.starts_with("HTTP/1.1 200"), "{second}");
    })
    .await;
}
