//! Independent Redis shards (`redis.shards`): rooms spread over several standalone Redis
//! servers, each with its own engine (pipelines, pub/sub connection, probe). A room
//! lives on the shard that rendezvous hashing of its id picks (the highest hash of shard
//! URL and room id), so every node agrees without talking, and adding a shard moves only
//! the rooms that now hash highest to it: about 1/N of them.
//!
//! What is not a room has a documented home: broadcasts on the first shard; a user's
//! presence and direct messages on the shard their user id hashes to; the listing of
//! online users is gathered from all shards.

use std::sync::{Arc, Weak};
use std::time::Instant;

use super::{
    add_stats, BoxFuture, Broker, BrokerState, BrokerStats, Envelope, EnvelopeSink, History,
    HistoryError, OnlineUsers, PresenceError, PublishError, RedisBroker, Target, UserPresence,
};
use crate::config::{Config, Durability};
use crate::metrics::Stats;
use crate::protocol::inbound::Replay;

pub struct ShardedBroker {
    shards: Vec<Arc<RedisBroker>>,
    urls: Vec<String>,
}

impl ShardedBroker {
    pub fn start(config: &Config) -> Result<Arc<ShardedBroker>, super::redis::RedisStartError> {
        let shards = config
            .redis
            .shards
            .iter()
            .map(|url| RedisBroker::start_on(config, url))
            .collect::<Result<_, _>>()?;
        Ok(Arc::new(ShardedBroker {
            shards,
            urls: config.redis.shards.clone(),
        }))
    }

    /// The shard a room (or a user) lives on.
    fn shard_of(&self, name: &str) -> &RedisBroker {
        &self.shards[pick(&self.urls, name)]
    }

    fn shard_for(&self, target: &Target) -> &RedisBroker {
        match target {
            Target::Room(room) => self.shard_of(room),
            Target::User(user) => self.shard_of(user),
            Target::Broadcast => &self.shards[0],
        }
    }
}

/// Rendezvous hashing: the index of the shard with the highest hash of (shard, name).
pub fn pick(shards: &[String], name: &str) -> usize {
    (0..shards.len())
        .max_by_key(|&i| {
            mix(fnv1a(
                fnv1a(FNV_OFFSET, shards[i].as_bytes()),
                name.as_bytes(),
            ))
        })
        .unwrap_or(0)
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a: fixed by its definition, so every node and every version agrees.
fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash ^ 0xff
}

/// A final avalanche (splitmix64's), so close names do not pick alike.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Broker for ShardedBroker {
    fn engine(&self) -> &'static str {
        "redis-shards"
    }

    fn attach(&self, node_id: Arc<str>, sink: Weak<dyn EnvelopeSink>, stats: Arc<Stats>) {
        for shard in &self.shards {
            shard.attach(node_id.clone(), sink.clone(), stats.clone());
        }
    }

    fn publish(&self, batch: &[Envelope]) -> Result<(), PublishError> {
        for envelope in batch {
            self.shard_for(&envelope.target)
                .publish(std::slice::from_ref(envelope))?;
        }
        Ok(())
    }

    fn subscribe(&self, room: &Arc<str>) {
        self.shard_of(room).subscribe(room);
    }

    fn unsubscribe(&self, room: &str) {
        self.shard_of(room).unsubscribe(room);
    }

    fn until_subscribed(&self, room: &str) -> Option<BoxFuture<'static, bool>> {
        self.shard_of(room).until_subscribed(room)
    }

    fn state(&self) -> BrokerState {
        BrokerState::all(self.shards.iter().map(|s| s.state()))
    }

    fn history<'a>(
        &'a self,
        room: &'a str,
        replay: &'a Replay,
        durability: Durability,
    ) -> BoxFuture<'a, Result<History, HistoryError>> {
        self.shard_of(room).history(room, replay, durability)
    }

    fn user_online(&self, user: &Arc<str>) {
        self.shard_of(user).user_online(user);
    }

    fn user_offline(&self, user: &Arc<str>) {
        self.shard_of(user).user_offline(user);
    }

    fn user_rooms_changed(&self, user: &Arc<str>) {
        self.shard_of(user).user_rooms_changed(user);
    }

    fn online_users(&self, max: usize) -> BoxFuture<'_, Result<OnlineUsers, PresenceError>> {
        Box::pin(async move {
            let mut all = OnlineUsers::default();
            for shard in &self.shards {
                let part = shard.online_users(max).await?;
                all.truncated |= part.truncated;
                all.users.extend(part.users);
            }
            all.users.sort_by(|a, b| a.user_id.cmp(&b.user_id));
            all.truncated |= all.users.len() > max;
            all.users.truncate(max);
            Ok(all)
        })
    }

    fn presence_of<'a>(
        &'a self,
        user: &'a str,
    ) -> BoxFuture<'a, Result<Option<UserPresence>, PresenceError>> {
        self.shard_of(user).presence_of(user)
    }

    /// Every shard's counters, summed by name.
    fn stats(&self) -> BrokerStats {
        let mut total: BrokerStats = Vec::new();
        for shard in &self.shards {
            add_stats(&mut total, shard.stats());
        }
        total
    }

    fn shutdown(&self, deadline: Instant) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            for shard in &self.shards {
                shard.shutdown(deadline).await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("redis://10.0.0.{i}:6379")).collect()
    }

    #[test]
    fn rooms_spread_within_a_fifth_of_even() {
        let shards = urls(3);
        let mut counts = [0usize; 3];
        for room in 0..1000 {
            counts[pick(&shards, &format!("ticker:{room}"))] += 1;
        }
        for count in counts {
            assert!((267..=400).contains(&count), "{counts:?}");
        }
    }

    #[test]
    fn a_fourth_shard_moves_about_a_quarter_of_the_rooms() {
        let (three, four) = (urls(3), urls(4));
        let moved = (0..4000)
            .filter(|room| {
                let name = format!("scores:{room}");
                three[pick(&three, &name)] != four[pick(&four, &name)]
            })
            .count();
        // About 1/4 of 4000 = 1000, and only ever to the new shard.
        assert!((800..=1200).contains(&moved), "{moved}");
    }
}
