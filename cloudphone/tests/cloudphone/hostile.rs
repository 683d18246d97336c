//! Hostile and careless clients against the real binary (`cloudphone serve`), at the level of
//! connections and processes: sockets that trickle header lines, bodies that stall, idle
//! kept-alive connections, more connections than a listener takes, and a flood of expensive
//! GraphQL documents. None of them may stall the platform: each is cut off by its own limit,
//! with a clear answer where one can be given, while `/healthz` of both APIs and portal
//! commands keep answering.

use std::time::{Duration, Instant};

use http_edge::auth::Role;
use serde_json::{Value, json};
use sqlx::PgPool;
use test_support::roles::RoleProcess;
use test_support::{tokens, urls};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::support::{CLOUDPHONE, scrape};

/// `cloudphone serve` on the test's database with `env`; returns it and both APIs' bases.
async fn serve(pool: &PgPool, env: &[(&str, &str)], dir: &std::path::Path) -> (RoleProcess, String, String) {
    let url = urls::database(pool).await;
    let mut env = env.to_vec();
    env.push(("CLOUDPHONE_LOG", "warn,cloudphone=info"));
    env.push(("CLOUDPHONE_RATE_LIMIT", "1000000"));
    let mut serve = RoleProcess::start(CLOUDPHONE, "serve", &url, &env, dir);
    let command = serve.address("command API listening").await;
    let query = serve.address("query API listening").await;
    (serve, command, query)
}

fn host_of(base: &str) -> String {
    base.trim_start_matches("http://").to_owned()
}

/// A socket that sends a request line and then one header line every `every`, forever.
/// Returns how long the server kept it open (until EOF or a reset), or `None` if it was
/// still open at `limit`; and what the server wrote, if anything.
async fn trickle(host: String, every: Duration, limit: Duration) -> (Option<Duration>, Vec<u8>) {
    let started = Instant::now();
    let Ok(mut socket) = TcpStream::connect(&host).await else {
        return (Some(Duration::ZERO), Vec::new());
    };
    let mut written = Vec::new();
    if socket.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n").await.is_err() {
        return (Some(started.elapsed()), written);
    }
    let mut line = 0u64;
    let mut buffer = [0u8; 1024];
    loop {
        if started.elapsed() >= limit {
            return (None, written);
        }
        tokio::select! {
            read = socket.read(&mut buffer) => match read {
                Ok(0) | Err(_) => return (Some(started.elapsed()), written),
                Ok(n) => written.extend_from_slice(&buffer[..n]),
            },
            () = tokio::time::sleep(every) => {
                line += 1;
                if socket.write_all(format!("x-trickle-{line}: {line}\r\n").as_bytes()).await.is_err() {
                    return (Some(started.elapsed()), written);
                }
            }
        }
    }
}

/// One raw HTTP/1.1 exchange on a fresh connection: writes `request`, reads until the server
/// closes or `limit` passes; returns what it read and how long that took.
async fn exchange(host: &str, request: &[u8], limit: Duration) -> (String, Duration) {
    let started = Instant::now();
    let mut socket = TcpStream::connect(host).await.unwrap();
    socket.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(limit, socket.read_to_end(&mut answer)).await;
    (String::from_utf8_lossy(&answer).into_owned(), started.elapsed())
}

/// The sum of the series of one scrape whose name and labels start with `metric`.
async fn scrape_sum(client: &reqwest::Client, base: &str, metric: &str) -> f64 {
    scrape(client, base)
        .await
        .iter()
        .filter(|(series, _)| series.starts_with(metric))
        .map(|(_, value)| value)
        .sum()
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    samples[((samples.len() as f64 - 1.0) * p).round() as usize]
}

