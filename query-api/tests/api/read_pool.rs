//! The dashboards' connection pool against a real PostgreSQL: a connection comes back without
//! a round trip yet clean after a read cut short, a dropped transaction or a statement
//! abandoned mid-run; connections the server closed are not handed out twice; the pool keeps
//! to its size and its acquire timeout.

use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use query_api::read_pool::{ReadPool, ReadPoolOptions};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgPool};

fn options_of(pool: &PgPool, application: &str) -> PgConnectOptions {
    (*pool.connect_options()).clone().application_name(application)
}

fn one_connection(pool: &PgPool, application: &str) -> ReadPool {
    ReadPool::new(
        options_of(pool, application),
        ReadPoolOptions::new(1, Duration::from_secs(5)),
    )
}

async fn backend_pid(read: &ReadPool) -> i32 {
    let mut connection = read.acquire().await.unwrap();
    sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *connection)
        .await
        .unwrap()
}

/// Ends a backend as an administrator (or a failover) would, and waits until it has gone.
async fn terminate(pool: &PgPool, pid: i32) {
    let terminated: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1, 5000)")
        .bind(pid)
        .fetch_one(pool)
        .await
        .unwrap();
    assert!(terminated);
}

/// The pool's speed rests on this: after a statement read to its end, sqlx owes the server
/// nothing, so the flush on return is ready at once, without a round trip.
#[sqlx::test(migrations = false)]
async fn a_finished_read_owes_nothing_and_an_abandoned_one_does(pool: PgPool) {
    let mut connection = sqlx::PgConnection::connect_with(&pool.connect_options()).await.unwrap();
    let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(&mut connection).await.unwrap();
    assert_eq!(one, 1);
    assert!(matches!(connection.flush().now_or_never(), Some(Ok(()))));

    let slow = sqlx::query_scalar::<_, String>("SELECT 'slow'::text FROM pg_sleep(0.5)").fetch_one(&mut connection);
    assert!(tokio::time::timeout(Duration::from_millis(50), slow).await.is_err());
    assert!(
        connection.flush().now_or_never().is_none(),
        "a statement abandoned mid-run leaves its reply owed"
    );
    // Drained, the connection answers the next statement.
    connection.flush().await.unwrap();
    let two: i32 = sqlx::query_scalar("SELECT 2").fetch_one(&mut connection).await.unwrap();
    assert_eq!(two, 2);
}

/// A finished read's connection is back in the pool the moment it is dropped: nothing was
/// sent or awaited on the way (sqlx's pool pings it on a task first).
#[sqlx::test(migrations = false)]
async fn a_finished_read_comes_back_at_once_and_an_abandoned_one_after_draining(pool: PgPool) {
    let read = one_connection(&pool, "read_pool_comes_back");
    let pid = backend_pid(&read).await;
    assert_eq!(read.num_idle(), 1, "back without a round trip");

    let mut connection = read.acquire().await.unwrap();
    let slow = sqlx::query_scalar::<_, String>("SELECT 'slow'::text FROM pg_sleep(0.3)").fetch_one(&mut *connection);
    assert!(tokio::time::timeout(Duration::from_millis(50), slow).await.is_err());
    drop(connection);
    assert_eq!(read.num_idle(), 0, "still draining the abandoned statement's reply");
    assert_eq!(backend_pid(&read).await, pid, "the same connection, once drained");
}

#[sqlx::test(migrations = false)]
async fn a_read_cut_short_leaves_its_connection_clean_for_the_next(pool: PgPool) {
    let read = one_connection(&pool, "read_pool_cut_short");
    let pid = backend_pid(&read).await;
    {
        let mut connection = read.acquire().await.unwrap();
        let mut rows = sqlx::query_scalar::<_, i32>("SELECT generate_series(1, 200000)").fetch(&mut *connection);
        assert_eq!(rows.next().await.unwrap().unwrap(), 1);
    }
    // The same connection (the pool holds one), answering the next statement, not the rest
    // of the last one.
    let mut connection = read.acquire().await.unwrap();
    let (again, answer): (i32, String) = sqlx::query_as("SELECT pg_backend_pid(), 'next'::text")
        .fetch_one(&mut *connection)
        .await
        .unwrap();
    assert_eq!((again, answer.as_str()), (pid, "next"));
    assert_eq!(read.size(), 1);
}

#[sqlx::test(migrations = false)]
async fn a_dropped_transaction_is_rolled_back_before_its_connection_is_reused(pool: PgPool) {
    let read = one_connection(&pool, "read_pool_dropped_transaction");
    let pid = backend_pid(&read).await;
    {
        let mut connection = read.acquire().await.unwrap();
        let mut transaction = connection.begin().await.unwrap();
        sqlx::query("SET LOCAL application_name = 'inside_the_dropped_transaction'")
            .execute(&mut *transaction)
            .await
            .unwrap();
    }
    let mut connection = read.acquire().await.unwrap();
    let (again, name): (i32, String) = sqlx::query_as("SELECT pg_backend_pid(), current_setting('application_name')")
        .fetch_one(&mut *connection)
        .await
        .unwrap();
    assert_eq!(again, pid);
    assert_eq!(name, "read_pool_dropped_transaction", "the transaction was rolled back");
}

