//! Faults on a schedule: one every `--fault-every` seconds, its kind drawn from the seed so that
//! every kind comes once in each round (a shuffled round of all kinds, then another), each
//! healed before the next begins.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::proxy::{Mode, Proxy};
use super::roles::{ScratchPostgres, Supervisor};
use crate::harness::broker::Broker;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// The PostgreSQL primary stopped (fast shutdown) and started again.
    PrimaryRestart,
    /// `kill -9` of the command API, then a restart.
    KillCommandApi,
    /// `kill -9` of a projector (in Kafka mode, one of the workers), then a restart.
    KillProjector,
    KillQueryApi,
    /// Kafka mode: `kill -9` of the relay.
    KillRelay,
    /// The network between roles (one, or all) and PostgreSQL cut: connections closed, new
    /// ones refused.
    NetworkCut,
    /// The network between roles and PostgreSQL blackholed: nothing forwarded, so requests
    /// hang until their timeouts; delivered on heal.
    NetworkBlackhole,
    /// Kafka mode: the broker killed (`broker.sh kill`), started again.
    BrokerKill,
}

impl FaultKind {
    pub fn all(kafka: bool) -> Vec<FaultKind> {
        let mut kinds = vec![
            FaultKind::PrimaryRestart,
            FaultKind::KillCommandApi,
            FaultKind::KillProjector,
            FaultKind::KillQueryApi,
            FaultKind::NetworkCut,
            FaultKind::NetworkBlackhole,
        ];
        if kafka {
            kinds.extend([FaultKind::KillRelay, FaultKind::BrokerKill]);
        }
        kinds
    }
}

/// One fault as it happened.
#[derive(Debug, Clone, Serialize)]
pub struct Fault {
    pub kind: FaultKind,
    /// The role (or link) it hit, if not the whole platform.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Seconds since the load began.
    pub at_seconds: f64,
    /// How long it lasted until healed.
    pub seconds: f64,
    /// Set when the fault could not be made or healed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What the faults act on.
#[derive(Debug)]
pub struct Platform {
    pub cluster: ScratchPostgres,
    pub broker: Option<Broker>,
    pub proxy: Proxy,
    pub supervisor: Supervisor,
}

impl Platform {
    /// Heals whatever may be broken: every link passes, the primary and the broker run, no
    /// role is held down.
    pub async fn heal(&self) -> anyhow::Result<()> {
        self.proxy.set(None, Mode::Pass);
        self.cluster.start().await?;
        if let Some(broker) = &self.broker {
            broker.run("start").await?;
        }
        for name in self.supervisor.names() {
            self.supervisor.resume(&name)?;
        }
        Ok(())
    }
}

/// Makes faults every `every` until `finish` once every kind has come at least once, or
/// until `abort` (the run failed); returns them.
pub async fn schedule(
    platform: Arc<Platform>,
    kafka: bool,
    every: Duration,
    seed: u64,
    began: Instant,
    finish: CancellationToken,
    abort: CancellationToken,
) -> Vec<Fault> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xfa17_fa17);
    let mut round: Vec<FaultKind> = Vec::new();
    let mut faults = Vec::new();
    let mut next = tokio::time::Instant::now() + every;
    let mut every_kind_came = false;
    loop {
        let finished = async {
            if every_kind_came {
                finish.cancelled().await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            () = abort.cancelled() => return faults,
            () = finished => return faults,
            () = tokio::time::sleep_until(next) => {}
        }
        if round.is_empty() {
            round = FaultKind::all(kafka);
            round.shuffle(&mut rng);
        }
        let Some(kind) = round.pop() else {
            continue;
        };
        every_kind_came |= round.is_empty();
        let fault = tokio::select! {
            () = abort.cancelled() => return faults,
            fault = inject(&platform, kind, &mut rng, began) => fault,
        };
        match &fault.error {
            Some(error) => tracing::warn!(?kind, on = ?fault.target, %error, "fault failed"),
            None => tracing::info!(?kind, on = ?fault.target, seconds = fault.seconds, "fault healed"),
        }
        faults.push(fault);
        next = tokio::time::Instant::now().max(next + every);
    }
}

/// Makes one fault and heals it.
async fn inject(platform: &Platform, kind: FaultKind, rng: &mut StdRng, began: Instant) -> Fault {
    let at = began.elapsed().as_secs_f64();
    let started = Instant::now();
    // Outages of 1 to 5 s: longer than the command API's request timeout some of the time.
    let outage = Duration::from_millis(rng.random_range(1_000..5_000));
    let roles = platform.supervisor.names();
    let pick = |rng: &mut StdRng, prefix: &str| -> Option<String> {
        let matching: Vec<&String> = roles.iter().filter(|name| name.starts_with(prefix)).collect();
        (!matching.is_empty()).then(|| matching[rng.random_range(0..matching.len())].clone())
    };
    let (target, result) = match kind {
        FaultKind::PrimaryRestart => {
            let result = async {
                platform.cluster.stop().await?;
                tokio::time::sleep(outage).await;
                platform.cluster.start().await
            }
            .await;
            (None, result)
        }
        FaultKind::KillCommandApi | FaultKind::KillProjector | FaultKind::KillQueryApi | FaultKind::KillRelay => {
            let prefix = match kind {
                FaultKind::KillCommandApi => "command-api",
                FaultKind::KillProjector => "projector",
                FaultKind::KillQueryApi => "query-api",
                _ => "relay",
            };
            let target = pick(rng, prefix);
            let result = match &target {
                Some(name) => {
                    let down = Duration::from_millis(rng.random_range(0..1_500));
                    async {
                        platform.supervisor.kill(name)?;
                        tokio::time::sleep(down).await;
                        platform.supervisor.resume(name)
                    }
                    .await
                }
                None => Err(anyhow::anyhow!("no {prefix} role to kill")),
            };
            (target, result)
        }
        FaultKind::NetworkCut | FaultKind::NetworkBlackhole => {
            // Half the time every role's link, else one role's.
            let links: Vec<String> = platform.proxy.names().map(str::to_owned).collect();
            let target = if rng.random_bool(0.5) || links.is_empty() {
                None
            } else {
                Some(links[rng.random_range(0..links.len())].clone())
            };
            let mode = if kind == FaultKind::NetworkCut {
                Mode::Cut
            } else {
                Mode::Blackhole
            };
            // A third of the blackholes end as a partition long enough for TCP to give up:
            // the held connections are reset instead of resumed.
            let reset = mode == Mode::Blackhole && rng.random_bool(0.33);
            platform.proxy.set(target.as_deref(), mode);
            tokio::time::sleep(outage).await;
            if reset {
                platform.proxy.set(target.as_deref(), Mode::Cut);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            platform.proxy.set(target.as_deref(), Mode::Pass);
            let mut label = target.unwrap_or_else(|| "all".to_owned());
            if reset {
                label.push_str(", then reset");
            }
            (Some(label), Ok(()))
        }
        FaultKind::BrokerKill => {
            let result = match &platform.broker {
                Some(broker) => {
                    async {
                        broker.run("kill").await?;
                        tokio::time::sleep(outage).await;
                        broker.run("start").await
                    }
                    .await
                }
                None => Err(anyhow::anyhow!("no broker in this run")),
            };
            (None, result)
        }
    };
    Fault {
        kind,
        target,
        at_seconds: at,
        seconds: started.elapsed().as_secs_f64(),
        error: result.err().map(|e| format!("{e:#}")),
    }
}
