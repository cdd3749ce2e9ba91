//! `/metrics` scraped and parsed by a Prometheus text parser; the cluster figures in
//! Redis and `/api/cluster`.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use prometheus_parse::{Scrape, Value as Sample};
use serde_json::{json, Value};

fn parse(text: &str) -> Scrape {
    Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("valid exposition format")
}

/// The value of the sample `name` whose labels include `labels`.
fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let sample = scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .unwrap_or_else(|| panic!("no sample {name} {labels:?}"));
    match &sample.value {
        Sample::Counter(v) | Sample::Gauge(v) | Sample::Untyped(v) => *v,
        other => panic!("{name} is not a number: {other:?}"),
    }
}

/// (count per `le`, sum, count) of the histogram `name`.
fn histogram(scrape: &Scrape, name: &str) -> (Vec<(f64, f64)>, f64, f64) {
    let buckets = scrape
        .samples
        .iter()
        .find_map(|s| match (&s.value, s.metric == name) {
            (Sample::Histogram(h), true) => {
                Some(h.iter().map(|b| (b.less_than, b.count)).collect())
            }
            _ => None,
        })
        .unwrap_or_else(|| panic!("no histogram {name}"));
    let sum = value(scrape, &format!("{name}_sum"), &[]);
    let count = value(scrape, &format!("{name}_count"), &[]);
    (buckets, sum, count)
}

async fn scrape(addr: std::net::SocketAddr) -> (String, Scrape) {
    let (status, body) = http(addr, "GET", "/metrics", &[], b"").await;
    assert_eq!(status, 200);
    let scrape = parse(&body);
    (body, scrape)
}

/// Reads frames until `n` room messages arrived; returns how many frames that took.
async fn frames_until_messages(client: &mut Client, n: usize) -> usize {
    let (mut frames, mut messages) = (0, 0);
    while messages < n {
        let frame: Value = serde_json::from_str(&client.next_frame().await).unwrap();
        frames += 1;
        if frame["type"] == "message" {
            messages += 1;
        }
    }
    frames
}

