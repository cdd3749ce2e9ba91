//! Loading: defaults, then the file, the environment (the reference servers' names and
//! `VOLLEY_*`), then the flags; every key checked against the known ones.

use std::net::SocketAddr;
use std::path::PathBuf;

use figment::providers::{Format, Serialized, Toml};
use figment::Figment;
use serde::Deserialize;

use super::keys::{check_file_keys, check_key, env_key, volley_env};
use super::{Config, ConfigError};

/// Values given on the command line; each `None` leaves the lower sources alone.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub file: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub node_id: Option<String>,
    pub delivery_window_ms: Option<u64>,
    pub log: Option<String>,
    /// `--demo`: sets `demo.enabled`.
    pub demo: bool,
    /// `--demo-symbols N`: sets `demo.symbols`.
    pub demo_symbols: Option<usize>,
    /// `KEY=VALUE` pairs; VALUE is read as TOML (`10`, `true`, `"text"`), else taken as a string.
    pub set: Vec<String>,
}

impl Config {
    /// Reads defaults, file, environment and flags, then checks the values.
    pub fn load(overrides: &Overrides) -> Result<Config, ConfigError> {
        Self::load_with(overrides, |name| std::env::var(name).ok(), std::env::vars())
    }

    /// `load` with the reference servers' environment names read through `var` and no stray
    /// `VOLLEY_*` check (tests pass their own environment).
    pub fn load_from_env(
        overrides: &Overrides,
        var: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        Self::load_with(overrides, var, std::iter::empty())
    }

    /// `load` with the reference servers' names read through `var`, and `vars` checked for
    /// `VOLLEY_*` names that match no key.
    pub fn load_with(
        overrides: &Overrides,
        var: impl Fn(&str) -> Option<String>,
        vars: impl Iterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = &overrides.file {
            if !path.is_file() {
                return Err(ConfigError::MissingFile(path.clone()));
            }
            check_file_keys(path)?;
            figment = figment.merge(Toml::file_exact(path));
        }
        // The seed's names go in figment's default profile, as the file and `VOLLEY_*` do,
        // so merge order decides; a bare `(key, value)` would land in the global profile
        // and outrank both.
        if let Some(port) = var("PORT") {
            let port: u16 = port.trim().parse().map_err(|_| ConfigError::BadPort {
                name: "PORT",
                value: port.clone(),
            })?;
            figment = figment.merge(Serialized::default(
                "server.listen",
                SocketAddr::from(([0, 0, 0, 0], port)),
            ));
        }
        if let Some(id) = var("SERVER_ID") {
            figment = figment.merge(Serialized::default("server.node_id", id));
        }
        if let Some(url) = seed_redis_url(&var)? {
            figment = figment.merge(Serialized::default("redis.url", url));
        }
        for (name, _) in vars.filter(|(name, _)| name.starts_with("VOLLEY_")) {
            let key = env_key(&name["VOLLEY_".len()..]);
            check_key(&key, || format!("environment variable {name}"))?;
        }
        figment = figment.merge(volley_env());
        if let Some(listen) = overrides.listen {
            figment = figment.merge(("server.listen", listen));
        }
        if let Some(id) = &overrides.node_id {
            figment = figment.merge(("server.node_id", id));
        }
        if overrides.demo {
            figment = figment.merge(("demo.enabled", true));
        }
        if let Some(n) = overrides.demo_symbols {
            figment = figment.merge(("demo.symbols", n));
        }
        if let Some(ms) = overrides.delivery_window_ms {
            figment = figment.merge(("batch.delivery_window_ms", ms));
        }
        if let Some(log) = &overrides.log {
            figment = figment.merge(("server.log", log));
        }
        for pair in &overrides.set {
            let (key, value) = pair
                .split_once('=')
                .filter(|(k, _)| !k.trim().is_empty())
                .ok_or_else(|| ConfigError::BadSet(pair.clone()))?;
            check_key(key.trim(), || format!("--set {pair}"))?;
            figment = figment.merge((key.trim(), parse_toml_value(value.trim())));
        }
        let mut config: Config = figment.extract().map_err(Box::new)?;
        if config.demo.enabled {
            config.add_demo_rooms();
        }
        config.validate()?;
        Ok(config)
    }
}

/// The Node.js servers' names: `REDIS_URL`, or `REDIS_HOST` + `REDIS_PORT` + `REDIS_PASSWORD`.
fn seed_redis_url(var: &impl Fn(&str) -> Option<String>) -> Result<Option<String>, ConfigError> {
    if let Some(url) = var("REDIS_URL").filter(|u| !u.trim().is_empty()) {
        return Ok(Some(url.trim().to_string()));
    }
    let Some(host) = var("REDIS_HOST").filter(|h| !h.trim().is_empty()) else {
        return Ok(None);
    };
    let port = match var("REDIS_PORT") {
        Some(p) => p.trim().parse::<u16>().map_err(|_| ConfigError::BadPort {
            name: "REDIS_PORT",
            value: p.clone(),
        })?,
        None => 6379,
    };
    let auth = var("REDIS_PASSWORD")
        .filter(|p| !p.is_empty())
        .map(|p| format!(":{}@", percent_encode(&p)))
        .unwrap_or_default();
    Ok(Some(format!("redis://{auth}{}:{port}", host.trim())))
}

/// Escapes what a URL's userinfo part cannot hold as is (all but RFC 3986's unreserved).
fn percent_encode(s: &str) -> String {
    use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
    const USERINFO: &AsciiSet = &NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    utf8_percent_encode(s, USERINFO).to_string()
}

fn parse_toml_value(text: &str) -> toml::Value {
    #[derive(Deserialize)]
    struct Wrap {
        v: toml::Value,
    }
    toml::from_str::<Wrap>(&format!("v = {text}"))
        .map(|w| w.v)
        .unwrap_or_else(|_| toml::Value::String(text.to_string()))
}
