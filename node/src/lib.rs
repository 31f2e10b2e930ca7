//! shoal-node: one node of a shoal load-balancer cluster.
//!
//! - [`dataplane`]: worker threads that accept and proxy client traffic (TCP, HTTP, WebSocket);
//! - [`routing`]: the immutable snapshot the data plane reads, and [`reconcile`] that builds it;
//! - [`health`]: active probes, heartbeats, passive ejection, hysteresis;
//! - [`control`]: desired state and how it changes;
//! - [`admin`]: the JSON admin API; [`cli`]: the `shoal` command line;
//! - [`node`]: start and shutdown order; [`config`]: config files, kept in force by
//!   [`config_watch`]; [`metrics`]: Prometheus; [`files`]: private secrets, atomic writes;
//!   [`clock`]: the wall clock shoal reads (with the fault-injection offset); [`hash`]: the
//!   stable hash every node computes alike.

pub mod admin;
pub mod cli;
pub mod clock;
pub mod config;
pub mod config_watch;
pub mod control;
pub mod dataplane;
pub mod demo;
pub mod ec;
pub mod files;
pub mod hash;
pub mod health;
pub mod metrics;
pub mod node;
pub mod reconcile;
pub mod routing;
pub mod shutdown;
pub mod upgrade;
