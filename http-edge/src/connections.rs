//! Serving HTTP/1.1 connections so that no client can hold the listener hostage, for both
//! APIs.
//!
//! - **Header read timeout**: a request's headers must arrive within it, counted from when
//!   the connection is ready for a request (hyper's clock), so sockets that trickle header
//!   lines are closed.
//! - **Keep-alive timeout**: a connection with no request in flight and no bytes moving for
//!   this long is closed.
//! - **Body read timeout**: see [`crate::body`]; a body that stalls is the client's fault, 408.
//! - **A connection limit per listener**: at the limit, the connection that has waited longest
//!   (at least a second) without sending a complete request head is closed to make room, so
//!   sockets that trickle headers cannot keep clients that send whole requests out; when no
//!   connection is waiting like that, the new one gets a 503 problem document with
//!   `Connection: close` and is closed at once, so it costs a file descriptor for
//!   microseconds, never the whole process's supply.
//! - **Metrics**: open connections, accepted and refused ones, per listener.
//! - **Graceful shutdown**: stop accepting, close idle connections, finish answering the rest.
//!
//! [`raise_open_files_limit`] lifts the process's soft file-descriptor limit at start, and the
//! default connection limit is derived from what that gives.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

/// Names of the connection metrics (label `listener`: `command`, `query`, ...).
pub mod metrics_names {
    /// Gauge: connections open now.
    pub const OPEN: &str = "cloudphone_http_connections_open";
    /// Counter: connections accepted and served.
    pub const ACCEPTED_TOTAL: &str = "cloudphone_http_connections_accepted_total";
    /// Counter: connections refused because the listener was at its limit.
    pub const REFUSED_TOTAL: &str = "cloudphone_http_connections_refused_total";
    /// Counter: connections closed for idling past the keep-alive timeout.
    pub const IDLE_CLOSED_TOTAL: &str = "cloudphone_http_connections_idle_closed_total";
    /// Counter: connections closed at the limit to make room, for having sent no complete
    /// request head for a second or more.
    pub const EVICTED_TOTAL: &str = "cloudphone_http_connections_evicted_total";
}
use metrics_names as m;

/// How a listener treats its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections open at once; more are refused.
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub keep_alive_timeout: Duration,
    /// Longest a request body may take to arrive once its headers have.
    pub body_read_timeout: Duration,
    /// The kernel send buffer of each connection (`SO_SNDBUF`; Linux doubles it), or `None`
    /// for the kernel's autotuning, which grows it to `net.ipv4.tcp_wmem`'s maximum (4 MiB
    /// by default). A client that stops reading holds at most this much of the server's
    /// memory in the kernel, and a subscription socket's writes stall (and the client is
    /// closed as too slow) once it is full; a larger answer is still written whole, as the
    /// client reads.
    pub send_buffer_bytes: Option<usize>,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: default_max_connections(),
            header_read_timeout: Duration::from_secs(10),
            keep_alive_timeout: Duration::from_secs(5),
            body_read_timeout: Duration::from_secs(10),
            send_buffer_bytes: Some(DEFAULT_SEND_BUFFER_BYTES),
        }
    }
}

/// 256 KiB: a page of 100 devices is about 35 KB, so any dashboard answer goes out in one
/// write, and 20 000 stalled sockets hold at most 10 GiB of kernel memory rather than 80.
pub const DEFAULT_SEND_BUFFER_BYTES: usize = 256 * 1024;

/// File descriptors kept for everything but client connections (database pools, the broker,
/// files, the other listener's share is taken out separately).
const RESERVED_DESCRIPTORS: u64 = 1_024;

/// The default limit per listener: at most 30 000, and at most half of what the soft
/// file-descriptor limit leaves after [`RESERVED_DESCRIPTORS`] (two listeners share a process
/// in `serve`).
pub fn default_max_connections() -> usize {
    let soft = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1_024, |(soft, _)| soft);
    let share = soft.saturating_sub(RESERVED_DESCRIPTORS) / 2;
    usize::try_from(share.clamp(64, 30_000)).unwrap_or(30_000)
}

