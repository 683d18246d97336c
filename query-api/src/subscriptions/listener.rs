//! Receives the projectors' change notices (`LISTEN` on the primary: notifications are not
//! replicated) and hands them to the hub. While the connection is down notices are lost, so
//! every (re)connection counts as "everything changed": no update is missed, at the cost of
//! one broad round.
//!
//! `LISTEN` needs a session of its own. Behind PgBouncer in transaction mode no notification
//! arrives, so there the projections' checkpoints are polled instead
//! ([`ChangeFeed::PollCheckpoints`]): a moved checkpoint counts as "everything of that
//! projection changed".

use std::sync::Arc;
use std::time::Duration;

use read_models::Projection;
use read_models::changes::{CHANNEL, ChangeNotice};
use sqlx::PgPool;
use sqlx::postgres::PgListener;

use super::ChangeFeed;
use super::hub::Hub;
use super::metrics_names as m;
use crate::sources::{Checkpoints, checkpoints};

/// Tells the hub what the projections wrote until it closes, as its configuration says.
pub(crate) async fn follow_changes(hub: Arc<Hub>, primary: PgPool) {
    match hub.config().change_feed {
        ChangeFeed::Listen => listen_for_changes(hub, primary).await,
        ChangeFeed::PollCheckpoints(interval) => poll_checkpoints(hub, primary, interval).await,
    }
}

/// Reads the checkpoints every `interval` until the hub closes; a projection whose position
/// or live version moved is noticed as changed for every owner. The first read, and the
/// first after a failed one, count as "everything changed" (as a reconnected listener does).
async fn poll_checkpoints(hub: Arc<Hub>, primary: PgPool, interval: std::time::Duration) {
    let mut last: Option<Checkpoints> = None;
    loop {
        match checkpoints(&primary).await {
            Ok(now) => {
                metrics::gauge!(m::LISTENING).set(1.0);
                match &last {
                    None => hub.everything_changed(),
                    Some(before) => {
                        for (index, projection) in Projection::ALL.iter().enumerate() {
                            let moved = before.positions.get(index) != now.positions.get(index)
                                || before.versions.get(index) != now.versions.get(index);
                            if moved {
                                hub.notice(&ChangeNotice {
                                    projection: projection.name().to_owned(),
                                    position: now.positions.get(index).copied().unwrap_or_default(),
                                    owners: None,
                                    devices: None,
                                });
                            }
                        }
                    }
                }
                last = Some(now);
            }
            Err(error) => {
                metrics::gauge!(m::LISTENING).set(0.0);
                tracing::warn!(%error, "cannot read the projections' checkpoints; retrying");
                last = None;
            }
        }
        tokio::select! {
            () = hub.closing.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}

/// Listens until the hub closes, reconnecting with a growing pause (up to 5 s).
async fn listen_for_changes(hub: Arc<Hub>, primary: PgPool) {
    let mut pause = Duration::from_millis(100);
    loop {
        let listener = tokio::select! {
            () = hub.closing.cancelled() => return,
            listener = connect(&primary) => listener,
        };
        match listener {
            Ok(mut listener) => {
                pause = Duration::from_millis(100);
                metrics::gauge!(m::LISTENING).set(1.0);
                hub.everything_changed();
                loop {
                    let received = tokio::select! {
                        () = hub.closing.cancelled() => return,
                        received = listener.try_recv() => received,
                    };
                    match received {
                        Ok(Some(notification)) => match ChangeNotice::parse(notification.payload()) {
                            Some(notice) => hub.notice(&notice),
                            None => {
                                tracing::warn!(payload = notification.payload(), "ignored a malformed change notice")
                            }
                        },
                        // The connection was lost: connect afresh, and count everything as
                        // changed once listening again.
                        Ok(None) => {
                            tracing::warn!("change notice connection lost; reconnecting");
                            break;
                        }
                        Err(error) => {
                            tracing::warn!(%error, "change notice listener failed; reconnecting");
                            break;
                        }
                    }
                }
            }
            Err(error) => tracing::warn!(%error, ?pause, "cannot listen for change notices; retrying"),
        }
        metrics::gauge!(m::LISTENING).set(0.0);
        tokio::select! {
            () = hub.closing.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

async fn connect(primary: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(primary).await?;
    listener.listen(CHANNEL).await?;
    Ok(listener)
}
