//! A per-consumer token bucket: `rate` pulls per second with a one-second burst; a pull takes
//! one token. (The Java proxy also charged each delivered batch its message count, which made
//! its default of 1024 a limit of ~1024 *messages* per second; here the limit is on pulls.)

use std::time::Instant;

#[derive(Debug)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: u64) -> Self {
        Self {
            tokens: rate as f64,
            last: Instant::now(),
        }
    }

    fn refill(&mut self, rate: u64) {
        let now = Instant::now();
        let rate = rate as f64;
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * rate).min(rate);
        self.last = now;
    }

    /// Takes one token if there is one.
    pub fn try_acquire(&mut self, rate: u64) -> bool {
        self.refill(rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_beyond_the_burst() {
        let mut bucket = TokenBucket::new(3);
        assert!((0..3).all(|_| bucket.try_acquire(3)));
        assert!(!bucket.try_acquire(3));
    }
}
