"""Unit tests of the scenario runner's pure parts (no docker): reading Prometheus answers, the
limits, and that every scenario file names only steps and limits the runner knows.

    python3 -m unittest discover -s scenarios -p 'test_*.py'     # scripts/test runs this
"""

import importlib.machinery
import importlib.util
import sys
import tomllib
import unittest
from pathlib import Path

HERE = Path(__file__).resolve().parent
_loader = importlib.machinery.SourceFileLoader("scenario_run", str(HERE / "run"))
_spec = importlib.util.spec_from_loader("scenario_run", _loader)
run = importlib.util.module_from_spec(_spec)
sys.modules["scenario_run"] = run  # its dataclasses look their module up
_loader.exec_module(run)


def alert(name, state, **labels):
    return {"labels": {"alertname": name, **labels}, "state": state}


class AlertState(unittest.TestCase):
    def test_picks_the_named_alert_with_matching_labels(self):
        payload = {"status": "success", "data": {"alerts": [
            alert("ShoalNodeDown", "firing", instance="10.89.213.12:8081", job="shoal"),
            alert("ShoalNodeDown", "pending", instance="10.89.213.13:8081", job="shoal"),
            alert("ShoalNoLeader", "firing", job="shoal"),
        ]}}
        self.assertEqual(run.alert_state(payload, "ShoalNodeDown", {"instance": "10.89.213.12:8081"}), "firing")
        self.assertEqual(run.alert_state(payload, "ShoalNodeDown", {"instance": "10.89.213.13:8081"}), "pending")
        self.assertEqual(run.alert_state(payload, "ShoalNodeDown", {"instance": "10.89.213.11:8081"}), "inactive")
        self.assertEqual(run.alert_state(payload, "ShoalNodeDown", {}), "firing", "the most advanced state")
        self.assertEqual(run.alert_state(payload, "ShoalPoolEmpty", {}), "inactive")

    def test_empty_or_odd_answers_are_inactive(self):
        for payload in ({}, {"data": None}, {"data": {"alerts": None}}, {"data": {"alerts": [{"labels": None}]}}):
            self.assertEqual(run.alert_state(payload, "ShoalNodeDown", {}), "inactive", payload)


class TargetsUp(unittest.TestCase):
    def test_counts_the_jobs_targets(self):
        payload = {"data": {"activeTargets": [
            {"labels": {"job": "shoal"}, "health": "up"},
            {"labels": {"job": "shoal"}, "health": "unknown"},
            {"labels": {"job": "shoal"}, "health": "up"},
            {"labels": {"job": "other"}, "health": "up"},
        ]}}
        self.assertEqual(run.targets_up(payload, "shoal"), (2, 3))
        self.assertEqual(run.targets_up({}, "shoal"), (0, 0))


class NoDocker:
    ids: dict = {}


class Limits(unittest.TestCase):
    def test_alert_limits(self):
        r = run.Run("t", {}, NoDocker(), None, run.Ledger(), 0)
        r.m.update(alert_firing_s=38.5, alert_resolved_s=31.0)
        got = dict(r.evaluate({"alert_firing_within_s": 45, "alert_resolved_within_s": 30}))
        self.assertEqual(got, {"alert_firing_s 38.5 <= 45": True, "alert_resolved_s 31.0 <= 30": False})
        self.assertEqual(r.evaluate({"alert_firing_within_s": 45})[0][1], True)
        r.m.pop("alert_firing_s")
        self.assertFalse(r.evaluate({"alert_firing_within_s": 45})[0][1], "not measured is a failure")


class ScenarioFiles(unittest.TestCase):
    def test_every_step_and_limit_is_known(self):
        files = sorted(HERE.glob("*.toml"))
        self.assertGreaterEqual(len(files), 19)
        for path in files:
            spec = tomllib.loads(path.read_text())
            for i, step in enumerate(spec.get("step", []), 1):
                self.assertTrue(hasattr(run.Run, "step_" + step["do"]), f"{path.name} step {i}: {step['do']}")
            for key in [*spec.get("expect", {}), *spec.get("known_issue", {})]:
                self.assertTrue(key == "note" or key in run.Run.LIMITS, f"{path.name}: unknown limit {key}")

    def test_the_alert_scenario_is_in_the_fast_set(self):
        fast = run.select(sorted(HERE.glob("*.toml")), [], False)
        self.assertIn("19-node-down-alert", [p.stem for p in fast])


if __name__ == "__main__":
    unittest.main()
