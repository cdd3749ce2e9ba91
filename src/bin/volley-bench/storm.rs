//! A reconnect storm (`--storm N`): when the measured seconds begin, N more sockets
//! connect and each joins a room of its own (its `user_joined` notice confirms the join),
//! at most `--storm-concurrency` connecting at once, while the plan's sockets keep
//! receiving; the report gives how long the storm took and the receivers' latency
//! during it. The storm's sockets stay open, idle, until the run ends.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::clients::{connect, join};
use crate::plan::node_of;
use crate::wire::Tap;

/// How a storm went.
pub struct Storm {
    pub joined: usize,
    pub failed: usize,
    /// From the first connect to the last confirmed join.
    pub seconds: f64,
}

/// Runs the storm; returns once every socket joined or failed. The sockets stay open
/// until `hold` is cancelled.
pub async fn run(
    urls: &[String],
    sockets: usize,
    concurrency: usize,
    room_prefix: &str,
    hold: CancellationToken,
) -> Storm {
    let started = Instant::now();
    let connecting = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks = JoinSet::new();
    for i in 0..sockets {
        let url = urls[node_of(i + 1_000_003, urls.len())].clone();
        let room = format!("{room_prefix}-storm-{i}");
        let (connecting, hold) = (connecting.clone(), hold.clone());
        tasks.spawn(async move {
            let joined = {
                let Ok(_permit) = connecting.acquire().await else {
                    return false;
                };
                match connect(&url).await {
                    Ok(mut ws) => {
                        join(&mut ws, &Tap::default(), &[room], None, &Default::default())
                            .await
                            .map(|_| ws)
                            .ok()
                    }
                    Err(_) => None,
                }
            };
            let Some(ws) = joined else {
                return false;
            };
            // Held open, idle, so the storm's sockets weigh on the node like real ones.
            tokio::spawn(async move {
                hold.cancelled().await;
                drop(ws);
            });
            true
        });
    }
    let (mut joined, mut failed) = (0, 0);
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(true) => joined += 1,
            _ => failed += 1,
        }
    }
    Storm {
        joined,
        failed,
        seconds: started.elapsed().as_secs_f64(),
    }
}
