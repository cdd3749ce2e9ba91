//! Who is online, as a node answers it: one listing, read from the broker at most once a
//! second and shared by every asker (`get_online_users` from any socket, `GET
//! /api/presence`), its answer frame encoded once.
//!
//! Without it each request was a read of every online user's entry: with 1 000 users one
//! anonymous socket's 26-byte request cost 1 001 Redis commands. Now a node costs Redis
//! at most one listing (two commands) a second, however many ask; a second asker while
//! a read is on its way waits for that read instead of starting another. A failed read
//! is remembered for the same second, so a Redis that is away is not asked once per
//! waiting socket.

use std::time::{Duration, Instant};

use crate::broker::{Broker, PresenceError};
use crate::protocol::{outbound, Encoded};

/// How long one listing answers every asker.
const FRESH_FOR: Duration = Duration::from_secs(1);
/// How long a listing read may take.
const READ_WAIT: Duration = Duration::from_secs(5);

pub struct OnlineListing {
    /// `presence.max_list`.
    max: usize,
    last: parking_lot::Mutex<Option<(Instant, Result<Encoded, PresenceError>)>>,
    /// Held by the one read on its way.
    reading: tokio::sync::Mutex<()>,
}

impl OnlineListing {
    pub fn new(max: usize) -> OnlineListing {
        OnlineListing {
            max,
            last: parking_lot::Mutex::new(None),
            reading: tokio::sync::Mutex::new(()),
        }
    }

    /// The listing, as the `online_users` frame built once from it; read again only when
    /// the last one is more than a second old.
    pub async fn get(&self, broker: &dyn Broker) -> Result<Encoded, PresenceError> {
        if let Some(fresh) = self.fresh() {
            return fresh;
        }
        let _one = self.reading.lock().await;
        // Whoever held the lock before may have read it meanwhile.
        if let Some(fresh) = self.fresh() {
            return fresh;
        }
        let read = tokio::time::timeout(READ_WAIT, broker.online_users(self.max))
            .await
            .unwrap_or_else(|_| Err(PresenceError::Unavailable("timed out".into())));
        let listing = read.map(|users| outbound::online_users(&users));
        *self.last.lock() = Some((Instant::now(), listing.clone()));
        listing
    }

    fn fresh(&self) -> Option<Result<Encoded, PresenceError>> {
        match &*self.last.lock() {
            Some((at, listing)) if at.elapsed() < FRESH_FOR => Some(listing.clone()),
            _ => None,
        }
    }
}
