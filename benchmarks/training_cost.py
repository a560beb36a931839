"""Cost of one jitted training step for E-F, E-F-HVP (one-hot / random, K = 1, 4) and E-F-H vs atoms.

    python benchmarks/training_cost.py --atoms 5 14 30 60 120 250 --out benchmarks/results/training_cost.json
    python benchmarks/training_cost.py --atoms 14 --rounds 30 --out /tmp/14.json        # re-measure one size
    python benchmarks/training_cost.py --atoms 1000 --schemes E-F "E-F-HVP random K=1" --out big.json
    python benchmarks/training_cost.py --atoms 14 --flops-only --hessian-chunks 0 --out /tmp/flops.json  # no timing
    python benchmarks/training_cost.py --molecules pentacontane peg24 --compile-only --out real.json  # real molecules

Timing follows benchmarks/hygiene.py: at each size every scheme (and each E-F-H chunk size in
--hessian-chunks; the fastest is kept, every trial recorded) compiles in its own persistent worker
process (its own peak RSS; an out-of-memory kill fails that scheme only), threads pinned to the
same CPUs; then --rounds interleaved rounds time every scheme in turn, and each time ratio is the
median of the per-round ratios to E-F with its interquartile range. The load average before and
after is recorded (`hygiene.load_before/after`); `loaded` marks a record whose rounds saw other
processes use > 0.05 cores per core (`hygiene.foreign_cpu`). Geometries are
synthetic: C/H/N/O atoms packed in a sphere at 0.1 atoms/A^3 (organic-molecule density) with
>= 1 A separations; labels are zeros (timings need no DFT). With --molecules, the batch is instead
copies of a molecule of the scaling set (`phljax.datagen.scale`, its RDKit conformer; `scale`
extra), each record naming it. Up to --large atoms a step sees --batch-size molecules, beyond it one.

E-F-H is given its best shot: one shared forward pass, the 3A Hessian columns of the whole batch as
HVPs pushed through one linearisation, `chunk` columns at a time (0 = all 3A in one vmap).

Records (JSON list): scheme, n_atoms, num_probes, batch_size, step_time_s (median over rounds of
each round's median step), round_medians_s, ratio_to_ef (median, q25, q75, min, max of per-round
ratios), compile_time_s (cold, unless --compile-cache), n_compiles (traces of the step: 1 means one
compilation served every step), peak_bytes (XLA memory analysis: arguments + outputs +
temporaries), peak_rss_bytes, n_params, n_edges, flops and bytes_accessed (XLA's `cost_analysis()`
of the compiled step: its arithmetic and memory traffic, which machine load cannot move), hygiene
(load, pinned CPUs); E-F-H adds hessian_chunk, hessian_columns, time_per_hessian_column_s,
chunk_trials. Prints a table with the HVP/E-F, E-F-H/HVP and memory ratios, a FLOP table with the
FLOP ratios beside the time ratios, and draws a PNG beside the JSON. `--flops-only` and
`--compile-only` compile and count without timing (each scheme in its own process; fast and
load-independent); where the FLOPs go inside a step: benchmarks/flops.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable

import flops  # sibling module: the while-loop trips XLA's cost analysis leaves out
import hygiene  # sibling module (python puts the script's folder on sys.path): interleaved timing

SCHEMES = [  # (label, --probe, K)
    ("E-F", "none", 0),
    ("E-F-HVP one-hot K=1", "onehot", 1),
    ("E-F-HVP random K=1", "random", 1),
    ("E-F-HVP one-hot K=4", "onehot", 4),
    ("E-F-HVP random K=4", "random", 4),
    ("E-F-H", "full", 0),
]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DENSITY = 0.1  # atoms / A^3


def synthetic_molecule(n_atoms: int, seed: int):
    """A `Molecule` of `n_atoms` C/H/N/O atoms (H 50%, C 30%, N 10%, O 10%) at 0.1 atoms/A^3.

    Positions [n_atoms, 3] Angstrom, uniform in a sphere, pairwise >= 1 A apart; zero labels.
    """
    import numpy as np

    from phljax.data import Molecule

    rng = np.random.default_rng(seed)
    radius = (3 * n_atoms / (4 * np.pi * DENSITY)) ** (1 / 3)
    positions = np.zeros((0, 3))
    while len(positions) < n_atoms:
        p = rng.uniform(-radius, radius, (256, 3))
        p = p[np.linalg.norm(p, axis=1) <= radius]
        for q in p:  # accept one at a time so candidates also keep apart from each other
            if len(positions) == n_atoms:
                break
            if len(positions) == 0 or np.min(np.linalg.norm(positions - q, axis=1)) >= 1.0:
                positions = np.vstack([positions, q])
    numbers = rng.choice([1, 6, 7, 8], size=n_atoms, p=[0.5, 0.3, 0.1, 0.1])
    return Molecule(
        numbers=numbers,
        positions=positions,
        energy=0.0,
        forces=np.zeros((n_atoms, 3)),
        hessian=np.zeros((n_atoms, 3, n_atoms, 3), np.float32),
    )


def scale_molecule(name: str, seed: int):
    """A `Molecule` of the scaling set by name: its RDKit conformer (jittered by 0.01 A with `seed`),
    zero labels."""
    import numpy as np

    from phljax.data import Molecule
    from phljax.datagen import scale

    smiles = {m.name: m.smiles for m in scale.SCALE_MOLECULES}[name]
    numbers, positions = scale.conformer(smiles, 0, name)
    positions = positions + 0.01 * np.random.default_rng(seed).standard_normal(positions.shape)
    n = len(numbers)
    return Molecule(numbers, positions, 0.0, np.zeros((n, 3)), np.zeros((n, 3, n, 3), np.float32))


def molecule_atoms(name: str) -> int:
    from phljax.datagen import scale

    return scale.count_atoms({m.name: m.smiles for m in scale.SCALE_MOLECULES}[name])


def setup(probe: str, num_probes: int, n_atoms: int, batch_size: int, model_kwargs: dict, molecule: str | None = None):
    """Molecules, padded batch, model, parameters and loss config of one configuration (synthetic
    molecules of `n_atoms`, or copies of the scaling set's `molecule`)."""
    import jax
    import jax.numpy as jnp

    from phljax import data as phdata
    from phljax.losses import LossConfig
    from phljax.models import build_model, init_params

    cutoff = model_kwargs.get("cutoff", 5.0)
    mols = [
        scale_molecule(molecule, seed) if molecule else synthetic_molecule(n_atoms, seed) for seed in range(batch_size)
    ]
    loss_config = LossConfig(probe=probe, num_probes=max(num_probes, 1))
    budget = phdata.budget_for(mols, batch_size, cutoff, with_hessian=loss_config.needs_hessian)
    batch = jax.tree.map(jnp.asarray, phdata.make_batch(mols, budget, cutoff))
    model = build_model(avg_num_neighbors=phdata.mean_neighbors(mols, cutoff), **model_kwargs)
    params = init_params(model, batch, jax.random.PRNGKey(0))
    return mols, batch, model, params, loss_config


def time_calls(fn, repeats: int, budget_s: float) -> list[float]:
    """Wall times of `repeats` calls of `fn()` (each blocked until ready), stopping early once
    `budget_s` seconds are spent; at least one call."""
    import time

    times: list[float] = []
    while len(times) < repeats and (not times or sum(times) < budget_s):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def xla_peak_bytes(compiled) -> int | None:
    """Arguments + outputs + temporaries of a compiled executable (bytes), None if unknown."""
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    return int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes)


