//! Each section checks itself; `Config::validate` asks them in turn, then the checks
//! that span sections. Every error names its key.

use super::{
    BatchConfig, CompressionConfig, Config, ConfigError, DemoConfig, LimitsConfig, MetricsConfig,
    PresenceConfig, RedisConfig, RoomClass, RoomClasses, ServerConfig,
};

type Checked = Result<(), ConfigError>;

fn invalid(key: &'static str, reason: &str) -> Checked {
    Err(ConfigError::Invalid {
        key,
        reason: reason.into(),
    })
}

/// `value` must be at least `least`.
fn at_least(key: &'static str, value: u64, least: u64) -> Checked {
    if value < least {
        return invalid(key, &format!("must be at least {least}"));
    }
    Ok(())
}

/// A window in milliseconds: at most a minute.
fn window(key: &'static str, ms: u64) -> Checked {
    if ms > 60_000 {
        return invalid(key, "must be at most 60000 (one minute)");
    }
    Ok(())
}

/// The one check of a Redis URL (`redis.url`, each of `redis.shards`,
/// `redis.cluster_nodes` and scheme'd `redis.sentinels`): `redis://` or `rediss://` (TLS),
/// and one redis-rs can connect with.
fn redis_url(key: &'static str, url: &str, hint: &str) -> Checked {
    use redis::IntoConnectionInfo;
    if !url.starts_with("redis://") && !url.starts_with("rediss://") {
        return invalid(
            key,
            &format!("{url}: must start with redis:// or rediss:// (TLS){hint}"),
        );
    }
    if let Err(e) = url.into_connection_info() {
        return invalid(key, &format!("{url}: not a usable Redis URL: {e}"));
    }
    Ok(())
}

/// A list of Redis addresses is all `rediss://` (TLS) or none of it.
fn one_scheme(key: &'static str, urls: &[String], why: &str) -> Checked {
    let tls = urls.iter().filter(|u| u.starts_with("rediss://")).count();
    if tls > 0 && tls < urls.len() {
        return invalid(
            key,
            &format!("mixes rediss:// (TLS) and plain addresses; use one for all ({why})"),
        );
    }
    Ok(())
}

/// `1..=0` style bursts: a rate needs a burst of at least one.
fn burst(key: &'static str, rate: u32, burst: u32, rate_key: &str) -> Checked {
    if rate > 0 && burst < 1 {
        return invalid(key, &format!("must be at least 1 when {rate_key} is set"));
    }
    Ok(())
}

impl Config {
    /// Every section's checks, the room classes compiled, and the checks across
    /// sections.
    pub fn validate(&self) -> Checked {
        RoomClasses::compile(&self.rooms, &self.batch)?;
        for (index, class) in self.rooms.iter().enumerate() {
            class.validate(index)?;
        }
        self.server.validate()?;
        self.limits.validate()?;
        self.batch.validate()?;
        self.compression.validate()?;
        self.presence.validate()?;
        self.redis.validate()?;
        self.metrics.validate()?;
        self.demo.validate()?;
        self.webhooks.validate()?;
        if self.limits.max_outbox_bytes < self.limits.max_frame_bytes + 1024 {
            return invalid(
                "limits.max_outbox_bytes",
                "must exceed limits.max_frame_bytes by at least 1024, or no message would fit",
            );
        }
        Ok(())
    }
}

impl RoomClass {
    fn validate(&self, index: usize) -> Checked {
        let reason = if self.delivery_window_ms.is_some_and(|ms| ms > 60_000) {
            "delivery_window_ms must be at most 60000 (one minute)"
        } else if self.conflate.as_ref().is_some_and(|f| f.is_empty()) {
            "conflate must name a field of the message content"
        } else if self.publish_window_ms.is_some_and(|ms| ms > 60_000) {
            "publish_window_ms must be at most 60000 (one minute)"
        } else if self.history_size > 100_000 {
            "history_size must be at most 100000"
        } else if self.kept_history() > 0 && self.history_ttl_s < 1 {
            "history_ttl_s must be at least 1 for a durable class"
        } else if self.state_key.as_ref().is_some_and(|f| f.is_empty()) {
            "state_key must name a field of the message content"
        } else if self.state_key.is_some() && !(1..=1_000_000).contains(&self.state_max_keys) {
            "state_max_keys must be between 1 and 1000000"
        } else if self.state_key.is_none() && self.state_ttl_s > 0 {
            "state_ttl_s needs state_key (only a state room has a board)"
        } else if self
            .delta
            .as_ref()
            .is_some_and(|d| d != super::rooms::DELTA_FOSSIL)
        {
            "delta must be \"fossil\" (the one delta encoding volley offers)"
        } else if self.delta.is_some() && self.state_key.is_none() {
            "delta needs state_key (a delta is against the last message of the same key)"
        } else {
            return Ok(());
        };
        Err(ConfigError::Room {
            index,
            reason: reason.into(),
        })
    }
}

