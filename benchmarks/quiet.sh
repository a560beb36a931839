#!/usr/bin/env bash
# Every CPU table of BENCHMARKS.md in one quiet session, highest priority first; each phase writes
# its JSON as records arrive, so a session cut short keeps what it measured.
#
#   bash benchmarks/quiet.sh [OUTDIR]      # default benchmarks/results/quiet
#
# Nothing else may run on the cores meanwhile: the scripts record the load average before and
# after each interleaved phase and mark a record `loaded` above 0.3 per core. Set PAUSE_PATTERN
# to a pgrep -f pattern of background jobs to SIGSTOP for the session (SIGCONT at exit, also on
# error or Ctrl-C), e.g. PAUSE_PATTERN="experiments/study.py".
set -u
out=${1:-benchmarks/results/quiet}
mkdir -p "$out"
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python3}
paused=""
if [ -n "${PAUSE_PATTERN:-}" ]; then
    paused=$(pgrep -f "$PAUSE_PATTERN" | tr '\n' ' ')
    [ -n "$paused" ] && kill -STOP $paused
fi
trap '[ -n "$paused" ] && kill -CONT $paused' EXIT
settle() {  # wait (at most 3 min) for the 1-minute load average to fall below 0.6 (0.3 per core)
    for _ in $(seq 36); do
        awk '{exit !($1 < 0.6)}' /proc/loadavg && return
        sleep 5
    done
}
{ date -u +%FT%TZ; lscpu | grep -E "Model name|^CPU\(s\)"; "$py" -c "import jax, torch; print('jax', jax.__version__, 'torch', torch.__version__)"; } > "$out/machine.txt" 2>&1
settle; "$py" "$here/training_cost.py" --atoms 14 --hessian-chunks 0 14 --rounds 12 --out "$out/training_cost_14.json"
settle; "$py" "$here/peer_mace.py" --atoms 12 --torch-compile --rounds 8 --out "$out/peer_mace_12.json"
settle; "$py" "$here/peer_mace.py" --atoms 24 --tasks E-F "E-F-HVP random K=1" "Hessian inference" --rounds 6 \
    --out "$out/peer_mace_24.json"   # MACE E-F-H at 24 atoms: minutes per step, not timed
settle; "$py" "$here/peer_jax.py" --atoms 12 --rounds 8 --out "$out/peer_jax.json"
settle; "$py" "$here/startup.py" --out "$out/startup.json"
settle; "$py" "$here/training_cost.py" --atoms 5 30 --hessian-chunks 0 --rounds 8 --out "$out/training_cost_5_30.json"
settle; "$py" "$here/training_cost.py" --atoms 1000 --schemes E-F "E-F-HVP random K=1" --rounds 6 --out "$out/training_cost_1000.json"
settle; "$py" "$here/training_cost.py" --atoms 60 120 250 --schemes E-F "E-F-HVP random K=1" "E-F-HVP random K=4" \
    --rounds 8 --out "$out/training_cost_60_250.json"
date -u +%FT%TZ >> "$out/machine.txt"
