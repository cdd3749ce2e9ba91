//! Redis Cluster (`redis.cluster_nodes`): rooms use sharded pub/sub (`SPUBLISH` /
//! `SSUBSCRIBE`), so a room's messages travel only to the master that owns its slot (and its replicas),
//! instead of plain `PUBLISH`, which a cluster copies to every one of its nodes.
//!
//! The node reads the slot map (`CLUSTER SLOTS`) and runs one Redis engine per master
//! that serves slots: its own pipelines, its own sharded pub/sub connection, its own
//! probe. A room goes to the master of its slot; a room's channel, stream and position
//! share the hash tag `{<roomId>}`, so the durable publish script stays in one slot and
//! rooms spread over all 16 384 slots by their ids. What is not a room (broadcasts,
//! presence, direct messages) lives on the master of the home tag `{volley}`.
//!
//! Slots move (a resharding, a master added, a replica promoted): the map is read again
//! every second, and at once when a master answers `MOVED`/`ASK`/`TRYAGAIN`/
//! `CLUSTERDOWN` or takes a subscription away (`sunsubscribe`). The set hands over (see
//! `routed`): a room whose slot moved is subscribed on its new master's engine before
//! the old one lets it go; publishes a master refused did not run: they are handed back
//! and routed again by the new map.
//!
//! A `rediss://` first node makes every connection TLS (the watch's and each master's
//! engines), with the same `redis.tls_*` certificates: a cluster with `tls-cluster yes`
//! names its masters' TLS ports in the slot map.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, TlsCertificates, Value};

use super::{connect_to, Layout, Route, Starter, Streak, Topology};
use crate::broker::redis::{slot, tls, EngineOptions, Keys, RedisStartError, HOME_TAG};
use crate::broker::Counter;
use crate::config::Config;

/// How often the slot map is read when nothing asks for it sooner.
const REFRESH: Duration = Duration::from_secs(1);
/// The shortest pause between two reads, however often masters redirect.
const MIN_REFRESH: Duration = Duration::from_millis(100);
/// How long one node may take to connect and answer `CLUSTER SLOTS`.
const ASK_WAIT: Duration = Duration::from_secs(1);
const SLOTS: usize = 16_384;
/// A slot no master serves.
const UNSERVED: u16 = u16::MAX;

/// One master of the map: where it is, and a hash tag whose slot it serves (the
/// engine's probe channel and live-node set carry it; every node picks the same one
/// from the same map).
#[derive(Clone, PartialEq)]
struct Master {
    host: String,
    port: u16,
    tag: String,
}

/// One reading of the slot map: each slot's master.
pub(crate) struct SlotMap {
    /// Parallel to the layout's engines.
    masters: Vec<Master>,
    /// Each slot's master, as an index into `masters`.
    owner: Vec<u16>,
    /// For room slots (names with hash tags, as every engine's).
    keys: Arc<Keys>,
}

impl SlotMap {
    fn at(&self, slot: u16) -> Option<usize> {
        let owner = *self.owner.get(usize::from(slot))?;
        (usize::from(owner) < self.masters.len()).then_some(usize::from(owner))
    }
}

impl Route for SlotMap {
    fn room(&self, room: &str) -> Option<usize> {
        self.at(self.keys.room_slot(room))
    }

    fn user(&self, _: &str) -> Option<usize> {
        self.home()
    }

    fn home(&self) -> Option<usize> {
        self.at(slot(HOME_TAG.as_bytes()))
    }

    fn listing(&self) -> Vec<usize> {
        self.home().into_iter().collect()
    }

    /// Every slot has a master.
    fn complete(&self) -> bool {
        !self.masters.is_empty() && !self.owner.contains(&UNSERVED)
    }
}

/// One range of `CLUSTER SLOTS`: first slot, last slot, the master's host and port.
type SlotRange = (u16, u16, String, u16);

