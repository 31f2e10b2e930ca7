//! The control plane: desired state (Raft), membership and observations (gossip), and the
//! leader-only membership loop that joins the two.

pub mod gossip;
pub mod gossip_auth;
pub mod incarnation;
pub mod membership;
pub mod pki;
pub mod propose;
pub mod raft;
pub mod ratelog;
pub mod secure;

pub use propose::ProposeError;
