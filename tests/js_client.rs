//! `/volley.js` outside a browser, under Debian's `node`: its Fossil applier against the
//! Rust encoder the node uses, on thousands of random edits of JSON-like text (ASCII and
//! not), and corrupted deltas refused rather than applied.

use std::process::Command;

use serde_json::json;

/// A random edit of `base`: a few spans cut and replaced by random text.
fn edit(base: &str, rng: &mut fastrand::Rng) -> String {
    const ALPHABET: &[char] = &[
        'a', 'b', '7', '.', ',', '"', ':', '{', '}', 'é', '€', '𝄞', ' ',
    ];
    let mut chars: Vec<char> = base.chars().collect();
    for _ in 0..rng.usize(0..4) {
        let at = rng.usize(0..=chars.len());
        let cut = rng.usize(0..8).min(chars.len() - at);
        let insert: Vec<char> = (0..rng.usize(0..12))
            .map(|_| ALPHABET[rng.usize(0..ALPHABET.len())])
            .collect();
        chars.splice(at..at + cut, insert);
    }
    chars.into_iter().collect()
}

#[test]
fn the_js_fossil_applier_rebuilds_what_the_rust_encoder_encodes() {
    let mut rng = fastrand::Rng::with_seed(23);
    let mut cases = Vec::new();
    while cases.len() < 3000 {
        let len = rng.usize(0..300);
        let base = format!(
            r#"{{"symbol":"S{}","bid":{}.{},"note":"{}"}}"#,
            rng.u32(0..100),
            rng.u32(0..1000),
            rng.u32(0..100),
            edit(&"x".repeat(len), &mut rng)
        );
        let target = edit(&base, &mut rng);
        let mut delta = Vec::new();
        fossil_delta::generate_delta(target.as_bytes(), base.as_bytes(), &mut delta);
        // The node sends such a delta only when it is text (else the full message).
        let Ok(delta) = String::from_utf8(delta) else {
            continue;
        };
        cases.push(json!({"base": base, "target": target, "delta": delta}));
    }
    let dir = std::env::temp_dir().join(format!("volley-js-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy("clients/js/volley.js", dir.join("volley.mjs")).unwrap();
    std::fs::write(dir.join("cases.json"), serde_json::to_vec(&cases).unwrap()).unwrap();
    let script = r#"
import { applyDelta } from "./volley.mjs";
import { readFileSync } from "node:fs";
const cases = JSON.parse(readFileSync("./cases.json", "utf8"));
const enc = new TextEncoder(), dec = new TextDecoder("utf-8", { fatal: true });
let ok = 0, refused = 0;
for (const c of cases) {
  const out = dec.decode(applyDelta(enc.encode(c.base), enc.encode(c.delta)));
  if (out !== c.target) throw new Error("mismatch: " + JSON.stringify(c));
  ok++;
  // The same delta with its checksum changed, or against another base, is refused.
  const bad = c.delta.slice(0, -2) + (c.delta.at(-2) === "1" ? "2" : "1") + ";";
  try { applyDelta(enc.encode(c.base), enc.encode(bad)); } catch { refused++; }
}
console.log(JSON.stringify({ ok, refused }));
"#;
    std::fs::write(dir.join("check.mjs"), script).unwrap();
    let output = Command::new("node")
        .arg("check.mjs")
        .current_dir(&dir)
        .output()
        .expect("node must be installed (bash tests/run.sh installs it)");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let result: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(result["ok"], 3000);
    assert_eq!(result["refused"], 3000, "every corrupted delta refused");
}
