//! What a run does: the scenario presets, how sockets spread over nodes and rooms.

use crate::board::Board;
use crate::Args;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Scenario {
    /// 2000 sockets, 20 rooms, 1 room each, 200 msg/s, 100-byte payloads.
    Scoreboard,
    /// 500 sockets, 200 rooms, 20 rooms each, 2000 msg/s, 60-byte payloads.
    Ticker,
}

pub struct Plan {
    pub sockets: usize,
    pub rooms: usize,
    pub rooms_per_socket: usize,
    pub publishers: usize,
    pub rate: f64,
    pub payload: usize,
    /// Board mode (`--board`).
    pub board: Option<Board>,
    /// `--shard i/n`: this process runs the sockets whose index is i modulo n, and only
    /// shard 0 publishes (counting what every shard's sockets should get).
    pub shard: (usize, usize),
}

impl Plan {
    pub fn from(args: &Args) -> Plan {
        let (sockets, rooms, per, publishers, rate, payload) = match args.scenario {
            Some(Scenario::Scoreboard) | None => (2000, 20, 1, 4, 200.0, 100),
            Some(Scenario::Ticker) => (500, 200, 20, 4, 2000.0, 60),
        };
        let board = args.board.map(|symbols| Board {
            symbols: symbols.max(1),
            state: args.state,
            delta: args.delta,
        });
        let rooms = if board.is_some() { 1 } else { rooms };
        Plan {
            board,
            sockets: args.sockets.unwrap_or(sockets),
            rooms: args.rooms.unwrap_or(rooms).max(1),
            rooms_per_socket: args.rooms_per_socket.unwrap_or(per).max(1),
            publishers: args.publishers.unwrap_or(publishers).max(1),
            rate: args.rate.unwrap_or(rate),
            payload: args.payload.unwrap_or(payload),
            shard: args.shard.map_or((0, 1), |s| (s.index, s.of)),
        }
    }

    /// The plan's sockets this process runs.
    pub fn my_sockets(&self) -> impl Iterator<Item = usize> + '_ {
        let (i, n) = self.shard;
        (0..self.sockets).filter(move |s| s % n == i)
    }

    pub fn my_socket_count(&self) -> usize {
        self.my_sockets().count()
    }

    /// Whether this process publishes (shard 0 does, for every shard).
    pub fn publishes(&self) -> bool {
        self.shard.0 == 0
    }

    pub fn rooms_of(&self, socket: usize) -> Vec<usize> {
        let per = self.rooms_per_socket.min(self.rooms);
        (0..per).map(|j| (socket * per + j) % self.rooms).collect()
    }

    /// How many of the plan's sockets are in each room.
    pub fn subscribers_per_room(&self) -> Vec<u64> {
        let mut per_room = vec![0u64; self.rooms];
        for s in 0..self.sockets {
            for r in self.rooms_of(s) {
                per_room[r] += 1;
            }
        }
        per_room
    }
}

/// `--shard i/n`.
#[derive(Clone, Copy, Debug)]
pub struct Shard {
    pub index: usize,
    pub of: usize,
}

impl std::str::FromStr for Shard {
    type Err = String;

    fn from_str(s: &str) -> Result<Shard, String> {
        let (i, n) = s.split_once('/').ok_or("give the shard as i/n, e.g. 0/4")?;
        let (index, of) = (i.trim().parse::<usize>(), n.trim().parse::<usize>());
        match (index, of) {
            (Ok(index), Ok(of)) if of > 0 && index < of => Ok(Shard { index, of }),
            _ => Err(format!("{s}: give i/n with 0 <= i < n")),
        }
    }
}

/// The node a subscriber socket connects to. Scrambled, so that node choice does not
/// follow room choice (both from the socket index): every room gets subscribers on
/// every node and messages really cross nodes.
pub fn node_of(socket: usize, nodes: usize) -> usize {
    ((socket as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize % nodes.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_room_has_subscribers_on_every_node() {
        for (sockets, rooms, per) in [(2000, 20, 1), (500, 200, 20)] {
            let plan = Plan {
                sockets,
                rooms,
                rooms_per_socket: per,
                publishers: 4,
                rate: 1.0,
                payload: 10,
                board: None,
                shard: (0, 1),
            };
            let mut seen = vec![[false; 2]; rooms];
            for s in 0..sockets {
                for r in plan.rooms_of(s) {
                    seen[r][node_of(s, 2)] = true;
                }
            }
            assert!(
                seen.iter().all(|n| n[0] && n[1]),
                "{sockets} sockets x {rooms} rooms"
            );
        }
    }
}
