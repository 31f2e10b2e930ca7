#!/usr/bin/env python3
"""Raft write cost of two shoal binaries, side by side: commit latency and writes/s.

Made for issue 14's question "what does mutual TLS cost Raft?": run it with the binary before
the change (shared-key channel) and after (mutual TLS), e.g.

    scenarios/bench/raft_cost.py --before /tmp/shoal-before --after target/release/shoal

Each round starts a three-node cluster of each binary in turn on loopback (127.77.R.1-3),
measures, and stops it:
  - latency: `--writes` sequential writes (PUT a pool) to the leader's admin API, p50/p99;
  - throughput: `--concurrency` writers for `--seconds`, writes/s (all to the leader).
Every loop is bounded in count and time. Prints medians over rounds and after/before ratios.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

TOKEN = "bench-token-0123456789abcdef0123"
ADMIN_PORT, CLUSTER_PORT, HTTP_PORT = 28081, 27946, 28080


def ip(round_no: int, i: int) -> str:
    return f"127.77.{round_no + 1}.{i}"


def creds(binary: str, work: Path, node: str) -> list[str]:
    """Cluster flags for `node`: --cluster-tls (mutual TLS) or --cluster-key-file (older)."""
    help_text = subprocess.run([binary, "node", "--help"], capture_output=True, text=True).stdout
    if "--cluster-tls" in help_text:
        ca = work / "ca"
        if not (ca / "ca.key").exists():
            subprocess.run([binary, "cert", "ca", "--out", str(ca)], check=True, capture_output=True)
        out = work / "tls" / node
        subprocess.run([binary, "cert", "node", "--ca", str(ca), "--id", node, "--out", str(out)],
                       check=True, capture_output=True)
        return ["--cluster-tls", str(out)]
    key = work / "cluster.key"
    if not key.exists():
        subprocess.run([binary, "cert", "cluster-key", "--out", str(key)], check=True, capture_output=True)
    return ["--cluster-key-file", str(key)]


class Cluster:
    def __init__(self, binary: str, round_no: int):
        self.work = Path(tempfile.mkdtemp(prefix="raft-cost-"))
        token = self.work / "admin.token"
        token.write_text(TOKEN)
        token.chmod(0o600)
        self.procs: list[subprocess.Popen] = []
        self.admins = [f"{ip(round_no, i)}:{ADMIN_PORT}" for i in (1, 2, 3)]
        seeds = ",".join(f"{ip(round_no, i)}:{CLUSTER_PORT}" for i in (1, 2, 3))
        for i in (1, 2, 3):
            node = f"n{i}"
            argv = [binary, "node", "--id", node, "--cluster", f"{ip(round_no, i)}:{CLUSTER_PORT}",
                    "--join", seeds, "--expect", "3", "--admin", self.admins[i - 1],
                    "--listen-ip", ip(round_no, i), "--http-port", str(HTTP_PORT),
                    "--data-dir", str(self.work / node), "--token-file", str(token), "--threads", "1",
                    # The same Raft timing for both binaries: only the channel differs.
                    "--raft-heartbeat-ms", "100", "--election-timeout-ms", "400",
                    *creds(binary, self.work, node)]
            log = open(self.work / f"{node}.log", "w")
            self.procs.append(subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL))

    def leader(self, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for a in self.admins:
                try:
                    view = request(a, "GET", "/v1/cluster")
                except OSError:
                    continue
                lead = next((n for n in view.get("nodes", []) if n.get("role") == "leader"), None)
                if lead and all(n.get("voter") for n in view["nodes"]) and len(view["nodes"]) == 3:
                    return lead["admin"]
            time.sleep(0.5)
        raise SystemExit(f"no leader within {timeout}s; logs in {self.work}")

    def stop(self) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(self.work, ignore_errors=True)


def request(admin: str, method: str, path: str, body: dict | None = None,
            conn: http.client.HTTPConnection | None = None) -> dict:
    c = conn or http.client.HTTPConnection(admin, timeout=15)
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    c.request(method, path, body=data, headers=headers)
    resp = c.getresponse()
    raw = resp.read()
    if conn is None:
        c.close()
    if resp.status >= 300:
        raise OSError(f"{method} {path}: {resp.status} {raw[:200]!r}")
    return json.loads(raw) if raw else {}


def write(admin: str, k: int, conn: http.client.HTTPConnection) -> None:
    request(admin, "PUT", f"/v1/pools/b{k % 64}", {"pattern": f"/b{k % 64}/"}, conn)


def latency(admin: str, writes: int) -> dict:
    conn = http.client.HTTPConnection(admin, timeout=15)
    samples = []
    for k in range(writes):
        t0 = time.perf_counter()
        write(admin, k, conn)
        samples.append((time.perf_counter() - t0) * 1000)
    samples.sort()
    return {"p50_ms": samples[len(samples) // 2], "p99_ms": samples[int(len(samples) * 0.99) - 1]}


def throughput(admin: str, writers: int, seconds: float) -> float:
    done = [0] * writers
    stop_at = time.monotonic() + seconds

    def run(w: int) -> None:
        conn = http.client.HTTPConnection(admin, timeout=15)
        k = w
        while time.monotonic() < stop_at and done[w] < 1_000_000:
            write(admin, k, conn)
            done[w] += 1
            k += writers

    threads = [threading.Thread(target=run, args=(w,)) for w in range(writers)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 30)
    return sum(done) / (time.monotonic() - t0)


def measure(binary: str, round_no: int, args: argparse.Namespace) -> dict:
    c = Cluster(binary, round_no)
    try:
        leader = c.leader()
        write(leader, 0, http.client.HTTPConnection(leader, timeout=15))  # warm up connections
        out = latency(leader, args.writes)
        out["writes_per_s"] = throughput(leader, args.concurrency, args.seconds)
        return out
    finally:
        c.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="shoal binary before the change")
    ap.add_argument("--after", required=True, help="shoal binary after the change")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--writes", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=10)
    args = ap.parse_args()
    results: dict[str, list[dict]] = {"before": [], "after": []}
    for r in range(args.rounds):
        for name in ("before", "after") if r % 2 == 0 else ("after", "before"):
            res = measure(getattr(args, name), r, args)
            results[name].append(res)
            print(f"round {r + 1} {name}: {json.dumps({k: round(v, 2) for k, v in res.items()})}", flush=True)
    print(f"\n| figure (median of {args.rounds}) | before | after | after ÷ before |\n|---|---|---|---|")
    for key in ("p50_ms", "p99_ms", "writes_per_s"):
        b = statistics.median(x[key] for x in results["before"])
        a = statistics.median(x[key] for x in results["after"])
        print(f"| {key} | {b:.2f} | {a:.2f} | {a / b:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
