//! The configuration's tests: sources, precedence, and errors that name their key.

use super::*;

/// Loads `text` as the config file `volley.toml` in `dir`, with no environment.
fn load_file(dir: &std::path::Path, text: &str) -> Result<Config, ConfigError> {
    let file = dir.join("volley.toml");
    std::fs::write(&file, text).unwrap();
    let flags = Overrides {
        file: Some(file),
        ..Overrides::default()
    };
    Config::load_from_env(&flags, no_env)
}

fn no_env(_: &str) -> Option<String> {
    None
}

#[test]
fn defaults_are_valid() {
    let config = Config::load_from_env(&Overrides::default(), no_env).unwrap();
    assert_eq!(config.batch.delivery_window_ms, 50);
    assert!(config.batch.leading_edge);
}

#[test]
fn flags_win_over_seed_env() {
    let env = |name: &str| match name {
        "PORT" => Some("9001".to_string()),
        "SERVER_ID" => Some("server-4242".to_string()),
        _ => None,
    };
    let config = Config::load_from_env(&Overrides::default(), env).unwrap();
    assert_eq!(config.server.listen.port(), 9001);
    assert_eq!(config.server.node_id, "server-4242");

    let flags = Overrides {
        listen: Some("127.0.0.1:7000".parse().unwrap()),
        set: vec!["batch.delivery_window_ms=5".into(), "api.key=s3cret".into()],
        ..Overrides::default()
    };
    let config = Config::load_from_env(&flags, env).unwrap();
    assert_eq!(config.server.listen.port(), 7000);
    assert_eq!(config.batch.delivery_window_ms, 5);
    assert_eq!(config.api.key, "s3cret");
}

#[test]
fn topology_and_keepalive_mistakes_name_their_key() {
    for (set, key) in [
        (
            vec![
                "server.ping_interval_ms=60000",
                "server.idle_timeout_ms=30000",
            ],
            "server.idle_timeout_ms",
        ),
        (
            vec!["server.allowed_origins=[\"example.com\"]"],
            "server.allowed_origins",
        ),
        (
            vec![
                "redis.url=redis://a:6379",
                "redis.cluster_nodes=[\"redis://b:6379\"]",
            ],
            "give one of redis.url, redis.shards, redis.sentinels or redis.cluster_nodes",
        ),
        (
            vec![
                "redis.cluster_nodes=[\"redis://b:6379\"]",
                "redis.key_prefix={app}:",
            ],
            "redis.key_prefix",
        ),
    ] {
        let flags = Overrides {
            set: set.iter().map(|s| s.to_string()).collect(),
            ..Overrides::default()
        };
        let err = Config::load_from_env(&flags, no_env)
            .unwrap_err()
            .to_string();
        assert!(err.contains(key), "{set:?}: {err}");
    }
}

#[test]
fn sentinels_are_host_port_or_redis_urls_with_or_without_tls() {
    for sentinels in [
        r#"["10.0.0.1:26379", "10.0.0.2:26379"]"#,
        r#"["redis://10.0.0.1:26379"]"#,
        r#"["rediss://10.0.0.1:26379", "rediss://sentinel.internal:26380"]"#,
    ] {
        let flags = Overrides {
            set: vec![
                format!("redis.sentinels={sentinels}"),
                "redis.master_name=m".into(),
            ],
            ..Overrides::default()
        };
        assert!(
            Config::load_from_env(&flags, no_env).is_ok(),
            "{sentinels} should be accepted"
        );
    }
    let flags = Overrides {
        set: vec![
            r#"redis.sentinels=["http://10.0.0.1:26379"]"#.into(),
            "redis.master_name=m".into(),
        ],
        ..Overrides::default()
    };
    let err = Config::load_from_env(&flags, no_env)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("redis.sentinels") && err.contains("rediss://"),
        "{err}"
    );
}

#[test]
fn bad_values_name_their_key() {
    let flags = Overrides {
        set: vec!["batch.delivery_window_ms=soon".into()],
        ..Overrides::default()
    };
    let err = Config::load_from_env(&flags, no_env)
        .unwrap_err()
        .to_string();
    assert!(err.contains("batch.delivery_window_ms"), "{err}");

    let flags = Overrides {
        set: vec!["batch.max_batch_messages=0".into()],
        ..Overrides::default()
    };
    let err = Config::load_from_env(&flags, no_env)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "invalid value for batch.max_batch_messages: must be at least 1"
    );

    let flags = Overrides {
        set: vec!["batch.window=5".into()],
        ..Overrides::default()
    };
    let err = Config::load_from_env(&flags, no_env)
        .unwrap_err()
        .to_string();
    assert!(err.contains("window"), "{err}");

    let flags = Overrides {
        set: vec!["redis.url=http://cache:6380".into()],
        ..Overrides::default()
    };
    let err = Config::load_from_env(&flags, no_env)
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("invalid value for redis.url"), "{err}");

    let env = |name: &str| (name == "PORT").then(|| "eighty".to_string());
    let err = Config::load_from_env(&Overrides::default(), env)
        .unwrap_err()
        .to_string();
    assert!(err.contains("PORT"), "{err}");
}

