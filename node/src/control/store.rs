//! A single node's desired state: commands applied by the pure `apply` and the result saved
//! atomically (write, fsync, rename) under `--data-dir`, so a restarted node keeps it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use shoal_proto::{Applied, ApplyError, Command, State, apply};
use tokio::sync::{Mutex, watch};

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

/// Desired state owned by this node alone.
pub struct LocalStore {
    path: PathBuf,
    state: Mutex<State>,
    tx: watch::Sender<Arc<State>>,
}

const FILE: &str = "state.json";

impl LocalStore {
    /// Loads the saved state of `dir`, or starts empty.
    pub fn open(dir: &Path) -> anyhow::Result<LocalStore> {
        std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("cannot create data dir {}: {e}", dir.display()))?;
        let path = dir.join(FILE);
        let state: State = match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|e| anyhow::anyhow!("{} is corrupt: {e}", path.display()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => anyhow::bail!("cannot read {}: {e}", path.display()),
        };
        let (tx, _) = watch::channel(Arc::new(state.clone()));
        Ok(LocalStore { path, state: Mutex::new(state), tx })
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<State>> {
        self.tx.subscribe()
    }

    pub fn current(&self) -> Arc<State> {
        self.tx.borrow().clone()
    }

    /// Applies and persists one command; nothing changes if either step fails.
    pub async fn propose(&self, cmd: Command) -> Result<Applied, ProposeError> {
        let mut guard = self.state.lock().await;
        let mut next = guard.clone();
        let applied = apply(&mut next, &cmd)?;
        if !matches!(cmd, Command::Noop) {
            save(&self.path, &next).map_err(|e| ProposeError::Unavailable(format!("cannot save state: {e}")))?;
        }
        *guard = next.clone();
        self.tx.send_replace(Arc::new(next));
        Ok(applied)
    }
}

fn save(path: &Path, state: &State) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
