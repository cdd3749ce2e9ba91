//! Board mode (`--board N`): every publish is a realistic quote of one of N symbols to a
//! state room; subscribers may join with the board (`--state`: the snapshot's time is
//! measured) and take Fossil deltas (`--delta`). A delta carries no content, so board
//! mode counts deliveries by the `"offset"` every board message carries, at arrival.

use std::sync::Arc;

use memchr::memmem::Finder;
use parking_lot::Mutex;

/// What board mode asks of the run.
#[derive(Debug, Clone, Copy)]
pub struct Board {
    pub symbols: usize,
    /// Join with `"state":true` and time the snapshot.
    pub state: bool,
    /// Join with `"delta":"fossil"`.
    pub delta: bool,
}

/// A quote of about 150 bytes: symbol, bid, ask, last, exchange fixed per symbol; the
/// bench's own fields (sequence as the volume, send time as the time; publisher and room
/// as a feed id) change with every update, as a real quote's volume and time do: one or
/// two fields per update.
pub fn quote(publisher: u32, room: u32, seq: u64, sent_us: u64, symbol: usize) -> String {
    let price = 20.0 + (symbol % 480) as f64 + (symbol % 97) as f64 * 0.01;
    format!(
        r#"{{"p":{publisher},"r":{room},"s":{seq},"t":{sent_us},"symbol":"SYM{symbol:05}","bid":{:.2},"ask":{:.2},"last":{price:.2},"currency":"USD","exchange":"XNAS","status":"open"}}"#,
        price - 0.01,
        price + 0.01,
    )
}

/// The join frame of a board subscriber.
pub fn join_frame(room: &str, board: Option<Board>) -> String {
    let mut join = serde_json::json!({"type":"join","roomId":room});
    if let Some(b) = board {
        if b.state {
            join["state"] = true.into();
        }
        if b.delta {
            join["delta"] = "fossil".into();
        }
    }
    join.to_string()
}

/// Counts board messages in a frame: one `,"offset":` each.
pub struct Counter {
    finder: Finder<'static>,
}

impl Counter {
    pub fn new() -> Counter {
        Counter {
            finder: Finder::new(br#","offset":"#),
        }
    }

    pub fn count(&self, frame: &[u8]) -> u64 {
        self.finder.find_iter(frame).count() as u64
    }
}

/// Each subscriber's time from its join to its snapshot, in µs.
#[derive(Default)]
pub struct SnapshotTimes(Mutex<Vec<u64>>);

impl SnapshotTimes {
    pub fn record(&self, us: u64) {
        self.0.lock().push(us);
    }

    /// (count, p50, p99, max) in ms.
    pub fn summary(self: &Arc<Self>) -> Option<(usize, f64, f64, f64)> {
        let mut times = self.0.lock().clone();
        if times.is_empty() {
            return None;
        }
        times.sort_unstable();
        let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0;
        Some((times.len(), at(0.5), at(0.99), at(1.0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quote_is_about_150_bytes_and_scanned_as_the_bench_s_own() {
        let q = quote(1, 0, 123_456, 1_796_000_000_000_000, 4321);
        assert!((140..=170).contains(&q.len()), "{} bytes: {q}", q.len());
        let mut seen = 0;
        crate::scan::Scanner::new().scan(q.as_bytes(), |m| {
            assert_eq!((m.publisher, m.seq), (1, 123_456));
            seen += 1;
        });
        assert_eq!(seen, 1);
        let frame = br#"{"type":"batch","messages":[{"offset":1},{"type":"message","key":"A","offset":2,"delta":"x"}]}"#;
        assert_eq!(Counter::new().count(frame), 1, "only ,\"offset\": counts");
    }
}
