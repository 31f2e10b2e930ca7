//! Rise/fall hysteresis: a backend changes verdict only after `rise` consecutive successes
//! or `fall` consecutive failures. The first result after start decides at once, so a
//! starting node neither routes to unchecked backends nor waits `rise` intervals.

use serde::Serialize;

/// What this node (or the cluster) believes about a backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    #[default]
    Unknown,
    Up,
    Down,
}

/// Consecutive results against the current verdict.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hysteresis {
    verdict: Verdict,
    streak: u32,
}

impl Hysteresis {
    pub fn verdict(&self) -> Verdict {
        self.verdict
    }

    /// Records one check result; returns the new verdict when it changed.
    pub fn record(&mut self, ok: bool, rise: u32, fall: u32) -> Option<Verdict> {
        let wanted = if ok { Verdict::Up } else { Verdict::Down };
        if self.verdict == Verdict::Unknown {
            self.verdict = wanted;
            self.streak = 0;
            return Some(wanted);
        }
        if self.verdict == wanted {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if ok { rise } else { fall };
        if self.streak >= needed.max(1) {
            self.verdict = wanted;
            self.streak = 0;
            return Some(wanted);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_result_decides() {
        let mut h = Hysteresis::default();
        assert_eq!(h.record(true, 2, 3), Some(Verdict::Up));
        let mut h = Hysteresis::default();
        assert_eq!(h.record(false, 2, 3), Some(Verdict::Down));
    }

    #[test]
    fn fall_and_rise_need_streaks() {
        let mut h = Hysteresis::default();
        h.record(true, 2, 3);
        assert_eq!(h.record(false, 2, 3), None);
        assert_eq!(h.record(false, 2, 3), None);
        assert_eq!(h.record(true, 2, 3), None, "a success resets the failure streak");
        assert_eq!(h.record(false, 2, 3), None);
        assert_eq!(h.record(false, 2, 3), None);
        assert_eq!(h.record(false, 2, 3), Some(Verdict::Down));
        assert_eq!(h.record(true, 2, 3), None);
        assert_eq!(h.record(true, 2, 3), Some(Verdict::Up));
        assert_eq!(h.verdict(), Verdict::Up);
    }
}
