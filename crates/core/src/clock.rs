//! The engine's time, injected: every lock time, expiry, rate-limit cell and idle check reads
//! it, so the rules can be tested in milliseconds on a [`ManualClock`] instead of waiting out
//! real lock times. The server runs on [`SystemClock`] (wall time: lock times are compared
//! across proxies sharing a consumer state store, so they must be epoch times, not uptime).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Epoch milliseconds.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> u64;
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

/// A clock that moves only when told (tests).
#[derive(Debug, Default)]
pub struct ManualClock {
    now_ms: AtomicU64,
}

impl ManualClock {
    pub fn starting_at(now_ms: u64) -> Arc<Self> {
        Arc::new(Self {
            now_ms: AtomicU64::new(now_ms),
        })
    }

    pub fn advance(&self, ms: u64) {
        self.now_ms.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.now_ms.load(Ordering::SeqCst)
    }
}

/// The engine's clock as `governor`'s, for the pull rate limiters.
#[derive(Clone)]
pub(crate) struct GovernorClock(pub Arc<dyn Clock>);

impl governor::clock::Clock for GovernorClock {
    type Instant = governor::nanos::Nanos;

    fn now(&self) -> Self::Instant {
        governor::nanos::Nanos::from(self.0.now_ms().saturating_mul(1_000_000))
    }
}
