//! A TCP proxy between the roles and PostgreSQL that the fault schedule controls: one listener
//! (a link) per role, each passing bytes, cut (every open connection closed, new ones closed
//! as soon as accepted) or blackholed (connections accepted, nothing forwarded either way,
//! so clients hang until their own timeouts; what was sent meanwhile is delivered on heal,
//! as TCP retransmits across a healed partition).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What a link does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Pass,
    Cut,
    Blackhole,
}

/// Connections a link has carried and closed on purpose.
#[derive(Debug, Default, Serialize)]
pub struct LinkStats {
    pub accepted: u64,
    pub cut: u64,
}

#[derive(Debug)]
struct Link {
    address: SocketAddr,
    mode: watch::Sender<Mode>,
    accepted: Arc<AtomicU64>,
    cut: Arc<AtomicU64>,
}

/// The proxy: named links to one upstream, stopped with its token.
#[derive(Debug)]
pub struct Proxy {
    links: BTreeMap<String, Link>,
}

impl Proxy {
    /// Listens on a free loopback port for each name, forwarding to `upstream`.
    pub async fn start(upstream: SocketAddr, names: &[&str], stop: &CancellationToken) -> anyhow::Result<Self> {
        let mut links = BTreeMap::new();
        for name in names {
            let listener = TcpListener::bind("127.0.0.1:0")
                .await
                .context("bind a proxy listener")?;
            let address = listener.local_addr()?;
            let (mode, _) = watch::channel(Mode::Pass);
            let link = Link {
                address,
                mode,
                accepted: Arc::default(),
                cut: Arc::default(),
            };
            tokio::spawn(accept(
                listener,
                upstream,
                link.mode.clone(),
                Arc::clone(&link.accepted),
                Arc::clone(&link.cut),
                stop.clone(),
            ));
            links.insert((*name).to_owned(), link);
        }
        Ok(Proxy { links })
    }

    /// Where the role `name` connects.
    pub fn address(&self, name: &str) -> Option<SocketAddr> {
        self.links.get(name).map(|link| link.address)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.links.keys().map(String::as_str)
    }

    /// Sets the mode of one link, or of every link with `None`.
    pub fn set(&self, name: Option<&str>, mode: Mode) {
        for (link_name, link) in &self.links {
            if name.is_none_or(|n| n == link_name) {
                link.mode.send_replace(mode);
            }
        }
    }

    pub fn stats(&self) -> BTreeMap<String, LinkStats> {
        self.links
            .iter()
            .map(|(name, link)| {
                let stats = LinkStats {
                    accepted: link.accepted.load(Ordering::Relaxed),
                    cut: link.cut.load(Ordering::Relaxed),
                };
                (name.clone(), stats)
            })
            .collect()
    }
}

async fn accept(
    listener: TcpListener,
    upstream: SocketAddr,
    mode: watch::Sender<Mode>,
    accepted: Arc<AtomicU64>,
    cut: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    loop {
        let socket = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((socket, _)) => socket,
                Err(error) => {
                    tracing::warn!(%error, "proxy accept failed");
                    continue;
                }
            },
        };
        accepted.fetch_add(1, Ordering::Relaxed);
        let (mode, cut, stop) = (mode.subscribe(), Arc::clone(&cut), stop.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = stop.cancelled() => {}
                () = connection(socket, upstream, mode, &cut) => {}
            }
        });
    }
}

/// The link was cut.
struct Cut;

/// Returns once the link passes traffic; `Err` when it is cut (or the proxy is gone). While
/// it is blackholed, waits.
async fn passing(mode: &mut watch::Receiver<Mode>) -> Result<(), Cut> {
    loop {
        match *mode.borrow_and_update() {
            Mode::Pass => return Ok(()),
            Mode::Cut => return Err(Cut),
            Mode::Blackhole => {}
        }
        mode.changed().await.map_err(|_| Cut)?;
    }
}

async fn until_cut(mut mode: watch::Receiver<Mode>) {
    loop {
        if *mode.borrow_and_update() == Mode::Cut {
            return;
        }
        if mode.changed().await.is_err() {
            return;
        }
    }
}

/// Carries one client connection; counts it in `cut` when the link's cut ends it (just after
/// its sockets close).
async fn connection(client: TcpStream, upstream: SocketAddr, mut mode: watch::Receiver<Mode>, cut: &AtomicU64) {
    // A new connection waits out a blackhole (the client's connect timeout decides), and is
    // closed at once on a cut link.
    if passing(&mut mode).await.is_err() {
        cut.fetch_add(1, Ordering::Relaxed);
        return;
    }
    // PostgreSQL down: the client sees its connection closed, as a refused one.
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let both = async {
        tokio::join!(
            pump(client_read, server_write, mode.clone()),
            pump(server_read, client_write, mode.clone())
        )
    };
    // A cut ends both pumps too (each returns `Err(Cut)`), so either branch may see it first.
    let by_cut = tokio::select! {
        (to_server, to_client) = both => to_server.is_err() || to_client.is_err(),
        () = until_cut(mode.clone()) => true,
    };
    if by_cut {
        cut.fetch_add(1, Ordering::Relaxed);
    }
}

/// Copies one direction while the link passes; holds what it read during a blackhole until
/// the link heals.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    mut mode: watch::Receiver<Mode>,
) -> Result<(), Cut> {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        passing(&mut mode).await?;
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            changed = mode.changed() => {
                changed.map_err(|_| Cut)?;
                continue;
            }
        };
        let n = match read {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return Ok(());
            }
            Ok(n) => n,
        };
        passing(&mut mode).await?;
        if to.write_all(&buffer[..n]).await.is_err() {
            return Ok(());
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// An echo server on a free port.
    async fn echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = socket.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        address
    }

    async fn round_trip(stream: &mut TcpStream, text: &[u8]) -> std::io::Result<Vec<u8>> {
        stream.write_all(text).await?;
        let mut answer = vec![0u8; text.len()];
        stream.read_exact(&mut answer).await?;
        Ok(answer)
    }

    #[tokio::test]
    async fn a_link_passes_cuts_blackholes_and_heals() {
        let stop = CancellationToken::new();
        let proxy = Proxy::start(echo().await, &["role"], &stop).await.unwrap();
        let address = proxy.address("role").unwrap();
        let mut stream = TcpStream::connect(address).await.unwrap();
        assert_eq!(round_trip(&mut stream, b"hello").await.unwrap(), b"hello");

        // Blackholed: nothing comes back; on heal, what was sent arrives.
        proxy.set(None, Mode::Blackhole);
        stream.write_all(b"held").await.unwrap();
        let mut answer = [0u8; 4];
        let waited = tokio::time::timeout(Duration::from_millis(300), stream.read_exact(&mut answer)).await;
        assert!(waited.is_err(), "a blackholed link answered");
        proxy.set(Some("role"), Mode::Pass);
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut answer))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&answer, b"held");

        // Cut: the open connection is closed, a new one too.
        proxy.set(Some("role"), Mode::Cut);
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
        assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
        let mut fresh = TcpStream::connect(address).await.unwrap();
        assert!(round_trip(&mut fresh, b"x").await.is_err());

        proxy.set(None, Mode::Pass);
        let mut healed = TcpStream::connect(address).await.unwrap();
        assert_eq!(round_trip(&mut healed, b"again").await.unwrap(), b"again");
        // Counted as the proxy's tasks end, which may be just after the client saw the close.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let stats = proxy.stats();
            if (stats["role"].accepted, stats["role"].cut) == (3, 2) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "accepted {}, cut {}",
                stats["role"].accepted,
                stats["role"].cut
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.cancel();
    }
}
