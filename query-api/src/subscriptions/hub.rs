//! The subscriptions' shared state: one [`Group`] per distinct question (same document,
//! operation, variables and caller scope), evaluated once for all its subscribers; the change
//! notices received since the last round; and the rounds that evaluate again the groups a
//! notice touched, at most once per group per interval.
//!
//! A group's answer is a `watch` value: a subscriber that has not sent the last answer yet
//! finds it replaced by the newest, so a slow client holds at most one answer, shared with
//! every other subscriber of the group.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Instant;

use axum::body::Bytes;
use futures::StreamExt;
use read_models::changes::ChangeNotice;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::LiveConfig;
use super::metrics_names as m;
use crate::cache::{CacheKey, CacheKeyParts, cache_key};
use crate::extract::Question;
use crate::graphql::handler::with_error_codes;
use crate::graphql::{Changes, Interest, ReadContext, Viewer};
use crate::reply::graphql_error;
use crate::sources::{Route, Source};
use crate::state::Inner;

/// What subscribers of a group receive.
#[derive(Debug, Clone)]
pub(crate) enum Answer {
    /// A GraphQL response (`data`, and `errors` if a field failed).
    Next {
        payload: Bytes,
        /// When the first notice this answer reflects arrived (none for a first answer).
        caused_at: Option<Instant>,
    },
    /// The document cannot run (validation, limits): errors, and the subscription ends.
    Refused(Bytes),
}

/// One distinct question and its subscribers.
#[derive(Debug)]
pub(crate) struct Group {
    key: CacheKey,
    question: Question,
    viewer: Viewer,
    /// Set by the first evaluation; until then any batch may change the answer.
    interest: OnceLock<Interest>,
    answer: watch::Sender<Option<Answer>>,
    /// Evaluations of a group run one at a time, so a later one never publishes an older
    /// snapshot over a newer one.
    evaluating: tokio::sync::Mutex<()>,
}

impl Group {
    fn interest(&self) -> Interest {
        self.interest.get().copied().unwrap_or(Interest::UNKNOWN)
    }
}

/// Every group, the changes waiting for a round, and the sockets.
#[derive(Debug)]
pub(crate) struct Hub {
    config: LiveConfig,
    groups: Mutex<HashMap<CacheKey, Arc<Group>>>,
    pending: Mutex<Pending>,
    wake: Notify,
    /// Cancelled when the API shuts down: every socket closes.
    pub(crate) closing: CancellationToken,
    /// The sockets' tasks, awaited at shutdown.
    pub(crate) sockets: TaskTracker,
    connections: Mutex<HashMap<String, usize>>,
    open_connections: AtomicUsize,
}

#[derive(Debug, Default)]
struct Pending {
    changes: Changes,
    /// When the oldest pending notice arrived.
    since: Option<Instant>,
    /// Groups whose last evaluation failed (a source down, a timeout): evaluated again in a
    /// later round whatever changes, so the change that caused it is not lost.
    retry: Vec<CacheKey>,
}

/// How long a group whose evaluation failed waits before it is tried again.
const RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// Why a socket may not open.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Full {
    #[error("this client has {0} subscription connections open, the most allowed; close one first")]
    Client(usize),
    #[error("the server has {0} subscription connections open, the most it takes; retry later")]
    Server(usize),
}

/// A socket's place in the counts, given back when dropped.
#[derive(Debug)]
pub(crate) struct ConnectionSlot {
    hub: Arc<Hub>,
    client: String,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut connections = self.hub.connections.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = connections.get_mut(&self.client) {
            *count -= 1;
            if *count == 0 {
                connections.remove(&self.client);
            }
        }
        let open = self.hub.open_connections.fetch_sub(1, Ordering::Relaxed) - 1;
        metrics::gauge!(m::CONNECTIONS).set(open as f64);
    }
}

impl Hub {
    pub(crate) fn new(config: LiveConfig) -> Self {
        Hub {
            config,
            groups: Mutex::new(HashMap::new()),
            pending: Mutex::new(Pending::default()),
            wake: Notify::new(),
            closing: CancellationToken::new(),
            sockets: TaskTracker::new(),
            connections: Mutex::new(HashMap::new()),
            open_connections: AtomicUsize::new(0),
        }
    }

    pub(crate) fn config(&self) -> &LiveConfig {
        &self.config
    }

    /// Takes a place for a socket of `client`, or says why there is none.
    pub(crate) fn open_connection(self: &Arc<Self>, client: &str) -> Result<ConnectionSlot, Full> {
        let mut connections = self.connections.lock().unwrap_or_else(PoisonError::into_inner);
        let open = self.open_connections.load(Ordering::Relaxed);
        if open >= self.config.max_connections {
            return Err(Full::Server(open));
        }
        let count = connections.entry(client.to_owned()).or_insert(0);
        if *count >= self.config.max_connections_per_client {
            return Err(Full::Client(*count));
        }
        *count += 1;
        let open = self.open_connections.fetch_add(1, Ordering::Relaxed) + 1;
        metrics::gauge!(m::CONNECTIONS).set(open as f64);
        Ok(ConnectionSlot {
            hub: Arc::clone(self),
            client: client.to_owned(),
        })
    }

