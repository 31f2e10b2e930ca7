//! Seeded clients: each proposes a stream of writes to whoever leads (retrying with the same
//! proposal id on "not leader", as shoal's `propose` does) and records how each ended.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::ServerState;
use openraft::error::{ClientWriteError, RaftError};
use shoal_proto::{BackendSpec, Command, PoolSpec, Proposal};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::check::{Op, Outcome};
use crate::net::SimNet;
use crate::trace::{Trace, mix};

/// A write's whole deadline (shoal's `WRITE_DEADLINE`).
const DEADLINE: Duration = Duration::from_secs(10);

/// The `n`th command of client `c`: a small key space, so refusals (missing pools) happen too.
pub fn command(seed: u64, c: usize, n: u64) -> Command {
    let r = mix(seed ^ mix(c as u64 ^ mix(n)));
    let pool = format!("p{}", r % 4);
    let addr: SocketAddr =
        format!("10.0.0.{}:80", 1 + (r >> 8) % 6).parse().unwrap_or_else(|_| ([10, 0, 0, 1], 80).into());
    match (r >> 16) % 10 {
        0..=2 => Command::PutPool {
            spec: PoolSpec { pattern: Some(format!("/{pool}/")), ..PoolSpec::default() },
            name: pool,
        },
        3 => Command::DeletePool { name: pool },
        4..=7 => Command::PutBackend {
            pool,
            addr,
            spec: BackendSpec { weight: 1 + (r >> 24) as u32 % 5, ..BackendSpec::default() },
        },
        _ => Command::DeleteBackend { pool, addr },
    }
}

/// Runs client `c` until `stop` turns true, appending to `ops`.
pub async fn run(
    seed: u64,
    c: usize,
    net: SimNet,
    trace: Trace,
    ops: Arc<Mutex<Vec<Op>>>,
    stop: watch::Receiver<bool>,
) {
    let mut n = 0u64;
    while !*stop.borrow() {
        n += 1;
        let cmd = command(seed, c, n);
        let proposal = mix(seed ^ mix(0xC11E ^ mix((c as u64) << 32 | n))) | 1;
        let invoked_ms = trace.now_ms();
        let outcome = write(&net, Proposal { id: proposal, cmd: cmd.clone() }).await;
        let returned_ms = trace.now_ms();
        trace.event(format!("client {c} op {n} {outcome:?}"));
        let op = Op { client: c, proposal, cmd, invoked_ms, returned_ms, outcome };
        ops.lock().unwrap_or_else(|p| p.into_inner()).push(op);
        let pause = 20 + mix(seed ^ mix(n ^ 0xA5A5 ^ c as u64)) % 200;
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

/// The node that says it leads with the highest term, if any is up.
pub fn leader(net: &SimNet) -> Option<u64> {
    net.up()
        .into_iter()
        .filter_map(|(id, r)| {
            let m = r.metrics().borrow().clone();
            (m.state == ServerState::Leader).then_some((m.current_term, id))
        })
        .max()
        .map(|(_, id)| id)
}

async fn write(net: &SimNet, p: Proposal) -> Outcome {
    write_once(net, p, Instant::now() + DEADLINE).await
}

/// Proposes `p` until `deadline`, following "not leader" hints; the same id on every try.
pub async fn write_once(net: &SimNet, p: Proposal, deadline: Instant) -> Outcome {
    let mut target = leader(net);
    while Instant::now() < deadline {
        let Some(raft) = target.and_then(|id| net.raft(id)) else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            target = leader(net);
            continue;
        };
        let attempt = tokio::time::timeout_at(deadline, raft.client_write(p.clone())).await;
        match attempt {
            Err(_) => return Outcome::Unknown,
            Ok(Ok(resp)) => {
                return match resp.data {
                    Ok(applied) => Outcome::Acked(applied.version),
                    Err(e) => Outcome::Refused(e),
                };
            }
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) if f.leader_id.is_some() => {
                target = f.leader_id;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok(Err(_)) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                target = leader(net);
            }
        }
    }
    Outcome::Unknown
}

/// Writes `cmds` in order as client `c`, each retried (with a fresh proposal id) until acked
/// or `stop` turns true: the world's own setup, e.g. the health-checked pool.
pub async fn setup(
    seed: u64,
    c: usize,
    cmds: Vec<Command>,
    net: SimNet,
    trace: Trace,
    ops: Arc<Mutex<Vec<Op>>>,
    stop: watch::Receiver<bool>,
) {
    let mut attempt = 0u64;
    for cmd in cmds {
        while !*stop.borrow() {
            attempt += 1;
            let proposal = mix(seed ^ mix(0x5E7 ^ mix(attempt))) | 1;
            let invoked_ms = trace.now_ms();
            let outcome = write(&net, Proposal { id: proposal, cmd: cmd.clone() }).await;
            trace.event(format!("setup write {attempt} {outcome:?}"));
            let acked = matches!(outcome, Outcome::Acked(_));
            let op = Op { client: c, proposal, cmd: cmd.clone(), invoked_ms, returned_ms: trace.now_ms(), outcome };
            ops.lock().unwrap_or_else(|p| p.into_inner()).push(op);
            if acked {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}
