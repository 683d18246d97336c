//! The subscription root: the dashboard queries a page keeps live. Each field takes the
//! arguments of the query field of the same name (but `minPosition`: a live answer always
//! reflects the newest batch) and answers with the same types, scoped the same way.
//!
//! A field's stream yields one answer: the subscription hub (`crate::subscriptions`) runs the
//! document again whenever a projection batch touched what it reads, so every answer pushed
//! is exactly what the equivalent query would return at that moment. Each field also notes
//! its [`Interest`] (which projection, whose rows) in the read context, which is how the hub
//! knows which batches touch it.

use std::collections::{BTreeSet, HashMap};

use async_graphql::{Context, Subscription as SubscriptionRoot};
use futures::Stream;
use futures::stream;
use read_models::Projection;
use read_models::changes::ChangeNotice;
use uuid::Uuid;

use super::query::{ProjectionState, Query};
use super::{
    DailyUsage, Device, DeviceConnection, DeviceFilterInput, DeviceStats, DevicesOrderBy, FleetHistoryFilter,
    FleetHistoryGroupBy, FleetSizePoint, UsageFilter, UsageGroupBy, read_context,
};
use crate::reads::Owners;

/// The root of every subscription.
#[derive(Debug, Default)]
pub struct Subscription;

/// Dashboard answers kept live over WebSocket: each field answers at once, then again
/// whenever a projection batch changed what it reads.
#[SubscriptionRoot]
impl Subscription {
    /// `Query.deviceStats`, live: pushed whenever the devices counted change.
    async fn device_stats(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "As `Query.deviceStats(filter)`.")] filter: Option<DeviceFilterInput>,
    ) -> async_graphql::Result<impl Stream<Item = DeviceStats> + use<>> {
        let read = read_context(ctx);
        let owners = read.viewer.owners(filter.as_ref().and_then(|f| f.user_id));
        read.note_interest(Interest::rows(Projection::Fleet, owners));
        let stats = Query.device_stats(ctx, filter, None).await?;
        Ok(stream::iter([stats]))
    }

    /// `Query.dailyUsage`, live: pushed whenever usage in its scope is recorded.
    async fn daily_usage(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "As `Query.dailyUsage(filter)`.")] filter: UsageFilter,
        #[graphql(desc = "As `Query.dailyUsage(groupBy)`.")] group_by: Option<UsageGroupBy>,
    ) -> async_graphql::Result<impl Stream<Item = DailyUsage> + use<>> {
        let read = read_context(ctx);
        let interest = match (read.viewer.owners(filter.user_id), filter.device_id) {
            (Owners::Any, Some(device)) => Interest::device(Projection::DailyUsage, device),
            (owners, _) => Interest::rows(Projection::DailyUsage, owners),
        };
        read.note_interest(interest);
        let usage = Query.daily_usage(ctx, filter, group_by, None).await?;
        Ok(stream::iter([usage]))
    }

    /// `Query.devices`, live: a page of devices, pushed whenever a device in its scope changes.
    #[graphql(complexity = "first.or(last).unwrap_or(20).clamp(1, 100) as usize * child_complexity + 1")]
    #[allow(clippy::too_many_arguments)]
    async fn devices(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "As `Query.devices(filter)`.")] filter: Option<DeviceFilterInput>,
        #[graphql(desc = "As `Query.devices(orderBy)`.")] order_by: Option<DevicesOrderBy>,
        #[graphql(desc = "As `Query.devices(first)`.")] first: Option<i32>,
        #[graphql(desc = "As `Query.devices(after)`.")] after: Option<String>,
        #[graphql(desc = "As `Query.devices(last)`.")] last: Option<i32>,
        #[graphql(desc = "As `Query.devices(before)`.")] before: Option<String>,
    ) -> async_graphql::Result<impl Stream<Item = DeviceConnection> + use<>> {
        let read = read_context(ctx);
        let owners = read.viewer.owners(filter.as_ref().and_then(|f| f.user_id));
        read.note_interest(Interest::rows(Projection::Fleet, owners));
        let page = Query
            .devices(ctx, filter, order_by, first, after, last, before, None)
            .await?;
        Ok(stream::iter([page]))
    }

    /// `Query.device`, live: pushed whenever the device changes (null if it does not exist or
    /// is not the caller's).
    async fn device(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "The device's id.")] id: Uuid,
    ) -> async_graphql::Result<impl Stream<Item = Option<Device>> + use<>> {
        let read = read_context(ctx);
        read.note_interest(Interest::device(Projection::Fleet, id));
        let device = Query.device(ctx, id, None).await?;
        Ok(stream::iter([device]))
    }

    /// `Query.fleetHistory`, live: pushed whenever a device in its scope changes status (the
    /// newest point moves; a range that ended earlier changes only with a late event).
    async fn fleet_history(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "As `Query.fleetHistory(filter)`.")] filter: FleetHistoryFilter,
        #[graphql(desc = "As `Query.fleetHistory(groupBy)`.")] group_by: Option<FleetHistoryGroupBy>,
    ) -> async_graphql::Result<impl Stream<Item = Vec<FleetSizePoint>> + use<>> {
        let read = read_context(ctx);
        read.note_interest(Interest::rows(Projection::Fleet, read.viewer.owners(filter.user_id)));
        let history = Query.fleet_history(ctx, filter, group_by, None).await?;
        Ok(stream::iter([history]))
    }

    /// `Query.projectionStatus`, live: pushed as projections move (at most once per
    /// evaluation interval).
    async fn projection_status(
        &self,
        ctx: &Context<'_>,
    ) -> async_graphql::Result<impl Stream<Item = Vec<ProjectionState>> + use<>> {
        read_context(ctx).note_interest(Interest::Progress);
        let states = Query.projection_status(ctx).await?;
        Ok(stream::iter([states]))
    }
}

