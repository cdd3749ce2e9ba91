//! The built-in demo feed (`--demo`): simulated football matches and a stock ticker,
//! published through `Node::publish` like any API publish, so they reach every node.
//!
//! Two boards (state rooms, see `add_demo_rooms`): matches go to `scores`, keyed by
//! `match`: one update per simulated minute (the clock), with a goal, card or corner now
//! and then; a finished match restarts 0-0. Symbols go to `ticker`, keyed by `symbol`: a
//! random walk, `demo.ticker_rate` updates per second on average, in bursts (a quiet
//! tick, then several updates at once), which is what batching is for; subscribers that
//! ask get them as Fossil deltas.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::value::RawValue;

use tokio_util::sync::CancellationToken;

use crate::config::DemoConfig;
use crate::metrics::Source;
use crate::node::Node;

const TEAMS: &[&str] = &[
    "Harbour City",
    "Northgate",
    "Red Valley",
    "Westbrook",
    "Kingsport",
    "Ironside",
    "Lakeshore",
    "Old Town",
    "Riverside",
    "Southfield",
    "Eastwood",
    "Highmoor",
];
const SYMBOLS: &[&str] = &[
    "ACME", "BOLT", "CRUX", "DYNO", "EMBR", "FLUX", "GLOW", "HALO", "IONX", "JADE", "KITE", "LUMA",
    "MOSS", "NOVA", "OPAL", "PIKE", "QUIL", "RUNE", "SAGE", "TIDE", "UMBR", "VOLT", "WISP", "XENO",
    "YARN", "ZEAL",
];
/// The demo's boards: the matches (keyed by `match`) and the ticker (by `symbol`).
pub const SCORES_ROOM: &str = "scores";
pub const TICKER_ROOM: &str = "ticker";
/// How often the feed wakes.
const TICK: Duration = Duration::from_millis(50);
/// Goals, cards and corners per simulated minute of one match.
const GOAL_PER_MINUTE: f64 = 2.8 / 90.0;
const CARD_PER_MINUTE: f64 = 4.0 / 90.0;
const CORNER_PER_MINUTE: f64 = 10.0 / 90.0;

/// What the page needs to know to join the demo's rooms (`GET /api/demo`).
#[derive(Debug, Clone, Serialize)]
pub struct Catalog {
    pub enabled: bool,
    pub matches: Vec<MatchInfo>,
    pub symbols: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MatchInfo {
    pub id: String,
    pub home: String,
    pub away: String,
}

pub fn catalog(config: &DemoConfig) -> Catalog {
    Catalog {
        enabled: config.enabled,
        matches: (0..config.matches)
            .map(|i| MatchInfo {
                id: format!("m{}", i + 1),
                home: team(2 * i).to_string(),
                away: team(2 * i + 1).to_string(),
            })
            .collect(),
        symbols: (0..config.symbols).map(symbol).collect(),
    }
}

fn team(i: usize) -> &'static str {
    TEAMS[i % TEAMS.len()]
}

fn symbol(i: usize) -> String {
    let base = SYMBOLS[i % SYMBOLS.len()];
    match i / SYMBOLS.len() {
        0 => base.to_string(),
        n => format!("{base}{n}"),
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct MatchUpdate<'a> {
    #[serde(rename = "match")]
    id: &'a str,
    home: &'a str,
    away: &'a str,
    home_score: u32,
    away_score: u32,
    minute: u32,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<Event<'a>>,
}

#[derive(Serialize)]
struct Event<'a> {
    kind: &'static str,
    team: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Quote<'a> {
    symbol: &'a str,
    price: f64,
    change: f64,
    change_pct: f64,
}

struct Match {
    info: MatchInfo,
    score: [u32; 2],
    /// Simulated seconds played.
    clock_s: f64,
    minute: u32,
}

struct Ticker {
    symbol: String,
    open: f64,
    price: f64,
}

/// Runs the feed until the node is dropped.
/// Publishes the feed until `stop` is cancelled.
pub async fn run(node: Arc<Node>, config: DemoConfig, stop: CancellationToken) {
    let catalog = catalog(&config);
    let mut rng = fastrand::Rng::new();
    let mut matches: Vec<Match> = catalog
        .matches
        .into_iter()
        .map(|info| {
            // Matches start at different points so the board is not in lockstep.
            let minute = rng.u32(0..80);
            Match {
                info,
                score: [0, 0],
                clock_s: f64::from(minute) * 60.0,
                minute,
            }
        })
        .collect();
    let mut tickers: Vec<Ticker> = catalog
        .symbols
        .into_iter()
        .map(|symbol| {
            let price = 20.0 + rng.f64() * 480.0;
            Ticker {
                symbol,
                open: price,
                price,
            }
        })
        .collect();
    // Every match and symbol on the boards at once, so a page opens them whole.
    let opening: Vec<(String, String)> = matches
        .iter()
        .map(|m| match_update(m, None))
        .chain(tickers.iter_mut().map(|t| step_ticker(t, &mut rng)))
        .collect();
    publish_all(&node, opening, &mut false);
    let per_tick = f64::from(config.ticker_rate) * TICK.as_secs_f64();
    let mut interval = tokio::time::interval(TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut warned = false;
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = stop.cancelled() => return,
        }
        let mut out: Vec<(String, String)> = Vec::new();
        for m in &mut matches {
            step_match(
                m,
                &mut rng,
                TICK.as_secs_f64() * f64::from(config.clock_speed),
                &mut out,
            );
        }
        if !tickers.is_empty() {
            // Bursty: most ticks are quiet or light, one in ten carries a burst.
            let n = if rng.u32(0..10) == 0 {
                per_tick * 5.5
            } else {
                per_tick * 0.5
            };
            let n = n.floor() as usize + usize::from(rng.f64() < n.fract());
            for _ in 0..n {
                let i = rng.usize(0..tickers.len());
                out.push(step_ticker(&mut tickers[i], &mut rng));
            }
        }
        publish_all(&node, out, &mut warned);
    }
}

