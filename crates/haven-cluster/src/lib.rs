//! Haven's cluster logic, on the state layer and nothing else: which nodes are alive
//! ([`membership`]), who owns each execution and how a dead owner's work is taken over without
//! two nodes ever both running it ([`ownership`]), and roles one node holds at a time
//! ([`lease`]), and how regions apply each other's logs ([`regions`]). Nothing here trusts wall clocks to agree: liveness and lease expiry are
//! measured on each node's own monotonic clock.

pub mod lease;
pub mod membership;
pub mod ownership;
pub mod regions;
pub mod takeover;

pub use lease::{Holding, Lease};
pub use membership::{Member, Membership, MembershipConfig, NODES_NS, NodeInfo};
pub use ownership::{
    Claim, ClaimError, Execution, FenceError, FencedStore, Landed, OWNERS_NS, Owner,
};
pub use takeover::RegionLease;
