//! `POST /api/publish`: a backend pushes to rooms or everyone without a socket.

mod common;

use common::*;
use serde_json::{json, Value};

#[tokio::test]
async fn publish_to_a_room_reaches_its_subscribers() {
    let server = start(|_| {}).await;
    let addr = server.local_addr();
    let mut sub = Client::connect(addr).await;
    sub.join("match:7").await;
    let (status, body) = api_publish(
        addr,
        &json!({"roomId":"match:7","content":{"home":2,"away":1}}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"ok":true,"delivered":1}));
    let m = sub.expect_type("message").await;
    assert_eq!(
        without_timestamp(m),
        json!({"type":"message","roomId":"match:7","content":{"home":2,"away":1}})
    );
}

#[tokio::test]
async fn publish_broadcast_reaches_everyone() {
    let server = start(|_| {}).await;
    let addr = server.local_addr();
    let mut a = Client::connect(addr).await;
    a.join("x").await;
    let (status, body) = api_publish(addr, &json!({"broadcast":{"maintenance":"soon"}})).await;
    assert_eq!(status, 200);
    assert_eq!(body["delivered"], 1);
    assert_eq!(a.next_frame().await, r#"{"maintenance":"soon"}"#);
}

#[tokio::test]
async fn publish_without_the_key_is_401() {
    let server = start(|_| {}).await;
    let addr = server.local_addr();
    let body = br#"{"roomId":"r","content":1}"#;
    for headers in [
        vec![],
        vec![("Authorization", "apikey wrong-key")],
        vec![("Authorization", "Bearer test-key")],
    ] {
        let (status, text) = http(addr, "POST", "/api/publish", &headers, body).await;
        assert_eq!(status, 401, "{headers:?}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"], "unauthorized");
    }
}

#[tokio::test]
async fn publish_with_a_bad_body_is_400_with_the_reason() {
    let server = start(|_| {}).await;
    let addr = server.local_addr();
    let auth = [("Authorization", "apikey test-key")];
    let cases: &[(&[u8], &str)] = &[
        (b"not json", "bad_json"),
        (br#"{"content":1}"#, "missing_field"),
        (br#"{"roomId":"r"}"#, "missing_field"),
        (br#"{"roomId":[1],"content":1}"#, "invalid_field"),
        (
            br#"{"roomId":"r","content":1,"broadcast":2}"#,
            "invalid_field",
        ),
    ];
    for (body, code) in cases {
        let (status, text) = http(addr, "POST", "/api/publish", &auth, body).await;
        assert_eq!(status, 400, "{}", String::from_utf8_lossy(body));
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"], *code, "{v}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
}

#[tokio::test]
async fn publish_api_is_off_without_a_key_and_bounded_in_size() {
    let server = start(|c| {
        c.api.key = String::new();
    })
    .await;
    let (status, text) = http(
        server.local_addr(),
        "POST",
        "/api/publish",
        &[("Authorization", "apikey ")],
        b"{}",
    )
    .await;
    assert_eq!(status, 403);
    assert!(text.contains("api_disabled"));
    server.shutdown().await;

    let server = start(|c| c.limits.max_frame_bytes = 1024).await;
    let big = json!({"roomId":"r","content":"z".repeat(4096)});
    let (status, body) = api_publish(server.local_addr(), &big).await;
    assert_eq!(status, 413);
    assert_eq!(body["error"], "too_large");
}
