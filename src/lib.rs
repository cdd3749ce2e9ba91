//! # volley
//!
//! A WebSocket broadcast engine for live fan-out: rooms, broadcast, many nodes.
//!
//! ## Layout
//!
//! | module | job |
//! | --- | --- |
//! | [`config`] | one typed config from file, env and flags |
//! | [`protocol`] | client frames in (parsed once), server frames out (encoded once) |
//! | [`connection`] | one socket: reader, outbox, writer, close codes |
//! | [`hub`] | sharded room -> local subscribers map; local fan-out |
//! | [`batch`] | delivery windows: many messages, one frame per socket per window |
//! | [`broker`] | the seam to other nodes: `memory` engine (default) and `redis` (pub/sub, pipelined publish windows) |
//! | [`node`] | owns hub, broker, window; where a message enters and fans out |
//! | [`api`] | HTTP routes: health, publish API |
//! | [`server`] | listener, WebSocket upgrade, graceful shutdown |
//! | [`metrics`] | counters |
//!
//! ## One message's way
//!
//! `connection` reads a text frame -> `protocol::parse` borrows `content` as raw JSON ->
//! `Node::publish` encodes the server frame once -> `Hub::fan_out` pushes the shared
//! `Bytes` into each subscriber's `Outbox` and the broker carries it to other nodes ->
//! each socket's writer wakes at its delivery window and writes one frame (the message,
//! or a `batch`) with one vectored write.

pub mod api;
pub mod batch;
pub mod broker;
pub mod config;
pub mod connection;
pub mod hub;
pub mod metrics;
pub mod node;
pub mod protocol;
pub mod server;

pub use config::Config;
pub use node::Node;
pub use server::{Server, ShutdownReport};
