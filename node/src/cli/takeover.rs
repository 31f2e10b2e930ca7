//! The process side of a seamless upgrade (the protocol is `crate::upgrade`): a node starts
//! by taking over from one already running on its data directory, if there is one; while it
//! runs it hands over to a newer process that asks, and SIGUSR2 starts its own executable
//! again (the file may now hold a new release) to do so.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};

use crate::control::raft::CoreFailure;
use crate::node::{NodeHandle, NodeOptions, Released};
use crate::upgrade::{Asked, Offer, notify_systemd};

/// How long a node that took over waits to be ready before it accepts anyway (readiness
/// itself gives up waiting for health verdicts after 10 s).
const READY_WAIT: Duration = Duration::from_secs(30);

static EXECUTABLE: OnceLock<Option<PathBuf>> = OnceLock::new();

/// Notes the executable's path now: after a package upgrade replaced the file,
/// `/proc/self/exe` names the deleted old one.
pub fn remember_executable() {
    EXECUTABLE.get_or_init(|| std::env::current_exe().ok());
}

/// Starts the node, on the sockets of the node running on the same data directory if any.
pub async fn start(opts: NodeOptions) -> anyhow::Result<NodeHandle> {
    let dir = opts.data_dir.clone();
    let takeover = tokio::task::spawn_blocking(move || crate::upgrade::take_over(&dir))
        .await?
        .with_context(|| format!("cannot take over from the node running on {}", opts.data_dir.display()))?;
    let Some(mut takeover) = takeover else {
        let node = crate::node::start(opts).await?;
        notify_systemd("READY=1");
        return Ok(node);
    };
    tracing::info!(
        sockets = takeover.inherited.len(),
        data_dir = %opts.data_dir.display(),
        "took over the listening sockets of the node running on this data directory"
    );
    let inherited = std::mem::take(&mut takeover.inherited);
    // On failure `takeover` is dropped: the old node sees it and keeps serving.
    let node = crate::node::start_with(opts, Some(inherited)).await?;
    if !node.accept_when_ready(READY_WAIT).await {
        tracing::warn!("not ready {}s after the takeover; accepting anyway", READY_WAIT.as_secs());
    }
    takeover.accepting().context("cannot tell the old node that this one accepts")?;
    tracing::info!("accepting; the old process drains its connections");
    notify_systemd(&format!("MAINPID={}\nREADY=1", std::process::id()));
    Ok(node)
}

/// Serves until a signal stops the node, its Raft core fails, or a new process takes over.
pub async fn serve(
    node: NodeHandle,
    offer: Option<&Offer>,
    upgrade_drain: Duration,
    drain_timeout: Duration,
) -> Option<CoreFailure> {
    let mut usr2 = signal(SignalKind::user_defined2()).ok();
    let failure = node.raft_failure();
    tokio::pin!(failure);
    let asked = loop {
        tokio::select! {
            _ = super::wait_for_signal() => {
                node.shutdown().await;
                return None;
            }
            f = &mut failure => return Some(f),
            _ = recv(&mut usr2) => respawn(),
            asked = next(offer) => break asked,
        }
    };
    hand_over(node.release().await, asked, offer, upgrade_drain, drain_timeout).await;
    None
}

/// After the release: sends the sockets to each process that asks until one accepts, then
/// drains. Until then this process goes on accepting on its last routing table.
async fn hand_over(
    released: Released,
    first: Asked,
    offer: Option<&Offer>,
    upgrade_drain: Duration,
    drain_timeout: Duration,
) {
    let mut asked = Some(first);
    loop {
        if let Some(a) = asked.take() {
            tracing::info!(pid = a.pid, version = %a.version, "a new process takes over this node");
            match released.with_sockets(|s| a.send(s)) {
                Ok(()) if a.accepted().await => {
                    released.drain(upgrade_drain, super::wait_for_signal(), drain_timeout).await;
                    return;
                }
                Ok(()) => tracing::error!(
                    "the new process ended before it accepted; this one serves on with its last routing table, without a control plane, until another takes over or it is stopped"
                ),
                Err(e) => tracing::error!(error = %e, "cannot hand the sockets over; serving on"),
            }
        }
        tokio::select! {
            _ = super::wait_for_signal() => {
                released.drain(drain_timeout, std::future::pending(), drain_timeout).await;
                return;
            }
            a = next(offer) => asked = Some(a),
        }
    }
}

/// The next takeover request (never, without an upgrade socket).
async fn next(offer: Option<&Offer>) -> Asked {
    let Some(offer) = offer else { return std::future::pending().await };
    loop {
        match offer.next().await {
            Ok(a) => return a,
            Err(e) => {
                tracing::warn!(error = %e, "upgrade socket: accept failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

async fn recv(sig: &mut Option<tokio::signal::unix::Signal>) {
    match sig {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

/// SIGUSR2: starts this executable again with the same arguments; the new process takes over.
fn respawn() {
    let Some(exe) = EXECUTABLE.get().cloned().flatten() else {
        tracing::error!("SIGUSR2: the executable's path is unknown; start the new process by hand");
        return;
    };
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    match std::process::Command::new(&exe).args(&args).spawn() {
        Ok(mut child) => {
            tracing::info!(pid = child.id(), exe = %exe.display(), "SIGUSR2: started a new process to take over");
            // Reap it; a failure to take over is logged by both sides.
            std::thread::spawn(move || match child.wait() {
                Ok(status) if !status.success() => tracing::warn!(%status, "the process started by SIGUSR2 exited"),
                _ => {}
            });
        }
        Err(e) => tracing::error!(exe = %exe.display(), error = %e, "SIGUSR2: cannot start a new process"),
    }
}
