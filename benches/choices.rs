//! The design card's two crates the engine does not use, measured where each could serve.
//! Results and the reasons for each choice: tuning.md, "simd-json and crossbeam-channel".
//!
//! - `decode/*`: a Redis batch envelope of 16 and 256 room messages, as it arrives, to
//!   one `Encoded` frame per message. volley: serde_json borrows each payload as raw
//!   bytes and frames them. simd-json: parse a copy of the input (it parses in place)
//!   into a borrowed value, then write each payload back out (it has no raw capture, and
//!   volley never re-encodes a client's JSON, so this is what adopting it would take).
//! - `client_frame/*`: one inbound `message` frame the same two ways.
//! - `handoff/*`: two publishing threads hand 10 000 envelopes each to the Redis
//!   batcher (which takes them once per window): volley's `PublishQueue` (a short lock around a `Vec`, swapped out
//!   whole by the consumer) against a bounded crossbeam channel (send each, drain with
//!   `try_iter`), bare and with what the queue must also do (its bound, the wake-up).

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use serde_json::value::RawValue;
use simd_json::prelude::*;
use volley::broker::redis::{decode, EnvelopeWriter, PublishPaces, PublishQueue};
use volley::broker::{Envelope, Kind, Target};
use volley::protocol::{self, outbound, Encoded};

fn room_messages(n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let content = RawValue::from_string(format!(
                r#"{{"symbol":"ACME","price":{}.25,"change":-0.5,"seq":{i}}}"#,
                100 + i
            ))
            .unwrap();
            outbound::room_message("ticker:ACME", &content, 1_700_000_000_000 + i as u64)
                .json()
                .to_vec()
        })
        .collect()
}

