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
        }
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
