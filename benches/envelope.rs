//! Redis envelopes: encode and decode at 1, 16 and 256 messages, and the inbound path of
//! one envelope from Redis to the local subscribers' outboxes.
//!
//! `cargo bench --bench envelope`

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use serde_json::value::RawValue;
use volley::bench::Drained;
use volley::broker::redis::{decode, EnvelopeWriter};
use volley::broker::{Broker, RedisBroker};
use volley::protocol::outbound;
use volley::{Config, Node};

fn payloads(n: usize) -> Vec<Vec<u8>> {
    let content = RawValue::from_string(r#"{"sym":"ACME","px":101.25,"chg":-0.5}"#.into()).unwrap();
    (0..n)
        .map(|i| {
            outbound::room_message("ticker:ACME", &content, 1_700_000_000_000 + i as u64)
                .json()
                .to_vec()
        })
        .collect()
}

fn encode_decode(c: &mut Criterion) {
    let writer = EnvelopeWriter::new("server-1");
    let mut group = c.benchmark_group("envelope");
    for n in [1usize, 16, 256] {
        let items = payloads(n);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(
            BenchmarkId::new("encode", format!("{n}_messages")),
            &items,
            |b, items| {
                b.iter(|| {
                    if items.len() == 1 {
                        black_box(writer.single(&items[0]))
                    } else {
                        black_box(writer.batch(items.iter().map(|p| p.as_slice())))
                    }
                })
            },
        );
        let wire = if n == 1 {
            writer.single(&items[0])
        } else {
            writer.batch(items.iter().map(|p| p.as_slice()))
        };
        group.bench_with_input(
            BenchmarkId::new("decode", format!("{n}_messages")),
            &wire,
            |b, wire| {
                b.iter(|| {
                    black_box(
                        decode(wire, usize::MAX)
                            .map(|e| e.payloads.len())
                            .unwrap_or(0),
                    )
                })
            },
        );
    }
    group.finish();
}

fn inbound_fan_out(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let _guard = runtime.enter();
    let mut config = Config::default();
    config.server.node_id = "bench-node".into();
    // Nothing listens there: the engine's own connections just keep retrying.
    config.redis.url = "redis://127.0.0.1:1".into();
    let broker = RedisBroker::start(&config).unwrap();
    let node = Node::new(config, broker.clone() as Arc<dyn Broker>);
    let subscribers = 100;
    let outboxes: Vec<_> = (0..subscribers)
        .map(|_| {
            let outbox = node.open_socket().unwrap();
            node.join(&outbox, "ticker:ACME", false);
            outbox
        })
        .collect();
    let writer = EnvelopeWriter::new("other-node");
    let mut group = c.benchmark_group("inbound");
    for n in [1usize, 16] {
        let items = payloads(n);
        let wire = if n == 1 {
            writer.single(&items[0])
        } else {
            writer.batch(items.iter().map(|p| p.as_slice()))
        };
        group.throughput(Throughput::Elements((n * subscribers) as u64));
        group.bench_function(
            format!("envelope_fan_out/{n}_messages_to_{subscribers}_subscribers"),
            |b| {
                let mut drained = Drained::default();
                let mut i = 0u64;
                b.iter(|| {
                    broker.inject(b"room:ticker:ACME", &wire);
                    i += 1;
                    if i.is_multiple_of(32) {
                        for outbox in &outboxes {
                            outbox.drain(&mut drained);
                            drained.messages.clear();
                        }
                    }
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, encode_decode, inbound_fan_out);
criterion_main!(benches);
