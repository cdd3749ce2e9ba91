//! Hot-path micro-benchmarks: what one message costs on its way through a node.
//!
//! `cargo bench --bench hot_path` — figures per element (message or delivery).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use serde_json::value::RawValue;
use volley::bench::{batch_frame, compress_frame, DeliveryPolicy, Drained, Hub, Outbox, Pace};
use volley::config::BatchConfig;
use volley::protocol::{self, outbound, Encoded};

fn inbound_parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("inbound");
    group.throughput(Throughput::Elements(1));
    let frame =
        br#"{"type":"message","roomId":"match:42","content":{"home":2,"away":1,"minute":77}}"#;
    group.bench_function("parse_message", |b| {
        b.iter(|| black_box(protocol::parse(black_box(frame)).is_ok()))
    });
    // The ingress check every published content goes through (depth, numbers).
    group.bench_function("parse_and_check_message", |b| {
        b.iter(|| {
            black_box(match protocol::parse(black_box(frame)) {
                Ok(protocol::ClientFrame::Message { content, .. }) => {
                    protocol::check_content(content, "content", 32).is_ok()
                }
                _ => false,
            })
        })
    });
    group.finish();
}

fn outbound_encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("outbound");
    group.throughput(Throughput::Elements(1));
    let content = RawValue::from_string(r#"{"home":2,"away":1,"minute":77}"#.into()).unwrap();
    group.bench_function("room_message", |b| {
        b.iter(|| {
            black_box(outbound::room_message(
                "match:42",
                &content,
                1_700_000_000_000,
            ))
        })
    });
    group.finish();
}

