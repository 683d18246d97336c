//! `cloudphone load export`: how fast `cloudphone export` streams the whole log out and how
//! much memory it needs, against PostgreSQL's own `COPY ... TO STDOUT` of the same columns in
//! the same run, on the same data.
//!
//! Phases, in the database `cloudphone_load_export` (recreated unless `--reuse` finds it
//! already holding `--events` events):
//! 1. history: device lifecycles over six months (the generator of `load projections`), then
//!    every owner registered (`UserRegistered` with its email and phone encrypted under the
//!    owner's data key, and `QuotaChanged`), so that the export's decrypt path runs; a few
//!    more `QuotaChanged` make the total exactly `--events`;
//! 2. baseline: `COPY (SELECT <the exported columns> FROM user_events_all ORDER BY position)
//!    TO STDOUT` streamed to nowhere through sqlx, timed in this process; run before and
//!    after the exports, the faster of the two is the baseline;
//! 3. exports: `cloudphone export --json -o /dev/null` as child processes of this binary:
//!    NDJSON with personal fields decrypted, CSV (decrypted), NDJSON with `--personal omit`;
//!    each reports its own rate and peak RSS (VmHWM);
//! 4. file verify (disk permitting): an NDJSON export written to a temporary file, then
//!    `cloudphone verify --file` over it, timed from here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use event_log::LogReader;
use futures::TryStreamExt as _;
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Executor, PgPool};
use tokio::io::AsyncReadExt as _;

use crate::cli::LoadExportArgs;
use crate::harness::databases::{recreate_database, settle_database};
use crate::harness::report::write_json;
use crate::harness::sampling::vm_hwm_mib;
use crate::world::history::write_history;
use crate::world::owners::register_owners;

const DATABASE: &str = "cloudphone_load_export";
/// The export's targets: events per second over the whole log, and peak resident memory.
const RATE_TARGET: f64 = 200_000.0;
const RSS_TARGET_MIB: f64 = 64.0;
/// Above this many events the file verify needs `VERIFY_MIN_FREE_BYTES` free on the disk.
const VERIFY_LARGE_EVENTS: i64 = 2_000_000;
const VERIFY_MIN_FREE_BYTES: u64 = 20_000_000_000;

/// The columns `cloudphone export` reads, in its order, as PostgreSQL's own text output.
const COPY_SQL: &str = "COPY (SELECT position, event_id, stream_id, stream_type, stream_version, event_type, \
     schema_version, owner_id, occurred_at, recorded_at, payload, metadata, prev_hash, hash \
     FROM user_events_all ORDER BY position) TO STDOUT";

#[derive(Debug, Serialize)]
struct History {
    events: i64,
    /// `None` when an existing database was reused.
    write_seconds: Option<f64>,
    reused: bool,
    by_event_type: BTreeMap<String, i64>,
    /// `UserRegistered` events, each with two encrypted personal fields (email, phone).
    users_with_personal_data: i64,
    database_mib: f64,
}

#[derive(Debug, Serialize)]
struct CopyRun {
    label: &'static str,
    events: i64,
    bytes: u64,
    seconds: f64,
    events_per_second: f64,
}

/// What `cloudphone export --json` prints.
#[derive(Debug, Deserialize)]
struct ExportSummary {
    events: u64,
    bytes: u64,
    seconds: f64,
    events_per_second: f64,
    peak_rss_mib: Option<f64>,
}

#[derive(Debug, Serialize)]
struct ExportRun {
    label: &'static str,
    format: &'static str,
    personal: &'static str,
    events: u64,
    bytes: u64,
    bytes_per_event: f64,
    /// The export's own figure (from its first page to its trailer).
    seconds: f64,
    /// The child process from spawn to exit (connecting included).
    process_seconds: f64,
    events_per_second: f64,
    peak_rss_mib: Option<f64>,
    /// Our rate over the COPY baseline's.
    ratio_to_copy: f64,
    rate_target_met: bool,
    rss_target_met: bool,
}

#[derive(Debug, Serialize)]
struct FileVerify {
    /// Free bytes on the temporary directory's disk before the file was written.
    free_bytes: u64,
    file: Option<PathBuf>,
    /// The NDJSON export to the file (decrypted), as it reported itself.
    export: Option<ExportRun>,
    /// `cloudphone verify --file`, from spawn to exit.
    verify_events: Option<u64>,
    verify_seconds: Option<f64>,
    verify_events_per_second: Option<f64>,
    /// Peak RSS of the verify process, sampled every 50 ms from /proc (a lower bound).
    verify_peak_rss_mib: Option<f64>,
    skipped: Option<String>,
}

