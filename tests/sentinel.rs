//! Redis behind Sentinel: a master, a replica and three sentinels on 127.0.0.1 ports of
//! their own. The nodes find the master through the sentinels and follow a failover:
//! delivery across nodes resumes on the new master, and a durable room loses nothing.

mod common;

use std::time::Duration;

use common::topologies::*;
use common::*;
use serde_json::json;

#[tokio::test]
async fn nodes_follow_a_sentinel_failover_and_durable_rooms_lose_nothing() {
    let setup = SentinelSetup::start(1, false).await;
    let one = start(setup.node("one")).await;
    let two = start(setup.node("two")).await;
    wait_status(one.local_addr(), "/readyz", 200).await;
    wait_status(two.local_addr(), "/readyz", 200).await;
    let mut remote = Client::connect(two.local_addr()).await;
    remote.join("scores:final").await;
    setup.master.wait_numsub("room:scores:final", 1).await;
    let mut publisher = Client::connect(one.local_addr()).await;
    publisher
        .send(json!({"type":"message","roomId":"scores:final","content":"before"}))
        .await;
    assert_eq!(remote.next_room_message().await["content"], "before");
    setup.replicated(0, "scores:final", 1).await;

    // Failover: the replica becomes the master; both nodes move to it.
    setup.sentinels[0].ask(&["failover", "volley"]).await;
    both_followed([&one, &two]).await;
    publisher
        .send(json!({"type":"message","roomId":"scores:final","content":"after"}))
        .await;
    // Every offset in order up to "after": nothing of the durable room was lost.
    let mut last = 1;
    loop {
        let m = remote.next_room_message().await;
        let offset = m["offset"].as_u64().unwrap();
        assert_eq!(offset, last + 1, "no gap: {m}");
        last = offset;
        if m["content"] == "end" || m["content"] == "after" {
            break;
        }
    }
}

/// Reads `room` on `client` until `"end"`: the seqs in arrival order, and the offsets.
/// Delivery must never pause for 5 s or more (the failover's gap).
async fn read_feed(client: &mut Client, room: &str) -> (Vec<u64>, Vec<u64>) {
    let (mut seqs, mut offsets) = (Vec::new(), Vec::new());
    let mut last = std::time::Instant::now();
    let mut longest = Duration::ZERO;
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let m = client.next_room_message().await;
            longest = longest.max(last.elapsed());
            last = std::time::Instant::now();
            assert_eq!(m["roomId"], room, "{m}");
            offsets.push(m["offset"].as_u64().expect("an offset"));
            if m["content"] == "end" {
                return;
            }
            seqs.push(m["content"]["seq"].as_u64().expect("a seq"));
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "delivery did not resume: {} messages, last offsets {:?}",
        seqs.len(),
        &offsets[offsets.len().saturating_sub(5)..]
    );
    eprintln!("longest pause in delivery: {longest:?}");
    assert!(
        longest < Duration::from_secs(5),
        "delivery paused {longest:?}"
    );
    (seqs, offsets)
}

