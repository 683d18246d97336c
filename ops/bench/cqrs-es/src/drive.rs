//! Runs one phase: C writer tasks, each executing its planned commands one after another,
//! started together behind a barrier; per-command latency from call to return.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use tokio::sync::Barrier;

use crate::workload::{Plan, Step};

/// A writer executes one command: decide and append one event to its aggregate. Returns
/// how many optimistic-concurrency conflicts it retried on the way.
pub trait Writer: Send + 'static {
    fn execute(&mut self, step: Step) -> impl Future<Output = anyhow::Result<u64>> + Send;
}

/// What a phase measured.
#[derive(Debug)]
pub struct Measured {
    pub events: u64,
    pub seconds: f64,
    /// Microseconds per command.
    pub latency: Histogram<u64>,
    pub conflicts: u64,
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, 120_000_000, 3).context("histogram bounds")
}

/// Runs `writers[i]` over `plan.writers[i]`, all at once.
pub async fn drive<W: Writer>(plan: &Arc<Plan>, writers: Vec<W>) -> anyhow::Result<Measured> {
    anyhow::ensure!(writers.len() == plan.writers.len(), "one writer per planned writer");
    let barrier = Arc::new(Barrier::new(writers.len() + 1));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(writers.len());
    for (index, mut writer) in writers.into_iter().enumerate() {
        let (plan, barrier, done) = (Arc::clone(plan), Arc::clone(&barrier), Arc::clone(&done));
        tasks.push(tokio::spawn(async move {
            let mut latency = histogram()?;
            let mut conflicts = 0;
            barrier.wait().await;
            for step in &plan.writers[index] {
                let started = Instant::now();
                conflicts += writer.execute(*step).await?;
                latency.saturating_record(started.elapsed().as_micros() as u64);
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok((latency, conflicts))
        }));
    }
    let total = plan.events;
    let ticker = {
        let done = Arc::clone(&done);
        tokio::spawn(async move {
            let started = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let n = done.load(Ordering::Relaxed);
                eprintln!(
                    "    {n:>9} / {total} events, {:.0} events/s so far",
                    n as f64 / started.elapsed().as_secs_f64()
                );
            }
        })
    };
    barrier.wait().await;
    let started = Instant::now();
    let mut latency = histogram()?;
    let mut conflicts = 0;
    let mut failure = None;
    for task in tasks {
        match task.await.context("writer task panicked")? {
            Ok((histogram, retried)) => {
                latency.add(histogram).context("merge latency")?;
                conflicts += retried;
            }
            Err(error) => failure = failure.or(Some(error)),
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    ticker.abort();
    if let Some(error) = failure {
        return Err(error.context("a writer failed"));
    }
    Ok(Measured {
        events: latency.len(),
        seconds,
        latency,
        conflicts,
    })
}
