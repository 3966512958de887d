//! The pool-desync scenario of tests/pool_desync.rs as separate processes, so that any
//! proxy can be measured (bench/desync.sh runs it against nginx and the gateway): how
//! many answers go to the wrong request, and to the wrong user, after an upstream once
//! sends bytes nobody asked for a little after a complete answer.
//!
//! ```sh
//! # the misbehaving upstream (prints {"listening":"127.0.0.1:PORT"} first)
//! cargo run --release --example desync -- upstream --mode late-response --listen 127.0.0.1:0
//! # the checking load through a proxy in front of it (prints one JSON line)
//! cargo run --release --example desync -- client --url https://127.0.0.1:8443 \
//!     --ca certs/gateway.crt --mode late-response --upstream 127.0.0.1:PORT \
//!     --token alex@example.com=TOKEN --token admin@example.com=TOKEN
//! ```
//!
//! Modes: `late-response` (the same whole response again 150 ms after a GET's),
//! `head-body` (a HEAD answer's body 50 ms after its head), `204-body` (a body 50 ms
//! after a 204), `trailing-junk` (junk 50 ms after a GET's answer), `none` (control).
//! Without tokens (`--user NAME`), the load names its user in `x-authenticated-user`
//! itself, for a proxy that does no authentication.

#[path = "../tests/common/desync.rs"]
mod desync;

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, Subcommand};
use desync::{Behaviour, Load, MisbehavingUpstream, Mode, Principal};

#[derive(Parser)]
#[command(about = "A misbehaving upstream and a checking load (see the source)")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The upstream that misbehaves once.
    Upstream {
        #[arg(long, value_parser = mode)]
        mode: Mode,
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Requests answered well before the misbehaviour.
        #[arg(long, default_value_t = 2000)]
        after: usize,
        /// How long each answer takes, in milliseconds.
        #[arg(long, default_value_t = 1)]
        latency_ms: u64,
        /// Exit after this many seconds in any case.
        #[arg(long, default_value_t = 300)]
        lifetime: u64,
    },
    /// The load; prints what it saw as one JSON line.
    Client {
        /// `https://host:port` of the proxy.
        #[arg(long)]
        url: String,
        /// The proxy's certificate (PEM); without it any certificate is accepted.
        #[arg(long)]
        ca: Option<std::path::PathBuf>,
        #[arg(long, value_parser = mode)]
        mode: Mode,
        /// `USER=TOKEN`: a principal that presents a bearer token.
        #[arg(long)]
        token: Vec<String>,
        /// `USER`: a principal that names itself in `x-authenticated-user`.
        #[arg(long)]
        user: Vec<String>,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        #[arg(long, default_value_t = 20_000)]
        requests: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 3)]
        request_timeout: u64,
        /// The misbehaving upstream itself, for its report.
        #[arg(long)]
        upstream: Option<SocketAddr>,
        /// Copied into the output (e.g. nginx, gateway).
        #[arg(long, default_value = "")]
        label: String,
        #[arg(long, default_value_t = 1)]
        round: usize,
    },
}

fn mode(name: &str) -> Result<Mode, String> {
    Mode::parse(name).ok_or_else(|| {
        format!("no mode {name}: late-response, head-body, 204-body, trailing-junk or none")
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    // TOKIO_WORKER_THREADS, when set, decides the number of threads.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match args.command {
            Command::Upstream {
                mode,
                listen,
                after,
                latency_ms,
                lifetime,
            } => {
                let behaviour = Behaviour::new(mode, after, Duration::from_millis(latency_ms));
                let up = MisbehavingUpstream::start(behaviour, listen).await?;
                println!(
                    "{}",
                    serde_json::json!({ "listening": up.addr.to_string() })
                );
                tokio::time::sleep(Duration::from_secs(lifetime)).await;
                println!("{}", up.report().to_json());
                Ok(())
            }
            Command::Client {
                url,
                ca,
                mode,
                token,
                user,
                concurrency,
                requests,
                seconds,
                request_timeout,
                upstream,
                label,
                round,
            } => {
                let mut principals: Vec<Principal> = Vec::new();
                for pair in &token {
                    let (name, token) = pair.split_once('=').ok_or("--token is USER=TOKEN")?;
                    principals.push(Principal {
                        name: name.to_owned(),
                        token: Some(token.to_owned()),
                    });
                }
                principals.extend(user.iter().map(|name| Principal {
                    name: name.clone(),
                    token: None,
                }));
                if principals.is_empty() {
                    return Err("give at least one --token or --user".into());
                }
                let ca_pem = match ca {
                    Some(path) => Some(std::fs::read_to_string(path)?),
                    None => None,
                };
                let load = Load {
                    base: url.trim_end_matches('/').to_owned(),
                    mode,
                    principals,
                    concurrency,
                    max_requests: requests,
                    max_time: Duration::from_secs(seconds),
                    request_timeout: Duration::from_secs(request_timeout),
                    ca_pem,
                };
                let tally = desync::run(&load).await;
                let report = match upstream {
                    Some(addr) => desync::fetch_report(addr)
                        .await
                        .unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() })),
                    None => serde_json::Value::Null,
                };
                let mut out = tally.to_json();
                out["label"] = label.into();
                out["round"] = round.into();
                out["mode"] = mode.name().into();
                out["concurrency"] = concurrency.into();
                out["upstream"] = report;
                println!("{out}");
                Ok(())
            }
        }
    })
}