impl ServerConfig {
    fn validate(&self) -> Checked {
        if self.node_id.trim().is_empty() {
            return invalid("server.node_id", "must not be empty");
        }
        at_least("server.header_timeout_ms", self.header_timeout_ms, 100)?;
        at_least("server.body_timeout_ms", self.body_timeout_ms, 100)?;
        if self.idle_timeout_ms > 0
            && self.ping_interval_ms > 0
            && self.idle_timeout_ms <= self.ping_interval_ms
        {
            return invalid(
                "server.idle_timeout_ms",
                "must be longer than server.ping_interval_ms (or 0), so a live peer has time to answer a ping",
            );
        }
        for origin in &self.allowed_origins {
            if !(origin.starts_with("http://") || origin.starts_with("https://")) {
                return invalid(
                    "server.allowed_origins",
                    &format!(
                        "{origin}: expected scheme://host[:port], e.g. https://app.example.com"
                    ),
                );
            }
        }
        Ok(())
    }
}

impl LimitsConfig {
    fn validate(&self) -> Checked {
        if self.max_frame_bytes < 128 || self.max_frame_bytes > 64 << 20 {
            return invalid("limits.max_frame_bytes", "must be between 128 and 67108864");
        }
        at_least("limits.max_json_depth", self.max_json_depth as u64, 1)?;
        at_least("limits.max_connections", self.max_connections as u64, 1)?;
        at_least(
            "limits.max_rooms_per_socket",
            self.max_rooms_per_socket as u64,
            1,
        )?;
        burst(
            "limits.join_burst",
            self.join_rate,
            self.join_burst,
            "join_rate",
        )?;
        burst(
            "limits.presence_burst",
            self.presence_rate,
            self.presence_burst,
            "presence_rate",
        )?;
        burst(
            "limits.publish_burst",
            self.publish_rate,
            self.publish_burst,
            "publish_rate",
        )
    }
}

impl BatchConfig {
    fn validate(&self) -> Checked {
        window("batch.delivery_window_ms", self.delivery_window_ms)?;
        window("batch.publish_window_ms", self.publish_window_ms)?;
        at_least(
            "batch.max_batch_messages",
            self.max_batch_messages as u64,
            1,
        )?;
        at_least("batch.max_batch_bytes", self.max_batch_bytes as u64, 1024)
    }
}

impl CompressionConfig {
    fn validate(&self) -> Checked {
        if !(1..=9).contains(&self.level) {
            return invalid("compression.level", "must be 1 (fastest) to 9 (smallest)");
        }
        Ok(())
    }
}

impl PresenceConfig {
    fn validate(&self) -> Checked {
        if self.refresh_s < 1 || self.refresh_s >= self.ttl_s {
            return invalid(
                "presence.refresh_s",
                "must be at least 1 and below presence.ttl_s",
            );
        }
        Ok(())
    }
}