#[sqlx::test(migrations = false)]
async fn a_statement_abandoned_mid_run_is_drained_not_answered_to_the_next_reader(pool: PgPool) {
    let read = one_connection(&pool, "read_pool_abandoned");
    let pid = backend_pid(&read).await;
    {
        let mut connection = read.acquire().await.unwrap();
        let slow =
            sqlx::query_scalar::<_, String>("SELECT 'slow'::text FROM pg_sleep(0.3)").fetch_one(&mut *connection);
        assert!(tokio::time::timeout(Duration::from_millis(50), slow).await.is_err());
    }
    let started = Instant::now();
    let mut connection = read.acquire().await.unwrap();
    let (again, answer): (i32, String) = sqlx::query_as("SELECT pg_backend_pid(), 'fast'::text")
        .fetch_one(&mut *connection)
        .await
        .unwrap();
    assert_eq!((again, answer.as_str()), (pid, "fast"));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "waited {:?} for the drain",
        started.elapsed()
    );
}

/// A connection the server closed while it idled past the ping threshold is found out by the
/// ping and replaced: the read succeeds on a new one.
#[sqlx::test(migrations = false)]
async fn a_connection_closed_by_the_server_while_idle_is_replaced(pool: PgPool) {
    let read = ReadPool::new(
        options_of(&pool, "read_pool_terminated"),
        ReadPoolOptions {
            ping_idle_after: Duration::ZERO,
            ..ReadPoolOptions::new(1, Duration::from_secs(5))
        },
    );
    let pid = backend_pid(&read).await;
    terminate(&pool, pid).await;
    let replaced = backend_pid(&read).await;
    assert_ne!(replaced, pid);
    assert_eq!(read.size(), 1, "the closed connection is not counted");
}

/// Without the ping (it idled less than the threshold), a connection the server closed fails
/// the one read that finds it, and is then not pooled again.
#[sqlx::test(migrations = false)]
async fn a_connection_that_failed_a_read_is_not_pooled_again(pool: PgPool) {
    let read = ReadPool::new(
        options_of(&pool, "read_pool_failed_read"),
        ReadPoolOptions {
            ping_idle_after: Duration::from_secs(3600),
            ..ReadPoolOptions::new(1, Duration::from_secs(5))
        },
    );
    let pid = backend_pid(&read).await;
    terminate(&pool, pid).await;
    {
        let mut connection = read.acquire().await.unwrap();
        let failed = sqlx::query_scalar::<_, i32>("SELECT 1")
            .fetch_one(&mut *connection)
            .await;
        assert!(failed.is_err(), "the terminated connection answered: {failed:?}");
    }
    let replaced = backend_pid(&read).await;
    assert_ne!(replaced, pid);
}

#[sqlx::test(migrations = false)]
async fn the_pool_keeps_to_its_size_under_many_readers(pool: PgPool) {
    let read = ReadPool::new(
        options_of(&pool, "read_pool_size"),
        ReadPoolOptions::new(3, Duration::from_secs(10)),
    );
    let readers: Vec<_> = (0..40)
        .map(|i| {
            let read = read.clone();
            tokio::spawn(async move {
                let mut connection = read.acquire().await.unwrap();
                let answer: i64 = sqlx::query_scalar("SELECT $1::bigint FROM pg_sleep(0.01)")
                    .bind(i64::from(i))
                    .fetch_one(&mut *connection)
                    .await
                    .unwrap();
                assert_eq!(answer, i64::from(i));
            })
        })
        .collect();
    let mut most = 0_i64;
    let mut pending = readers;
    while !pending.is_empty() {
        let open: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'read_pool_size'")
                .fetch_one(&pool)
                .await
                .unwrap();
        most = most.max(open);
        pending.retain(|reader| !reader.is_finished());
    }
    assert!(most <= 3, "{most} connections open at once");
    assert!(read.size() <= 3 && read.num_idle() <= 3);
}

#[sqlx::test(migrations = false)]
async fn acquiring_from_a_pool_in_use_times_out_with_pool_timed_out(pool: PgPool) {
    let read = ReadPool::new(
        options_of(&pool, "read_pool_timeout"),
        ReadPoolOptions::new(1, Duration::from_millis(200)),
    );
    let held = read.acquire().await.unwrap();
    let started = Instant::now();
    let refused = read.acquire().await;
    assert!(matches!(refused, Err(sqlx::Error::PoolTimedOut)), "{refused:?}");
    assert!(started.elapsed() >= Duration::from_millis(200));
    drop(held);
    backend_pid(&read).await;
}

#[sqlx::test(migrations = false)]
async fn a_closed_pool_refuses_and_closes_what_comes_back(pool: PgPool) {
    let read = one_connection(&pool, "read_pool_closed");
    let held = read.acquire().await.unwrap();
    read.close().await;
    assert!(matches!(read.acquire().await, Err(sqlx::Error::PoolClosed)));
    drop(held);
    assert_eq!(read.size(), 0);
    assert_eq!(read.num_idle(), 0);
}
