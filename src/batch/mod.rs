//! Batching: the windows that turn many messages into few writes.
//!
//! `delivery` coalesces what one socket receives inside a delivery window into one
//! `batch` frame. Windows are aligned to one clock for the whole node, so every socket
//! in a room drains the same messages at the same tick and the batch frame for them is
//! built once and shared (see `DeliveryPolicy::frames`).
//!
//! Both windows, delivery and publish, tick on the wall clock (multiples of the window
//! since the Unix epoch), so every node's ticks are in phase. Delivery ticks come a
//! little after publish ticks (`Clock::delivery`): what another node published at its
//! publish tick crosses Redis and reaches this node just before this node's delivery
//! tick, instead of just after it. Without that, a message crossing nodes waited for both
//! windows in full (p99 about 95 ms at 50 + 50 ms); with it, about one window plus the
//! offset.

pub mod delivery;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use delivery::{DeliveryPolicy, Pace};

/// A periodic tick in phase with the wall clock: at `offset` after every multiple of
/// `period` since the Unix epoch.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    period: Duration,
    /// A past instant on the tick grid.
    epoch: Instant,
}

impl Clock {
    pub fn new(period: Duration, offset: Duration) -> Clock {
        let w = period.as_nanos().max(1);
        let since_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let now = Instant::now();
        // The last wall-clock multiple of the period, one period back, plus the offset:
        // at or before now, since the offset is shorter than the period.
        let back = (since_unix % w) + w - (offset.as_nanos() % w);
        let epoch = now
            .checked_sub(Duration::from_nanos(back as u64))
            .unwrap_or(now);
        Clock { period, epoch }
    }

    /// Delivery ticks: `delivery_offset` after each multiple of the period.
    pub fn delivery(period: Duration) -> Clock {
        Clock::new(period, delivery_offset(period))
    }

    /// The first tick strictly after `now`.
    pub fn next_tick(&self, now: Instant) -> Instant {
        let w = self.period.as_nanos().max(1);
        let since = now.saturating_duration_since(self.epoch).as_nanos();
        let ticks = since / w + 1;
        self.epoch + Duration::from_nanos((ticks * w) as u64)
    }
}

/// How long after the wall-clock boundary delivery ticks come: long enough for a publish
/// pipeline to cross Redis on a busy node, short next to the window: a fifth of it, at
/// most 10 ms.
pub fn delivery_offset(period: Duration) -> Duration {
    (period / 5).min(Duration::from_millis(10))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_fall_on_wall_clock_multiples_plus_the_offset() {
        let period = Duration::from_millis(50);
        let clock = Clock::new(period, Duration::from_millis(10));
        let now = Instant::now();
        let next = clock.next_tick(now);
        assert!(next > now && next <= now + period);
        let wall = SystemTime::now() + (next - now);
        let phase = wall.duration_since(UNIX_EPOCH).unwrap().as_nanos() % period.as_nanos();
        let off = Duration::from_nanos(phase as u64);
        // The two clock readings above are microseconds apart.
        assert!(
            off >= Duration::from_micros(9_000) && off <= Duration::from_micros(11_000),
            "{off:?}"
        );
        assert_eq!(clock.next_tick(next), next + period);
    }

    #[test]
    fn the_delivery_offset_is_a_fifth_of_the_window_at_most_10_ms() {
        assert_eq!(
            delivery_offset(Duration::from_millis(25)),
            Duration::from_millis(5)
        );
        assert_eq!(
            delivery_offset(Duration::from_millis(100)),
            Duration::from_millis(10)
        );
        assert_eq!(delivery_offset(Duration::ZERO), Duration::ZERO);
    }
}
