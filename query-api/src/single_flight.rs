//! Concurrent computations of one key done once: the first caller computes, and callers that
//! ask for the same key meanwhile wait for its result instead of computing it again.
//!
//! Why: the answer cache keys answers by checkpoint epoch, so when the epoch moves every
//! dashboard asks its questions under new keys at once. Without this, each of them computes
//! the same answer (the burst that was the query API's p99 while checkpoints move).
//!
//! A leader dropped before it finishes (its client went away, its deadline passed) hands
//! over: one of its waiters computes instead, so nobody waits on work nobody does.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::sync::watch;

/// Who computed a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flight<V> {
    /// This caller computed it.
    Led(V),
    /// Another caller computed it while this one waited.
    Shared(V),
}

/// Computations in progress, by key.
#[derive(Debug)]
pub struct SingleFlight<K, V> {
    computing: Mutex<HashMap<K, watch::Receiver<Option<V>>>>,
    /// Callers waiting for another's result.
    waiting: AtomicUsize,
    /// The gauge (a metric name) `waiting` is reported as.
    waiting_gauge: &'static str,
}

impl<K, V> SingleFlight<K, V>
where
    K: Eq + Hash + Clone,
    V: Clone,
{
    pub fn new(waiting_gauge: &'static str) -> Self {
        // Exported from the start, not only once a request has waited.
        metrics::gauge!(waiting_gauge).set(0.0);
        SingleFlight {
            computing: Mutex::new(HashMap::new()),
            waiting: AtomicUsize::new(0),
            waiting_gauge,
        }
    }

    /// `compute`'s result, or the result of a computation of `key` already in progress.
    pub async fn run<F, Fut>(&self, key: K, compute: F) -> Flight<V>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
    {
        let result = loop {
            let in_progress = {
                let mut computing = self.lock();
                match computing.get(&key) {
                    Some(result) => result.clone(),
                    None => {
                        let (result, awaited) = watch::channel(None);
                        computing.insert(key.clone(), awaited);
                        break result;
                    }
                }
            };
            if let Some(value) = self.wait(in_progress).await {
                return Flight::Shared(value);
            }
            // The leader was dropped unfinished: ask again, and perhaps lead.
        };
        // Declared after `result`, so dropped before it: when this future is dropped, the
        // key is free again by the time the waiters wake to find the leader gone.
        let _leading = Leading { flights: self, key };
        let value = compute().await;
        result.send_replace(Some(value.clone()));
        Flight::Led(value)
    }

    /// The leader's result; `None` when it was dropped before it had one.
    async fn wait(&self, mut in_progress: watch::Receiver<Option<V>>) -> Option<V> {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!(self.waiting_gauge).increment(1.0);
        let _waited = Waiting {
            count: &self.waiting,
            gauge: self.waiting_gauge,
        };
        let settled = in_progress.wait_for(Option::is_some).await;
        settled.ok().and_then(|result| result.clone())
    }

    /// Keys being computed.
    pub fn in_progress(&self) -> usize {
        self.lock().len()
    }

    /// Callers waiting for another's result.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<K, watch::Receiver<Option<V>>>> {
        // Nothing panics while the map is held, so a poisoned map is still consistent.
        self.computing.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Frees the key when its leader finishes or is dropped.
struct Leading<'a, K: Eq + Hash + Clone, V: Clone> {
    flights: &'a SingleFlight<K, V>,
    key: K,
}

impl<K: Eq + Hash + Clone, V: Clone> Drop for Leading<'_, K, V> {
    fn drop(&mut self) {
        self.flights.lock().remove(&self.key);
    }
}

/// Counts a waiter out however its wait ends.
struct Waiting<'a> {
    count: &'a AtomicUsize,
    gauge: &'static str,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!(self.gauge).decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    const GAUGE: &str = "test_single_flight_waiting";

    /// Lets the spawned callers run until `reached` holds.
    async fn until(reached: impl Fn() -> bool) {
        while !reached() {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn concurrent_callers_of_one_key_share_one_computation() {
        let flights = Arc::new(SingleFlight::<u32, u32>::new(GAUGE));
        let computed = Arc::new(AtomicUsize::new(0));
        let (release, released) = tokio::sync::watch::channel(false);
        let call = |flights: Arc<SingleFlight<u32, u32>>| {
            let computed = Arc::clone(&computed);
            let mut released = released.clone();
            async move {
                flights
                    .run(7, || async move {
                        computed.fetch_add(1, Ordering::SeqCst);
                        let _ = released.wait_for(|r| *r).await;
                        42
                    })
                    .await
            }
        };
        let leader = tokio::spawn(call(Arc::clone(&flights)));
        until(|| flights.in_progress() == 1).await;
        let waiters: Vec<_> = (0..9).map(|_| tokio::spawn(call(Arc::clone(&flights)))).collect();
        until(|| flights.waiting() == 9).await;
        release.send_replace(true);
        assert_eq!(leader.await.unwrap(), Flight::Led(42));
        for waiter in waiters {
            assert_eq!(waiter.await.unwrap(), Flight::Shared(42));
        }
        assert_eq!(computed.load(Ordering::SeqCst), 1);
        assert_eq!((flights.in_progress(), flights.waiting()), (0, 0), "the key is freed");
        // A later call computes again: results are shared only while in progress.
        assert_eq!(flights.run(7, || async { 43 }).await, Flight::Led(43));
    }

    #[tokio::test]
    async fn a_dropped_leader_hands_over_to_a_waiter() {
        let flights = Arc::new(SingleFlight::<u32, u32>::new(GAUGE));
        let stuck = {
            let flights = Arc::clone(&flights);
            tokio::spawn(async move { flights.run(1, std::future::pending::<u32>).await })
        };
        until(|| flights.in_progress() == 1).await;
        let waiter = {
            let flights = Arc::clone(&flights);
            tokio::spawn(async move { flights.run(1, || async { 5 }).await })
        };
        until(|| flights.waiting() == 1).await;
        stuck.abort();
        assert_eq!(waiter.await.unwrap(), Flight::Led(5), "the waiter computed instead");
        assert_eq!((flights.in_progress(), flights.waiting()), (0, 0));
    }

    #[tokio::test]
    async fn different_keys_do_not_wait_for_each_other() {
        let flights = Arc::new(SingleFlight::<u32, u32>::new(GAUGE));
        let _stuck = {
            let flights = Arc::clone(&flights);
            tokio::spawn(async move { flights.run(1, std::future::pending::<u32>).await })
        };
        until(|| flights.in_progress() == 1).await;
        assert_eq!(flights.run(2, || async { 9 }).await, Flight::Led(9));
    }
}
