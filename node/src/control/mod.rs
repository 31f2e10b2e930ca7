//! The control plane: where desired state lives and how it changes.

pub mod store;

pub use store::{LocalStore, ProposeError};
