//! The demo page and the dashboard in a real headless Chromium (Debian's `chromium`,
//! installed by the test command), driven over the DevTools protocol.
//!
//! The DevTools client is the few calls these tests need (open a tab, evaluate, take a
//! screenshot) over the WebSocket client the suite already uses. Screenshots go to
//! `target/test-output/`. An uncaught exception on a page fails its test.

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use base64::Engine;
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

struct Browser {
    _child: Child,
    _profile: PathBuf,
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    /// Uncaught exceptions reported by any page.
    exceptions: Vec<String>,
}

impl Browser {
    async fn launch() -> Browser {
        let profile = std::env::temp_dir().join(format!(
            "volley-chromium-{}-{}",
            std::process::id(),
            fastrand_id()
        ));
        let mut child = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-port=0",
                "--window-size=1280,900",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start chromium (the test command installs Debian's chromium)");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let url = tokio::time::timeout(WAIT, async {
            while let Some(line) = lines.next_line().await.expect("read chromium stderr") {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    return url.trim().to_string();
                }
            }
            panic!("chromium exited before listening");
        })
        .await
        .expect("chromium DevTools endpoint");
        // Keep draining stderr so Chromium never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .expect("connect to DevTools");
        Browser {
            _child: child,
            _profile: profile,
            ws,
            next_id: 0,
            exceptions: Vec::new(),
        }
    }

    /// One DevTools command; events that arrive meanwhile are looked at for exceptions.
    async fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut command = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            command["sessionId"] = json!(s);
        }
        self.ws
            .send(Message::text(command.to_string()))
            .await
            .expect("send to DevTools");
        let reply = tokio::time::timeout(WAIT, async {
            loop {
                let msg = self
                    .ws
                    .next()
                    .await
                    .expect("DevTools closed")
                    .expect("DevTools read");
                let Message::Text(text) = msg else { continue };
                let v: Value = serde_json::from_str(&text).expect("DevTools JSON");
                if v["id"] == id {
                    return v;
                }
                if v["method"] == "Runtime.exceptionThrown" {
                    self.exceptions
                        .push(v["params"]["exceptionDetails"].to_string());
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("DevTools did not answer {method}"));
        if let Some(error) = reply.get("error") {
            panic!("{method} failed: {error}");
        }
        reply["result"].clone()
    }

    /// Opens `url` in a new tab; returns the tab's session id.
    async fn open(&mut self, url: &str) -> String {
        let target = self
            .call(None, "Target.createTarget", json!({ "url": "about:blank" }))
            .await;
        let attached = self
            .call(
                None,
                "Target.attachToTarget",
                json!({ "targetId": target["targetId"], "flatten": true }),
            )
            .await;
        let session = attached["sessionId"]
            .as_str()
            .expect("session id")
            .to_string();
        self.call(Some(&session), "Runtime.enable", json!({})).await;
        self.call(Some(&session), "Page.enable", json!({})).await;
        self.call(Some(&session), "Page.navigate", json!({ "url": url }))
            .await;
        session
    }

    async fn eval(&mut self, session: &str, expression: &str) -> Value {
        let r = self
            .call(
                Some(session),
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await;
        if let Some(e) = r.get("exceptionDetails") {
            panic!("{expression}: {e}");
        }
        r["result"]["value"].clone()
    }

    /// Evaluates `expression` until it is `true` (bounded by WAIT).
    async fn wait_for(&mut self, session: &str, expression: &str) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if self.eval(session, expression).await == json!(true) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "page never satisfied: {expression}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Saves a PNG of the tab to target/test-output/NAME.png; a near-empty image (a
    /// blank page) fails the test.
    async fn screenshot(&mut self, session: &str, name: &str) {
        let shot = self
            .call(
                Some(session),
                "Page.captureScreenshot",
                json!({ "format": "png" }),
            )
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("screenshot data"))
            .expect("base64 screenshot");
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("../test-output");
        std::fs::create_dir_all(&dir).expect("test-output dir");
        std::fs::write(dir.join(format!("{name}.png")), &png).expect("write screenshot");
        assert!(
            png.len() > 20_000,
            "{name}: a rendered page, not a blank one: {} bytes",
            png.len()
        );
    }

    fn assert_no_page_errors(&self) {
        assert!(
            self.exceptions.is_empty(),
            "page errors: {:?}",
            self.exceptions
        );
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self._profile);
    }
}