pub(crate) struct Cluster {
    /// The first cluster node's connection settings (credentials, database, TLS or
    /// not): every master is reached with them.
    base: ConnectionInfo,
    /// `redis.tls_*`, for the watch's own connections (engines read them themselves).
    certs: Option<TlsCertificates>,
    nodes: Vec<String>,
    /// No node answered: logged once per streak.
    unreachable: Streak,
    keys: Arc<Keys>,
    prefix: String,
    node_id: String,
    changes: AtomicU64,
}

impl Cluster {
    pub(crate) fn new(config: &Config) -> Result<Cluster, RedisStartError> {
        let first = config
            .redis
            .cluster_nodes
            .first()
            .map(String::as_str)
            .unwrap_or_default();
        Ok(Cluster {
            base: first
                .into_connection_info()
                .map_err(RedisStartError::BadUrl)?,
            certs: tls::certificates(&config.redis).map_err(RedisStartError::Tls)?,
            nodes: config.redis.cluster_nodes.clone(),
            unreachable: Streak::default(),
            keys: Arc::new(Keys::cluster(
                &config.redis.key_prefix,
                &config.server.node_id,
                "",
            )),
            prefix: config.redis.key_prefix.clone(),
            node_id: config.server.node_id.clone(),
            changes: AtomicU64::new(0),
        })
    }

    /// How to reach the cluster node at `host:port`: as the first configured node is
    /// reached (its credentials; TLS when it is `rediss://`).
    fn reach(&self, host: String, port: u16) -> ConnectionInfo {
        let addr = match self.base.addr() {
            ConnectionAddr::TcpTls { insecure, .. } => ConnectionAddr::TcpTls {
                host,
                port,
                insecure: *insecure,
                tls_params: None,
            },
            _ => ConnectionAddr::Tcp(host, port),
        };
        self.base.clone().set_addr(addr)
    }

