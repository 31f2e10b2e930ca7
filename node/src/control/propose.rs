//! How a proposed change can fail, whatever store holds desired state.

use shoal_proto::ApplyError;

/// Why a proposal did not take effect.
#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    #[error(transparent)]
    Refused(#[from] ApplyError),
    #[error("not committed: {0}")]
    Unavailable(String),
}

impl ProposeError {
    pub fn status(&self) -> u16 {
        match self {
            ProposeError::Refused(e) => e.status(),
            ProposeError::Unavailable(_) => 503,
        }
    }
}
