//! Delivery windows: bursts coalesce, window 0 does not, idle sockets get the leading edge.

mod common;

use common::*;
use serde_json::{json, Value};

fn burst(room: &str, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| json!({"type":"message","roomId":room,"content":i}))
        .collect()
}

#[tokio::test]
async fn a_burst_inside_one_window_arrives_coalesced_and_in_order() {
    let server = start(|c| c.batch.delivery_window_ms = 50).await;
    let addr = server.local_addr();
    let mut sub = Client::connect(addr).await;
    sub.join("scores").await;
    let mut publisher = Client::connect(addr).await;
    publisher.send_burst(&burst("scores", 20)).await;

    let mut frames = 0;
    let mut batches = 0;
    let mut seen = Vec::new();
    while seen.len() < 20 {
        let frame: Value = serde_json::from_str(&sub.next_frame().await).unwrap();
        frames += 1;
        if frame["type"] == "batch" {
            batches += 1;
            for m in frame["messages"].as_array().unwrap() {
                assert_eq!(m["type"], "message");
                seen.push(m["content"].as_u64().unwrap());
            }
        } else {
            assert_eq!(frame["type"], "message");
            seen.push(frame["content"].as_u64().unwrap());
        }
    }
    assert_eq!(
        seen,
        (0..20).collect::<Vec<_>>(),
        "all 20, in publish order"
    );
    // At most a leading-edge frame plus the window(s) the burst straddles.
    assert!(frames <= 3, "20 messages took {frames} frames");
    assert!(batches >= 1);
}

#[tokio::test]
async fn window_zero_sends_one_frame_per_message() {
    let server = start(|c| c.batch.delivery_window_ms = 0).await;
    let addr = server.local_addr();
    let mut sub = Client::connect(addr).await;
    sub.join("t").await;
    let mut publisher = Client::connect(addr).await;
    publisher.send_burst(&burst("t", 20)).await;
    for i in 0..20u64 {
        let frame: Value = serde_json::from_str(&sub.next_frame().await).unwrap();
        assert_eq!(frame["type"], "message", "no batch frames with window 0");
        assert_eq!(frame["content"], i);
    }
}

