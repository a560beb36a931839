#!/usr/bin/env bash
# The GPU section of BENCHMARKS.md: the same scripts as on the CPU, sized to a short lease.
#
#   bash benchmarks/gpu.sh OUTDIR        # one CUDA GPU, jax[cuda] and (for MACE) torch with CUDA
#
# In priority order, each phase under its own time limit so a short lease still returns the most
# important numbers (every script writes its JSON as records arrive):
#   1. training_cost.py at 14 atoms (the paper's median molecule), all six schemes;
#   2. peer_mace.py at 12 atoms, MACE on cuda against phljax on JAX's GPU backend;
#   3. training_cost.py at 120 atoms (E-F, HVP random K=1, E-F-H) and 1000 atoms (E-F, HVP K=1).
# E-F-H uses all 3A Hessian columns in one vmap (chunk 0): on a GPU memory is not what bounds it.
set -u
out=${1:-benchmarks/results/gpu}
mkdir -p "$out"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python3}
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    "$py" -c "import jax, flax, optax, e3nn_jax; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, 'e3nn_jax', e3nn_jax.__version__, jax.devices())"
    "$py" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" || true
    nproc
} > "$out/gpu.txt" 2>&1
cat "$out/gpu.txt"

common=(--hessian-chunks 0 --rounds 10 --round-s 0.3 --mem-limit-gb 0)
timeout "${PHASE1_S:-200}" "$py" "$here/training_cost.py" --atoms 14 "${common[@]}" --out "$out/training_cost_14.json"
timeout "${PHASE2_S:-120}" "$py" "$here/peer_mace.py" --atoms 12 --device cuda --mem-limit-gb 0 \
    --hessian-chunk 0 --rounds 8 --round-s 0.3 --out "$out/peer_mace.json"
timeout "${PHASE3_S:-100}" "$py" "$here/training_cost.py" --atoms 120 --schemes E-F "E-F-HVP random K=1" E-F-H \
    "${common[@]}" --out "$out/training_cost_120.json"
timeout "${PHASE4_S:-80}" "$py" "$here/training_cost.py" --atoms 1000 --schemes E-F "E-F-HVP random K=1" \
    "${common[@]}" --out "$out/training_cost_1000.json"
