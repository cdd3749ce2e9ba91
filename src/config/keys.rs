//! The keys a configuration may set, as the file, `--set` and `VOLLEY_*` name them, and
//! the "did you mean" for one that is not a key.

use figment::providers::Env;

use super::{Config, ConfigError, RoomClass, SECTIONS};

/// `VOLLEY_BATCH_DELIVERY_WINDOW_MS` -> `batch.delivery_window_ms`.
pub(super) fn volley_env() -> Env {
    Env::prefixed("VOLLEY_").map(|key| env_key(key.as_str()).into())
}

/// The key a `VOLLEY_*` name (without the prefix) sets: `BATCH_DELIVERY_WINDOW_MS` ->
/// `batch.delivery_window_ms`.
pub(super) fn env_key(name: &str) -> String {
    let key = name.to_ascii_lowercase();
    for section in SECTIONS {
        if let Some(rest) = key
            .strip_prefix(section)
            .and_then(|rest| rest.strip_prefix('_'))
        {
            return format!("{section}.{rest}");
        }
    }
    key
}

/// Every key a config file, `--set` or `VOLLEY_*` may set, as `section.key`.
pub(super) fn known_keys() -> &'static [String] {
    static KEYS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| {
        let mut keys = Vec::new();
        if let Ok(toml::Value::Table(sections)) = toml::Value::try_from(Config::default()) {
            for (section, table) in sections {
                if let toml::Value::Table(table) = table {
                    keys.extend(table.keys().map(|key| format!("{section}.{key}")));
                }
            }
        }
        // Earlier names that still work (serde aliases).
        keys.extend(EARLIER_NAMES.iter().map(|old| old.to_string()));
        keys.sort();
        keys
    })
}

/// Earlier names of keys that were renamed; both names are read (serde aliases).
/// `presence.max_users` is now `presence.max_list`.
const EARLIER_NAMES: &[&str] = &["presence.max_users"];

/// Refuses a key no config field has, naming the nearest one that exists.
pub(super) fn check_key(key: &str, source: impl FnOnce() -> String) -> Result<(), ConfigError> {
    check_among(key, known_keys(), source)
}

/// Refuses `key` unless it is one of `keys`, naming the nearest of them.
pub(super) fn check_among(
    key: &str,
    keys: &[String],
    source: impl FnOnce() -> String,
) -> Result<(), ConfigError> {
    if keys.iter().any(|k| k == key) {
        return Ok(());
    }
    // Keys of the same section whose name holds the given one (`batch.window_ms` ->
    // both window keys) say more than the closest spelling alone.
    let (section, field) = key.split_once('.').unwrap_or(("", key));
    let holding: Vec<&str> = keys
        .iter()
        .filter(|k| !field.is_empty() && k.starts_with(&format!("{section}.")) && k.contains(field))
        .map(String::as_str)
        .collect();
    let nearest = if (1..=3).contains(&holding.len()) {
        holding.join(" or ")
    } else {
        keys.iter()
            .min_by_key(|k| strsim::levenshtein(k, key))
            .cloned()
            .unwrap_or_default()
    };
    Err(ConfigError::UnknownKey {
        given_by: source(),
        key: key.to_string(),
        nearest,
    })
}

/// The keys of a `[[rooms]]` entry, as `rooms.key`.
pub(super) fn room_keys() -> &'static [String] {
    static KEYS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| {
        // Every optional field set, so every key is printed.
        let sample = RoomClass {
            delivery_window_ms: Some(0),
            leading_edge: Some(true),
            publish_window_ms: Some(0),
            conflate: Some(String::new()),
            state_key: Some(String::new()),
            delta: Some(String::new()),
            ..RoomClass::default()
        };
        let mut keys: Vec<String> = match toml::Value::try_from(sample) {
            Ok(toml::Value::Table(table)) => table.keys().map(|k| format!("rooms.{k}")).collect(),
            _ => Vec::new(),
        };
        keys.sort();
        keys
    })
}

/// Checks every key a config file sets, as `--set` and `VOLLEY_*` are checked, so a
/// misspelt key in the file gets the same "did you mean" as on the command line. A file
/// that is not TOML is left to the loader, whose error gives the line.
pub(super) fn check_file_keys(path: &std::path::Path) -> Result<(), ConfigError> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let Ok(toml::Value::Table(top)) = text.parse::<toml::Value>() else {
        return Ok(());
    };
    let file = || format!("config file {}", path.display());
    let mut sections: Vec<String> = SECTIONS.iter().map(|s| s.to_string()).collect();
    sections.push("rooms".into());
    for (name, value) in &top {
        check_among(name, &sections, file)?;
        match value {
            toml::Value::Table(table) => {
                for key in table.keys() {
                    check_key(&format!("{name}.{key}"), file)?;
                }
            }
            toml::Value::Array(entries) if name == "rooms" => {
                for (index, entry) in entries.iter().enumerate() {
                    let toml::Value::Table(entry) = entry else {
                        continue;
                    };
                    for key in entry.keys() {
                        check_among(&format!("rooms.{key}"), room_keys(), || {
                            format!("{} ([[rooms]] entry {index}, counting from 0)", file())
                        })?;
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}
