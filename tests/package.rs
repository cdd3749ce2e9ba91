//! The Debian package (`cargo deb`, `[package.metadata.deb]` in Cargo.toml), built from
//! the binaries this test run built, installed on this machine with `dpkg -i` and removed
//! again: the binaries from their installed paths, the conffile loading as the defaults,
//! the systemd unit accepted by `systemd-analyze verify` and enabled. Installing needs
//! root, as the test command runs (tests/run.sh installs cargo-deb and systemd's tools).

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(ROOT)
        .output()
        .unwrap_or_else(|e| panic!("{program} {args:?}: {e}"))
}

fn ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{program} {args:?} failed:\n{text}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `section.key = value` lines of a TOML text, without `server.node_id` (random per
/// start). With `commented`, the lines that are `# key = value`.
fn settings(toml: &str, commented: bool) -> BTreeSet<String> {
    let mut section = String::new();
    let mut keys = BTreeSet::new();
    for line in toml.lines() {
        let line = if commented {
            match line.strip_prefix("# ") {
                Some(rest) if rest.split_once(" = ").is_some_and(|(k, _)| is_key(k)) => rest,
                _ => line,
            }
        } else {
            line
        };
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
        } else if let Some((key, value)) = line.split_once(" = ") {
            if is_key(key) && format!("{section}.{key}") != "server.node_id" {
                keys.insert(format!("{section}.{key} = {value}"));
            }
        }
    }
    keys
}

fn is_key(word: &str) -> bool {
    !word.is_empty() && word.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
}

/// The configuration the node starts with when nothing is set.
fn defaults() -> String {
    ok(env!("CARGO_BIN_EXE_volley"), &["--print-config"])
}

#[test]
fn the_packaged_config_file_has_every_key_commented_with_its_default() {
    let file = std::fs::read_to_string(Path::new(ROOT).join("deploy/debian/volley.toml"))
        .expect("deploy/debian/volley.toml");
    let want = settings(&defaults(), false);
    assert!(want.len() > 50, "{want:?}");
    assert_eq!(
        settings(&file, true),
        want,
        "uncommented, the file is the defaults"
    );
    assert!(
        settings(&file, false).is_empty(),
        "nothing set: every key is commented"
    );
    assert!(file.contains("# node_id = "), "node_id is listed too");
}

#[test]
fn the_package_installs_runs_and_removes_as_a_service() {
    // SAFETY: geteuid reads the process's effective user id; it has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root,
        "dpkg -i needs root: run the test command as root (CI does)"
    );
    let out = std::env::temp_dir().join(format!("volley-deb-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    // The binaries `cargo test` built (the dev profile; cargo-deb strips them).
    ok(
        "cargo",
        &[
            "deb",
            "--no-build",
            "--profile",
            "dev",
            "--fast",
            "-o",
            &out.to_string_lossy(),
        ],
    );
    let deb = std::fs::read_dir(&out)
        .expect("cargo deb's output")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("a .deb");
    let _ = run("dpkg", &["--purge", "volley"]);
    ok("dpkg", &["-i", &deb.to_string_lossy()]);
    let installed = std::panic::catch_unwind(check_installed);
    let purged = run("dpkg", &["--purge", "volley"]);
    let _ = std::fs::remove_dir_all(&out);
    if let Err(failed) = installed {
        std::panic::resume_unwind(failed);
    }
    assert!(purged.status.success(), "dpkg --purge: {purged:?}");
    for gone in [
        "/usr/bin/volley",
        "/usr/bin/volley-bench",
        "/etc/volley/volley.toml",
        "/lib/systemd/system/volley.service",
        "/etc/systemd/system/multi-user.target.wants/volley.service",
    ] {
        assert!(!Path::new(gone).exists(), "{gone} left after the purge");
    }
}

fn check_installed() {
    let version = format!("volley {}", env!("CARGO_PKG_VERSION"));
    assert_eq!(ok("/usr/bin/volley", &["--version"]).trim(), version);
    assert!(ok("/usr/bin/volley-bench", &["--help"]).contains("--sockets"));
    let loaded = ok(
        "/usr/bin/volley",
        &["--config", "/etc/volley/volley.toml", "--print-config"],
    );
    assert_eq!(settings(&loaded, false), settings(&defaults(), false));

    let status = ok("dpkg", &["-s", "volley"]);
    assert!(
        status.contains("Conffiles:\n /etc/volley/volley.toml "),
        "the config file is a conffile: {status}"
    );
    let unit_path = "/lib/systemd/system/volley.service";
    let verified = run("systemd-analyze", &["verify", unit_path]);
    assert!(
        verified.status.success() && verified.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&verified.stderr)
    );
    assert!(
        Path::new("/etc/systemd/system/multi-user.target.wants/volley.service").exists(),
        "the service is enabled at install"
    );
    let unit = std::fs::read_to_string(unit_path).expect("the unit");
    for line in [
        "ExecStart=/usr/bin/volley --config /etc/volley/volley.toml",
        "DynamicUser=yes",
        "Restart=on-failure",
        "KillSignal=SIGTERM",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
    ] {
        assert!(unit.lines().any(|l| l == line), "no {line} in the unit");
    }
    let setting = |key: &str| -> u64 {
        unit.lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim_end_matches('s').parse().expect("a number"))
            .unwrap_or_else(|| panic!("no {key} in the unit"))
    };
    // Room for limits.max_connections (100 000) plus the node's own descriptors, and
    // for the drain (server.drain_timeout_ms, 5 s) before systemd kills.
    assert!(setting("LimitNOFILE=") >= 100_064);
    assert!(setting("TimeoutStopSec=") > 5);
}
