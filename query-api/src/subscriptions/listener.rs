//! Receives the projectors' change notices (`LISTEN` on the primary: notifications are not
//! replicated) and hands them to the hub. While the connection is down notices are lost, so
//! every (re)connection counts as "everything changed": no update is missed, at the cost of
//! one broad round.
//!
//! `LISTEN` needs a session of its own: behind PgBouncer in transaction mode it must bypass
//! the pooler, as the projectors' own `LISTEN` does.

use std::sync::Arc;
use std::time::Duration;

use read_models::changes::{CHANNEL, ChangeNotice};
use sqlx::PgPool;
use sqlx::postgres::PgListener;

use super::hub::Hub;
use super::metrics_names as m;

/// Listens until the hub closes, reconnecting with a growing pause (up to 5 s).
pub(crate) async fn listen_for_changes(hub: Arc<Hub>, primary: PgPool) {
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