#[derive(Debug, Serialize)]
struct Report {
    history: History,
    page_events: i64,
    copy_runs: Vec<CopyRun>,
    /// The faster COPY run's events/s: what every ratio divides by.
    baseline_events_per_second: f64,
    exports: Vec<ExportRun>,
    file_verify: FileVerify,
    rate_target_events_per_second: f64,
    rss_target_mib: f64,
}

pub async fn run(args: &LoadExportArgs) -> anyhow::Result<()> {
    if args.events == 0 {
        bail!("--events must be positive");
    }
    let url = database_url(&args.database.database_url)?;
    let (pool, history) = prepare(args).await?;
    println!(
        "load export: {} events ({}), {} users with encrypted personal data, database {:.0} MiB",
        history.events,
        if history.reused { "reused" } else { "written" },
        history.users_with_personal_data,
        history.database_mib
    );
    if history.events > i64::try_from(args.events).unwrap_or(i64::MAX) {
        println!("  note: the database holds more than --events; the whole log is exported");
    }

    warm_up(&pool).await?;
    let mut copy_runs = vec![copy_out(&pool, "COPY TO STDOUT (before the exports)").await?];
    let mut summaries = Vec::new();
    for (label, format, personal) in [
        ("export ndjson, personal decrypted", "ndjson", "decrypt"),
        ("export csv, personal decrypted", "csv", "decrypt"),
        ("export ndjson, personal omitted", "ndjson", "omit"),
    ] {
        eprintln!("{label}");
        let (summary, process_seconds) = export(args, &url, format, personal, Path::new("/dev/null")).await?;
        summaries.push((label, format, personal, summary, process_seconds));
    }
    copy_runs.push(copy_out(&pool, "COPY TO STDOUT (after the exports)").await?);
    let baseline = copy_runs.iter().map(|run| run.events_per_second).fold(0.0, f64::max);
    let exports: Vec<ExportRun> = summaries
        .into_iter()
        .map(|(label, format, personal, summary, process_seconds)| {
            ExportRun::of(label, format, personal, &summary, process_seconds, baseline)
        })
        .collect();
    for run in &exports {
        anyhow::ensure!(
            i64::try_from(run.events).ok() == Some(history.events),
            "{} wrote {} events of {}",
            run.label,
            run.events,
            history.events
        );
    }
    let ndjson_bytes = exports.first().map_or(0, |run| run.bytes);
    let file_verify = file_verify(args, &url, history.events, ndjson_bytes, baseline).await?;
    pool.close().await;

    let report = Report {
        history,
        page_events: args.page_events,
        copy_runs,
        baseline_events_per_second: baseline,
        exports,
        file_verify,
        rate_target_events_per_second: RATE_TARGET,
        rss_target_mib: RSS_TARGET_MIB,
    };
    print(&report);
    if let Some(path) = &args.json {
        write_json(path, &report)?;
        println!("  report written to {}", path.display());
    }
    Ok(())
}

impl ExportRun {
    fn of(
        label: &'static str,
        format: &'static str,
        personal: &'static str,
        summary: &ExportSummary,
        process_seconds: f64,
        baseline: f64,
    ) -> Self {
        ExportRun {
            label,
            format,
            personal,
            events: summary.events,
            bytes: summary.bytes,
            bytes_per_event: summary.bytes as f64 / summary.events.max(1) as f64,
            seconds: summary.seconds,
            process_seconds,
            events_per_second: summary.events_per_second,
            peak_rss_mib: summary.peak_rss_mib,
            ratio_to_copy: summary.events_per_second / baseline.max(1e-9),
            rate_target_met: summary.events_per_second >= RATE_TARGET,
            rss_target_met: summary.peak_rss_mib.is_some_and(|mib| mib <= RSS_TARGET_MIB),
        }
    }
}

/// The URL of the benchmark's database on the server `url` names.
fn database_url(url: &str) -> anyhow::Result<String> {
    let mut parsed = reqwest::Url::parse(url).context("--database-url")?;
    parsed.set_path(&format!("/{DATABASE}"));
    Ok(parsed.to_string())
}