fn fastrand_id() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64)
}

/// A node running the demo feed fast: goals every second or so, ticker bursts that
/// come as batch frames.
async fn demo_node() -> volley::Server {
    start(|c| {
        c.demo.enabled = true;
        c.demo.clock_speed = 600;
        c.demo.ticker_rate = 300;
        c.metrics.report_s = 1;
    })
    .await
}

#[tokio::test]
async fn demo_page_shows_changing_scores_and_takes_batches() {
    let server = demo_node().await;
    let url = format!("http://{}/", server.local_addr());
    let mut browser = Browser::launch().await;
    let tab = browser.open(&url).await;
    browser
        .wait_for(&tab, "!!(window.volleyDemo && volleyDemo.connected)")
        .await;
    assert_eq!(
        browser
            .eval(&tab, "document.querySelectorAll('.match').length")
            .await,
        6
    );
    assert_eq!(
        browser
            .eval(&tab, "document.querySelectorAll('#ticker tr').length")
            .await,
        24
    );
    const SCORES: &str =
        "[...document.querySelectorAll('.score')].map(e => e.textContent).join(',')";
    let before = browser.eval(&tab, SCORES).await;
    let before = before.as_str().expect("score text");
    // Scores on the page change (a goal, or a match restarting), and the page took
    // batch frames and moved prices.
    browser
        .wait_for(&tab, &format!("{SCORES} !== '{before}'"))
        .await;
    browser
        .wait_for(
            &tab,
            "volleyDemo.scoreChanges > 0 && volleyDemo.batches > 0 && volleyDemo.quoteChanges > 0",
        )
        .await;
    // Every symbol has a price, and the page measured its own latency.
    browser.wait_for(&tab, "[...document.querySelectorAll('#ticker tr td:nth-child(2)')].every(td => td.textContent !== '–')").await;
    browser
        .wait_for(&tab, "document.getElementById('p50').textContent !== '–'")
        .await;
    browser.screenshot(&tab, "demo").await;
    browser.assert_no_page_errors();
}

#[tokio::test]
async fn demo_page_reconnects_by_itself() {
    let server = demo_node().await;
    let addr = server.local_addr();
    let mut browser = Browser::launch().await;
    let tab = browser.open(&format!("http://{addr}/")).await;
    browser
        .wait_for(
            &tab,
            "!!(window.volleyDemo && volleyDemo.connected && volleyDemo.messages > 0)",
        )
        .await;
    // The node closes every socket (1001) and comes back on the same port.
    server.shutdown().await;
    let again = start(|c| {
        c.server.listen = addr;
        c.demo.enabled = true;
        c.demo.clock_speed = 600;
    })
    .await;
    browser
        .wait_for(&tab, "volleyDemo.reconnects >= 1 && volleyDemo.connected")
        .await;
    let seen = browser
        .eval(&tab, "volleyDemo.messages")
        .await
        .as_u64()
        .unwrap();
    browser
        .wait_for(&tab, &format!("volleyDemo.messages > {seen}"))
        .await;
    drop(again);
    browser.assert_no_page_errors();
}

