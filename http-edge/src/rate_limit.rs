//! The per-client rate limit both APIs apply after authentication: a token bucket per
//! client key (a user, or a service's subject), so one client cannot crowd out the others.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock as _, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

/// Token buckets keyed by client.
#[derive(Debug)]
pub struct ClientLimiter(RateLimiter<String, DefaultKeyedStateStore<String>, DefaultClock>);

impl ClientLimiter {
    /// `per_second` requests a second sustained, `burst` at once (0 means: as many as
    /// `per_second`; a `per_second` of 0 is taken as 1).
    pub fn new(per_second: u32, burst: u32) -> Self {
        let per_second = NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(burst).unwrap_or(per_second);
        ClientLimiter(RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst)))
    }

    /// Takes one request from `key`'s bucket, or says how long until one is available.
    pub fn check(&self, key: String) -> Result<(), Duration> {
        self.0
            .check_key(&key)
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }

    /// Forgets clients whose buckets are full again (called every minute), so memory follows
    /// the clients seen recently, not every client ever seen.
    pub fn retain_recent(&self) {
        self.0.retain_recent();
    }
}