fn envelope_decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode");
    let writer = EnvelopeWriter::new("server-1");
    for n in [16usize, 256] {
        let payloads = room_messages(n);
        let wire = writer.batch((0..n).map(|i| payloads[i].as_slice()));
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(
            BenchmarkId::new("serde_json_raw", format!("{n}_messages")),
            &wire,
            |b, wire| {
                let mut out = Vec::with_capacity(n);
                b.iter(|| {
                    out.clear();
                    let inbound = decode(black_box(wire), usize::MAX).unwrap();
                    out.extend(
                        inbound
                            .payloads
                            .iter()
                            .map(|p| Encoded::from_json(p.get().as_bytes())),
                    );
                    black_box(out.len())
                })
            },
        );
        // simd-json's parse alone, payloads not written back: a lower bound of its cost.
        group.bench_with_input(
            BenchmarkId::new("simd_json_parse_only", format!("{n}_messages")),
            &wire,
            |b, wire| {
                let mut input = Vec::with_capacity(wire.len());
                let mut buffers = simd_json::Buffers::default();
                b.iter(|| {
                    input.clear();
                    input.extend_from_slice(black_box(wire));
                    let value = simd_json::to_borrowed_value_with_buffers(&mut input, &mut buffers)
                        .unwrap();
                    black_box(value.get("batch").and_then(|b| b.as_array()).map(Vec::len))
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("simd_json_value", format!("{n}_messages")),
            &wire,
            |b, wire| {
                let mut out = Vec::with_capacity(n);
                let mut input = Vec::with_capacity(wire.len());
                let mut buffers = simd_json::Buffers::default();
                let mut json = Vec::new();
                b.iter(|| {
                    out.clear();
                    input.clear();
                    input.extend_from_slice(black_box(wire));
                    let value = simd_json::to_borrowed_value_with_buffers(&mut input, &mut buffers)
                        .unwrap();
                    for payload in value.get("batch").and_then(|b| b.as_array()).unwrap() {
                        json.clear();
                        payload.write(&mut json).unwrap();
                        out.push(Encoded::from_json(&json));
                    }
                    black_box(out.len())
                })
            },
        );
    }
    group.finish();
}

fn client_frame(c: &mut Criterion) {
    let mut group = c.benchmark_group("client_frame");
    group.throughput(Throughput::Elements(1));
    let frame = br#"{"type":"message","roomId":"match:42","content":{"home":2,"away":1,"minute":77,"events":[{"t":"goal","p":"Ruiz"}]}}"#;
    group.bench_function("serde_json_raw", |b| {
        b.iter(|| match protocol::parse(black_box(frame)) {
            Ok(protocol::ClientFrame::Message { room, content, .. }) => {
                black_box(outbound::room_message(&room, content, 1).wire_len())
            }
            _ => 0,
        })
    });
    group.bench_function("simd_json_value", |b| {
        let mut input = Vec::with_capacity(frame.len());
        let mut buffers = simd_json::Buffers::default();
        let mut json = Vec::new();
        b.iter(|| {
            input.clear();
            input.extend_from_slice(black_box(frame));
            let value =
                simd_json::to_borrowed_value_with_buffers(&mut input, &mut buffers).unwrap();
            let room = value.get("roomId").and_then(|r| r.as_str()).unwrap();
            json.clear();
            value.get("content").unwrap().write(&mut json).unwrap();
            let content = RawValue::from_string(String::from_utf8(json.clone()).unwrap()).unwrap();
            black_box(outbound::room_message(room, &content, 1).wire_len())
        })
    });
    group.finish();
}

/// What adopting crossbeam in the batcher's queue would take: the channel, plus what the
/// queue promises besides moving envelopes: the bound over queued and held publishes, and
/// a wake-up for the publisher task on the first publish of a window.
struct ChannelQueue {
    tx: crossbeam_channel::Sender<Envelope>,
    rx: crossbeam_channel::Receiver<Envelope>,
    queued: std::sync::atomic::AtomicUsize,
    capacity: usize,
    ready: tokio::sync::Notify,
}

impl ChannelQueue {
    fn new(capacity: usize) -> ChannelQueue {
        let (tx, rx) = crossbeam_channel::bounded(capacity);
        ChannelQueue {
            tx,
            rx,
            queued: Default::default(),
            capacity,
            ready: tokio::sync::Notify::new(),
        }
    }

    fn push(&self, envelope: Envelope) -> bool {
        let before = self.queued.fetch_add(1, Ordering::AcqRel);
        if before >= self.capacity || self.tx.try_send(envelope).is_err() {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        if before == 0 {
            self.ready.notify_one();
        }
        true
    }

    fn take(&self, into: &mut Vec<Envelope>) {
        into.extend(self.rx.try_iter());
        self.queued.fetch_sub(into.len(), Ordering::AcqRel);
    }
}

const PER_PRODUCER: usize = 10_000;
const PRODUCERS: usize = 2;

fn envelope() -> Envelope {
    Envelope::new(
        Arc::from("server-1"),
        Target::Room(Arc::from("ticker:ACME")),
        Encoded::from_json(&room_messages(1)[0]),
        Kind::Message,
    )
}

/// Runs `PRODUCERS` threads that each call `send` `PER_PRODUCER` times, as connection
/// tasks publish on the runtime's worker threads; the time until all have sent. The
/// consumer takes once per publish window, so it is left out of the timing; `drain` must
/// then find every envelope.
fn handoff_once(
    send: impl Fn() + Send + Sync + 'static,
    drain: impl FnOnce() -> usize,
) -> Duration {
    let send = Arc::new(send);
    let go = Arc::new(AtomicBool::new(false));
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|_| {
            let (send, go) = (send.clone(), go.clone());
            std::thread::spawn(move || {
                while !go.load(Ordering::Acquire) {
                    std::hint::spin_loop();
                }
                for _ in 0..PER_PRODUCER {
                    send();
                }
            })
        })
        .collect();
    let start = Instant::now();
    go.store(true, Ordering::Release);
    for p in producers {
        p.join().unwrap();
    }
    let elapsed = start.elapsed();
    assert_eq!(drain(), PRODUCERS * PER_PRODUCER);
    elapsed
}

fn handoff(c: &mut Criterion) {
    let mut group = c.benchmark_group("handoff");
    group.throughput(Throughput::Elements((PRODUCERS * PER_PRODUCER) as u64));
    group.sample_size(20);
    let one = envelope();
    group.bench_function("publish_queue_swap", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    let queue = Arc::new(PublishQueue::new(
                        usize::MAX / 2,
                        PublishPaces::new(std::sync::Arc::new(
                            volley::config::RoomClasses::compiled(&volley::Config::default()),
                        )),
                    ));
                    let producer_queue = queue.clone();
                    let e = one.clone();
                    let mut taken = Vec::new();
                    handoff_once(
                        move || {
                            let _ = producer_queue.push(std::slice::from_ref(&e));
                        },
                        move || {
                            queue.take(&mut taken);
                            taken.len()
                        },
                    )
                })
                .sum()
        })
    });
    group.bench_function("crossbeam_queue", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    let queue = Arc::new(ChannelQueue::new(100_000));
                    let producer_queue = queue.clone();
                    let e = one.clone();
                    let mut taken = Vec::new();
                    handoff_once(
                        move || {
                            producer_queue.push(e.clone());
                        },
                        move || {
                            queue.take(&mut taken);
                            taken.len()
                        },
                    )
                })
                .sum()
        })
    });
    group.bench_function("crossbeam_bounded", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    let (tx, rx) = crossbeam_channel::bounded::<Envelope>(100_000);
                    let e = one.clone();
                    handoff_once(
                        move || {
                            let _ = tx.try_send(e.clone());
                        },
                        move || rx.try_iter().count(),
                    )
                })
                .sum()
        })
    });
    group.finish();
}

criterion_group!(benches, envelope_decode, client_frame, handoff);
criterion_main!(benches);
