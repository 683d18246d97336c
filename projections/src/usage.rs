//! `daily_usage`: billed minutes and cost per UTC day, user and device.
//!
//! A session that crosses midnight is split between the days it touches, to the minute: the
//! session's billed minutes are consecutive minutes from its start (the last one possibly
//! partial), and each belongs to the UTC day in which it starts. The cost follows the minutes,
//! split by largest remainders (ties to the earlier day). So the days always add up exactly to
//! the session's minutes and cost, no day is negative, and no day gets more minutes than it
//! had time for, rounded up.

use chrono::{DateTime, Duration, NaiveDate, Utc};
use event_schema::UsageRecorded;
use read_models::usage::{ProviderDayKey, ProviderUsage, UsageDelta, UsageKey};

/// One day's share of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DayShare {
    pub day: NaiveDate,
    pub minutes: i64,
    pub cost_minor: i64,
}

/// Splits a session between the UTC days it touches.
pub fn split_by_day(
    started_at: DateTime<Utc>,
    ended_at: DateTime<Utc>,
    minutes: i64,
    cost_minor: i64,
) -> Vec<DayShare> {
    let first = started_at.date_naive();
    if ended_at <= started_at {
        return vec![DayShare {
            day: first,
            minutes,
            cost_minor,
        }];
    }
    // Time (ms) the session spent in each day.
    let mut spans = Vec::new();
    let mut day = first;
    let mut cursor = started_at;
    while cursor < ended_at {
        let next_midnight = (day + Duration::days(1))
            .and_hms_opt(0, 0, 0)
            .map_or(ended_at, |t| t.and_utc());
        let until = next_midnight.min(ended_at);
        spans.push((day, (until - cursor).num_milliseconds()));
        cursor = until;
        day += Duration::days(1);
    }
    // Billed minute i starts at started_at + i minutes; the minutes starting before the end
    // of a day's span number ceil(elapsed / 1 min), capped at the session's minutes.
    let mut day_minutes = Vec::with_capacity(spans.len());
    let (mut elapsed_ms, mut counted) = (0i64, 0i64);
    for (_, ms) in &spans {
        elapsed_ms += ms;
        let started_before = (elapsed_ms + 59_999).div_euclid(60_000).min(minutes.max(0));
        day_minutes.push(started_before - counted);
        counted = started_before;
    }
    if let Some(last) = day_minutes.last_mut() {
        // Minutes billed beyond the session's length (never, with the domain's rounding).
        *last += minutes.max(0) - counted;
    }
    // Cost follows the minutes; a session of zero minutes puts its cost where its time was.
    let cost_weights = if minutes > 0 {
        day_minutes.clone()
    } else {
        spans.iter().map(|(_, ms)| *ms).collect()
    };
    let day_costs = largest_remainder(cost_minor, &cost_weights);
    spans
        .iter()
        .zip(day_minutes.into_iter().zip(day_costs))
        .map(|((day, _), (minutes, cost_minor))| DayShare {
            day: *day,
            minutes,
            cost_minor,
        })
        .collect()
}

/// Splits `total` into integer parts proportional to `weights`, summing exactly to `total`.
fn largest_remainder(total: i64, weights: &[i64]) -> Vec<i64> {
    let sum: i128 = weights.iter().map(|w| i128::from((*w).max(0))).sum();
    if weights.is_empty() {
        return Vec::new();
    }
    if sum == 0 {
        let mut parts = vec![0; weights.len()];
        parts[0] = total;
        return parts;
    }
    let total = i128::from(total);
    let mut parts: Vec<i128> = weights.iter().map(|w| total * i128::from((*w).max(0)) / sum).collect();
    let mut remainders: Vec<(usize, i128)> = weights
        .iter()
        .enumerate()
        .map(|(i, w)| (i, (total * i128::from((*w).max(0))) % sum))
        .collect();
    // Largest remainder first; ties to the earlier day.
    remainders.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let missing = total - parts.iter().sum::<i128>();
    for (i, _) in remainders.iter().take(usize::try_from(missing.max(0)).unwrap_or(0)) {
        parts[*i] += 1;
    }
    parts
        .into_iter()
        .map(|p| i64::try_from(p).unwrap_or(i64::MAX))
        .collect()
}

/// Adds a usage event to per-key deltas.
pub fn fold_usage(deltas: &mut std::collections::BTreeMap<(UsageKey, String), UsageDelta>, usage: &UsageRecorded) {
    fold_usage_shares(usage, |key, share| {
        let delta = deltas.entry(key).or_default();
        delta.minutes += share.minutes;
        delta.cost_minor += share.cost_minor;
    });
}

/// Calls `add` with each day's share of `usage` under its `daily_usage` key and currency.
pub fn fold_usage_shares(usage: &UsageRecorded, mut add: impl FnMut((UsageKey, String), UsageDelta)) {
    let currency = usage.cost.currency.to_string();
    let shares = split_by_day(
        usage.started_at,
        usage.ended_at,
        i64::from(usage.minutes),
        usage.cost.amount_minor,
    );
    for share in shares {
        let key = UsageKey {
            day: share.day,
            user_id: usage.owner_id,
            device_id: usage.device_id,
        };
        add(
            (key, currency.clone()),
            UsageDelta {
                minutes: share.minutes,
                cost_minor: share.cost_minor,
            },
        );
    }
}