/// What a subscription's answer depends on: the batches that may change it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interest {
    /// Rows of one projection within a scope.
    Rows { projection: Projection, scope: Scope },
    /// Every projection's progress: any batch.
    Progress,
}

/// Whose rows an answer reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Everyone,
    Owner(Uuid),
    Device(Uuid),
    /// Rows the caller may not see: no batch changes the (empty) answer.
    Nobody,
}

impl Interest {
    pub fn rows(projection: Projection, owners: Owners) -> Self {
        let scope = match owners {
            Owners::Any => Scope::Everyone,
            Owners::Only(owner) => Scope::Owner(owner),
            Owners::Nobody => Scope::Nobody,
        };
        Interest::Rows { projection, scope }
    }

    pub fn device(projection: Projection, device: Uuid) -> Self {
        Interest::Rows {
            projection,
            scope: Scope::Device(device),
        }
    }

    /// An answer whose interest is not known yet (its first evaluation is under way) may be
    /// changed by anything.
    pub const UNKNOWN: Interest = Interest::Progress;
}

/// The batches committed since the last evaluation round, merged: per projection, the owners
/// and devices they touched, or everything.
#[derive(Debug, Default)]
pub struct Changes {
    projections: HashMap<String, Touched>,
    /// A checkpoint moved (every notice says so, even one that changed no row).
    progress: bool,
}

#[derive(Debug, Default)]
struct Touched {
    everything: bool,
    owners: BTreeSet<Uuid>,
    devices: BTreeSet<Uuid>,
}

impl Changes {
    /// Every projection changed everywhere (notices may have been missed).
    pub fn everything() -> Self {
        let mut changes = Changes {
            progress: true,
            ..Changes::default()
        };
        for projection in Projection::ALL {
            changes
                .projections
                .entry(projection.name().to_owned())
                .or_default()
                .everything = true;
        }
        changes
    }

