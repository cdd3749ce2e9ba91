//! Room classes: the `[[rooms]]` entries, and what they give each room (its history, its
//! delivery and publish paces, its conflation field), compiled once.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{BatchConfig, ConfigError};

/// One `[[rooms]]` entry: a glob on room ids and the options of the rooms it matches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoomClass {
    /// Glob on the room id (`scores:*`, `ticker:??`, `lobby`).
    #[serde(rename = "match")]
    pub pattern: String,
    /// Messages kept per room; 0 = not durable (plain, at-most-once).
    #[serde(default)]
    pub history_size: usize,
    /// The history expires this long after the room's last message.
    #[serde(default = "default_history_ttl_s")]
    pub history_ttl_s: u64,
    /// The delivery window of the class's rooms, instead of `batch.delivery_window_ms`
    /// (chat at 0, tickers at 50, scoreboards at 250 on one node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery_window_ms: Option<u64>,
    /// The class's rooms' leading edge, instead of `batch.leading_edge`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leading_edge: Option<bool>,
    /// The publish window of the class's rooms (how long their publishes gather before
    /// a pipeline goes to Redis), instead of `batch.publish_window_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish_window_ms: Option<u64>,
    /// A field of the message content (`"symbol"`): a socket's queued message of a room
    /// is replaced by a newer one with the same value, so it gets the latest per key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conflate: Option<String>,
    /// A field of the message content (`"symbol"`) whose value names a board entry: the
    /// class's rooms are state rooms, keeping the latest message per key (and durable:
    /// `history_size` 0 there means the default, 1 000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_key: Option<String>,
    /// Most entries a state room's board holds: a publish of a new key past it is
    /// refused (`state_full`).
    #[serde(default = "default_state_max_keys")]
    pub state_max_keys: usize,
    /// An entry not updated for this long leaves the board, announced as a removal;
    /// 0 = entries stay until removed.
    #[serde(default)]
    pub state_ttl_s: u64,
    /// Deltas for subscribers that ask for them: `"fossil"` (a state room's message
    /// against the last of its key the subscriber received).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delta: Option<String>,
}

impl Default for RoomClass {
    fn default() -> Self {
        RoomClass {
            pattern: String::new(),
            history_size: 0,
            history_ttl_s: default_history_ttl_s(),
            delivery_window_ms: None,
            leading_edge: None,
            publish_window_ms: None,
            conflate: None,
            state_key: None,
            state_max_keys: default_state_max_keys(),
            state_ttl_s: 0,
            delta: None,
        }
    }
}

fn default_history_ttl_s() -> u64 {
    86_400
}

/// `state_max_keys` when a class gives none.
pub const DEFAULT_STATE_MAX_KEYS: usize = 10_000;

fn default_state_max_keys() -> usize {
    DEFAULT_STATE_MAX_KEYS
}

/// The history a state room keeps when its class gives none.
pub const STATE_HISTORY_SIZE: usize = 1_000;

impl RoomClass {
    /// The messages its rooms keep: `history_size`, or for a state room that gives none,
    /// `STATE_HISTORY_SIZE`; 0 = not durable.
    pub fn kept_history(&self) -> usize {
        match (self.history_size, &self.state_key) {
            (0, Some(_)) => STATE_HISTORY_SIZE,
            (size, _) => size,
        }
    }
}

/// What a durable room keeps: its class's history options, and a state room's board.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Durability {
    pub history_size: usize,
    pub ttl: Duration,
    /// Set for a state room: it keeps the latest message per key beside its history.
    pub board: Option<BoardLimits>,
}

/// What a state room's board may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BoardLimits {
    /// `state_max_keys`.
    pub max_keys: usize,
    /// `state_ttl_s`: an entry not updated for this long leaves; `None` = kept.
    pub entry_ttl: Option<Duration>,
}

/// The one delta encoding volley offers.
pub const DELTA_FOSSIL: &str = "fossil";

/// Most distinct delivery windows, and most distinct publish windows, on a node: a socket
/// keeps one bit per delivery pace, the publisher one per publish pace.
pub const MAX_PACES: usize = 64;

/// The room classes, compiled once, in one place: which class (if any) a room id belongs
/// to, and what that gives the room: its history, its delivery pace (a distinct delivery
/// window and leading edge), its publish pace (a distinct publish window) and its
/// conflation field. The delivery windows and the publish queue both read their paces
/// from here.
#[derive(Debug, Clone)]
pub struct RoomClasses {
    classes: Vec<RoomClass>,
    globs: Vec<globset::GlobMatcher>,
    /// The distinct delivery windows (ms, leading edge); 0 is `[batch]`'s.
    delivery_windows: Vec<(u64, bool)>,
    /// `[[rooms]]` entry -> its index in `delivery_windows`.
    delivery_pace: Vec<u8>,
    /// The distinct publish windows (ms); 0 is `batch.publish_window_ms`.
    publish_windows: Vec<u64>,
    /// `[[rooms]]` entry -> its index in `publish_windows`.
    publish_pace: Vec<u8>,
    /// `[[rooms]]` entry -> the content field its rooms conflate on.
    conflate: Vec<Option<std::sync::Arc<str>>>,
}

impl RoomClasses {
    /// No classes: every room plain, on `batch`'s windows.
    /// The config's classes, for a config that passed `Config::validate` (one that did
    /// not, built by hand, gets none: every room plain).
    pub fn compiled(config: &super::Config) -> RoomClasses {
        RoomClasses::compile(&config.rooms, &config.batch)
            .unwrap_or_else(|_| RoomClasses::plain(&config.batch))
    }

