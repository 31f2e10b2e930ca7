//! Deterministic simulation of shoal's Raft control plane (issue 15, part 1): openraft with
//! shoal's own redb `LogStore` and `StateMachine`, in one process on tokio's paused clock, every
//! Raft message through a seeded simulated network, membership driven by `membership::plan`, and
//! safety checkers over what the run observed. A seed replays exactly; the trace hash proves it.

pub mod check;
pub mod client;
pub mod net;
pub mod trace;
pub mod world;

pub use world::{Report, Settings, run};

/// Fault steps in one simulated minute.
pub const MINUTE_STEPS: u64 = 3000;

/// The one command that replays `seed` with its full trace.
pub fn replay_command(seed: u64, steps: u64) -> String {
    let steps = if steps == MINUTE_STEPS { String::new() } else { format!(" --steps {steps}") };
    format!("cargo run -p shoal-sim --release --bin simulate -- --seed {seed}{steps} --verbose")
}
