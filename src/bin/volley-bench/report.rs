//! The run's results: one typed report, printed as a table or as one JSON line (the same
//! fields; `benches/e2e.sh` and `benches/tuning.py` read the JSON).

use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct Report {
    pub sockets: usize,
    pub rooms: usize,
    pub rooms_per_socket: usize,
    pub publishers: usize,
    pub rate: f64,
    pub payload_bytes: usize,
    pub seconds: f64,
    pub published: u64,
    pub expected: u64,
    pub delivered: u64,
    pub lost: u64,
    pub disordered_or_duplicate: u64,
    pub failed_sockets: usize,
    pub error_frames: u64,
    pub delivered_per_s: f64,
    pub frames_per_socket_per_s: f64,
    pub latency_ms: Latency,
    pub server_cpu_s: Option<f64>,
    pub redis_commands_per_s: Option<f64>,
    pub redis_publish_per_s: Option<f64>,
    pub publish_pipelines_per_s: Option<f64>,
    pub server_cpu_us_per_delivery: Option<f64>,
    /// Bytes the subscribers read in the measured seconds per message delivered.
    pub wire_bytes_per_delivery: Option<f64>,
    /// With --redis-pid: the Redis server's CPU seconds over the same span.
    pub redis_cpu_s: Option<f64>,
    /// With --storm: how the reconnect storm went (the measured seconds and the latency
    /// above are the storm's).
    pub storm: Option<StormReport>,
    /// Bytes the subscribers read per update each of them was sent (published updates
    /// times subscribers): what an update costs on the wire, whatever conflation skipped.
    pub wire_bytes_per_update: Option<f64>,
    /// With --board --state: from each subscriber's join to its board's snapshot.
    pub snapshot_ms: Option<SnapshotReport>,
    /// How the subscribers connected and joined (before the warm-up).
    pub joins: JoinReport,
    /// With --shard: every recorded latency as `[µs, count]`, so shards merge exactly.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<Vec<(u64, u64)>>,
    /// With --shard: `i/n`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shard: Option<String>,
}

/// The connect and join storm: every subscriber from its connect to its confirmed join,
/// and what the tool itself held once all were in.
#[derive(Debug, Serialize)]
pub struct JoinReport {
    pub sockets: usize,
    pub seconds: f64,
    pub sockets_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Attempts that failed (each retried after a pause, up to four attempts a socket).
    pub failed: u64,
    pub bench_rss_mb: Option<f64>,
    pub bench_kib_per_socket: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct SnapshotReport {
    pub joiners: usize,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

#[derive(Debug, Serialize)]
pub struct StormReport {
    pub sockets: usize,
    pub joined: usize,
    pub failed: usize,
    /// From the first connect to the last confirmed join.
    pub seconds: f64,
}

/// End-to-end latency percentiles, from the send time carried in each message.
#[derive(Debug, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Report {
    pub fn print_json(&self) {
        match serde_json::to_string(self) {
            Ok(line) => println!("{line}"),
            Err(e) => eprintln!("volley-bench: cannot write the report: {e}"),
        }
    }

    pub fn print_table(&self) {
        println!(
            "{} sockets, {} rooms ({} per socket), {} publishers at {} msg/s, {}-byte payloads, {:.1} s measured",
            self.sockets, self.rooms, self.rooms_per_socket, self.publishers, self.rate, self.payload_bytes, self.seconds
        );
        println!(
            "published {}  expected {}  delivered {}  lost {}  dup/out-of-order {}  failed sockets {}  error frames {}",
            self.published, self.expected, self.delivered, self.lost, self.disordered_or_duplicate, self.failed_sockets, self.error_frames
        );
        println!(
            "delivered/s {:.0}  frames/socket/s {:.2}",
            self.delivered_per_s, self.frames_per_socket_per_s
        );
        let l = &self.latency_ms;
        println!(
            "latency ms  p50 {}  p99 {}  p99.9 {}  max {}",
            l.p50, l.p99, l.p999, l.max
        );
        if let Some(commands) = self.redis_commands_per_s {
            println!(
                "redis commands/s {:.0} (PUBLISH {:.0})  publish pipelines/s {:.1}",
                commands,
                self.redis_publish_per_s.unwrap_or(0.0),
                self.publish_pipelines_per_s.unwrap_or(0.0)
            );
        }
        if let Some(bytes) = self.wire_bytes_per_delivery {
            println!("wire bytes per delivery {bytes:.1}");
        }
        if let Some(bytes) = self.wire_bytes_per_update {
            println!("wire bytes per update per subscriber {bytes:.1}");
        }
        if let Some(s) = &self.snapshot_ms {
            println!(
                "snapshot ms ({} joiners)  p50 {}  p99 {}  max {}",
                s.joiners, s.p50, s.p99, s.max
            );
        }
        let j = &self.joins;
        println!(
            "joins: {} sockets in {:.2} s ({:.0}/s)  p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms  failed attempts {} (retried)  bench RSS {}",
            j.sockets,
            j.seconds,
            j.sockets_per_s,
            j.p50_ms,
            j.p99_ms,
            j.max_ms,
            j.failed,
            match (j.bench_rss_mb, j.bench_kib_per_socket) {
                (Some(mb), Some(kib)) => format!("{mb:.0} MB ({kib:.1} KiB per socket)"),
                _ => "unknown".into(),
            }
        );
        if let Some(s) = self.redis_cpu_s {
            println!("redis CPU {s:.2} s");
        }
        if let Some(storm) = &self.storm {
            println!(
                "storm: {} of {} sockets connected and joined in {:.2} s ({} failed)",
                storm.joined, storm.sockets, storm.seconds, storm.failed
            );
        }
        match (self.server_cpu_us_per_delivery, self.server_cpu_s) {
            (Some(us), Some(s)) => println!("server CPU {s:.2} s  = {us:.2} µs per delivery"),
            _ => println!("server CPU: pass --pid PID for each server process"),
        }
    }
}
