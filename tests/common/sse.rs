//! An SSE client: curl (`-N`, no buffering) reading `GET /sse`, its events parsed as the
//! WHATWG spec reads them (`event`, `data` lines joined with `\n`, `id`; comments and
//! `retry` skipped).

use std::process::Stdio;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use super::WAIT;

/// One event as `EventSource` would dispatch it.
#[derive(Debug, Clone)]
pub struct SseEvent {
    pub event: String,
    pub data: Value,
    /// The event's own `id:` line, if it had one.
    pub id: Option<String>,
}

impl SseEvent {
    /// The frames the event carries: a batch's or a history's items, else the frame.
    pub fn items(&self) -> Vec<Value> {
        match self.event.as_str() {
            "batch" | "history" => self.data["messages"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
            _ => vec![self.data.clone()],
        }
    }

    /// The room messages among them.
    pub fn messages(&self) -> Vec<Value> {
        let mut items = self.items();
        items.retain(|m| m["type"] == "message");
        items
    }
}

/// A stream read by curl; killed when dropped.
pub struct Curl {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    /// The last id seen, as a browser keeps it for `Last-Event-ID`.
    pub last_id: Option<String>,
}

impl Curl {
    /// `curl -N url` with the given headers.
    pub async fn open(url: &str, headers: &[(&str, &str)]) -> Curl {
        let mut cmd = Command::new("curl");
        cmd.args(["-sN", "--max-time", "120", url]);
        for (name, value) in headers {
            cmd.arg("-H").arg(format!("{name}: {value}"));
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("curl must be installed (bash tests/run.sh installs it)");
        let stdout = child.stdout.take().expect("curl's stdout");
        Curl {
            child,
            lines: BufReader::new(stdout).lines(),
            last_id: None,
        }
    }

    /// The next event, or `None` when the stream ended.
    pub async fn next(&mut self) -> Option<SseEvent> {
        tokio::time::timeout(WAIT, self.read_event())
            .await
            .expect("no SSE event in time")
    }

    /// The next event whose type is `event`, skipping others.
    pub async fn next_of(&mut self, event: &str) -> SseEvent {
        loop {
            let next = self.next().await.expect("the stream ended");
            if next.event == event {
                return next;
            }
        }
    }

    /// Room messages (from `message`, `batch` and `history` events) until `n` have come.
    pub async fn messages(&mut self, n: usize) -> Vec<Value> {
        let mut got = Vec::new();
        while got.len() < n {
            let event = self.next().await.expect("the stream ended");
            got.extend(event.messages());
        }
        assert_eq!(got.len(), n, "more messages than expected: {got:?}");
        got
    }

    /// Reads until the stream ends; what came meanwhile.
    pub async fn until_end(&mut self) -> Vec<SseEvent> {
        let mut events = Vec::new();
        while let Some(event) = self.next().await {
            events.push(event);
        }
        events
    }

    async fn read_event(&mut self) -> Option<SseEvent> {
        let (mut event, mut data, mut id) = (String::new(), Vec::<String>::new(), None);
        loop {
            let line = self.lines.next_line().await.ok()??;
            if line.is_empty() {
                if data.is_empty() {
                    continue;
                }
                if let Some(id) = &id {
                    self.last_id = Some(String::clone(id));
                }
                let data = serde_json::from_str(&data.join("\n")).expect("JSON data");
                let event = if event.is_empty() {
                    "message".into()
                } else {
                    event
                };
                return Some(SseEvent { event, data, id });
            }
            let (field, value) = line.split_once(':').unwrap_or((&line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => event = value.to_string(),
                "data" => data.push(value.to_string()),
                "id" => id = Some(value.to_string()),
                _ => {}
            }
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.start_kill();
    }
}