/// Raises the soft limit of open files as far as allowed: to `wanted` when the process may
/// raise its hard limit (root), else to the hard limit. Returns the soft limit in force.
pub fn raise_open_files_limit(wanted: u64) -> u64 {
    use rlimit::Resource;
    let Ok((soft, hard)) = rlimit::getrlimit(Resource::NOFILE) else {
        return 1_024;
    };
    if soft >= wanted {
        return soft;
    }
    if hard < wanted && rlimit::setrlimit(Resource::NOFILE, wanted, wanted).is_ok() {
        return wanted;
    }
    let target = wanted.min(hard);
    if rlimit::setrlimit(Resource::NOFILE, target, hard).is_ok() {
        target
    } else {
        soft
    }
}

/// Binds `addr` with a listen backlog of 4096, so bursts of connections queue in the kernel
/// instead of being reset.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4_096)
}

/// Serves `router` on `listener` until `shutdown` resolves, then stops accepting, closes idle
/// connections and waits for the others to finish their requests.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    name: &'static str,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let open = Arc::new(AtomicUsize::new(0));
    let mut tracked = Connections::default();
    let closing = CancellationToken::new();
    let tasks = tokio_util::task::TaskTracker::new();
    metrics::gauge!(m::OPEN, "listener" => name).set(0.0);
    for counter in [
        m::ACCEPTED_TOTAL,
        m::REFUSED_TOTAL,
        m::IDLE_CLOSED_TOTAL,
        m::EVICTED_TOTAL,
    ] {
        metrics::counter!(counter, "listener" => name).increment(0);
    }
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of descriptors, or a connection reset before it was accepted: keep
                    // serving the connections we have, and try again shortly.
                    tracing::warn!(%error, listener = name, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        if open.load(Ordering::Relaxed) >= limits.max_connections {
            if tracked.evict_one() {
                metrics::counter!(m::EVICTED_TOTAL, "listener" => name).increment(1);
            } else {
                metrics::counter!(m::REFUSED_TOTAL, "listener" => name).increment(1);
                tasks.spawn(refuse(stream));
                continue;
            }
        }
        let _ = stream.set_nodelay(true);
        if let Some(bytes) = limits.send_buffer_bytes
            && let Err(error) = socket2::SockRef::from(&stream).set_send_buffer_size(bytes)
        {
            tracing::debug!(%error, bytes, "cannot set a connection's send buffer; the kernel's stays");
        }
        metrics::counter!(m::ACCEPTED_TOTAL, "listener" => name).increment(1);
        let connection = Arc::new(Tracked {
            activity: Activity::new(),
            evict: CancellationToken::new(),
            place: OpenConnection::new(Arc::clone(&open), name),
        });
        tracked.push(Arc::clone(&connection), limits.max_connections);
        tasks.spawn(serve_connection(
            stream,
            peer,
            router.clone(),
            limits,
            closing.clone(),
            connection,
        ));
    }
    drop(listener);
    closing.cancel();
    tasks.close();
    tasks.wait().await;
    Ok(())
}

/// A served connection as the accept loop sees it.
struct Tracked {
    activity: Arc<Activity>,
    /// Cancelled to close the connection at once, to make room for a new one.
    evict: CancellationToken,
    /// Its place in the listener's count, given up when it is evicted or ends, whichever
    /// comes first (an evicted connection's task may run a little later, under load).
    place: OpenConnection,
}

/// The listener's connections in the order they were accepted (finished ones are dropped as
/// they are met).
#[derive(Default)]
struct Connections {
    queue: std::collections::VecDeque<Arc<Tracked>>,
}

/// How long a connection must have gone without a complete request head to be closed for a
/// new one.
const EVICTABLE_AFTER: Duration = Duration::from_secs(1);

