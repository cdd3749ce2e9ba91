//! Bad input: every mistake gets its error code, the socket keeps working, the node and
//! everyone else carry on.

mod common;

use common::*;
use serde_json::json;

/// A round trip that proves the socket still works.
async fn still_works(client: &mut Client, room: &str) {
    client.join(room).await;
    client
        .send(json!({"type":"message","roomId":room,"content":"still here"}))
        .await;
    assert_eq!(client.expect_type("message").await["content"], "still here");
}

#[tokio::test]
async fn each_malformed_frame_gets_its_code_and_the_socket_stays_open() {
    let server = start(|_| {}).await;
    let addr = server.local_addr();
    let mut bystander = Client::connect(addr).await;
    bystander.join("calm").await;
    let mut c = Client::connect(addr).await;

    let cases: &[(&str, &str)] = &[
        ("this is not json", "bad_json"),
        ("[1,2,3]", "bad_json"),
        (r#"{"type":"join","roomId":"a""#, "bad_json"),
        (r#"{"roomId":"a"}"#, "missing_field"),
        (r#"{"type":"teleport"}"#, "unknown_type"),
        (r#"{"type":["join"]}"#, "invalid_field"),
        (r#"{"type":"join"}"#, "missing_field"),
        (r#"{"type":"join","roomId":{"id":1}}"#, "invalid_field"),
        (r#"{"type":"join","roomId":""}"#, "invalid_field"),
        (r#"{"type":"join","roomId":2.5}"#, "invalid_field"),
        (r#"{"type":"message","roomId":"a"}"#, "missing_field"),
        (r#"{"type":"message","content":"x"}"#, "missing_field"),
        (r#"{"type":"broadcast"}"#, "missing_field"),
        (r#"{"type":"leave","roomId":"never-joined"}"#, "not_in_room"),
    ];
    for (frame, code) in cases {
        c.send_text(frame).await;
        let err = c.expect_error(code).await;
        assert_eq!(
            err.as_object().unwrap().len(),
            3,
            "type, code, message: {err}"
        );
    }
    c.send_binary(&[1, 2, 3]).await;
    c.expect_error("binary_not_supported").await;

    still_works(&mut c, "after-errors").await;
    bystander
        .send(json!({"type":"message","roomId":"calm","content":"unaffected"}))
        .await;
    assert_eq!(
        bystander.expect_type("message").await["content"],
        "unaffected"
    );
    let h = health(addr).await;
    assert_eq!(h["protocol_errors"], cases.len() as u64 + 1, "{h}");
}

#[tokio::test]
async fn joining_too_many_rooms_is_refused() {
    let server = start(|c| c.limits.max_rooms_per_socket = 2).await;
    let mut c = Client::connect(server.local_addr()).await;
    c.join("a").await;
    c.join("b").await;
    c.send(json!({"type":"join","roomId":"c"})).await;
    let err = c.expect_error("too_many_rooms").await;
    assert!(err["message"].as_str().unwrap().contains('2'));
    // Leaving frees a place.
    c.send(json!({"type":"leave","roomId":"a"})).await;
    c.join("c").await;
}

#[tokio::test]
async fn publishing_over_the_rate_limit_is_refused_and_told() {
    let server = start(|c| {
        c.limits.publish_rate = 1;
        c.limits.publish_burst = 3;
    })
    .await;
    let mut c = Client::connect(server.local_addr()).await;
    c.join("r").await;
    let frames: Vec<_> = (0..4)
        .map(|i| json!({"type":"message","roomId":"r","content":i}))
        .collect();
    c.send_burst(&frames).await;
    let mut contents = Vec::new();
    let mut limited = 0;
    while contents.len() + limited < 4 {
        let m = c.next_message().await;
        match m["type"].as_str() {
            Some("message") => contents.push(m["content"].as_u64().unwrap()),
            Some("error") => {
                assert_eq!(m["code"], "rate_limited");
                limited += 1;
            }
            _ => panic!("unexpected {m}"),
        }
    }
    assert_eq!(
        contents,
        vec![0, 1, 2],
        "the burst passes, the rest is refused"
    );
    assert_eq!(limited, 1);
}

#[tokio::test]
async fn a_frame_over_the_size_limit_closes_with_1009_and_others_carry_on() {
    let server = start(|c| c.limits.max_frame_bytes = 1024).await;
    let addr = server.local_addr();
    let mut other = Client::connect(addr).await;
    other.join("r").await;
    let mut c = Client::connect(addr).await;
    let big = format!(
        r#"{{"type":"message","roomId":"r","content":"{}"}}"#,
        "x".repeat(2000)
    );
    c.send_text(&big).await;
    assert_eq!(
        c.expect_close().await,
        (1009, "frame too large".to_string())
    );

    // Exactly at the limit is fine.
    let pad = 1024 - r#"{"type":"message","roomId":"r","content":""}"#.len();
    let exact = format!(
        r#"{{"type":"message","roomId":"r","content":"{}"}}"#,
        "y".repeat(pad)
    );
    assert_eq!(exact.len(), 1024);
    other.send_text(&exact).await;
    let m = other.expect_type("message").await;
    assert_eq!(m["content"].as_str().unwrap().len(), pad);
}

#[tokio::test]
async fn the_connection_limit_refuses_with_503() {
    let server = start(|c| c.limits.max_connections = 2).await;
    let addr = server.local_addr();
    let mut a = Client::connect(addr).await;
    a.join("r").await;
    let mut b = Client::connect(addr).await;
    b.join("r").await;
    a.expect_type("user_joined").await;
    let refused = tokio_tungstenite::connect_async(format!("ws://{addr}/ws")).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503)
        }
        other => panic!("expected HTTP 503, got {other:?}"),
    }
    drop(b);
    // The place is free again once the node has seen the close.
    a.expect_type("user_left").await;
    let mut c = Client::connect(addr).await;
    c.join("r").await;
}

#[tokio::test]
async fn json_that_common_parsers_reject_is_refused_and_the_room_stays_readable() {
    let server = start(|_| {}).await;
    let addr = server.local_addr();
    let mut reader = Client::connect(addr).await;
    reader.join("r").await;
    let mut c = Client::connect(addr).await;

    let deep = format!("{}1{}", "[".repeat(1000), "]".repeat(1000));
    c.send_text(&format!(
        r#"{{"type":"message","roomId":"r","content":{deep}}}"#
    ))
    .await;
    let err = c.expect_error("invalid_field").await;
    assert!(
        err["message"].as_str().unwrap().contains("max_json_depth"),
        "{err}"
    );
    let digits = "7".repeat(5000);
    c.send_text(&format!(
        r#"{{"type":"message","roomId":"r","content":{{"n":{digits}}}}}"#
    ))
    .await;
    c.expect_error("invalid_field").await;
    let (status, body) = api_publish(addr, &json!({"roomId":"r","content":"placeholder"})).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = http(
        addr,
        "POST",
        "/api/publish",
        &[("Authorization", "apikey test-key")],
        format!(r#"{{"roomId":"r","content":{deep}}}"#).as_bytes(),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("invalid_field"), "{body}");

    // Nesting within the limit passes; the reader sees only what was accepted.
    c.send(json!({"type":"message","roomId":"r","content":{"a":[[1.5e300]]}}))
        .await;
    assert_eq!(reader.next_room_message().await["content"], "placeholder");
    assert_eq!(
        reader.next_room_message().await["content"],
        json!({"a":[[1.5e300]]})
    );
}

#[tokio::test]
async fn joins_are_charged_to_their_own_rate() {
    let server = start(|c| {
        c.limits.max_rooms_per_socket = 1000;
        c.limits.join_rate = 20;
        c.limits.join_burst = 50;
    })
    .await;
    let mut c = Client::connect(server.local_addr()).await;
    let joins: Vec<_> = (0..200)
        .map(|i| json!({"type":"join","roomId":format!("room-{i}")}))
        .collect();
    c.send_burst(&joins).await;
    let (mut joined, mut limited) = (0, 0);
    while joined + limited < 200 {
        let m = c.next_message().await;
        match m["type"].as_str() {
            Some("user_joined") => joined += 1,
            Some("error") => {
                assert_eq!(m["code"], "rate_limited", "{m}");
                assert!(m["message"].as_str().unwrap().contains("joining"), "{m}");
                limited += 1;
            }
            _ => panic!("unexpected {m}"),
        }
    }
    // The burst, plus what the rate refilled while the burst was read.
    assert!((50..100).contains(&joined), "joined {joined}");
    assert_eq!(joined + limited, 200);
}
