//! Batching: the windows that turn many messages into few writes.
//!
//! `delivery` coalesces what one socket receives inside a delivery window into one
//! `batch` frame. Windows are aligned to one clock for the whole node, so every socket
//! in a room drains the same messages at the same tick and the batch frame for them is
//! built once and shared (see `DeliveryWindow::frames`).

pub mod delivery;

pub use delivery::DeliveryWindow;
