#!/usr/bin/env python3
"""Side-by-side benchmark of shoal against HAProxy and nginx, with a direct baseline.

One command (`python3 scenarios/bench/run.py`, `--quick` for a short smoke run) installs
what is missing (Debian packages), builds shoal in release mode, starts the shared backends,
then runs every case against direct (no proxy), HAProxy, nginx and shoal in alternation
(A B C D, A B C D, ...), each proxy started fresh per round, pinned to core 0 with one worker,
the load generators and backends on core 1. It prints medians and ratios, writes the raw
results (JSON), a chart (SVG) and a Markdown table (also printed) under target/bench/, and
finally measures shoal under a pool change per second. Everything binds 127.0.0.1 only and
every load loop is bounded in time. See README.md beside this file for the cases and rules.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import json
import math
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parents[1]
OUT_DIR = REPO / "target" / "bench"
STATE_FILE = OUT_DIR / "running.json"  # process groups of the run in progress
STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
HOST = "127.0.0.1"

# Backends shared by every target (started once per run, on the load core).
BACKEND_HTTP = (18101, 18102)  # nginx: `/` small body, `/1m` 1 MiB, `/healthz` ok
BACKEND_SINK = 18111  # loadtool serve: reads and discards
BACKEND_ECHO = 18112  # loadtool serve: echoes
BACKEND_WS = 18121  # loadtool serve: WebSocket echo (`ok` to plain requests)
# Per proxy: HTTP, L4 to the sink, L4 to the echo backend (+ admin for shoal).
PORTS = {
    "haproxy": (18201, 18202, 18203),
    "nginx": (18301, 18302, 18303),
    "shoal": (18401, 18402, 18403),
}
SHOAL_ADMIN = 18409
# The admin token shoal is started with (--token-file); every admin call sends it.
SHOAL_TOKEN = "bench-token-0123456789abcdef"

SMALL_BODY = "hello, world\n"
MIB = 1 << 20
TARGETS = ("direct", "haproxy", "nginx", "shoal")
PROXIES = ("haproxy", "nginx", "shoal")
LABELS = {"direct": "direct", "haproxy": "HAProxy", "nginx": "nginx", "shoal": "shoal"}


# --------------------------------------------------------------------------------------------
# Processes: everything started here is stopped by id in a `finally`, dies with the harness
# (PR_SET_PDEATHSIG), and what could outlive it is killed by the next run (reap_stale).
# --------------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGKILL if the harness dies without cleaning up."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def descendants(pid: int) -> list[int]:
    """Pids of every live descendant of `pid` (nginx workers, for instance)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def group_members(pgid: int, workdir: str) -> list[int]:
    """Live processes of process group `pgid` whose working directory is under `workdir`
    (every process the harness starts runs in its own group, with the work dir as cwd)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            pgrp = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[2])
            if pgrp == pgid and os.readlink(f"/proc/{entry}/cwd").startswith(workdir):
                found.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return found


def reap_stale() -> None:
    """Kills what a previous run left behind when it was SIGKILLed (nginx workers outlive their
    master, which PR_SET_PDEATHSIG took down): the groups it recorded, checked by their cwd."""
    if not STATE_FILE.exists():
        return
    try:
        state = json.loads(STATE_FILE.read_text())
        killed = []
        for pgid in state["pgids"]:
            for pid in group_members(pgid, state["workdir"]):
                log(f"killing pid {pid} left over from an interrupted run")
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        wait_until("leftover processes to exit", lambda: not any(alive(pid) for pid in killed), timeout=5)
    except (ValueError, KeyError, OSError, RuntimeError):
        pass
    STATE_FILE.unlink(missing_ok=True)


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (a zombie holds no sockets)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Procs:
    """Starts processes pinned to a core, each in its own process group with the work dir as
    cwd, logs their output, records their groups in STATE_FILE, and stops them by group."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.log_dir = workdir / "logs"
        self.running: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], cpu: int, env: dict | None = None) -> subprocess.Popen:
        log_file = open(self.log_dir / f"{name}.log", "ab")
        proc = subprocess.Popen(
            ["taskset", "-c", str(cpu), *argv],
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        log_file.close()
        self.running.append((name, proc))
        self._record()
        return proc

    def _record(self) -> None:
        STATE_FILE.parent.mkdir(parents=True, exist_ok=True)
        STATE_FILE.write_text(json.dumps({"workdir": str(self.workdir), "pgids": [p.pid for _, p in self.running]}))

    def stop(self, proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 5.0) -> None:
        """Signals the process group, waits up to `grace` s, then SIGKILLs what is left of it."""
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=grace)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                pass
        for pid in group_members(proc.pid, str(self.workdir)):
            os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=10)
        self.running = [(n, p) for n, p in self.running if p is not proc]
        self._record()

    def stop_all(self) -> None:
        for _, proc in reversed(list(self.running)):
            self.stop(proc, grace=3.0)
        STATE_FILE.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Measurements from /proc
