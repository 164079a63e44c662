//! The guest clock: one monotonic time base from which every timer of the platform derives.
//!
//! Linux cross-checks its time sources against each other while it boots (TSC against the PIT in
//! `quick_pit_calibrate`/`pit_calibrate_tsc`, the LAPIC timer against PIT jiffies in
//! `calibrate_APIC_clock`, the TSC against the PM timer later). They only agree if they all count
//! the same elapsed time, so every device here reads [`GuestClock::now_ns`] and converts with
//! [`ns_to_ticks`]; none keeps its own host time.
//!
//! Two sources:
//! - **host**: host `CLOCK_MONOTONIC` (`std::time::Instant`) since the clock was made;
//! - **virtual**: a counter the caller advances (tests, and an instruction-counting mode where
//!   the software CPU advances guest time per instruction and skips ahead to the next timer
//!   deadline when the guest idles in HLT).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::PlatformError;

/// Nanoseconds per second.
pub const NS_PER_SEC: u64 = 1_000_000_000;

/// Converts an elapsed guest time to whole ticks of a clock running at `hz` (rounding down).
pub fn ns_to_ticks(ns: u64, hz: u64) -> u64 {
    // u128 so that ns * hz never overflows (ns up to 2^64 and hz up to a few GHz).
    ((ns as u128 * hz as u128) / NS_PER_SEC as u128) as u64
}

/// The first guest time (ns) at which `ns_to_ticks(t, hz) >= ticks`: when tick number `ticks`
/// has happened. Used for timer deadlines.
pub fn ticks_to_ns_ceil(ticks: u64, hz: u64) -> u64 {
    if hz == 0 {
        return u64::MAX;
    }
    let ns = (ticks as u128 * NS_PER_SEC as u128).div_ceil(hz as u128);
    u64::try_from(ns).unwrap_or(u64::MAX)
}

#[derive(Debug)]
enum Source {
    Host { origin: Instant },
    Virtual { ns: AtomicU64 },
}

#[derive(Debug)]
struct Inner {
    source: Source,
    /// Wall-clock time (ns since the Unix epoch) at guest time 0; the RTC starts from it.
    wall_at_zero_unix_ns: u128,
}

/// A cheaply clonable handle on the guest clock; all clones see the same time.
#[derive(Clone, Debug)]
pub struct GuestClock {
    inner: Arc<Inner>,
}

impl GuestClock {
    /// A clock following host `CLOCK_MONOTONIC` from now on; the RTC starts at the host's
    /// current wall-clock time.
    pub fn host() -> Self {
        let wall = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        GuestClock {
            inner: Arc::new(Inner { source: Source::Host { origin: Instant::now() }, wall_at_zero_unix_ns: wall }),
        }
    }

    /// A clock that only moves when the caller advances it, starting at guest time 0 with the
    /// RTC reading `start_unix_secs`.
    pub fn virtual_clock(start_unix_secs: u64) -> Self {
        GuestClock {
            inner: Arc::new(Inner {
                source: Source::Virtual { ns: AtomicU64::new(0) },
                wall_at_zero_unix_ns: start_unix_secs as u128 * NS_PER_SEC as u128,
            }),
        }
    }

    /// Whether this clock is caller-driven.
    pub fn is_virtual(&self) -> bool {
        matches!(self.inner.source, Source::Virtual { .. })
    }

    /// Guest time in nanoseconds since the clock was made. Monotonic.
    pub fn now_ns(&self) -> u64 {
        match &self.inner.source {
            Source::Host { origin } => u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX),
            Source::Virtual { ns } => ns.load(Ordering::Acquire),
        }
    }

    /// Moves a virtual clock forward by `delta_ns`. Errors on a host clock.
    pub fn advance_ns(&self, delta_ns: u64) -> Result<u64, PlatformError> {
        match &self.inner.source {
            Source::Host { .. } => Err(PlatformError::HostClockNotSettable),
            Source::Virtual { ns } => {
                let prev = ns.fetch_add(delta_ns, Ordering::AcqRel);
                Ok(prev.saturating_add(delta_ns))
            }
        }
    }

    /// Moves a virtual clock forward to `target_ns` (e.g. the next timer deadline when the guest
    /// idles). A target in the past leaves the clock where it is: guest time never goes back.
    pub fn advance_to_ns(&self, target_ns: u64) -> Result<u64, PlatformError> {
        match &self.inner.source {
            Source::Host { .. } => Err(PlatformError::HostClockNotSettable),
            Source::Virtual { ns } => {
                let prev = ns.fetch_max(target_ns, Ordering::AcqRel);
                Ok(prev.max(target_ns))
            }
        }
    }

    /// How long a host thread should sleep for guest time to reach `deadline_ns`: `None` for a
    /// virtual clock (nothing moves it but the caller, who should [`advance_to_ns`] instead),
    /// zero if the deadline has passed.
    ///
    /// [`advance_to_ns`]: GuestClock::advance_to_ns
    pub fn host_duration_until(&self, deadline_ns: u64) -> Option<Duration> {
        match &self.inner.source {
            Source::Virtual { .. } => None,
            Source::Host { .. } => Some(Duration::from_nanos(deadline_ns.saturating_sub(self.now_ns()))),
        }
    }

    /// Wall-clock time (ns since the Unix epoch) at guest time `guest_ns`.
    pub fn wall_unix_ns(&self, guest_ns: u64) -> u128 {
        self.inner.wall_at_zero_unix_ns + guest_ns as u128
    }
}