/// The durable room's history on whichever server Sentinel names master now: every
/// message once, in publish order, offsets 1, 2, 3, ... What the old master took after the
/// promotion reaches the new one through the hand-back, after the nodes switched (and
/// possibly after the socket saw it from the old master): read until whole, at most 15 s.
async fn assert_history_whole(setup: &SentinelSetup, room: &str, count: u64) {
    let mut last = Vec::new();
    let whole = tokio::time::timeout(WAIT, async {
        loop {
            last = read_history(setup, room).await;
            if last.iter().map(|(_, seq)| *seq).collect::<Vec<_>>()
                == (0..count).collect::<Vec<_>>()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let seqs: Vec<u64> = last.iter().map(|(_, seq)| *seq).collect();
    assert!(whole.is_ok(), "the history, whole and in order: {seqs:?}");
    for (i, (offset, _)) in last.iter().enumerate() {
        assert_eq!(*offset, i as u64 + 1, "offsets count up by one");
    }
}

/// The room's stream on the master Sentinel names now: (offset, seq) of each message but
/// the `"end"`.
async fn read_history(setup: &SentinelSetup, room: &str) -> Vec<(u64, u64)> {
    let (host, port) = match setup.sentinels[0]
        .ask(&["get-master-addr-by-name", "volley"])
        .await
    {
        redis::Value::Array(parts) => match (&parts[0], &parts[1]) {
            (redis::Value::BulkString(h), redis::Value::BulkString(p)) => (
                String::from_utf8_lossy(h).to_string(),
                String::from_utf8_lossy(p).to_string(),
            ),
            other => panic!("master address: {other:?}"),
        },
        other => panic!("master address: {other:?}"),
    };
    let client = redis::Client::open(format!("redis://{host}:{port}")).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let rows: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(format!("stream:{room}"))
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut out = Vec::new();
    for (id, fields) in &rows {
        let offset: u64 = id
            .strip_suffix("-1")
            .and_then(|o| o.parse().ok())
            .unwrap_or_else(|| panic!("a stream id of the form <offset>-1: {id}"));
        let frame: serde_json::Value = serde_json::from_str(&fields[0].1).unwrap();
        if frame["content"] != "end" {
            out.push((offset, frame["content"]["seq"].as_u64().unwrap()));
        }
    }
    out
}

/// Every message once, offsets counting up by one.
fn assert_whole(count: u64, seqs: &[u64], offsets: &[u64]) {
    let mut sorted = seqs.to_vec();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..count).collect::<Vec<_>>(), "every message once");
    let first = offsets[0];
    assert_eq!(
        offsets,
        (first..first + offsets.len() as u64).collect::<Vec<_>>(),
        "offsets without a gap"
    );
}

/// How the master goes.
enum Failure {
    /// `SENTINEL FAILOVER`: the replica is promoted, the old master demoted.
    Graceful,
    /// SIGKILL: Sentinel notices after `down-after-milliseconds` (1 s) and promotes.
    Killed,
}

/// Two replicas (the new master keeps one in sync: `min-replicas-to-write 1` holds), two
/// nodes, `count` durable messages over a few seconds with the master failing early on:
/// every message once at the socket, offsets without a gap, the new master's history
/// whole and in order, and no pause in delivery of 5 s or more.
async fn publish_through(failure: Failure, count: u64) {
    let mut setup = SentinelSetup::start(2, true).await;
    let one = start(setup.node("one")).await;
    let two = start(setup.node("two")).await;
    wait_status(one.local_addr(), "/readyz", 200).await;
    wait_status(two.local_addr(), "/readyz", 200).await;
    let mut remote = Client::connect(two.local_addr()).await;
    let history = join_with(&mut remote, "scores:live", json!({"history": 1})).await;
    assert_eq!(history["messages"], json!([]));
    setup.master.wait_numsub("room:scores:live", 1).await;

    let feed = spawn_paced_feed(
        one.local_addr(),
        "scores:live",
        count,
        Duration::from_millis(50),
    );
    let fail = async {
        // The room exists on both replicas before the master goes: a room whose first
        // messages never reached a replica starts over there as a new epoch.
        for replica in 0..2 {
            setup.replicated(replica, "scores:live", 20).await;
        }
        match failure {
            Failure::Graceful => {
                setup.sentinels[0].ask(&["failover", "volley"]).await;
            }
            Failure::Killed => setup.master.kill(),
        }
    };
    let (_, (seqs, offsets)) = tokio::join!(fail, read_feed(&mut remote, "scores:live"));
    feed.await.unwrap();
    both_followed([&one, &two]).await;
    assert_history_whole(&setup, "scores:live", count).await;
    assert_whole(count, &seqs, &offsets);
}

#[tokio::test]
async fn publishing_through_a_sentinel_failover_loses_nothing_of_a_durable_room() {
    // The old master takes writes for a moment after the promotion (its other replica
    // still follows it): those reach the new master through the hand-over.
    publish_through(Failure::Graceful, 400).await;
}

#[tokio::test]
async fn publishing_through_a_killed_master_loses_nothing_of_a_durable_room() {
    // Meanwhile the nodes hold what is published, then hand it to the new master.
    publish_through(Failure::Killed, 600).await;
}

#[tokio::test]
async fn the_cluster_view_shows_every_node_and_follows_a_failover() {
    let setup = SentinelSetup::start(1, false).await;
    let reporting = |id: &'static str| {
        let node = setup.node(id);
        move |c: &mut volley::Config| {
            node(c);
            c.metrics.report_s = 1;
        }
    };
    let a = start(reporting("node-a")).await;
    let b = start(reporting("node-b")).await;
    for node in [&a, &b] {
        wait_status(node.local_addr(), "/readyz", 200).await;
        cluster_view(node.local_addr(), &["node-a", "node-b"]).await;
    }
    // After a failover the reports are written to (and read from) the new master.
    setup.sentinels[0].ask(&["failover", "volley"]).await;
    both_followed([&a, &b]).await;
    let mut conn = setup.replicas[0].conn().await;
    let _: () = redis::cmd("DEL")
        .arg("volley:nodes")
        .query_async(&mut conn)
        .await
        .unwrap();
    for node in [&a, &b] {
        cluster_view(node.local_addr(), &["node-a", "node-b"]).await;
        // The hand-back counter, under its name and (for one release) its old one.
        let addr = node.local_addr();
        assert_eq!(
            metric(addr, "volley_redis_handed_back_publishes_total").await,
            metric(addr, "volley_redis_redirected_publishes_total").await
        );
    }
}
