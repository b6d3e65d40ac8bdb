//! Per-consumer pull rate limits (`governor`'s GCRA limiter: `rate` pulls per second with a
//! one-second burst; a pull takes one cell). The Java proxy also charged each delivered batch
//! its message count, which made its default of 1024 a limit of ~1024 *messages* per second;
//! here the limit is on pulls.

use crate::clock::{Clock, GovernorClock};
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

type Limiter =
    RateLimiter<NotKeyed, InMemoryState, GovernorClock, governor::middleware::NoOpMiddleware<governor::nanos::Nanos>>;

/// One limiter per consumer, rebuilt when its rate changes; on the engine's clock.
pub(super) struct RateLimiters {
    clock: GovernorClock,
    limiters: Mutex<HashMap<String, (u64, Limiter)>>,
}

impl RateLimiters {
    pub(crate) fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            clock: GovernorClock(clock),
            limiters: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one pull from the consumer's allowance at `rate` per second; false when spent.
    pub(crate) fn try_acquire(&self, consumer: &str, rate: u64) -> bool {
        // A limiter is plain numbers: a poisoned mutex still holds usable data.
        let mut limiters = self.limiters.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let stale = limiters.get(consumer).is_none_or(|(r, _)| *r != rate);
        if stale {
            let per_second = NonZeroU32::new(u32::try_from(rate).unwrap_or(u32::MAX)).unwrap_or(NonZeroU32::MIN);
            limiters.insert(
                consumer.to_owned(),
                (
                    rate,
                    RateLimiter::direct_with_clock(Quota::per_second(per_second), self.clock.clone()),
                ),
            );
        }
        limiters
            .get(consumer)
            .is_some_and(|(_, limiter)| limiter.check().is_ok())
    }

    /// Forgets a consumer's allowance (its rate changed: start with a full burst).
    pub(crate) fn reset(&self, consumer: &str) {
        self.limiters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(consumer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::clock::ManualClock;

    #[test]
    fn refuses_beyond_the_burst_and_refills_with_time() {
        let clock = ManualClock::starting_at(1_000_000);
        let limiters = RateLimiters::new(clock.clone());
        assert!((0..3).all(|_| limiters.try_acquire("c", 3)));
        assert!(!limiters.try_acquire("c", 3));
        assert!(limiters.try_acquire("other", 3), "per consumer");
        // One cell every 1/3 s.
        clock.advance(300);
        assert!(!limiters.try_acquire("c", 3), "not yet a whole cell");
        clock.advance(40);
        assert!(limiters.try_acquire("c", 3));
        assert!(!limiters.try_acquire("c", 3));
        limiters.reset("c");
        assert!(limiters.try_acquire("c", 3));
    }
}
