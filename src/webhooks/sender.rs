//! The webhook sender: a bounded queue of events, POSTed in batches as
//! `{"time_ms":T,"events":[{"name","id","roomId" | "userId"},...]}`, signed
//! `X-Volley-Signature: sha256=<hex HMAC-SHA256 of the body with webhooks.secret>`.
//!
//! A failed POST (no connection, no answer within `webhooks.timeout_ms`, not 2xx) is
//! retried with the same events and ids, in order, after a pause that doubles up to
//! `webhooks.retry_max_ms`; meanwhile new events queue behind them, and past
//! `webhooks.queue_size` the oldest are dropped and counted. At shutdown what is queued
//! is tried once more.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use serde::Serialize;
use sha2::Sha256;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::broker::Subject;
use crate::config::WebhooksConfig;
use crate::metrics::Stats;
use crate::protocol::now_ms;

/// The first pause after a failed POST.
const FIRST_PAUSE: Duration = Duration::from_millis(250);

/// One event as the receiver gets it.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub name: &'static str,
    pub id: String,
    #[serde(rename = "roomId", skip_serializing_if = "Option::is_none")]
    pub room_id: Option<String>,
    #[serde(rename = "userId", skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
}

impl Event {
    pub fn new(name: &'static str, id: String, subject: &Subject) -> Event {
        let (room_id, user_id) = match subject {
            Subject::Room(room) => (Some(room.to_string()), None),
            Subject::User(user) => (None, Some(user.to_string())),
        };
        Event {
            name,
            id,
            room_id,
            user_id,
        }
    }
}

/// The events waiting to be sent, oldest first.
pub(super) struct Queue {
    events: Mutex<VecDeque<Event>>,
    max: usize,
    wake: Notify,
    stats: Arc<Stats>,
}

impl Queue {
    pub(super) fn new(max: usize, stats: Arc<Stats>) -> Queue {
        Queue {
            events: Mutex::new(VecDeque::new()),
            max,
            wake: Notify::new(),
            stats,
        }
    }

    pub(super) fn push(&self, event: Event) {
        self.stats.webhooks.events.fetch_add(1, Relaxed);
        let mut events = self.events.lock();
        if events.len() >= self.max {
            events.pop_front();
            self.stats.webhooks.dropped.fetch_add(1, Relaxed);
        }
        events.push_back(event);
        self.stats
            .webhooks
            .queued
            .store(events.len() as u64, Relaxed);
        drop(events);
        self.wake.notify_one();
    }

    /// Up to `n` events from the front.
    fn take(&self, n: usize) -> Vec<Event> {
        let mut events = self.events.lock();
        let n = n.min(events.len());
        let batch: Vec<Event> = events.drain(..n).collect();
        self.stats
            .webhooks
            .queued
            .store(events.len() as u64, Relaxed);
        batch
    }

    /// A batch that failed goes back in front, as far as the bound lets it.
    fn put_back(&self, batch: Vec<Event>) {
        let mut events = self.events.lock();
        for event in batch.into_iter().rev() {
            if events.len() >= self.max {
                self.stats.webhooks.dropped.fetch_add(1, Relaxed);
                continue;
            }
            events.push_front(event);
        }
        self.stats
            .webhooks
            .queued
            .store(events.len() as u64, Relaxed);
    }

    fn len(&self) -> usize {
        self.events.lock().len()
    }
}

/// `sha256=<hex>`: the HMAC-SHA256 of `body` with `secret`, as `X-Volley-Signature`
/// carries it.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return String::new();
    };
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for byte in digest {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

/// Sends what the queue holds until `stop`, then tries once more with what is left.
pub(super) async fn run(
    queue: Arc<Queue>,
    config: WebhooksConfig,
    stats: Arc<Stats>,
    stop: CancellationToken,
) {
    let mut post = Poster::new(&config, stats);
    let mut pause = FIRST_PAUSE;
    loop {
        if queue.len() == 0 {
            tokio::select! {
                _ = queue.wake.notified() => {}
                _ = stop.cancelled() => break,
            }
        }
        if queue.len() < config.batch_max {
            // Let a burst share its POST.
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(config.batch_ms)) => {}
                _ = stop.cancelled() => break,
            }
        }
        let batch = queue.take(config.batch_max);
        if batch.is_empty() {
            continue;
        }
        match post.send(&batch).await {
            Ok(()) => pause = FIRST_PAUSE,
            Err(e) => {
                tracing::warn!(error = %e, events = batch.len(), retry_in_ms = pause.as_millis() as u64, "webhook POST failed");
                queue.put_back(batch);
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.cancelled() => break,
                }
                pause = (pause * 2).min(Duration::from_millis(config.retry_max_ms));
            }
        }
    }
    // Shutting down: one more try for what is queued (the drain deadline bounds it).
    loop {
        let batch = queue.take(config.batch_max);
        if batch.is_empty() {
            return;
        }
        if let Err(e) = post.send(&batch).await {
            tracing::warn!(error = %e, lost = batch.len() + queue.len(), "webhook events not sent before shutdown");
            return;
        }
    }
}

