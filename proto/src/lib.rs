//! shoal-proto: the vocabulary that crosses a shoal process boundary.
//!
//! - [`spec`]: desired state (pools, backends) as operators write it;
//! - [`command`]: the commands Raft replicates and the pure `apply` every node runs;
//! - [`heartbeat`]: seed 004's UDP heartbeat datagrams;
//! - [`admin`]: JSON bodies of the admin API;
//! - [`proxy`]: PROXY protocol headers (framing, parsing, encoding) and trusted-source blocks;
//! - [`codec`]: the binary frame format of node-to-node RPC (the only user of bincode).
//!
//! Nothing here does I/O or knows about tokio.

pub mod admin;
pub mod codec;
pub mod command;
pub mod heartbeat;
pub mod proxy;
pub mod spec;

pub use command::{Applied, ApplyError, Command, Proposal, apply};
pub use spec::{
    Algorithm, Backend, BackendSpec, CheckKind, HealthSpec, OutlierSpec, Pool, PoolSpec, Protocol, Scope, State,
};
