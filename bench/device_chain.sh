#!/usr/bin/env bash
# Runs startup_suite.sh steps one after another on a lent GPU machine, past one call's 10-minute limit: a process
# in its own session (setsid) lives on until the machine goes back, so the later calls only wait and collect.
# Make each call right after the last one returns (the machine's 30 s warm window), or the chain dies with it.
#
#     bash bench/device_chain.sh start "AOT=1 first" "AOT=1 LOAD_MINUTES=1.5 loadtest" "crash:gc-crash"
#     bash bench/device_chain.sh wait     # again in the next call, until the chain ends
#
# A step is "[VAR=value ...] STEP"; prefixed "crash:" it runs only if an earlier step's log shows a segfault,
# "nocrash:" only if none does. Each step's files go to /tmp/chain/NN-STEP/; every call ends by packing /tmp/chain
# into $OUT/chain.tgz (one file: a call brings back at most eight) and printing each step's last lines.
# `wait [SECONDS]` returns when the chain ends or after SECONDS (default 560) of this call; `start` then waits $WAIT.
set -u
chain=/tmp/chain
here=$(cd "$(dirname "$0")/.." && pwd)
suite=${SUITE:-$here/bench/startup_suite.sh}
crashed() { grep -l -E "Segmentation fault|exit (-11|139)" "$chain"/*/step.log >/dev/null 2>&1; }

collect() {
  if [ -n "${OUT:-}" ]; then tar czf "$OUT/chain.tgz" -C "$chain" . ; fi
  cat "$chain/chain.log"
  for f in "$chain"/*/step.log; do
    [ -e "$f" ] && { echo "=== $f"; tail -n "${TAIL:-12}" "$f"; }
  done
  [ -e "$chain/done" ] && echo "CHAIN DONE" || echo "CHAIN RUNNING"
}

case "${1:?start, wait or run}" in
  start)
    shift
    rm -rf "$chain"; mkdir -p "$chain"
    printf '%s\n' "$@" > "$chain/steps"
    setsid nohup bash "$0" run > "$chain/chain.log" 2>&1 < /dev/null &
    sleep 2
    exec bash "$0" wait "${WAIT:-560}" ;;
  wait)
    limit=${2:-560}
    while [ ! -e "$chain/done" ] && [ "$SECONDS" -lt "$limit" ]; do sleep 5; done
    collect ;;
  run)
    cd "$here" || exit 1
    n=0
    while read -r line; do
      n=$((n + 1))
      case "$line" in
        crash:*) line=${line#crash:}; crashed || { echo "$(date +%T) skip $line (no crash so far)"; continue; } ;;
        nocrash:*) line=${line#nocrash:}; crashed && { echo "$(date +%T) skip $line (a crash so far)"; continue; } ;;
      esac
      read -r -a words <<< "$line"
      step=${words[-1]}
      dir=$chain/$(printf %02d "$n")-$step
      mkdir -p "$dir"
      echo "$(date +%T) start $line"
      env OUT="$dir" "${words[@]:0:${#words[@]}-1}" bash "$suite" "$step" > "$dir/step.log" 2>&1
      echo "$(date +%T) end $line: exit $?"
    done < "$chain/steps"
    touch "$chain/done" ;;
  *) echo "start, wait or run"; exit 2 ;;
esac