    pub fn plain(batch: &BatchConfig) -> RoomClasses {
        RoomClasses {
            classes: Vec::new(),
            globs: Vec::new(),
            delivery_windows: vec![(batch.delivery_window_ms, batch.leading_edge)],
            delivery_pace: Vec::new(),
            publish_windows: vec![batch.publish_window_ms],
            publish_pace: Vec::new(),
            conflate: Vec::new(),
        }
    }

    /// Compiles the classes over `batch`'s defaults; a bad pattern, or one distinct
    /// window too many, names its entry and its key.
    pub fn compile(classes: &[RoomClass], batch: &BatchConfig) -> Result<RoomClasses, ConfigError> {
        let mut compiled = RoomClasses::plain(batch);
        for (index, class) in classes.iter().enumerate() {
            let glob = globset::Glob::new(&class.pattern).map_err(|e| ConfigError::Room {
                index,
                reason: format!("match = {:?} is not a glob: {e}", class.pattern),
            })?;
            compiled.globs.push(glob.compile_matcher());
            let delivery = (
                class.delivery_window_ms.unwrap_or(batch.delivery_window_ms),
                class.leading_edge.unwrap_or(batch.leading_edge),
            );
            let pace = pace_for(&mut compiled.delivery_windows, delivery).ok_or_else(|| {
                ConfigError::Room {
                    index,
                    reason: format!(
                        "delivery_window_ms: more than {MAX_PACES} distinct delivery windows (window and leading edge) across batch and [[rooms]]"
                    ),
                }
            })?;
            compiled.delivery_pace.push(pace);
            let publish = class.publish_window_ms.unwrap_or(batch.publish_window_ms);
            let pace = pace_for(&mut compiled.publish_windows, publish).ok_or_else(|| {
                ConfigError::Room {
                    index,
                    reason: format!(
                        "publish_window_ms: more than {MAX_PACES} distinct publish windows across batch and [[rooms]]"
                    ),
                }
            })?;
            compiled.publish_pace.push(pace);
            compiled
                .conflate
                .push(class.conflate.as_deref().map(std::sync::Arc::from));
        }
        compiled.classes = classes.to_vec();
        Ok(compiled)
    }

    /// The first class whose pattern matches `room`.
    pub fn class_of(&self, room: &str) -> Option<&RoomClass> {
        self.index_of(room).map(|i| &self.classes[i])
    }

    /// The position in `[[rooms]]` of the first class whose pattern matches `room`.
    pub fn index_of(&self, room: &str) -> Option<usize> {
        self.globs.iter().position(|g| g.is_match(room))
    }

    /// The history a room keeps (and its board, for a state room), if it is durable.
    pub fn durability(&self, room: &str) -> Option<Durability> {
        self.class_of(room)
            .filter(|c| c.kept_history() > 0)
            .map(|c| Durability {
                history_size: c.kept_history(),
                ttl: Duration::from_secs(c.history_ttl_s),
                board: c.state_key.as_ref().map(|_| BoardLimits {
                    max_keys: c.state_max_keys,
                    entry_ttl: (c.state_ttl_s > 0).then(|| Duration::from_secs(c.state_ttl_s)),
                }),
            })
    }

    /// The content field naming a state room's entries (its class's `state_key`).
    pub fn state_key_of(&self, room: &str) -> Option<&str> {
        self.class_of(room).and_then(|c| c.state_key.as_deref())
    }

    /// Whether `room`'s class offers Fossil deltas (`delta = "fossil"`).
    pub fn offers_delta(&self, room: &str) -> bool {
        self.class_of(room)
            .is_some_and(|c| c.delta.as_deref() == Some(DELTA_FOSSIL))
    }

    /// The distinct delivery windows, (ms, leading edge), indexed by delivery pace; 0 is
    /// `[batch]`'s.
    pub fn delivery_windows(&self) -> &[(u64, bool)] {
        &self.delivery_windows
    }

    /// The delivery pace of `room`'s messages (an index into `delivery_windows`).
    pub fn delivery_pace(&self, room: &str) -> usize {
        self.index_of(room)
            .and_then(|i| self.delivery_pace.get(i))
            .map_or(0, |pace| *pace as usize)
    }

    /// The distinct publish windows (ms), indexed by publish pace; 0 is
    /// `batch.publish_window_ms`.
    pub fn publish_windows(&self) -> &[u64] {
        &self.publish_windows
    }

    /// The publish pace of `room`'s messages (an index into `publish_windows`).
    pub fn publish_pace(&self, room: &str) -> usize {
        self.index_of(room)
            .and_then(|i| self.publish_pace.get(i))
            .map_or(0, |pace| *pace as usize)
    }

    /// The content field `room`'s messages conflate on (its class's `conflate`).
    pub fn conflate_of(&self, room: &str) -> Option<std::sync::Arc<str>> {
        self.index_of(room)
            .and_then(|i| self.conflate.get(i).cloned().flatten())
    }
}

/// The pace of `window` among `windows`, added if new; `None` past `MAX_PACES`.
fn pace_for<T: PartialEq>(windows: &mut Vec<T>, window: T) -> Option<u8> {
    let index = match windows.iter().position(|w| *w == window) {
        Some(index) => index,
        None if windows.len() < MAX_PACES => {
            windows.push(window);
            windows.len() - 1
        }
        None => return None,
    };
    Some(index as u8)
}
