//! The drills Haven knows: what each one breaks, how it repairs it, and the targets it is
//! judged by (the design's floor and Haven's own).

use std::time::Duration;

use serde::Serialize;

/// What a drill does to the deployment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// `kill -9` of one Haven node, restarted after a pause.
    KillNode,
    /// One machine lost: a Haven node and the NATS server beside it, both `kill -9`, both
    /// restarted after a pause.
    LoseNode,
    /// `kill -9` of the NATS server leading the region's stream, restarted after a pause.
    KillNatsLeader,
    /// Every NATS server of the region stopped at once, started again after a pause.
    StoreOutage,
    /// A planned switchover: one node drained (SIGTERM, graceful) and started again.
    Switchover,
    /// A configuration value set on one node, measured until every node has it in force.
    ConfigPush,
    /// The key-encryption key rotated under load.
    KeyRotation,
    /// Twice the measured capacity offered for the outage time.
    Overload,
    /// Every process of the active region killed; the other region promoted; the lost
    /// region restarted and failed back to.
    RegionLoss,
    /// The link between the regions cut, both written to, then healed.
    RegionPartition,
    /// A planned switchover of the active role to the other region, and back.
    RegionSwitchover,
    /// Data corrupted and deleted by mistake (an operator's bad change); the state restored
    /// to the moment before it from the continuous backup, into a new region's store.
    CorruptData,
    /// The whole region lost with its disks (every process `kill -9`, its data directories
    /// gone); a cold region built from the backups takes its place.
    ColdRegion,
    /// A randomized schedule of faults (`haven chaos`), not a drill of its own.
    Chaos,
}

/// Which component a target is for (the design's recovery-time table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
pub enum Component {
    /// What clients reach: the load balancer and the nodes behind it.
    #[serde(rename = "load balancer")]
    LoadBalancer,
    /// Legacy-era sessions and their streams.
    #[serde(rename = "session service")]
    SessionService,
    /// The upstream registry (admin API).
    #[serde(rename = "registry")]
    Registry,
    /// Settings (admin API).
    #[serde(rename = "configuration")]
    Configuration,
    /// The secrets service (admin API).
    #[serde(rename = "secrets")]
    Secrets,
}

impl Component {
    /// Every component, in the order of the design's table.
    pub const ALL: [Component; 5] = [
        Component::LoadBalancer,
        Component::SessionService,
        Component::Registry,
        Component::Configuration,
        Component::Secrets,
    ];

    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Component::LoadBalancer => "load balancer",
            Component::SessionService => "session service",
            Component::Registry => "registry",
            Component::Configuration => "configuration",
            Component::Secrets => "secrets",
        }
    }

    /// The design's recovery-time objective for it (its table "Recovery Time Objectives").
    pub fn seed_rto(self) -> Duration {
        Duration::from_secs(match self {
            Component::LoadBalancer => 60,
            Component::SessionService => 5 * 60,
            Component::Registry => 10 * 60,
            Component::Configuration => 2 * 60,
            Component::Secrets => 5 * 60,
        })
    }
}

/// One drill.
#[derive(Clone, Debug, Serialize)]
pub struct Scenario {
    /// Its name on the command line.
    pub name: &'static str,
    /// One line on what it rehearses.
    pub summary: &'static str,
    /// What it breaks.
    pub fault: Fault,
    /// How long the fault lasts before its repair (kills, outages).
    #[serde(with = "secs")]
    pub outage: Duration,
    /// The design's floor: recovery time (whole service).
    #[serde(with = "secs")]
    pub seed_rto: Duration,
    /// The design's floor: window of acknowledged writes that may be lost.
    #[serde(with = "secs")]
    pub seed_rpo: Duration,
    /// Haven's own target: the longest time any client may see failures, counted from the
    /// fault (or from the repair, for faults that take the whole store away).
    #[serde(with = "secs")]
    pub haven_rto: Duration,
    /// Whether `haven_rto` counts from the repair instead of the fault.
    pub rto_from_repair: bool,
    /// Haven's own target: acknowledged writes lost (none, except within
    /// `haven_rpo_window`).
    pub haven_rpo_writes: u64,
    /// Haven's own target for a region lost without warning and rebuilt from backups: writes
    /// acknowledged within this long before the fault may be lost (what had not shipped yet);
    /// zero for every other drill.
    #[serde(with = "secs")]
    pub haven_rpo_window: Duration,
    /// The README anchor of its runbook.
    pub runbook: &'static str,
    /// Regions it needs (1, or 2 for the multi-region drills).
    pub regions: u8,
}

