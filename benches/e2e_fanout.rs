//! End-to-end fan-out through a real node: one publish, N loopback WebSocket clients,
//! timed until every client has the message. `cargo bench --bench e2e_fanout`
//!
//! The node runs in-process with the delivery window at 0 (each message leaves at once),
//! so this is the cost of one fan-out through hub, outboxes, writers, the kernel's
//! loopback and the clients' reads; elements are deliveries.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use futures_util::{SinkExt, StreamExt};
use serde_json::value::RawValue;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;
use volley::node::Source;
use volley::{Config, Server};

struct Received {
    count: AtomicU64,
    changed: Notify,
}

async fn setup(subscribers: usize) -> (Server, Arc<Received>) {
    let mut config = Config::default();
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.batch.delivery_window_ms = 0;
    let server = Server::bind(config).await.unwrap();
    let addr = server.local_addr();
    let received = Arc::new(Received {
        count: AtomicU64::new(0),
        changed: Notify::new(),
    });
    let (joined_tx, mut joined_rx) = tokio::sync::mpsc::channel(subscribers);
    for _ in 0..subscribers {
        let received = received.clone();
        let joined = joined_tx.clone();
        tokio::spawn(async move {
            let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
                .await
                .unwrap();
            ws.send(Message::text(r#"{"type":"join","roomId":"board"}"#))
                .await
                .unwrap();
            let mut announced = false;
            while let Some(Ok(Message::Text(text))) = ws.next().await {
                if text.starts_with(r#"{"type":"message""#) {
                    received.count.fetch_add(1, Relaxed);
                    received.changed.notify_one();
                } else if !announced {
                    announced = true;
                    let _ = joined.send(()).await;
                }
            }
        });
    }
    for _ in 0..subscribers {
        joined_rx.recv().await.unwrap();
    }
    (server, received)
}

fn e2e_fanout(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let content = RawValue::from_string(r#"{"home":2,"away":1,"minute":77}"#.into()).unwrap();
    let mut group = c.benchmark_group("e2e_fanout");
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(5));
    for subscribers in [100usize, 1000] {
        let (server, received) = runtime.block_on(setup(subscribers));
        group.throughput(Throughput::Elements(subscribers as u64));
        group.bench_function(format!("{subscribers}_sockets"), |b| {
            b.iter_custom(|iters| {
                runtime.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let target = received.count.load(Relaxed) + subscribers as u64;
                        server
                            .node()
                            .publish("board", &content, Source::Api)
                            .unwrap();
                        while received.count.load(Relaxed) < target {
                            received.changed.notified().await;
                        }
                    }
                    start.elapsed()
                })
            })
        });
        runtime.block_on(server.shutdown());
    }
    group.finish();
}

criterion_group!(benches, e2e_fanout);
criterion_main!(benches);
