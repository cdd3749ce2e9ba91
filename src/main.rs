//! The `volley` binary: read config, serve, shut down on SIGTERM/SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;
use volley::config::{Config, Overrides};
use volley::server::ServeError;
use volley::Server;

// `--features system-alloc` leaves the system allocator in place, for heap profilers
// (valgrind's massif, heaptrack) that watch malloc.
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A batched WebSocket broadcast engine: rooms, broadcast, many nodes.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// TOML config file.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// Listen address, e.g. 0.0.0.0:8080 (server.listen).
    #[arg(long, value_name = "ADDR")]
    listen: Option<std::net::SocketAddr>,
    /// This node's id, the serverId of its envelopes (server.node_id).
    #[arg(long, value_name = "ID")]
    node_id: Option<String>,
    /// Delivery window in milliseconds; 0 sends each message at once (batch.delivery_window_ms).
    #[arg(long, value_name = "MS")]
    delivery_window_ms: Option<u64>,
    /// Log filter, e.g. info or volley=debug (server.log); RUST_LOG wins when set.
    #[arg(long, value_name = "FILTER")]
    log: Option<String>,
    /// Set any config key: --set limits.max_connections=5000 (repeatable).
    #[arg(long, short = 's', value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Run the built-in demo feed (scores and a ticker) and open http://HOST:PORT/ (demo.enabled).
    #[arg(long)]
    demo: bool,
    /// Symbols on the demo's ticker board (demo.symbols; 24 unless set).
    #[arg(long, value_name = "N")]
    demo_symbols: Option<usize>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let overrides = Overrides {
        file: cli.config,
        listen: cli.listen,
        node_id: cli.node_id,
        delivery_window_ms: cli.delivery_window_ms,
        log: cli.log,
        demo: cli.demo,
        demo_symbols: cli.demo_symbols,
        set: cli.set,
    };
    let config = match Config::load(&overrides) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("volley: config error: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.print_config {
        print!("{}", config.to_toml());
        return ExitCode::SUCCESS;
    }
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.server.log))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("volley: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        let server = match Server::bind(config).await {
            Ok(server) => server,
            Err(e @ (ServeError::Redis(_) | ServeError::Config(_) | ServeError::Tls(_))) => {
                eprintln!("volley: config error: {e}");
                return ExitCode::from(2);
            }
            Err(e) => {
                eprintln!("volley: {e}");
                return ExitCode::FAILURE;
            }
        };
        // Listening from before the first signal: a second one that comes at once (while
        // the shutdown starts) is heard, not lost between two listeners.
        let mut signals = Signals::listen();
        signals.next().await;
        tracing::info!(
            "shutting down: flushing windows, closing sockets (a second signal exits at once)"
        );
        tokio::select! {
            report = server.shutdown() => {
                if !report.drained {
                    tracing::warn!(
                        left_open = report.left_open,
                        "drain timeout reached; closing the rest"
                    );
                }
                ExitCode::SUCCESS
            }
            _ = signals.next() => {
                tracing::warn!("second signal: exiting without finishing the drain");
                ExitCode::from(130)
            }
        }
    });
    // Tasks still stuck on a silent Redis must not hold the exit.
    runtime.shutdown_background();
    code
}

/// SIGTERM and SIGINT, registered once: every signal from then on is heard.
struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn listen() -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        Signals {
            term: signal(SignalKind::terminate()).ok(),
            int: signal(SignalKind::interrupt()).ok(),
        }
    }

    /// The next SIGTERM or SIGINT (never, for one that could not be registered).
    async fn next(&mut self) {
        async fn recv(signal: &mut Option<tokio::signal::unix::Signal>) {
            match signal {
                Some(signal) => {
                    signal.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        }
        tokio::select! {
            _ = recv(&mut self.term) => {}
            _ = recv(&mut self.int) => {}
        }
    }
}
