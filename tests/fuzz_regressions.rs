//! The inputs kept in `fuzz/regressions/<target>/` (seeds, and every crash a fuzz run
//! found, see `fuzz/run.sh`) run through the fuzz targets' code on stable: each must
//! return without a panic.

use std::path::Path;

fn each_input(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(target);
    let mut ran = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let outcome = std::panic::catch_unwind(|| run(&data));
        assert!(outcome.is_ok(), "{} panics", path.display());
        ran += 1;
    }
    assert!(ran > 0, "no inputs in {}", dir.display());
}

#[test]
fn client_frames() {
    each_input("client_frame", volley::fuzzing::client_frame);
}

#[test]
fn publish_bodies() {
    each_input("publish_body", volley::fuzzing::publish_body);
}

#[test]
fn envelopes() {
    each_input("envelope", volley::fuzzing::envelope);
}

#[test]
fn frame_readers() {
    each_input("frame_reader", volley::fuzzing::frame_reader);
}

#[test]
fn configs() {
    each_input("config", volley::fuzzing::config);
}