/// Publishes the feed's updates; the first refusal is logged (`warned`), not each.
fn publish_all(node: &Node, updates: Vec<(String, String)>, warned: &mut bool) {
    for (room, content) in updates {
        let Ok(content) = RawValue::from_string(content) else {
            continue;
        };
        if let Err(e) = node.publish(&room, &content, Source::Demo) {
            if !*warned {
                *warned = true;
                tracing::warn!(room, "demo update not published: {e}");
            }
        }
    }
}

fn step_match(m: &mut Match, rng: &mut fastrand::Rng, sim_s: f64, out: &mut Vec<(String, String)>) {
    m.clock_s += sim_s;
    if m.clock_s >= 95.0 * 60.0 {
        // Full time a while ago: kick off again.
        m.clock_s = 0.0;
        m.score = [0, 0];
        m.minute = 0;
    }
    let minute = (m.clock_s / 60.0) as u32;
    while m.minute < minute {
        m.minute += 1;
        let side = rng.usize(0..2);
        let r = rng.f64();
        let kind = if m.minute > 90 {
            None
        } else if r < GOAL_PER_MINUTE {
            m.score[side] += 1;
            Some("goal")
        } else if r < GOAL_PER_MINUTE + CARD_PER_MINUTE {
            Some("card")
        } else if r < GOAL_PER_MINUTE + CARD_PER_MINUTE + CORNER_PER_MINUTE {
            Some("corner")
        } else {
            None
        };
        out.push(match_update(m, kind.map(|kind| (kind, side))));
    }
}

/// A match's entry on the `scores` board, with the minute's event if any (its kind and
/// the side, 0 home).
fn match_update(m: &Match, event: Option<(&'static str, usize)>) -> (String, String) {
    let update = MatchUpdate {
        id: &m.info.id,
        home: &m.info.home,
        away: &m.info.away,
        home_score: m.score[0],
        away_score: m.score[1],
        minute: m.minute.min(90),
        status: if m.minute >= 90 { "full time" } else { "live" },
        event: event.map(|(kind, side)| Event {
            kind,
            team: if side == 0 {
                &m.info.home
            } else {
                &m.info.away
            },
        }),
    };
    let json = serde_json::to_string(&update).unwrap_or_default();
    (SCORES_ROOM.to_string(), json)
}

fn step_ticker(t: &mut Ticker, rng: &mut fastrand::Rng) -> (String, String) {
    // A small random walk, pulled gently back towards the open.
    let drift = (t.open - t.price) / t.open * 0.02;
    let step = (rng.f64() - 0.5) * 0.004 + drift * 0.1;
    t.price = (t.price * (1.0 + step)).max(0.01);
    let price = (t.price * 100.0).round() / 100.0;
    let change = ((price - t.open) * 100.0).round() / 100.0;
    let quote = Quote {
        symbol: &t.symbol,
        price,
        change,
        change_pct: ((change / t.open) * 10_000.0).round() / 100.0,
    };
    let json = serde_json::to_string(&quote).unwrap_or_default();
    (TICKER_ROOM.to_string(), json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_names_every_room_once() {
        let c = catalog(&DemoConfig {
            matches: 3,
            symbols: 30,
            ..DemoConfig::default()
        });
        assert_eq!(c.matches.len(), 3);
        assert_eq!(c.matches[0].id, "m1");
        let mut s = c.symbols.clone();
        s.sort();
        s.dedup();
        assert_eq!(s.len(), 30);
    }

    #[test]
    fn a_simulated_minute_is_one_update_with_the_score() {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut m = Match {
            info: MatchInfo {
                id: "m1".into(),
                home: "A".into(),
                away: "B".into(),
            },
            score: [0, 0],
            clock_s: 0.0,
            minute: 0,
        };
        let mut out = Vec::new();
        step_match(&mut m, &mut rng, 180.0, &mut out);
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].0, "scores");
        let first: serde_json::Value = serde_json::from_str(&out[0].1).unwrap();
        assert_eq!(first["match"], "m1", "the board's key");
        let v: serde_json::Value = serde_json::from_str(&out[2].1).unwrap();
        assert_eq!(v["minute"], 3);
        assert_eq!(
            v["homeScore"].as_u64().unwrap() + v["awayScore"].as_u64().unwrap(),
            m.score[0] as u64 + m.score[1] as u64
        );
    }
}
