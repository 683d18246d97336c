//! What a dashboard's answers say, reduced to what two servers must agree on (counts, sums,
//! device ids): every (dashboard, kind) asked once and checked for data, and two servers'
//! answers compared, before anything is timed.

use anyhow::{Context, bail};
use futures::StreamExt;
use serde_json::{Value, json};

use crate::workloads::dashboards::{Dashboard, Flavor, Kind, Sent, Target, send};

/// What one answer says, reduced to what both servers must agree on.
pub type Facts = Value;

/// Asks every (dashboard, kind) once, `concurrency` at a time; fails on the first error, and
/// returns what each answer says.
pub async fn pass(client: &reqwest::Client, target: &Target, concurrency: usize) -> anyhow::Result<Vec<[Facts; 5]>> {
    let work: Vec<(usize, Kind)> = (0..target.bodies.len())
        .flat_map(|d| Kind::ALL.into_iter().map(move |k| (d, k)))
        .collect();
    let answers: Vec<(usize, Kind, Sent)> = futures::stream::iter(work)
        .map(|(d, kind)| async move { (d, kind, send(client, target, d, kind).await) })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let mut facts: Vec<[Facts; 5]> = (0..target.bodies.len()).map(|_| Default::default()).collect();
    for (d, kind, sent) in answers {
        let body = sent.outcome.map_err(|reason| {
            anyhow::anyhow!("{}: `{}` of dashboard {d} failed: {reason}", target.label, kind.name())
        })?;
        let answer: Value = serde_json::from_slice(&body).with_context(|| {
            format!(
                "{}: `{}` answered with something that is not JSON",
                target.label,
                kind.name()
            )
        })?;
        facts[d][kind.index()] = match target.flavor {
            Flavor::Ours => facts_ours(kind, &answer["data"]),
            Flavor::PostGraphile => facts_postgraphile(kind, &answer["data"]),
        }
        .with_context(|| {
            format!(
                "{}: `{}` of dashboard {d} answered {}",
                target.label,
                kind.name(),
                String::from_utf8_lossy(&body[..body.len().min(600)])
            )
        })?;
    }
    Ok(facts)
}

/// An integer sent as a JSON number or (BigInt, BigFloat) string.
fn int(value: &Value) -> anyhow::Result<i64> {
    match value {
        Value::Number(n) => n.as_i64().context("not an integer"),
        Value::String(s) => s
            .parse::<i64>()
            .or_else(|_| s.parse::<f64>().map(|f| f.round() as i64))
            .with_context(|| format!("`{s}` is not a number")),
        other => bail!("{other} is not a number"),
    }
}

fn array<'a>(value: &'a Value, what: &str) -> anyhow::Result<&'a Vec<Value>> {
    value.as_array().with_context(|| format!("{what} is not a list"))
}

fn ids(nodes: &[Value], field: &str) -> Value {
    Value::Array(nodes.iter().map(|n| n[field].clone()).collect())
}

fn facts_ours(kind: Kind, data: &Value) -> anyhow::Result<Facts> {
    Ok(match kind {
        Kind::DeviceStats => {
            let stats = &data["deviceStats"];
            json!({
                "rows": array(&stats["rows"], "rows")?.len(),
                "devices": int(&stats["totals"]["deviceCount"])?,
                "cpu": int(&stats["totals"]["cpuCores"])?,
                "memory": int(&stats["totals"]["memoryMb"])?,
            })
        }
        Kind::DailyUsage => usage_ours(&data["dailyUsage"])?,
        Kind::DevicesPage => page_ours(&data["devices"])?,
        Kind::Device => device_facts(&data["device"], "id")?,
        Kind::UserOverview => {
            let user = &data["user"];
            if user.is_null() {
                bail!("no user");
            }
            json!({"devices": page_ours(&user["devices"])?, "usage": usage_ours(&user["usage"])?})
        }
    })
}

/// A device's facts; the two servers differ only in the name of its id field.
fn device_facts(device: &Value, id_field: &str) -> anyhow::Result<Facts> {
    if device.is_null() {
        bail!("no device");
    }
    Ok(json!({
        "id": device[id_field],
        "owner": device["ownerId"],
        "status": device["status"].as_str().unwrap_or_default().to_lowercase(),
        "provider": device["provider"].as_str().unwrap_or_default().to_lowercase(),
        "cpu": int(&device["cpuCores"])?,
        "minutes": int(&device["minutesUsed"])?,
    }))
}

