//! How an engine is doing: its state for `/readyz`, and its own counters, each described
//! by the engine (name, help, kind: `metrics::Counter`), so `metrics` renders them
//! without knowing any.

use serde::Serialize;

pub use crate::metrics::{Counter, CounterKind};

/// How a broker is doing, for `/healthz` and `/readyz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BrokerState {
    Connected,
    Reconnecting,
    /// Another live node reports this node's id: the two would drop each other's
    /// messages as their own echo, so neither may count as ready.
    DuplicateNodeId,
}

impl BrokerState {
    /// Several engines together (shards, cluster masters): connected only while every
    /// one is, since a node that cannot reach one cannot serve that one's rooms.
    pub fn all(states: impl IntoIterator<Item = BrokerState>) -> BrokerState {
        let mut all = BrokerState::Connected;
        for state in states {
            match state {
                BrokerState::DuplicateNodeId => return BrokerState::DuplicateNodeId,
                BrokerState::Reconnecting => all = BrokerState::Reconnecting,
                BrokerState::Connected => {}
            }
        }
        all
    }
}

/// Adds counters into `total`, by name (several engines' figures summed).
pub fn add_counters(total: &mut Vec<Counter>, more: impl IntoIterator<Item = Counter>) {
    for counter in more {
        match total.iter_mut().find(|c| c.name == counter.name) {
            Some(sum) => sum.value += counter.value,
            None => total.push(counter),
        }
    }
}

/// The health side of the broker seam.
pub trait Health: Send + Sync {
    /// The engine's name, as `/healthz` and `volley_node_info` give it (`memory`,
    /// `redis`, `redis-sentinel`, `redis-cluster`, `redis-shards`).
    fn engine(&self) -> &'static str;

    fn state(&self) -> BrokerState;

    /// The engine's own counters, for `/healthz` and `/metrics`.
    fn counters(&self) -> Vec<Counter> {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_add_by_name() {
        let mut total = vec![Counter::count("a", "", 1)];
        add_counters(
            &mut total,
            [Counter::count("b", "", 2), Counter::count("a", "", 3)],
        );
        assert_eq!(
            total.iter().map(|c| (c.name, c.value)).collect::<Vec<_>>(),
            [("a", 4), ("b", 2)]
        );
    }

    #[test]
    fn one_duplicate_makes_the_whole_set_a_duplicate() {
        use BrokerState::*;
        assert_eq!(BrokerState::all([Connected, Connected]), Connected);
        assert_eq!(BrokerState::all([Connected, Reconnecting]), Reconnecting);
        assert_eq!(
            BrokerState::all([Reconnecting, DuplicateNodeId]),
            DuplicateNodeId
        );
    }
}
