//! What dashboards ask: the five query kinds and their weights in the mix, the dashboards
//! being watched (a user, one of their devices, a 30-day range with usage), and the prepared
//! requests of each (dashboard, kind) for a server under load, sent and timed.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::NaiveDate;
use http_edge::auth::Role;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::cli::LoadQueriesArgs;
use crate::harness::tokens::load_token;

/// Days of the range a dashboard shows.
const RANGE_DAYS: i64 = 30;

/// What a dashboard asks, with the weight of each in the mix (percent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    DeviceStats,
    DailyUsage,
    DevicesPage,
    Device,
    UserOverview,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::DeviceStats,
        Kind::DailyUsage,
        Kind::DevicesPage,
        Kind::Device,
        Kind::UserOverview,
    ];

    /// Its key in `queries.json`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::DeviceStats => "device_stats",
            Kind::DailyUsage => "daily_usage",
            Kind::DevicesPage => "devices_page",
            Kind::Device => "device",
            Kind::UserOverview => "user_overview",
        }
    }

    /// Its percent of the mix.
    pub fn weight(self) -> u32 {
        match self {
            Kind::DeviceStats | Kind::DailyUsage | Kind::DevicesPage => 25,
            Kind::Device => 15,
            Kind::UserOverview => 10,
        }
    }

    /// The kind a roll in 0..100 lands on.
    pub fn pick(roll: u32) -> Kind {
        let mut below = 0;
        for kind in Kind::ALL {
            below += kind.weight();
            if roll < below {
                return kind;
            }
        }
        Kind::UserOverview
    }

    /// Its place in [`Kind::ALL`] (and in a [`Target`]'s bodies).
    pub fn index(self) -> usize {
        self as usize
    }

    /// The query API's equivalent of the `queries.json` query.
    pub fn ours(self) -> &'static str {
        match self {
            Kind::DeviceStats => {
                "query DeviceStats($userId: UUID!) {
  deviceStats(filter: { userId: $userId }) {
    rows { status provider deviceCount cpuCores memoryMb }
    totals { deviceCount cpuCores memoryMb }
  }
}"
            }
            Kind::DailyUsage => {
                "query DailyUsage($userId: UUID!, $from: NaiveDate!, $to: NaiveDate!) {
  dailyUsage(filter: { userId: $userId, from: $from, to: $to }) {
    rows { period minutes cost { amountMinor currency } }
    totals { minutes costs { amountMinor currency } }
  }
}"
            }
            Kind::DevicesPage => {
                "query DevicesPage($userId: UUID!) {
  devices(filter: { userId: $userId }, first: 20) {
    totalCount
    pageInfo { hasNextPage endCursor }
    nodes { id status provider cpuCores memoryMb createdAt }
  }
}"
            }
            Kind::Device => {
                "query Device($deviceId: UUID!) {
  device(id: $deviceId) {
    id ownerId provider status cpuCores memoryMb androidVersion
    createdAt lastStartedAt minutesUsed updatedPosition
  }
}"
            }
            Kind::UserOverview => {
                "query UserOverview($userId: UUID!, $from: NaiveDate!, $to: NaiveDate!) {
  user(id: $userId) {
    devices(first: 10) {
      totalCount
      pageInfo { hasNextPage endCursor }
      nodes { id status provider cpuCores memoryMb createdAt }
    }
    usage(from: $from, to: $to) {
      rows { period minutes cost { amountMinor currency } }
      totals { minutes costs { amountMinor currency } }
    }
  }
}"
            }
        }
    }
}

/// One watched dashboard: a user, one of their devices, and the range it shows.
#[derive(Debug, Clone)]
pub struct Dashboard {
    pub user: Uuid,
    pub device: Uuid,
    pub from: NaiveDate,
    pub to: NaiveDate,
}

impl Dashboard {
    /// The variables of the query API's query of `kind` for this dashboard.
    pub fn variables(&self, kind: Kind) -> Value {
        match kind {
            Kind::DeviceStats | Kind::DevicesPage => json!({"userId": self.user}),
            Kind::DailyUsage | Kind::UserOverview => json!({
                "userId": self.user,
                "from": self.from.to_string(),
                "to": self.to.to_string(),
            }),
            Kind::Device => json!({"deviceId": self.device}),
        }
    }
}