/// The database holding at least `--events` events: the existing one with `--reuse`, else a
/// fresh one with the history written.
async fn prepare(args: &LoadExportArgs) -> anyhow::Result<(PgPool, History)> {
    let wanted = i64::try_from(args.events).context("--events")?;
    if args.reuse {
        let options = PgConnectOptions::from_str(&args.database.database_url)
            .context("--database-url")?
            .database(DATABASE);
        match event_log::pool_options(8).connect_with(options).await {
            Ok(pool) => match LogReader::new(pool.clone()).head().await {
                Ok(head) if head.position >= wanted => {
                    eprintln!("reusing {DATABASE}: {} events", head.position);
                    let history = describe(&pool, None, true).await?;
                    return Ok((pool, history));
                }
                Ok(head) => eprintln!(
                    "{DATABASE} holds {} events, fewer than {wanted}: writing it again",
                    head.position
                ),
                Err(error) => eprintln!("{DATABASE} has no log ({error}): writing it"),
            },
            Err(error) => eprintln!("{DATABASE} is not there ({error}): writing it"),
        }
    }
    let pool = recreate_database(&args.database.database_url, DATABASE, 16).await?;
    let started = Instant::now();
    // Each registration is two events (UserRegistered, QuotaChanged), and the generator makes
    // one owner per 100 device events: N = h + 2h/100 for h device events.
    let device_events = args.events - args.events * 2 / 102;
    write_history(&pool, device_events, args.seed).await?;
    let written = LogReader::new(pool.clone()).head().await?.position;
    register_owners(&pool, &args.master_keys, wanted - written).await?;
    let head = LogReader::new(pool.clone()).head().await?.position;
    if head != wanted {
        eprintln!("note: the log's head is {head}, not {wanted} (a gap in positions?)");
    }
    let seconds = started.elapsed().as_secs_f64();
    settle_database(&pool).await?;
    eprintln!("history: {head} events in {seconds:.1} s");
    let history = describe(&pool, Some(seconds), false).await?;
    Ok((pool, history))
}

async fn describe(pool: &PgPool, write_seconds: Option<f64>, reused: bool) -> anyhow::Result<History> {
    let events = LogReader::new(pool.clone()).head().await?.position;
    let by_type: Vec<(String, i64)> =
        sqlx::query_as("SELECT event_type, count(*) FROM user_events_all GROUP BY event_type ORDER BY event_type")
            .fetch_all(pool)
            .await?;
    let bytes: i64 = sqlx::query_scalar("SELECT pg_database_size(current_database())")
        .fetch_one(pool)
        .await?;
    let by_event_type: BTreeMap<String, i64> = by_type.into_iter().collect();
    Ok(History {
        events,
        write_seconds,
        reused,
        users_with_personal_data: by_event_type.get("UserRegistered").copied().unwrap_or(0),
        by_event_type,
        database_mib: bytes as f64 / (1024.0 * 1024.0),
    })
}

