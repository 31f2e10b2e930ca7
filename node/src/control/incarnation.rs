//! What a restarted node must start above even when its wall clock went back: its gossip
//! generation (peers tell a restart by it) and the sequence of its gossip datagrams (peers
//! refuse a sequence at or below one they have seen as a replay, see `gossip_auth`).
//!
//! Both start at the wall clock, as before, but never below what the data directory records:
//! the last generation, and the end of the block of sequences this node reserved. A block is
//! recorded durably before any sequence of it is used, so a new incarnation always starts
//! above every sequence an earlier one sent, whatever the clock says. A node that starts with
//! its clock 90 s behind is therefore refused only while its stamps are outside the ±60 s
//! window (as `Stale`), and heard again as soon as its clock is right.
//!
//! Replay protection is unchanged: receivers keep the same per-sender window and the same stamp
//! window; the record only guarantees that no two datagrams of one node, across restarts,
//! share a sequence. Without the record (a wiped data directory) the start falls back to the
//! clock alone: a node wiped and restarted with its clock behind its previous incarnation's
//! start is refused as a replay by peers that remember it until its clock passes that start.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// The record's file in the data directory.
pub const FILE: &str = "gossip.state";
/// Sequences reserved per write of the record (at a few dozen datagrams a second, years).
pub const SEQ_BLOCK: u64 = 1 << 32;

/// What the data directory records about the last incarnation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recorded {
    pub generation: u64,
    /// Every sequence sent so far is below this.
    pub seq_reserved: u64,
}

/// Why the record could not be used.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("{}: {}", .0.display(), .1)]
    Io(PathBuf, std::io::Error),
    #[error("{}: line {:?} is not `generation N` or `seq_reserved N`; remove the file to start over", .0.display(), .1)]
    Corrupt(PathBuf, String),
}

impl Recorded {
    pub fn parse(text: &str, path: &Path) -> Result<Recorded, RecordError> {
        let mut r = Recorded::default();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let corrupt = || RecordError::Corrupt(path.to_path_buf(), line.to_string());
            let (key, value) = line.split_once(' ').ok_or_else(corrupt)?;
            let value: u64 = value.trim().parse().map_err(|_| corrupt())?;
            match key {
                "generation" => r.generation = value,
                "seq_reserved" => r.seq_reserved = value,
                _ => return Err(corrupt()),
            }
        }
        Ok(r)
    }

    pub fn render(&self) -> String {
        format!(
            "# shoal gossip incarnation: a restart starts above these\ngeneration {}\nseq_reserved {}\n",
            self.generation, self.seq_reserved
        )
    }

    fn load(path: &Path) -> Result<Recorded, RecordError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Recorded::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Recorded::default()),
            Err(e) => Err(RecordError::Io(path.to_path_buf(), e)),
        }
    }

    fn store(&self, path: &Path) -> Result<(), RecordError> {
        crate::files::write_atomic(path, self.render().as_bytes(), 0o644)
            .map_err(|e| RecordError::Io(path.to_path_buf(), e))
    }
}

/// The new incarnation after `prev`, at wall-clock time `now`: its generation (nanoseconds,
/// above the last one), its first sequence (microseconds, at or above the reserved end) and
/// what to record before it sends.
pub fn next(prev: Recorded, now: SystemTime, block: u64) -> (u64, u64, Recorded) {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let generation = (since.as_nanos() as u64).max(prev.generation.saturating_add(1));
    let seq = (since.as_micros() as u64).max(prev.seq_reserved);
    (generation, seq, Recorded { generation, seq_reserved: seq.saturating_add(block) })
}

/// This node's datagram sequence: grows by one per datagram, reserving the next block in the
/// record before it leaves the current one.
pub struct Sequence {
    next: AtomicU64,
    record: Mutex<Recorded>,
    file: Option<PathBuf>,
    block: u64,
}

impl Sequence {
    /// A sequence that records nothing (tests, nodes without a data directory).
    pub fn unrecorded(start: u64) -> Sequence {
        Sequence { next: AtomicU64::new(start), record: Mutex::new(Recorded::default()), file: None, block: SEQ_BLOCK }
    }

