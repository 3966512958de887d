mod common;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_then_api_call_over_both_protocols() {
    let gw = TestGateway::start().await;
    let token = gw.alex_token().await;
    for client in [&gw.http1, &gw.http2] {
        let response = gw.bearer_get(client, "/api/v1/objects?x=1", &token).await;
        let seen = json_ok(response).await;
        assert_eq!(seen["headers"]["x-authenticated-user"][0], ALEX.0);
    }
    gw.stop().await;
}