#[test]
fn more_than_64_distinct_windows_of_either_kind_name_their_key() {
    let classes = |window: fn(u64) -> RoomClass| -> Vec<RoomClass> {
        (0..70)
            .map(|i| RoomClass {
                pattern: format!("r{i}:*"),
                ..window(i + 1)
            })
            .collect()
    };
    let mut config = Config {
        rooms: classes(|ms| RoomClass {
            publish_window_ms: Some(ms),
            ..RoomClass::default()
        }),
        ..Config::default()
    };
    let err = config.validate().unwrap_err().to_string();
    assert!(err.contains("publish_window_ms"), "{err}");
    // batch.publish_window_ms (50) is pace 0 and 50 is among the classes' windows:
    // 64 distinct paces take the classes up to entry 63 (windows 1..=64).
    assert!(err.contains("entry 64 "), "{err}");
    config.rooms = classes(|ms| RoomClass {
        delivery_window_ms: Some(ms),
        ..RoomClass::default()
    });
    let err = config.validate().unwrap_err().to_string();
    assert!(err.contains("delivery_window_ms"), "{err}");
    // 64 of each is fine, and classes past 64 no longer share another's window.
    config.rooms = (0..63)
        .map(|i| RoomClass {
            pattern: format!("r{i}:*"),
            delivery_window_ms: Some(1000 + i),
            publish_window_ms: Some(1000 + i),
            ..RoomClass::default()
        })
        .collect();
    config.validate().unwrap();
    let compiled = RoomClasses::compile(&config.rooms, &config.batch).unwrap();
    assert_eq!(compiled.publish_windows().len(), 64);
    assert_eq!(compiled.delivery_windows().len(), 64);
    assert_eq!(
        compiled.publish_windows()[compiled.publish_pace("r62:x")],
        1062
    );
    assert_eq!(
        compiled.delivery_windows()[compiled.delivery_pace("r62:x")].0,
        1062
    );
}

#[test]
fn a_misspelt_key_in_the_file_gets_the_same_suggestion_as_a_flag() {
    let dir = std::env::temp_dir().join(format!("volley-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let load = |text: &str| load_file(&dir, text).unwrap_err().to_string();
    let err = load("[limits]\nmax_conections = 5\n");
    assert!(err.contains("did you mean limits.max_connections"), "{err}");
    assert!(err.contains("volley.toml"), "{err}");
    let err = load("[limit]\nmax_connections = 5\n");
    assert!(err.contains("did you mean limits"), "{err}");
    let err = load("[[rooms]]\nmatch = \"a\"\nhistroy_size = 5\n");
    assert!(err.contains("did you mean rooms.history_size"), "{err}");
    assert!(err.contains("entry 0"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_reference_servers_redis_variables_make_a_url() {
    let env = |name: &str| match name {
        "REDIS_HOST" => Some("cache.internal".to_string()),
        "REDIS_PORT" => Some("6380".to_string()),
        "REDIS_PASSWORD" => Some("p@ss word".to_string()),
        _ => None,
    };
    let config = Config::load_from_env(&Overrides::default(), env).unwrap();
    assert_eq!(
        config.redis.url,
        "redis://:p%40ss%20word@cache.internal:6380"
    );
    let env = |name: &str| (name == "REDIS_URL").then(|| "redis://10.0.0.5:6379/2".to_string());
    let config = Config::load_from_env(&Overrides::default(), env).unwrap();
    assert_eq!(config.redis.url, "redis://10.0.0.5:6379/2");
    let flags = Overrides {
        set: vec!["redis.envelope=single".into()],
        ..Overrides::default()
    };
    let config = Config::load_from_env(&flags, no_env).unwrap();
    assert_eq!(config.redis.envelope, EnvelopeMode::Single);
    let flags = Overrides {
        set: vec!["redis.envelope=zip".into()],
        ..Overrides::default()
    };
    let err = Config::load_from_env(&flags, no_env)
        .unwrap_err()
        .to_string();
    assert!(err.contains("redis.envelope"), "{err}");
}

#[test]
fn printed_config_reads_back_the_same() {
    let config = Config::load_from_env(&Overrides::default(), no_env).unwrap();
    let back: Config = toml::from_str(&config.to_toml()).unwrap();
    assert_eq!(back, config);
}

#[test]
fn a_state_room_class_loads_from_a_file_and_its_mistakes_are_named() {
    let dir = std::env::temp_dir().join(format!("volley-state-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let load = |text: &str| load_file(&dir, text).map_err(|e| e.to_string());
    let config = load(
        "[[rooms]]\nmatch = \"ticker\"\nstate_key = \"symbol\"\nstate_max_keys = 5000\nstate_ttl_s = 60\ndelta = \"fossil\"\n",
    )
    .unwrap();
    let classes = RoomClasses::compiled(&config);
    let durability = classes
        .durability("ticker")
        .expect("a state room is durable");
    assert_eq!(
        durability.history_size, 1000,
        "the state rooms' default history"
    );
    let board = durability.board.expect("a board");
    assert_eq!(
        (board.max_keys, board.entry_ttl),
        (5000, Some(Duration::from_secs(60)))
    );
    assert!(classes.offers_delta("ticker") && classes.state_key_of("ticker") == Some("symbol"));
    for (text, says) in [
        (
            "delta = \"gzip\"\nstate_key = \"s\"",
            "delta must be \"fossil\"",
        ),
        ("delta = \"fossil\"", "delta needs state_key"),
        ("state_ttl_s = 5", "state_ttl_s needs state_key"),
        ("state_key = \"\"", "state_key must name a field"),
        (
            "state_key = \"s\"\nstate_max_keys = 0",
            "state_max_keys must be between",
        ),
    ] {
        let err = load(&format!("[[rooms]]\nmatch = \"r\"\n{text}\n")).unwrap_err();
        assert!(
            err.contains(says) && err.contains("entry 0"),
            "{text}: {err}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
