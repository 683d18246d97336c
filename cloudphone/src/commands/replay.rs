//! `cloudphone replay`: rebuild a projection beside the live one and swap it in; list,
//! drop or abandon rebuilds.

use std::time::Duration;

use operator_console::BarObserver;
use projections::replay::{self, History, ReplayConfig, Throttle};
use read_models::Projection;
use tokio_util::sync::CancellationToken;

use crate::cli::ReplayArgs;
use crate::commands::database::{self, Schema};
use crate::commands::role_endpoints;

pub async fn run(args: &ReplayArgs) -> anyhow::Result<()> {
    // Rebuilds tables of the schema `cloudphone migrate` made; changes no schema version.
    let pool = database::connect_existing(&args.database, Schema::LogAndReadModels).await?;
    let projection = args.projection.map(Projection::from);
    if args.status {
        return print_status(&pool).await;
    }
    if args.drop_old {
        let dropped = replay::drop_replaced(&pool, projection, 0).await?;
        println!("dropped {} replaced version(s): {}", dropped.len(), dropped.join(", "));
        return Ok(());
    }
    let Some(projection) = projection else {
        anyhow::bail!("name the projection to replay: fleet or daily-usage");
    };
    database::require_session(
        &args.database,
        "a replay holds a session advisory lock and session settings for its whole run; run it against PostgreSQL directly",
    )
    .await?;
    if args.abandon {
        match replay::abandon(&pool, projection).await? {
            Some(id) => println!("abandoned rebuild {id} of {}", projection.name()),
            None => println!("no rebuild of {} in progress", projection.name()),
        }
        return Ok(());
    }
    let stop = CancellationToken::new();
    let endpoints = match args.ops_listen {
        Some(listen) => {
            Some(role_endpoints::serve(listen, pool.clone(), http_edge::telemetry::prometheus(), stop.clone()).await?)
        }
        None => {
            http_edge::telemetry::prometheus();
            None
        }
    };
    // An empty URL reads the primary (to override a deployment's environment).
    let history = match args.history_url.as_deref().filter(|url| !url.is_empty()) {
        Some(url) => History::replica(
            database::connect_lazy(url, args.database.database_max_connections.min(4))?,
            Duration::from_secs(args.history_wait_secs),
        ),
        None => History::primary(),
    };
    let throttle = Throttle {
        events_per_second: Some(args.max_events_per_second).filter(|&rate| rate > 0),
        write_bytes_per_second: Some(args.max_write_mib_per_second.saturating_mul(1 << 20)).filter(|&rate| rate > 0),
        index_workers: Some(args.index_workers),
    };
    let config = ReplayConfig {
        page_events: args.page_events.max(1),
        checkpoint_every: Duration::from_millis(args.checkpoint_every_ms),
        max_buffered_rows: args.max_buffered_rows.max(1),
        swap_lag_events: args.swap_lag_events.max(0),
        lock_timeout: Duration::from_millis(args.lock_timeout_ms.max(1)),
        keep_old: args.keep_old,
        throttle,
        ..ReplayConfig::default()
    };
    let observer = BarObserver::default();
    let interrupted = stop.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            tracing::warn!("interrupted: stopping at the next page (the replay resumes when run again)");
            interrupted.cancel();
        }
    });
    let outcome = replay::replay_from(&pool, &history, projection, args.version, config, &observer, &stop).await;
    observer.finish();
    stop.cancel();
    if let Some(endpoints) = endpoints {
        let _ = endpoints.await;
    }
    let summary = outcome?;
    if args.json {
        let json = serde_json::json!({
            "projection": summary.projection.name(),
            "history": if history.is_replica() { "replica" } else { "primary" },
            "version": summary.version,
            "rebuild_id": summary.rebuild_id,
            "resumed": summary.resumed,
            "bulk_positions": summary.bulk_positions,
            "bulk_events": summary.bulk_events,
            "bulk_seconds": summary.bulk_seconds,
            "bulk_positions_per_second": rate(summary.bulk_positions, summary.bulk_seconds),
            "not_applicable": summary.not_applicable,
            "finish_seconds": summary.finish_seconds,
            "tail_events": summary.tail_events,
            "swap_seconds": summary.swap_seconds,
            "live_position": summary.live_position,
            "replaced_version": summary.replaced_version,
            "replaced_schema": summary.replaced_schema,
            "total_seconds": summary.total_seconds,
        });
        println!("{json}");
    } else {
        println!(
            "{} v{} is live at position {} (rebuild {}{})",
            summary.projection.name(),
            summary.version,
            summary.live_position,
            summary.rebuild_id,
            if summary.resumed { ", resumed" } else { "" }
        );
        println!(
            "  bulk: {} positions ({} device events) in {:.1} s = {:.0} events/s; {} not applicable",
            summary.bulk_positions,
            summary.bulk_events,
            summary.bulk_seconds,
            rate(summary.bulk_positions, summary.bulk_seconds),
            summary.not_applicable
        );
        println!(
            "  keys and indexes {:.1} s; tailing {} events; swap {:.0} ms; total {:.1} s",
            summary.finish_seconds,
            summary.tail_events,
            summary.swap_seconds * 1000.0,
            summary.total_seconds
        );
        match &summary.replaced_schema {
            Some(schema) => println!(
                "  v{} kept in schema {schema} (drop with `cloudphone replay --drop-old`)",
                summary.replaced_version
            ),
            None => println!("  v{} dropped (--keep-old)", summary.replaced_version),
        }
    }
    Ok(())
}

fn rate(positions: i64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        (positions as f64 / seconds).round()
    } else {
        0.0
    }
}

async fn print_status(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    let rebuilds = replay::rebuilds(pool).await?;
    println!(
        "{:>4} {:<12} {:>3} {:<10} {:>12} {:>12} {:<20} replaced",
        "id", "projection", "v", "state", "position", "target", "swapped at"
    );
    for r in rebuilds {
        println!(
            "{:>4} {:<12} {:>3} {:<10} {:>12} {:>12} {:<20} {}",
            r.id,
            r.projection,
            r.version,
            r.state,
            r.position,
            r.target_position,
            r.swapped_at
                .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                .unwrap_or_default(),
            match (&r.replaced_schema, r.replaced_dropped) {
                (Some(schema), false) => schema.clone(),
                (Some(schema), true) => format!("{schema} (dropped)"),
                (None, _) => String::new(),
            }
        );
    }
    Ok(())
}
