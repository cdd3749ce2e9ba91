//! Conflation (`conflate = "symbol"` in a `[[rooms]]` class): a socket gets the latest
//! message per key value, never a stale one after a fresh one, and a slow reader of such
//! rooms holds one message per key instead of being closed.

mod common;

use std::collections::HashMap;

use common::*;
use serde_json::{json, Value};

/// `ticker:*` conflates on `symbol`; its window is long enough for a burst to meet in one
/// queue.
fn ticker_class(c: &mut volley::Config) {
    c.limits.publish_rate = 0;
    c.rooms = vec![volley::config::RoomClass {
        pattern: "ticker:*".into(),
        conflate: Some("symbol".into()),
        delivery_window_ms: Some(300),
        leading_edge: Some(false),
        ..Default::default()
    }];
}

fn quote(room: &str, symbol: &str, price: u64) -> Value {
    json!({"type":"message","roomId":room,"content":{"symbol":symbol,"price":price}})
}

#[tokio::test]
async fn a_window_carries_the_latest_quote_per_symbol_and_nothing_stale() {
    let server = start(ticker_class).await;
    let addr = server.local_addr();
    let mut sub = Client::connect(addr).await;
    sub.join("ticker:nyse").await;
    let mut publisher = Client::connect(addr).await;
    publisher
        .send_burst(&[
            quote("ticker:nyse", "ACME", 1),
            quote("ticker:nyse", "BETA", 1),
            quote("ticker:nyse", "ACME", 2),
            quote("ticker:nyse", "ACME", 3),
            // No symbol: not conflated.
            json!({"type":"message","roomId":"ticker:nyse","content":"halt"}),
            quote("ticker:nyse", "BETA", 2),
            quote("ticker:nyse", "GAMMA", 1),
        ])
        .await;
    let got: Vec<(Value, Value)> = frame_messages(&sub.next_frame().await)
        .iter()
        .map(|m| {
            (
                m["content"]["symbol"].clone(),
                m["content"]["price"].clone(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (json!("ACME"), json!(3)),
            (Value::Null, Value::Null),
            (json!("BETA"), json!(2)),
            (json!("GAMMA"), json!(1)),
        ],
        "the latest per symbol, in the order of their latest updates"
    );
    assert_eq!(metric(addr, "volley_conflated_total").await, 3);
}

#[tokio::test]
async fn rooms_outside_the_class_get_every_message() {
    let server = start(ticker_class).await;
    let addr = server.local_addr();
    let mut sub = Client::connect(addr).await;
    sub.join("quotes").await;
    let mut publisher = Client::connect(addr).await;
    publisher
        .send_burst(&[quote("quotes", "ACME", 1), quote("quotes", "ACME", 2)])
        .await;
    let mut prices = Vec::new();
    while prices.len() < 2 {
        for m in frame_messages(&sub.next_frame().await) {
            prices.push(m["content"]["price"].as_u64().unwrap());
        }
    }
    assert_eq!(prices, [1, 2]);
    assert_eq!(metric(addr, "volley_conflated_total").await, 0);
}

#[tokio::test]
async fn a_slow_reader_of_a_conflated_room_is_kept_and_catches_up_on_the_latest() {
    // Far more than the outbox bound and the socket buffers: a plain room would close
    // this reader 1008; a conflated one holds five quotes for it.
    const SYMBOLS: [&str; 5] = ["A", "B", "C", "D", "E"];
    const ROUNDS: u64 = 4_000;
    let server = start(|c| {
        ticker_class(c);
        c.limits.max_outbox_bytes = 64 * 1024;
        c.limits.max_frame_bytes = 32 * 1024;
    })
    .await;
    let addr = server.local_addr();
    let mut slow = RawWs::connect_with(addr, Some(4096)).await;
    slow.send(&RawWs::frame(
        0x1,
        br#"{"type":"join","roomId":"ticker:x"}"#,
        true,
    ))
    .await;
    let (_, notice) = slow.read_frame().await.expect("the join notice");
    assert!(String::from_utf8_lossy(&notice).contains("user_joined"));

    let mut publisher = Client::connect(addr).await;
    let padding = "p".repeat(1000);
    for round in 0..ROUNDS {
        let quotes: Vec<Value> = SYMBOLS
            .iter()
            .map(|s| {
                json!({"type":"message","roomId":"ticker:x",
                       "content":{"symbol":s,"price":round,"padding":padding}})
            })
            .collect();
        publisher.send_burst(&quotes).await;
    }
    // Now read: every symbol's last price must come, and nothing older after it.
    let mut latest: HashMap<String, u64> = HashMap::new();
    while SYMBOLS
        .iter()
        .any(|s| latest.get(*s) != Some(&(ROUNDS - 1)))
    {
        let (opcode, payload) = slow.read_frame().await.expect("still connected");
        assert_eq!(opcode, 0x1, "closed: {}", String::from_utf8_lossy(&payload));
        for m in frame_messages(&String::from_utf8_lossy(&payload)) {
            let symbol = m["content"]["symbol"].as_str().unwrap().to_string();
            let price = m["content"]["price"].as_u64().unwrap();
            let before = latest.insert(symbol.clone(), price);
            assert!(
                before.is_none_or(|b| b < price),
                "{symbol}: {price} after {before:?}"
            );
        }
    }
    assert_eq!(metric(addr, "volley_slow_consumers_closed_total").await, 0);
    assert!(metric(addr, "volley_conflated_total").await > 0);
}