def xla_cost(compiled) -> dict:
    """XLA's cost analysis of a compiled executable: {"flops", "flops_xla", "bytes_accessed"}
    (None where unknown).

    `compiled.cost_analysis()` is a dict on some jax versions and a list of one dict (one per
    program) on others; a list of several is summed. It counts a while-loop body once: `flops`
    adds the other trips (`flops.loop_extra_flops`; a chunked E-F-H step's Hessian columns are such
    a loop), `flops_xla` is XLA's own number. `bytes_accessed` is XLA's (loop bodies once).
    """
    analysis = compiled.cost_analysis()
    if isinstance(analysis, dict):
        analysis = [analysis]
    out = {}
    for name, key in (("flops", "flops"), ("bytes_accessed", "bytes accessed")):
        values = [a[key] for a in analysis or [] if a and a.get(key) is not None]
        out[name] = float(sum(values)) if values else None
    out["flops_xla"] = out["flops"]
    text = compiled.as_text()
    if out["flops"] is not None and re.search(r"\swhile\(", text):
        out["flops"] += flops.loop_extra_flops(text)
    return out


def compile_step(
    probe: str,
    num_probes: int,
    n_atoms: int,
    batch_size: int,
    model_kwargs: dict,
    chunk: int | None,
    remat: str = "none",
    molecule: str | None = None,
):
    """The jitted train step of one configuration, compiled: (compiled, jitted, state, batch, monitor,
    traces, info). `traces()` counts traces of the step so far; info: n_edges, n_params, compile_time_s.

    `remat`: "none", or rematerialise the energy function under every derivative with
    `jax.checkpoint` ("full": save nothing; "dots": save matrix products without batch dims).
    """
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np

    from phljax.models import make_energy_fn
    from phljax.train import make_optimizer, make_train_step
    from phljax.train.step import TrainState

    _, batch, model, params, loss_config = setup(probe, num_probes, n_atoms, batch_size, model_kwargs, molecule)
    optimizer = make_optimizer(1e-3)
    state = TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32), jax.random.PRNGKey(1))
    energy_fn = make_energy_fn(model)
    if remat != "none":
        policy = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[remat]
        energy_fn = jax.checkpoint(energy_fn, policy=policy)
    train_step = make_train_step(energy_fn, loss_config, optimizer, hessian_chunk=chunk)
    traces = [0]

    def step(state, batch, monitor):
        traces[0] += 1
        return train_step(state, batch, monitor)

    jitted = jax.jit(step)
    monitor = jnp.asarray(1.0)
    t0 = time.perf_counter()
    compiled = jitted.lower(state, batch, monitor).compile()
    info = {
        "n_edges": int(np.sum(np.asarray(batch.edge_mask))),
        "n_params": int(sum(x.size for x in jax.tree.leaves(params))),
        "compile_time_s": time.perf_counter() - t0,
    }
    return compiled, jitted, state, batch, monitor, (lambda: traces[0]), info