#[tokio::test]
async fn metrics_count_what_the_clients_saw() {
    let server = start(|c| c.batch.delivery_window_ms = 0).await;
    let addr = server.local_addr();
    let mut a = Client::connect(addr).await;
    let mut b = Client::connect(addr).await;
    a.join("r").await; // 1 frame to a
    b.join("r").await; // 1 to b, 1 to a
    assert_eq!(a.expect_type("user_joined").await["roomId"], "r");
    for i in 0..5 {
        a.send(json!({"type":"message","roomId":"r","content":{"n":i}}))
            .await;
    }
    let a_frames = 2 + frames_until_messages(&mut a, 5).await;
    let b_frames = 1 + frames_until_messages(&mut b, 5).await;
    a.send_text("not json").await;
    a.expect_error("bad_json").await;
    let delivered = (a_frames + b_frames + 1) as f64;
    assert_eq!(delivered, 14.0);

    let (text, m) = scrape(addr).await;
    assert!(
        text.contains("# TYPE volley_deliveries_total counter"),
        "{text}"
    );
    assert!(text.contains("# TYPE volley_delivery_latency_seconds histogram"));
    assert_eq!(
        value(
            &m,
            "volley_node_info",
            &[("node", "test-node"), ("broker", "memory")]
        ),
        1.0
    );
    assert_eq!(value(&m, "volley_connections", &[]), 2.0);
    assert_eq!(value(&m, "volley_rooms", &[]), 1.0);
    assert_eq!(value(&m, "volley_joins_total", &[]), 2.0);
    assert_eq!(
        value(&m, "volley_messages_in_total", &[("source", "socket")]),
        5.0
    );
    assert_eq!(
        value(&m, "volley_messages_in_total", &[("source", "api")]),
        0.0
    );
    assert_eq!(value(&m, "volley_deliveries_total", &[]), delivered);
    // Window 0: one message per frame.
    assert_eq!(value(&m, "volley_frames_out_total", &[]), delivered);
    assert_eq!(
        value(&m, "volley_errors_total", &[("code", "bad_json")]),
        1.0
    );
    assert_eq!(
        value(&m, "volley_errors_total", &[("code", "unknown_type")]),
        0.0
    );
    assert_eq!(value(&m, "volley_slow_consumers_closed_total", &[]), 0.0);

    let (buckets, sum, count) = histogram(&m, "volley_batch_messages");
    assert_eq!(count, delivered);
    assert_eq!(sum, delivered);
    assert_eq!(
        buckets[0],
        (1.0, delivered),
        "every frame carried one message"
    );

    let (buckets, sum, count) = histogram(&m, "volley_delivery_latency_seconds");
    assert!(
        (1.0..=delivered).contains(&count),
        "one observation per write: {count}"
    );
    assert!(sum >= 0.0 && sum < count * 5.0);
    assert!(
        buckets
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
        "cumulative"
    );
    assert_eq!(buckets.last().map(|b| b.1), Some(count));

    drop(b);
    // The leave shows once the node has seen the socket go.
    let waited = tokio::time::timeout(WAIT, async {
        loop {
            let (_, m) = scrape(addr).await;
            // The socket leaves its rooms first, then the node forgets it.
            if value(&m, "volley_connections", &[]) == 1.0 {
                return value(&m, "volley_leaves_total", &[]);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(waited.expect("disconnect never counted"), 1.0);
}

#[tokio::test]
async fn batch_sizes_are_histogrammed_per_frame() {
    let server = start(|c| {
        c.batch.delivery_window_ms = 1000;
        c.batch.leading_edge = false;
    })
    .await;
    let addr = server.local_addr();
    let mut sub = Client::connect(addr).await;
    sub.join("r").await;
    let mut sizes = vec![1.0]; // the join notice
    for i in 0..10 {
        let (status, _) = api_publish(addr, &json!({"roomId":"r","content":i})).await;
        assert_eq!(status, 200);
    }
    let mut received = 0;
    while received < 10 {
        let frame: Value = serde_json::from_str(&sub.next_frame().await).unwrap();
        let n = frame["messages"].as_array().map_or(1, Vec::len);
        sizes.push(n as f64);
        received += n;
    }
    assert!(
        sizes.iter().any(|&n| n > 1.0),
        "ten quick publishes share a window: {sizes:?}"
    );
    let (_, m) = scrape(addr).await;
    assert_eq!(
        value(&m, "volley_messages_in_total", &[("source", "api")]),
        10.0
    );
    let (buckets, sum, count) = histogram(&m, "volley_batch_messages");
    assert_eq!(count, sizes.len() as f64);
    assert_eq!(sum, 11.0);
    for (le, cumulative) in buckets {
        let want = sizes.iter().filter(|&&n| n <= le).count() as f64;
        assert_eq!(cumulative, want, "bucket le={le}, frames {sizes:?}");
    }
}

#[tokio::test]
async fn cluster_lists_every_reporting_node_from_redis() {
    let redis = RedisServer::start().await;
    let fast = |c: &mut volley::Config| c.metrics.report_s = 1;
    let a = start_on_redis(&redis, "node-a", fast).await;
    let b = start_on_redis(&redis, "node-b", fast).await;
    let mut sub = Client::connect(b.local_addr()).await;
    sub.join("r").await;

    // Both nodes report within a couple of intervals.
    let nodes = tokio::time::timeout(WAIT, async {
        loop {
            let (status, body) = http(a.local_addr(), "GET", "/api/cluster", &[], b"").await;
            assert_eq!(status, 200, "{body}");
            let body: Value = serde_json::from_str(&body).unwrap();
            let nodes = body["nodes"].as_array().cloned().unwrap_or_default();
            if nodes.len() == 2
                && nodes
                    .iter()
                    .all(|n| n["history"].as_array().is_some_and(|h| !h.is_empty()))
            {
                return nodes;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("both nodes in /api/cluster");
    let ids: Vec<&str> = nodes
        .iter()
        .map(|n| n["serverId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["node-a", "node-b"]);
    assert_eq!(nodes[1]["latest"]["connections"], 1);
    assert_eq!(nodes[1]["latest"]["rooms"], 1);
    assert_eq!(nodes[0]["latest"]["connections"], 0);

    // The article's hash: its fields, with a TTL of at most 300 s.
    let mut conn = redis.conn().await;
    let hash: HashMap<String, String> = redis::cmd("HGETALL")
        .arg("metrics:node-b")
        .query_async(&mut conn)
        .await
        .unwrap();
    for field in [
        "serverId",
        "timestamp",
        "messagesPublished",
        "messagesReceived",
        "avgPublishLatencyMs",
        "avgDeliveryLatencyMs",
        "errors",
        "updatedAt",
    ] {
        assert!(
            hash.contains_key(field),
            "metrics:node-b lacks {field}: {hash:?}"
        );
    }
    assert_eq!(hash["serverId"], "node-b");
    let ttl: i64 = redis::cmd("TTL")
        .arg("metrics:node-b")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!((1..=300).contains(&ttl), "ttl {ttl}");

    // A node that stopped reporting drops out once its hash is gone (expired).
    b.shutdown().await;
    let _: () = redis::cmd("DEL")
        .arg("metrics:node-b")
        .query_async(&mut conn)
        .await
        .unwrap();
    let (status, body) = http(a.local_addr(), "GET", "/api/cluster", &[], b"").await;
    assert_eq!(status, 200);
    let body: Value = serde_json::from_str(&body).unwrap();
    let ids: Vec<&str> = body["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["serverId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["node-a"]);
    let members: Vec<String> = redis::cmd("SMEMBERS")
        .arg("volley:nodes")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(members, ["node-a"]);

    // Never KEYS.
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!info.contains("cmdstat_keys"), "{info}");
}

#[tokio::test]
async fn without_redis_the_cluster_is_this_node() {
    let server = start(|c| c.metrics.report_s = 1).await;
    let nodes = tokio::time::timeout(WAIT, async {
        loop {
            let (_, body) = http(server.local_addr(), "GET", "/api/cluster", &[], b"").await;
            let body: Value = serde_json::from_str(&body).unwrap();
            let nodes = body["nodes"].as_array().cloned().unwrap_or_default();
            if nodes.len() == 1 && !nodes[0]["history"].as_array().unwrap().is_empty() {
                return nodes;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("a report within a few seconds");
    assert_eq!(nodes[0]["serverId"], "test-node");
}

/// The levels deploy/prometheus/volley-rules.yml alerts on follow the node: ready and
/// connected with Redis up, both 0 once Redis is gone, the outage buffer filling with
/// what waits for it, the open files counted against the limit.
#[tokio::test]
async fn the_levels_the_alert_rules_read_follow_redis() {
    let mut redis = RedisServer::start().await;
    let node = start_on_redis(&redis, "levels", |c| {
        c.redis.outage_buffer = 500;
        c.api.key = "k".into();
    })
    .await;
    let addr = node.local_addr();
    wait_status(addr, "/readyz", 200).await;
    let (_, s) = scrape(addr).await;
    assert_eq!(value(&s, "volley_ready", &[]), 1.0);
    assert_eq!(value(&s, "volley_broker_connected", &[]), 1.0);
    assert_eq!(value(&s, "volley_redis_outage_buffered", &[]), 0.0);
    assert_eq!(value(&s, "volley_redis_outage_buffer_size", &[]), 500.0);
    let (open, max) = (
        value(&s, "process_open_fds", &[]),
        value(&s, "process_max_fds", &[]),
    );
    assert!(open >= 3.0 && open < max, "open {open}, limit {max}");

    redis.kill();
    wait_status(addr, "/readyz", 503).await;
    wait_metric(addr, "volley_broker_connected", |v| v == 0).await;
    assert_eq!(metric(addr, "volley_ready").await, 0);
    for n in 0..20 {
        let (status, body) = http(
            addr,
            "POST",
            "/api/publish",
            &[("Authorization", "apikey k")],
            json!({"roomId": "r", "content": n}).to_string().as_bytes(),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    wait_metric(addr, "volley_redis_outage_buffered", |v| v == 20).await;
}
