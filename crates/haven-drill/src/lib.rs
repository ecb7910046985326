//! Disaster drills on demand (`haven drill`): a deployment is broken on purpose under load,
//! and what clients saw is measured against the design's recovery targets and Haven's own.
//!
//! - [`scenario`]: the drills, each with what it breaks and its targets;
//! - [`local`]: a complete deployment on this machine (NATS, Haven nodes, HAProxy);
//! - [`load`]: Haven's own load through the load balancer, and every outcome recorded;
//! - [`run`]: a drill from load to fault to repair to read-back;
//! - [`report`]: the figures (RTO per client and component, RPO, answers twice or never,
//!   MTTR, failures by kind) as JSON, Markdown and an SVG timeline;
//! - [`history`]: the kept reports over time.
//!
//! This crate sits beside the binary: it drives Haven from outside, over HTTP and process
//! signals, exactly as an operator's deployment would be driven, and imports no other
//! Haven crate.

pub mod chaos;
pub mod described;
pub mod history;
pub mod link;
pub mod load;
pub mod local;
pub mod overload;
pub mod ports;
pub mod report;
pub mod run;
pub mod scenario;

/// Why a drill could not run (as opposed to a drill that ran and missed its targets).
#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    /// The command was asked something it cannot do.
    #[error("{0}")]
    Usage(String),
    /// The deployment could not be started, broken or repaired as the drill needs.
    #[error("deployment: {0}")]
    Deployment(String),
    /// Reports could not be written or read.
    #[error("reports: {0}")]
    Reports(String),
}
