//! The measurement: runs the clients through warm-up, the measured seconds and the drain,
//! and reads what the servers did meanwhile (CPU from `/proc`, Redis `INFO`, the nodes'
//! pipeline counters from `/healthz`), outside the servers' own CPU time.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::Empty;
use hyper::header::HOST;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::clients::{now_us, publisher, subscriber, Publisher, Run, Transport};
use crate::error::BenchError;
use crate::joins::{self, Joining};
use crate::plan::{node_of, Plan};
use crate::report::{JoinReport, Latency, Report, SnapshotReport, StormReport};
use crate::sse;
use crate::storm;
use crate::Args;

/// Runs the plan: connect and join, warm up, measure, drain, and report.
pub async fn run(args: &Args, plan: Arc<Plan>) -> Result<Report, BenchError> {
    let run = Arc::new(Run::new(Joining::new(
        args.connect_concurrency,
        args.source_addrs,
    )));
    let rooms: Arc<Vec<String>> = Arc::new(
        (0..plan.rooms)
            .map(|r| format!("{}-{r}", args.room_prefix))
            .collect(),
    );
    let stop_subscribers = CancellationToken::new();
    let stop_publishers = CancellationToken::new();
    let mut subscribers = connect(args, &plan, &rooms, &run, &stop_subscribers).await?;
    let joins = run.joining.report(plan.my_socket_count());
    let per_room = Arc::new(plan.subscribers_per_room());
    let mut publishers = JoinSet::new();
    let publishing = if plan.publishes() { plan.publishers } else { 0 };
    for p in 0..publishing {
        let url = args.urls[p % args.urls.len()].clone();
        publishers.spawn(publisher(Publisher {
            url,
            index: p,
            plan: plan.clone(),
            rooms: rooms.clone(),
            subscribers_per_room: per_room.clone(),
            run: run.clone(),
            via: args.via,
            api_key: args.api_key.clone(),
            stop: stop_publishers.clone(),
        }));
    }
    let (progress, ticker) = show_progress(args, &run);
    match args.start_at {
        Some(at) => {
            let now = now_us() / 1000;
            if now > at {
                return Err(BenchError::Late { by_ms: now - at });
            }
            tokio::time::sleep(Duration::from_millis(at - now)).await;
        }
        None => tokio::time::sleep(Duration::from_secs_f64(args.warmup)).await,
    }
    let before = Reading::take(args).await;
    let started = Instant::now();
    let wire_before = run.wire_bytes.load(Relaxed);
    run.measure_from_us.store(now_us(), Relaxed);
    let storm = (args.storm > 0).then(|| {
        let (urls, prefix, hold) = (
            args.urls.clone(),
            args.room_prefix.clone(),
            stop_subscribers.clone(),
        );
        let (sockets, concurrency) = (args.storm, args.storm_concurrency);
        tokio::spawn(async move { storm::run(&urls, sockets, concurrency, &prefix, hold).await })
    });
    // With a storm, the measured seconds are the storm's: the latency is during it.
    let storm = match storm {
        Some(task) => task.await.ok(),
        None => {
            tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
            None
        }
    };
    run.measure_until_us.store(now_us(), Relaxed);
    let wire_bytes = run.wire_bytes.load(Relaxed) - wire_before;
    let counters_after = server_counters(args).await;
    let counted_secs = started.elapsed().as_secs_f64();
    ticker.abort();
    progress.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    stop_publishers.cancel();
    while let Some(result) = publishers.join_next().await {
        if let Ok(Err(e)) = result {
            return Err(BenchError::Publisher(Box::new(e)));
        }
    }
    settle(&run).await;
    let after = Reading {
        counters: counters_after,
        ..Reading::take_cpu(args)
    };
    stop_subscribers.cancel();
    let tally = Tally::collect(&mut subscribers).await?;
    Ok(report(
        args,
        &plan,
        &run,
        Measured {
            seconds,
            counted_secs,
            wire_bytes,
            before,
            after,
            tally,
            storm,
            joins,
        },
    ))
}