impl Connections {
    fn push(&mut self, connection: Arc<Tracked>, limit: usize) {
        // Below the limit nothing is evicted, so finished connections pile up unless dropped.
        if self.queue.len() >= limit.saturating_mul(2).max(64) {
            self.queue.retain(|c| !c.activity.finished.load(Ordering::Relaxed));
        }
        self.queue.push_back(connection);
    }

    /// Closes the oldest connection that is waiting for a request head (looking at a bounded
    /// number); true when one was closed.
    fn evict_one(&mut self) -> bool {
        // Finished connections are dropped as they are met and do not count against the look.
        let mut looked = 0;
        while looked < self.queue.len().min(256) {
            let Some(connection) = self.queue.pop_front() else {
                return false;
            };
            if connection.activity.finished.load(Ordering::Relaxed) {
                continue;
            }
            looked += 1;
            if connection.activity.waiting_for_head() >= EVICTABLE_AFTER {
                connection.evict.cancel();
                connection.place.release();
                return true;
            }
            // Busy: it keeps its place, at the back.
            self.queue.push_back(connection);
        }
        false
    }
}

/// Counts a connection open until it is released (once).
struct OpenConnection {
    open: Arc<AtomicUsize>,
    name: &'static str,
    counted: std::sync::atomic::AtomicBool,
}

impl OpenConnection {
    fn new(open: Arc<AtomicUsize>, name: &'static str) -> Self {
        let now = open.fetch_add(1, Ordering::Relaxed) + 1;
        metrics::gauge!(m::OPEN, "listener" => name).set(now as f64);
        OpenConnection {
            open,
            name,
            counted: std::sync::atomic::AtomicBool::new(true),
        }
    }

    fn release(&self) {
        if self.counted.swap(false, Ordering::Relaxed) {
            let now = self.open.fetch_sub(1, Ordering::Relaxed).saturating_sub(1);
            metrics::gauge!(m::OPEN, "listener" => self.name).set(now as f64);
        }
    }
}

/// The answer to a connection over the limit: written at once (it fits any socket buffer),
/// then the connection is closed.
static REFUSAL: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
    let body = serde_json::json!({
        "type": "https://cloudphone.dev/problems/too-many-connections",
        "title": "Service Unavailable",
        "status": 503,
        "detail": "this listener is at its connection limit; retry later",
        "code": "too_many_connections",
    })
    .to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\nretry-after: 1\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
});

async fn refuse(mut stream: TcpStream) {
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(&REFUSAL).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    limits: ConnectionLimits,
    closing: CancellationToken,
    tracked: Arc<Tracked>,
) {
    let activity = Arc::clone(&tracked.activity);
    let io = TokioIo::new(Watched {
        inner: stream,
        activity: Arc::clone(&activity),
    });
    let in_flight = Arc::clone(&activity);
    let service = router.map_request(move |mut request: axum::http::Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        request
    });
    let service = InFlight {
        inner: service,
        activity: in_flight,
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    // Upgrades (WebSocket subscriptions) leave this loop once switched: the upgraded socket
    // is its handler's to serve, limit and close.
    let connection = builder
        .serve_connection(io, TowerToHyperService::new(service))
        .with_upgrades();
    tokio::pin!(connection);
    // Wakes when the connection would have idled a whole timeout if no byte moved since it
    // was last checked; bytes that moved push the next check back. One timer per connection
    // and at most one wakeup per timeout: thousands of open connections cost little.
    let timeout = limits.keep_alive_timeout.max(Duration::from_millis(100));
    let idle_check = tokio::time::sleep(timeout);
    tokio::pin!(idle_check);
    let mut shutting_down = false;
    // When the connection was asked to close for idling: one whose response is stuck (its
    // client stopped reading) would never finish closing gracefully, so it is dropped a
    // timeout later if still no byte moved.
    let mut closing_idle: Option<Instant> = None;
    loop {
        tokio::select! {
            served = connection.as_mut() => {
                if let Err(error) = served {
                    tracing::debug!(%error, %peer, "connection ended with an error");
                }
                break;
            }
            () = tracked.evict.cancelled() => break,
            () = closing.cancelled(), if !shutting_down => {
                shutting_down = true;
                connection.as_mut().graceful_shutdown();
            }
            () = idle_check.as_mut(), if !shutting_down || closing_idle.is_some() => {
                let idle = activity.idle_for();
                match closing_idle {
                    None if idle >= timeout => {
                        shutting_down = true;
                        closing_idle = Some(Instant::now());
                        metrics::counter!(m::IDLE_CLOSED_TOTAL, "listener" => tracked.place.name).increment(1);
                        connection.as_mut().graceful_shutdown();
                    }
                    Some(since) if since.elapsed() >= timeout && idle >= timeout => break,
                    _ => {}
                }
                // Next: a whole timeout after the last byte (or from now, while a request is
                // being handled or the graceful close is under way).
                let wait = match closing_idle {
                    None => timeout.saturating_sub(idle).max(Duration::from_millis(10)),
                    Some(_) => timeout,
                };
                idle_check.as_mut().reset(tokio::time::Instant::now() + wait);
            }
        }
    }
    activity.finished.store(true, Ordering::Relaxed);
    tracked.place.release();
}

