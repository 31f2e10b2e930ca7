//! The node's config sources (the `--config` file, the EC environment), each kept in force
//! by a `config_watch::Keeper`, and the EC gateway watch.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Context;
use tokio::task::JoinHandle;

use super::NodeOptions;
use crate::config;
use crate::config_watch::{self, Keeper, Source};

/// Starts a keeper per source and the EC gateway watch; returns their tasks. `alone`: the
/// node is its own leader, so its sources are applied before this returns (the listeners
/// then open with the pools in place); in a cluster a leader may still be elected, so they
/// are applied in the background. Each source counts in `ctx.pending` until applied.
pub(super) async fn start(
    file: Option<config::ConfigFile>,
    opts: &NodeOptions,
    ctx: config_watch::Ctx,
    alone: bool,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let sources = config_sources(file, opts)?;
    let mut tasks = Vec::new();
    if let Some(ec) = opts.ec.clone() {
        tasks.push(spawn_gateway_watch(ctx.clone(), ec, opts.data_dir.clone()));
    }
    ctx.pending.store(sources.len(), Ordering::Relaxed);
    for source in sources {
        let mut keeper = Keeper::new(ctx.clone(), source, &opts.data_dir);
        if alone {
            keeper.apply_at_start().await;
            tasks.push(tokio::spawn(keeper.watch()));
        } else {
            tasks.push(tokio::spawn(keeper.run()));
        }
    }
    Ok(tasks)
}

/// The config file (watched, and reloaded on SIGHUP) and the EC environment's pools.
fn config_sources(file: Option<config::ConfigFile>, opts: &NodeOptions) -> anyhow::Result<Vec<Source>> {
    let mut sources = Vec::new();
    if let (Some(file), Some(path)) = (file, opts.config.clone()) {
        let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(|e| tracing::warn!(error = %e, "cannot watch SIGHUP; the config file is still polled"))
            .ok();
        sources.push(Source {
            label: path.display().to_string(),
            file,
            digest: config_watch::digest(&bytes),
            marker: "config.applied",
            watch: Some(config_watch::Watch { path, poll: opts.config_poll, hangup }),
        });
    }
    if let Some(ec) = &opts.ec {
        sources.push(ec_source(ec.config())?);
    }
    Ok(sources)
}

/// The EC environment's pool as a config source (one digest per resolved gateway set).
fn ec_source(file: config::ConfigFile) -> anyhow::Result<Source> {
    let digest = config_watch::digest(&serde_json::to_vec(&file.pools)?);
    Ok(Source { label: "EC environment".into(), file, digest, marker: "ec.applied", watch: None })
}

/// Resolves EC gateways named by host name again and proposes a moved one the way the EC
/// environment was proposed: only the difference, so slots keep following `GATEWAY_LIST` order
/// and operator edits to the other gateways (drain flags, weights) stay.
fn spawn_gateway_watch(ctx: config_watch::Ctx, ec: crate::ec::EcSetup, data_dir: PathBuf) -> JoinHandle<()> {
    let failures = ctx.metrics.ec_resolve_failures.clone();
    let resolve: crate::ec::Resolve = Arc::new(crate::ec::resolve_entry);
    tokio::spawn(crate::ec::watch_gateways(ec, resolve, failures, move |file| {
        let (ctx, data_dir) = (ctx.clone(), data_dir.clone());
        async move {
            match ec_source(file) {
                Ok(source) => Keeper::new(ctx, source, &data_dir).apply_if_changed().await,
                Err(e) => tracing::error!(error = %e, "cannot encode the EC gateways"),
            }
        }
    }))
}
