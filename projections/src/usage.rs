//! `daily_usage`: billed minutes and cost per UTC day, user and device.
//!
//! A session that crosses midnight is split between the days it touches, to the minute: the
//! session's billed minutes are consecutive minutes from its start (the last one possibly
//! partial), and each belongs to the UTC day in which it starts. The cost follows the minutes,
//! split by largest remainders (ties to the earlier day). So the days always add up exactly to
//! the session's minutes and cost, no day is negative, and no day gets more minutes than it
//! had time for, rounded up.
//!
//! Version 3 keeps UTC hours too ([`split_by_hour`]): minutes by the same rule, and each
//! day's cost split over its hours by largest remainders, so the hours of a day always add up
//! exactly to that day's row.

use chrono::{DateTime, Duration, NaiveDate, Utc};
use event_schema::UsageRecorded;
use read_models::usage::{HourKey, ProviderDayKey, ProviderUsage, UsageDelta, UsageKey};

const DAY_SECONDS: i64 = 86_400;
const HOUR_SECONDS: i64 = 3_600;

/// One day's share of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DayShare {
    pub day: NaiveDate,
    pub minutes: i64,
    pub cost_minor: i64,
}

/// One UTC hour's share of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HourShare {
    /// The start of the hour.
    pub hour: DateTime<Utc>,
    pub minutes: i64,
    pub cost_minor: i64,
}

/// The start of the UTC period of `period_seconds` (a day or an hour: both divide the
/// Unix epoch's days exactly) that `at` falls in.
fn period_start(at: DateTime<Utc>, period_seconds: i64) -> DateTime<Utc> {
    let seconds = at.timestamp();
    DateTime::from_timestamp(seconds - seconds.rem_euclid(period_seconds), 0).unwrap_or(at)
}

/// The periods of `period_seconds` a session touches, each with its start and the time
/// (ms) the session spent in it. `ended_at` must be after `started_at`.
fn spans(started_at: DateTime<Utc>, ended_at: DateTime<Utc>, period_seconds: i64) -> Vec<(DateTime<Utc>, i64)> {
    let mut spans = Vec::new();
    let mut start = period_start(started_at, period_seconds);
    let mut cursor = started_at;
    while cursor < ended_at {
        let next = start
            .checked_add_signed(Duration::seconds(period_seconds))
            .unwrap_or(ended_at);
        let until = next.min(ended_at);
        spans.push((start, (until - cursor).num_milliseconds()));
        cursor = until;
        start = next;
    }
    spans
}

/// The billed minutes that start in each span. Billed minute i starts at started_at + i
/// minutes; the minutes starting before the end of a span number ceil(elapsed / 1 min),
/// capped at the session's minutes. The count at a span's end depends only on that instant,
/// so hours and days agree wherever their boundaries meet (every midnight).
fn billed_minutes(spans: &[(DateTime<Utc>, i64)], minutes: i64) -> Vec<i64> {
    let minutes = minutes.max(0);
    let mut per_span = Vec::with_capacity(spans.len());
    let (mut elapsed_ms, mut counted) = (0i64, 0i64);
    for (_, ms) in spans {
        elapsed_ms += ms;
        let started_before = (elapsed_ms + 59_999).div_euclid(60_000).min(minutes);
        per_span.push(started_before - counted);
        counted = started_before;
    }
    if let Some(last) = per_span.last_mut() {
        // Minutes billed beyond the session's length (never, with the domain's rounding).
        *last += minutes - counted;
    }
    per_span
}

/// What the cost is split by: the minutes, or for a session of zero minutes, where its time
/// was.
fn cost_weights(session_minutes: i64, spans: &[(DateTime<Utc>, i64)], minutes: &[i64]) -> Vec<i64> {
    if session_minutes > 0 {
        minutes.to_vec()
    } else {
        spans.iter().map(|(_, ms)| *ms).collect()
    }
}

/// Splits a session between the UTC days it touches.
pub fn split_by_day(
    started_at: DateTime<Utc>,
    ended_at: DateTime<Utc>,
    minutes: i64,
    cost_minor: i64,
) -> Vec<DayShare> {
    if ended_at <= started_at {
        return vec![DayShare {
            day: started_at.date_naive(),
            minutes,
            cost_minor,
        }];
    }
    let spans = spans(started_at, ended_at, DAY_SECONDS);
    let day_minutes = billed_minutes(&spans, minutes);
    let day_costs = largest_remainder(cost_minor, &cost_weights(minutes, &spans, &day_minutes));
    spans
        .iter()
        .zip(day_minutes.into_iter().zip(day_costs))
        .map(|((start, _), (minutes, cost_minor))| DayShare {
            day: start.date_naive(),
            minutes,
            cost_minor,
        })
        .collect()
}