    /// The nodes to ask for the map: the masters in use, then the configured ones.
    fn candidates(&self, current: &SlotMap) -> Vec<(String, u16)> {
        let mut out: Vec<(String, u16)> = current
            .masters
            .iter()
            .map(|m| (m.host.clone(), m.port))
            .collect();
        for url in &self.nodes {
            if let Ok(info) = url.as_str().into_connection_info() {
                if let ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } =
                    info.addr()
                {
                    if !out.iter().any(|(h, p)| h == host && p == port) {
                        out.push((host.clone(), *port));
                    }
                }
            }
        }
        out
    }

    /// The slot map: from the node that answered last time (its connection kept in
    /// `asking`), else from the first candidate that answers; else why the last one
    /// did not.
    async fn read_slots(
        &self,
        current: &SlotMap,
        asking: &mut Option<MultiplexedConnection>,
    ) -> Result<Vec<SlotRange>, String> {
        if let Some(conn) = asking.as_mut() {
            match ask_slots(conn).await {
                Some(ranges) => return Ok(ranges),
                None => *asking = None,
            }
        }
        let mut why = String::from("no cluster node to ask");
        for (host, port) in self.candidates(current) {
            let at = format!("{host}:{port}");
            let info = self.reach(host, port);
            let mut conn = match connect_to(info, self.certs.as_ref(), ASK_WAIT).await {
                Ok(conn) => conn,
                Err(e) => {
                    why = format!("{at}: {e}");
                    continue;
                }
            };
            if let Some(ranges) = ask_slots(&mut conn).await {
                *asking = Some(conn);
                return Ok(ranges);
            }
            why = format!("{at}: no usable CLUSTER SLOTS answer");
        }
        Err(why)
    }

    /// The layout for a map: the engines of masters that stay, new ones (gated unless
    /// this is the first map) for the others; `None` when nothing changed.
    fn layout(
        &self,
        starter: &Starter,
        current: &Layout<SlotMap>,
        ranges: &[SlotRange],
    ) -> Option<Layout<SlotMap>> {
        let mut addrs: Vec<(String, u16)> = Vec::new();
        let mut owner = vec![UNSERVED; SLOTS];
        for (first, last, host, port) in ranges {
            let index = match addrs.iter().position(|(h, p)| h == host && p == port) {
                Some(i) => i,
                None => {
                    addrs.push((host.clone(), *port));
                    addrs.len() - 1
                }
            };
            for slot in *first..=(*last).min(SLOTS as u16 - 1) {
                owner[usize::from(slot)] = index as u16;
            }
        }
        let was = &current.route;
        let same_masters = addrs.len() == was.masters.len()
            && addrs
                .iter()
                .zip(&was.masters)
                .all(|((h, p), m)| *h == m.host && *p == m.port);
        if same_masters && owner == was.owner {
            return None;
        }
        let first_map = current.engines.is_empty();
        let mut masters = Vec::with_capacity(addrs.len());
        let mut engines = Vec::with_capacity(addrs.len());
        // Each address's place in `masters`: none for a master whose engine could not
        // start (it serves nothing in this map).
        let mut place: Vec<u16> = Vec::with_capacity(addrs.len());
        for (index, (host, port)) in addrs.into_iter().enumerate() {
            let index = index as u16;
            place.push(UNSERVED);
            let kept = was.masters.iter().position(|m| {
                m.host == host
                    && m.port == port
                    && owner[usize::from(slot(m.tag.as_bytes()))] == index
            });
            if let Some(i) = kept {
                place[usize::from(index)] = masters.len() as u16;
                masters.push(was.masters[i].clone());
                engines.push(current.engines[i].clone());
                continue;
            }
            let Some(tag) = (0..100_000)
                .map(|k| format!("volley-{k}"))
                .find(|tag| owner[usize::from(slot(tag.as_bytes()))] == index)
            else {
                continue;
            };
            let options = EngineOptions {
                info: self.reach(host.clone(), port),
                keys: Keys::cluster(&self.prefix, &self.node_id, &tag),
                spublish: true,
                hand_back: None,
                // Engines of the first slot map start with the node; later ones take over.
                gated: !first_map,
                previous_life: first_map,
                classes: None,
            };
            match starter.start(options) {
                Ok(engine) => {
                    place[usize::from(index)] = masters.len() as u16;
                    engines.push(engine);
                    masters.push(Master { host, port, tag });
                }
                Err(e) => {
                    tracing::error!(master = %format!("{host}:{port}"), error = %e, "cannot start on a cluster master");
                }
            }
        }
        let owner = owner
            .into_iter()
            .map(|o| place.get(usize::from(o)).copied().unwrap_or(UNSERVED))
            .collect();
        Some(Layout {
            engines,
            route: SlotMap {
                masters,
                owner,
                keys: self.keys.clone(),
            },
        })
    }
}

impl Topology for Cluster {
    type Route = SlotMap;
    /// The connection of the node that answered `CLUSTER SLOTS` last.
    type Watch = Option<MultiplexedConnection>;
    const ENGINE: &'static str = "redis-cluster";
    const ROUNDS: Option<(Duration, Duration)> = Some((REFRESH, MIN_REFRESH));
    const UNSERVED: &'static str = "no Redis Cluster master serves the slot yet";

    /// Starts without a map and reads it in the background: a node starts while the
    /// cluster is down and reports it through `/readyz`.
    fn first(&self, _: &Starter) -> Result<Layout<SlotMap>, RedisStartError> {
        Ok(Layout {
            engines: Vec::new(),
            route: SlotMap {
                masters: Vec::new(),
                owner: vec![UNSERVED; SLOTS],
                keys: self.keys.clone(),
            },
        })
    }

