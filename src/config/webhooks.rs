//! `[webhooks]`: the backend hears when rooms and users come and go, once per deployment.

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// The events a receiver may ask for.
pub const WEBHOOK_EVENTS: [&str; 4] = [
    "room_occupied",
    "room_vacated",
    "user_online",
    "user_offline",
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhooksConfig {
    /// Where events are POSTed (`http://host:port/path`); empty: no webhooks.
    pub url: String,
    /// The HMAC-SHA256 key of `X-Volley-Signature` (required with `url`).
    pub secret: String,
    /// Which events are sent (every one by default).
    pub events: Vec<String>,
    /// A room's (or user's) last local member must stay gone this long before the
    /// deployment counts it vacated (offline): a page reload does not flap.
    pub vacate_delay_ms: u64,
    /// Most events in one POST.
    pub batch_max: usize,
    /// How long events wait for others to share their POST.
    pub batch_ms: u64,
    /// Most events waiting to be sent (the receiver down or slow); past it the oldest
    /// are dropped and counted (`volley_webhook_dropped_total`).
    pub queue_size: usize,
    /// One POST's time to answer.
    pub timeout_ms: u64,
    /// The longest pause between retries of a failed POST (the pauses double up to it).
    pub retry_max_ms: u64,
    /// A node that has not renewed its liveness for this long is dead: the first node
    /// to see it vacates its rooms and takes its users offline.
    pub node_timeout_ms: u64,
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        WebhooksConfig {
            url: String::new(),
            secret: String::new(),
            events: WEBHOOK_EVENTS.iter().map(|e| e.to_string()).collect(),
            vacate_delay_ms: 2000,
            batch_max: 100,
            batch_ms: 100,
            queue_size: 10_000,
            timeout_ms: 5000,
            retry_max_ms: 30_000,
            node_timeout_ms: 15_000,
        }
    }
}

impl WebhooksConfig {
    pub fn enabled(&self) -> bool {
        !self.url.is_empty()
    }

    /// Whether `event` is sent.
    pub fn sends(&self, event: &str) -> bool {
        self.events.iter().any(|e| e == event)
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, reason: String| Err(ConfigError::Invalid { key, reason });
        if !self.enabled() {
            return Ok(());
        }
        if !self.url.starts_with("http://") {
            return invalid(
                "webhooks.url",
                format!("{}: must start with http:// (put a TLS-terminating proxy in front of an https receiver)", self.url),
            );
        }
        if self
            .url
            .parse::<hyper::Uri>()
            .ok()
            .and_then(|u| u.host().map(str::len))
            .unwrap_or(0)
            == 0
        {
            return invalid(
                "webhooks.url",
                format!("{}: not a URL with a host", self.url),
            );
        }
        if self.secret.is_empty() {
            return invalid(
                "webhooks.secret",
                "must be set with webhooks.url: receivers check each POST's signature with it"
                    .into(),
            );
        }
        if let Some(unknown) = self
            .events
            .iter()
            .find(|e| !WEBHOOK_EVENTS.contains(&e.as_str()))
        {
            return invalid(
                "webhooks.events",
                format!(
                    "{unknown:?} is not an event; the events are {}",
                    WEBHOOK_EVENTS.join(", ")
                ),
            );
        }
        if self.batch_max == 0 || self.queue_size < self.batch_max {
            return invalid(
                "webhooks.queue_size",
                "must be at least webhooks.batch_max, which must be at least 1".into(),
            );
        }
        if self.timeout_ms == 0 || self.retry_max_ms == 0 {
            return invalid(
                "webhooks.timeout_ms",
                "timeouts and pauses must be at least 1 ms".into(),
            );
        }
        if self.node_timeout_ms < 2000 {
            return invalid(
                "webhooks.node_timeout_ms",
                "must be at least 2000: nodes renew their liveness every second".into(),
            );
        }
        if self.vacate_delay_ms > 3_600_000 || self.batch_ms > 60_000 {
            return invalid(
                "webhooks.vacate_delay_ms",
                "the vacate delay must be at most an hour, and batch_ms at most a minute".into(),
            );
        }
        Ok(())
    }
}