/// A time-stamp counter: `hz` ticks per guest second, writable (WRMSR 0x10 moves it by an
/// offset; the rate never changes, i.e. an invariant TSC).
#[derive(Clone, Debug)]
pub struct Tsc {
    clock: GuestClock,
    hz: u64,
    offset: u64,
}

impl Tsc {
    /// A TSC at `hz` that reads 0 at guest time 0.
    pub fn new(clock: GuestClock, hz: u64) -> Result<Self, PlatformError> {
        if hz == 0 {
            return Err(PlatformError::InvalidConfig("the TSC frequency must not be zero".into()));
        }
        Ok(Tsc { clock, hz, offset: 0 })
    }

    /// Ticks per second (what the core can pass as `tsc_early_khz=hz/1000`).
    pub fn hz(&self) -> u64 {
        self.hz
    }

    /// RDTSC.
    pub fn read(&self) -> u64 {
        self.read_at(self.clock.now_ns())
    }

    /// The TSC value at a given guest time.
    pub fn read_at(&self, now_ns: u64) -> u64 {
        ns_to_ticks(now_ns, self.hz).wrapping_add(self.offset)
    }

    /// WRMSR IA32_TIME_STAMP_COUNTER: the counter reads `value` now and keeps its rate.
    pub fn write(&mut self, value: u64) {
        self.offset = value.wrapping_sub(ns_to_ticks(self.clock.now_ns(), self.hz));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_conversion_round_trips() {
        // 1 ms at the PIT rate is 1193.182 ticks: floor.
        assert_eq!(ns_to_ticks(1_000_000, 1_193_182), 1193);
        // Tick 1194 happens at ceil(1194e9/1193182) ns = 1_000_686 ns.
        let t = ticks_to_ns_ceil(1194, 1_193_182);
        assert_eq!(t, 1_000_686);
        assert_eq!(ns_to_ticks(t, 1_193_182), 1194);
        assert_eq!(ns_to_ticks(t - 1, 1_193_182), 1193);
        // No overflow near the top of the range.
        assert_eq!(ns_to_ticks(u64::MAX, NS_PER_SEC), u64::MAX);
    }

    #[test]
    fn virtual_clock_moves_only_when_advanced() {
        let c = GuestClock::virtual_clock(1_700_000_000);
        assert!(c.is_virtual());
        assert_eq!(c.now_ns(), 0);
        assert_eq!(c.advance_ns(500).unwrap(), 500);
        let c2 = c.clone();
        assert_eq!(c2.now_ns(), 500);
        // advance_to never goes back.
        assert_eq!(c.advance_to_ns(100).unwrap(), 500);
        assert_eq!(c.advance_to_ns(2_000).unwrap(), 2_000);
        assert_eq!(c.host_duration_until(5_000), None);
        assert_eq!(c.wall_unix_ns(NS_PER_SEC), 1_700_000_001 * NS_PER_SEC as u128);
    }

    #[test]
    fn host_clock_is_monotonic_and_not_settable() {
        let c = GuestClock::host();
        let a = c.now_ns();
        std::thread::sleep(Duration::from_millis(2));
        let b = c.now_ns();
        assert!(b >= a + 2_000_000, "{a} -> {b}");
        assert!(matches!(c.advance_ns(1), Err(PlatformError::HostClockNotSettable)));
        let d = c.host_duration_until(b + 10_000_000).unwrap();
        assert!(d <= Duration::from_millis(10));
        assert_eq!(c.host_duration_until(0), Some(Duration::ZERO));
    }

    #[test]
    fn tsc_follows_the_clock_and_keeps_its_rate_after_a_write() {
        let c = GuestClock::virtual_clock(0);
        let mut tsc = Tsc::new(c.clone(), 2_000_000_000).unwrap();
        c.advance_ns(1_000).unwrap();
        assert_eq!(tsc.read(), 2_000);
        tsc.write(10);
        assert_eq!(tsc.read(), 10);
        c.advance_ns(500).unwrap();
        assert_eq!(tsc.read(), 1_010);
        assert!(Tsc::new(c, 0).is_err());
    }
}