    pub fn add(&mut self, notice: &ChangeNotice) {
        self.progress = true;
        if let (Some(owners), Some(devices)) = (&notice.owners, &notice.devices)
            && owners.is_empty()
            && devices.is_empty()
        {
            return;
        }
        let touched = self.projections.entry(notice.projection.clone()).or_default();
        match (&notice.owners, &notice.devices) {
            (Some(owners), Some(devices)) if !touched.everything => {
                touched.owners.extend(owners);
                touched.devices.extend(devices);
            }
            (Some(_), Some(_)) => {}
            _ => {
                touched.everything = true;
                touched.owners.clear();
                touched.devices.clear();
            }
        }
    }

    pub fn merge(&mut self, other: Changes) {
        self.progress |= other.progress;
        for (projection, theirs) in other.projections {
            let touched = self.projections.entry(projection).or_default();
            touched.everything |= theirs.everything;
            if touched.everything {
                touched.owners.clear();
                touched.devices.clear();
            } else {
                touched.owners.extend(theirs.owners);
                touched.devices.extend(theirs.devices);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        !self.progress && self.projections.is_empty()
    }

    /// Whether an answer with this interest may have changed.
    pub fn touch(&self, interest: Interest) -> bool {
        let Interest::Rows { projection, scope } = interest else {
            return self.progress;
        };
        let Some(touched) = self.projections.get(projection.name()) else {
            return false;
        };
        match scope {
            _ if touched.everything => !matches!(scope, Scope::Nobody),
            Scope::Everyone => true,
            Scope::Owner(owner) => touched.owners.contains(&owner),
            Scope::Device(device) => touched.devices.contains(&device),
            Scope::Nobody => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notice(projection: Projection, owners: &[u128], devices: &[u128]) -> ChangeNotice {
        ChangeNotice {
            projection: projection.name().to_owned(),
            position: 1,
            owners: Some(owners.iter().map(|o| Uuid::from_u128(*o)).collect()),
            devices: Some(devices.iter().map(|d| Uuid::from_u128(*d)).collect()),
        }
    }

    #[test]
    fn a_batch_touches_only_the_subscriptions_of_its_projection_and_scope() {
        let mut changes = Changes::default();
        changes.add(&notice(Projection::Fleet, &[1], &[10]));
        let owner = |o| Interest::rows(Projection::Fleet, Owners::Only(Uuid::from_u128(o)));
        assert!(changes.touch(owner(1)));
        assert!(
            !changes.touch(owner(2)),
            "another owner's subscription is not evaluated"
        );
        assert!(changes.touch(Interest::device(Projection::Fleet, Uuid::from_u128(10))));
        assert!(!changes.touch(Interest::device(Projection::Fleet, Uuid::from_u128(11))));
        assert!(changes.touch(Interest::rows(Projection::Fleet, Owners::Any)));
        assert!(!changes.touch(Interest::rows(Projection::Fleet, Owners::Nobody)));
        assert!(
            !changes.touch(Interest::rows(Projection::DailyUsage, Owners::Any)),
            "usage did not change"
        );
        assert!(changes.touch(Interest::Progress));
        assert!(!Changes::default().touch(Interest::Progress));
    }

    #[test]
    fn a_batch_that_changed_no_row_moves_only_progress() {
        let mut changes = Changes::default();
        changes.add(&notice(Projection::Fleet, &[], &[]));
        assert!(!changes.is_empty());
        assert!(changes.touch(Interest::Progress));
        assert!(!changes.touch(Interest::rows(Projection::Fleet, Owners::Any)));
    }

    #[test]
    fn everything_touches_every_scope_but_nobody() {
        let mut changes = Changes::default();
        changes.add(&notice(Projection::DailyUsage, &[1], &[]));
        changes.add(&ChangeNotice::everything(Projection::DailyUsage, 5));
        changes.add(&notice(Projection::DailyUsage, &[2], &[]));
        let two = Interest::rows(Projection::DailyUsage, Owners::Only(Uuid::from_u128(3)));
        assert!(changes.touch(two));
        assert!(!changes.touch(Interest::rows(Projection::DailyUsage, Owners::Nobody)));
        let mut all = Changes::default();
        all.merge(Changes::everything());
        assert!(all.touch(Interest::rows(Projection::Fleet, Owners::Only(Uuid::from_u128(9)))));
    }
}
