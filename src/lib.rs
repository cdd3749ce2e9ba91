//! # volley
//!
//! A WebSocket broadcast engine for live fan-out: rooms, broadcast, many nodes.
//!
//! The reference design is the Node.js "scaling WebSockets with Redis" servers (ws +
//! ioredis): their client protocol, their Redis channels and envelopes, their environment
//! names. volley speaks all of it, batched, and without their failure modes. "The
//! reference servers" in the code means those.
//!
//! ## Layout
//!
//! Imports point down this table, never up (`tests/layering.rs` reads the source with
//! `syn` and checks it): the core runs `protocol` <- `batch` <- `outbox` <- `hub` <-
//! `node` <- `connection` / `server` / `api`; `config`, `metrics`, `throttle` and `tls`
//! are leaves anyone may use (they import only each other and `protocol`, which imports
//! nothing of ours); `broker` sits beside the hub (the node owns both, and neither sees
//! the other); the features sit on the node. No file is over 600 lines, no function over
//! 100.
//!
//! One word per thing: a *window* is an interval (a room class's delivery or publish
//! window); what a room collected during one is its `Collected`; how delivery batches is
//! the `DeliveryPolicy`. A *shard* is one of `redis.shards`; the hub's room map has
//! *stripes*; Redis Cluster's sharded pub/sub is `spublish`. *Cluster* is Redis Cluster;
//! the nodes' summaries are *reports* (served at `/api/cluster`, the reference servers'
//! route). An engine *hands back* publishes to its set; a set *hands over* to a new layout.
//!
//! | module | job |
//! | --- | --- |
//! | [`config`] | one typed config from file, env and flags |
//! | `metrics` | node stats: counters and histograms; Prometheus text |
//! | `deflate` | permessage-deflate: the offer volley accepts, a frame compressed once for every compressing socket, a client message inflated under the limit |
//! | `tls` | rustls for `wss://` / `https://`; an upgraded TLS socket shared by its reader and outbox |
//! | `throttle` | log lines that repeat under pressure, at most once per interval |
//! | [`protocol`] | client frames in (parsed once), server frames out (encoded once), `now_ms`; `board.rs`: state rooms' frames (messages naming their entry, removals, snapshots, deltas) |
//! | `batch` | the delivery policy: window clocks, a pace per room class's window, leading edge, batch frames, shared-batch memo |
//! | `outbox` | one socket's bounded queue and its writes (inline, writer task); the due list and its tick task |
//! | `hub` | striped room -> local subscribers map (each room with its pace and conflation field); `room.rs`: what a room collected in its window, delivered at its tick as shared frames; `delta.rs`: a state room's Fossil deltas, made once per message per room |
//! | [`broker`] | the seam to other nodes (`Broker`, `Presence`, `Health`, `Reports`; `broker::start` picks the engine): `memory` (default), `redis` (one server: pub/sub, pipelined publish windows, durable streams, presence, reports), `routed` (an engine set over a route: `shards`, `sentinel`, `cluster`, one hand-over for all) |
//! | [`node`] | owns hub, broker, delivery policy and due list; where a message enters and fans out; `replay.rs`: joins with history; `state.rs`: boards (which rooms, entry expiry, snapshot reads shared by joiners) |
//! | `online` | who is online, as the node answers it: one listing a second from the broker, shared by every asker |
//! | `auth` | identities from JWTs (or the client's word where no key is configured) |
//! | `connection` | one socket: reader (RFC 6455 rules), session (rooms, limits), access (identity, permissions) |
//! | `reports` | feature: per-node reports, kept by the broker (`metrics:<serverId>` on Redis), read by `/api/cluster` |
//! | `boards` | feature: state rooms' entries past their TTL leave quiet boards on time |
//! | `fdlimit` | the open-file limit raised to the hard one at start, and a warning naming the settings when it is below `limits.max_connections` |
//! | `webhooks` | feature: rooms occupied and vacated, users online and offline, POSTed once per deployment (the broker's ledger decides) |
//! | `demo` | feature: the built-in feed, simulated matches and a ticker (`--demo`) |
//! | `features` | starts the features for the server, stops them first on shutdown |
//! | `web` | the demo page and the dashboard, embedded in the binary (uPlot vendored) |
//! | `api` | HTTP routes: health, publish API, `/metrics`, `/api/cluster`, the pages; `state.rs`: `/api/state` and publishes to boards |
//! | [`server`] | listener, timeouts, WebSocket upgrade, features, graceful shutdown |
//!
//! ## One message's way
//!
//! `connection` reads a text frame -> `protocol::parse` borrows `content` as raw JSON ->
//! `Node::publish` encodes the server frame once -> `Hub::fan_out` adds it to the room's
//! window (or, on the leading edge and with window 0, pushes the shared `Bytes` into each
//! subscriber's `Outbox` at once) and the broker carries it to other nodes -> at the
//! window's tick the room frames its window once (the message, or a `batch`) and pushes
//! that frame into each subscriber's outbox -> the thread that finds a socket due writes
//! everything it holds with one non-blocking vectored write; only what would block goes
//! to the socket's writer task.

// The public API: what an embedder needs to run a node and plug in a broker.
pub mod broker;
pub mod config;
pub mod node;
pub mod protocol;
pub mod server;

mod api;
mod auth;
mod batch;
mod boards;
mod connection;
mod deflate;
mod demo;
mod fdlimit;
mod features;
mod hub;
mod metrics;
mod online;
mod outbox;
mod reports;
mod throttle;
mod tls;
mod web;
mod webhooks;

pub use config::Config;
pub use node::Node;
pub use server::{Server, ShutdownReport};

#[doc(hidden)]
pub mod fuzzing;

/// Internals the criterion benches measure directly; not part of the API.
#[doc(hidden)]
pub mod bench {
    pub use crate::batch::delivery::batch_frame;
    pub use crate::batch::{DeliveryPolicy, Pace};
    pub use crate::deflate::compress_frame;
    pub use crate::hub::{Deltas, Hub};
    pub use crate::metrics::Stats;
    pub use crate::outbox::{Drained, DueList, Outbox};
}