/// Splits a session between the UTC hours it touches, so that the hours of each day add up
/// exactly to that day's [`split_by_day`] share: the minutes by the same rule (each billed
/// minute belongs to the hour it starts in), the cost of each day split over its hours by
/// largest remainders (ties to the earlier hour).
pub fn split_by_hour(
    started_at: DateTime<Utc>,
    ended_at: DateTime<Utc>,
    minutes: i64,
    cost_minor: i64,
) -> Vec<HourShare> {
    if ended_at <= started_at {
        return vec![HourShare {
            hour: period_start(started_at, HOUR_SECONDS),
            minutes,
            cost_minor,
        }];
    }
    let days = split_by_day(started_at, ended_at, minutes, cost_minor);
    let spans = spans(started_at, ended_at, HOUR_SECONDS);
    let hour_minutes = billed_minutes(&spans, minutes);
    let weights = cost_weights(minutes, &spans, &hour_minutes);
    let mut shares = Vec::with_capacity(spans.len());
    let mut first = 0;
    for day in &days {
        // The day's hours: the consecutive spans from `first` that start on that day.
        let last = first
            + spans[first..]
                .iter()
                .take_while(|(hour, _)| hour.date_naive() == day.day)
                .count();
        let costs = largest_remainder(day.cost_minor, &weights[first..last]);
        for ((hour, _), (minutes, cost_minor)) in spans[first..last]
            .iter()
            .zip(hour_minutes[first..last].iter().zip(costs))
        {
            shares.push(HourShare {
                hour: *hour,
                minutes: *minutes,
                cost_minor,
            });
        }
        first = last;
    }
    shares
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

/// Like [`fold_usage`], for version 1 of `daily_usage`, whose rows are keyed without the
/// currency: a row keeps the currency it was created with and later usage of its key adds to
/// it. Applied one event at a time that is what the upsert does; a batch must fold the same
/// way, all of a key's shares under the currency the key first had in the batch, because one
/// upsert may not touch a row twice (PostgreSQL refuses the whole statement, and the batch
/// could never be applied).
pub fn fold_usage_by_first_currency(
    deltas: &mut std::collections::BTreeMap<(UsageKey, String), UsageDelta>,
    first_currency: &mut std::collections::BTreeMap<UsageKey, String>,
    usage: &UsageRecorded,
) {
    fold_usage_shares(usage, |(key, currency), share| {
        let currency = first_currency.entry(key).or_insert(currency).clone();
        let delta = deltas.entry((key, currency)).or_default();
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

/// Adds a usage event to per-hour deltas (`hourly_usage`, version 3 of `daily_usage`).
pub fn fold_hourly_usage(deltas: &mut std::collections::BTreeMap<HourKey, UsageDelta>, usage: &UsageRecorded) {
    fold_hourly_shares(usage, |key, share| {
        let delta = deltas.entry(key).or_default();
        delta.minutes += share.minutes;
        delta.cost_minor += share.cost_minor;
    });
}

/// Calls `add` with each UTC hour's share of `usage` under its `hourly_usage` key.
pub fn fold_hourly_shares(usage: &UsageRecorded, mut add: impl FnMut(HourKey, UsageDelta)) {
    let shares = split_by_hour(
        usage.started_at,
        usage.ended_at,
        i64::from(usage.minutes),
        usage.cost.amount_minor,
    );
    let currency = usage.cost.currency.to_string();
    for share in shares {
        add(
            HourKey {
                user_id: usage.owner_id,
                hour: share.hour,
                device_id: usage.device_id,
                currency: currency.clone(),
            },
            UsageDelta {
                minutes: share.minutes,
                cost_minor: share.cost_minor,
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

    fn hours(shares: &[HourShare]) -> Vec<(u32, i64, i64)> {
        use chrono::Timelike;
        shares
            .iter()
            .map(|s| (s.hour.hour(), s.minutes, s.cost_minor))
            .collect()
    }

    #[test]
    fn a_session_over_several_hours_is_split_to_the_minute() {
        // 10:20 -> 12:40: 40, 60 and 40 minutes; 140 minutes cost 70 cents, 20, 30 and 20.
        let shares = split_by_hour(at(1, 10, 20, 0), at(1, 12, 40, 0), 140, 70);
        assert_eq!(hours(&shares), [(10, 40, 20), (11, 60, 30), (12, 40, 20)]);
        assert_eq!(shares[0].hour, at(1, 10, 0, 0));
        // A session inside one hour, and one of no time, stay in their hour.
        assert_eq!(
            hours(&split_by_hour(at(1, 10, 20, 0), at(1, 10, 50, 0), 30, 9)),
            [(10, 30, 9)]
        );
        assert_eq!(
            hours(&split_by_hour(at(1, 10, 20, 0), at(1, 10, 20, 0), 0, 5)),
            [(10, 0, 5)]
        );
    }

    #[test]
    fn the_hours_of_a_day_add_up_to_its_share_across_midnight() {
        // 22:00 -> 01:05: 120 + 65 minutes. 2 cents: days 1.30 -> 1 and 0.70 -> 1; day 1's cent
        // over 60 and 60 minutes goes to the earlier hour, day 2's over 60 and 5 to midnight.
        let days = split_by_day(at(1, 22, 0, 0), at(2, 1, 5, 0), 185, 2);
        assert_eq!(
            days.iter().map(|d| (d.minutes, d.cost_minor)).collect::<Vec<_>>(),
            [(120, 1), (65, 1)]
        );
        let shares = split_by_hour(at(1, 22, 0, 0), at(2, 1, 5, 0), 185, 2);
        assert_eq!(hours(&shares), [(22, 60, 1), (23, 60, 0), (0, 60, 1), (1, 5, 0)]);
        // Rounding the four hours on their own would put both cents on day 1.
        assert_eq!(largest_remainder(2, &[60, 60, 60, 5]), [1, 1, 0, 0]);
        // A billed minute over midnight belongs to the hour (and day) it starts in.
        let shares = split_by_hour(at(1, 23, 59, 30), at(2, 0, 0, 30), 1, 1);
        assert_eq!(hours(&shares), [(23, 1, 1), (0, 0, 0)]);
    }

    proptest! {
        #[test]
        fn hours_always_add_up_to_their_day(
            start_ms in 0i64..10_000_000_000,
            length_ms in 0i64..(4 * 86_400_000),
            cost in 0i64..1_000_000,
            minutes_off in -2i64..=2,
        ) {
            let started_at = at(1, 0, 0, 0) + Duration::milliseconds(start_ms);
            let ended_at = started_at + Duration::milliseconds(length_ms);
            // Mostly the domain's rounding; sometimes a minute or two off (events of older code).
            let exact = length_ms.div_euclid(60_000) + i64::from(length_ms % 60_000 != 0);
            let minutes = (exact + minutes_off).max(0);
            let days = split_by_day(started_at, ended_at, minutes, cost);
            let hours = split_by_hour(started_at, ended_at, minutes, cost);
            prop_assert!(hours.iter().all(|h| h.minutes >= 0 && h.cost_minor >= 0));
            prop_assert!(hours.iter().all(|h| h.hour.timestamp() % 3_600 == 0));
            prop_assert!(hours.windows(2).all(|w| w[1].hour == w[0].hour + Duration::hours(1)));
            prop_assert!(hours.first().is_some_and(|h| h.hour <= started_at && started_at < h.hour + Duration::hours(1)));
            for day in &days {
                let of_day = hours.iter().filter(|h| h.hour.date_naive() == day.day);
                let (m, c) = of_day.fold((0, 0), |(m, c), h| (m + h.minutes, c + h.cost_minor));
                prop_assert_eq!((m, c), (day.minutes, day.cost_minor), "{:?}", day);
            }
            prop_assert!(hours.iter().all(|h| days.iter().any(|d| d.day == h.hour.date_naive())));
            if minutes_off == 0 {
                // No hour gets more minutes than it had time for, rounded up.
                for share in &hours {
                    let overlap = (ended_at.min(share.hour + Duration::hours(1)) - started_at.max(share.hour)).num_milliseconds();
                    prop_assert!(share.minutes <= overlap.div_euclid(60_000) + 1, "{:?} overlap {}", share, overlap);
                }
            }
        }

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
