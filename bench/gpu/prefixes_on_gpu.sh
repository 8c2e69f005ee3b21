#!/bin/bash
# Device side (the lent H100/H200), after ../shared/gpu staging put vLLM 0.24.0 and Agora's missing
# wheels in /tmp/site and make_random_model.py is writing the random model to /tmp/model (log
# /tmp/make.log). Issue 18: `agora bench prefixes` on one GPU shared by NODES worker nodes (default
# 3), each spawning its own vLLM engine: a real coordinator routes RAG-style multi-turn chats with
# prefix-aware routing and without it (AGORA_COORDINATOR_PREFIX_ROUTING), modes in ORDER.
#
# The engines start once (--reuse-engines): per mode a fresh coordinator on the same ports, every
# engine's prefix cache emptied first (POST /reset_prefix_cache, VLLM_SERVER_DEV_MODE=1). They
# start at the same time, so each engine gets a fixed KV cache (--kv-cache-memory-bytes: vLLM
# skips its memory profiling, which would count the other engines' allocations as its own):
# an equal share of 85 % of the card, less the weights and 3 GiB (activations, CUDA graphs).
#
# The bench runs detached (setsid), so it outlives one device call: the first call starts it and
# waits up to WAIT s; call the script again on the same warm machine to wait on and collect.
# Under $OUT: prefixes.json, bench.log, logs.tar.gz (coordinator, node and engine logs), gpu.txt.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
ROOT=$(pwd)
export PYTHONPATH=/tmp/site:$ROOT:$ROOT/worker-node PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0
B=/tmp/pfx
NODES=${NODES:-3}
WAIT=${WAIT:-540}
MODEL_NAME=${MODEL_NAME:-llama-8b-random}
ORDER=${ORDER:-aware,blind,blind,aware}
# the workload: CONV chats of TURNS turns over DOCS shared documents of DOC_TOKENS tokens, each
# chat with NOTE_TOKENS of its own, CONC chats in flight, MAX_TOKENS per answer
WORKLOAD=${WORKLOAD:---conversations 64 --turns 4 --documents 16 --doc-tokens 2000 --note-tokens 300 --conc 24 --max-tokens 64}
if [ ! -e $B/started ]; then
  rm -rf $B; mkdir -p $B
  for i in $(seq 1 150); do grep -q '^DONE' /tmp/make.log 2>/dev/null && break; sleep 2; done
  grep -q '^DONE' /tmp/make.log 2>/dev/null || { echo "model not ready:"; tail -5 /tmp/make.log; exit 1; }
  TOTAL_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
  WEIGHTS_MIB=$(du -cm /tmp/model/*.safetensors | tail -1 | cut -f1)
  KV_MIB=${KV_MIB:-$(( TOTAL_MIB * 85 / 100 / NODES - WEIGHTS_MIB - 3072 ))}
  UTIL=${UTIL:-0.25}  # with a fixed KV cache vLLM only checks this much is free at its start
  echo "GPU $TOTAL_MIB MiB, weights $WEIGHTS_MIB MiB, KV cache per engine $KV_MIB MiB" | tee $B/plan.txt
  CMD="python3 -m agora bench prefixes --nodes $NODES $WORKLOAD --node-concurrency ${NODE_CONC:-16} \
    --model-dir /tmp/model --served-name $MODEL_NAME --max-model-len ${MAX_LEN:-8192} ${EAGER:---no-eager} \
    --gpu-memory-utilization $UTIL --engine-args '--kv-cache-memory-bytes $((KV_MIB * 1048576))' \
    --price-cached-in ${PRICE_CACHED_IN:-10000} --reuse-engines --order $ORDER --start-timeout 900 \
    --workdir $B/work --out $B/prefixes.json"
  echo "$CMD" | tee -a $B/plan.txt
  setsid nohup bash -c "$CMD > $B/bench.log 2>&1; echo \$? > $B/rc" < /dev/null > /dev/null 2>&1 &
  touch $B/started
fi
T0=$(date +%s); last=0
while [ ! -e $B/rc ] && [ $(( $(date +%s) - T0 )) -lt $WAIT ]; do
  if [ $(( $(date +%s) - last )) -ge 30 ]; then last=$(date +%s)
    up=$(grep -l ": ready" $B/work/nodes/node-*.log 2>/dev/null | wc -l)
    mem=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader | head -1)
    echo "[$(date +%T)] nodes with a ready line: $up; GPU used: $mem; results: $(grep -c '"routing"' $B/bench.log 2>/dev/null)"
  fi
  sleep 3
done
echo "bench rc: $(cat $B/rc 2>/dev/null || echo still running)"
cat $B/plan.txt > $OUT/plan.txt
cp $B/prefixes.json $B/bench.log $OUT/ 2>/dev/null
nvidia-smi > $OUT/gpu.txt 2>&1
tar czf $OUT/logs.tar.gz --exclude='*-vllm-cache' --exclude='*.key' --exclude='coordinator' \
  -C $B work 2>/dev/null
tail -c 6000 $B/bench.log
