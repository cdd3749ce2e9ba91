//! What operators load into their Prometheus and Grafana, tested with the real tools:
//! the alert rules in `deploy/prometheus/` (`promtool check rules`, and `promtool test
//! rules` running their unit tests: each alert firing for its series, quiet for a healthy
//! node and before its `for:`), and the dashboard `deploy/grafana/volley.json`, its every
//! query asked of a real Prometheus scraping two nodes. Debian's `prometheus` package
//! (promtool with it), which the test command installs.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus");

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(DIR)
        .output()
        .expect("promtool runs (Debian: prometheus; tests/run.sh installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

/// The alerts the rules define, by name.
fn alerts() -> Vec<String> {
    let rules = std::fs::read_to_string(Path::new(DIR).join("volley-rules.yml")).expect("rules");
    rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .map(str::to_string)
        .collect()
}

#[test]
fn promtool_accepts_the_rules_and_their_unit_tests_pass() {
    let checked = promtool(&["check", "rules", "volley-rules.yml"]);
    assert!(
        checked.contains(&format!("SUCCESS: {} rules found", alerts().len())),
        "{checked}"
    );
    let tested = promtool(&["test", "rules", "volley-rules.test.yml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

#[test]
fn every_alert_is_tested_firing_and_quiet() {
    let tests =
        std::fs::read_to_string(Path::new(DIR).join("volley-rules.test.yml")).expect("rule tests");
    let names = alerts();
    for alert in [
        "VolleyNodeDown",
        "VolleyNodeNotReady",
        "VolleyRedisLost",
        "VolleyRedisPublishesUnconfirmed",
        "VolleyRedisPublishesDropped",
        "VolleyOutageBufferFilling",
        "VolleySlowConsumersClosing",
        "VolleyDeliveryLatencyHigh",
        "VolleyFileDescriptorsNearLimit",
        "VolleyWebhookPostsFailing",
        "VolleyWebhookEventsDropped",
    ] {
        assert!(names.iter().any(|n| n == alert), "no rule {alert}");
    }
    for alert in &names {
        let cases: Vec<&str> = tests
            .split("- alertname: ")
            .skip(1)
            .filter(|case| case.starts_with(&format!("{alert}\n")))
            .collect();
        assert!(
            cases.iter().any(|c| c.contains("exp_alerts: []")),
            "{alert} is never tested quiet"
        );
        assert!(
            cases.iter().any(|c| c.contains("exp_labels:")),
            "{alert} is never tested firing"
        );
    }
}

/// Debian's `prometheus` on a 127.0.0.1 port of its own, scraping `targets` every second
/// (and loading the alert rules, as a deployment would); stopped when dropped.
struct Prometheus {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    dir: std::path::PathBuf,
}

impl Prometheus {
    async fn start(targets: &[std::net::SocketAddr]) -> Prometheus {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("a free port")
            .local_addr()
            .expect("its address")
            .port();
        let dir =
            std::env::temp_dir().join(format!("volley-prometheus-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("prometheus dir");
        let targets: Vec<String> = targets.iter().map(|a| format!("\"{a}\"")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {DIR}/volley-rules.yml\n\
             scrape_configs:\n  - job_name: volley\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        );
        std::fs::write(dir.join("prometheus.yml"), config).expect("write the config");
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("prometheus runs (Debian: prometheus; tests/run.sh installs it)");
        let prometheus = Prometheus {
            child,
            addr: ([127, 0, 0, 1], port).into(),
            dir,
        };
        // Listening first (`wait_status` expects a listener), then ready.
        tokio::time::timeout(WAIT, async {
            while tokio::net::TcpStream::connect(prometheus.addr)
                .await
                .is_err()
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("prometheus never listened");
        wait_status(prometheus.addr, "/-/ready", 200).await;
        prometheus
    }

    /// An instant query through the HTTP API: the result vector (each sample's labels).
    async fn query(&self, expr: &str) -> Vec<serde_json::Map<String, Value>> {
        let body = format!("query={}", percent_encode(expr));
        // HTTP/1.0: the answer comes whole (no chunks) and the connection closes.
        let mut stream = tokio::net::TcpStream::connect(self.addr)
            .await
            .expect("connect");
        let request = format!(
            "POST /api/v1/query HTTP/1.0\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut response = Vec::new();
        tokio::time::timeout(WAIT, stream.read_to_end(&mut response))
            .await
            .expect("prometheus answers")
            .expect("read");
        let (status, body) = parse_response(&response);
        assert_eq!(status, 200, "{expr}: {body}");
        let answer: Value = serde_json::from_str(&body).expect("JSON");
        answer["data"]["result"]
            .as_array()
            .expect("a vector")
            .iter()
            .map(|sample| sample["metric"].as_object().cloned().unwrap_or_default())
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// What a panel target's legend says its series are labelled by.
fn grouped_by(legend: &str) -> Option<&'static str> {
    ["instance", "source", "code"]
        .into_iter()
        .find(|label| legend.contains(&format!("{{{{{label}}}}}")))
}

/// deploy/grafana/volley.json as Grafana would run it against Prometheus scraping two
/// nodes on one Redis under a small load: every panel's every query returns data, per
/// node (both nodes), per source or code, or summed into one series without labels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_returns_data_from_prometheus_scraping_two_nodes() {
    let redis = RedisServer::start().await;
    let one = start_on_redis(&redis, "dash-1", |_| {}).await;
    let two = start_on_redis(&redis, "dash-2", |_| {}).await;
    let nodes = [one.local_addr(), two.local_addr()];
    for addr in nodes {
        wait_status(addr, "/readyz", 200).await;
    }
    let mut viewers = Vec::new();
    for addr in nodes {
        let mut c = Client::connect(addr).await;
        c.join("board").await;
        viewers.push(c);
    }
    // One error frame (bad JSON), and a publish every 50 ms through node one's API: node
    // two gets them from Redis.
    let mut careless = Client::connect(nodes[1]).await;
    careless.send_text("{not json").await;
    careless.expect_error("bad_json").await;
    let publishing = tokio::spawn(async move {
        for n in 0u64.. {
            api_publish(nodes[0], &json!({"roomId": "board", "content": n})).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let reading = tokio::spawn(async move {
        loop {
            for c in &mut viewers {
                c.next_frame().await;
            }
        }
    });

    let prometheus = Prometheus::start(&nodes).await;
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/grafana/volley.json"
        ))
        .expect("the dashboard"),
    )
    .expect("the dashboard is JSON");
    let instances: HashSet<String> = nodes.iter().map(|a| a.to_string()).collect();
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"]
                .as_str()
                .expect("expr")
                .replace("$job", "volley")
                .replace("$instance", ".*");
            let legend = target["legendFormat"].as_str().unwrap_or_default();
            let title = panel["title"].as_str().unwrap_or_default();
            let fits = |series: &[serde_json::Map<String, Value>]| match grouped_by(legend) {
                Some("instance") => {
                    series
                        .iter()
                        .filter_map(|s| s.get("instance")?.as_str())
                        .map(str::to_string)
                        .collect::<HashSet<_>>()
                        == instances
                }
                Some(label) => !series.is_empty() && series.iter().all(|s| s.contains_key(label)),
                None => series.len() == 1 && series[0].is_empty(),
            };
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            let mut last = prometheus.query(&expr).await;
            while !fits(&last) {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "panel {title:?}: {expr} gave {last:?}"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
                last = prometheus.query(&expr).await;
            }
            if legend.contains("{{source}}") {
                let sources: HashSet<&str> = last
                    .iter()
                    .filter_map(|s| s.get("source")?.as_str())
                    .collect();
                assert!(
                    sources.contains("api") && sources.contains("broker"),
                    "{sources:?}"
                );
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 18, "every target of the eight panels");
    publishing.abort();
    reading.abort();
}