/// Connects every subscriber socket and waits until each has joined its rooms.
async fn connect(
    args: &Args,
    plan: &Plan,
    rooms: &[String],
    run: &Arc<Run>,
    stop: &CancellationToken,
) -> Result<JoinSet<Result<crate::clients::SubscriberResult, BenchError>>, BenchError> {
    let mine = plan.my_socket_count();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(mine.max(1));
    let mut subscribers = JoinSet::new();
    for s in plan.my_sockets() {
        let url = args.urls[node_of(s, args.urls.len())].clone();
        let my_rooms = plan
            .rooms_of(s)
            .into_iter()
            .map(|r| rooms[r].clone())
            .collect();
        let (run, ready, stop) = (run.clone(), ready_tx.clone(), stop.clone());
        match args.transport {
            Transport::Ws => subscribers.spawn(subscriber(
                url,
                my_rooms,
                run,
                ready,
                stop,
                args.deflate,
                plan.board,
            )),
            Transport::Sse => {
                subscribers.spawn(sse::subscriber(url, my_rooms, run, ready, stop, plan.board))
            }
        };
        if s % 100 == 99 {
            // Let the accept queue breathe while thousands of sockets connect.
            tokio::task::yield_now().await;
        }
    }
    drop(ready_tx);
    // Rooms too big for notices confirm their joins by probes (not boards: a probe is no
    // board entry).
    let probing = CancellationToken::new();
    if plan.board.is_none() && !args.urls.is_empty() {
        let (url, rooms) = (args.urls[0].clone(), rooms.to_vec());
        let shards = args.shard.map_or(1, |s| s.of as u32);
        tokio::spawn(joins::prober(url, rooms, shards, probing.clone()));
    }
    let _stop_probing = probing.drop_guard();
    for joined in 0..mine {
        if tokio::time::timeout(Duration::from_secs(60), ready_rx.recv())
            .await
            .ok()
            .flatten()
            .is_none()
        {
            let reason = match subscribers.try_join_next() {
                Some(Ok(Err(e))) => e.to_string(),
                _ => "timed out".into(),
            };
            return Err(BenchError::NotJoined {
                joined,
                total: mine,
                reason,
            });
        }
    }
    Ok(subscribers)
}

/// The progress bar (hidden with `--json`), ticking every 100 ms.
fn show_progress(
    args: &Args,
    run: &Arc<Run>,
) -> (indicatif::ProgressBar, tokio::task::JoinHandle<()>) {
    let progress = if args.json {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(((args.warmup + args.duration) * 10.0) as u64)
    };
    progress.set_style(
        indicatif::ProgressStyle::with_template("{spinner} [{bar:30}] {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let ticker = {
        let (progress, run) = (progress.clone(), run.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(100));
            loop {
                every.tick().await;
                progress.inc(1);
                let phase = if run.measure_from_us.load(Relaxed) == u64::MAX {
                    "warm-up"
                } else {
                    "measuring"
                };
                progress.set_message(format!(
                    "{phase}: {} published, {} expected deliveries",
                    run.published.load(Relaxed),
                    run.expected.load(Relaxed)
                ));
            }
        })
    };
    (progress, ticker)
}

/// Waits for what is in flight: until deliveries stop growing (at most 10 s).
async fn settle(run: &Run) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = run.progress.load(Relaxed);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = run.progress.load(Relaxed);
        if now == last {
            break;
        }
        last = now;
    }
}

/// What the servers had done at one moment: their counters and CPU seconds.
struct Reading {
    counters: ServerCounters,
    cpu: Option<f64>,
    redis_cpu: Option<f64>,
}

impl Reading {
    async fn take(args: &Args) -> Reading {
        Reading {
            counters: server_counters(args).await,
            ..Reading::take_cpu(args)
        }
    }

    fn take_cpu(args: &Args) -> Reading {
        Reading {
            counters: ServerCounters::default(),
            cpu: total_cpu(&args.pids),
            redis_cpu: args.redis_pid.and_then(cpu_seconds),
        }
    }
}

/// What the subscribers saw, summed.
struct Tally {
    frames: u64,
    delivered: u64,
    disordered: u64,
    failed: usize,
    latency: Histogram<u64>,
}

impl Tally {
    async fn collect(
        subscribers: &mut JoinSet<Result<crate::clients::SubscriberResult, BenchError>>,
    ) -> Result<Tally, BenchError> {
        let mut tally = Tally {
            frames: 0,
            delivered: 0,
            disordered: 0,
            failed: 0,
            latency: crate::latency::merged(),
        };
        while let Some(result) = subscribers.join_next().await {
            match result {
                Ok(Ok(r)) => {
                    tally.frames += r.frames;
                    tally.delivered += r.delivered;
                    tally.disordered += r.disordered;
                }
                _ => tally.failed += 1,
            }
        }
        Ok(tally)
    }
}

/// The measured seconds, and what was read around them.
struct Measured {
    seconds: f64,
    /// From the first reading of the counters to the last.
    counted_secs: f64,
    wire_bytes: u64,
    before: Reading,
    after: Reading,
    tally: Tally,
    storm: Option<storm::Storm>,
    joins: JoinReport,
}

