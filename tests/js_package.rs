//! The npm package `volley-client` (`clients/js`): `npm pack` makes an installable
//! tarball, and the installed package, under Node (the `ws` package: Node 20 has no
//! WebSocket), opens a board from its snapshot, applies the node's Fossil deltas and a
//! removal, and ends with the node's board.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::boards::api_state;
use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use volley::config::RoomClass;

fn npm(dir: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new("npm")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("npm must be installed (bash tests/run.sh checks it)");
    assert!(
        out.status.success(),
        "npm {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The next line the node script printed, as JSON.
async fn next_line(lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>) -> Value {
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("node said nothing")
        .unwrap()
        .expect("node ended early");
    serde_json::from_str(&line).unwrap()
}

#[tokio::test]
async fn the_packed_client_runs_under_node_against_a_real_node() {
    let node = start(|c| {
        c.limits.publish_rate = 0;
        c.rooms = vec![RoomClass {
            pattern: "ticker".into(),
            state_key: Some("symbol".into()),
            delta: Some("fossil".into()),
            delivery_window_ms: Some(0),
            ..Default::default()
        }];
    })
    .await;
    let addr = node.local_addr();
    let publish = |symbol: &str, n: u64| json!({"roomId":"ticker","content":{"symbol":symbol,"price":100 + n,"volume":n * 13,"exchange":"XNAS","currency":"USD"}});
    for symbol in ["ACME", "BOLT", "CRUX"] {
        assert_eq!(api_publish(addr, &publish(symbol, 0)).await.0, 200);
    }

    let dir = std::env::temp_dir().join(format!("volley-npm-{}", std::process::id()));
    let app = dir.join("app");
    std::fs::create_dir_all(&app).unwrap();
    let package = std::fs::canonicalize("clients/js").unwrap();
    let packed = npm(
        &dir,
        &["pack", package.to_str().unwrap(), "--pack-destination", "."],
    );
    let tarball = dir.join(
        packed
            .lines()
            .last()
            .expect("npm pack names its tarball")
            .trim(),
    );
    assert!(tarball.exists(), "{packed}");
    std::fs::write(
        app.join("package.json"),
        r#"{"type":"module","private":true}"#,
    )
    .unwrap();
    // The package, and TypeScript to check its types with.
    npm(
        &app,
        &[
            "install",
            "--no-audit",
            "--no-fund",
            "--prefer-offline",
            tarball.to_str().unwrap(),
            "typescript@5",
        ],
    );
    // The types: a TypeScript program using the package checks under --strict.
    npm(
        &app,
        &[
            "install",
            "--no-audit",
            "--no-fund",
            "--prefer-offline",
            "typescript@5",
        ],
    );
    std::fs::write(
        app.join("typed.ts"),
        r#"
import { connect, applyDelta, type Room, type RoomMessage, type Json } from "volley-client";
const volley = connect("ws://127.0.0.1:1/ws", { minDelay: 50, onRecovery: (room: string, ok: boolean) => {} });
const board: Room = volley.join("ticker", { state: true, delta: true }, (m: RoomMessage) => m.offset);
board.on("change", (key, content: Json, message) => message.roomId.length + String(key).length);
board.on("remove", (key) => key);
board.on("snapshot", (state) => state.size);
const price: Json | undefined = board.state?.get("ACME");
const out: Uint8Array = applyDelta(new Uint8Array(), new Uint8Array());
volley.publish("ticker", { symbol: "ACME", price: 1 });
volley.close();
"#,
    )
    .unwrap();
    let tsc = std::process::Command::new("npx")
        .args([
            "tsc",
            "--noEmit",
            "--strict",
            "--module",
            "nodenext",
            "--moduleResolution",
            "nodenext",
            "--target",
            "es2022",
            "typed.ts",
        ])
        .current_dir(&app)
        .output()
        .expect("npx");
    assert!(
        tsc.status.success(),
        "the types do not check: {}",
        String::from_utf8_lossy(&tsc.stdout)
    );
    let script = format!(
        r#"
import {{ connect }} from "volley-client";
const volley = connect("ws://{addr}/ws", {{ minDelay: 50 }});
const room = volley.join("ticker", {{ state: true, delta: true }}, (m) => {{ if (m.delta !== undefined) deltas++; }});
let deltas = 0;
room.on("snapshot", (board) => console.log(JSON.stringify({{ snapshot: board.size }})));
const until = async (done) => {{ while (!done()) await new Promise((r) => setTimeout(r, 10)); }};
await until(() => room.offset !== null);
// The Rust side publishes now; it says up to which offset on stdin.
const target = await new Promise((r) => process.stdin.once("data", (d) => r(Number(String(d)))));
await until(() => room.offset >= target);
console.log(JSON.stringify({{ state: Object.fromEntries(room.state), deltas, resyncs: volley.resyncs }}));
volley.close();
"#
    );
    std::fs::write(app.join("check.mjs"), script).unwrap();
    let mut child = tokio::process::Command::new("node")
        .arg("check.mjs")
        .current_dir(&app)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("node must be installed");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(next_line(&mut lines).await, json!({"snapshot": 3}));
    // Two updates per symbol (the second of each a delta), and a removal.
    for n in 1..=2 {
        for symbol in ["ACME", "BOLT", "CRUX"] {
            assert_eq!(api_publish(addr, &publish(symbol, n)).await.0, 200);
        }
    }
    let (status, body) = api_publish(
        addr,
        &json!({"roomId":"ticker","content":{"symbol":"BOLT"},"remove":true}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let target = body["offset"].as_u64().unwrap();
    assert_eq!(target, 10);
    use tokio::io::AsyncWriteExt;
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(format!("{target}\n").as_bytes())
        .await
        .unwrap();
    let result = next_line(&mut lines).await;
    let (_, snapshot) = api_state(addr, "ticker").await;
    let expected: serde_json::Map<String, Value> = snapshot["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["key"].as_str().unwrap().to_string(), e["content"].clone()))
        .collect();
    assert_eq!(result["state"], Value::Object(expected), "{result}");
    assert_eq!(result["resyncs"], 0);
    assert!(result["deltas"].as_u64().unwrap() >= 3, "{result}");
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    let _ = std::fs::remove_dir_all(&dir);
}
