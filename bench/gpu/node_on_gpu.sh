#!/bin/bash
# Device side (the lent H100/H200), after ../shared/gpu staging put vLLM 0.24.0 in /tmp/site and the
# random 8B-shaped model in /tmp/model. Runs a real Agora market on the GPU machine:
#   agora worker init (NVML hardware detection) -> agora coordinator -> agora worker start
#   (spawns vLLM on the GPU) -> a request through the official openai SDK -> admin view with
#   GPU load from heartbeats -> streaming load direct vs through Agora (c=1, c=64, c=256) -> SIGTERM.
# Output goes to $OUT (logs, worker.toml, workers.json, serving.jsonl, summary.txt), and with py-spy
# on PATH, profiles of the coordinator and the worker during the loaded Agora runs (SPY_GIL="" samples
# every thread, not only the GIL holder; C1_N sets the number of c=1 requests, default 8;
# PROCESSES=N then repeats the loaded runs with `agora coordinator --processes N`; N256 sets the
# number of c=256 requests, default 1024; POINTS / PPOINTS override the conc:requests lists of
# the first phase and the PROCESSES phase, e.g. POINTS="256:1024").
set -u
# the served name (the model in /tmp/model: make_random_model.py --size 8b or 1b)
export MODEL_NAME=${MODEL_NAME:-llama-8b-random}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
ROOT=$(pwd)
export PYTHONPATH=/tmp/site:$ROOT:$ROOT/worker-node PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0
W=/tmp/agora; rm -rf $W; mkdir -p $W
for i in $(seq 1 150); do grep -q '^DONE' /tmp/make.log 2>/dev/null && break; sleep 2; done
T0=$(date +%s)
python3 -m agora worker init --coordinator 127.0.0.1:50051 --model /tmp/model --name $MODEL_NAME \
  --max-model-len 2048 --max-concurrency 256 --config $W/worker.toml --key $W/node.key --state-dir $W/state --force 2>&1 | tee $OUT/init.txt
cp $W/worker.toml $OUT/
python3 -m agora coordinator --http-port 8080 --grpc-port 50051 --data-dir $W/coord \
  --ready-file $W/ready.json > $W/coord.log 2>&1 &
setsid python3 -m agora worker start --config $W/worker.toml > $W/worker.log 2>&1 < /dev/null &
WPID=$!
python3 - <<'PY' 2>&1 | tee $OUT/summary.txt
import json, os, subprocess, sys, time, pathlib, httpx, openai
W = pathlib.Path("/tmp/agora")
t_ready = time.time()
while not (W / "ready.json").exists():
    if time.time() - t_ready > 120: sys.exit("coordinator never came up: see coord.log")
    time.sleep(0.2)
info = json.loads((W / "ready.json").read_text())
token = pathlib.Path(info["admin_token_file"]).read_text().strip()
admin = httpx.Client(base_url="http://127.0.0.1:8080/admin/v1", headers={"Authorization": f"Bearer {token}"}, timeout=30)
key = admin.post("/clients", json={"name": "gpu", "credit": 10**13}).json()["api_key"]
open(W / "key", "w").write(key)
t0 = time.time()
while True:
    ms = httpx.get("http://127.0.0.1:8080/v1/models", headers={"Authorization": f"Bearer {key}"}).json()["data"]
    if ms and ms[0]["workers"] >= 1: break
    if time.time() - t0 > 900: sys.exit("worker never registered")
    time.sleep(1)
print(f"worker registered {time.time()-t0:.0f} s after coordinator start (vLLM start included)")
with openai.OpenAI(base_url="http://127.0.0.1:8080/v1", api_key=key) as client:
    r = client.chat.completions.create(model=os.environ["MODEL_NAME"], messages=[{"role": "user", "content": "hello"}], max_tokens=16)
    print("chat via openai SDK:", repr(r.choices[0].message.content[:80]), r.usage)
    receipt = httpx.get(f"http://127.0.0.1:8080/v1/receipts/{r.id}", headers={"Authorization": f"Bearer {key}"}).json()
    print("receipt tokens:", receipt["receipt"]["prompt_tokens"], receipt["receipt"]["completion_tokens"])