/// Polls `url` every 20 ms until `done`; returns each answer's latency (a failure counts as
/// a minute, so it cannot hide in the percentiles).
async fn probe(client: reqwest::Client, url: String, done: CancellationToken) -> Vec<Duration> {
    let mut latencies = Vec::new();
    while !done.is_cancelled() {
        let started = Instant::now();
        let ok = client
            .get(&url)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        latencies.push(if ok { started.elapsed() } else { Duration::from_secs(60) });
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    latencies
}

/// A listener at its limit answers a new connection with a 503 problem document and closes
/// it; connections that trickle header lines are closed after the header read timeout, so
/// the listener frees itself; a body that stalls is answered 408 (the client's fault), and a
/// kept-alive connection that idles is closed. Both APIs, and the metrics say so.
#[sqlx::test(migrations = false)]
async fn slow_and_surplus_connections_are_cut_off_with_clear_answers(pool: PgPool) {
    http_edge::connections::raise_open_files_limit(65_536);
    let dir = tempfile::tempdir().unwrap();
    let (mut serve, command, query) = serve(
        &pool,
        &[
            ("CLOUDPHONE_MAX_CONNECTIONS", "200"),
            ("CLOUDPHONE_HEADER_READ_TIMEOUT_SECS", "2"),
            ("CLOUDPHONE_BODY_READ_TIMEOUT_SECS", "1"),
            ("CLOUDPHONE_KEEP_ALIVE_TIMEOUT_SECS", "1"),
        ],
        dir.path(),
    )
    .await;
    let client = reqwest::Client::new();

    for base in [&command, &query] {
        // 200 take the listener's places (each refused or closed socket says so); 300 more
        // are refused at once with the problem document.
        let trickles: Vec<_> = (0..500)
            .map(|_| {
                tokio::spawn(trickle(
                    host_of(base),
                    Duration::from_millis(300),
                    Duration::from_secs(8),
                ))
            })
            .collect();
        let mut closed_after = Vec::new();
        let mut refused = 0;
        for task in trickles {
            let (closed, written) = task.await.unwrap();
            let written = String::from_utf8_lossy(&written);
            if written.starts_with("HTTP/1.1 503") {
                assert!(written.contains("too_many_connections"), "{written}");
                assert!(written.to_ascii_lowercase().contains("connection: close"), "{written}");
                refused += 1;
            } else {
                closed_after.push(closed.unwrap_or_else(|| panic!("{base}: a trickling socket stayed open 8 s")));
            }
        }
        assert!(
            refused >= 250,
            "{base}: only {refused} of 300 surplus connections were refused"
        );
        // Cut off by the header read timeout (2 s), not by the test's own 8 s.
        let slowest = closed_after.iter().max().copied().unwrap_or_default();
        assert!(
            slowest < Duration::from_secs(5),
            "{base}: a trickling connection was kept {slowest:?}"
        );
        // The listener is free again.
        let answer = client.get(format!("{base}/healthz")).send().await.unwrap();
        assert_eq!(answer.status(), 200);
        let metric = scrape_sum(&client, base, "cloudphone_http_connections_refused_total").await;
        assert!(metric >= refused as f64, "{base}: refused_total {metric} < {refused}");
    }
    let open = scrape_sum(
        &client,
        &command,
        "cloudphone_http_connections_open{listener=\"command\"}",
    )
    .await;
    assert!((1.0..20.0).contains(&open), "open connections gauge: {open}");

    // A body that stops arriving: 408 from both APIs after the body read timeout (1 s), not
    // the request timeout's 503 after 10 s.
    let user = Uuid::now_v7();
    let bearer = tokens::development(&user.to_string(), Role::User);
    for (base, path, code) in [
        (&command, "/v1/users", "\"code\":\"body_timeout\""),
        (&query, "/graphql", "REQUEST_TIMEOUT"),
    ] {
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {bearer}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"tier\":"
        );
        let (answer, took) = exchange(&host_of(base), head.as_bytes(), Duration::from_secs(8)).await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{base}{path}: {answer}");
        assert!(answer.contains(code), "{base}{path}: {answer}");
        assert!(took < Duration::from_secs(4), "{base}{path}: answered after {took:?}");
    }

    // An idle kept-alive connection is closed after the keep-alive timeout (1 s).
    for base in [&command, &query] {
        let mut socket = TcpStream::connect(host_of(base)).await.unwrap();
        socket
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let started = Instant::now();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(6), socket.read_to_end(&mut answer)).await;
        assert!(read.is_ok(), "{base}: an idle connection stayed open 6 s");
        assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "closed before the timeout"
        );
    }
    serve.assert_alive();
}