fn usage_ours(usage: &Value) -> anyhow::Result<Facts> {
    let days = array(&usage["rows"], "rows")?.len();
    let costs = array(&usage["totals"]["costs"], "costs")?;
    let cost = costs
        .iter()
        .map(|c| int(&c["amountMinor"]))
        .sum::<anyhow::Result<i64>>()?;
    Ok(json!({"days": days, "minutes": int(&usage["totals"]["minutes"])?, "cost": cost}))
}

fn page_ours(page: &Value) -> anyhow::Result<Facts> {
    let nodes = array(&page["nodes"], "nodes")?;
    Ok(json!({
        "total": int(&page["totalCount"])?,
        "next": page["pageInfo"]["hasNextPage"],
        "ids": ids(nodes, "id"),
    }))
}

fn facts_postgraphile(kind: Kind, data: &Value) -> anyhow::Result<Facts> {
    Ok(match kind {
        Kind::DeviceStats => {
            let stats = &data["allDeviceStats"];
            let sum = &stats["aggregates"]["sum"];
            json!({
                "rows": array(&stats["nodes"], "nodes")?.len(),
                "devices": int(&sum["deviceCount"])?,
                "cpu": int(&sum["totalCpuCores"])?,
                "memory": int(&sum["totalMemoryMb"])?,
            })
        }
        Kind::DailyUsage => usage_postgraphile(&data["allDailyUsages"])?,
        Kind::DevicesPage => page_postgraphile(&data["allDevices"])?,
        Kind::Device => device_facts(&data["deviceByDeviceId"], "deviceId")?,
        Kind::UserOverview => json!({
            "devices": page_postgraphile(&data["devices"])?,
            "usage": usage_postgraphile(&data["usage"])?,
        }),
    })
}

/// PostGraphile answers one row per (day, device): the days are the distinct `day`s.
fn usage_postgraphile(usage: &Value) -> anyhow::Result<Facts> {
    let nodes = array(&usage["nodes"], "nodes")?;
    let mut days: Vec<&str> = nodes.iter().filter_map(|n| n["day"].as_str()).collect();
    days.dedup();
    let sum = &usage["aggregates"]["sum"];
    Ok(json!({"days": days.len(), "minutes": int(&sum["minutes"])?, "cost": int(&sum["costMinor"])?}))
}

fn page_postgraphile(page: &Value) -> anyhow::Result<Facts> {
    let nodes = array(&page["nodes"], "nodes")?;
    Ok(json!({
        "total": int(&page["totalCount"])?,
        "next": page["pageInfo"]["hasNextPage"],
        "ids": ids(nodes, "deviceId"),
    }))
}

/// Every kind of every dashboard answered with data (not empty lists).
pub fn check_answers(facts: &[[Facts; 5]], dashboards: &[Dashboard]) -> anyhow::Result<()> {
    for (d, answers) in facts.iter().enumerate() {
        let empty = |kind: Kind, what: &str| {
            anyhow::anyhow!(
                "`{}` of dashboard {d} (user {}) answered no {what}: {}",
                kind.name(),
                dashboards[d].user,
                answers[kind.index()]
            )
        };
        if answers[Kind::DeviceStats.index()]["rows"].as_u64().unwrap_or(0) == 0 {
            return Err(empty(Kind::DeviceStats, "rows"));
        }
        if answers[Kind::DailyUsage.index()]["days"].as_u64().unwrap_or(0) == 0 {
            return Err(empty(Kind::DailyUsage, "usage"));
        }
        if answers[Kind::DevicesPage.index()]["ids"]
            .as_array()
            .is_none_or(Vec::is_empty)
        {
            return Err(empty(Kind::DevicesPage, "devices"));
        }
        let overview = &answers[Kind::UserOverview.index()];
        if overview["devices"]["ids"].as_array().is_none_or(Vec::is_empty) || overview["usage"]["days"] == 0 {
            return Err(empty(Kind::UserOverview, "devices or usage"));
        }
    }
    Ok(())
}

/// Fails on the first answer of `answers` that differs from `reference`'s.
pub fn compare(reference: &[[Facts; 5]], answers: &[[Facts; 5]], label: &str) -> anyhow::Result<()> {
    for (d, (ours, theirs)) in reference.iter().zip(answers).enumerate() {
        for kind in Kind::ALL {
            let (a, b) = (&ours[kind.index()], &theirs[kind.index()]);
            if a != b {
                bail!(
                    "{label} answers `{}` of dashboard {d} differently from the uncached query API:\n  query API: {a}\n  {label}: {b}",
                    kind.name()
                );
            }
        }
    }
    Ok(())
}
