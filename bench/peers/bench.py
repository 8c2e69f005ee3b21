#!/usr/bin/env python3
"""Driver: starts upstream + gateways on loopback, runs the interleaved matrix with
loadgen.py, repeats key points in reversed order, stops everything it started (by PID).

Usage: venv-tools/bin/python bench.py [--duration 20] [--warmup 5] [--out results.jsonl]
       [--targets direct,vr,ll1,ll2] [--conc 1,32,128] [--repeat-conc 1,32] [--no-phase1]
       [--repeat-targets direct,vr,vr_rr,ll1,ll2] [--itl-ms 0]
       [--external NAME=PORT[:PID]]   # a new gateway you started yourself, upstream = :18001
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
PY = os.path.join(HERE, "venv-tools/bin/python")
P = argparse.ArgumentParser()
P.add_argument("--duration", type=float, default=20)
P.add_argument("--warmup", type=float, default=5)
P.add_argument("--out", default=os.path.join(HERE, "results.jsonl"))
P.add_argument("--targets", default="direct,vr,ll1,ll2")
P.add_argument("--conc", default="1,32,128")
P.add_argument("--repeat-conc", default="1,32")
P.add_argument("--repeat-targets", default="direct,vr,vr_rr,ll1,ll2")
P.add_argument("--no-phase1", action="store_true")
P.add_argument("--tokens", type=int, default=16)
P.add_argument("--itl-ms", type=float, default=0.0)
P.add_argument("--external", action="append", default=[],
               help="NAME=PORT[:PID] gateway already running (pointed at upstream 127.0.0.1:18001); "
                    "PID (its top process) enables CPU/RSS accounting; use NAME in --targets")
P.add_argument("--key", action="append", default=[],
               help="NAME=SECRET API key for an external gateway (default: the bench key)")
P.add_argument("--ready-path", action="append", default=[],
               help="NAME=PATH an external gateway answers 200 on only once it can serve")
A = P.parse_args()
KEYS = dict(k.split("=", 1) for k in A.key)
READY_PATHS = dict(r.split("=", 1) for r in A.ready_path)
EXTERNAL = {}
for e in A.external:
    n, rest = e.split("=", 1)
    port, _, pid = rest.partition(":")
    EXTERNAL[n] = (int(port), int(pid) if pid else None)

KEY = "sk-bench-1234"
TARGETS = {
    # name: (port, start argv, readiness path, needs auth)
    "direct": (18001, None, "/v1/models", False),
    "vr": (18003, [os.path.join(HERE, "start_vllm_router.sh"), "cache_aware", "18003"], "/v1/models", False),
    "vr_rr": (18005, None, "/v1/models", False),  # started below with different prometheus port
    "ll1": (18002, [os.path.join(HERE, "start_litellm.sh"), "1", "18002"], "/v1/models", True),
    "ll2": (18004, [os.path.join(HERE, "start_litellm.sh"), "2", "18004"], "/v1/models", True),
}
procs = {}
procs_ext = {}


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def start(name, argv):
    lf = open(os.path.join(HERE, f"logs_{name}.txt"), "w")
    p = subprocess.Popen(argv, stdout=lf, stderr=subprocess.STDOUT, cwd=HERE)
    procs[name] = p
    with open(os.path.join(HERE, f"{name}.pid"), "w") as f:
        f.write(str(p.pid))
    return p


def ready(port, path, auth, timeout=120, key=KEY):
    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
            if auth:
                req.add_header("Authorization", f"Bearer {key}")
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status == 200:
                    return time.time() - t0
        except Exception:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"port {port} not ready")


def descendants(pid):
    out, i = [pid], 0
    while i < len(out):
        q = out[i]
        i += 1
        try:
            for t in os.listdir(f"/proc/{q}/task"):
                try:
                    out += [int(x) for x in open(f"/proc/{q}/task/{t}/children").read().split()]
                except OSError:
                    pass
        except OSError:
            pass
    return out


def tree_cpu(pid):
    s = 0.0
    for q in descendants(pid):
        try:
            st = open(f"/proc/{q}/stat").read()
            f = st[st.rindex(")") + 2:].split()
            s += (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError):
            pass
    return s


def stop_all():
    for name, p in list(procs.items()):
        tree = descendants(p.pid)
        try:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
        for q in tree[1:]:
            if os.path.exists(f"/proc/{q}"):
                try:
                    os.kill(q, signal.SIGKILL)
                except OSError:
                    pass
        log("stopped", name, p.pid, "tree", tree)


def loadgen(target, c, stream, duration, warmup, label, out):
    pids = {"upstream": procs["upstream"].pid}
    if target in EXTERNAL:
        port, xpid = EXTERNAL[target]
        if xpid:
            pids["proxy"] = xpid
    else:
        port = TARGETS[target][0]
        if target != "direct":
            pids["proxy"] = procs[target].pid
    argv = [PY, os.path.join(HERE, "loadgen.py"), "--url", f"http://127.0.0.1:{port}",
            "-c", str(c), "-d", str(duration), "--warmup", str(warmup), "--grace", "20",
            "--tokens", str(A.tokens), "--api-key", KEYS.get(target, KEY), "--label", label,
            "--pids", ",".join(f"{k}={v}" for k, v in pids.items())]
    if stream:
        argv.append("--stream")
    if out:
        argv += ["--out", out]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=duration + warmup + 60)
    sys.stdout.write(r.stdout[-3000:])
    if r.returncode:
        sys.stdout.write(r.stderr[-3000:])
    sys.stdout.flush()


def main():
    targets = A.targets.split(",")
    rtargets = A.repeat_targets.split(",")
    need = set(targets) | set(rtargets)
    up = [PY, os.path.join(HERE, "upstream.py"), "--port", "18001", "--tokens", str(A.tokens),
          "--itl-ms", str(A.itl_ms)]
    start("upstream", up)
    ready(18001, "/v1/models", False)
    for t in ("vr", "ll1", "ll2"):
        if t in need:
            start(t, TARGETS[t][1])
    if "vr_rr" in need:
        start("vr_rr", [os.path.join(HERE, "venv/bin/vllm-router"), "--host", "127.0.0.1",
                        "--port", "18005", "--worker-urls", "http://127.0.0.1:18001",
                        "--policy", "round_robin", "--prometheus-host", "127.0.0.1",
                        "--prometheus-port", "18030", "--log-level", "warning"])
    for t in need:
        if t in EXTERNAL:
            path = READY_PATHS.get(t, "/v1/models")
            waited = ready(EXTERNAL[t][0], path, True, 180, KEYS.get(t, KEY))
            log("ready", t, f"{waited:.1f}s")
        elif t != "direct":
            port, _, path, auth = TARGETS[t]
            log("ready", t, f"{ready(port, path, auth, 180):.1f}s")
    # idle CPU check: all started processes, 10 s
    for n, (port, xpid) in EXTERNAL.items():
        if xpid:
            procs_ext[n] = xpid
    c0 = {n: tree_cpu(p.pid) for n, p in procs.items()}
    time.sleep(10)
    log("idle CPU (cores) over 10s:", {n: round((tree_cpu(p.pid) - c0[n]) / 10, 4) for n, p in procs.items()})
    # pre-warm every target, both modes (discarded)
    for t in need:
        for s in (False, True):
            loadgen(t, 8, s, 5, 1, f"prewarm-{t}", "")
    concs = [int(x) for x in A.conc.split(",")]
    if not A.no_phase1:
        log("=== phase 1: matrix, targets interleaved")
        for s in (False, True):
            for c in concs:
                for t in targets:
                    loadgen(t, c, s, A.duration, A.warmup, f"p1-{t}", A.out)
    log("=== phase 2: repeat key points, reversed target order")
    for s in (True, False):
        for c in [int(x) for x in A.repeat_conc.split(",")]:
            for t in reversed(rtargets):
                loadgen(t, c, s, A.duration, A.warmup, f"p2-{t}", A.out)


if __name__ == "__main__":
    try:
        main()
    finally:
        stop_all()