def measure(
    probe: str,
    num_probes: int,
    n_atoms: int,
    batch_size: int,
    model_kwargs: dict,
    chunk: int | None,
    remat: str = "none",
    molecule: str | None = None,
) -> tuple[dict, Callable[[], None], Callable[[], int]]:
    """Compile one configuration's train step (AdamW update included) in this process.

    Returns (record, step, traces): the record holds what needs no timing (XLA memory and cost
    analysis, compile time, sizes); `step()` runs one step through `jax.jit` (so a retrace would
    be counted) and blocks until it is done; `traces()` counts traces so far. `remat`: see
    `compile_step`.
    """
    import jax

    compiled, jitted, state, batch, monitor, traces, info = compile_step(
        probe, num_probes, n_atoms, batch_size, model_kwargs, chunk, remat, molecule
    )
    record = {
        "n_atoms": n_atoms,
        "molecule": molecule,
        "batch_size": batch_size,
        "num_probes": num_probes,
        "n_edges": info["n_edges"],
        "compile_time_s": info["compile_time_s"],
        "peak_bytes": xla_peak_bytes(compiled),
        **xla_cost(compiled),
        "n_params": info["n_params"],
        "device": str(jax.devices()[0].device_kind),
        "remat": remat,
    }
    if probe == "full":
        record["hessian_columns"] = 3 * n_atoms
        record["hessian_chunk"] = chunk or 3 * n_atoms

    def step():
        nonlocal state
        state, _ = jitted(state, batch, monitor)
        jax.block_until_ready(state)

    return record, step, traces


def _worker_cmd(probe: str, k: int, n: int, args, chunk: int = 0, mode: str = "--worker") -> list[str]:
    """The command of a worker: `--worker` compiles and prints one record; `--serve` compiles and
    then serves timed steps (`hygiene.serve`)."""
    return [
        sys.executable,
        os.path.abspath(__file__),
        mode,
        probe,
        str(k),
        str(n),
        "--batch-size",
        str(batch_for(n, args)),
        "--channels",
        str(args.channels),
        "--lmax",
        str(args.lmax),
        "--num-layers",
        str(args.num_layers),
        "--mem-limit-gb",
        str(args.mem_limit_gb),
        "--hessian-chunks",
        str(chunk),
        "--remat",
        args.remat,
        "--compile-cache",
        args.compile_cache,
        *(["--molecule", args.molecule] if getattr(args, "molecule", None) else []),
    ]