time.sleep(6)  # a heartbeat with GPU load
workers = admin.get("/workers").json()
json.dump(workers, open(os.environ.get("OUT", "/tmp/out") + "/workers.json", "w"), indent=2)
w = workers["workers"][0]
print("hardware:", w["hardware"]); print("software:", w["software"]); print("gpus:", w["gpus"])
status = json.loads((W / "state" / "status.json").read_text())
print("engine:", {k: v for k, v in status["engines"][os.environ["MODEL_NAME"]].items() if k != "load"})
PY
ENGINE_URL=$(python3 -c "import json;print(json.load(open('/tmp/agora/state/status.json'))['engines']['$MODEL_NAME']['base_url'])")
KEY=$(cat $W/key)
CPID=$(python3 -c "import json;print(json.load(open('/tmp/agora/ready.json'))['pid'])")
SPY=$(command -v py-spy || true)  # optional: profile the processes during the loaded runs
mkdir -p $OUT/profiles
# agora_run LABEL CONC N PIDS...: one loaded run through the coordinator, with each process's CPU
# seconds (utime+stime from /proc) before and after, and py-spy samples when it is on PATH
agora_run() { local label=$1 conc=$2 n=$3; shift 3; local spies="" i=0
  if [ "$conc" -gt 1 ]; then
    for p in "$@"; do i=$((i+1))
      [ -n "$SPY" ] && { timeout 60 $SPY record --nonblocking ${SPY_GIL---gil} -r 100 -d 8 -f raw -o $OUT/profiles/$label-p$i-c$conc.txt -p $p >/dev/null 2>&1 & spies="$spies $!"; }
    done
    for p in "$@"; do awk '{print $14+$15}' /proc/$p/stat; done > $OUT/profiles/cpu-before-$label-c$conc.txt
  fi
  timeout 200 python3 -m agora bench serving --url http://127.0.0.1:8080/v1 --key $KEY --model $MODEL_NAME --conc $conc --n $n --label $label --out $OUT/serving.jsonl
  [ "$conc" -gt 1 ] && for p in "$@"; do awk '{print $14+$15}' /proc/$p/stat; done > $OUT/profiles/cpu-after-$label-c$conc.txt
  [ -n "$spies" ] && wait $spies
  return 0
}
for c in ${POINTS:-1:${C1_N:-8} 64:256 256:${N256:-1024}}; do set -- ${c%:*} ${c#*:}
  timeout 200 python3 -m agora bench serving --url $ENGINE_URL --model $MODEL_NAME --conc $1 --n $2 --label direct --out $OUT/serving.jsonl
  agora_run agora $1 $2 $CPID $WPID
done
# RELAYS=2: a second node attached to the same engine (its own process, key and gRPC session), so
# the relay of one engine is spread over two processes; then the loaded runs again
if [ "${RELAYS:-1}" -ge 2 ]; then
  python3 -m agora worker init --coordinator 127.0.0.1:50051 --model /tmp/model --name $MODEL_NAME \
    --engine-url $ENGINE_URL --max-concurrency 256 --config $W/worker2.toml --key $W/node2.key \
    --state-dir $W/state2 --force > $OUT/init2.txt 2>&1
  setsid python3 -m agora worker start --config $W/worker2.toml > $W/worker2.log 2>&1 < /dev/null &
  W2PID=$!
  for i in $(seq 1 120); do
    n=$(python3 -c "import httpx;d=httpx.get('http://127.0.0.1:8080/v1/models',headers={'Authorization':'Bearer $KEY'}).json()['data'];print(d[0]['workers'] if d else 0)")
    [ "$n" -ge 2 ] && break; sleep 1
  done
  echo "second relay node registered: workers=$n after ${i}s" | tee -a $OUT/summary.txt
  for c in "64 256" "256 1024"; do set -- $c
    timeout 200 python3 -m agora bench serving --url $ENGINE_URL --model $MODEL_NAME --conc $1 --n $2 --label direct2 --out $OUT/serving.jsonl
    agora_run agora-2relays $1 $2 $CPID $WPID $W2PID
  done
  kill -TERM $W2PID; for i in $(seq 1 30); do kill -0 $W2PID 2>/dev/null || break; sleep 1; done
fi
# PROCESSES=N: the coordinator again, now `--processes N` on the same ports and database; the
# node reconnects by itself and opens a session with every process; then the loaded runs again
if [ "${PROCESSES:-1}" -ge 2 ]; then
  kill -TERM $CPID; for i in $(seq 1 30); do kill -0 $CPID 2>/dev/null || break; sleep 1; done
  rm -f $W/ready.json
  python3 -m agora coordinator --http-port 8080 --grpc-port 50051 --data-dir $W/coord \
    --ready-file $W/ready.json --processes $PROCESSES > $W/coord-p$PROCESSES.log 2>&1 &
  python3 - <<'PY' 2>&1 | tee -a $OUT/summary.txt
import json, os, pathlib, time, httpx
W = pathlib.Path("/tmp/agora"); t0 = time.time()
while not (W / "ready.json").exists():
    if time.time() - t0 > 120: raise SystemExit("coordinator processes never came up")
    time.sleep(0.2)
n = int(os.environ["PROCESSES"]); seen = {}
while len(seen) < n or not all(seen.values()):
    if time.time() - t0 > 120: raise SystemExit(f"node not on every process: {seen}")
    h = httpx.get("http://127.0.0.1:8080/health").json(); seen[h["process"]] = h["workers"]
print(f"{n} coordinator processes, the node on each, {time.time() - t0:.1f} s after restart")
PY
  PIDS="$(python3 -c "import json;d=json.load(open('$W/ready.json'));print(' '.join(str(p['pid']) for p in d['processes']))")"
  for c in ${PPOINTS:-64:256 256:${N256:-1024}}; do set -- ${c%:*} ${c#*:}
    timeout 200 python3 -m agora bench serving --url $ENGINE_URL --model $MODEL_NAME --conc $1 --n $2 --label direct-p --out $OUT/serving.jsonl
    agora_run agora-p$PROCESSES $1 $2 $PIDS $WPID
  done
fi
EPID=$(python3 -c "import json;print(json.load(open('/tmp/agora/state/status.json'))['engines']['$MODEL_NAME']['pid'])")
kill -TERM $WPID; for i in $(seq 1 60); do kill -0 $WPID 2>/dev/null || break; sleep 1; done
echo "worker exit: $(kill -0 $WPID 2>/dev/null && echo STILL RUNNING || echo gone); engine pid $EPID: $(kill -0 $EPID 2>/dev/null && echo STILL RUNNING || echo gone)" | tee -a $OUT/summary.txt
echo "leftover vllm processes: $(pgrep -fc vllm_entry || true)" | tee -a $OUT/summary.txt
cp $W/coord*.log $W/worker*.log $W/state/engines/*.log $OUT/ 2>/dev/null
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv | tee -a $OUT/summary.txt
echo "total $(( $(date +%s) - T0 )) s"
