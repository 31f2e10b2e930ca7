//! The control plane: desired state (Raft), membership and observations (gossip), and the
//! leader-only membership loop that joins the two.

pub mod gossip;
pub mod membership;
pub mod propose;
pub mod raft;

pub use propose::ProposeError;