def _env() -> dict[str, str]:
    """A worker's environment: threads pinned to this process's CPUs, the repo importable."""
    env = hygiene.pinned_env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
    return env


def run_worker(cmd: list[str], timeout: float) -> dict:
    """Run one compile-only worker subprocess; its last JSON line, or {'error': ...}."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    lines = [line for line in out.stdout.splitlines() if line.startswith(("{", "["))]
    if out.returncode != 0 or not lines:
        text = (out.stderr or out.stdout).strip().splitlines()
        err = [line for line in text if "Error" in line or "RESOURCE_EXHAUSTED" in line or "memory" in line.lower()]
        msg = (err or text or [f"exit code {out.returncode}"])[-1]
        if out.returncode < 0:
            msg = f"killed by signal {-out.returncode} (out of memory?) {msg}"
        return {"error": msg[:300]}
    return json.loads(lines[-1])


def compile_one(label: str, probe: str, k: int, n: int, args) -> dict:
    """Compile (no timing) one scheme at one size; E-F-H: every chunk in --hessian-chunks, the one
    with the fewest FLOPs (--flops-only) or the least XLA memory kept."""
    head = {"scheme": label, "n_atoms": n, "molecule": args.molecule, "num_probes": k, "batch_size": batch_for(n, args)}
    if probe != "full":
        return {**head, **run_worker(_worker_cmd(probe, k, n, args), args.timeout)}
    trials = {str(c or 3 * n): run_worker(_worker_cmd(probe, k, n, args, c), args.timeout) for c in _chunks(n, args)}
    ok = {c: r for c, r in trials.items() if "error" not in r}
    summary = {c: {k: r[k] for k in ("peak_bytes", "flops", "error") if k in r} for c, r in trials.items()}
    if not ok:
        return {**head, "error": "; ".join(f"chunk {c}: {r['error']}" for c, r in trials.items())}
    key = "flops" if args.flops_only else "peak_bytes"
    best = min(ok, key=lambda c: ok[c].get(key) or 0)
    return {**head, **ok[best], "chunk_trials": summary}


def _chunks(n: int, args) -> list[int]:
    """The distinct E-F-H chunk sizes to try at n atoms (0: all 3n columns at once)."""
    return sorted({c if 0 < c < 3 * n else 0 for c in args.hessian_chunks})


def time_size(n: int, args, log=print) -> list[dict]:
    """Every requested scheme at n atoms, timed interleaved (benchmarks/hygiene.py).

    Each scheme (each E-F-H chunk size) compiles in its own persistent worker, one after another;
    then the rounds run, E-F the reference. E-F-H's record is its fastest chunk, with every trial.
    A worker that fails (out of memory, ...) gives an error record and the rest go on.
    """
    configs = []  # (label, scheme, probe, k, chunk)
    for label, probe, k in SCHEMES:
        if label in args.schemes:
            chunks = _chunks(n, args) if probe == "full" else [0]
            for c in chunks:
                name = label if probe != "full" else f"E-F-H (chunk {c or 3 * n})"
                configs.append((name, label, probe, k, c))
    workers, records, failed = {}, {}, {}
    try:
        for name, _label, probe, k, c in configs:
            load = hygiene.load_state()
            try:
                w = hygiene.Worker(_worker_cmd(probe, k, n, args, c, mode="--serve"), env=_env())
            except hygiene.WorkerError as e:
                failed[name] = str(e)
                log(f"{n:>5} atoms  {name:<22} failed: {e}")
                continue
            workers[name] = w
            records[name] = {**w.info, "compile_load": load}
            log(f"{n:>5} atoms  {name:<22} compiled in {w.info['compile_time_s']:.1f} s, {_flops_text(w.info)}")
        base = "E-F" if "E-F" in workers else None
        timed = hygiene.interleave(
            {name: (w, "step") for name, w in workers.items()},
            base,
            rounds=args.rounds,
            round_s=args.round_s,
            max_steps=args.max_steps,
            log=log,
        )
        for name, w in workers.items():
            rec = timed["labels"][name]
            records[name].update(
                step_time_s=rec["step_time_s"],
                round_medians_s=rec["round_medians_s"],
                steps_per_round=timed["steps"][name],
                peak_rss_bytes=w.peak_rss_bytes,
                n_compiles=w.status.get("traces"),
                hygiene={k: timed[k] for k in ("load_before", "load_after", "foreign_cpu", "rounds", "round_s")}
                | {"pin": w.info["pin"]},
            )
            records[name]["loaded"] = timed["loaded"]
            if "ratio" in rec:
                records[name]["ratio_to_ef"] = rec["ratio"]
    finally:
        for w in workers.values():
            w.close()
    out = []
    for label, probe, k in SCHEMES:
        if label not in args.schemes:
            continue
        head = {
            "scheme": label,
            "n_atoms": n,
            "molecule": args.molecule,
            "num_probes": k,
            "batch_size": batch_for(n, args),
        }
        names = [c[0] for c in configs if c[1] == label]
        ok = [x for x in names if x in records]
        if not ok:
            out.append({**head, "error": "; ".join(failed[x] for x in names)})
            continue
        best = min(ok, key=lambda x: records[x]["step_time_s"])
        rec = {**head, **records[best]}
        if probe == "full":
            rec["time_per_hessian_column_s"] = rec["step_time_s"] / (3 * n)
            rec["chunk_trials"] = {
                x: ({"step_time_s": records[x]["step_time_s"], "peak_bytes": records[x]["peak_bytes"]}
                    if x in records else {"error": failed[x]})
                for x in names
            }  # fmt: skip
        out.append(rec)
    return out


def _save(records: list[dict], path: str) -> None:
    """Write what is measured so far (a kill keeps it)."""
    with open(path + ".tmp", "w") as f:
        json.dump(records, f, indent=2)
    os.replace(path + ".tmp", path)


def _ratio_text(r: dict | None) -> str:
    """The interleaved time ratio to E-F, '2.31x [2.20-2.40]' (median of per-round ratios, IQR)."""
    return hygiene.ratio_text((r or {}).get("ratio_to_ef"))


def _time_ratio(num: dict | None, den: dict | None, minus: dict | None = None, scale: float = 1.0, digits=2) -> str:
    """(num - minus) / scale / den in step time: the median of per-round ratios with its IQR when the
    records come from one interleaved session, else the ratio of medians (older records)."""
    if not (_ok(num) and _ok(den) and (minus is None or _ok(minus))):
        return ""
    r = hygiene.per_round_ratio(num, den, minus, scale)
    if r is not None:
        return hygiene.ratio_text(r, digits)
    sub = minus["step_time_s"] if minus else 0.0
    return f"{(num['step_time_s'] - sub) / scale / den['step_time_s']:.{digits}f}x"


def batch_for(n: int, args) -> int:
    return args.batch_size if n <= args.large else 1


def _ok(r: dict | None) -> bool:
    return r is not None and "error" not in r and "step_time_s" in r


def table(records: list[dict]) -> str:
    """Markdown table: step time, compile time, compilations, memory and the ratios per size."""
    by = {(r["scheme"], r["n_atoms"]): r for r in records}
    sizes = sorted({r["n_atoms"] for r in records})
    lines = [
        "| atoms | batch | scheme | step (ms) | compile (s) | compiles | XLA peak (MB) | RSS (MB) "
        "| time / E-F | memory / E-F | E-F-H / this |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in sizes:
        ef, full = by.get(("E-F", n)), by.get(("E-F-H", n))
        for label, _, _ in SCHEMES:
            r = by.get((label, n))
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {n} | {r.get('batch_size', '')} | {label} | failed: {r['error'][:80]} | | | | | | | |")
                continue
            peak = f"{r['peak_bytes'] / 2**20:.1f}" if r.get("peak_bytes") else ""
            mem_ratio = ""
            if ef and ef.get("peak_bytes") and r.get("peak_bytes"):
                mem_ratio = f"{r['peak_bytes'] / ef['peak_bytes']:.2f}x"
            if "step_time_s" not in r:  # compile-only
                compile_s = f"{r['compile_time_s']:.1f}"
                lines.append(f"| {n} | {r['batch_size']} | {label} | | {compile_s} | | {peak} | | | {mem_ratio} | |")
                continue
            t = r["step_time_s"]
            vs_ef = _time_ratio(r, ef)
            vs_full = _time_ratio(full, r, digits=1)
            name = label + (f" (chunk {r['hessian_chunk']})" if "hessian_chunk" in r else "")
            lines.append(
                f"| {n} | {r['batch_size']} | {name} | {1e3 * t:.1f} | {r['compile_time_s']:.1f} | {r['n_compiles']} "
                f"| {peak} | {r['peak_rss_bytes'] / 2**20:.0f} | {vs_ef} | {mem_ratio} | {vs_full} |"
            )
    return "\n".join(lines)


def column_table(records: list[dict]) -> str:
    """E-F-H's cost per Hessian column against the extra cost of one HVP probe: K=1 over E-F, and
    one more probe of the K=4 path, (K=4 - K=1) / 3."""
    by = {(r["scheme"], r["n_atoms"]): r for r in records}
    lines = [
        "| atoms | E-F-H columns | E-F-H per column (ms) | HVP K=1 - E-F (ms) | (HVP K=4 - K=1) / 3 (ms) |",
        "|---|---|---|---|---|",
    ]
    for n in sorted({r["n_atoms"] for r in records}):
        full, ef = by.get(("E-F-H", n)), by.get(("E-F", n))
        h1, h4 = by.get(("E-F-HVP random K=1", n)), by.get(("E-F-HVP random K=4", n))
        if not (_ok(full) and _ok(ef)):
            continue
        col = (full["step_time_s"] - ef["step_time_s"]) / full["hessian_columns"]
        d1 = f"{1e3 * (h1['step_time_s'] - ef['step_time_s']):.1f}" if _ok(h1) else ""
        d4 = f"{1e3 * (h4['step_time_s'] - h1['step_time_s']) / 3:.1f}" if _ok(h4) and _ok(h1) else ""
        lines.append(f"| {n} | {full['hessian_columns']} | {1e3 * col:.1f} | {d1} | {d4} |")
    return "\n".join(lines)


def _flops_text(r: dict) -> str:
    gflop = f"{r['flops'] / 1e9:.3f} GFLOP" if r.get("flops") is not None else "? GFLOP"
    return f"{gflop}, XLA peak {(r.get('peak_bytes') or 0) / 2**20:.0f} MB"


def _ratio(a: float | None, b: float | None, digits: int = 2) -> str:
    return f"{a / b:.{digits}f}x" if a is not None and b else ""


def flop_table(records: list[dict]) -> str:
    """XLA's FLOPs and bytes accessed per step, their ratios to E-F, and the time ratio beside them."""
    by = {(r["scheme"], r["n_atoms"]): r for r in records}
    lines = [
        "| atoms | batch | scheme | GFLOP | GB accessed | FLOP / E-F | bytes / E-F | time / E-F |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in sorted({r["n_atoms"] for r in records}):
        ef = by.get(("E-F", n)) or {}
        for label, _, _ in SCHEMES:
            r = by.get((label, n))
            if r is None or "error" in r:
                continue
            flops, nbytes = r.get("flops"), r.get("bytes_accessed")
            time_ratio = _time_ratio(r, ef)
            name = label + (f" (chunk {r['hessian_chunk']})" if "hessian_chunk" in r else "")
            lines.append(
                f"| {n} | {r['batch_size']} | {name} | {'' if flops is None else f'{flops / 1e9:.3f}'} "
                f"| {'' if nbytes is None else f'{nbytes / 1e9:.3f}'} | {_ratio(flops, ef.get('flops'))} "
                f"| {_ratio(nbytes, ef.get('bytes_accessed'))} | {time_ratio} |"
            )
    return "\n".join(lines)


def _vs_ef(key: str, r: dict | None, ef: dict, base: dict | None = None) -> str:
    """r[key] / ef[key]; with `base`, the marginal probe (r[key] - base[key]) / 3 / ef[key] (K=4 against K=1)."""
    value, ref = (r or {}).get(key), ef.get(key)
    if value is None or not ref or (base is not None and base.get(key) is None):
        return ""
    return f"{(value - base[key]) / 3 / ref:.2f}x" if base is not None else f"{value / ref:.2f}x"


def flop_ratios(records: list[dict]) -> str:
    """The headline ratios, FLOPs beside time: HVP K=1 / E-F, the marginal probe ((K=4 - K=1) / 3) / E-F
    and E-F-H / E-F, for each probe kind and size that has the records."""
    by = {(r["scheme"], r["n_atoms"]): r for r in records if "error" not in r}
    lines = ["| atoms | ratio | FLOPs | time (median of rounds [IQR]) |", "|---|---|---|---|"]
    for n in sorted({r["n_atoms"] for r in records}):
        ef = by.get(("E-F", n))
        if not ef:
            continue
        for kind in ("random", "one-hot"):
            h1, h4 = by.get((f"E-F-HVP {kind} K=1", n)), by.get((f"E-F-HVP {kind} K=4", n))
            if h1:
                lines.append(f"| {n} | HVP {kind} K=1 / E-F | {_vs_ef('flops', h1, ef)} | {_time_ratio(h1, ef)} |")
            if h1 and h4:
                lines.append(
                    f"| {n} | marginal {kind} probe: (K=4 - K=1) / 3 / E-F | {_vs_ef('flops', h4, ef, h1)} "
                    f"| {_time_ratio(h4, ef, h1, 3.0)} |"
                )
        full = by.get(("E-F-H", n))
        if full:
            lines.append(f"| {n} | E-F-H / E-F | {_vs_ef('flops', full, ef)} | {_time_ratio(full, ef, digits=1)} |")
    return "\n".join(lines)


def throughput_table(records: list[dict]) -> str:
    """Molecules per second of training (batch size / median step time), one column per scheme."""
    by = {(r["scheme"], r["n_atoms"]): r for r in records}
    labels = [label for label, _, _ in SCHEMES if any(r["scheme"] == label for r in records)]
    lines = ["| atoms | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for n in sorted({r["n_atoms"] for r in records}):
        cells = []
        for label in labels:
            r = by.get((label, n))
            cells.append(
                f"{r['batch_size'] / r['step_time_s']:.1f}" if _ok(r) else ("failed" if r and "error" in r else "")
            )
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(records: list[dict], path: str) -> None:
    """Step time per molecule and XLA peak memory against atoms, log-log, one line per scheme."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, _, _ in SCHEMES:
        rs = sorted((r for r in records if r["scheme"] == label and "error" not in r), key=lambda r: r["n_atoms"])
        timed = [r for r in rs if "step_time_s" in r]
        if timed:
            ax1.plot(
                [r["n_atoms"] for r in timed], [r["step_time_s"] / r["batch_size"] for r in timed], "o-", label=label
            )
        mem = [r for r in rs if r.get("peak_bytes")]
        if mem:
            ax2.plot(
                [r["n_atoms"] for r in mem], [r["peak_bytes"] / r["batch_size"] / 2**20 for r in mem], "o-", label=label
            )
    for ax, ylabel in (
        (ax1, "train step time per molecule (s)"),
        (ax2, "XLA peak memory per molecule (MB)"),
    ):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("atoms per molecule")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=8)
    devices = sorted({r["device"] for r in records if r.get("device")}) or ["CPU"]
    fig.suptitle(f"phljax NequIP (16 ch, l<=2, 2 layers), one jitted AdamW step, {', '.join(devices)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--atoms", type=int, nargs="+", default=[5, 14, 30, 60, 120, 250])
    p.add_argument("--molecules", nargs="+", help="scaling-set molecules instead of synthetic ones (replaces --atoms)")
    p.add_argument("--molecule", help=argparse.SUPPRESS)  # a worker's molecule
    p.add_argument("--schemes", nargs="+", default=[s[0] for s in SCHEMES], help="labels to run")
    p.add_argument("--out", default="benchmarks/results/training_cost.json")
    p.add_argument("--batch-size", type=int, default=8, help="molecules per step up to --large atoms")
    p.add_argument("--large", type=int, default=100, help="beyond this many atoms, one molecule per step")
    p.add_argument("--rounds", type=int, default=12, help="interleaved timing rounds (benchmarks/hygiene.py)")
    p.add_argument("--round-s", type=float, default=0.6, help="seconds of steps per scheme and round (>= 1 step)")
    p.add_argument("--max-steps", type=int, default=10, help="at most this many steps per scheme and round")
    p.add_argument(
        "--compile-cache",
        default="off",
        help="JAX persistent compilation cache for the workers: off (default: compile times are real) or DIR",
    )
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--lmax", type=int, default=2)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument(
        "--hessian-chunks", type=int, nargs="+", default=[0, 12], help="E-F-H chunk sizes to try (0: all columns)"
    )
    p.add_argument(
        "--remat", choices=("none", "full", "dots"), default="none", help="jax.checkpoint the energy function"
    )
    p.add_argument("--compile-only", action="store_true", help="XLA memory analysis only (sizes that do not fit)")
    p.add_argument(
        "--flops-only",
        action="store_true",
        help="compile and count (XLA FLOPs, bytes, memory), no timing: fast and independent of machine load",
    )
    p.add_argument(
        "--mem-limit-gb", type=float, default=20.0, help="address-space cap of each worker (0: none, for GPUs)"
    )
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per configuration")
    p.add_argument("--from-json", nargs="+", metavar="FILE", help="merge these results (no measuring): table, plot")
    p.add_argument("--worker", nargs=3, metavar=("PROBE", "K", "N"), help=argparse.SUPPRESS)
    p.add_argument("--serve", nargs=3, metavar=("PROBE", "K", "N"), help=argparse.SUPPRESS)
    return p


def default_args(**overrides) -> argparse.Namespace:
    """The command line's defaults with `overrides` (flag names with underscores), for other
    benchmarks that call `run_one`; an unknown name is an error."""
    args = build_parser().parse_args([])
    unknown = set(overrides) - set(vars(args))
    if unknown:
        raise TypeError(f"training_cost has no options {sorted(unknown)}")
    return argparse.Namespace(**{**vars(args), **overrides})


def main(argv=None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    unknown = set(args.schemes) - {s[0] for s in SCHEMES}
    if unknown:
        p.error(f"unknown schemes {sorted(unknown)}; choose from {[s[0] for s in SCHEMES]}")

    if args.worker or args.serve:
        import resource

        if args.mem_limit_gb > 0:  # 0 on a GPU: CUDA reserves far more address space than it uses
            limit = int(args.mem_limit_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        pinned = hygiene.pin()
        if args.compile_cache != "off":
            from phljax.compile_cache import enable

            enable(args.compile_cache)
        probe, k, n = args.worker or args.serve
        model_kwargs = {"channels": args.channels, "lmax": args.lmax, "num_layers": args.num_layers}
        record, step, traces = measure(
            probe,
            int(k),
            int(n),
            args.batch_size,
            model_kwargs,
            args.hessian_chunks[0] or None,
            args.remat,
            args.molecule,
        )
        record["compile_cache"] = args.compile_cache
        if args.worker:
            print(json.dumps(record))
        else:
            hygiene.serve({"step": step}, {**record, "pin": pinned}, status=lambda: {"traces": traces()})
        return

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    records = []
    for path in args.from_json or []:
        with open(path) as f:
            records += json.load(f)
    sizes = [(molecule_atoms(m), m) for m in args.molecules] if args.molecules else [(n, None) for n in args.atoms]
    for n, molecule in [] if args.from_json else sizes:
        args.molecule = molecule  # the workers' --molecule
        if args.compile_only or args.flops_only:
            for label, probe, k in SCHEMES:
                if label in args.schemes:
                    r = compile_one(label, probe, k, n, args)
                    records.append(r)
                    print(f"{n:>5} atoms  {label:<22} {r.get('error') or 'compiled, ' + _flops_text(r)}", flush=True)
                    _save(records, args.out)
            continue
        for r in time_size(n, args, log=lambda m: print(m, flush=True)):
            records.append(r)
            status = r.get("error") or f"{1e3 * r['step_time_s']:.2f} ms, {_ratio_text(r)} E-F"
            print(f"{n:>5} atoms  {r['scheme']:<22} {status}", flush=True)
        _save(records, args.out)
    _save(records, args.out)
    if args.flops_only:
        print()
        print(flop_table(records))
        print()
        print(flop_ratios(records))
        print(f"\nwrote {args.out}")
        return
    plot(records, os.path.splitext(args.out)[0] + ".png")
    print()
    print(table(records))
    print()
    print(column_table(records))
    print()
    print(throughput_table(records))
    print()
    print(flop_table(records))
    print()
    print(flop_ratios(records))
    loaded = [r for r in records if r.get("loaded")]
    if loaded:
        print(f"\nWARNING: {len(loaded)} of {len(records)} records were timed on a loaded machine (see 'hygiene')")
    print(f"\nwrote {args.out} and {os.path.splitext(args.out)[0]}.png")


if __name__ == "__main__":
    main()
