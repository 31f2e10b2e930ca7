"""A second-language client of seed 003's control API (Python grpcio), run by
tests/tests/grpc.rs through the venv scripts/grpc-venv creates.

Stubs are generated at run time from proto/rollout/lb.proto with grpc_tools' bundled protoc; the
descriptors are then checked against the interface's facts (names, field numbers, enum values),
so a drift of the .proto from what the seed's clients send fails here. Then the seed CLI's flow
runs against a node: addPool, two addBackend, poolHealth until PS_FULL with two BS_HEALTHY, the
error codes, removeBackend. Prints "seed 003 flow: ok" and exits 0 on success.
"""

import argparse
import importlib
import sys
import tempfile
import time

import grpc
from grpc_tools import protoc

# The wire facts: message -> {field: (number, type name or scalar)}.
MESSAGES = {
    "AddPoolReq": {"pattern": 1, "pool_type": 2, "health_checks": 4},
    "HealthChecks": {"health_checks": 1, "interval_secs": 2},
    "HealthCheck": {"status_check": 1},
    "StatusCheck": {"url_path": 1, "healthy_values": 2},
    "RemovePoolReq": {"pattern": 1},
    "AddBackendReq": {"pattern": 1, "backend": 2},
    "RemoveBackendReq": {"pattern": 1, "backend": 2},
    "Backend": {"ip_backend": 1},
    "IPBackend": {"ip": 1, "port": 2, "url_path": 3},
    "PoolHealthReq": {"pattern": 1, "healthy": 3, "sick": 4},
    "PoolHealthResp": {"health": 1},
    "PoolHealth": {"status": 1, "backends": 2},
    "BackendHealth": {"backend": 1, "status": 2},
    "AddPoolResp": {},
    "RemovePoolResp": {},
    "AddBackendResp": {},
    "RemoveBackendResp": {},
}
ENUMS = {
    "PoolType": {"PT_UNKNOWN": 0, "PT_P2C": 1},
    "PoolStatus": {"PS_UNKNOWN": 0, "PS_FULL": 1, "PS_EMPTY": 2, "PS_DEGRADED": 3},
    "BackendStatus": {"BS_UNKNOWN": 0, "BS_HEALTHY": 1, "BS_SICK": 2},
}
METHODS = ["AddPool", "RemovePool", "AddBackend", "RemoveBackend", "PoolHealth"]


def generate(proto_dir: str):
    out = tempfile.mkdtemp(prefix="seed003-stubs-")
    args = ["protoc", f"-I{proto_dir}", f"--python_out={out}", f"--grpc_python_out={out}", "rollout/lb.proto"]
    if protoc.main(args) != 0:
        sys.exit("protoc failed on rollout/lb.proto")
    sys.path.insert(0, out)
    return importlib.import_module("rollout.lb_pb2"), importlib.import_module("rollout.lb_pb2_grpc")


def check_facts(pb) -> None:
    desc = pb.DESCRIPTOR
    assert desc.package == "rollout.lb", desc.package
    for name, fields in MESSAGES.items():
        got = {f.name: f.number for f in desc.message_types_by_name[name].fields}
        assert got == fields, f"{name}: {got} != {fields}"
    for name, values in ENUMS.items():
        got = {v.name: v.number for v in desc.enum_types_by_name[name].values}
        assert got == values, f"{name}: {got} != {values}"
    methods = [m.name for m in desc.services_by_name["LoadBalancer"].methods]
    assert methods == METHODS, methods


def expect_code(code, call, *args, **kwargs) -> None:
    try:
        call(*args, **kwargs)
    except grpc.RpcError as e:
        assert e.code() == code, f"expected {code}, got {e.code()}: {e.details()}"
        return
    raise AssertionError(f"expected {code}, the call succeeded")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--proto-dir", required=True)
    ap.add_argument("--lb", required=True, help="a node's admin address, HOST:PORT")
    ap.add_argument("--token", required=True)
    ap.add_argument("--backend", action="append", required=True, help="IP:PORT, twice")
    ap.add_argument("--pattern", default="/py/")
    a = ap.parse_args()
    pb, pb_grpc = generate(a.proto_dir)
    check_facts(pb)

    channel = grpc.insecure_channel(a.lb)
    grpc.channel_ready_future(channel).result(timeout=20)
    stub = pb_grpc.LoadBalancerStub(channel)
    auth = [("authorization", f"Bearer {a.token}")]

    def call(method, req, **kw):
        return getattr(stub, method)(req, metadata=auth, timeout=30, **kw)

    pool = pb.AddPoolReq(
        pattern=a.pattern,
        pool_type=pb.PT_P2C,
        health_checks=pb.HealthChecks(
            health_checks=[pb.HealthCheck(status_check=pb.StatusCheck(url_path="/healthz", healthy_values=["ok"]))],
            interval_secs=1,
        ),
    )
    expect_code(grpc.StatusCode.UNAUTHENTICATED, stub.AddPool, pool, timeout=30)
    call("AddPool", pool)
    expect_code(grpc.StatusCode.ALREADY_EXISTS, call, "AddPool", pool)
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, call, "AddPool", pb.AddPoolReq(pattern="", pool_type=pb.PT_P2C))

    def backend(addr: str) -> "pb.Backend":
        ip, port = addr.rsplit(":", 1)
        return pb.Backend(ip_backend=pb.IPBackend(ip=ip, port=int(port), url_path="/"))

    for addr in a.backend:
        call("AddBackend", pb.AddBackendReq(pattern=a.pattern, backend=backend(addr)))
    wait_full(call, pb, a.pattern, a.backend)
    expect_code(grpc.StatusCode.NOT_FOUND, call, "PoolHealth", pb.PoolHealthReq(pattern="/nowhere/", healthy=True))

    call("RemoveBackend", pb.RemoveBackendReq(pattern=a.pattern, backend=backend(a.backend[1])))
    wait_full(call, pb, a.pattern, a.backend[:1])
    print("seed 003 flow: ok")


def wait_full(call, pb, pattern: str, backends: list) -> None:
    """Polls PoolHealth (as the seed's `poolHealth`) until PS_FULL with these backends healthy."""
    deadline = time.monotonic() + 30
    while True:
        h = call("PoolHealth", pb.PoolHealthReq(pattern=pattern, healthy=True, sick=True)).health
        got = sorted(f"{b.backend.ip_backend.ip}:{b.backend.ip_backend.port}" for b in h.backends)
        healthy = all(b.status == pb.BS_HEALTHY for b in h.backends)
        if h.status == pb.PS_FULL and healthy and got == sorted(backends):
            print(f"{pattern} {pb.PoolStatus.Name(h.status)}: {', '.join(got)} BS_HEALTHY")
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"PoolHealth never showed PS_FULL with {backends}: {h}")
        time.sleep(0.1)


if __name__ == "__main__":
    main()
