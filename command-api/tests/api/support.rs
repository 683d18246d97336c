//! `TestApp`: the real server on port 0 over the test's own database, and typed helpers.

use std::net::SocketAddr;
use std::time::Duration;

use command_api::{ApiConfig, Application};
use http_edge::auth::Role;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::PgPool;
use test_support::tokens;
use tokio::sync::oneshot;
use uuid::Uuid;

pub const SECRET: &str = "test-secret";

pub struct TestApp {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    pub pool: PgPool,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

/// A response's status and JSON body (`Value::Null` when the body is not JSON).
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub content_type: String,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Answer {
    pub fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or("")
    }
}

impl TestApp {
    pub async fn spawn(pool: PgPool) -> Self {
        Self::spawn_with(pool, |_| {}).await
    }

    pub async fn spawn_with(pool: PgPool, configure: impl FnOnce(&mut ApiConfig)) -> Self {
        event_log::migrate(&pool).await.expect("migrate");
        let mut config = ApiConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            keys: http_edge::auth::KeySource::Secret(SECRET.into()),
            ..ApiConfig::default()
        };
        configure(&mut config);
        let app = Application::build(config, pool.clone(), http_edge::telemetry::prometheus())
            .await
            .expect("build app");
        let addr = app.local_addr();
        let (shutdown, stop) = oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until_stopped(async move {
            let _ = stop.await;
        }));
        TestApp {
            addr,
            client: reqwest::Client::new(),
            pool,
            shutdown: Some(shutdown),
            server: Some(server),
        }
    }

    /// Stops the server gracefully and waits for it.
    pub async fn stop(&mut self) -> std::io::Result<()> {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        match self.server.take() {
            Some(server) => server.await.expect("server task"),
            None => Ok(()),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn token(role: Role, subject: &str, scopes: &[&str]) -> String {
        tokens::signed(SECRET, subject, role, scopes)
    }

    pub fn user_token(user: Uuid) -> String {
        Self::token(Role::User, &user.to_string(), &[])
    }

    pub fn admin_token() -> String {
        Self::token(Role::Admin, &Uuid::now_v7().to_string(), &[])
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut request = self
            .client
            .request(method, self.url(path))
            .timeout(Duration::from_secs(30));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        Self::answer(request.send().await.expect("request")).await
    }

    pub async fn answer(response: reqwest::Response) -> Answer {
        let status = response.status();
        let headers = response.headers().clone();
        let content_type = headers
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let bytes = response.bytes().await.expect("body");
        Answer {
            status,
            content_type,
            headers,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        }
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> Answer {
        self.send(Method::POST, path, Some(token), Some(body), &[]).await
    }

    pub async fn post_empty(&self, path: &str, token: &str) -> Answer {
        self.send(Method::POST, path, Some(token), None, &[]).await
    }

    /// Registers `user` (with its own token) on the given tier and returns that token.
    pub async fn register(&self, user: Uuid, tier: &str) -> String {
        let token = Self::user_token(user);
        let answer = self
            .post(
                "/v1/users",
                &token,
                json!({"tier": tier, "email": "someone@example.com", "phone": "+4915112345678"}),
            )
            .await;
        assert_eq!(answer.status, StatusCode::CREATED, "{answer:?}");
        token
    }

    /// Creates a device for the token's user and returns its id.
    pub async fn create_device(&self, token: &str) -> Uuid {
        let answer = self
            .post(
                "/v1/devices",
                token,
                json!({"provider": "aws", "cpu_cores": 2, "memory_mb": 2048, "android_version": 14}),
            )
            .await;
        assert_eq!(answer.status, StatusCode::CREATED, "{answer:?}");
        answer.body["id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("device id")
    }

    pub async fn event_count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM user_events_all")
            .fetch_one(&self.pool)
            .await
            .expect("count")
    }

    pub async fn head(&self) -> i64 {
        sqlx::query_scalar("SELECT position FROM log_head")
            .fetch_one(&self.pool)
            .await
            .expect("head")
    }

    /// Event types of a stream, in order.
    pub async fn stream_types(&self, stream: Uuid) -> Vec<String> {
        sqlx::query_scalar("SELECT event_type FROM user_events_all WHERE stream_id = $1 ORDER BY stream_version")
            .bind(stream)
            .fetch_all(&self.pool)
            .await
            .expect("stream")
    }
}