/// A server under load: where to send, and the prepared request of each (dashboard, kind).
#[derive(Debug)]
pub struct Target {
    pub label: &'static str,
    pub url: String,
    /// Per dashboard, per kind (in `Kind::ALL` order): the JSON request body.
    pub bodies: Vec<[Vec<u8>; 5]>,
    /// Per dashboard: the `Authorization` header (PostGraphile has no auth and ignores the
    /// admin token it is sent; it is there so both servers parse the same requests).
    pub auth: Vec<HeaderValue>,
    pub flavor: Flavor,
}

/// Which server a target is: the answers differ in shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Ours,
    PostGraphile,
}

/// The query API at `url` as a target: its queries, each watched user's own token.
pub fn ours_target(label: &'static str, url: String, dashboards: &[Dashboard]) -> anyhow::Result<Target> {
    let mut bodies = Vec::with_capacity(dashboards.len());
    let mut auth = Vec::with_capacity(dashboards.len());
    for dashboard in dashboards {
        let body =
            |kind: Kind| serde_json::to_vec(&json!({"query": kind.ours(), "variables": dashboard.variables(kind)}));
        bodies.push([
            body(Kind::DeviceStats)?,
            body(Kind::DailyUsage)?,
            body(Kind::DevicesPage)?,
            body(Kind::Device)?,
            body(Kind::UserOverview)?,
        ]);
        let token = load_token(&dashboard.user.to_string(), Role::User)?;
        auth.push(HeaderValue::from_str(&format!("Bearer {token}"))?);
    }
    Ok(Target {
        label,
        url,
        bodies,
        auth,
        flavor: Flavor::Ours,
    })
}

/// PostGraphile at `url` as a target, labelled `label`: the queries of its `queries.json`, an
/// admin token it ignores.
pub fn postgraphile_target(
    label: &'static str,
    url: String,
    queries: &Value,
    dashboards: &[Dashboard],
) -> anyhow::Result<Target> {
    let mut bodies = Vec::with_capacity(dashboards.len());
    for dashboard in dashboards {
        let body = |kind: Kind| -> anyhow::Result<Vec<u8>> {
            let entry = &queries[kind.name()];
            let query = entry["query"]
                .as_str()
                .with_context(|| format!("queries.json has no query for `{}`", kind.name()))?;
            let mut variables = serde_json::Map::new();
            if let Some(given) = entry["variables"].as_object() {
                for (name, value) in given {
                    let value = match value.as_str() {
                        Some("$USER_ID") => json!(dashboard.user),
                        Some("$DEVICE_ID") => json!(dashboard.device),
                        Some("$FROM") => json!(dashboard.from.to_string()),
                        Some("$TO") => json!(dashboard.to.to_string()),
                        _ => value.clone(),
                    };
                    variables.insert(name.clone(), value);
                }
            }
            Ok(serde_json::to_vec(&json!({"query": query, "variables": variables}))?)
        };
        bodies.push([
            body(Kind::DeviceStats)?,
            body(Kind::DailyUsage)?,
            body(Kind::DevicesPage)?,
            body(Kind::Device)?,
            body(Kind::UserOverview)?,
        ]);
    }
    let admin = load_token(&Uuid::now_v7().to_string(), Role::Admin)?;
    let admin = HeaderValue::from_str(&format!("Bearer {admin}"))?;
    Ok(Target {
        label,
        url,
        auth: vec![admin; bodies.len()],
        bodies,
        flavor: Flavor::PostGraphile,
    })
}