/// POSTs to the receiver over one kept-alive connection, made again when it fails.
struct Poster {
    uri: Uri,
    authority: String,
    secret: Vec<u8>,
    timeout: Duration,
    conn: Option<SendRequest<Full<Bytes>>>,
    stats: Arc<Stats>,
}

#[derive(Serialize)]
struct BodyOf<'a> {
    time_ms: u64,
    events: &'a [Event],
}

impl Poster {
    fn new(config: &WebhooksConfig, stats: Arc<Stats>) -> Poster {
        // `webhooks.url` was checked at start (an http:// URL with a host).
        let uri: Uri = config.url.parse().unwrap_or_default();
        let authority = uri.authority().map(|a| a.to_string()).unwrap_or_default();
        Poster {
            uri,
            authority,
            secret: config.secret.as_bytes().to_vec(),
            timeout: Duration::from_millis(config.timeout_ms),
            conn: None,
            stats,
        }
    }

    /// POSTs `events`, counted as sent or as a failed POST.
    async fn send(&mut self, events: &[Event]) -> Result<(), String> {
        let body = serde_json::to_vec(&BodyOf {
            time_ms: now_ms(),
            events,
        })
        .map_err(|e| e.to_string())?;
        let sent = tokio::time::timeout(self.timeout, self.post(body)).await;
        let result = sent.unwrap_or_else(|_| {
            Err(format!(
                "no answer within webhooks.timeout_ms ({} ms)",
                self.timeout.as_millis()
            ))
        });
        match &result {
            Ok(()) => {
                let sent = &self.stats.webhooks.sent;
                sent.fetch_add(events.len() as u64, Relaxed);
            }
            Err(_) => {
                self.stats.webhooks.failed_posts.fetch_add(1, Relaxed);
                // The connection may be in any state: the next POST makes a new one.
                self.conn = None;
            }
        }
        result
    }

    async fn post(&mut self, body: Vec<u8>) -> Result<(), String> {
        let signature = signature(&self.secret, &body);
        let path = self.uri.path_and_query().map_or("/", |p| p.as_str());
        let request = Request::post(path)
            .header(hyper::header::HOST, &self.authority)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(
                hyper::header::USER_AGENT,
                concat!("volley/", env!("CARGO_PKG_VERSION")),
            )
            .header("x-volley-signature", signature)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let conn = self.connection().await?;
        let response = conn
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        // Read the answer whole so the connection can carry the next POST.
        let _ = response.into_body().collect().await;
        if !status.is_success() {
            return Err(format!("the receiver answered {status}"));
        }
        Ok(())
    }

    async fn connection(&mut self) -> Result<&mut SendRequest<Full<Bytes>>, String> {
        if self.conn.as_ref().is_none_or(|c| c.is_closed()) {
            let host = self.uri.host().unwrap_or_default();
            let port = self.uri.port_u16().unwrap_or(80);
            let stream = TcpStream::connect((host, port))
                .await
                .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))?;
            let _ = stream.set_nodelay(true);
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            self.conn = Some(sender);
        }
        self.conn
            .as_mut()
            .ok_or_else(|| "no connection".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_the_hmac_of_the_body() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn a_full_queue_drops_its_oldest_and_a_failed_batch_goes_back_in_front() {
        let stats = Arc::new(Stats::default());
        let queue = Queue::new(3, stats.clone());
        let room = |n: u32| Subject::Room(n.to_string().into());
        for n in 0..4 {
            queue.push(Event::new("room_occupied", format!("e{n}"), &room(n)));
        }
        assert_eq!(stats.webhooks.dropped.load(Relaxed), 1);
        let batch = queue.take(2);
        assert_eq!(
            batch.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
            ["e1", "e2"]
        );
        queue.push(Event::new("room_vacated", "e4".into(), &room(4)));
        queue.put_back(batch);
        // Back in front as far as the bound allows: the oldest gives way again.
        let ids: Vec<String> = queue.take(10).into_iter().map(|e| e.id).collect();
        assert_eq!(ids, ["e2", "e3", "e4"]);
        assert_eq!(stats.webhooks.dropped.load(Relaxed), 2);
    }
}