    async fn look<'a>(
        &'a self,
        starter: &'a Starter,
        current: &'a Layout<SlotMap>,
        asking: &'a mut Option<MultiplexedConnection>,
    ) -> Option<Layout<SlotMap>> {
        match self.read_slots(&current.route, asking).await {
            Ok(ranges) => {
                self.unreachable.ended();
                self.layout(starter, current, &ranges)
            }
            Err(why) => {
                if !current.engines.is_empty() {
                    tracing::warn!(
                        error = %why,
                        "no Redis Cluster node answered CLUSTER SLOTS; keeping the last map"
                    );
                } else if self.unreachable.began() {
                    tracing::warn!(
                        error = %why,
                        "cannot reach Redis Cluster; serving local sockets only, /readyz answers 503 until it answers"
                    );
                }
                None
            }
        }
    }

    fn changed(&self, was: &Layout<SlotMap>, now: &Layout<SlotMap>) {
        if was.engines.is_empty() {
            tracing::info!(masters = now.engines.len(), "Redis Cluster slot map read");
        } else {
            self.changes.fetch_add(1, Relaxed);
            tracing::warn!(
                masters = now.engines.len(),
                complete = now.route.complete(),
                "Redis Cluster slot map changed; following it"
            );
        }
    }

    fn counters(&self) -> Vec<Counter> {
        vec![Counter::count(
            "redis_cluster_changes",
            "Times the node followed a new Redis Cluster slot map (slots moved, masters added, removed or failed over).",
            self.changes.load(Relaxed),
        )]
    }
}

/// `CLUSTER SLOTS` on one connection, within `ASK_WAIT`; `None` for no usable answer.
async fn ask_slots(conn: &mut MultiplexedConnection) -> Option<Vec<SlotRange>> {
    let mut cmd = redis::cmd("CLUSTER");
    cmd.arg("SLOTS");
    let value = tokio::time::timeout(ASK_WAIT, cmd.query_async::<Value>(conn))
        .await
        .ok()?
        .ok()?;
    parse_slots(&value).filter(|ranges| !ranges.is_empty())
}

/// `CLUSTER SLOTS`: `[[first, last, [host, port, id, ...], replicas...], ...]`.
fn parse_slots(value: &Value) -> Option<Vec<SlotRange>> {
    let Value::Array(ranges) = value else {
        return None;
    };
    let mut out = Vec::with_capacity(ranges.len());
    for range in ranges {
        let Value::Array(parts) = range else {
            return None;
        };
        let (Some(Value::Int(first)), Some(Value::Int(last)), Some(Value::Array(master))) =
            (parts.first(), parts.get(1), parts.get(2))
        else {
            return None;
        };
        let (Some(host), Some(Value::Int(port))) = (master.first(), master.get(1)) else {
            return None;
        };
        let host = match host {
            Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok()?,
            Value::SimpleString(s) => s.clone(),
            _ => return None,
        };
        out.push((
            u16::try_from(*first).ok()?,
            u16::try_from(*last).ok()?,
            host,
            u16::try_from(*port).ok()?,
        ));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rooms_spread_over_three_masters_within_a_fifth_of_even() {
        // The slots as `redis-cli --cluster create` splits them over three masters.
        let bounds = [0u16, 5461, 10923, 16384];
        let keys = Keys::cluster("", "n1", "");
        let mut counts = [0usize; 3];
        for room in 0..1000 {
            let slot = keys.room_slot(&format!("ticker:{room}"));
            let master = bounds.windows(2).position(|w| (w[0]..w[1]).contains(&slot));
            counts[master.unwrap_or(0)] += 1;
        }
        for count in counts {
            assert!((267..=400).contains(&count), "{counts:?}");
        }
    }

    #[test]
    fn cluster_slots_replies_parse() {
        let node = |host: &str, port: i64| {
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node("127.0.0.1", 7001),
            ]),
            Value::Array(vec![
                Value::Int(5461),
                Value::Int(16383),
                node("127.0.0.1", 7002),
                node("127.0.0.1", 7003),
            ]),
        ]);
        assert_eq!(
            parse_slots(&reply),
            Some(vec![
                (0, 5460, "127.0.0.1".to_string(), 7001),
                (5461, 16383, "127.0.0.1".to_string(), 7002),
            ])
        );
        assert_eq!(parse_slots(&Value::Int(3)), None);
    }
}