    /// Whether the server takes another socket now (checked before the upgrade; the slot
    /// itself is taken once the caller is known).
    pub(crate) fn has_room(&self) -> bool {
        self.open_connections.load(Ordering::Relaxed) < self.config.max_connections
    }

    /// A batch committed: the groups it touches are evaluated in the next round.
    pub(crate) fn notice(&self, notice: &ChangeNotice) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        pending.changes.add(notice);
        pending.since.get_or_insert_with(Instant::now);
        drop(pending);
        self.wake.notify_one();
    }

    /// Notices may have been missed (the listener reconnected): evaluate every group.
    pub(crate) fn everything_changed(&self) {
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        pending.changes.merge(Changes::everything());
        pending.since.get_or_insert_with(Instant::now);
        drop(pending);
        self.wake.notify_one();
    }

    /// Subscribes to `question` as `viewer` asks it: joins the group asking the same, or
    /// starts one and evaluates its first answer. The receiver holds the group's answer
    /// (`None` until the first evaluation ends).
    pub(crate) async fn join(
        self: &Arc<Self>,
        state: &Inner,
        question: Question,
        viewer: Viewer,
    ) -> (Arc<Group>, watch::Receiver<Option<Answer>>) {
        let key = cache_key(&CacheKeyParts {
            normalized_query: &question.normalized,
            operation_name: question.operation_name.as_deref(),
            variables: &question.variables_key,
            scope: &viewer.cache_scope(),
            checkpoints: &[],
            versions: &[],
        });
        let (group, receiver, new) = {
            let mut groups = self.groups.lock().unwrap_or_else(PoisonError::into_inner);
            match groups.get(&key) {
                Some(group) => (Arc::clone(group), group.answer.subscribe(), false),
                None => {
                    let (answer, receiver) = watch::channel(None);
                    let group = Arc::new(Group {
                        key,
                        question,
                        viewer,
                        interest: OnceLock::new(),
                        answer,
                        evaluating: tokio::sync::Mutex::new(()),
                    });
                    groups.insert(key, Arc::clone(&group));
                    metrics::gauge!(m::GROUPS).set(groups.len() as f64);
                    (group, receiver, true)
                }
            }
        };
        // Counted up and down, not set: sockets join and leave concurrently, and a value set
        // from a racing count could stay wrong.
        metrics::gauge!(m::SUBSCRIPTIONS).increment(1.0);
        if new {
            // Registered before it reads: a batch committed from here on finds it. And read
            // where every batch committed so far is visible, so none falls in between.
            let route = state.sources.source_with_all_committed().await;
            if !evaluate(state, &group, &route, None).await {
                self.retry_later(group.key);
            }
        }
        (group, receiver)
    }

    /// Evaluates the group of `key` again in a round at least [`RETRY_AFTER`] from now.
    fn retry_later(self: &Arc<Self>, key: CacheKey) {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retry
            .push(key);
        let hub = Arc::clone(self);
        tokio::spawn(async move {
            tokio::select! {
                () = hub.closing.cancelled() => {}
                () = tokio::time::sleep(RETRY_AFTER) => hub.wake.notify_one(),
            }
        });
    }

    /// A subscriber left: the group goes when it was the last (its receiver must be
    /// dropped before).
    pub(crate) fn leave(&self, group: &Arc<Group>) {
        metrics::gauge!(m::SUBSCRIPTIONS).decrement(1.0);
        let mut groups = self.groups.lock().unwrap_or_else(PoisonError::into_inner);
        if group.answer.receiver_count() == 0 && groups.get(&group.key).is_some_and(|g| Arc::ptr_eq(g, group)) {
            groups.remove(&group.key);
            metrics::gauge!(m::GROUPS).set(groups.len() as f64);
        }
    }

    /// Evaluation rounds until the API closes: each waits for a change, then for the
    /// interval since the last round to pass (coalescing what arrives meanwhile), then
    /// evaluates the groups the changes touch on a source holding them.
    pub(crate) async fn run_rounds(self: Arc<Self>, state: Arc<Inner>) {
        let interval = self.config.evaluation_interval;
        let mut last_round: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                () = self.closing.cancelled() => return,
                () = self.wake.notified() => {}
            }
            if let Some(last) = last_round {
                tokio::select! {
                    () = self.closing.cancelled() => return,
                    () = tokio::time::sleep_until(last + interval) => {}
                }
            }
            last_round = Some(tokio::time::Instant::now());
            let Pending { changes, since, retry } =
                std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner));
            if changes.is_empty() && retry.is_empty() {
                continue;
            }
            let touched: Vec<Arc<Group>> = {
                let groups = self.groups.lock().unwrap_or_else(PoisonError::into_inner);
                groups
                    .values()
                    .filter(|group| changes.touch(group.interest()) || retry.contains(&group.key))
                    .cloned()
                    .collect()
            };
            metrics::counter!(m::ROUNDS_TOTAL).increment(1);
            if touched.is_empty() {
                continue;
            }
            let route = state.sources.source_with_all_committed().await;
            let failed: Vec<CacheKey> = futures::stream::iter(touched)
                .map(|group| {
                    let route = &route;
                    let state = &state;
                    async move { (!evaluate(state, &group, route, since).await).then_some(group.key) }
                })
                .buffer_unordered(self.config.evaluation_concurrency)
                .filter_map(|failed| async move { failed })
                .collect()
                .await;
            for key in failed {
                self.retry_later(key);
            }
        }
    }
}

