//! Per-thread reusable buffers for the threads that fan out and flush: a fan-out or a
//! flush runs synchronously on whatever thread found the work, so a buffer per thread is
//! never contended and never reallocated once warm. A nested use on the same thread
//! (a flush inside a fan-out's flush) gets a fresh buffer instead of a borrow panic.

use std::cell::RefCell;
use std::thread::LocalKey;

/// Runs `f` with this thread's buffer in `key`, or a fresh one if it is in use.
pub fn with_scratch<T: Default + 'static, R>(
    key: &'static LocalKey<RefCell<T>>,
    f: impl FnOnce(&mut T) -> R,
) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => f(&mut scratch),
        Err(_) => f(&mut T::default()),
    })
}
