#!/usr/bin/env bash
# Issue 20's start-up runs on a lent GPU machine, one step per device call, chained within the machine's warm
# window so that the checkpoint and the compile cache under /tmp survive from one step to the next:
#
#     bash bench/startup_suite.sh load    # the full-size checkpoint written, loaded part by part; import times
#     bash bench/startup_suite.sh imports # the import times alone (python -X importtime)
#     bash bench/startup_suite.sh first   # first start: empty cache, page cache dropped (9.8 min in all)
#     bash bench/startup_suite.sh loadtest  # the in-process warm-up from the first start's cache (it saves the
#                                           # portable artifacts), then Poisson load at MGIE_MAX_BATCH=8 (~10 min)
#     bash bench/startup_suite.sh warm    # a warm restart: the cache full, artifacts saved (~4 min)
#     bash bench/startup_suite.sh aot     # the home-shape step loaded ahead-of-time compiled against a warm re-trace
#     bash bench/startup_suite.sh aot-symbolic  # the symbolic step compiled ahead of time at two jobs, loaded and
#                                               # run at the other classes against the eager step
#     bash bench/startup_suite.sh aot-both      # those two side by side in one call (~6 min)
#     bash bench/startup_suite.sh gc-crash      # after AOT=1 first: which part of a saved step crashes in garbage
#                                               # collection (bench/aot_gc_crash.py, one process per variant, ~6 min)
#
# AOT=1 before any of first, loadtest and warm runs the worker with MGIE_COMPILE_AOT=1 (saved_steps.py): its logs and
# results are named "-aot". Run the whole chain with it: the first start is what saves the steps.
#
# Carry `.whl` (diffusers, discord.py, redis, python-dotenv, aiosqlite, prometheus_client, disarm wheels) and
# `.carry/bench` (the tokenizer). Results go to $OUT (at most 8 files come back). "FRESH MACHINE" in the output
# means the chain broke: the loadtest and warm steps then start from an empty cache.
# FIRST_DEADLINE (545 s from the step's start), LOAD_MINUTES (1 per load) and LOAD_DEADLINE (560 s) stretch first and
# loadtest where bench/device_chain.sh runs them past one call's limit; LOAD_CAPACITY_OF=mixed bases the loads on the
# mixed sizes' burst (bench/loadtest.py --capacity-of); GC_VARIANTS picks and orders gc-crash's variants.
set -u
step=${1:?load, imports, first, loadtest, warm, aot, aot-symbolic, aot-both or gc-crash}
out=${OUT:-bench/results}
tag=""
if [ "${AOT:-0}" = 1 ]; then export MGIE_COMPILE_AOT=1; tag="-aot"; fi
if [ ! -d /tmp/site/diffusers ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
[ -d /tmp/mgie-full ] && echo "checkpoint present" || echo "FRESH MACHINE"
(nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,utilization.gpu,memory.used --format=csv -lms 2000 \
  > "$out/smi-$step.csv" &)
quiet() { grep --line-buffered -v pow_by_natural; }
aot_step() {  # STEP [more aot_step.py arguments]
  timeout "${AOT_TIMEOUT:-560}" python3 bench/aot_step.py --step "$@" --ckpt /tmp/mgie-full --tokenizer-dir .carry/bench --out "$out" \
    2>&1 | quiet | tee "$out/aot-$1-step.log"
}
imports() {  # what a worker process imports before it loads anything (17-18 s on an H200 host, 3.5 s on a CPU VM)
    python3 -X importtime -c "import torch, torch._dynamo, transformers, diffusers; import mgie_engine.pool, bot.queue" \
      2> "$out/importtime.log"; sort -t'|' -k2 -n -r "$out/importtime.log" | head -n 25
}
case "$step" in
  load)
    timeout 500 python3 bench/load_weights.py --ckpt /tmp/mgie-full --tokenizer-dir .carry/bench --out "$out" \
      2>&1 | quiet | tee "$out/load-weights.log"
    imports ;;
  imports) imports ;;
  first)
    # on a fresh machine the checkpoint is written first (~40 s): the phase gets what the 10-minute call has left
    [ -d /tmp/mgie-full ] || python3 bench/write_full_size.py /tmp/mgie-full --tokenizer-dir .carry/bench
    deadline=$((${FIRST_DEADLINE:-545} - SECONDS))
    timeout $((deadline + 35)) python3 bench/coldstart.py --phase first --compile auto --deadline "$deadline" \
      --tokenizer-dir .carry/bench \
      --out "$out" 2>&1 | quiet | grep --line-buffered -v "^\[child\] edit" | tee "$out/coldstart-first$tag.log"
    echo "coldstart exit ${PIPESTATUS[0]}"
    for f in /tmp/mgie-coldstart/compile/*/compile-child-*.log; do
      echo "=== $f"; grep -E "warm-up|precompiled|ahead of time|rror" "$f" | quiet | tail -n 20
    done > "$out/children$tag.log" 2>&1 ;;
  loadtest)
    timeout $((${LOAD_DEADLINE:-560} + 20)) python3 bench/loadtest.py --ckpt /tmp/mgie-full --tokenizer-dir .carry/bench \
      --max-batch 8 --minutes "${LOAD_MINUTES:-1}" --capacity-of "${LOAD_CAPACITY_OF:-home}" --drain 40 \
      --deadline "${LOAD_DEADLINE:-560}" --out "$out" 2>&1 \
      | quiet | tee "$out/loadtest-b8$tag.log"
    echo "loadtest exit ${PIPESTATUS[0]}" ;;
  warm)
    ls /tmp/mgie-coldstart/compile/*/artifacts.bin 2>/dev/null || echo "NO ARTIFACTS: not a true warm restart"
    timeout 260 python3 bench/coldstart.py --phase warm --compile auto --deadline 230 --tokenizer-dir .carry/bench \
      --out "$out" 2>&1 | quiet | tee "$out/coldstart-warm$tag.log"
    echo "coldstart exit ${PIPESTATUS[0]}" ;;
  aot) aot_step static ;;
  aot-symbolic) aot_step symbolic --phases aot,load ;;
  aot-both)  # both in one call, side by side (16 cores; each loads only the UNet), each with its own cache folder
    [ -d /tmp/mgie-full ] || python3 bench/write_full_size.py /tmp/mgie-full --tokenizer-dir .carry/bench
    AOT_TIMEOUT=$((575 - SECONDS))
    aot_step static --work /tmp/mgie-aot-static > /dev/null &
    aot_step symbolic --phases aot,load --work /tmp/mgie-aot-symbolic > /dev/null
    wait
    tail -n 5 "$out"/aot-*-step.log ;;
  gc-crash)
    timeout 570 python3 bench/aot_gc_crash.py --ckpt /tmp/mgie-full --tokenizer-dir .carry/bench --timeout 150 \
      ${GC_VARIANTS:+--variants "$GC_VARIANTS"} --out "$out" 2>&1 | quiet | tee "$out/aot-gc-crash.log" ;;
  *) echo "unknown step $step (load, imports, first, loadtest, warm, aot, aot-symbolic, aot-both or gc-crash)"; exit 2 ;;
esac
cp /tmp/mgie-coldstart-events/events-*.jsonl "$out/" 2>/dev/null
pkill nvidia-smi
true