/// Evaluates `group` on `route` and publishes the answer if it changed. A replica that fails
/// under it is reported and the evaluation runs again on the primary. False when it failed
/// (subscribers keep the last answer; the caller tries again later).
async fn evaluate(state: &Inner, group: &Arc<Group>, route: &Route, caused_at: Option<Instant>) -> bool {
    let _one_at_a_time = group.evaluating.lock().await;
    let mut evaluated = run_once(state, group, route).await;
    if let Evaluated::SourceFailed = evaluated
        && route.source != Source::Primary
    {
        state.sources.report_failure(&route.source);
        evaluated = run_once(state, group, &state.sources.primary_route()).await;
    }
    let answer = match evaluated {
        Evaluated::Answered { payload, interest } => {
            let _ = group.interest.set(interest.unwrap_or(Interest::Progress));
            Answer::Next { payload, caused_at }
        }
        Evaluated::Refused(payload) => Answer::Refused(payload),
        Evaluated::SourceFailed | Evaluated::Failed => {
            metrics::counter!(m::EVALUATIONS_TOTAL, "result" => "failed").increment(1);
            return false;
        }
    };
    let changed = group.answer.send_if_modified(|current| {
        let same = match (current.as_ref(), &answer) {
            (Some(Answer::Next { payload: old, .. }), Answer::Next { payload: new, .. }) => old == new,
            (Some(Answer::Refused(old)), Answer::Refused(new)) => old == new,
            _ => false,
        };
        if !same {
            *current = Some(answer);
        }
        !same
    });
    let result = if changed { "changed" } else { "unchanged" };
    metrics::counter!(m::EVALUATIONS_TOTAL, "result" => result).increment(1);
    true
}

enum Evaluated {
    Answered {
        payload: Bytes,
        interest: Option<Interest>,
    },
    /// The document cannot run: validation or limits. Nothing changes that by itself.
    Refused(Bytes),
    SourceFailed,
    /// Timed out or the executor stopped: try at the next change.
    Failed,
}

/// Runs the group's document once on the executor's threads, by the query timeout.
async fn run_once(state: &Inner, group: &Group, route: &Route) -> Evaluated {
    let read = Arc::new(ReadContext::new(group.viewer, route, state.config.limits));
    let request = group.question.request(Arc::clone(&read));
    let schema = state.schema.clone();
    let work = async move {
        let mut response = match schema.execute_stream(request).next().await {
            Some(response) => response,
            None => async_graphql::Response::from_errors(vec![graphql_error(
                "the subscription ended without an answer",
                "INTERNAL_SERVER_ERROR",
            )]),
        };
        with_error_codes(&mut response.errors);
        // No data at all: the request itself was refused (validation, a limit).
        let refused = response.data == async_graphql::Value::Null && !response.errors.is_empty();
        let payload = if refused {
            serde_json::to_vec(&response.errors)
        } else {
            serde_json::to_vec(&response)
        };
        (payload, refused)
    };
    let executed = tokio::time::timeout(state.config.query_timeout, state.executor.run(work)).await;
    let (payload, refused) = match executed {
        Ok(Ok((Ok(payload), refused))) => (Bytes::from(payload), refused),
        Ok(Ok((Err(error), _))) => {
            tracing::error!(%error, "cannot serialize a subscription's answer");
            return Evaluated::Failed;
        }
        Ok(Err(error)) => {
            tracing::error!(%error, "subscription evaluation failed");
            return Evaluated::Failed;
        }
        Err(_) => {
            tracing::warn!(timeout = ?state.config.query_timeout, "a subscription's evaluation timed out");
            return Evaluated::Failed;
        }
    };
    if read.source_failed() {
        return Evaluated::SourceFailed;
    }
    if refused {
        return Evaluated::Refused(payload);
    }
    Evaluated::Answered {
        payload,
        interest: read.interest(),
    }
}