fn messages(n: usize) -> Vec<Encoded> {
    let content = RawValue::from_string(r#"{"sym":"ACME","px":101.25,"chg":-0.5}"#.into()).unwrap();
    (0..n)
        .map(|i| outbound::room_message("ticker:ACME", &content, 1_700_000_000_000 + i as u64))
        .collect()
}

fn batch_assembly(c: &mut Criterion) {
    let mut group = c.benchmark_group("batch");
    for n in [10usize, 100] {
        let items = messages(n);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(
            BenchmarkId::new("assemble", format!("{n}_messages")),
            &items,
            |b, items| b.iter(|| black_box(batch_frame(items))),
        );
        // The path a socket takes at its window: split by limits, reuse a shared frame.
        let window = DeliveryPolicy::new(&BatchConfig {
            delivery_window_ms: 50,
            ..BatchConfig::default()
        });
        group.bench_with_input(
            BenchmarkId::new("window_frames_shared", format!("{n}_messages")),
            &items,
            |b, items| {
                let mut out = Vec::new();
                b.iter(|| {
                    out.clear();
                    window.frames(items, true, &mut out, |_, _| {});
                    black_box(out.len())
                })
            },
        );
    }
    group.finish();
}

/// permessage-deflate for one room's window at 100 compressing subscribers: one batch
/// frame compressed once and shared (what volley does, `server_no_context_takeover`)
/// against one compression per socket (what per-connection compressors cost).
fn deflate(c: &mut Criterion) {
    let mut group = c.benchmark_group("deflate");
    let frame = batch_frame(&messages(20)).frame().clone();
    group.throughput(Throughput::Elements(100));
    group.bench_function("shared/100_subscribers", |b| {
        b.iter(|| {
            // A new tick: the first subscriber compresses, the other 99 share it.
            let window = DeliveryPolicy::new(&BatchConfig::default()).with_compression(256, 1);
            for _ in 0..100 {
                black_box(window.compressed(&frame));
            }
        })
    });
    group.bench_function("per_socket/100_subscribers", |b| {
        b.iter(|| {
            for _ in 0..100 {
                black_box(compress_frame(&frame, 1));
            }
        })
    });
    group.finish();
}

/// A hub with `subscribers` outboxes (no sockets; unbounded) in one room, "room".
fn subscribed_hub(window: &Arc<DeliveryPolicy>, subscribers: u64) -> (Hub, Vec<Arc<Outbox>>) {
    let hub = Hub::with_window(window.clone(), Arc::default(), usize::MAX);
    let outboxes: Vec<Arc<Outbox>> = (0..subscribers)
        .map(|id| {
            Arc::new(Outbox::new(
                id,
                usize::MAX / 2,
                window.clone(),
                Arc::default(),
                Arc::default(),
            ))
        })
        .collect();
    for outbox in &outboxes {
        hub.join("room", outbox, false, |_| {});
    }
    (hub, outboxes)
}

fn hub_fan_out(c: &mut Criterion) {
    let mut group = c.benchmark_group("fanout");
    let message = messages(1).pop().unwrap();
    // Window 0: each first push wakes the (absent) writer instead of listing the socket
    // for a tick that no clock would serve here.
    let window = Arc::new(DeliveryPolicy::new(&BatchConfig {
        delivery_window_ms: 0,
        ..BatchConfig::default()
    }));
    for subscribers in [1usize, 100, 10_000] {
        let (hub, outboxes) = subscribed_hub(&window, subscribers as u64);
        group.throughput(Throughput::Elements(subscribers as u64));
        group.bench_function(
            BenchmarkId::from_parameter(format!("{subscribers}_subscribers")),
            |b| {
                let mut drained = Drained::default();
                b.iter_custom(|iters| {
                    let mut timed = Duration::ZERO;
                    for i in 0..iters {
                        let start = Instant::now();
                        black_box(hub.fan_out("room", &message));
                        timed += start.elapsed();
                        // Empty the outboxes now and then, as writers would, outside the timing.
                        if i % 64 == 63 {
                            for outbox in &outboxes {
                                outbox.drain(&mut drained);
                                drained.messages.clear();
                            }
                        }
                    }
                    for outbox in &outboxes {
                        outbox.drain(&mut drained);
                        drained.messages.clear();
                    }
                    timed
                })
            },
        );
    }
    group.finish();
}

/// One window of a busy room: 10 messages for 100 subscribers, pushed message by message
/// into every outbox (window 0's way, what every window did before room-major delivery),
/// or collected by the room and delivered at the tick as one shared frame.
fn room_window(c: &mut Criterion) {
    const SUBSCRIBERS: u64 = 100;
    let mut group = c.benchmark_group("room_window");
    let batch = messages(10);
    group.throughput(Throughput::Elements(SUBSCRIBERS * batch.len() as u64));
    for (name, window_ms) in [("per_message", 0), ("room_major", 50)] {
        let window = Arc::new(DeliveryPolicy::new(&BatchConfig {
            delivery_window_ms: window_ms,
            leading_edge: false,
            ..BatchConfig::default()
        }));
        let (hub, outboxes) = subscribed_hub(&window, SUBSCRIBERS);
        let mut drained = Drained::default();
        group.bench_function(format!("{name}/100_subscribers_10_messages"), |b| {
            b.iter(|| {
                for message in &batch {
                    black_box(hub.fan_out("room", message));
                }
                black_box(hub.tick(Pace::DEFAULT));
                // What the sockets' writes take out: 10 messages each, or the one frame.
                for outbox in &outboxes {
                    outbox.drain(&mut drained);
                    drained.messages.clear();
                }
            })
        });
    }
    group.finish();
}

fn outbox_push_drain(c: &mut Criterion) {
    let mut group = c.benchmark_group("outbox");
    let items = messages(16);
    group.throughput(Throughput::Elements(items.len() as u64));
    let window = Arc::new(DeliveryPolicy::new(&BatchConfig {
        delivery_window_ms: 0,
        ..BatchConfig::default()
    }));
    let outbox: Arc<Outbox> = Arc::new(Outbox::new(
        1,
        1 << 30,
        window,
        Arc::default(),
        Arc::default(),
    ));
    let mut drained = Drained::default();
    group.bench_function("push_16_then_drain", |b| {
        b.iter(|| {
            for m in &items {
                outbox.push(m);
            }
            outbox.drain(&mut drained);
            let n = drained.messages.len();
            drained.messages.clear();
            black_box(n)
        })
    });
    group.finish();
}

/// A state room's work per update: the delta of a realistic quote against the key's
/// previous one (parse the frame, encode, frame it), made once per room; and the snapshot
/// frame a joiner gets, per 1 000 entries.
fn boards(c: &mut Criterion) {
    use volley::bench::Deltas;
    use volley::protocol::{board, outbound};
    let quote = |n: u64| {
        let content = serde_json::value::RawValue::from_string(format!(
            r#"{{"symbol":"SYM00042","bid":101.25,"ask":101.27,"last":101.26,"volume":{},"time":"2026-12-05T12:00:{:02}.000Z","exchange":"XNAS"}}"#,
            1_234_567 + n * 13,
            n % 60
        ))
        .unwrap();
        let message = board::message("ticker", r#""SYM00042""#, &content, 1_796_000_000_000);
        outbound::with_offset(&message.frame, n)
    };
    let mut group = c.benchmark_group("board");
    group.throughput(Throughput::Elements(1));
    let updates: Vec<_> = (1..=64).map(quote).collect();
    group.bench_function("delta_encode/quote", |b| {
        let mut deltas = Deltas::default();
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % updates.len();
            black_box(deltas.variant("ticker", &updates[i]))
        })
    });
    let entries: Vec<bytes::Bytes> = (0..1000u64)
        .map(|n| {
            let m = quote(n + 1);
            let p = board::parts(m.json()).unwrap();
            bytes::Bytes::from(format!(
                r#"{{"key":"SYM{n:05}","content":{},"offset":{}}}"#,
                p.content.unwrap(),
                n + 1
            ))
        })
        .collect();
    group.throughput(Throughput::Elements(entries.len() as u64));
    group.bench_function("snapshot_encode/1000_entries", |b| {
        b.iter(|| black_box(board::snapshot("ticker", "1796-1", 1000, &entries, None)))
    });
    group.finish();
}

criterion_group!(
    benches,
    boards,
    inbound_parse,
    outbound_encode,
    batch_assembly,
    deflate,
    hub_fan_out,
    room_window,
    outbox_push_drain
);
criterion_main!(benches);
