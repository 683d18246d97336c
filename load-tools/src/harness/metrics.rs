//! Prometheus text pages scraped from a role's `/metrics`, and sums over their series.

use std::collections::BTreeMap;

/// The samples of a Prometheus text page, by series.
pub async fn scrape(client: &reqwest::Client, base: &str) -> anyhow::Result<BTreeMap<String, f64>> {
    let text = client.get(format!("{base}/metrics")).send().await?.text().await?;
    Ok(text
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect())
}

/// The sum of a metric's series whose labels contain `label`.
pub fn metric_sum(samples: &BTreeMap<String, f64>, name: &str, label: &str) -> f64 {
    samples
        .iter()
        .filter(|(series, _)| {
            series.strip_prefix(name).is_some_and(|rest| rest.starts_with('{')) && series.contains(label)
        })
        .map(|(_, value)| value)
        .sum()
}

/// The sum of the series whose name and labels start with `name` (0 when the scrape fails).
pub async fn metric(client: &reqwest::Client, base: &str, name: &str) -> f64 {
    let Ok(samples) = scrape(client, base).await else {
        return 0.0;
    };
    samples
        .iter()
        .filter(|(series, _)| series.starts_with(name))
        .map(|(_, value)| value)
        .sum()
}
