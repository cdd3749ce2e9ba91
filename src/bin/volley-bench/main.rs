//! `volley-bench`: the end-to-end load tool.
//!
//! Opens subscriber sockets spread over one or more nodes, joins them to rooms, drives
//! publishers at a steady total rate, and reports what arrived: deliveries against the
//! count expected, loss, duplicates and reordering, end-to-end latency from the send time
//! carried in each message, frames per socket, and — given the servers' pids — server CPU
//! per delivery. Only messages sent after the warm-up count.
//!
//! It shares the machine with the servers, so it stays cheap: frames are scanned for the
//! bench's fixed-shape content instead of parsed (see `scan.rs`).
//!
//! | file | job |
//! | --- | --- |
//! | `plan.rs` | the scenario presets; which socket is in which room, on which node |
//! | `clients.rs` | subscriber sockets that count, publishers that send at a rate |
//! | `measure.rs` | warm-up, measured seconds, drain; the servers' CPU and Redis counters |
//! | `report.rs` | the typed report, as a table or one JSON line |
//! | `joins.rs` | connecting and joining: a bounded concurrency, source addresses, probes that confirm joins in big rooms, the storm's report |
//! | `latency.rs` | end-to-end latencies, one histogram per thread, merged for the report |
//! | `scan.rs` | the fixed-shape message content, written and scanned |
//! | `sse.rs` | subscribers over Server-Sent Events (`--transport sse`) |
//! | `storm.rs` | a reconnect storm during the measured seconds (`--storm`) |
//! | `board.rs` | board mode (`--board N`): quotes to a state room, snapshots timed, deltas |
//! | `wire.rs` | bytes on the wire, and permessage-deflate for subscribers (`--deflate`) |
//! | `error.rs` | what can stop a run |

mod board;
mod clients;
mod error;
mod joins;
mod latency;
mod measure;
mod plan;
mod report;
mod scan;
mod sse;
mod storm;
mod wire;

use std::sync::Arc;

use clap::Parser;

use clients::{Transport, Via};
use plan::{Plan, Scenario};

