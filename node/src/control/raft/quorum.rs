//! CheckQuorum for openraft 0.9: a leader that no quorum has acknowledged for a while steps
//! down, so that a node with a degraded link does not keep the cluster leaderless.
//!
//! openraft gives every AppendEntries RPC the heartbeat interval as its deadline. When the
//! leader's round trip to its followers exceeds it (a lossy or slow link on the leader only),
//! no RPC ever completes and nothing commits, yet the followers keep receiving the leader's
//! late heartbeats, so they never elect another leader. openraft 0.9 has neither CheckQuorum
//! nor a step-down call, but it reports `millis_since_quorum_ack` and lets heartbeats be turned
//! off. So a leader past [`QuorumWatch`]'s limit turns its heartbeats off, sends no appends
//! (its network refuses them, as if unreachable) and refuses new proposals (they are retried on
//! the next leader): the followers' election timers run out and a node with a working link
//! takes over. When this node is no longer the
//! leader, or a quorum acknowledges it again, heartbeats come back on.
//!
//! Safety does not depend on this: it only stops a leader from sending; terms and votes are
//! openraft's.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use openraft::ServerState;

use super::RaftNode;
use crate::shutdown::Shutdown;

/// What the watch decided for one observation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Nothing,
    /// Heartbeats off, proposals refused: the leader has not heard a quorum for `since`.
    StepDown {
        since: Duration,
    },
    /// Heartbeats on again.
    Resume,
}

/// One observation of this node's Raft metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observed {
    pub leader: bool,
    /// Voters in the membership: a single voter is its own quorum.
    pub voters: usize,
    /// Time since a quorum last acknowledged this leader (None: not a leader, or never yet).
    pub since_ack: Option<Duration>,
}

/// The pure decision: when to step down and when to resume.
#[derive(Debug)]
pub struct QuorumWatch {
    limit: Duration,
    stepped_down: bool,
}

impl QuorumWatch {
    /// `limit`: how long a leader may go without a quorum's acknowledgement.
    pub fn new(limit: Duration) -> QuorumWatch {
        QuorumWatch { limit, stepped_down: false }
    }

    /// The limit for an election timeout: twice its maximum (a healthy leader is acknowledged
    /// every heartbeat; followers elect after one election timeout without one), at least 1 s.
    pub fn limit_for(election_max: Duration) -> Duration {
        (election_max * 2).max(Duration::from_secs(1))
    }

    pub fn stepped_down(&self) -> bool {
        self.stepped_down
    }

    pub fn observe(&mut self, o: Observed) -> Step {
        let lost = o.leader && o.voters > 1 && o.since_ack.is_some_and(|d| d > self.limit);
        let heard = o.since_ack.is_some_and(|d| d <= self.limit / 2);
        match (self.stepped_down, lost) {
            (false, true) => {
                self.stepped_down = true;
                Step::StepDown { since: o.since_ack.unwrap_or_default() }
            }
            (true, _) if !o.leader || heard => {
                self.stepped_down = false;
                Step::Resume
            }
            _ => Step::Nothing,
        }
    }
}

/// Whether this node refuses proposals because it leads without a quorum (shared with
/// [`RaftNode::propose`] and the forwarded-write handler).
#[derive(Clone, Debug, Default)]
pub struct SteppingDown(Arc<AtomicBool>);

impl SteppingDown {
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    fn set(&self, v: bool) {
        self.0.store(v, Ordering::Relaxed);
    }
}

/// Observes the Raft metrics every 100 ms and applies the watch's decisions.
pub async fn run(raft: Arc<RaftNode>, limit: Duration, mut shutdown: Shutdown) {
    let mut watch = QuorumWatch::new(limit);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait() => return,
        }
        let m = raft.raft.metrics().borrow().clone();
        let o = Observed {
            leader: m.state == ServerState::Leader,
            voters: m.membership_config.membership().voter_ids().count(),
            since_ack: m.millis_since_quorum_ack.map(Duration::from_millis),
        };
        match watch.observe(o) {
            Step::Nothing => {}
            Step::StepDown { since } => {
                tracing::warn!(
                    since_ms = since.as_millis() as u64,
                    "this leader has had no acknowledgement from a quorum for {since:?}: stepping down \
                     (heartbeats off, writes refused) so that a node with a working link takes over; \
                     a Raft RPC must complete within the heartbeat interval (--raft-heartbeat-ms)"
                );
                raft.wire.stepping_down.set(true);
                raft.raft.runtime_config().heartbeat(false);
            }
            Step::Resume => {
                tracing::info!(leader = o.leader, "quorum contact restored: heartbeats on");
                raft.raft.runtime_config().heartbeat(true);
                raft.wire.stepping_down.set(false);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_millis(1200);

    fn leader(since_ms: Option<u64>) -> Observed {
        Observed { leader: true, voters: 3, since_ack: since_ms.map(Duration::from_millis) }
    }

    #[test]
    fn a_leader_acknowledged_in_time_stays() {
        let mut w = QuorumWatch::new(LIMIT);
        for ms in [None, Some(0), Some(150), Some(1200)] {
            assert_eq!(w.observe(leader(ms)), Step::Nothing, "{ms:?}");
        }
    }

    #[test]
    fn a_leader_past_the_limit_steps_down_once_and_resumes_when_it_is_no_longer_leader() {
        let mut w = QuorumWatch::new(LIMIT);
        assert_eq!(w.observe(leader(Some(1201))), Step::StepDown { since: Duration::from_millis(1201) });
        assert!(w.stepped_down());
        assert_eq!(w.observe(leader(Some(5000))), Step::Nothing, "no second step-down");
        let follower = Observed { leader: false, voters: 3, since_ack: None };
        assert_eq!(w.observe(follower), Step::Resume);
        assert_eq!(w.observe(follower), Step::Nothing);
    }

    #[test]
    fn a_stepped_down_leader_that_hears_a_quorum_again_resumes() {
        let mut w = QuorumWatch::new(LIMIT);
        w.observe(leader(Some(2000)));
        assert_eq!(w.observe(leader(Some(700))), Step::Nothing, "not yet fresh");
        assert_eq!(w.observe(leader(Some(100))), Step::Resume);
    }

    #[test]
    fn a_single_voter_and_a_follower_never_step_down() {
        let mut w = QuorumWatch::new(LIMIT);
        assert_eq!(
            w.observe(Observed { leader: true, voters: 1, since_ack: Some(Duration::from_secs(60)) }),
            Step::Nothing
        );
        assert_eq!(
            w.observe(Observed { leader: false, voters: 3, since_ack: Some(Duration::from_secs(60)) }),
            Step::Nothing
        );
    }

    #[test]
    fn the_limit_is_twice_the_election_timeout_and_at_least_a_second() {
        assert_eq!(QuorumWatch::limit_for(Duration::from_millis(600)), Duration::from_millis(1200));
        assert_eq!(QuorumWatch::limit_for(Duration::from_millis(300)), Duration::from_secs(1));
    }
}