mod secs {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

const MIN: u64 = 60;

/// Every drill, in the order `haven drill list` shows them.
pub fn all() -> Vec<Scenario> {
    let floor = |name, summary, fault, outage: u64, haven_rto: u64, runbook| Scenario {
        name,
        summary,
        fault,
        outage: Duration::from_secs(outage),
        seed_rto: Duration::from_secs(15 * MIN),
        seed_rpo: Duration::from_secs(5 * MIN),
        haven_rto: Duration::from_secs(haven_rto),
        rto_from_repair: false,
        haven_rpo_writes: 0,
        haven_rpo_window: Duration::ZERO,
        runbook,
        regions: 1,
    };
    vec![
        floor(
            "process-crash",
            "kill -9 of one Haven node under load; its calls are taken over, it restarts",
            Fault::KillNode,
            5,
            10,
            "drill-process-crash",
        ),
        floor(
            "node-loss",
            "a machine lost: one Haven node and its NATS server killed together, both restarted",
            Fault::LoseNode,
            5,
            15,
            "drill-node-loss",
        ),
        floor(
            "nats-loss",
            "kill -9 of the NATS server leading the region's stream; a new leader is elected",
            Fault::KillNatsLeader,
            5,
            15,
            "drill-nats-loss",
        ),
        Scenario {
            rto_from_repair: true,
            ..floor(
                "store-outage",
                "every NATS server stopped: nodes answer 503 and recover when the store returns",
                Fault::StoreOutage,
                5,
                30,
                "drill-store-outage",
            )
        },
        floor(
            "switchover",
            "planned switchover: one node drained and restarted; clients see no failure",
            Fault::Switchover,
            2,
            2,
            "drill-switchover",
        ),
        Scenario {
            seed_rto: Component::Configuration.seed_rto(),
            seed_rpo: Duration::from_secs(MIN),
            ..floor(
                "config-push",
                "a setting changed on one node, timed until every node has it in force",
                Fault::ConfigPush,
                0,
                5,
                "drill-config-push",
            )
        },
        Scenario {
            rto_from_repair: true,
            ..floor(
                "overload",
                "twice the measured capacity offered: the excess refused at once with Retry-After, admitted calls keep bounded latency, service normal as soon as it drops",
                Fault::Overload,
                20,
                5,
                "drill-overload",
            )
        },
        floor(
            "point-in-time-restore",
            "data overwritten and deleted by mistake: the state restored from the continuous backup to the moment before, into a new region's store; writes after that moment are rolled back",
            Fault::CorruptData,
            0,
            30,
            "drill-point-in-time-restore",
        ),
        Scenario {
            // The region's last shipping interval (1 s) and the shipping itself.
            haven_rpo_window: Duration::from_secs(3),
            ..floor(
                "cold-region",
                "the region lost with its disks: a cold region is built from the backups in object storage and takes its place",
                Fault::ColdRegion,
                0,
                30,
                "drill-cold-region",
            )
        },
        Scenario {
            regions: 2,
            ..floor(
                "region-loss",
                "every process of the active region killed: the global load balancer moves clients to the other region, which is promoted; the lost region returns and is failed back to",
                Fault::RegionLoss,
                5,
                30,
                "drill-region-loss",
            )
        },
        Scenario {
            regions: 2,
            ..floor(
                "region-partition",
                "the link between the regions cut while both are written to, then healed: both keep serving and converge to every write",
                Fault::RegionPartition,
                5,
                2,
                "drill-region-partition",
            )
        },
        Scenario {
            regions: 2,
            ..floor(
                "region-switchover",
                "planned switchover: the active region demoted, the other promoted, clients follow the global load balancer; then back",
                Fault::RegionSwitchover,
                0,
                5,
                "drill-region-switchover",
            )
        },
        Scenario {
            seed_rto: Component::Secrets.seed_rto(),
            seed_rpo: Duration::ZERO,
            ..floor(
                "key-rotation",
                "the key-encryption key rotated under load; secrets stay readable everywhere",
                Fault::KeyRotation,
                0,
                5,
                "drill-key-rotation",
            )
        },
    ]
}

/// The drill called `name`.
pub fn find(name: &str) -> Option<Scenario> {
    all().into_iter().find(|s| s.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_every_target_is_within_the_designs_floor() {
        let all = all();
        for (i, s) in all.iter().enumerate() {
            assert!(all[i + 1..].iter().all(|o| o.name != s.name), "{}", s.name);
            assert!(s.haven_rto <= s.seed_rto, "{}", s.name);
            assert!(s.haven_rpo_window <= s.seed_rpo, "{}", s.name);
            assert_eq!(find(s.name).map(|f| f.fault), Some(s.fault));
        }
        assert!(find("no-such-drill").is_none());
    }
}