/// Reads every heap page of the log once, so the first timed run does not pay for a cold cache.
async fn warm_up(pool: &PgPool) -> anyhow::Result<()> {
    eprintln!("warm-up: one pass over the log");
    let started = Instant::now();
    pool.execute("SELECT count(*) FROM user_events_all WHERE payload IS NOT NULL")
        .await
        .context("warm-up")?;
    eprintln!("warm-up: {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// The baseline: PostgreSQL's text COPY of the exported columns, streamed and dropped.
async fn copy_out(pool: &PgPool, label: &'static str) -> anyhow::Result<CopyRun> {
    eprintln!("baseline: {label}");
    let mut conn = pool.acquire().await?;
    let mut rows: i64 = 0;
    let mut bytes = 0u64;
    let started = Instant::now();
    {
        let mut stream = conn.copy_out_raw(COPY_SQL).await.context("COPY TO STDOUT")?;
        while let Some(chunk) = stream.try_next().await.context("COPY TO STDOUT")? {
            bytes += chunk.len() as u64;
            // One row per line: text COPY escapes newlines inside values.
            rows += chunk.iter().filter(|&&byte| byte == b'\n').count() as i64;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(CopyRun {
        label,
        events: rows,
        bytes,
        seconds,
        events_per_second: rows as f64 / seconds.max(1e-9),
    })
}

/// What a child process printed on stdout, its wall time and its peak RSS as sampled from
/// /proc while it ran.
struct ChildRun {
    stdout: String,
    seconds: f64,
    sampled_peak_rss_mib: Option<f64>,
}

async fn run_child(args: &LoadExportArgs, verb: &[&str]) -> anyhow::Result<ChildRun> {
    let exe = std::env::current_exe().context("the path of this binary")?;
    let mut command = tokio::process::Command::new(exe);
    command
        .args(["--log", "warn"])
        .args(verb)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    // The same master keys as this process (by environment: never on a command line).
    if let Some(key) = &args.master_keys.master_key {
        command.env("CLOUDPHONE_MASTER_KEY", key);
    }
    if !args.master_keys.previous_master_keys.is_empty() {
        command.env(
            "CLOUDPHONE_PREVIOUS_MASTER_KEYS",
            args.master_keys.previous_master_keys.join(","),
        );
    }
    let started = Instant::now();
    let mut child = command.spawn().context("spawn a child cloudphone")?;
    let mut stdout = child.stdout.take().context("child stdout")?;
    let reader = tokio::spawn(async move {
        let mut text = String::new();
        stdout.read_to_string(&mut text).await.map(|_| text)
    });
    let pid = child.id();
    let mut peak: Option<f64> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let status = loop {
        tokio::select! {
            status = child.wait() => break status?,
            _ = tick.tick() => {
                if let Some(mib) = pid.and_then(vm_hwm_mib) {
                    peak = Some(peak.map_or(mib, |p| p.max(mib)));
                }
            }
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    let stdout = reader.await??;
    if !status.success() {
        bail!("`cloudphone {}` failed ({status}): {stdout}", verb.join(" "));
    }
    Ok(ChildRun {
        stdout,
        seconds,
        sampled_peak_rss_mib: peak,
    })
}

/// `cloudphone export --json` of the whole log to `output`; its summary and wall time.
async fn export(
    args: &LoadExportArgs,
    url: &str,
    format: &str,
    personal: &str,
    output: &Path,
) -> anyhow::Result<(ExportSummary, f64)> {
    let page = args.page_events.to_string();
    let output = output.to_string_lossy();
    let run = run_child(
        args,
        &[
            "export",
            "--json",
            "--database-url",
            url,
            "--format",
            format,
            "--personal",
            personal,
            "--page-events",
            &page,
            "-o",
            &output,
        ],
    )
    .await?;
    let line = run
        .stdout
        .lines()
        .rev()
        .find(|line| line.trim_start().starts_with('{'))
        .with_context(|| format!("no summary from the export: {:?}", run.stdout))?;
    let summary: ExportSummary = serde_json::from_str(line).with_context(|| format!("export summary {line:?}"))?;
    Ok((summary, run.seconds))
}

/// Free bytes on the disk holding `dir`, from `df`.
async fn free_bytes(dir: &Path) -> anyhow::Result<u64> {
    let output = tokio::process::Command::new("df")
        .arg("-Pk")
        .arg(dir)
        .output()
        .await
        .context("df")?;
    let text = String::from_utf8_lossy(&output.stdout);
    let kib: u64 = text
        .lines()
        .nth(1)
        .and_then(|line| line.split_whitespace().nth(3))
        .and_then(|field| field.parse().ok())
        .with_context(|| format!("cannot read df's output: {text:?}"))?;
    Ok(kib * 1024)
}

/// An NDJSON export to a temporary file, then `cloudphone verify --file` over it; skipped
/// when the disk has no room for it.
async fn file_verify(
    args: &LoadExportArgs,
    url: &str,
    events: i64,
    ndjson_bytes: u64,
    baseline: f64,
) -> anyhow::Result<FileVerify> {
    let dir = std::env::temp_dir();
    let free = free_bytes(&dir).await?;
    let skipped = |reason: String| {
        eprintln!("file verify skipped: {reason}");
        FileVerify {
            free_bytes: free,
            file: None,
            export: None,
            verify_events: None,
            verify_seconds: None,
            verify_events_per_second: None,
            verify_peak_rss_mib: None,
            skipped: Some(reason),
        }
    };
    if events > VERIFY_LARGE_EVENTS && free <= VERIFY_MIN_FREE_BYTES {
        return Ok(skipped(format!(
            "{events} events is above {VERIFY_LARGE_EVENTS} and {} has {:.1} GB free (needs more than {:.0} GB)",
            dir.display(),
            free as f64 / 1e9,
            VERIFY_MIN_FREE_BYTES as f64 / 1e9
        )));
    }
    // The file is as large as the NDJSON export to /dev/null was; keep 1 GiB spare.
    if free < ndjson_bytes + (1 << 30) {
        return Ok(skipped(format!(
            "the file needs {:.1} GB and {} has {:.1} GB free",
            ndjson_bytes as f64 / 1e9,
            dir.display(),
            free as f64 / 1e9
        )));
    }
    let path = dir.join(format!("cloudphone-load-export-{}.ndjson", std::process::id()));
    let result = write_and_verify(args, url, &path, baseline).await;
    if let Err(error) = std::fs::remove_file(&path) {
        eprintln!("cannot remove {}: {error}", path.display());
    }
    let (export, verify) = result?;
    let verified = verify
        .stdout
        .split_whitespace()
        .skip_while(|word| *word != "verified")
        .nth(1)
        .and_then(|count| count.parse::<u64>().ok());
    let count = verified.unwrap_or(export.events);
    Ok(FileVerify {
        free_bytes: free,
        file: Some(path),
        verify_events: verified,
        verify_seconds: Some(verify.seconds),
        verify_events_per_second: Some(count as f64 / verify.seconds.max(1e-9)),
        verify_peak_rss_mib: verify.sampled_peak_rss_mib,
        export: Some(export),
        skipped: None,
    })
}

async fn write_and_verify(
    args: &LoadExportArgs,
    url: &str,
    path: &Path,
    baseline: f64,
) -> anyhow::Result<(ExportRun, ChildRun)> {
    eprintln!("export ndjson to {}", path.display());
    let (summary, process_seconds) = export(args, url, "ndjson", "decrypt", path).await?;
    let export = ExportRun::of(
        "export ndjson to a file, personal decrypted",
        "ndjson",
        "decrypt",
        &summary,
        process_seconds,
        baseline,
    );
    eprintln!("verify --file {}", path.display());
    let path = path.to_string_lossy();
    let verify = run_child(args, &["verify", "--database-url", url, "--file", &path]).await?;
    Ok((export, verify))
}

fn mark(met: bool) -> &'static str {
    if met { "PASS" } else { "MISS" }
}

fn print(report: &Report) {
    let h = &report.history;
    println!(
        "\nexport of {} events ({} users with encrypted email and phone; pages of {} events)",
        h.events, h.users_with_personal_data, report.page_events
    );
    println!(
        "{:<46} {:>12} {:>8} {:>9} {:>10} {:>8} {:>11} {:>12}",
        "run", "events/s", "x COPY", "seconds", "MiB out", "B/event", "peak RSS", "targets"
    );
    for run in &report.copy_runs {
        println!(
            "{:<46} {:>12.0} {:>8.2} {:>9.1} {:>10.0} {:>8.0} {:>11} {:>12}",
            run.label,
            run.events_per_second,
            run.events_per_second / report.baseline_events_per_second.max(1e-9),
            run.seconds,
            run.bytes as f64 / (1024.0 * 1024.0),
            run.bytes as f64 / run.events.max(1) as f64,
            "-",
            "-"
        );
    }
    let exports = report.exports.iter().chain(report.file_verify.export.as_ref());
    for run in exports {
        println!(
            "{:<46} {:>12.0} {:>8.2} {:>9.1} {:>10.0} {:>8.0} {:>11} {:>12}",
            run.label,
            run.events_per_second,
            run.ratio_to_copy,
            run.seconds,
            run.bytes as f64 / (1024.0 * 1024.0),
            run.bytes_per_event,
            run.peak_rss_mib
                .map_or_else(|| "?".to_owned(), |mib| format!("{mib:.1} MiB")),
            format!("{} {}", mark(run.rate_target_met), mark(run.rss_target_met)),
        );
    }
    let verify = &report.file_verify;
    match (&verify.skipped, verify.verify_events_per_second) {
        (Some(reason), _) => println!("{:<46} skipped: {reason}", "verify --file (ndjson)"),
        (None, Some(rate)) => println!(
            "{:<46} {:>12.0} {:>8.2} {:>9.1} {:>10} {:>8} {:>11} {:>12}",
            "verify --file (ndjson)",
            rate,
            rate / report.baseline_events_per_second.max(1e-9),
            verify.verify_seconds.unwrap_or(0.0),
            "",
            "",
            verify
                .verify_peak_rss_mib
                .map_or_else(|| "?".to_owned(), |mib| format!("~{mib:.1} MiB")),
            mark(rate >= RATE_TARGET),
        ),
        (None, None) => {}
    }
    println!(
        "targets: >= {:.0} events/s (first mark), peak RSS <= {:.0} MiB (second); baseline {:.0} events/s (the faster COPY)",
        report.rate_target_events_per_second, report.rss_target_mib, report.baseline_events_per_second
    );
}