/// The watched dashboards: users with a live device and usage, drawn with the seed; each
/// with one of its devices and a 30-day range that holds usage.
pub async fn pick_dashboards(pool: &PgPool, args: &LoadQueriesArgs) -> anyhow::Result<Vec<Dashboard>> {
    let owners: Vec<(Uuid, Vec<Uuid>)> = sqlx::query_as(
        "SELECT owner_id, array_agg(device_id ORDER BY created_at, device_id)
         FROM devices GROUP BY owner_id HAVING bool_or(status <> 'deleted') ORDER BY owner_id",
    )
    .fetch_all(pool)
    .await?;
    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut order: Vec<usize> = (0..owners.len()).collect();
    order.shuffle(&mut rng);
    order.truncate(args.hot_users.saturating_mul(2) + 16);
    let candidates: Vec<Uuid> = order.iter().map(|i| owners[*i].0).collect();
    let days: Vec<(Uuid, Vec<NaiveDate>)> = sqlx::query_as(
        "SELECT user_id, array_agg(DISTINCT day ORDER BY day) FROM daily_usage WHERE user_id = ANY($1) GROUP BY user_id",
    )
    .bind(&candidates)
    .fetch_all(pool)
    .await?;
    let days: BTreeMap<Uuid, Vec<NaiveDate>> = days.into_iter().collect();
    let mut dashboards = Vec::with_capacity(args.hot_users);
    for index in order {
        let (user, devices) = &owners[index];
        let Some(user_days) = days.get(user).filter(|d| !d.is_empty()) else {
            continue;
        };
        let (Some(last), Some(device)) = (user_days.last(), devices.get(rng.random_range(0..devices.len()))) else {
            continue;
        };
        let day = user_days[rng.random_range(0..user_days.len())];
        let to = (day + chrono::Duration::days(rng.random_range(0..RANGE_DAYS))).min(*last);
        dashboards.push(Dashboard {
            user: *user,
            device: *device,
            from: to - chrono::Duration::days(RANGE_DAYS - 1),
            to,
        });
        if dashboards.len() == args.hot_users {
            break;
        }
    }
    if dashboards.len() < args.hot_users {
        println!(
            "  only {} users have live devices and usage: watching {} dashboards",
            dashboards.len(),
            dashboards.len()
        );
    }
    if dashboards.is_empty() {
        bail!("no user has live devices and usage to watch");
    }
    Ok(dashboards)
}

/// One request, timed from send to the last byte of the answer.
#[derive(Debug)]
pub struct Sent {
    pub elapsed: Duration,
    /// The answer's body, or why it failed.
    pub outcome: Result<Vec<u8>, String>,
    /// The `x-cache` header (the query API only).
    pub cache: Option<&'static str>,
}

/// Sends the query of `kind` of the `dashboard`-th dashboard to `target`.
pub async fn send(client: &reqwest::Client, target: &Target, dashboard: usize, kind: Kind) -> Sent {
    let mut request = client
        .post(&target.url)
        .header(CONTENT_TYPE, "application/json")
        .body(target.bodies[dashboard][kind.index()].clone());
    if let Some(auth) = target.auth.get(dashboard) {
        request = request.header(AUTHORIZATION, auth.clone());
    }
    let started = Instant::now();
    let response = request.send().await;
    let (outcome, cache) = match response {
        Ok(response) => {
            let status = response.status();
            let cache = response.headers().get("x-cache").and_then(|v| match v.as_bytes() {
                b"hit" => Some("hit"),
                b"miss" => Some("miss"),
                b"bypass" => Some("bypass"),
                _ => None,
            });
            match response.bytes().await {
                Ok(body) if status.is_success() && !mentions_errors(&body) => (Ok(body.to_vec()), cache),
                Ok(body) => (Err(error_reason(status.as_u16(), &body)), cache),
                Err(error) => (Err(transport_reason(&error)), cache),
            }
        }
        Err(error) => (Err(transport_reason(&error)), None),
    };
    Sent {
        elapsed: started.elapsed(),
        outcome,
        cache,
    }
}

fn mentions_errors(body: &[u8]) -> bool {
    body.windows(8).any(|w| w == b"\"errors\"")
}

fn transport_reason(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        "timeout".to_owned()
    } else {
        format!("transport: {error}")
    }
}

/// The status and the first error's code or message, as the report counts it.
fn error_reason(status: u16, body: &[u8]) -> String {
    let parsed: Value = serde_json::from_slice(body).unwrap_or_default();
    let error = &parsed["errors"][0];
    let what = error["extensions"]["code"]
        .as_str()
        .or_else(|| error["message"].as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned());
    format!("{status} {what}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mix_has_its_weights() {
        assert_eq!(Kind::ALL.iter().map(|k| k.weight()).sum::<u32>(), 100);
        let mut counts = BTreeMap::new();
        for roll in 0..100 {
            *counts.entry(Kind::pick(roll)).or_insert(0u32) += 1;
        }
        for kind in Kind::ALL {
            assert_eq!(counts[&kind], kind.weight(), "{kind:?}");
            assert_eq!(Kind::ALL[kind.index()], kind);
        }
    }
}