#[tokio::test]
async fn dashboard_draws_charts_with_live_figures() {
    let server = demo_node().await;
    let addr = server.local_addr();
    let mut browser = Browser::launch().await;
    // The demo page is a subscriber, so the node has deliveries to chart.
    let demo = browser.open(&format!("http://{addr}/")).await;
    browser
        .wait_for(&demo, "!!(window.volleyDemo && volleyDemo.messages > 0)")
        .await;
    let tab = browser.open(&format!("http://{addr}/dashboard")).await;
    browser
        .wait_for(
            &tab,
            "!!(window.volleyDashboard && volleyDashboard.charts.length === 4)",
        )
        .await;
    assert_eq!(
        browser
            .eval(&tab, "document.querySelectorAll('.uplot canvas').length")
            .await,
        4
    );
    // Deliveries per second (chart 2, the "out" series) above zero, from several reports.
    browser
        .wait_for(&tab, "volleyDashboard.charts[1].plot.data[0].length >= 2 && volleyDashboard.charts[1].plot.data[2].some(v => v > 0)")
        .await;
    browser
        .wait_for(
            &tab,
            "volleyDashboard.charts[0].plot.data[1].some(v => v >= 1)",
        )
        .await;
    assert_eq!(
        browser.eval(&tab, "volleyDashboard.nodes").await,
        json!(["test-node"])
    );
    assert_eq!(
        browser.eval(&tab, "volleyDashboard.error").await,
        Value::Null
    );
    let row = browser
        .eval(&tab, "document.querySelector('#nodes tr').textContent")
        .await;
    assert!(row.as_str().unwrap().contains("test-node"), "{row}");
    browser.screenshot(&tab, "dashboard").await;
    browser.assert_no_page_errors();
}

/// The demo's two boards, as `--demo` makes them, without the feed.
fn demo_boards(c: &mut volley::Config) {
    c.demo.symbols = volley::config::DemoConfig::default().symbols;
    c.rooms = vec![
        volley::config::RoomClass {
            pattern: "scores".into(),
            state_key: Some("match".into()),
            delta: Some("fossil".into()),
            ..Default::default()
        },
        volley::config::RoomClass {
            pattern: "ticker".into(),
            state_key: Some("symbol".into()),
            delta: Some("fossil".into()),
            ..Default::default()
        },
    ];
}

#[tokio::test]
async fn the_demo_page_opens_its_boards_from_their_snapshots() {
    // No feed runs: whatever the page shows on load came from the boards' snapshots.
    let server = start(demo_boards).await;
    let addr = server.local_addr();
    let catalog: Value =
        serde_json::from_str(&http(addr, "GET", "/api/demo", &[], b"").await.1).unwrap();
    for m in catalog["matches"].as_array().unwrap() {
        let content =
            json!({"match":m["id"],"homeScore":2,"awayScore":1,"minute":67,"status":"live"});
        let (status, body) = api_publish(addr, &json!({"roomId":"scores","content":content})).await;
        assert_eq!(status, 200, "{body}");
    }
    for s in catalog["symbols"].as_array().unwrap() {
        let content = json!({"symbol":s,"price":101.5,"change":1.5,"changePct":1.5});
        let (status, body) = api_publish(addr, &json!({"roomId":"ticker","content":content})).await;
        assert_eq!(status, 200, "{body}");
    }
    let mut browser = Browser::launch().await;
    let tab = browser.open(&format!("http://{addr}/")).await;
    browser
        .wait_for(&tab, "(s => s.length === 12 && s.every(e => e.textContent !== '0'))([...document.querySelectorAll('.score')]) && (m => m.length === 6 && m.every(e => e.textContent === \"67'\"))([...document.querySelectorAll('.minute')])")
        .await;
    browser
        .wait_for(&tab, "(p => p.length === 24 && p.every(td => td.textContent === '101.50'))([...document.querySelectorAll('#ticker tr td:nth-child(2)')])")
        .await;
    assert_eq!(browser.eval(&tab, "volleyDemo.snapshots").await, json!(2));
    assert_eq!(
        browser.eval(&tab, "volleyDemo.messages").await,
        json!(0),
        "all of it from the snapshots"
    );
    browser.screenshot(&tab, "demo-from-snapshot").await;
    browser.assert_no_page_errors();
}