/// When a connection last moved bytes, and how many of its requests are being handled.
struct Activity {
    started: Instant,
    last_millis: AtomicU64,
    requests: AtomicUsize,
    /// When the connection last became ready for a request head (accepted, or its last
    /// request answered), in milliseconds since `started`.
    ready_millis: AtomicU64,
    finished: std::sync::atomic::AtomicBool,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Activity {
            started: Instant::now(),
            last_millis: AtomicU64::new(0),
            requests: AtomicUsize::new(0),
            ready_millis: AtomicU64::new(0),
            finished: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn now_millis(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn touch(&self) {
        self.last_millis.store(self.now_millis(), Ordering::Relaxed);
    }

    /// How long the connection has been ready for a request head without completing one:
    /// zero while a request is being handled.
    fn waiting_for_head(&self) -> Duration {
        if self.requests.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        let ready = self.ready_millis.load(Ordering::Relaxed);
        Duration::from_millis(self.now_millis().saturating_sub(ready))
    }

    /// How long the connection has been idle: zero while a request is being handled.
    fn idle_for(&self) -> Duration {
        if self.requests.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        let last = Duration::from_millis(self.last_millis.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }
}

/// A stream that records when bytes last moved.
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Counts requests being handled on a connection (a slow handler is not an idle connection).
#[derive(Clone)]
struct InFlight<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S, B> tower::Service<axum::http::Request<B>> for InFlight<S>
where
    S: tower::Service<axum::http::Request<B>, Error = Infallible> + Send,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
{
    type Response = S::Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<S::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: axum::http::Request<B>) -> Self::Future {
        struct Handling(Arc<Activity>);
        impl Drop for Handling {
            fn drop(&mut self) {
                self.0.requests.fetch_sub(1, Ordering::Relaxed);
                self.0.ready_millis.store(self.0.now_millis(), Ordering::Relaxed);
                self.0.touch();
            }
        }
        self.activity.requests.fetch_add(1, Ordering::Relaxed);
        let handling = Handling(Arc::clone(&self.activity));
        let future = self.inner.call(request);
        Box::pin(async move {
            let _handling = handling;
            future.await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusal_is_a_complete_problem_document() {
        let text = std::str::from_utf8(&REFUSAL).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(length, body.len());
        let problem: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(problem["status"], 503);
        assert_eq!(problem["code"], "too_many_connections");
    }

    #[test]
    fn the_default_limit_fits_the_descriptors() {
        let limit = default_max_connections();
        assert!((64..=30_000).contains(&limit));
    }
}