fn report(args: &Args, plan: &Plan, run: &Run, m: Measured) -> Report {
    let Measured {
        seconds,
        counted_secs,
        wire_bytes,
        before,
        after,
        tally,
        storm,
        joins,
    } = m;
    let delivered = tally.delivered;
    let expected = run.expected.load(Relaxed);
    let cpu = before.cpu.zip(after.cpu).map(|(a, b)| b - a);
    let ms = |us: u64| us as f64 / 1000.0;
    let (b, a) = (before.counters, after.counters);
    Report {
        sockets: plan.my_socket_count(),
        rooms: plan.rooms,
        rooms_per_socket: plan.rooms_per_socket,
        publishers: plan.publishers,
        rate: plan.rate,
        payload_bytes: plan.payload,
        seconds,
        published: run.published.load(Relaxed),
        expected,
        delivered,
        lost: expected.saturating_sub(delivered),
        disordered_or_duplicate: tally.disordered,
        failed_sockets: tally.failed,
        error_frames: run.errors.load(Relaxed),
        delivered_per_s: delivered as f64 / seconds,
        frames_per_socket_per_s: tally.frames as f64
            / seconds
            / plan.my_socket_count().max(1) as f64,
        latency_ms: Latency {
            p50: ms(tally.latency.value_at_quantile(0.50)),
            p99: ms(tally.latency.value_at_quantile(0.99)),
            p999: ms(tally.latency.value_at_quantile(0.999)),
            max: ms(tally.latency.max()),
        },
        server_cpu_s: cpu,
        redis_commands_per_s: rate(b.redis_commands, a.redis_commands, counted_secs),
        redis_publish_per_s: rate(b.redis_publish, a.redis_publish, counted_secs),
        publish_pipelines_per_s: rate(b.pipelines, a.pipelines, counted_secs),
        wire_bytes_per_delivery: (delivered > 0).then(|| wire_bytes as f64 / delivered as f64),
        server_cpu_us_per_delivery: cpu
            .filter(|_| delivered > 0)
            .map(|s| s * 1e6 / delivered as f64),
        redis_cpu_s: before.redis_cpu.zip(after.redis_cpu).map(|(a, b)| b - a),
        storm: storm.map(|s| StormReport {
            sockets: args.storm,
            joined: s.joined,
            failed: s.failed,
            seconds: s.seconds,
        }),
        wire_bytes_per_update: (expected > 0).then(|| wire_bytes as f64 / expected as f64),
        snapshot_ms: run
            .snapshots
            .summary()
            .map(|(joiners, p50, p99, max)| SnapshotReport {
                joiners,
                p50,
                p99,
                max,
            }),
        joins,
        latency_us: args.shard.map(|_| {
            tally
                .latency
                .iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect()
        }),
        shard: args.shard.map(|s| format!("{}/{}", s.index, s.of)),
    }
}

/// Counters read at the start and the end of the measurement, outside the servers' CPU.
#[derive(Default, Clone, Copy)]
struct ServerCounters {
    redis_commands: Option<f64>,
    redis_publish: Option<f64>,
    pipelines: Option<f64>,
}

async fn redis_counters(url: &str) -> Option<(f64, f64)> {
    let client = redis::Client::open(url).ok()?;
    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
    let stats: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(&mut conn)
        .await
        .ok()?;
    let commands: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .ok()?;
    let total = stats
        .lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|v| v.trim().parse().ok())?;
    let publish = commands
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_publish:calls="))
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    Some((total, publish))
}

/// Sum of the nodes' `redis_pipelines` counters, from `/healthz` on each node's address.
async fn pipelines(urls: &[String]) -> Option<f64> {
    let mut total = 0.0;
    for url in urls {
        let uri: hyper::Uri = url.parse().ok()?;
        let (host, port) = (uri.host()?.to_string(), uri.port_u16().unwrap_or(80));
        let stream = TcpStream::connect((host.as_str(), port)).await.ok()?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        tokio::spawn(conn);
        let request = Request::get("/healthz")
            .header(HOST, format!("{host}:{port}"))
            .body(Empty::<Bytes>::new())
            .ok()?;
        let response = sender.send_request(request).await.ok()?;
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .ok()?
            .to_bytes();
        let health: serde_json::Value = serde_json::from_slice(&body).ok()?;
        total += health["redis_pipelines"].as_f64()?;
    }
    Some(total)
}

async fn server_counters(args: &Args) -> ServerCounters {
    let redis = match &args.redis_url {
        Some(url) => redis_counters(url).await,
        None => None,
    };
    ServerCounters {
        redis_commands: redis.map(|r| r.0),
        redis_publish: redis.map(|r| r.1),
        pipelines: if args.redis_url.is_some() {
            pipelines(&args.urls).await
        } else {
            None
        },
    }
}

fn rate(before: Option<f64>, after: Option<f64>, seconds: f64) -> Option<f64> {
    before.zip(after).map(|(a, b)| (b - a) / seconds)
}

/// CPU seconds (user + system) a process has used so far.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(ticks as f64 / hz)
}

fn total_cpu(pids: &[u32]) -> Option<f64> {
    pids.iter().map(|&p| cpu_seconds(p)).sum()
}