impl RedisConfig {
    fn validate(&self) -> Checked {
        let topologies = [
            !self.url.is_empty(),
            !self.shards.is_empty(),
            !self.sentinels.is_empty(),
            !self.cluster_nodes.is_empty(),
        ];
        if topologies.iter().filter(|given| **given).count() > 1 {
            return invalid(
                "redis",
                "give one of redis.url, redis.shards, redis.sentinels or redis.cluster_nodes",
            );
        }
        if !self.url.is_empty() {
            redis_url("redis.url", &self.url, "; empty = the memory broker")?;
        }
        for url in &self.shards {
            redis_url("redis.shards", url, "")?;
        }
        for url in &self.cluster_nodes {
            redis_url("redis.cluster_nodes", url, "")?;
        }
        one_scheme(
            "redis.cluster_nodes",
            &self.cluster_nodes,
            "every master is reached the way the first node is",
        )?;
        self.validate_tls()?;
        if !self.cluster_nodes.is_empty() && self.key_prefix.contains(['{', '}']) {
            return invalid(
                "redis.key_prefix",
                "must not contain { or } with redis.cluster_nodes (it would pin every key to one hash slot)",
            );
        }
        if !self.sentinels.is_empty() && self.master_name.is_empty() {
            return invalid("redis.master_name", "is required with redis.sentinels");
        }
        for sentinel in &self.sentinels {
            if sentinel.contains("://") {
                redis_url("redis.sentinels", sentinel, " (or host:port)")?;
                continue;
            }
            let port = sentinel.rsplit_once(':').map(|(_, p)| p.parse::<u16>());
            if !matches!(port, Some(Ok(_))) {
                return invalid(
                    "redis.sentinels",
                    &format!("{sentinel}: expected host:port, redis://host:port or rediss://host:port (TLS)"),
                );
            }
        }
        one_scheme(
            "redis.sentinels",
            &self.sentinels,
            "the sentinels and the masters they name are reached one way",
        )?;
        at_least("redis.outage_buffer", self.outage_buffer as u64, 1)?;
        at_least(
            "redis.max_envelope_messages",
            self.max_envelope_messages as u64,
            1,
        )?;
        at_least("redis.max_pipeline", self.max_pipeline as u64, 1)?;
        at_least("redis.probe_interval_ms", self.probe_interval_ms, 50)
    }
}

impl RedisConfig {
    /// The TLS files: readable PEM (a CA certificate, a client certificate and its key,
    /// both or neither), and only where a `rediss://` URL uses them.
    fn validate_tls(&self) -> Checked {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = |key: &'static str, path: &str| -> Checked {
            match CertificateDer::pem_file_iter(path)
                .map(|certs| certs.collect::<Result<Vec<_>, _>>())
            {
                Ok(Ok(certs)) if !certs.is_empty() => Ok(()),
                Ok(Ok(_)) => invalid(key, &format!("{path}: no PEM certificate in it")),
                Ok(Err(e)) | Err(e) => invalid(key, &format!("{path}: {e}")),
            }
        };
        if !self.tls_ca_file.is_empty() {
            certs("redis.tls_ca_file", &self.tls_ca_file)?;
        }
        match (self.tls_cert_file.is_empty(), self.tls_key_file.is_empty()) {
            (true, true) => {}
            (false, true) => {
                return invalid("redis.tls_key_file", "is required with redis.tls_cert_file")
            }
            (true, false) => {
                return invalid("redis.tls_cert_file", "is required with redis.tls_key_file")
            }
            (false, false) => {
                certs("redis.tls_cert_file", &self.tls_cert_file)?;
                if let Err(e) = PrivateKeyDer::from_pem_file(&self.tls_key_file) {
                    return invalid("redis.tls_key_file", &format!("{}: {e}", self.tls_key_file));
                }
            }
        }
        let files = [&self.tls_ca_file, &self.tls_cert_file];
        let tls_urls = std::iter::once(&self.url)
            .chain(&self.shards)
            .chain(&self.cluster_nodes)
            .chain(&self.sentinels)
            .any(|url| url.starts_with("rediss://"));
        if files.iter().any(|f| !f.is_empty()) && !tls_urls {
            let key = if self.tls_ca_file.is_empty() {
                "redis.tls_cert_file"
            } else {
                "redis.tls_ca_file"
            };
            return invalid(key, "is set, but no Redis URL is rediss:// (TLS)");
        }
        Ok(())
    }
}

impl MetricsConfig {
    fn validate(&self) -> Checked {
        at_least("metrics.report_s", self.report_s, 1)?;
        at_least("metrics.history", self.history as u64, 2)
    }
}

impl DemoConfig {
    fn validate(&self) -> Checked {
        if self.matches > 100 {
            return invalid("demo.matches", "at most 100");
        }
        if self.symbols > 10_000 {
            return invalid("demo.symbols", "at most 10000");
        }
        if self.ticker_rate > 100_000 {
            return invalid("demo.ticker_rate", "at most 100000 updates per second");
        }
        Ok(())
    }
}
