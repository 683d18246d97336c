//! What a projection batch changed, published with it: the owners and devices whose rows it
//! wrote and the log position it reached. The projector sends a [`ChangeNotice`] with
//! PostgreSQL `NOTIFY` inside the batch's transaction, so it is delivered when (and only if)
//! the batch commits; the query API listens and evaluates again only the live subscriptions
//! whose scope the notice touches.
//!
//! A notice names at most [`MAX_LISTED`] owners and devices together; a batch that touched
//! more says "everything in this projection" instead (`owners: None`), which keeps the
//! payload far below `NOTIFY`'s 8000-byte limit and costs listeners one broad evaluation.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::Projection;

/// The `NOTIFY` channel change notices are sent on.
pub const CHANNEL: &str = "cloudphone_read_model_changes";

/// Most owners plus devices a notice lists before it says "everything" (36-character ids:
/// about 4 KB of payload at most).
pub const MAX_LISTED: usize = 100;

/// The owners and devices a batch wrote rows of.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Touched {
    pub owners: BTreeSet<Uuid>,
    pub devices: BTreeSet<Uuid>,
}

impl Touched {
    pub fn is_empty(&self) -> bool {
        self.owners.is_empty() && self.devices.is_empty()
    }
}

/// One committed batch's changes as listeners receive them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeNotice {
    /// [`Projection::name`] of the projection written.
    #[serde(rename = "p")]
    pub projection: String,
    /// The last log position the batch applied.
    #[serde(rename = "at")]
    pub position: i64,
    /// The owners whose rows changed; `None` when too many to list (or a swap replaced every
    /// row): every owner may have changed.
    #[serde(rename = "o")]
    pub owners: Option<Vec<Uuid>>,
    /// The devices whose rows changed; `None` together with `owners`.
    #[serde(rename = "d")]
    pub devices: Option<Vec<Uuid>>,
}

impl ChangeNotice {
    /// The notice for a batch of `projection` that reached `position` and wrote `touched`.
    pub fn of_batch(projection: Projection, position: i64, touched: &Touched) -> Self {
        let listed = touched.owners.len() + touched.devices.len() <= MAX_LISTED;
        ChangeNotice {
            projection: projection.name().to_owned(),
            position,
            owners: listed.then(|| touched.owners.iter().copied().collect()),
            devices: listed.then(|| touched.devices.iter().copied().collect()),
        }
    }

    /// Every row of `projection` may have changed (a replay swapped its tables in).
    pub fn everything(projection: Projection, position: i64) -> Self {
        ChangeNotice {
            projection: projection.name().to_owned(),
            position,
            owners: None,
            devices: None,
        }
    }

    /// The notice from a `NOTIFY` payload; `None` for anything else (a foreign sender).
    pub fn parse(payload: &str) -> Option<Self> {
        serde_json::from_str(payload).ok()
    }
}

/// Sends `notice` on [`CHANNEL`] within the caller's transaction: listeners receive it when
/// the transaction commits, and never if it rolls back.
pub async fn publish(conn: &mut PgConnection, notice: &ChangeNotice) -> Result<(), sqlx::Error> {
    let payload = serde_json::to_string(notice).map_err(|error| sqlx::Error::Encode(Box::new(error)))?;
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(payload)
        .execute(conn)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_touching_many_rows_says_everything_and_stays_small() {
        let many = Touched {
            owners: (0..80).map(Uuid::from_u128).collect(),
            devices: (0..80).map(Uuid::from_u128).collect(),
        };
        let notice = ChangeNotice::of_batch(Projection::Fleet, 7, &many);
        assert_eq!((notice.owners.as_ref(), notice.devices.as_ref()), (None, None));

        let most = Touched {
            owners: (0..50).map(Uuid::from_u128).collect(),
            devices: (100..150).map(Uuid::from_u128).collect(),
        };
        let notice = ChangeNotice::of_batch(Projection::DailyUsage, 9, &most);
        let payload = serde_json::to_string(&notice).unwrap();
        assert!(payload.len() < 8000, "{} bytes", payload.len());
        assert_eq!(ChangeNotice::parse(&payload), Some(notice));
        assert_eq!(ChangeNotice::parse("not json"), None);
    }
}
