//! Joins with history into a durable room that is being published to, on Redis: the
//! history is read from the stream while the same messages are still on their way over
//! pub/sub, so a joiner's history can end past what reached its node live. Every joiner
//! gets each offset once, with no gap, from the history into the live messages.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

const ROOM: &str = "scores:busy";
/// Joiners, and how many join at once (enough to catch the lag every run here).
const JOINERS: usize = 400;
const AT_ONCE: usize = 40;
/// Live messages each joiner reads after its history.
const LIVE: u64 = 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joiners_during_a_fast_stream_get_every_offset_once() {
    let redis = RedisServer::start().await;
    let durable = durable(100_000);
    let publishing = start_on_redis(&redis, "pub", durable.clone()).await;
    let joining = start_on_redis(&redis, "join", durable).await;
    // The room is subscribed on the joiners' node all along, as on a busy node.
    let mut resident = Client::connect(joining.local_addr()).await;
    resident.join(ROOM).await;
    redis.wait_numsub(&format!("room:{ROOM}"), 1).await;

    // A publisher that keeps the stream busy until every joiner is done, with messages
    // big enough that the joiners' node reads their pub/sub copies well behind the
    // stream (hundreds of offsets behind, here, before the fix).
    let done = tokio_util::sync::CancellationToken::new();
    let publisher = {
        let (addr, done) = (publishing.local_addr(), done.clone());
        tokio::spawn(async move {
            let mut client = Client::connect(addr).await;
            let mut n = 0u64;
            while !done.is_cancelled() {
                client
                    .send(json!({"type": "message", "roomId": ROOM, "content": {"n": n, "pad": "x".repeat(2000)}}))
                    .await;
                n += 1;
                if n.is_multiple_of(100) {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            n
        })
    };

    let addr = joining.local_addr();
    for round in 0..JOINERS / AT_ONCE {
        let mut joiners = Vec::new();
        for i in 0..AT_ONCE {
            joiners.push(tokio::spawn(async move {
                let mut client = Client::connect(addr).await;
                let history = join_with(&mut client, ROOM, json!({"history": 5})).await;
                let mut seen = offsets(&history["messages"]);
                let end = history["offset"].as_u64().expect("the history's offset");
                while seen.last().is_none_or(|last| *last < end + LIVE) {
                    let m = client.next_room_message().await;
                    seen.push(m["offset"].as_u64().expect("an offset"));
                }
                (round * AT_ONCE + i, seen)
            }));
        }
        for joiner in joiners {
            let (who, seen) = joiner.await.expect("joiner");
            let first = seen[0];
            let expected: Vec<u64> = (first..first + seen.len() as u64).collect();
            assert_eq!(
                seen, expected,
                "joiner {who}: offsets from its history on must count up by one"
            );
        }
    }
    done.cancel();
    assert!(publisher.await.expect("publisher") > 0);
}
