//! Every broker engine as a deployment the tests can start nodes on: the embedded bus,
//! one redis-server, two shards, Sentinel, and a Redis Cluster. `tests/engines.rs` runs
//! one contract against each.

use std::sync::Arc;
use std::time::Duration;

use volley::broker::MemoryBus;
use volley::{Config, Server};

use super::topologies::{RedisCluster, SentinelSetup};
use super::{health, start, start_with_broker, wait_status, RedisServer};

/// The engines the contract runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Memory,
    Redis,
    Shards,
    Sentinel,
    Cluster,
}

/// Where an engine's nodes meet.
pub enum Deployment {
    Memory(Arc<MemoryBus>),
    Redis(RedisServer),
    Shards(Vec<RedisServer>),
    Sentinel(SentinelSetup),
    Cluster(RedisCluster),
}

impl Deployment {
    pub async fn start(engine: Engine) -> Deployment {
        match engine {
            Engine::Memory => Deployment::Memory(MemoryBus::new()),
            Engine::Redis => Deployment::Redis(RedisServer::start().await),
            Engine::Shards => {
                Deployment::Shards(vec![RedisServer::start().await, RedisServer::start().await])
            }
            Engine::Sentinel => Deployment::Sentinel(SentinelSetup::start(1, false).await),
            // A replica per master, for the hand-over.
            Engine::Cluster => Deployment::Cluster(RedisCluster::start_with(1).await),
        }
    }

    /// A node on this deployment, ready (`/readyz` 200) before it is returned.
    pub async fn node(&self, id: &'static str, tweak: impl FnOnce(&mut Config)) -> Server {
        let server = match self {
            Deployment::Memory(bus) => {
                return start_with_broker(
                    |c| {
                        c.server.node_id = id.into();
                        tweak(c);
                    },
                    Arc::new(bus.broker()),
                )
                .await;
            }
            Deployment::Redis(redis) => {
                let url = redis.url();
                start(move |c| {
                    c.redis.url = url;
                    fast(c, id);
                    tweak(c);
                })
                .await
            }
            Deployment::Shards(shards) => {
                let urls: Vec<String> = shards.iter().map(RedisServer::url).collect();
                start(move |c| {
                    c.redis.shards = urls;
                    fast(c, id);
                    tweak(c);
                })
                .await
            }
            Deployment::Sentinel(setup) => {
                let on_sentinel = setup.node(id);
                start(move |c| {
                    on_sentinel(c);
                    fast(c, id);
                    tweak(c);
                })
                .await
            }
            Deployment::Cluster(cluster) => {
                let urls = cluster.urls();
                start(move |c| {
                    c.redis.cluster_nodes = urls;
                    fast(c, id);
                    tweak(c);
                })
                .await
            }
        };
        wait_status(server.local_addr(), "/readyz", 200).await;
        server
    }

    /// What this engine's nodes live through when its server changes under them: a
    /// restarted redis-server, a restarted shard (the one `room` lives on), a Sentinel
    /// failover, a cluster master failed over to its replica. Returns once every node
    /// is ready again. The embedded engine has none (`false`).
    pub async fn hand_over(&mut self, room: &str, nodes: &[&Server]) -> bool {
        match self {
            Deployment::Memory(_) => return false,
            Deployment::Redis(redis) => redis.restart().await,
            Deployment::Shards(shards) => {
                let urls: Vec<String> = shards.iter().map(RedisServer::url).collect();
                shards[volley::broker::routed::pick(&urls, room)]
                    .restart()
                    .await;
            }
            Deployment::Sentinel(setup) => {
                let before: Vec<u64> = failovers(nodes).await;
                setup.sentinels[0].ask(&["failover", "volley"]).await;
                tokio::time::timeout(Duration::from_secs(20), async {
                    while failovers(nodes)
                        .await
                        .iter()
                        .zip(&before)
                        .any(|(now, was)| now <= was)
                    {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                })
                .await
                .expect("the nodes never followed the failover");
            }
            Deployment::Cluster(cluster) => cluster.fail_over_room(room).await,
        }
        for node in nodes {
            wait_status(node.local_addr(), "/readyz", 200).await;
        }
        true
    }
}

/// The nodes' `redis_failovers`.
async fn failovers(nodes: &[&Server]) -> Vec<u64> {
    let mut out = Vec::new();
    for node in nodes {
        out.push(
            health(node.local_addr()).await["redis_failovers"]
                .as_u64()
                .unwrap_or(0),
        );
    }
    out
}

/// Quick probes and no publish limit, as every Redis test runs.
fn fast(c: &mut Config, id: &str) {
    c.server.node_id = id.into();
    c.redis.probe_interval_ms = 100;
    c.limits.publish_rate = 0;
}

impl RedisCluster {
    /// The master of `room`'s slot hands it to its replica (`CLUSTER FAILOVER`), once
    /// the replica has synced.
    pub async fn fail_over_room(&self, room: &str) {
        let keys = volley::broker::redis::Keys::cluster("", "test", "");
        let master = self.owner(keys.room_slot(room)).await;
        let replica = self.replica_of(master).await;
        let _: () = redis::cmd("CLUSTER")
            .arg("FAILOVER")
            .query_async(&mut self.servers[replica].conn().await)
            .await
            .unwrap();
        // Until the old master serves the slot no more (the nodes follow the map).
        tokio::time::timeout(Duration::from_secs(20), async {
            while self.owner(keys.room_slot(room)).await == master {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .expect("the failover never finished");
    }
}
