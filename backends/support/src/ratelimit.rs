//! Rate-limited logging of guest-triggered errors: a guest can submit millions of bad requests a
//! second, and each must not cost a log line.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Lines allowed per second before suppression.
const BURST: u64 = 10;

static WINDOW: AtomicU64 = AtomicU64::new(0);
static COUNT: AtomicU64 = AtomicU64::new(0);
static SUPPRESSED: AtomicU64 = AtomicU64::new(0);

/// Logs a warning about something the guest did, at most [`BURST`] lines per second; the number
/// of suppressed lines is reported with the next line that gets through.
pub fn guest_error(args: std::fmt::Arguments<'_>) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    if WINDOW.swap(now, Ordering::Relaxed) != now {
        COUNT.store(0, Ordering::Relaxed);
    }
    if COUNT.fetch_add(1, Ordering::Relaxed) < BURST {
        let dropped = SUPPRESSED.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            log::warn!("guest: {args} ({dropped} similar lines suppressed)");
        } else {
            log::warn!("guest: {args}");
        }
    } else {
        SUPPRESSED.fetch_add(1, Ordering::Relaxed);
    }
}
