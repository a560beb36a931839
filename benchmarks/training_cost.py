"""Cost of one jitted training step for E-F, E-F-HVP (one-hot / random, K = 1, 4) and E-F-H vs atoms.

    python benchmarks/training_cost.py --atoms 5 14 30 60 120 250 --out benchmarks/results/cpu.json
    python benchmarks/training_cost.py --atoms 14 --repeats 50          # re-measure one size

Each (scheme, size) runs in its own subprocess, so peak RSS is that configuration's alone and an
out-of-memory failure (address space capped by --mem-limit-gb) is recorded, not fatal. Geometries
are synthetic: C/H/N/O atoms packed at 0.1 atoms/A^3 (organic-molecule density) with >= 1 A
separations; labels are zeros (timings need no DFT). Records: scheme, n_atoms, num_probes,
batch_size, step_time_s (median after warm-up), compile_time_s, n_compiles, peak_bytes (XLA memory
analysis: arguments + outputs + temporaries), peak_rss_bytes, and, for E-F-H,
time per Hessian column. Prints a table with HVP/E-F and E-F-H/HVP ratios and draws a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SCHEMES = [  # (label, --probe, K)
    ("E-F", "none", 0),
    ("E-F-HVP one-hot K=1", "onehot", 1),
    ("E-F-HVP random K=1", "random", 1),
    ("E-F-HVP one-hot K=4", "onehot", 4),
    ("E-F-HVP random K=4", "random", 4),
    ("E-F-H", "full", 0),
]


def synthetic_molecule(n_atoms: int, seed: int):
    """C/H/N/O atoms at 0.1 atoms/A^3 with minimum separation 1 A, hydrogen-rich like organics."""
    import numpy as np

    from phljax.data import Molecule

    rng = np.random.default_rng(seed)
    radius = (3 * n_atoms / (4 * np.pi * 0.1)) ** (1 / 3)
    positions = []
    while len(positions) < n_atoms:
        p = rng.uniform(-radius, radius, 3)
        if np.linalg.norm(p) <= radius and all(np.linalg.norm(p - q) >= 1.0 for q in positions):
            positions.append(p)
    numbers = rng.choice([1, 6, 7, 8], size=n_atoms, p=[0.5, 0.3, 0.1, 0.1])
    n = n_atoms
    return Molecule(
        numbers=numbers,
        positions=np.array(positions),
        energy=0.0,
        forces=np.zeros((n, 3)),
        hessian=np.zeros((n, 3, n, 3)),
    )


def measure(
    probe: str,
    num_probes: int,
    n_atoms: int,
    batch_size: int,
    repeats: int,
    channels: int,
    lmax: int,
    layers: int,
    chunk: int | None,
) -> dict:
    """Compile and time one train step (in this process)."""
    import resource
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np

    from phljax import data as phdata
    from phljax.losses import LossConfig
    from phljax.models import build_model, init_params, make_energy_fn
    from phljax.train import make_optimizer, make_train_step
    from phljax.train.step import TrainState

    cutoff = 5.0
    mols = [synthetic_molecule(n_atoms, seed) for seed in range(batch_size)]
    loss_config = LossConfig(probe=probe, num_probes=max(num_probes, 1))
    budget = phdata.budget_for(mols, batch_size, cutoff, with_hessian=loss_config.needs_hessian)
    batch = jax.tree.map(jnp.asarray, phdata.make_batch(mols, budget, cutoff))
    model = build_model(
        channels=channels,
        lmax=lmax,
        num_layers=layers,
        cutoff=cutoff,
        avg_num_neighbors=phdata.mean_neighbors(mols, cutoff),
    )
    params = init_params(model, batch, jax.random.PRNGKey(0))
    optimizer = make_optimizer(1e-3)
    state = TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32), jax.random.PRNGKey(1))
    traces = 0

    def step(state, batch, monitor):
        nonlocal traces
        traces += 1
        return make_train_step(make_energy_fn(model), loss_config, optimizer, hessian_chunk=chunk)(
            state, batch, monitor
        )

    jitted = jax.jit(step)
    monitor = jnp.asarray(1.0)
    t0 = time.perf_counter()
    compiled = jitted.lower(state, batch, monitor).compile()
    compile_time = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    peak_bytes = None
    if mem is not None:
        peak_bytes = int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes)
    for _ in range(2):  # warm-up
        state, _ = jitted(state, batch, monitor)
    jax.block_until_ready(state)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        state, _ = jitted(state, batch, monitor)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step_time = float(np.median(times))
    record = {
        "n_atoms": n_atoms,
        "batch_size": batch_size,
        "num_probes": num_probes,
        "step_time_s": step_time,
        "compile_time_s": compile_time,
        "n_compiles": traces,
        "peak_bytes": peak_bytes,
        "peak_rss_bytes": int(rss),
        "n_params": int(sum(x.size for x in jax.tree.leaves(params))),
        "device": str(jax.devices()[0].device_kind),
    }
    if probe == "full":
        record["hessian_columns"] = 3 * n_atoms
        record["time_per_hessian_column_s"] = step_time / (3 * n_atoms)
    return record


def run_one(label, probe, k, n, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        probe,
        str(k),
        str(n),
        "--batch-size",
        str(batch_for(n, args)),
        "--repeats",
        str(args.repeats),
        "--channels",
        str(args.channels),
        "--lmax",
        str(args.lmax),
        "--num-layers",
        str(args.num_layers),
        "--mem-limit-gb",
        str(args.mem_limit_gb),
    ]
    if args.hessian_chunk:
        cmd += ["--hessian-chunk", str(args.hessian_chunk)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"scheme": label, "n_atoms": n, "num_probes": k, "error": f"timeout after {args.timeout} s"}
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["?"]
        return {"scheme": label, "n_atoms": n, "num_probes": k, "error": tail[0][:300]}
    return {"scheme": label, **json.loads(lines[-1])}


def batch_for(n: int, args) -> int:
    return args.batch_size if n <= args.large else 1


def table(records: list[dict]) -> str:
    by = {(r["scheme"], r["n_atoms"]): r for r in records}
    sizes = sorted({r["n_atoms"] for r in records})
    lines = [
        "| atoms | scheme | step (ms) | compile (s) | XLA peak (MB) | RSS (MB) | vs E-F | E-F-H / this |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in sizes:
        ef, full = by.get(("E-F", n)), by.get(("E-F-H", n))
        for label, _, _ in SCHEMES:
            r = by.get((label, n))
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {n} | {label} | {r['error']} | | | | | |")
                continue
            t = r["step_time_s"]
            vs_ef = f"{t / ef['step_time_s']:.2f}x" if ef and "error" not in ef else ""
            vs_full = f"{full['step_time_s'] / t:.1f}x" if full and "error" not in full else ""
            peak = f"{r['peak_bytes'] / 2**20:.0f}" if r.get("peak_bytes") else ""
            lines.append(
                f"| {n} | {label} | {1e3 * t:.2f} | {r['compile_time_s']:.1f} | {peak} | "
                f"{r['peak_rss_bytes'] / 2**20:.0f} | {vs_ef} | {vs_full} |"
            )
    return "\n".join(lines)


def plot(records: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, _, _ in SCHEMES:
        rs = sorted((r for r in records if r["scheme"] == label and "error" not in r), key=lambda r: r["n_atoms"])
        if not rs:
            continue
        x = [r["n_atoms"] for r in rs]
        ax1.plot(x, [r["step_time_s"] / r["batch_size"] for r in rs], "o-", label=label)
        ax2.plot(x, [(r["peak_bytes"] or r["peak_rss_bytes"]) / 2**20 for r in rs], "o-", label=label)
    for ax, ylabel in ((ax1, "train step time per molecule (s)"), (ax2, "XLA peak memory (MB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("atoms per molecule")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--atoms", type=int, nargs="+", default=[5, 14, 30, 60, 120, 250])
    p.add_argument("--schemes", nargs="+", default=[s[0] for s in SCHEMES], help="labels to run")
    p.add_argument("--out", default="benchmarks/results/training_cost.json")
    p.add_argument("--batch-size", type=int, default=8, help="molecules per step up to --large atoms")
    p.add_argument("--large", type=int, default=100, help="beyond this many atoms, one molecule per step")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--lmax", type=int, default=2)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--hessian-chunk", type=int, default=0, help="E-F-H columns per HVP batch (0: all)")
    p.add_argument("--mem-limit-gb", type=float, default=20.0)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per configuration")
    p.add_argument("--worker", nargs=3, metavar=("PROBE", "K", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        import resource

        limit = int(args.mem_limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        probe, k, n = args.worker[0], int(args.worker[1]), int(args.worker[2])
        record = measure(
            probe,
            k,
            n,
            args.batch_size,
            args.repeats,
            args.channels,
            args.lmax,
            args.num_layers,
            args.hessian_chunk or None,
        )
        print(json.dumps(record))
        return

    records = []
    for n in args.atoms:
        for label, probe, k in SCHEMES:
            if label not in args.schemes:
                continue
            r = run_one(label, probe, k, n, args)
            records.append(r)
            status = r.get("error") or f"{1e3 * r['step_time_s']:.2f} ms, compile {r['compile_time_s']:.1f} s"
            print(f"{n:>5} atoms  {label:<22} {status}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(records, f, indent=2)
    plot(records, os.path.splitext(args.out)[0] + ".png")
    print()
    print(table(records))
    print(f"\nwrote {args.out} and {os.path.splitext(args.out)[0]}.png")


if __name__ == "__main__":
    main()