#[tokio::test]
async fn the_demo_ticker_board_of_2000_symbols_opens_at_once_and_follows_deltas() {
    let server = start(|c| {
        c.demo.enabled = true;
        c.demo.symbols = 2000;
        c.demo.ticker_rate = 400;
        c.demo.clock_speed = 600;
    })
    .await;
    let addr = server.local_addr();
    let mut browser = Browser::launch().await;
    let tab = browser.open(&format!("http://{addr}/")).await;
    browser
        .wait_for(
            &tab,
            "!!(window.volleyBoards && volleyBoards.ticker.state.size === 2000)",
        )
        .await;
    // Every row priced (from the snapshot), then updates arriving as deltas and applied.
    browser
        .wait_for(&tab, "(p => p.length === 2000 && p.every(td => td.textContent !== '–'))([...document.querySelectorAll('#ticker tr td:nth-child(2)')])")
        .await;
    browser
        .wait_for(
            &tab,
            "volleyDemo.deltas > 100 && volleyDemo.quoteChanges > 100",
        )
        .await;
    let last = browser.eval(&tab, "volleyClient.lastResync ?? null").await;
    assert_eq!(
        browser.eval(&tab, "volleyClient.resyncs").await,
        json!(0),
        "every delta applied (the last resync: {last})"
    );
    // The page's board is the node's: each price the page shows is the board's at an
    // offset at or after the snapshot the test takes now.
    let (status, body) = http(
        addr,
        "GET",
        "/api/state/ticker",
        &[("Authorization", "apikey test-key")],
        b"",
    )
    .await;
    assert_eq!(status, 200);
    let node: Value = serde_json::from_str(&body).unwrap();
    let offset = node["offset"].as_u64().unwrap();
    browser
        .wait_for(&tab, &format!("volleyBoards.ticker.offset >= {offset}"))
        .await;
    let page = browser
        .eval(
            &tab,
            "JSON.stringify([...volleyBoards.ticker.state.keys()].sort())",
        )
        .await;
    let mut keys: Vec<String> = node["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["key"].as_str().unwrap().to_string())
        .collect();
    keys.sort();
    assert_eq!(
        page.as_str().unwrap(),
        serde_json::to_string(&keys).unwrap()
    );
    browser.screenshot(&tab, "demo-ticker-2000").await;
    browser.assert_no_page_errors();
}

#[tokio::test]
async fn the_demo_page_recovers_what_it_missed_while_its_node_restarted() {
    let redis = RedisServer::start().await;
    let page_node = start_on_redis(&redis, "page", demo_boards).await;
    let addr = page_node.local_addr();
    let other = start_on_redis(&redis, "other", demo_boards).await;
    let price = |p: f64| json!({"roomId":"ticker","content":{"symbol":"ACME","price":p,"change":0.0,"changePct":0.0}});
    assert_eq!(api_publish(other.local_addr(), &price(100.0)).await.0, 200);
    let mut browser = Browser::launch().await;
    let tab = browser.open(&format!("http://{addr}/")).await;
    const ACME: &str =
        "document.querySelector('[data-symbol=\"ACME\"] td:nth-child(2)')?.textContent";
    browser
        .wait_for(&tab, &format!("{ACME} === '100.00'"))
        .await;

    let before = browser
        .eval(&tab, "volleyDemo.messages")
        .await
        .as_u64()
        .unwrap();
    // The page's node goes away; the price moves twice on the other node meanwhile.
    page_node.shutdown().await;
    browser
        .wait_for(&tab, "volleyDemo.connected === false")
        .await;
    assert_eq!(api_publish(other.local_addr(), &price(200.0)).await.0, 200);
    assert_eq!(api_publish(other.local_addr(), &price(300.0)).await.0, 200);
    let again = start_on_redis(&redis, "page", move |c| {
        demo_boards(c);
        c.server.listen = addr;
    })
    .await;
    // Back, the page asks for what came after the last offset it showed: it shows the
    // latest without waiting for another update, and nothing was unrecoverable.
    browser
        .wait_for(&tab, &format!("{ACME} === '300.00'"))
        .await;
    assert_eq!(browser.eval(&tab, "volleyDemo.unrecovered").await, json!(0));
    // Both missed prices were replayed, not just the latest.
    assert_eq!(
        browser.eval(&tab, "volleyDemo.messages").await,
        json!(before + 2)
    );
    drop(again);
    browser.assert_no_page_errors();
}

#[tokio::test]
async fn chromium_negotiates_permessage_deflate_and_the_demo_page_runs_on_it() {
    let server = start(|c| {
        c.demo.enabled = true;
        c.demo.clock_speed = 600;
        c.demo.ticker_rate = 300;
        c.compression.enabled = true;
        // Compress even the small frames, so every frame the page reads is compressed.
        c.compression.min_bytes = 0;
    })
    .await;
    let url = format!("http://{}/", server.local_addr());
    let mut browser = Browser::launch().await;
    let tab = browser.open(&url).await;
    // The extension Chromium and volley agreed on, seen from a socket of the page's own.
    browser
        .eval(
            &tab,
            "window.ext = null; { const w = new WebSocket('ws://' + location.host + '/ws'); w.onopen = () => { window.ext = w.extensions; }; } 0",
        )
        .await;
    browser.wait_for(&tab, "window.ext !== null").await;
    let ext = browser.eval(&tab, "window.ext").await;
    assert!(
        ext.as_str()
            .is_some_and(|e| e.starts_with("permessage-deflate")),
        "{ext}"
    );
    // The page joined (its frames compressed by Chromium, inflated by volley) and reads
    // compressed batches and messages.
    browser
        .wait_for(&tab, "!!(window.volleyDemo && volleyDemo.connected)")
        .await;
    browser
        .wait_for(
            &tab,
            "volleyDemo.batches > 0 && volleyDemo.quoteChanges > 0 && volleyDemo.scoreChanges > 0",
        )
        .await;
    browser.assert_no_page_errors();
}

/// Every room durable on Redis, as a production deployment keeps its scoreboards.
fn durable_rooms(c: &mut volley::Config) {
    c.rooms = vec![volley::config::RoomClass {
        pattern: "scores:*".into(),
        history_size: 100,
        history_ttl_s: 3600,
        ..Default::default()
    }];
}

/// The README's `/volley.js` example, as README.md has it: the html block under
/// "### volley.js".
fn readme_volley_example() -> String {
    let readme = include_str!("../README.md");
    let section = readme
        .split("### volley.js")
        .nth(1)
        .expect("README has a volley.js section");
    let block = section
        .split("```html\n")
        .nth(1)
        .and_then(|b| b.split("\n```").next())
        .expect("an html block in the volley.js section");
    block.to_string()
}

/// Adds `html` at the end of the tab's body and runs its scripts, as a page that
/// contains them would (scripts inserted as HTML do not run by themselves).
async fn insert_html(browser: &mut Browser, tab: &str, html: &str) {
    let inject = format!(
        "document.body.insertAdjacentHTML('beforeend', {html}); \
         for (const old of [...document.body.querySelectorAll('script')]) {{ \
           const s = document.createElement('script'); \
           if (old.type) s.type = old.type; \
           s.textContent = old.textContent; \
           old.replaceWith(s); \
         }} true",
        html = serde_json::to_string(html).unwrap()
    );
    browser.eval(tab, &inject).await;
}

/// Opens a page of the node's origin with `html` in its body, its scripts run.
async fn page_with(browser: &mut Browser, addr: std::net::SocketAddr, html: &str) -> String {
    let tab = browser.open(&format!("http://{addr}/healthz")).await;
    browser
        .wait_for(&tab, "document.readyState === 'complete'")
        .await;
    browser
        .eval(&tab, "document.body.replaceChildren(); true")
        .await;
    insert_html(browser, &tab, html).await;
    tab
}

#[tokio::test]
async fn the_readme_volley_js_example_shows_the_score_after_joins_and_reconnects() {
    let redis = RedisServer::start().await;
    let page_node = start_on_redis(&redis, "page", durable_rooms).await;
    let addr = page_node.local_addr();
    let other = start_on_redis(&redis, "other", durable_rooms).await;
    // A new score published on the other node; the page shows it (the README's callback
    // writes `JSON.stringify(message.content)`).
    let other_addr = other.local_addr();
    let score = |home: u64| async move {
        let body = json!({"roomId":"scores:m1","content":format!("{home}-0")});
        assert_eq!(api_publish(other_addr, &body).await.0, 200);
        format!("document.getElementById('score').textContent === '\"{home}-0\"'")
    };
    let first = score(1).await;
    let example = readme_volley_example();
    assert!(example.contains("volley.join(\"scores:m1\""), "{example}");
    let mut browser = Browser::launch().await;
    let tab = page_with(&mut browser, addr, "<p>watching</p>").await;
    // Every value the score element ever shows, and a mark a reload would wipe.
    browser
        .eval(
            &tab,
            "window.mark = 1; window.shown = []; \
             new MutationObserver(() => { const s = document.getElementById('score'); \
               if (s && (shown.length || s.textContent !== '')) shown.push(s.textContent); }) \
               .observe(document.body, { childList: true, subtree: true, characterData: true }); true",
        )
        .await;
    insert_html(&mut browser, &tab, &example).await;
    browser.wait_for(&tab, &first).await;
    // Another fan joins: the page gets a user_joined notice, and still shows the score.
    let mut fan = Client::connect(addr).await;
    fan.join("scores:m1").await;
    browser.wait_for(&tab, &score(2).await).await;
    // The page's node restarts; the page comes back by itself (its own rejoin notice
    // included) and shows the score, then the next one.
    drop(fan);
    page_node.shutdown().await;
    let again = start_on_redis(&redis, "page", move |c| {
        durable_rooms(c);
        c.server.listen = addr;
    })
    .await;
    let mut fan = Client::connect(addr).await;
    fan.join("scores:m1").await;
    browser.wait_for(&tab, &score(3).await).await;
    let shown = browser.eval(&tab, "window.shown").await;
    assert!(
        shown.as_array().unwrap().iter().all(|s| s != ""),
        "the score went blank: {shown}"
    );
    assert_eq!(
        browser.eval(&tab, "window.mark").await,
        json!(1),
        "the page reloaded"
    );
    drop(again);
    browser.assert_no_page_errors();
}

#[tokio::test]
async fn volley_js_recovers_across_a_redis_restart_and_a_node_restart() {
    let mut redis = RedisServer::start().await;
    let page_node = start_on_redis(&redis, "page", durable_rooms).await;
    let addr = page_node.local_addr();
    let other = start_on_redis(&redis, "other", durable_rooms).await;
    let publish = |n: u64| json!({"roomId":"scores:r","content":n});
    let mut browser = Browser::launch().await;
    let tab = page_with(
        &mut browser,
        addr,
        r#"<script type="module">
  import { connect } from "/volley.js";
  window.got = []; window.recoveries = []; window.up = false;
  const volley = connect(`ws://${location.host}/ws`, {
    onRecovery: (roomId, recovered) => recoveries.push([roomId, recovered]),
    onStatus: (up) => { window.up = up; },
    minDelay: 50,
    maxDelay: 500,
  });
  volley.join("scores:r", { history: 10 }, (message) => got.push(message.content));
</script>"#,
    )
    .await;
    browser.wait_for(&tab, "window.up === true").await;
    redis.wait_numsub("room:scores:r", 1).await;
    for n in 1..=2 {
        assert_eq!(api_publish(other.local_addr(), &publish(n)).await.0, 200);
    }
    browser.wait_for(&tab, "got.length === 2").await;
    // Redis loses everything: the room's history starts again in a new epoch.
    redis.restart().await;
    for node in [addr, other.local_addr()] {
        wait_status(node, "/readyz", 200).await;
    }
    for n in 3..=4 {
        assert_eq!(api_publish(other.local_addr(), &publish(n)).await.0, 200);
    }
    browser.wait_for(&tab, "got.length === 4").await;
    // The page's node goes away; two more are published meanwhile; it comes back.
    page_node.shutdown().await;
    browser.wait_for(&tab, "window.up === false").await;
    for n in 5..=6 {
        assert_eq!(api_publish(other.local_addr(), &publish(n)).await.0, 200);
    }
    let again = start_on_redis(&redis, "page", move |c| {
        durable_rooms(c);
        c.server.listen = addr;
    })
    .await;
    browser.wait_for(&tab, "got.length >= 6").await;
    assert_eq!(
        browser.eval(&tab, "window.got").await,
        json!([1, 2, 3, 4, 5, 6]),
        "every message once, in order"
    );
    assert_eq!(
        browser.eval(&tab, "window.recoveries").await,
        json!([["scores:r", true]]),
        "the rejoin resumed in the new epoch"
    );
    drop(again);
    browser.assert_no_page_errors();
}

#[tokio::test]
async fn an_event_source_resumes_across_its_nodes_restart_with_nothing_missed_or_twice() {
    let redis = RedisServer::start().await;
    let page_node = start_on_redis(&redis, "page", durable_rooms).await;
    let addr = page_node.local_addr();
    let other = start_on_redis(&redis, "other", durable_rooms).await;
    let publish = |n: u64| {
        let other = other.local_addr();
        async move {
            let body = json!({"roomId":"scores:final","content":{"goal":n}});
            assert_eq!(api_publish(other, &body).await.0, 200);
        }
    };
    let mut browser = Browser::launch().await;
    let tab = page_with(&mut browser, addr, "<p>watching</p>").await;
    // The browser's own EventSource: every goal it is given (by offset, from messages,
    // batches and histories), and how often it opened.
    browser
        .eval(
            &tab,
            "window.goals = []; window.opens = 0; window.joined = 0; window.unrecovered = 0; \
             const es = new EventSource('/sse?rooms=scores:final'); \
             es.onopen = () => opens++; \
             es.addEventListener('user_joined', () => joined++); \
             const take = m => { if (m.type === 'message') goals.push(m.offset); }; \
             es.onmessage = e => take(JSON.parse(e.data)); \
             es.addEventListener('batch', e => JSON.parse(e.data).messages.forEach(take)); \
             es.addEventListener('history', e => { const h = JSON.parse(e.data); \
               if (h.recovered === false) unrecovered++; h.messages.forEach(take); }); true",
        )
        .await;
    // Joined (the node's subscription confirmed), so nothing published from here is
    // missed.
    browser.wait_for(&tab, "joined === 1").await;
    for n in 1..=5 {
        publish(n).await;
    }
    browser.wait_for(&tab, "goals.length === 5").await;
    // The page's node restarts; five goals come meanwhile on the other node.
    let report = page_node.shutdown().await;
    assert!(
        report.drained,
        "the stream ended with the drain: {report:?}"
    );
    for n in 6..=10 {
        publish(n).await;
    }
    let again = start_on_redis(&redis, "page", move |c| {
        durable_rooms(c);
        c.server.listen = addr;
    })
    .await;
    // The browser reconnects by itself with Last-Event-ID: the missed goals, once each.
    browser
        .wait_for(&tab, "opens === 2 && joined === 2 && goals.length >= 10")
        .await;
    for n in 11..=12 {
        publish(n).await;
    }
    browser.wait_for(&tab, "goals.length >= 12").await;
    assert_eq!(
        browser.eval(&tab, "goals").await,
        json!((1..=12).collect::<Vec<u64>>())
    );
    assert_eq!(browser.eval(&tab, "unrecovered").await, json!(0));
    drop(again);
    browser.assert_no_page_errors();
}