#[tokio::test]
async fn leading_edge_sends_at_once_then_holds_for_the_window_and_shutdown_flushes() {
    // A window far longer than the test: only the leading edge or shutdown can deliver.
    let server = start(|c| {
        c.batch.delivery_window_ms = 60_000;
        c.batch.leading_edge = true;
    })
    .await;
    let addr = server.local_addr();
    let mut sub = Client::connect(addr).await;
    // Idle socket: its first message (the join notice) goes out at once.
    sub.join("r").await;
    for i in 0..3 {
        let (status, _) = api_publish(addr, &json!({"roomId":"r","content":i})).await;
        assert_eq!(status, 200);
    }
    let report = tokio::spawn(server.shutdown());
    // Held in the window, then flushed as one batch, then closed with 1001.
    let frame: Value = serde_json::from_str(&sub.next_frame().await).unwrap();
    assert_eq!(frame["type"], "batch", "{frame}");
    let contents: Vec<_> = frame["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].clone())
        .collect();
    assert_eq!(contents, vec![json!(0), json!(1), json!(2)]);
    assert_eq!(
        sub.expect_close().await,
        (1001, "server shutting down".to_string())
    );
    assert!(report.await.unwrap().drained);
}

#[tokio::test]
async fn without_leading_edge_even_the_first_message_waits_for_the_window() {
    let server = start(|c| {
        c.batch.delivery_window_ms = 60_000;
        c.batch.leading_edge = false;
    })
    .await;
    let addr = server.local_addr();
    let mut sub = Client::connect(addr).await;
    sub.send(json!({"type":"join","roomId":"r"})).await;
    // The join is done once the node counts the room.
    tokio::time::timeout(WAIT, async {
        while health(addr).await["rooms"] != 1 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the join never registered");
    api_publish(addr, &json!({"roomId":"r","content":"x"})).await;
    let report = tokio::spawn(server.shutdown());
    // Had the join notice gone out early, it would be a bare frame.
    let frame: Value = serde_json::from_str(&sub.next_frame().await).unwrap();
    assert_eq!(frame["type"], "batch", "{frame}");
    assert_eq!(frame["messages"][0]["type"], "user_joined");
    assert_eq!(frame["messages"][1]["content"], "x");
    assert_eq!(sub.expect_close().await.0, 1001);
    assert!(report.await.unwrap().drained);
}

#[tokio::test]
async fn many_subscribers_of_one_room_get_identical_batches() {
    let server = start(|c| c.batch.delivery_window_ms = 50).await;
    let addr = server.local_addr();
    let mut subs = Vec::new();
    for _ in 0..20 {
        let mut c = Client::connect(addr).await;
        c.join("board").await;
        subs.push(c);
    }
    let mut publisher = Client::connect(addr).await;
    publisher.send_burst(&burst("board", 10)).await;
    for sub in &mut subs {
        let mut got = Vec::new();
        while got.len() < 10 {
            let m = sub.next_message().await;
            if m["type"] == "message" {
                got.push(m["content"].as_u64().unwrap());
            }
        }
        assert_eq!(got, (0..10).collect::<Vec<_>>());
    }
}

/// Chat at 0 ms by default, `scores:*` on a 300 ms window without a leading edge.
fn two_paces(c: &mut volley::Config) {
    c.batch.delivery_window_ms = 0;
    c.rooms = vec![volley::config::RoomClass {
        pattern: "scores:*".into(),
        delivery_window_ms: Some(300),
        leading_edge: Some(false),
        ..Default::default()
    }];
}

#[tokio::test]
async fn rooms_of_a_class_keep_the_classes_window_beside_rooms_on_the_default() {
    let server = start(two_paces).await;
    let addr = server.local_addr();
    let mut scores = Client::connect(addr).await;
    scores.join("scores:1").await;
    let mut chat = Client::connect(addr).await;
    chat.join("lobby").await;
    let mut publisher = Client::connect(addr).await;
    publisher.send_burst(&burst("scores:1", 3)).await;
    publisher.send_burst(&burst("lobby", 3)).await;

    // The class's window: the burst waits for its tick and leaves as one frame.
    let got = frame_messages(&scores.next_frame().await);
    let contents: Vec<&Value> = got.iter().map(|m| &m["content"]).collect();
    assert_eq!(contents, [&json!(0), &json!(1), &json!(2)], "{got:?}");
    // The default window, 0: one frame per message.
    for i in 0..3 {
        let got = frame_messages(&chat.next_frame().await);
        assert_eq!(got.len(), 1, "window 0 sends each message alone: {got:?}");
        assert_eq!(got[0]["content"], i);
    }
}

#[tokio::test]
async fn a_message_due_at_once_takes_what_waits_for_a_slower_window_along() {
    let server = start(two_paces).await;
    let addr = server.local_addr();
    let mut both = Client::connect(addr).await;
    both.join("scores:1").await;
    both.join("lobby").await;
    let mut publisher = Client::connect(addr).await;
    // Two scoreboard updates wait for their 300 ms tick; the chat line right behind them
    // is due at once and carries them along, in order, in one frame.
    let mut frames = burst("scores:1", 2);
    frames.push(json!({"type":"message","roomId":"lobby","content":"hi"}));
    publisher.send_burst(&frames).await;
    let got = frame_messages(&both.next_frame().await);
    let seen: Vec<(&Value, &Value)> = got.iter().map(|m| (&m["roomId"], &m["content"])).collect();
    assert_eq!(
        seen,
        [
            (&json!("scores:1"), &json!(0)),
            (&json!("scores:1"), &json!(1)),
            (&json!("lobby"), &json!("hi")),
        ],
        "{got:?}"
    );
}