    /// The number for the next datagram.
    pub fn next(&self) -> u64 {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        if self.file.is_some() && seq >= self.lock().seq_reserved {
            self.reserve_past(seq);
        }
        seq
    }

    /// Records the block after `seq` (a blocking write, once per [`SEQ_BLOCK`] datagrams). A
    /// failed write is logged and the sequence goes on: gossip must not stop, and the clock
    /// (a million a second) soon passes what an unrecorded block could have used.
    fn reserve_past(&self, seq: u64) {
        let mut record = self.lock();
        if seq < record.seq_reserved {
            return; // another sender reserved it meanwhile
        }
        let wanted = Recorded { seq_reserved: seq.saturating_add(self.block), ..*record };
        if let Some(file) = &self.file
            && let Err(e) = wanted.store(file)
        {
            tracing::warn!(error = %e, "cannot record the gossip sequence block; a restart may be refused as a replay for a while");
        }
        *record = wanted;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Recorded> {
        self.record.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Begins this process's incarnation from the record in `file` (created when missing): the
/// gossip generation and the datagram sequence, both recorded before they are used.
pub fn begin(file: &Path, now: SystemTime) -> Result<(u64, Sequence), RecordError> {
    begin_with(file, now, SEQ_BLOCK)
}

fn begin_with(file: &Path, now: SystemTime, block: u64) -> Result<(u64, Sequence), RecordError> {
    let prev = Recorded::load(file)?;
    let (generation, start, record) = next(prev, now, block);
    record.store(file)?;
    let seq =
        Sequence { next: AtomicU64::new(start), record: Mutex::new(record), file: Some(file.to_path_buf()), block };
    Ok((generation, seq))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn a_restart_with_the_clock_behind_starts_above_the_last_incarnation() {
        let (g1, s1, r1) = next(Recorded::default(), at(1_000), 1_000);
        assert_eq!((g1, s1), (1_000_000_000_000, 1_000_000_000), "from the clock when nothing is recorded");
        assert_eq!(r1, Recorded { generation: g1, seq_reserved: s1 + 1_000 });
        let (g2, s2, _) = next(r1, at(910), 1_000);
        assert!(g2 > g1 && s2 >= r1.seq_reserved && s2 > s1, "90 s behind: still above ({g2}, {s2})");
        let (g3, s3, _) = next(r1, at(2_000), 1_000);
        assert_eq!((g3, s3), (2_000_000_000_000, 2_000_000_000), "a clock ahead of the record wins");
    }

    #[test]
    fn the_record_round_trips_and_garbage_is_refused_by_line() {
        let r = Recorded { generation: 7, seq_reserved: u64::MAX };
        assert_eq!(Recorded::parse(&r.render(), Path::new("f")).expect("parse"), r);
        for bad in ["generation", "generation x", "epoch 5", "seq_reserved -1"] {
            let e = Recorded::parse(bad, Path::new("f")).expect_err(bad).to_string();
            assert!(e.contains(bad) && e.starts_with("f:"), "{e}");
        }
    }

    #[test]
    fn every_sequence_used_is_below_the_recorded_reservation() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join(FILE);
        let (g1, seq) = begin_with(&file, at(1_000), 10).expect("begin");
        let first = seq.next();
        assert_eq!(first, 1_000_000_000);
        let mut last = first;
        for _ in 0..25 {
            last = seq.next();
            let on_disk = Recorded::load(&file).expect("load");
            assert!(last < on_disk.seq_reserved, "{last} sent, {} recorded", on_disk.seq_reserved);
            assert_eq!(on_disk.generation, g1, "a reservation keeps the generation");
        }
        drop(seq);
        // Restarted with the clock 90 s behind: above everything sent, and a newer generation.
        let (g2, again) = begin_with(&file, at(910), 10).expect("restart");
        assert!(again.next() > last && g2 > g1);
    }

    #[test]
    fn an_unreadable_record_stops_the_start_with_the_file_named() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join(FILE);
        std::fs::write(&file, "generation 1\nnonsense\n").expect("write");
        let e = begin(&file, at(1)).err().expect("refused").to_string();
        assert!(e.contains(FILE) && e.contains("nonsense"), "{e}");
    }
}
