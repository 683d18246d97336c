//! A projector older than the events it reads, for the dead-letter tests: the log's events
//! are real and current, and the chosen ones are shown to the real `apply_events` as a schema
//! version from the future, which is exactly what a projector older than the command API
//! saw: it parks them.

use event_log::LogReader;
use projections::apply::apply_events;
use projections::checkpoint::{self, ProjectionCheckpoint};
use read_models::Projection;
use sqlx::PgPool;

/// Projects the log up to its head as a projector that did not know the schema version of
/// the events at `unknown` did: they are parked by the real `apply_events` (and the fold then
/// parks the later events of a device whose creation it never saw), with the checkpoint in
/// the same transaction.
pub async fn project_as_an_older_binary(pool: &PgPool, unknown: &[i64]) {
    let reader = LogReader::new(pool.clone());
    let head = reader.head().await.unwrap().position;
    for projection in Projection::ALL {
        let mut tx = pool.begin().await.unwrap();
        let at = checkpoint::load(&mut tx, projection).await.unwrap();
        let layout = projection.layout(at.version).unwrap();
        let mut events = reader.read_all(at.position, head - at.position).await.unwrap();
        let Some(last) = events.last().cloned() else {
            continue;
        };
        for event in &mut events {
            if unknown.contains(&event.position) {
                event.schema_version = 99;
            }
        }
        apply_events(&mut tx, layout, &events).await.unwrap();
        let next = ProjectionCheckpoint {
            position: last.position,
            last_recorded_at: Some(last.recorded_at),
            version: at.version,
        };
        assert!(
            checkpoint::advance(&mut tx, projection, at.position, next)
                .await
                .unwrap()
        );
        tx.commit().await.unwrap();
    }
}
