//! Deterministic simulation of shoal's control plane (issue 15): openraft with shoal's own redb
//! `LogStore`, `StateMachine` and cluster `Identity`, in one process on tokio's paused clock,
//! every Raft message and gossip datagram through a seeded simulated network, the cluster
//! formed by shoal's bootstrap gate or directly, membership driven by `membership::plan` over
//! each leader's gossip view, backend health decided by the node's own health manager core
//! (`health::engine::Core`) and combined by `health::combine`, and checkers over
//! what the run observed. A seed replays exactly; the trace hash proves it.

pub mod check;
pub mod client;
pub mod gossip;
pub mod health;
pub mod net;
pub mod trace;
pub mod world;

pub use world::{Report, Sabotage, Settings, run};

/// Fault steps in one simulated minute.
pub const MINUTE_STEPS: u64 = 3000;

/// The one command that replays `seed` with its full trace.
pub fn replay_command(seed: u64, steps: u64) -> String {
    let steps = if steps == MINUTE_STEPS { String::new() } else { format!(" --steps {steps}") };
    format!("cargo run -p shoal-sim --release --bin simulate -- --seed {seed}{steps} --verbose")
}
