//! End-to-end latencies, one histogram per thread instead of one per socket: a histogram
//! of this range (1 µs to 120 s, 3 significant digits) is about 140 KB, which was most of
//! what a socket cost the tool. Each thread records into its own (a lock nobody else
//! takes while the run lasts); the report merges them.

use std::cell::RefCell;
use std::sync::{Arc, Mutex, OnceLock};

use hdrhistogram::Histogram;

type Shared = Arc<Mutex<Histogram<u64>>>;

/// Every thread's histogram.
fn all() -> &'static Mutex<Vec<Shared>> {
    static ALL: OnceLock<Mutex<Vec<Shared>>> = OnceLock::new();
    ALL.get_or_init(Mutex::default)
}

fn empty() -> Histogram<u64> {
    // Valid bounds: this cannot fail.
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("histogram bounds")
}

thread_local! {
    static MINE: RefCell<Option<Shared>> = const { RefCell::new(None) };
}

/// Records one latency (µs) on this thread's histogram.
pub fn record(us: u64) {
    MINE.with(|mine| {
        let mut mine = mine.borrow_mut();
        let shared = mine.get_or_insert_with(|| {
            let shared = Arc::new(Mutex::new(empty()));
            if let Ok(mut all) = all().lock() {
                all.push(shared.clone());
            }
            shared
        });
        if let Ok(mut h) = shared.lock() {
            let _ = h.record(us.clamp(1, 120_000_000));
        };
    });
}

/// Every latency recorded so far, merged.
pub fn merged() -> Histogram<u64> {
    let mut total = empty();
    if let Ok(all) = all().lock() {
        for h in all.iter() {
            if let Ok(h) = h.lock() {
                let _ = total.add(&*h);
            }
        }
    }
    total
}
