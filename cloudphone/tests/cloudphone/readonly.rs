//! Read-only verbs read: only `migrate`, `serve` and roles that migrate on start create a
//! database or change its schema. Every other verb, pointed at a database that is missing,
//! was never migrated or is older than the binary, says so in one line, exits non-zero and
//! leaves the database as it found it. Errors print each cause once and none of
//! PostgreSQL's source locations.

use std::process::{Command, Output, Stdio};

use sqlx::PgPool;
use test_support::urls;
use uuid::Uuid;

/// The verbs that must not create a database or migrate one (a role told not to migrate
/// included).
const NON_MIGRATING: [&[&str]; 11] = [
    &["verify"],
    &["dead-letters", "list"],
    &["dead-letters", "retry", "--all"],
    &["replay", "--status"],
    &["replay", "fleet"],
    &["partitions", "list"],
    &["partitions", "ensure"],
    &["export"],
    &["keys", "status"],
    &["keys", "rotate"],
    &["command-api"],
];

fn cloudphone(database_url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cloudphone"))
        .args(args)
        .env("CLOUDPHONE_DATABASE_URL", database_url)
        .env("CLOUDPHONE_MIGRATE_ON_START", "false")
        .env("CLOUDPHONE_COMMAND_LISTEN", "127.0.0.1:0")
        .env("CLOUDPHONE_QUERY_LISTEN", "127.0.0.1:0")
        .env("CLOUDPHONE_LOG", "error")
        .env("CLOUDPHONE_LOG_FORMAT", "json")
        .stdin(Stdio::null())
        .output()
        .expect("run cloudphone")
}

/// The one line a failed verb printed, checked: non-zero exit, a single line, no PostgreSQL
/// source location, no cause twice.
pub(crate) fn refusal(args: &[&str], output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "{args:?} succeeded: {}{stderr}",
        String::from_utf8_lossy(&output.stdout)
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{args:?} printed more than one line:\n{stderr}");
    let line = lines[0];
    assert!(line.starts_with("error: "), "{args:?}: {line}");
    for leak in [" at line ", "routine", "file", ".c:"] {
        assert!(
            !line.contains(leak),
            "{args:?} leaked PostgreSQL internals ({leak}): {line}"
        );
    }
    let causes: Vec<&str> = line["error: ".len()..].split(": ").collect();
    for (i, cause) in causes.iter().enumerate() {
        assert!(
            !causes[i + 1..].iter().any(|later| later.contains(cause)),
            "{args:?} printed `{cause}` twice: {line}"
        );
    }
    line.to_owned()
}

async fn database_exists(pool: &PgPool, name: &str) -> bool {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(name)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Relations and functions in the database's own schemas (none in a fresh one).
async fn objects(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast'))
              + (SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                 WHERE n.nspname NOT IN ('pg_catalog', 'information_schema'))",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

#[sqlx::test(migrations = false)]
async fn a_mistyped_database_is_named_never_created_and_migrate_still_creates_it(pool: PgPool) {
    let url = urls::database(&pool).await;
    let name = format!("cloudphone_typo_{}", Uuid::now_v7().simple());
    let typo = format!("{}/{name}", url.rsplit_once('/').unwrap().0);
    for args in NON_MIGRATING {
        let line = refusal(args, &cloudphone(&typo, args));
        assert!(
            line.contains(&format!("database {name} does not exist at 127.0.0.1:5432"))
                && line.contains("cloudphone migrate"),
            "{args:?}: {line}"
        );
        assert!(!database_exists(&pool, &name).await, "{args:?} created {name}");
    }

    let migrated = cloudphone(&typo, &["migrate"]);
    let shown = String::from_utf8_lossy(&migrated.stderr);
    assert!(migrated.status.success(), "{shown}");
    assert!(database_exists(&pool, &name).await, "migrate did not create {name}");
    let verified = cloudphone(&typo, &["verify"]);
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE {name} WITH (FORCE)")))
        .execute(&pool)
        .await
        .unwrap();
}

#[sqlx::test(migrations = false)]
async fn an_unmigrated_database_is_refused_and_left_without_tables(pool: PgPool) {
    let url = urls::database(&pool).await;
    assert_eq!(objects(&pool).await, 0);
    for args in NON_MIGRATING {
        let line = refusal(args, &cloudphone(&url, args));
        assert!(
            line.contains("has no Cloudphone schema; run `cloudphone migrate`"),
            "{args:?}: {line}"
        );
        assert_eq!(objects(&pool).await, 0, "{args:?} created tables or functions");
    }
}

#[sqlx::test(migrations = false)]
async fn a_schema_older_than_the_binary_is_refused_not_upgraded(pool: PgPool) {
    let url = urls::database(&pool).await;
    assert!(cloudphone(&url, &["migrate"]).status.success());
    let newest_log: i64 = sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE version < 1000")
        .fetch_one(&pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = $1")
        .bind(newest_log)
        .execute(&pool)
        .await
        .unwrap();
    for args in NON_MIGRATING {
        let line = refusal(args, &cloudphone(&url, args));
        assert!(
            line.contains("has a schema older than this binary")
                && line.contains(&format!("migrations {newest_log} not applied"))
                && line.contains("run `cloudphone migrate`"),
            "{args:?}: {line}"
        );
    }
    let recorded: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM _sqlx_migrations WHERE version = $1)")
        .bind(newest_log)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(!recorded, "a verb that must not migrate applied migration {newest_log}");
}

#[sqlx::test(migrations = false)]
async fn a_postgres_error_is_printed_once_without_its_source_location(pool: PgPool) {
    let url = urls::database(&pool).await;
    assert!(cloudphone(&url, &["migrate"]).status.success());
    // A table gone from under the binary: the server's error reaches the operator.
    sqlx::query("ALTER TABLE log_head RENAME TO log_head_elsewhere")
        .execute(&pool)
        .await
        .unwrap();
    let line = refusal(&["verify"], &cloudphone(&url, &["verify"]));
    assert_eq!(
        line.matches("relation \"log_head\" does not exist").count(),
        1,
        "{line}"
    );
    assert!(line.contains("SQLSTATE 42P01"), "{line}");
}

#[test]
fn serve_without_a_local_postgres_says_how_to_get_one() {
    // Nothing listens on port 1 of this machine: a bare machine, as far as the verb can tell.
    for args in [&["serve"][..], &["migrate"], &["verify"]] {
        let mut command = Command::new(env!("CARGO_BIN_EXE_cloudphone"));
        command
            .args(args)
            .env("CLOUDPHONE_DATABASE_URL", "postgres://postgres@127.0.0.1:1/cloudphone")
            .env("CLOUDPHONE_COMMAND_LISTEN", "127.0.0.1:0")
            .env("CLOUDPHONE_QUERY_LISTEN", "127.0.0.1:0")
            .env("CLOUDPHONE_LOG", "error")
            .stdin(Stdio::null());
        let output = command.output().unwrap();
        let line = refusal(args, &output);
        assert!(
            line.contains("nothing answers at 127.0.0.1:1") && line.contains("`ops/dev/postgres.sh ensure`"),
            "{args:?}: {line}"
        );
    }
    assert!(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../ops/dev/postgres.sh")
            .exists(),
        "the script the message names exists"
    );
}