/// Adds a usage event to per-provider deltas, split by day exactly as [`fold_usage`] splits it.
pub fn fold_usage_by_provider(
    deltas: &mut std::collections::BTreeMap<ProviderDayKey, ProviderUsage>,
    usage: &UsageRecorded,
) {
    fold_provider_shares(usage, |key, share| {
        let delta = deltas.entry(key).or_default();
        *delta = delta.plus(share);
    });
}

/// Calls `add` with each day's share of `usage` under its per-provider key.
pub fn fold_provider_shares(usage: &UsageRecorded, mut add: impl FnMut(ProviderDayKey, ProviderUsage)) {
    let shares = split_by_day(
        usage.started_at,
        usage.ended_at,
        i64::from(usage.minutes),
        usage.cost.amount_minor,
    );
    for share in shares {
        add(
            ProviderDayKey {
                user_id: usage.owner_id,
                day: share.day,
                provider: usage.provider,
                currency: usage.cost.currency.to_string(),
            },
            ProviderUsage {
                minutes: share.minutes,
                cost_minor: share.cost_minor,
                sessions: 1,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use proptest::prelude::*;

    use super::*;

    fn at(d: u32, h: u32, m: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, d, h, m, s).single().unwrap_or_default()
    }

    fn day(d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(2026, 3, d).unwrap_or_default()
    }

    #[test]
    fn a_session_across_midnight_is_split_to_the_minute() {
        // 23:50 -> 00:10: 20 minutes, 10 on each side; 20 cents split the same way.
        let shares = split_by_day(at(1, 23, 50, 0), at(2, 0, 10, 0), 20, 20);
        assert_eq!(
            shares,
            [
                DayShare {
                    day: day(1),
                    minutes: 10,
                    cost_minor: 10
                },
                DayShare {
                    day: day(2),
                    minutes: 10,
                    cost_minor: 10
                }
            ]
        );
        // 23:45 -> 00:05: 15 and 5 minutes, cost 7 cents follows the minutes: 5.25 -> 5, 1.75 -> 2.
        let shares = split_by_day(at(1, 23, 45, 0), at(2, 0, 5, 0), 20, 7);
        assert_eq!(
            shares.iter().map(|s| (s.minutes, s.cost_minor)).collect::<Vec<_>>(),
            [(15, 5), (5, 2)]
        );
    }

    #[test]
    fn a_billed_minute_over_midnight_goes_to_one_day_only() {
        // 23:59:30 -> 00:00:30 bills one minute, which started before midnight.
        let shares = split_by_day(at(1, 23, 59, 30), at(2, 0, 0, 30), 1, 1);
        assert_eq!(shares.iter().map(|s| s.minutes).collect::<Vec<_>>(), [1, 0]);
    }

    #[test]
    fn a_session_over_several_days_touches_each() {
        let shares = split_by_day(at(1, 12, 0, 0), at(4, 12, 0, 0), 4320, 864);
        assert_eq!(
            shares.iter().map(|s| s.minutes).collect::<Vec<_>>(),
            [720, 1440, 1440, 720]
        );
        assert_eq!(shares.iter().map(|s| s.cost_minor).sum::<i64>(), 864);
    }

    proptest! {
        #[test]
        fn days_always_add_up_to_the_session(
            start in 0i64..10_000_000,
            length_ms in 0i64..(10 * 86_400_000),
            cost in 0i64..1_000_000,
        ) {
            let started_at = at(1, 0, 0, 0) + Duration::seconds(start);
            let ended_at = started_at + Duration::milliseconds(length_ms);
            let minutes = length_ms.div_euclid(60_000) + i64::from(length_ms % 60_000 != 0);
            let shares = split_by_day(started_at, ended_at, minutes, cost);
            prop_assert_eq!(shares.iter().map(|s| s.minutes).sum::<i64>(), minutes);
            prop_assert_eq!(shares.iter().map(|s| s.cost_minor).sum::<i64>(), cost);
            prop_assert!(shares.iter().all(|s| s.minutes >= 0 && s.cost_minor >= 0));
            prop_assert_eq!(shares.first().map(|s| s.day), Some(started_at.date_naive()));
            prop_assert!(shares.windows(2).all(|w| w[1].day == w[0].day + Duration::days(1)));
            // No day gets more minutes than it had time for, rounded up.
            for share in &shares {
                let day_start = share.day.and_hms_opt(0, 0, 0).map(|t| t.and_utc()).unwrap_or_default();
                let overlap = (ended_at.min(day_start + Duration::days(1)) - started_at.max(day_start)).num_milliseconds();
                prop_assert!(share.minutes <= overlap.div_euclid(60_000) + 1, "{:?} overlap {}", share, overlap);
            }
        }
    }
}
