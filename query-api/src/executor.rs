//! Where GraphQL documents are validated and executed: a runtime of the query API's own.
//!
//! Validating and executing a document is CPU work that does not yield while it runs. On the
//! process's main runtime a burst of expensive documents would occupy every worker thread,
//! and in `cloudphone serve` the command API, health checks and projectors share those
//! threads. Here that work runs on threads of its own, with a lower scheduling priority (a
//! nice value): the operating system gives the main runtime's threads the CPU first when both
//! want it, so a flood of documents slows dashboards, never health checks, portal commands or
//! projections. The query API's connections are served on these threads too, so the
//! HTTP work of a flood (reading bodies, writing refusals) is theirs as well. A bounded number
//! of executions run at once; the rest wait, and the wait counts against the query's time
//! limit.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::Semaphore;

/// Why an execution did not run to the end.
#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    #[error("the GraphQL executor has shut down")]
    Stopped,
    #[error("the GraphQL execution panicked")]
    Panicked,
}

/// A dedicated multi-threaded runtime with a limit on executions in flight.
pub struct Executor {
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    permits: Arc<Semaphore>,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("available", &self.permits.available_permits())
            .finish_non_exhaustive()
    }
}

impl Executor {
    /// `threads` worker threads (at least one) at nice value `nice` (0: the process's own),
    /// at most `in_flight` executions at once.
    pub fn new(threads: usize, in_flight: usize, nice: i32) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("graphql")
            .on_thread_start(move || {
                if nice != 0 {
                    // On Linux a nice value is a thread's own; a failure (a system that does not
                    // allow it) leaves the thread at the process's priority.
                    let thread = rustix::thread::gettid();
                    if let Err(error) = rustix::process::setpriority_process(Some(thread), nice) {
                        tracing::warn!(%error, nice, "cannot lower the GraphQL threads' priority");
                    }
                }
            })
            .enable_all()
            .build()?;
        Ok(Executor {
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
            permits: Arc::new(Semaphore::new(in_flight.max(1))),
        })
    }

    /// Threads as many as the machine has cores, and eight executions per thread.
    pub fn for_this_machine(nice: i32) -> std::io::Result<Self> {
        let threads = std::thread::available_parallelism().map_or(2, usize::from);
        Self::new(threads, threads * 8, nice)
    }

    /// Runs `task` on the executor's threads, outside the limit on executions (the query API's
    /// listener: reading requests and writing answers for a flood of documents is work of
    /// the same kind, and no other role's threads should do it).
    pub fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(task)
    }

    /// Runs `work` on the executor's threads once a slot is free. Dropping the returned
    /// future (a time limit) abandons the wait, or stops the work at its next await.
    pub async fn run<F, T>(&self, work: F) -> Result<T, ExecutorError>
    where
        F: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let permit = Arc::clone(&self.permits)
            .acquire_owned()
            .await
            .map_err(|_| ExecutorError::Stopped)?;
        let task = self.handle.spawn(async move {
            let _permit = permit;
            work.await
        });
        // Dropped with the caller: abort the task so a timed-out query stops using the CPU
        // (aborting a finished task does nothing).
        let _abort = AbortOnDrop(task.abort_handle());
        task.await.map_err(|error| {
            if error.is_panic() {
                ExecutorError::Panicked
            } else {
                ExecutorError::Stopped
            }
        })
    }
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        // A runtime may not be dropped where blocking is not allowed (inside another runtime):
        // let its threads finish in the background.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn cpu_work_on_the_executor_leaves_the_callers_runtime_free() {
        let executor = Arc::new(Executor::new(1, 4, 0).unwrap());
        // Busy the executor's only thread for 300 ms without yielding.
        let busy = tokio::spawn({
            let executor = Arc::clone(&executor);
            async move {
                executor
                    .run(async {
                        let until = Instant::now() + Duration::from_millis(300);
                        while Instant::now() < until {
                            std::hint::spin_loop();
                        }
                    })
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        // The caller's single worker still answers at once.
        let started = Instant::now();
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "{:?}",
            started.elapsed()
        );
        busy.await.unwrap().unwrap();
        assert_eq!(executor.run(async { 7 }).await.unwrap(), 7);
    }

    #[tokio::test]
    async fn a_dropped_run_stops_its_work_and_frees_its_slot() {
        let executor = Executor::new(1, 1, 0).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let waiting = executor.run(async move {
            let _keep = tx;
            std::future::pending::<()>().await;
        });
        assert!(tokio::time::timeout(Duration::from_millis(50), waiting).await.is_err());
        // The task was aborted: its sender is gone.
        assert!(rx.await.is_err());
        assert_eq!(executor.run(async { 1 }).await.unwrap(), 1);
    }
}