/// While thousands of sockets trickle header lines at both APIs, `/healthz` of both still
/// answers within milliseconds and portal commands are acknowledged.
#[sqlx::test(migrations = false)]
async fn health_and_commands_answer_while_thousands_of_connections_trickle(pool: PgPool) {
    http_edge::connections::raise_open_files_limit(65_536);
    let dir = tempfile::tempdir().unwrap();
    let (mut serve, command, query) = serve(&pool, &[], dir.path()).await;
    let client = reqwest::Client::new();
    let user = Uuid::now_v7();
    let bearer = tokens::development(&user.to_string(), Role::User);
    let registered = client
        .post(format!("{command}/v1/users"))
        .bearer_auth(&bearer)
        .json(&json!({"tier": "enterprise", "email": "a@example.com", "phone": "+4915112345678"}))
        .send()
        .await
        .unwrap();
    assert_eq!(registered.status(), 201);

    let attack: Vec<_> = (0..4_000)
        .map(|i| {
            let host = host_of(if i % 2 == 0 { &command } else { &query });
            tokio::spawn(trickle(host, Duration::from_millis(500), Duration::from_secs(6)))
        })
        .collect();
    // Let the sockets connect before measuring.
    let deadline = Instant::now() + Duration::from_secs(20);
    while scrape_sum(
        &client,
        &command,
        "cloudphone_http_connections_open{listener=\"command\"}",
    )
    .await
        < 1_500.0
    {
        assert!(Instant::now() < deadline, "the trickling sockets never connected");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let done = CancellationToken::new();
    let probes: Vec<_> = [&command, &query]
        .into_iter()
        .map(|base| tokio::spawn(probe(client.clone(), format!("{base}/healthz"), done.clone())))
        .collect();
    let mut commands = Vec::new();
    let mut device = None;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        let sent = Instant::now();
        portal_command(&client, &command, &bearer, &mut device).await;
        commands.push(sent.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done.cancel();
    for (probe, name) in probes.into_iter().zip(["command", "query"]) {
        let mut latencies = probe.await.unwrap();
        let p99 = percentile(&mut latencies, 0.99);
        assert!(
            p99 < Duration::from_millis(100),
            "{name} API /healthz p99 {p99:?} over {} probes",
            latencies.len()
        );
    }
    let p99 = percentile(&mut commands, 0.99);
    assert!(p99 < Duration::from_millis(250), "portal commands p99 {p99:?}");
    for task in attack {
        task.await.unwrap();
    }
    serve.assert_alive();
}

/// The classic nine-fragment document (each fragment spreading the next several times) and
/// the heaviest documents within the limits, sent by 16 clients at once, starve no role of
/// `serve`: each bomb is refused in milliseconds with `QUERY_TOO_COMPLEX`, and the command
/// API's `/healthz` and commands keep answering.
#[sqlx::test(migrations = false)]
async fn expensive_documents_starve_no_role_of_serve(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let (mut serve, command, query) = serve(&pool, &[], dir.path()).await;
    let client = reqwest::Client::new();
    let admin = tokens::development(&Uuid::from_u128(0xad).to_string(), Role::Admin);
    let user = Uuid::now_v7();
    let bearer = tokens::development(&user.to_string(), Role::User);
    let registered = client
        .post(format!("{command}/v1/users"))
        .bearer_auth(&bearer)
        .json(&json!({"tier": "enterprise", "email": "a@example.com", "phone": "+4915112345678"}))
        .send()
        .await
        .unwrap();
    assert_eq!(registered.status(), 201);

    let mut bomb = String::from("query Bomb { ...F0 }\n");
    for level in 0..9 {
        let spreads = format!("...F{} ", level + 1).repeat(6);
        bomb.push_str(&format!("fragment F{level} on Query {{ {spreads} }}\n"));
    }
    bomb.push_str("fragment F9 on Query { projectionStatus { name position head } }\n");
    // Within every limit, and as costly as they allow: seven full pages (complexity 4907 of
    // 5000).
    let heavy: String = (0..7)
        .map(|i| format!("p{i}: devices(first: 100, orderBy: CREATED_AT_DESC) {{ totalCount nodes {{ id status provider cpuCores memoryMb }} }} "))
        .collect();
    let heavy = format!("{{ {heavy} }}");

    let done = CancellationToken::new();
    let attackers: Vec<_> = (0..16)
        .map(|i| {
            let (client, query, admin, done) = (client.clone(), query.clone(), admin.clone(), done.clone());
            let document = if i % 2 == 0 { bomb.clone() } else { heavy.clone() };
            tokio::spawn(async move {
                let mut refusals = Vec::new();
                while !done.is_cancelled() {
                    let started = Instant::now();
                    let answer = client
                        .post(format!("{query}/graphql"))
                        .bearer_auth(&admin)
                        .json(&json!({"query": document}))
                        .send()
                        .await
                        .unwrap();
                    let status = answer.status().as_u16();
                    let body: Value = answer.json().await.unwrap();
                    assert!(status < 500, "{status}: {body}");
                    if let Some(code) = body["errors"][0]["extensions"]["code"].as_str() {
                        refusals.push((code.to_owned(), started.elapsed()));
                    }
                }
                refusals
            })
        })
        .collect();
    let health = tokio::spawn(probe(client.clone(), format!("{command}/healthz"), done.clone()));
    let started = Instant::now();
    let mut commands = Vec::new();
    let mut device = None;
    while started.elapsed() < Duration::from_secs(5) {
        let sent = Instant::now();
        portal_command(&client, &command, &bearer, &mut device).await;
        commands.push(sent.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done.cancel();
    let mut bombs = Vec::new();
    for attacker in attackers {
        for (code, took) in attacker.await.unwrap() {
            assert_eq!(code, "QUERY_TOO_COMPLEX");
            bombs.push(took);
        }
    }
    assert!(bombs.len() > 50, "only {} bombs answered", bombs.len());
    let bomb_p99 = percentile(&mut bombs, 0.99);
    assert!(
        bomb_p99 < Duration::from_millis(100),
        "a bomb took {bomb_p99:?} to refuse (p99)"
    );
    let mut latencies = health.await.unwrap();
    let p99 = percentile(&mut latencies, 0.99);
    assert!(p99 < Duration::from_millis(100), "command API /healthz p99 {p99:?}");
    let p99 = percentile(&mut commands, 0.99);
    assert!(p99 < Duration::from_millis(250), "portal commands p99 {p99:?}");
    serve.assert_alive();
}

/// A listener full of sockets that trickle headers makes room for a client that sends whole
/// requests: the connection that has waited longest (over a second) for a complete request
/// head is closed, and the new one is served, long before the header read timeout.
#[sqlx::test(migrations = false)]
async fn a_full_listener_makes_room_for_whole_requests(pool: PgPool) {
    http_edge::connections::raise_open_files_limit(65_536);
    let dir = tempfile::tempdir().unwrap();
    let (mut serve, command, query) = serve(
        &pool,
        &[
            ("CLOUDPHONE_MAX_CONNECTIONS", "100"),
            ("CLOUDPHONE_HEADER_READ_TIMEOUT_SECS", "30"),
        ],
        dir.path(),
    )
    .await;
    for base in [&command, &query] {
        let trickles: Vec<_> = (0..100)
            .map(|_| {
                tokio::spawn(trickle(
                    host_of(base),
                    Duration::from_millis(200),
                    Duration::from_secs(6),
                ))
            })
            .collect();
        // The listener full (its 100 places taken), then over a second more: the age at
        // which a socket still without a request head may be evicted.
        // Asked of the other API (one process, one registry): a scrape of this one would
        // need a place of its own.
        let (listener, other) = if base == &command {
            ("command", &query)
        } else {
            ("query", &command)
        };
        let gauge = format!("cloudphone_http_connections_open{{listener=\"{listener}\"}}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while scrape_sum(&reqwest::Client::new(), other, &gauge).await < 100.0 {
            assert!(
                Instant::now() < deadline,
                "{base}: the trickling sockets never filled the listener"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        // A fresh client each time, each kept (with its connection): every one must find room.
        let mut clients = Vec::new();
        for _ in 0..5 {
            let client = reqwest::Client::new();
            let answer = client.get(format!("{base}/healthz")).send().await.unwrap();
            assert_eq!(answer.status(), 200, "{base}");
            clients.push(client);
        }
        let evicted = scrape_sum(
            &reqwest::Client::new(),
            base,
            "cloudphone_http_connections_evicted_total",
        )
        .await;
        assert!(evicted >= 5.0, "{base}: evicted_total {evicted}");
        let mut closed_early = 0;
        for task in trickles {
            if task.await.unwrap().0.is_some() {
                closed_early += 1;
            }
        }
        assert!(
            closed_early >= 5,
            "{base}: only {closed_early} trickling sockets made room"
        );
    }
    serve.assert_alive();
}

/// A client that asks and then stops reading (its answers fill the socket buffers, so the
/// server's writes stall) loses its connection a couple of keep-alive timeouts later, instead
/// of holding it forever.
#[sqlx::test(migrations = false)]
async fn a_client_that_stops_reading_loses_its_connection(pool: PgPool) {
    let dir = tempfile::tempdir().unwrap();
    let (mut serve, command, _query) = serve(&pool, &[("CLOUDPHONE_KEEP_ALIVE_TIMEOUT_SECS", "1")], dir.path()).await;
    let client = reqwest::Client::new();
    let open = || {
        scrape_sum(
            &client,
            &command,
            "cloudphone_http_connections_open{listener=\"command\"}",
        )
    };
    let before = open().await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4_096).unwrap();
    let mut stream = socket.connect(host_of(&command).parse().unwrap()).await.unwrap();
    // 300 pipelined requests for the OpenAPI document (tens of kB each): megabytes of answers
    // that nobody reads.
    let requests = "GET /openapi.json HTTP/1.1\r\nhost: x\r\n\r\n".repeat(300);
    stream.write_all(requests.as_bytes()).await.unwrap();
    let started = Instant::now();
    // The server counts the connection when its accept loop takes it, which may be after our
    // connect returned: await that, or the loop below would end before it began.
    while open().await < before + 1.0 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "our connection was never counted as open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The scrapes reuse one kept-alive connection, counted in `before` too.
    while open().await > before {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "a stalled reader kept its connection 15 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let held = started.elapsed();
    assert!(
        held >= Duration::from_millis(900),
        "closed after {held:?}, before any timeout"
    );
    drop(stream);
    serve.assert_alive();
}

/// One portal command, as a dashboard user sends them: the first creates a device, the next
/// start and stop it in turn (within any quota however fast they go); panics unless it
/// succeeds.
async fn portal_command(client: &reqwest::Client, command: &str, bearer: &str, device: &mut Option<(String, bool)>) {
    let request = match device {
        None => client
            .post(format!("{command}/v1/devices"))
            .json(&json!({"provider": "aws", "cpu_cores": 1, "memory_mb": 1024, "android_version": 14})),
        Some((id, false)) => client.post(format!("{command}/v1/devices/{id}/start")),
        Some((id, true)) => client.post(format!("{command}/v1/devices/{id}/stop")),
    };
    let answer = request.bearer_auth(bearer).send().await.unwrap();
    let status = answer.status();
    let body: Value = answer.json().await.unwrap_or_default();
    assert!(status.is_success(), "{status}: {body}");
    *device = match device.take() {
        None => Some((body["id"].as_str().unwrap().to_owned(), false)),
        Some((id, running)) => Some((id, !running)),
    };
}
