//! A socket that stops reading is closed (1008) before it costs more than one outbox;
//! a fast socket in the same room keeps receiving everything. The same with the room's
//! writes submitted through io_uring (`server.io_uring`): a socket that takes part of a
//! write, or nothing, falls back to the writer task and loses nothing.

mod common;

use common::*;
use serde_json::json;

#[tokio::test]
async fn a_slow_reader_is_closed_while_a_fast_one_keeps_receiving() {
    assert_eq!(slow_and_fast(false).await, 0, "no write through io_uring");
}

#[tokio::test]
async fn through_io_uring_a_slow_reader_is_closed_and_a_fast_one_loses_nothing() {
    assert!(
        slow_and_fast(true).await > 0,
        "the room's writes went through io_uring"
    );
}

/// A slow and a fast reader in one room, 32 KiB messages published until the slow one
/// is closed: the fast one gets every message in order. Returns the node's
/// `volley_io_uring_writes_total`.
async fn slow_and_fast(io_uring: bool) -> u64 {
    let server = start(|c| {
        c.limits.max_outbox_bytes = 256 * 1024;
        c.limits.max_frame_bytes = 64 * 1024;
        c.batch.delivery_window_ms = 5;
        c.server.io_uring = io_uring;
    })
    .await;
    let addr = server.local_addr();
    let mut slow = Client::connect(addr).await;
    slow.join("feed").await;
    let mut fast = Client::connect(addr).await;
    fast.join("feed").await;
    slow.expect_type("user_joined").await;

    let reader = tokio::spawn(async move {
        let mut next = 0u64;
        loop {
            let m = fast.next_message().await;
            if m["type"] != "message" {
                continue;
            }
            if m["content"]["done"] == true {
                return next;
            }
            assert_eq!(
                m["content"]["seq"], next,
                "fast reader got every message in order"
            );
            next += 1;
        }
    });

    // From here on `slow` is not read. Publish until the node reports it closed.
    let pad = "p".repeat(32 * 1024);
    let mut published = 0u64;
    let closed = loop {
        let (status, _) = api_publish(
            addr,
            &json!({"roomId":"feed","content":{"seq":published,"pad":pad}}),
        )
        .await;
        assert_eq!(status, 200);
        published += 1;
        if published.is_multiple_of(16) && health(addr).await["slow_consumers_closed"] == 1 {
            break true;
        }
        if published == 8_000 {
            break false;
        }
    };
    assert!(
        closed,
        "the slow reader was never closed after {published} messages"
    );
    api_publish(addr, &json!({"roomId":"feed","content":{"done":true}})).await;
    assert_eq!(reader.await.unwrap(), published);

    // The slow reader finally reads: some messages, then close 1008 and the reason.
    assert_eq!(
        slow.expect_close().await,
        (1008, "slow consumer".to_string())
    );
    let h = health(addr).await;
    assert_eq!(h["slow_consumers_closed"], 1, "only the slow reader: {h}");
    metric(addr, "volley_io_uring_writes_total").await
}