# --------------------------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def tree_rss_kib(pid: int) -> int:
    """VmRSS summed over the process and its descendants (nginx master + worker)."""
    total = 0
    for p in [pid, *descendants(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process and its descendants."""
    total = 0
    for p in [pid, *descendants(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except OSError:
            pass
    return total / CLK_TCK


def core_times() -> dict[int, tuple[int, int]]:
    """Per core (busy, total) jiffies from /proc/stat."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3].isdigit():
            name, *vals = line.split()
            v = [int(x) for x in vals]
            idle = v[3] + v[4]
            out[int(name[3:])] = (sum(v[:8]) - idle, sum(v[:8]))
    return out


class CpuWatch:
    """CPU used by a target process and busy share of each core over an interval."""

    def __init__(self, pid: int | None):
        self.pid = pid
        self.t0 = time.monotonic()
        self.proc0 = tree_cpu_seconds(pid) if pid else 0.0
        self.cores0 = core_times()

    def result(self) -> dict:
        wall = time.monotonic() - self.t0
        cores1 = core_times()
        busy = {}
        for core, (b1, t1) in cores1.items():
            b0, t0 = self.cores0.get(core, (b1, t1))
            busy[str(core)] = round(100.0 * (b1 - b0) / max(1, t1 - t0), 1)
        out = {"core_busy_pct": busy}
        if self.pid:
            used = tree_cpu_seconds(self.pid) - self.proc0
            out["proxy_cpu_s"] = round(used, 3)
            out["proxy_cpu_pct"] = round(100.0 * used / wall, 1)
        return out


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


def admin(method: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://{HOST}:{SHOAL_ADMIN}{path}", data=data, method=method)
    req.add_header("Content-Type", "application/json")
    req.add_header("Authorization", f"Bearer {SHOAL_TOKEN}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"shoal admin {method} {path}: {e.code} {e.read().decode(errors='replace')}") from e


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
            return True
        except OSError:
            return False


def tcp_echo_ok(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1) as s:
            s.sendall(b"ping")
            return s.recv(16) == b"ping"
    except OSError:
        return False


def wait_until(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (OSError, urllib.error.URLError, RuntimeError, ValueError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


def last_json_line(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no JSON result in output:\n{text[-2000:]}")


# --------------------------------------------------------------------------------------------
# Targets: direct and the three proxies, each with the same four endpoints
# --------------------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    http: int  # port serving `/` and `/1m`
    sink: int  # L4 port ending at the sink backend
    echo: int  # L4 port ending at the echo backend
    ws: int  # port serving the WebSocket echo at `/ws`
    proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None


def haproxy_config(p: tuple[int, int, int], maxconn: int) -> str:
    http, sink, echo = p
    b1, b2 = BACKEND_HTTP
    # HAProxy reserves two descriptors per connection; `no strict-limits` lets it start when the
    # open-file limit cannot be raised that far (idle client connections need only one).
    return f"""# generated by scenarios/bench/run.py
global
    nbthread 1
    maxconn {maxconn}
    no strict-limits

defaults
    mode http
    maxconn {maxconn}
    timeout connect 3s
    timeout client 120s
    timeout server 120s
    timeout http-keep-alive 120s
    timeout tunnel 1h

frontend http
    bind {HOST}:{http}
    option forwardfor
    http-request set-header X-Forwarded-Proto http
    use_backend ws if {{ path /ws }}
    default_backend web

backend web
    balance roundrobin
    http-reuse always
    option httpchk GET /healthz
    server b1 {HOST}:{b1} check inter 1s
    server b2 {HOST}:{b2} check inter 1s

backend ws
    option httpchk GET /healthz
    server w1 {HOST}:{BACKEND_WS} check inter 1s

frontend l4sink
    mode tcp
    bind {HOST}:{sink}
    default_backend sink

backend sink
    mode tcp
    server s1 {HOST}:{BACKEND_SINK} check inter 1s

frontend l4echo
    mode tcp
    bind {HOST}:{echo}
    default_backend echo

backend echo
    mode tcp
    server e1 {HOST}:{BACKEND_ECHO} check inter 1s
"""


def nginx_worker_connections() -> int:
    return min(30000, open_file_limit() - 100)


def nginx_common(workdir: Path) -> str:
    fds = open_file_limit()
    return f"""# generated by scenarios/bench/run.py
load_module {STREAM_MODULE};
daemon off;
master_process on;
user root;
worker_processes 1;
worker_rlimit_nofile {fds};
pid {workdir}/nginx.pid;
error_log stderr warn;
events {{ worker_connections {nginx_worker_connections()}; }}
"""


def nginx_temp_paths(workdir: Path) -> str:
    return "\n".join(
        f"    {kind}_temp_path {workdir}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )


def nginx_proxy_config(workdir: Path, p: tuple[int, int, int]) -> str:
    http, sink, echo = p
    b1, b2 = BACKEND_HTTP
    return nginx_common(workdir) + f"""
http {{
    access_log off;
{nginx_temp_paths(workdir)}
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    upstream web {{
        server {HOST}:{b1};
        server {HOST}:{b2};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    upstream ws {{ server {HOST}:{BACKEND_WS}; }}
    server {{
        listen {HOST}:{http} backlog=4096;
        location / {{
            proxy_pass http://web;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_max_temp_file_size 0;
        }}
        location = /ws {{
            proxy_pass http://ws;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
        }}
    }}
}}

stream {{
    upstream sink {{ server {HOST}:{BACKEND_SINK}; }}
    upstream echo {{ server {HOST}:{BACKEND_ECHO}; }}
    server {{ listen {HOST}:{sink} backlog=4096; proxy_pass sink; }}
    server {{ listen {HOST}:{echo} backlog=4096; proxy_pass echo; }}
}}
"""


def nginx_backend_config(workdir: Path, www: Path) -> str:
    listens = "\n".join(f"        listen {HOST}:{port} backlog=4096;" for port in BACKEND_HTTP)
    return nginx_common(workdir) + f"""
http {{
    access_log off;
{nginx_temp_paths(workdir)}
    default_type text/plain;
    sendfile on;
    tcp_nopush on;
    open_file_cache max=64;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    server {{
{listens}
        location = /healthz {{ return 200 "ok\\n"; }}
        location = /1m {{ root {www}; }}
        location / {{ return 200 "{SMALL_BODY.strip()}\\n"; }}
    }}
}}
"""


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------


@dataclass
class Metric:
    key: str
    label: str
    unit: str  # "rps", "GB/s", "us", "MiB"
    higher_is_better: bool


@dataclass
class Case:
    key: str
    title: str  # for the Markdown table
    short: str  # for the chart's panel titles
    metrics: list[Metric]
    run: Callable[["Bench", Target], dict]
    proxies_only: bool = False
    # Start the target anew before this case: memory an earlier case freed (10 000 idle
    # connections) would otherwise be reused and hide what this case's connections cost.
    fresh: bool = False
    # The result key counting the operations completed, when proxy CPU per operation is reported
    # (metric `cpu_us_per_op`, from the proxy's user + system time over the case).
    count_key: str | None = None


@dataclass
class Settings:
    rounds: int
    seconds: int
    idle_conns: int
    ws_idle_conns: int
    reconfig_pairs: int
    reconfig_seconds: int
    proxy_cpu: int
    load_cpu: int


@dataclass
class Bench:
    settings: Settings
    workdir: Path
    procs: Procs
    shoal_bin: Path
    loadtool: Path
    results: list[dict] = field(default_factory=list)

    # ----- load generators -----

    def wrk(self, port: int, path: str, conns: int, seconds: int, close: bool = False) -> dict:
        cmd = ["taskset", "-c", str(self.settings.load_cpu), "wrk", "-t1", f"-c{conns}", f"-d{seconds}s",
               "--timeout", "5s", "-s", str(BENCH_DIR / "report.lua")]
        if close:
            cmd += ["-H", "Connection: close"]
        cmd.append(f"http://{HOST}:{port}{path}")
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60,
                             preexec_fn=_die_with_parent)
        r = last_json_line(out.stdout)
        secs = r["duration_us"] / 1e6
        errors = r["errors_connect"] + r["errors_read"] + r["errors_write"] + r["errors_status"] + r["errors_timeout"]
        return {
            "rps": r["requests"] / secs,
            "gbytes_per_s": r["bytes"] / secs / 1e9,
            "p50_us": r["p50_us"],
            "p99_us": r["p99_us"],
            "requests": r["requests"],
            "errors": errors,
            "wrk": r,
        }

    def tool(self, *argv: str, timeout: float = 120) -> dict:
        cmd = ["taskset", "-c", str(self.settings.load_cpu), str(self.loadtool), *argv]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, preexec_fn=_die_with_parent)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:2])} failed: {out.stderr.strip()}")
        return last_json_line(out.stdout)

    # ----- cases -----

    def case_http_close(self, t: Target) -> dict:
        return self.wrk(t.http, "/", 50, self.settings.seconds, close=True)

    def case_http_1mib(self, t: Target) -> dict:
        return self.wrk(t.http, "/1m", 16, self.settings.seconds)

    def case_tcp_bulk(self, t: Target) -> dict:
        r = self.tool("bulk", f"{HOST}:{t.sink}", str(self.settings.seconds), "4")
        return {"gbytes_per_s": r["gbytes_per_s"], "errors": r["errors"], "raw": r}

    def case_tcp_connrate(self, t: Target) -> dict:
        r = self.tool("connrate", f"{HOST}:{t.echo}", str(self.settings.seconds), "50")
        return {"cps": r["per_s"], "p50_us": r["p50_us"], "p99_us": r["p99_us"], "errors": r["errors"],
                "connections": r["connections"], "raw": r}

    def case_ws_echo(self, t: Target) -> dict:
        r = self.tool("ws", f"{HOST}:{t.ws}", "/ws", str(self.settings.seconds), "50", "64")
        return {"mps": r["per_s"], "p50_us": r["p50_us"], "p99_us": r["p99_us"], "errors": r["errors"],
                "messages": r["messages"], "raw": r}

    def hold(self, pid: int, argv: list[str], idle_s: float) -> dict:
        """Runs a loadtool mode that opens connections and holds them until told (`idle`,
        `wsidle`), reading the proxy's RSS before, once they are open and after `idle_s` more."""
        time.sleep(0.3)
        rss = {"before": tree_rss_kib(pid)}
        cmd = ["taskset", "-c", str(self.settings.load_cpu), str(self.loadtool), *argv]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                preexec_fn=_die_with_parent)
        try:
            opened = json.loads(proc.stdout.readline() or "null")
            if opened is None:
                raise RuntimeError(f"loadtool {argv[0]} printed nothing (exit {proc.wait(timeout=10)})")
            time.sleep(0.5)
            rss["open"] = tree_rss_kib(pid)
            time.sleep(idle_s)
            rss["after"] = tree_rss_kib(pid)
            proc.stdin.write("done\n")
            proc.stdin.flush()
            held = json.loads(proc.stdout.readline())
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return {"opened": opened, "held": held, "rss": rss}

    def case_idle_memory(self, t: Target) -> dict:
        """Opens N keep-alive connections (one request each) and reads the proxy's RSS delta."""
        assert t.pid is not None
        h = self.hold(t.pid, ["idle", f"{HOST}:{t.http}", "/", str(self.settings.idle_conns), "60"], 0.0)
        opened, held, rss = h["opened"], h["held"], h["rss"]
        open_n = max(1, opened["open"])
        delta = rss["after"] - rss["before"]
        return {
            "mib_per_10k": delta / 1024 * 10_000 / open_n,
            "kib_per_conn": delta / open_n,
            "rss_before_kib": rss["before"],
            "rss_after_kib": rss["after"],
            "open": opened["open"],
            "still_open": held["still_open"],
            "errors": opened["errors"] + (opened["open"] - held["still_open"]),
        }

    def case_ws_idle(self, t: Target) -> dict:
        """Opens N WebSockets (upgrade + one echoed message each), lets them sit idle, and reads
        the proxy's RSS delta; then a sample of them must still echo."""
        assert t.pid is not None
        self.tool("ws", f"{HOST}:{t.ws}", "/ws", "1", "50", "64")  # the WebSocket path's pools, in the baseline
        n = self.settings.ws_idle_conns
        sample = min(n, 100)
        h = self.hold(t.pid, ["wsidle", f"{HOST}:{t.ws}", "/ws", str(n), "120", str(sample)],
                      float(self.settings.seconds))
        opened, held, rss = h["opened"], h["held"], h["rss"]
        open_n = max(1, opened["open"])
        delta = rss["after"] - rss["before"]
        return {
            "kib_per_conn": delta / open_n,
            "kib_per_conn_at_open": (rss["open"] - rss["before"]) / open_n,
            "rss_before_kib": rss["before"],
            "rss_open_kib": rss["open"],
            "rss_after_kib": rss["after"],
            "open": opened["open"],
            "setup_seconds": opened["setup_seconds"],
            "still_open": held["still_open"],
            "sampled": held["sampled"],
            "echo_ok": held["echo_ok"],
            # a connection the proxy closed fails both checks: count it once
            "errors": opened["errors"] + max(opened["open"] - held["still_open"], held["sampled"] - held["echo_ok"]),
        }

    # ----- backends -----

    def start_backends(self) -> None:
        cpu = self.settings.load_cpu
        www = self.workdir / "www"
        www.mkdir()
        (www / "1m").write_bytes(b"x" * MIB)
        nb = self.workdir / "nginx-backend"
        nb.mkdir()
        (nb / "nginx.conf").write_text(nginx_backend_config(nb, www))
        self.procs.start("nginx-backend", ["nginx", "-e", "stderr", "-p", str(nb), "-c", str(nb / "nginx.conf")], cpu)
        self.procs.start("loadtool-backends", [str(self.loadtool), "serve", f"{HOST}:{BACKEND_SINK}",
                                               f"{HOST}:{BACKEND_ECHO}", f"{HOST}:{BACKEND_WS}", "3600"], cpu)
        for port in BACKEND_HTTP:
            wait_until(f"nginx backend on :{port}",
                       lambda p=port: http_get(f"http://{HOST}:{p}/")[1] == SMALL_BODY.encode())
        wait_until("1 MiB endpoint", lambda: len(http_get(f"http://{HOST}:{BACKEND_HTTP[0]}/1m")[1]) == MIB)
        wait_until("TCP echo backend", lambda: tcp_echo_ok(BACKEND_ECHO))
        wait_until("WebSocket backend", lambda: http_get(f"http://{HOST}:{BACKEND_WS}/healthz")[1].strip() == b"ok")

    # ----- proxies -----

    def start_target(self, name: str, round_no: int, tag: str = "") -> Target:
        if name == "direct":
            return Target("direct", BACKEND_HTTP[0], BACKEND_SINK, BACKEND_ECHO, BACKEND_WS)
        ports = PORTS[name]
        t = Target(name, *ports, ws=ports[0])
        d = self.workdir / f"{name}-r{round_no}{tag}"
        d.mkdir()
        cpu = self.settings.proxy_cpu
        if name == "haproxy":
            held = max(self.settings.idle_conns, self.settings.ws_idle_conns)
            (d / "haproxy.cfg").write_text(haproxy_config(ports, held + 2000))
            t.proc = self.procs.start(name, ["haproxy", "-db", "-f", str(d / "haproxy.cfg")], cpu)
        elif name == "nginx":
            (d / "nginx.conf").write_text(nginx_proxy_config(d, ports))
            t.proc = self.procs.start(name, ["nginx", "-e", "stderr", "-p", str(d), "-c", str(d / "nginx.conf")], cpu)
        else:
            t.proc = self.procs.start(
                name,
                [str(self.shoal_bin), "node", "--id", "bench", "--admin", f"{HOST}:{SHOAL_ADMIN}",
                 "--data-dir", str(d / "data"), "--listen-ip", HOST, "--http-port", str(ports[0]),
                 "--threads", "1", "--drain-timeout", "1", "--public-metrics",
                 "--token-file", str(self.token_file(d))],
                cpu,
                env={"RUST_LOG": "warn"},
            )
            self.configure_shoal(ports)
        wait_until(f"{name} HTTP", lambda: http_get(f"http://{HOST}:{t.http}/") == (200, SMALL_BODY.encode()))
        wait_until(f"{name} L4 echo", lambda: tcp_echo_ok(t.echo))
        if t.proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {t.proc.returncode}; see {self.procs.log_dir}/{name}.log")
        return t

    @staticmethod
    def token_file(d: Path) -> Path:
        path = d / "admin.token"
        path.write_text(SHOAL_TOKEN + "\n")
        path.chmod(0o600)  # shoal refuses a token file others may read
        return path

    def configure_shoal(self, ports: tuple[int, int, int]) -> None:
        wait_until("shoal admin API", lambda: http_get(f"http://{HOST}:{SHOAL_ADMIN}/readyz")[0] == 200)
        health = {"interval_ms": 1000}
        admin("PUT", "/v1/pools/web", {"pattern": "/", "health": health})
        admin("PUT", "/v1/pools/ws", {"pattern": "/ws", "health": health})
        admin("PUT", "/v1/pools/l4sink", {"protocol": "tcp", "listen": ports[1], "health": {"check": "tcp", **health}})
        admin("PUT", "/v1/pools/l4echo", {"protocol": "tcp", "listen": ports[2], "health": {"check": "tcp", **health}})
        for port in BACKEND_HTTP:
            admin("PUT", f"/v1/pools/web/backends/{HOST}:{port}", {})
        admin("PUT", f"/v1/pools/ws/backends/{HOST}:{BACKEND_WS}", {})
        admin("PUT", f"/v1/pools/l4sink/backends/{HOST}:{BACKEND_SINK}", {})
        admin("PUT", f"/v1/pools/l4echo/backends/{HOST}:{BACKEND_ECHO}", {})
        for pool in ("web", "ws", "l4sink", "l4echo"):
            wait_until(f"shoal pool {pool} PS_FULL",
                       lambda p=pool: admin("GET", f"/v1/pools/{p}/health")["status"] == "PS_FULL")

    def stop_target(self, t: Target) -> None:
        if t.proc:
            # nginx: SIGQUIT would wait for the idle keep-alive connections; SIGTERM is fast.
            self.procs.stop(t.proc, signal.SIGTERM)

    # ----- rounds -----

    def run_rounds(self, cases: list[Case], targets: list[str]) -> None:
        for round_no in range(1, self.settings.rounds + 1):
            for name in targets:
                self.run_target(name, round_no, [c for c in cases if not (c.proxies_only and name == "direct")])

    def run_target(self, name: str, round_no: int, cases: list[Case]) -> None:
        """Runs the cases against one fresh target, restarting it before a `fresh` case."""
        t = self.start_target(name, round_no)
        try:
            self.wrk(t.http, "/", 50, 1)  # warm-up: keep-alive pools, caches
            for i, case in enumerate(cases):
                if case.fresh and i > 0 and t.proc:
                    self.stop_target(t)
                    t = self.start_target(name, round_no, f"-{case.key}")
                    self.wrk(t.http, "/", 50, 1)
                self.measure(case, t, round_no)
                time.sleep(0.2)
        finally:
            self.stop_target(t)

    def measure(self, case: Case, t: Target, round_no: int) -> None:
        watch = CpuWatch(t.pid)
        metrics = case.run(self, t)
        usage = watch.result()
        raw = {k: v for k, v in metrics.items() if k in ("wrk", "raw")}
        values = {k: v for k, v in metrics.items() if k not in ("wrk", "raw")}
        if case.count_key and "proxy_cpu_s" in usage and values.get(case.count_key):
            values["cpu_us_per_op"] = usage["proxy_cpu_s"] * 1e6 / values[case.count_key]
        self.results.append({"round": round_no, "target": t.name, "case": case.key,
                             "metrics": values, **usage, "raw": raw})
        log(f"round {round_no} {t.name:8s} {case.key:14s} {summarize(case, values)}  {cpu_note(usage)}")

    def run_reconfig(self) -> dict:
        """wrk c=50 against shoal, alternately without and with one pool change per second."""
        s = self.settings
        t = self.start_target("shoal", 0)
        try:
            self.wrk(t.http, "/", 50, 1)
            runs: dict[str, list[dict]] = {"steady": [], "changing": []}
            changes: list[dict] = []
            for _ in range(s.reconfig_pairs):
                runs["steady"].append(self.wrk(t.http, "/", 50, s.reconfig_seconds))
                time.sleep(0.2)
                stop = threading.Event()
                changer = threading.Thread(target=change_weights,
                                           args=(s.reconfig_seconds, stop, changes), daemon=True)
                changer.start()
                try:
                    runs["changing"].append(self.wrk(t.http, "/", 50, s.reconfig_seconds))
                finally:
                    stop.set()
                    changer.join(timeout=15)
                time.sleep(0.2)
        finally:
            self.stop_target(t)
        steady = statistics.median(r["rps"] for r in runs["steady"])
        changing = statistics.median(r["rps"] for r in runs["changing"])
        ok = [c for c in changes if c["ok"]]
        result = {
            "steady_rps": steady,
            "changing_rps": changing,
            "throughput_change_pct": 100.0 * (changing - steady) / steady,
            "failed_requests_steady": sum(r["errors"] for r in runs["steady"]),
            "failed_requests_changing": sum(r["errors"] for r in runs["changing"]),
            "changes_applied": len(ok),
            "changes_attempted": len(changes),
            "change_latency_ms_median": statistics.median(c["ms"] for c in ok) if ok else None,
            "runs": {k: [{x: r[x] for x in ("rps", "p50_us", "p99_us", "errors", "requests")} for r in v]
                     for k, v in runs.items()},
            "changes": changes,
        }
        log(f"reconfig: steady {steady:,.0f} req/s, with a change per second {changing:,.0f} req/s "
            f"({result['throughput_change_pct']:+.1f} %), failed requests {result['failed_requests_changing']}, "
            f"changes applied {len(ok)}/{len(changes)}")
        return result


def change_weights(seconds: int, stop: threading.Event, out: list[dict]) -> None:
    """One backend weight change per second (alternating 2 and 1), `seconds` changes at most."""
    start = time.monotonic()
    for k in range(seconds):
        if stop.wait(max(0.0, start + 0.5 + k - time.monotonic())):
            return
        weight = 2 if k % 2 == 0 else 1
        t0 = time.monotonic()
        try:
            admin("PUT", f"/v1/pools/web/backends/{HOST}:{BACKEND_HTTP[0]}", {"weight": weight})
            out.append({"weight": weight, "ok": True, "ms": (time.monotonic() - t0) * 1000})
        except (RuntimeError, OSError, urllib.error.URLError) as e:
            out.append({"weight": weight, "ok": False, "error": str(e), "ms": (time.monotonic() - t0) * 1000})


# --------------------------------------------------------------------------------------------
# The cases, in the order they run for each target
# --------------------------------------------------------------------------------------------

RPS = "rps"
LAT_P50 = Metric("p50_us", "p50 latency", "us", False)
LAT_P99 = Metric("p99_us", "p99 latency", "us", False)


def cpu_per(what: str) -> Metric:
    return Metric("cpu_us_per_op", f"proxy CPU per {what}", "us", False)


def build_cases() -> list[Case]:
    per_req = cpu_per("request")
    return [
        Case("http_c50", "HTTP keep-alive, small body, c=50", "HTTP keep-alive c=50",
             [Metric("rps", "requests/s", RPS, True), LAT_P50, LAT_P99, per_req],
             lambda b, t: b.wrk(t.http, "/", 50, b.settings.seconds), count_key="requests"),
        Case("http_c200", "HTTP keep-alive, small body, c=200", "HTTP keep-alive c=200",
             [Metric("rps", "requests/s", RPS, True), LAT_P50, LAT_P99, per_req],
             lambda b, t: b.wrk(t.http, "/", 200, b.settings.seconds), count_key="requests"),
        Case("http_close", "HTTP new connection per request, c=50", "HTTP conn per request c=50",
             [Metric("rps", "requests/s", RPS, True), LAT_P50, LAT_P99, per_req], Bench.case_http_close,
             count_key="requests"),
        Case("http_1mib", "HTTP 1 MiB responses, c=16", "HTTP 1 MiB responses c=16",
             [Metric("gbytes_per_s", "GB/s", "GB/s", True), LAT_P99, per_req], Bench.case_http_1mib,
             count_key="requests"),
        Case("tcp_bulk", "L4 TCP bulk upload, 4 connections", "L4 TCP bulk upload",
             [Metric("gbytes_per_s", "GB/s", "GB/s", True)], Bench.case_tcp_bulk),
        Case("tcp_connrate", "L4 connection rate (connect, 16 B echo, close), c=50", "L4 connection rate c=50",
             [Metric("cps", "connections/s", RPS, True), LAT_P50, LAT_P99, cpu_per("connection")],
             Bench.case_tcp_connrate, count_key="connections"),
        Case("ws_echo", "WebSocket echo, 64 B messages, 50 connections", "WebSocket echo 64 B, 50 conns",
             [Metric("mps", "messages/s", RPS, True), LAT_P50, LAT_P99, cpu_per("message")], Bench.case_ws_echo,
             count_key="messages"),
        Case("idle_memory", "Idle keep-alive connections (RSS delta)", "Idle keep-alive connections",
             [Metric("mib_per_10k", "MiB per 10k connections", "MiB", False)], Bench.case_idle_memory,
             proxies_only=True),
        Case("ws_idle", "Idle upgraded WebSocket connections (RSS delta)", "Idle WebSocket connections",
             [Metric("kib_per_conn", "KiB per connection", "KiB", False)], Bench.case_ws_idle,
             proxies_only=True, fresh=True),
    ]


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def fmt(value: float | None, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if unit == "rps":
        return f"{value / 1000:.1f}k" if value >= 1000 else f"{value:.0f}"
    if unit == "GB/s":
        return f"{value:.2f} GB/s"
    if unit == "us":
        if value >= 1000:
            return f"{value / 1000:.2f} ms"
        return f"{value:.1f} µs" if value < 100 else f"{value:.0f} µs"
    if unit == "MiB":
        return f"{value:.1f} MiB"
    if unit == "KiB":
        return f"{value:.2f} KiB"
    return f"{value:.3g}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.2f}"


def summarize(case: Case, values: dict) -> str:
    parts = [f"{m.label}={fmt(values.get(m.key), m.unit)}" for m in case.metrics]
    if values.get("errors"):
        parts.append(f"errors={values['errors']}")
    return " ".join(parts)


def cpu_note(usage: dict) -> str:
    cores = usage["core_busy_pct"]
    note = "cores " + "/".join(f"{cores[c]:.0f}%" for c in sorted(cores))
    if "proxy_cpu_pct" in usage:
        note = f"proxy cpu {usage['proxy_cpu_pct']:.0f}%, " + note
    return f"({note})"


def medians(results: list[dict], cases: list[Case]) -> dict:
    """{case: {metric: {target: {"median", "min", "max", "n"}}}} plus CPU medians."""
    out: dict = {}
    for case in cases:
        per_case: dict = {}
        for metric in [*case.metrics, Metric("errors", "errors", "", False)]:
            per_target = {}
            for target in TARGETS:
                vals = [r["metrics"][metric.key] for r in results
                        if r["case"] == case.key and r["target"] == target and metric.key in r["metrics"]]
                if vals:
                    per_target[target] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
                                          "n": len(vals)}
            per_case[metric.key] = per_target
        cpu = {}
        for target in PROXIES:
            vals = [r["proxy_cpu_pct"] for r in results
                    if r["case"] == case.key and r["target"] == target and "proxy_cpu_pct" in r]
            if vals:
                cpu[target] = statistics.median(vals)
        per_case["proxy_cpu_pct"] = cpu
        out[case.key] = per_case
    return out


def round_ratios(results: list[dict], case: str, metric: str, a: str, b: str) -> list[float]:
    """`a ÷ b` for each round in which both targets measured the metric (rounds alternate the
    targets, so a round's pair ran under the same conditions)."""
    by_round: dict[int, dict[str, float]] = {}
    for r in results:
        if r["case"] == case and r["target"] in (a, b) and metric in r["metrics"]:
            by_round.setdefault(r["round"], {})[r["target"]] = r["metrics"][metric]
    return [v[a] / v[b] for v in by_round.values() if a in v and b in v and v[b]]


def ratio_spread(results: list[dict], case: str, metric: str, a: str, b: str) -> str:
    """Median of the per-round ratios, with their min–max when there is more than one round."""
    vals = round_ratios(results, case, metric, a, b)
    if not vals:
        return "–"
    mid = f"{statistics.median(vals):.2f}"
    return mid if len(vals) == 1 else f"{mid} ({min(vals):.2f}–{max(vals):.2f})"


def med(m: dict, case: str, metric: str, target: str) -> float | None:
    entry = m.get(case, {}).get(metric, {}).get(target)
    return entry["median"] if entry else None


def reconfig_verdict(r: dict) -> str:
    """The issue's goal: a pool change per second costs no failed requests and < 5 % throughput."""
    met = r["failed_requests_changing"] == 0 and r["throughput_change_pct"] > -5.0
    return "goal met" if met else "goal NOT met"


def error_notes(results: list[dict]) -> list[str]:
    return [f"{r['target']} {r['case']} round {r['round']}: {r['metrics']['errors']} errors"
            for r in results if r["metrics"].get("errors")]


def markdown(meta: dict, cases: list[Case], m: dict, reconfig: dict | None, results: list[dict]) -> str:
    lines = [
        f"Benchmark of {meta['date']} on {meta['machine']['nproc']} × {meta['machine']['cpu']} "
        f"({meta['machine']['kernel']}): shoal {meta['versions']['shoal']}, {meta['versions']['haproxy']}, "
        f"{meta['versions']['nginx']}, {meta['versions']['wrk']}. Medians of {meta['settings']['rounds']} "
        f"alternating rounds of {meta['settings']['seconds']} s per case; each proxy on one pinned core with "
        f"one worker, load generator and backends on the other core. Ratios: for throughput higher is "
        f"better, for latency, CPU per operation and memory lower is better. shoal ÷ HAProxy and "
        f"shoal ÷ nginx are the medians of the per-round ratios, with their min–max in brackets; the "
        f"other ratios divide the medians.",
        "",
        "| case | metric | direct | HAProxy | nginx | shoal | shoal ÷ HAProxy | shoal ÷ nginx "
        "| nginx ÷ HAProxy | HAProxy ÷ direct | nginx ÷ direct | shoal ÷ direct |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for case in cases:
        for metric in case.metrics:
            v = {t: med(m, case.key, metric.key, t) for t in TARGETS}
            lines.append(
                f"| {case.title} | {metric.label} | "
                + " | ".join(fmt(v[t], metric.unit) for t in TARGETS)
                + f" | {ratio_spread(results, case.key, metric.key, 'shoal', 'haproxy')}"
                + f" | {ratio_spread(results, case.key, metric.key, 'shoal', 'nginx')}"
                + f" | {ratio(v['nginx'], v['haproxy'])}"
                + f" | {ratio(v['haproxy'], v['direct'])} | {ratio(v['nginx'], v['direct'])}"
                + f" | {ratio(v['shoal'], v['direct'])} |"
            )
    lines += ["", "Proxy CPU use during each case (median, % of its one core):", "",
              "| case | HAProxy | nginx | shoal |", "|---|--:|--:|--:|"]
    for case in cases:
        cpu = m[case.key]["proxy_cpu_pct"]
        lines.append(f"| {case.title} | " + " | ".join(
            f"{cpu[t]:.0f} %" if t in cpu else "–" for t in PROXIES) + " |")
    if reconfig:
        lines += [
            "",
            "Reconfiguration under load (shoal, wrk c=50; one backend weight change per second through the "
            "admin API):",
            "",
            "| steady req/s | req/s with a change per second | change | failed requests (steady / changing) "
            "| changes applied | median change latency | no failures, < 5 % loss |",
            "|--:|--:|--:|--:|--:|--:|---|",
            f"| {fmt(reconfig['steady_rps'], 'rps')} | {fmt(reconfig['changing_rps'], 'rps')} "
            f"| {reconfig['throughput_change_pct']:+.1f} % "
            f"| {reconfig['failed_requests_steady']} / {reconfig['failed_requests_changing']} "
            f"| {reconfig['changes_applied']}/{reconfig['changes_attempted']} "
            f"| {reconfig['change_latency_ms_median'] or 0:.1f} ms | {reconfig_verdict(reconfig)} |",
        ]
    notes = error_notes(results)
    lines += ["", "Failed requests or connections: " + ("; ".join(notes) if notes else "none") + "."]
    return "\n".join(lines) + "\n"


COLORS = {"direct": "#9e9e9e", "haproxy": "#1f77b4", "nginx": "#2ca02c", "shoal": "#ff7f0e"}


def esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def svg_chart(meta: dict, cases: list[Case], m: dict, reconfig: dict | None) -> str:
    """One small bar chart per (case, metric): medians as bars, min–max of the rounds as whiskers."""
    panels = [(c, mt) for c in cases for mt in c.metrics]
    cols, pw, ph = 4, 300, 210
    rows = math.ceil(len(panels) / cols)
    width, top = cols * pw + 20, 70
    height = top + rows * ph + (40 if reconfig else 20)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="10" y="22" font-size="16" font-weight="bold">shoal vs HAProxy vs nginx vs direct — '
           f'{esc(meta["date"])}</text>',
           f'<text x="10" y="40">{esc(meta["machine"]["nproc"])} × {esc(meta["machine"]["cpu"])}; '
           f'medians of {meta["settings"]["rounds"]} rounds (whiskers: min–max); proxies pinned to one core, '
           f'one worker</text>']
    for i, t in enumerate(TARGETS):
        x = 10 + i * 110
        out.append(f'<rect x="{x}" y="50" width="12" height="12" fill="{COLORS[t]}"/>'
                   f'<text x="{x + 16}" y="60">{LABELS[t]}</text>')
    for idx, (case, metric) in enumerate(panels):
        px = 10 + (idx % cols) * pw
        py = top + (idx // cols) * ph
        entries = m[case.key][metric.key]
        better = "higher" if metric.higher_is_better else "lower"
        out.append(f'<rect x="{px}" y="{py}" width="{pw - 10}" height="{ph - 10}" fill="#fafafa" stroke="#ddd"/>')
        out.append(f'<text x="{px + 6}" y="{py + 15}" font-weight="bold">{esc(case.short)}</text>')
        out.append(f'<text x="{px + 6}" y="{py + 29}" fill="#555">{esc(metric.label)} ({better} is better)</text>')
        top_val = max((e["max"] for e in entries.values()), default=0) or 1
        base_y, plot_h, bar_w = py + ph - 30, ph - 80, 50
        out.append(f'<line x1="{px + 10}" y1="{base_y}" x2="{px + pw - 20}" y2="{base_y}" stroke="#999"/>')
        for j, target in enumerate(TARGETS):
            bx = px + 20 + j * (bar_w + 18)
            out.append(f'<text x="{bx + bar_w / 2}" y="{base_y + 13}" text-anchor="middle">{LABELS[target]}</text>')
            e = entries.get(target)
            if not e:
                out.append(f'<text x="{bx + bar_w / 2}" y="{base_y - 4}" text-anchor="middle" fill="#999">n/a</text>')
                continue
            h = plot_h * e["median"] / top_val
            out.append(f'<rect x="{bx}" y="{base_y - h:.1f}" width="{bar_w}" height="{h:.1f}" '
                       f'fill="{COLORS[target]}"/>')
            lo, hi = (base_y - plot_h * e[k] / top_val for k in ("min", "max"))
            cx = bx + bar_w / 2
            out.append(f'<path d="M{cx},{lo:.1f}V{hi:.1f}M{cx - 5},{lo:.1f}H{cx + 5}M{cx - 5},{hi:.1f}H{cx + 5}" '
                       f'stroke="#333" fill="none"/>')
            label = esc(fmt(e["median"], metric.unit))
            out.append(f'<text x="{cx}" y="{hi - 4:.1f}" text-anchor="middle">{label}</text>')
    if reconfig:
        out.append(f'<text x="10" y="{height - 15}">Reconfiguration under load (shoal, c=50, one pool change '
                   f'per second): {fmt(reconfig["steady_rps"], "rps")} → {fmt(reconfig["changing_rps"], "rps")} '
                   f'req/s ({reconfig["throughput_change_pct"]:+.1f} %), '
                   f'{reconfig["failed_requests_changing"]} failed requests: {reconfig_verdict(reconfig)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def print_console_table(cases: list[Case], m: dict, results: list[dict]) -> None:
    print()
    header = (f"{'case / metric':46s} " + " ".join(f"{LABELS[t]:>10s}" for t in TARGETS)
              + f"  {'shoal÷HAProxy':>17s}  {'shoal÷nginx':>17s}")
    print(header)
    print("-" * len(header))
    for case in cases:
        for metric in case.metrics:
            v = {t: med(m, case.key, metric.key, t) for t in TARGETS}
            name = f"{case.key} {metric.label}"
            print(f"{name:46s} " + " ".join(f"{fmt(v[t], metric.unit):>10s}" for t in TARGETS)
                  + f"  {ratio_spread(results, case.key, metric.key, 'shoal', 'haproxy'):>17s}"
                  + f"  {ratio_spread(results, case.key, metric.key, 'shoal', 'nginx'):>17s}")
    print()


# --------------------------------------------------------------------------------------------
# Setup: packages, build, limits
# --------------------------------------------------------------------------------------------


def ensure_packages(no_install: bool) -> None:
    wanted = {"haproxy": "haproxy", "nginx": "nginx", "wrk": "wrk", "gcc": "gcc", "taskset": "util-linux"}
    missing = [pkg for binary, pkg in wanted.items() if not shutil.which(binary)]
    if not STREAM_MODULE.exists():
        missing.append("libnginx-mod-stream")
    if not missing:
        return
    if no_install:
        sys.exit(f"missing packages: {' '.join(missing)} (run without --no-install to apt-get them)")
    log(f"installing {' '.join(missing)} (apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], check=True, env=env,
                   timeout=900)


def build_loadtool() -> Path:
    src = BENCH_DIR / "loadtool.c"
    out = OUT_DIR / "bin" / "loadtool"
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        out.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-o", str(out), str(src)], check=True)
    return out


def build_shoal(given: str | None) -> Path:
    if given:
        path = Path(given).resolve()
        if not os.access(path, os.X_OK):
            sys.exit(f"--shoal-bin {given}: not an executable")
        return path
    log("cargo build --release -p shoal-node")
    subprocess.run(["cargo", "build", "--release", "-p", "shoal-node"], cwd=REPO, check=True)
    return REPO / "target" / "release" / "shoal"


def open_file_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, max(hard, need)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        log(f"note: the open-file limit is {hard} (could not raise it to {need})")


def fit_ws_idle(wanted: int) -> int:
    """A proxy holds two descriptors per WebSocket (client and backend side), and nginx counts
    both in `worker_connections`, of which it starts refusing new ones with about 1/16 still free
    (measured: 9 329 WebSockets of 19 900). Lowers the count to what every proxy can hold."""
    fits = (nginx_worker_connections() * 15 // 16 - 100) // 2
    if wanted > fits:
        log(f"note: ws_idle holds {fits} WebSockets, not {wanted}: the open-file limit is {open_file_limit()}, "
            f"each proxied WebSocket takes two descriptors, nginx keeps 1/16 of its connections free")
        return max(1, fits)
    return max(1, wanted)


def command_output(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return (out.stdout + out.stderr).strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def metadata(shoal_bin: Path, settings: Settings, started: dt.datetime) -> dict:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    git = command_output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = command_output(["git", "-C", str(REPO), "status", "--porcelain", "--", "node", "proto", "Cargo.lock"])
    wrk_version = command_output(["wrk", "-v"]).splitlines()[0].split("[")[0].strip()
    return {
        "date": started.strftime("%Y-%m-%d %H:%M"),
        "machine": {"nproc": str(os.cpu_count()), "cpu": cpu, "kernel": f"Linux {platform.release()}",
                    "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
        "versions": {
            "shoal": f"{git}{'+dirty' if dirty else ''}",
            "shoal_bin": str(shoal_bin),
            "haproxy": "HAProxy " + command_output(["haproxy", "-v"]).split()[2].split("-")[0],
            "nginx": "nginx " + command_output(["nginx", "-v"]).rsplit("/", 1)[-1],
            "wrk": "wrk " + wrk_version.rsplit("/", 1)[-1].split("-")[0],
        },
        "settings": settings.__dict__,
    }


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round, 1 s per case (about 1.5 minutes)")
    p.add_argument("--shoal-bin", help="use this shoal binary instead of building target/release/shoal")
    p.add_argument("--rounds", type=int, help="alternating rounds (default 3, 1 with --quick)")
    p.add_argument("--seconds", type=int, help="seconds per load case (default 2, 1 with --quick)")
    p.add_argument("--idle-conns", type=int, default=10_000, help="connections held for the memory case")
    p.add_argument("--ws-idle-conns", type=int, default=10_000,
                   help="WebSocket connections held for the ws_idle case (lowered to what the open-file limit allows)")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated subset of " + ",".join(TARGETS))
    p.add_argument("--cases", help="comma-separated subset of case keys (default: all)")
    p.add_argument("--no-reconfig", action="store_true", help="skip the reconfiguration-under-load case")
    p.add_argument("--no-install", action="store_true", help="never run apt-get; fail if something is missing")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    started = dt.datetime.now()
    ncpu = os.cpu_count() or 1
    settings = Settings(
        rounds=args.rounds or (1 if args.quick else 3),
        seconds=args.seconds or (1 if args.quick else 2),
        idle_conns=args.idle_conns,
        ws_idle_conns=args.ws_idle_conns,
        reconfig_pairs=1 if args.quick else 3,
        reconfig_seconds=2 if args.quick else 3,
        proxy_cpu=0,
        load_cpu=1 if ncpu > 1 else 0,
    )
    if ncpu < 2:
        log("warning: one core only; proxies and load share it, results are not meaningful")
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if unknown := set(targets) - set(TARGETS):
        sys.exit(f"unknown targets: {', '.join(sorted(unknown))}")
    cases = build_cases()
    if args.cases:
        keep = {c.strip() for c in args.cases.split(",")}
        if unknown := keep - {c.key for c in cases}:
            sys.exit(f"unknown cases: {', '.join(sorted(unknown))}; known: {', '.join(c.key for c in cases)}")
        cases = [c for c in cases if c.key in keep]

    ensure_packages(args.no_install)
    shoal_bin = build_shoal(args.shoal_bin)
    loadtool = build_loadtool()
    raise_fd_limit(65536)
    settings.ws_idle_conns = fit_ws_idle(settings.ws_idle_conns)
    os.sched_setaffinity(0, {settings.load_cpu})  # the harness itself stays off the proxy core
    reap_stale()
    busy = [p for p in (*BACKEND_HTTP, BACKEND_SINK, BACKEND_ECHO, BACKEND_WS, SHOAL_ADMIN,
                        *(q for ports in PORTS.values() for q in ports)) if not port_free(p)]
    if busy:
        sys.exit(f"ports already in use on {HOST}: {busy} (another benchmark still running?)")

    # SIGTERM (and SIGHUP) unwind through the `finally` below like Ctrl-C does.
    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    workdir = Path(tempfile.mkdtemp(prefix="shoal-bench-"))
    (workdir / "logs").mkdir()
    procs = Procs(workdir)
    bench = Bench(settings, workdir, procs, shoal_bin, loadtool)
    meta = metadata(shoal_bin, settings, started)
    reconfig = None
    log(f"{meta['machine']['nproc']} × {meta['machine']['cpu']}; {settings.rounds} rounds × {len(cases)} cases "
        f"× {len(targets)} targets, {settings.seconds} s each; work dir {workdir}")
    t0 = time.monotonic()
    ok = False
    try:
        bench.start_backends()
        bench.run_rounds(cases, targets)
        if not args.no_reconfig and "shoal" in targets:
            reconfig = bench.run_reconfig()
        ok = True
    finally:
        procs.stop_all()
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"logs kept in {workdir}/logs")
    elapsed = time.monotonic() - t0

    m = medians(bench.results, cases)
    stamp = started.strftime("%Y%m%d-%H%M%S")
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    meta["elapsed_s"] = round(elapsed, 1)
    report = {**meta, "results": bench.results, "medians": m, "reconfig": reconfig}
    paths = {ext: OUT_DIR / f"results-{stamp}.{ext}" for ext in ("json", "svg", "md")}
    paths["json"].write_text(json.dumps(report, indent=1) + "\n")
    paths["svg"].write_text(svg_chart(meta, cases, m, reconfig))
    md = markdown(meta, cases, m, reconfig, bench.results)
    paths["md"].write_text(md)
    print_console_table(cases, m, bench.results)
    print(md)
    log(f"measured in {elapsed:.0f} s; wrote {', '.join(str(p.relative_to(REPO)) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
