//! What a usage session costs.
//!
//! Prices are integer minor units (US cents) per device-hour, keyed by provider and tier.
//! Rounding, in this order, always in the platform's favour and never below zero:
//!
//! 1. Billed minutes = the session's length rounded **up** to a whole minute (any started
//!    minute counts); a session that ends at or before its start bills 0 minutes.
//! 2. Cost = `ceil(minutes × cents_per_hour / 60)`, computed in 64-bit integers.
//!
//! So 1 minute at 12 ¢/h costs 1 ¢, 60 minutes cost 12 ¢, 61 minutes cost 13 ¢.

use chrono::{DateTime, Utc};
use event_schema::{Currency, Money, Provider, Tier};

/// A price list: cents per device-hour by provider and tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PricingTable {
    /// Identifies this price list in `UsageRecorded.pricing_plan_id`.
    pub version: &'static str,
    pub currency: Currency,
    /// Cents per hour for the free, basic, pro and enterprise tiers, one row per provider.
    aws: [u32; 4],
    gcp: [u32; 4],
    azure: [u32; 4],
    alibaba: [u32; 4],
    huawei: [u32; 4],
}

/// The rate one session is billed at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rate {
    pub cents_per_hour: u32,
    pub currency: Currency,
    pub plan_id: String,
}

impl PricingTable {
    /// The price list in force. Higher tiers pay less per hour.
    pub fn standard() -> Self {
        PricingTable {
            version: "2026-01",
            currency: Currency::USD,
            //        free basic pro enterprise
            aws: [24, 18, 14, 12],
            gcp: [22, 17, 13, 11],
            azure: [26, 19, 15, 13],
            alibaba: [18, 14, 11, 9],
            huawei: [16, 12, 10, 8],
        }
    }

    pub fn rate(&self, provider: Provider, tier: Tier) -> Rate {
        // Exhaustive matches: a new provider or tier does not compile until it has a price.
        let row = match provider {
            Provider::Aws => &self.aws,
            Provider::Gcp => &self.gcp,
            Provider::Azure => &self.azure,
            Provider::Alibaba => &self.alibaba,
            Provider::Huawei => &self.huawei,
        };
        let column = match tier {
            Tier::Free => 0,
            Tier::Basic => 1,
            Tier::Pro => 2,
            Tier::Enterprise => 3,
        };
        Rate {
            cents_per_hour: row[column],
            currency: self.currency,
            plan_id: format!("{}/{}/{}", self.version, provider, tier),
        }
    }
}

/// Billed minutes of a session from `started_at` to `ended_at` (rule 1 above).
pub fn billed_minutes(started_at: DateTime<Utc>, ended_at: DateTime<Utc>) -> u32 {
    let millis = (ended_at - started_at).num_milliseconds();
    if millis <= 0 {
        return 0;
    }
    let minutes = (millis as u64).div_ceil(60_000);
    u32::try_from(minutes).unwrap_or(u32::MAX)
}

/// Cost of `minutes` at `rate` (rule 2 above).
pub fn cost(minutes: u32, rate: &Rate) -> Money {
    let cents = (u64::from(minutes) * u64::from(rate.cents_per_hour)).div_ceil(60);
    // u32 × u32 / 60 always fits in i64.
    Money::new(i64::try_from(cents).unwrap_or(i64::MAX), rate.currency)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(seconds: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_767_225_600 + seconds, 0)
            .single()
            .unwrap_or_default()
    }

    #[test]
    fn any_started_minute_is_billed() {
        assert_eq!(billed_minutes(at(0), at(0)), 0);
        assert_eq!(billed_minutes(at(0), at(1)), 1);
        assert_eq!(billed_minutes(at(0), at(60)), 1);
        assert_eq!(billed_minutes(at(0), at(61)), 2);
        assert_eq!(
            billed_minutes(at(10), at(0)),
            0,
            "a clock going backwards bills nothing"
        );
    }

    #[test]
    fn cost_rounds_up_to_the_cent() {
        let rate = PricingTable::standard().rate(Provider::Aws, Tier::Enterprise);
        assert_eq!(rate.cents_per_hour, 12);
        assert_eq!(rate.plan_id, "2026-01/aws/enterprise");
        assert_eq!(cost(0, &rate).amount_minor, 0);
        assert_eq!(cost(1, &rate).amount_minor, 1);
        assert_eq!(cost(60, &rate).amount_minor, 12);
        assert_eq!(cost(61, &rate).amount_minor, 13);
        assert_eq!(
            cost(u32::MAX, &rate).amount_minor,
            (u64::from(u32::MAX) * 12).div_ceil(60) as i64
        );
    }

    #[test]
    fn every_provider_and_tier_has_a_positive_price() {
        let table = PricingTable::standard();
        for provider in Provider::ALL {
            for tier in Tier::ALL {
                assert!(table.rate(*provider, *tier).cents_per_hour > 0);
            }
        }
    }
}
