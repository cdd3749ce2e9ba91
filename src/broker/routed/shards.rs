//! Independent Redis shards (`redis.shards`): rooms spread over several standalone Redis
//! servers, each with its own engine (pipelines, pub/sub connection, probe). A room
//! lives on the shard that rendezvous hashing of its id picks (the highest hash of shard
//! URL and room id), so every node agrees without talking, and adding a shard moves only
//! the rooms that now hash highest to it: about 1/N of them.
//!
//! What is not a room has a documented home: broadcasts and node reports on the first
//! shard; a user's presence and direct messages on the shard their user id hashes to;
//! the listing of online users is gathered from all shards. The shards are fixed: no
//! watch, nothing handed back.

use std::future::Future;
use std::time::Duration;

use super::{Layout, Route, Starter, Topology};
use crate::broker::redis::{EngineOptions, RedisStartError};
use crate::config::Config;

pub(crate) struct Shards {
    urls: Vec<String>,
}

impl Shards {
    pub(crate) fn new(config: &Config) -> Shards {
        Shards {
            urls: config.redis.shards.clone(),
        }
    }
}

/// Rendezvous over the shards' URLs.
pub(crate) struct Rendezvous {
    urls: Vec<String>,
}

impl Route for Rendezvous {
    fn room(&self, room: &str) -> Option<usize> {
        Some(pick(&self.urls, room))
    }

    fn user(&self, user: &str) -> Option<usize> {
        Some(pick(&self.urls, user))
    }

    fn home(&self) -> Option<usize> {
        Some(0)
    }

    fn listing(&self) -> Vec<usize> {
        (0..self.urls.len()).collect()
    }
}

impl Topology for Shards {
    type Route = Rendezvous;
    type Watch = ();
    const ENGINE: &'static str = "redis-shards";
    const ROUNDS: Option<(Duration, Duration)> = None;
    const UNSERVED: &'static str = "no Redis shard is configured";

    fn first(&self, starter: &Starter) -> Result<Layout<Rendezvous>, RedisStartError> {
        let engines = self
            .urls
            .iter()
            .map(|url| starter.start(EngineOptions::standalone(starter.config(), url)?))
            .collect::<Result<_, _>>()?;
        Ok(Layout {
            engines,
            route: Rendezvous {
                urls: self.urls.clone(),
            },
        })
    }

    fn look<'a>(
        &'a self,
        _: &'a Starter,
        _: &'a Layout<Rendezvous>,
        _: &'a mut (),
    ) -> impl Future<Output = Option<Layout<Rendezvous>>> + Send + 'a {
        std::future::ready(None)
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