/// volley-bench: end-to-end load for volley nodes.
///
/// Opens N WebSocket sockets spread round-robin over the node URLs, joins each to R of K
/// rooms, publishes at a total rate from P publishers (sockets or the HTTP API), and
/// reports what arrived: published / expected / delivered, loss, duplicates and
/// out-of-order per publisher and room, latency percentiles from the send time in each
/// message, frames per socket per second, and, with --pid and --redis-url, server CPU
/// per delivery and Redis commands per second. Targets are 127.0.0.1 nodes you started
/// (benches/e2e.sh starts a Redis and two nodes and runs this).
#[derive(Parser, Debug)]
#[command(version)]
pub struct Args {
    /// Node WebSocket URL; repeat for several nodes (sockets are spread round-robin).
    #[arg(long = "url", default_value = "ws://127.0.0.1:8080/ws")]
    urls: Vec<String>,
    /// A preset; the flags below override its values.
    #[arg(long, value_enum)]
    scenario: Option<Scenario>,
    /// Subscriber sockets in all.
    #[arg(long)]
    sockets: Option<usize>,
    /// Rooms in all (`<room-prefix>-0` ...).
    #[arg(long)]
    rooms: Option<usize>,
    /// Rooms each subscriber socket joins.
    #[arg(long)]
    rooms_per_socket: Option<usize>,
    /// Publishers (sockets that join no room, or HTTP connections with --via api).
    #[arg(long)]
    publishers: Option<usize>,
    /// How publishers publish.
    #[arg(long, value_enum, default_value = "socket")]
    via: Via,
    /// The nodes' api.key, for --via api.
    #[arg(long, default_value = "")]
    api_key: String,
    /// Total messages per second over all publishers.
    #[arg(long)]
    rate: Option<f64>,
    /// Size of each message's content in bytes.
    #[arg(long)]
    payload: Option<usize>,
    /// Seconds before measuring.
    #[arg(long, default_value_t = 3.0)]
    warmup: f64,
    /// Seconds measured (without --storm).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Prefix of room names, so runs do not meet.
    #[arg(long, default_value = "bench")]
    room_prefix: String,
    /// Server process ids whose CPU time is measured; repeat for several.
    #[arg(long = "pid")]
    pids: Vec<u32>,
    /// The Redis server's process id: its CPU time during the measurement is reported.
    #[arg(long)]
    redis_pid: Option<u32>,
    /// The Redis the nodes share: its command rates during the measurement are reported.
    #[arg(long)]
    redis_url: Option<String>,
    /// A reconnect storm: this many more sockets connect and join (a room each) when the
    /// measured seconds begin, while the plan's sockets keep receiving; the measured
    /// seconds are then the storm's, from its first connect to its last join, instead of
    /// --duration (raise `ulimit -n`).
    #[arg(long, default_value_t = 0)]
    storm: usize,
    /// Storm sockets connecting at once.
    #[arg(long, default_value_t = 500)]
    storm_concurrency: usize,
    /// Subscribers offer permessage-deflate (the nodes need compression.enabled) and
    /// inflate what comes compressed.
    #[arg(long)]
    deflate: bool,
    /// Board mode: every publish is a quote (about 150 bytes) of one of N symbols to the
    /// room (a state room keyed by `symbol` on the nodes); deliveries are counted by the
    /// offset each board message carries. Rooms default to 1.
    #[arg(long, value_name = "SYMBOLS")]
    board: Option<usize>,
    /// With --board: subscribers join with `"state":true` (the board's snapshot first);
    /// the time from each join to its snapshot is reported.
    #[arg(long)]
    state: bool,
    /// With --board: subscribers join with `"delta":"fossil"`.
    #[arg(long)]
    delta: bool,
    /// How subscribers are served: WebSockets, or Server-Sent Events (`GET /sse` on
    /// each URL's host and port; publishers stay on sockets or the API).
    #[arg(long, value_enum, default_value = "ws")]
    transport: Transport,
    /// Subscriber sockets connecting (and joining) at once.
    #[arg(long, default_value_t = 500)]
    connect_concurrency: usize,
    /// Spread subscriber sockets over this many loopback source addresses (127.0.0.2,
    /// 127.0.0.3, ...: each has its own ephemeral ports); 0: the kernel's choice.
    #[arg(long, default_value_t = 0)]
    source_addrs: usize,
    /// Run one share of the sockets: those whose index is i modulo n (several processes
    /// stay under the file limit each). Only shard 0 publishes, and counts what every
    /// shard should get; merge the shards' `--json` lines (benches/viewers.sh does).
    #[arg(long, value_name = "I/N")]
    shard: Option<plan::Shard>,
    /// Start measuring at this wall-clock time (ms since the Unix epoch) instead of after
    /// --warmup: shards started together measure the same seconds.
    #[arg(long, value_name = "UNIX_MS")]
    start_at: Option<u64>,
    /// One JSON line instead of the table.
    #[arg(long)]
    json: bool,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if args.transport == Transport::Sse && (args.deflate || args.delta || args.storm > 0) {
        eprintln!("volley-bench: --transport sse takes no --deflate, --delta or --storm");
        std::process::exit(2);
    }
    if args.via == Via::Api && args.api_key.is_empty() {
        eprintln!("volley-bench: --via api needs --api-key (the nodes' api.key)");
        std::process::exit(2);
    }
    let plan = Arc::new(Plan::from(&args));
    if let Err(e) = joins::raise_file_limit(plan.my_socket_count() + args.storm + plan.publishers) {
        eprintln!("volley-bench: {e}");
        std::process::exit(2);
    }
    match measure::run(&args, plan).await {
        Ok(report) if args.json => report.print_json(),
        Ok(report) => report.print_table(),
        Err(e) => {
            eprintln!("volley-bench: {e}");
            std::process::exit(1);
        }
    }
}
