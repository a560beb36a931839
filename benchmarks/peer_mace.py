"""phljax against MACE (mace-torch): E-F, E-F-HVP and E-F-H training steps and Hessian inference.

    pip install "torch==2.13.0+cpu" && pip install -e ".[bench]"     # CPU torch first, then mace-torch
    python benchmarks/peer_mace.py --atoms 12 24 --out benchmarks/results/peer_mace.json

What a PyTorch user would write, on the same synthetic molecules (benchmarks/training_cost.py) and
batch as phljax:

- E-F: MACE's forward with `training=True` (forces by autograd with `create_graph=True`), loss,
  backward, AdamW step;
- E-F-HVP: plus `torch.autograd.grad(forces, positions, grad_outputs=v, create_graph=True)` for one
  Gaussian probe per molecule (as the paper's code and hippynn do);
- E-F-H: plus Hessian rows by the same call with unit `grad_outputs`, `create_graph=True`, one row
  per call: 3A calls, A = atoms per molecule, each row spanning every molecule of the batch (the
  batch Hessian is block diagonal: the same trick as phljax's `block_hessian`, so MACE's loop is
  3A long, not 3 x batch atoms);
- Hessian inference: `MACECalculator.get_hessian(atoms)` on one molecule (MACE's own helper).

The MACE is sized to phljax's default model (16 channels of l = 0, 1 features, l <= 2 spherical
harmonics, 2 interactions, correlation 3, radial MLP [32, 32], 5 A cutoff: 17.8k parameters against
phljax's 16.7k). Both use float32. Timing follows benchmarks/hygiene.py: each phljax step (and
phljax's Hessian) and the MACE model (eager, and with --torch-compile also `torch.compile`d) live
in persistent worker processes pinned to the same CPUs (torch.set_num_threads = XLA's pool = the
CPUs), all compiled or warmed first; then interleaved rounds time every (framework, task) in turn,
so both frameworks see the same machine. The JSON holds one record per (framework, task, size)
with step_time_s (median of round medians), round_medians_s and the load before and after; the
table gives phljax / MACE as the median of per-round ratios with its interquartile range. A MACE
task that torch cannot run (e.g. double backward through `torch.compile`) is recorded as an error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import hygiene  # sibling module: interleaved timing, pinned threads, load marking
import training_cost  # sibling script (python puts the script's folder on sys.path): synthetic molecules, workers

ELEMENTS = [1, 6, 7, 8]
TASKS = ("E-F", "E-F-HVP random K=1", "E-F-H", "Hessian inference")


def build_mace(cutoff: float = 5.0, avg_num_neighbors: float = 8.0):
    """A MACE of phljax's default size (~17.8k parameters), float32."""
    import mace  # noqa: F401  (import mace before e3nn)
    import numpy as np
    import torch
    from e3nn import o3
    from mace import modules

    torch.set_default_dtype(torch.float32)
    block = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
    return modules.MACE(
        r_max=cutoff,
        num_bessel=8,
        num_polynomial_cutoff=5,
        max_ell=2,
        interaction_cls=block,
        interaction_cls_first=block,
        num_interactions=2,
        num_elements=len(ELEMENTS),
        hidden_irreps=o3.Irreps("16x0e+16x1o"),
        MLP_irreps=o3.Irreps("16x0e"),
        atomic_energies=np.zeros(len(ELEMENTS)),
        avg_num_neighbors=avg_num_neighbors,
        atomic_numbers=ELEMENTS,
        correlation=3,
        gate=torch.nn.functional.silu,
        radial_MLP=[32, 32],
    )


def mace_batch(molecules, cutoff: float):
    """A torch_geometric batch of `Molecule` records (MACE's data path)."""
    import ase
    from mace import data as mace_data
    from mace.tools import torch_geometric, utils

    z_table = utils.AtomicNumberTable(ELEMENTS)
    graphs = []
    for m in molecules:
        config = mace_data.config_from_atoms(ase.Atoms(numbers=m.numbers, positions=m.positions))
        graphs.append(mace_data.AtomicData.from_config(config, z_table=z_table, cutoff=cutoff))
    loader = torch_geometric.dataloader.DataLoader(graphs, batch_size=len(graphs), shuffle=False)
    return next(iter(loader))


def serve_mace(
    n_atoms: int, batch_size: int, device: str = "cpu", compile_mode: str = "eager", only: tuple[str, ...] = TASKS
) -> None:
    """Serve MACE's three training steps and its Hessian inference at one size (`hygiene.serve`),
    on a torch `device` ("cpu" or "cuda"; every timed call ends with a synchronisation), threads
    pinned to the driver's CPUs. `compile_mode` "compile": the model through `torch.compile`
    (a task that fails to compile or run reports its error instead of times)."""
    import importlib.metadata
    import time

    import mace  # noqa: F401
    import torch
    from mace.calculators import MACECalculator

    from phljax import data as phdata

    pinned = hygiene.pin()
    torch.set_num_threads(len(pinned["cpus"]))

    cutoff = 5.0
    mols = [training_cost.synthetic_molecule(n_atoms, seed) for seed in range(batch_size)]
    torch.manual_seed(0)
    model = build_mace(cutoff, phdata.mean_neighbors(mols, cutoff)).to(device)
    forward = torch.compile(model) if compile_mode == "compile" else model
    n_params = sum(p.numel() for p in model.parameters())
    batch = mace_batch(mols, cutoff).to(device)
    node_graph = batch["batch"]  # [n_nodes] molecule of each atom
    first = torch.zeros(batch_size + 1, dtype=torch.long, device=device)
    first[1:] = torch.cumsum(torch.bincount(node_graph, minlength=batch_size), 0)
    local = torch.arange(len(node_graph), device=device) - first[node_graph]  # [n_nodes] atom index in its molecule
    dof = 3.0 * (first[1:] - first[:-1]).float()  # [G] 3N
    e_ref = torch.zeros(batch_size, device=device)
    f_ref = torch.zeros(len(node_graph), 3, device=device)
    h_ref = torch.zeros(len(node_graph), 3, n_atoms, 3, device=device)  # local column form, as phljax
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def per_graph(x):  # [n_nodes, ...] -> [G]
        return torch.zeros(batch_size, device=device).index_add(0, node_graph, x.reshape(len(node_graph), -1).sum(-1))

    def step(scheme: str):
        optimizer.zero_grad(set_to_none=True)
        data = batch.to_dict()
        out = forward(data, training=True, compute_force=True)
        positions = data["positions"]  # requires_grad, set by MACE's forward
        e, f = out["energy"], out["forces"]
        loss = (e - e_ref) ** 2 / torch.sqrt(dof / 3) + 0.30 * per_graph((f - f_ref) ** 2) / dof
        if scheme == "E-F-HVP random K=1":
            v = torch.randn_like(positions)
            hv = -torch.autograd.grad(f, positions, grad_outputs=v, create_graph=True)[0]  # [n_nodes, 3] H v
            ref = torch.einsum(
                "nias,nas->ni", h_ref, v[first[node_graph][:, None] + torch.arange(n_atoms, device=device)]
            )
            loss = loss + 0.09 * per_graph((hv - ref) ** 2) / dof**2
        elif scheme == "E-F-H":
            err = 0.0
            for c in range(3 * n_atoms):  # row (a, j) of every molecule at once
                v = torch.zeros_like(positions)
                v[(local == c // 3), c % 3] = 1.0
                row = -torch.autograd.grad(f, positions, grad_outputs=v, create_graph=True)[0]  # [n_nodes, 3]
                err = err + per_graph((row - h_ref[:, :, c // 3, c % 3]) ** 2)
            loss = loss + 0.09 * err / dof**2
        loss.sum().div(batch_size).backward()
        optimizer.step()
        if device != "cpu":
            torch.cuda.synchronize()

    calc = MACECalculator(models=build_mace(cutoff).eval(), device=device, default_dtype="float32")
    import ase

    atoms = ase.Atoms(numbers=mols[0].numbers, positions=mols[0].positions)

    def hessian():
        h = calc.get_hessian(atoms)
        assert h.size == (3 * n_atoms) ** 2, h.shape

    tasks = {scheme: (lambda s=scheme: step(s)) for scheme in TASKS[:3]}
    tasks["Hessian inference"] = hessian
    tasks = {k: v for k, v in tasks.items() if k in only}
    info = {"framework": "mace-torch", "n_params": n_params, "threads": torch.get_num_threads(), "pin": pinned}
    info.update(
        device=device, torch=torch.__version__, mace=importlib.metadata.version("mace-torch"), compile_mode=compile_mode
    )
    first_call = {}
    for name, fn in tasks.items():  # first calls (torch.compile compiles here)
        t0 = time.perf_counter()
        try:
            fn()
            first_call[name] = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 (a task torch cannot run is recorded, the rest go on)
            first_call[name] = f"{type(e).__name__}: {str(e)[:200]}"
    info["first_call_s"] = first_call
    hygiene.serve({k: v for k, v in tasks.items() if not isinstance(first_call[k], str)}, info)


def serve_phljax_hessian(n_atoms: int, chunk: int | None) -> None:
    """Serve the jitted `phljax.hessian` of one molecule (`hygiene.serve`, task "Hessian inference")."""
    import time

    import jax
    import jax.numpy as jnp

    import phljax

    pinned = hygiene.pin()

    _, batch, model, params, _ = training_cost.setup("none", 0, n_atoms, 1, {})
    energy_fn = phljax.models.make_energy_fn(model)

    def hessian(params, batch, positions):  # positions [n_atoms, 3]: the real atoms only, 3N columns
        def energy(r):
            return energy_fn(params, batch._replace(positions=batch.positions.at[:n_atoms].set(r))).sum()

        return phljax.hessian(energy, positions, chunk_size=chunk)  # [n_atoms, 3, n_atoms, 3] eV/A^2

    positions = batch.positions[:n_atoms]
    jitted = jax.jit(hessian)
    t0 = time.perf_counter()
    compiled = jitted.lower(params, batch, positions).compile()
    compile_time = time.perf_counter() - t0
    h = jax.block_until_ready(compiled(params, batch, positions))
    assert h.shape == (n_atoms, 3, n_atoms, 3) and bool(jnp.all(jnp.isfinite(h)))
    info = dict(framework="phljax", hessian_chunk=chunk or 3 * n_atoms, compile_time_s=compile_time, pin=pinned)
    hygiene.serve({"Hessian inference": lambda: jax.block_until_ready(compiled(params, batch, positions))}, info)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--atoms", type=int, nargs="+", default=[12, 24])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=10, help="interleaved rounds (benchmarks/hygiene.py)")
    p.add_argument("--round-s", type=float, default=0.6, help="seconds of steps per task and round (>= 1 step)")
    p.add_argument("--hessian-chunk", type=int, default=0, help="phljax E-F-H / Hessian chunk (0: all columns)")
    p.add_argument("--torch-compile", action="store_true", help="also time MACE through torch.compile")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS, help="tasks to time (default: all)")
    p.add_argument("--out", default="benchmarks/results/peer_mace.json")
    p.add_argument("--device", default="cpu", help='torch device of MACE ("cuda" on a GPU; phljax uses JAX\'s default)')
    p.add_argument("--mem-limit-gb", type=float, default=20.0, help="address-space cap of phljax workers (0: none)")
    p.add_argument("--worker", nargs=2, metavar=("WHAT", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        what, n = args.worker[0], int(args.worker[1])
        if what in ("mace", "mace-compile"):
            mode = "compile" if what == "mace-compile" else "eager"
            serve_mace(n, args.batch_size, args.device, mode, tuple(args.tasks))
        else:
            serve_phljax_hessian(n, args.hessian_chunk or None)
        return

    bench = training_cost.default_args(
        batch_size=args.batch_size, large=10**9, mem_limit_gb=args.mem_limit_gb, hessian_chunks=[args.hessian_chunk]
    )  # the same batch at every size, as MACE gets
    me = [sys.executable, os.path.abspath(__file__), "--batch-size", str(args.batch_size), "--device", args.device,
          "--hessian-chunk", str(args.hessian_chunk), "--tasks", *args.tasks]  # fmt: skip
    records = []
    for n in args.atoms:
        workers, tasks, meta = {}, {}, {}  # label -> (worker, worker's task), (framework, task)
        try:
            for label, probe, k in training_cost.SCHEMES:
                if label in args.tasks:
                    cmd = training_cost._worker_cmd(probe, k, n, bench, args.hessian_chunk, mode="--serve")
                    workers[f"phljax {label}"] = hygiene.Worker(cmd, env=training_cost._env())
                    tasks[f"phljax {label}"] = (workers[f"phljax {label}"], "step")
                    meta[f"phljax {label}"] = ("phljax", label)
            if "Hessian inference" in args.tasks:
                cmd = me + ["--worker", "phljax", str(n)]
                w = workers["phljax Hessian"] = hygiene.Worker(cmd, env=training_cost._env())
                tasks["phljax Hessian inference"] = (w, "Hessian inference")
                meta["phljax Hessian inference"] = ("phljax", "Hessian inference")
            for mode in ["mace"] + (["mace-compile"] if args.torch_compile else []):
                w = workers[mode] = hygiene.Worker(me + ["--worker", mode, str(n)], env=training_cost._env())
                name = "MACE" if mode == "mace" else "MACE compiled"
                for task, first in w.info["first_call_s"].items():
                    if task not in args.tasks:
                        continue
                    if isinstance(first, str):
                        error = " ".join(first.split())  # one line
                        records.append({"framework": name, "task": task, "n_atoms": n, "error": error})
                    else:
                        tasks[f"{name} {task}"] = (w, task)
                        meta[f"{name} {task}"] = (name, task)
            timed = hygiene.interleave(tasks, None, rounds=args.rounds, round_s=args.round_s)
        finally:
            for w in workers.values():
                w.close()
        for label, (w, _) in tasks.items():
            framework, task = meta[label]
            rec = timed["labels"][label]
            info = {k: v for k, v in w.info.items() if k in ("n_params", "compile_time_s", "flops", "threads", "pin")}
            records.append(
                {"framework": framework, "task": task, "n_atoms": n, "batch_size": 1 if "Hessian" in task else
                 args.batch_size, **info, "step_time_s": rec["step_time_s"], "round_medians_s": rec["round_medians_s"],
                 "steps_per_round": timed["steps"][label], "load_before": timed["load_before"],
                 "load_after": timed["load_after"],
                 "foreign_cpu": timed["foreign_cpu"], "loaded": timed["loaded"]}
            )  # fmt: skip
            print(f"{n:>4} atoms  {framework:<14} {task:<20} {1e3 * rec['step_time_s']:.1f} ms", flush=True)
        with open(args.out, "w") as f:
            json.dump(records, f, indent=2)
    print()
    print(table(records))
    if any(r.get("loaded") for r in records):
        print("\nWARNING: timed on a loaded machine (see load_before / load_after)")
    print(f"\nwrote {args.out}")


def table(records: list[dict]) -> str:
    """Markdown: per size and task, phljax and MACE times and phljax / MACE (median of per-round
    ratios of one interleaved session, with its interquartile range)."""
    by = {(r["framework"], r["task"], r["n_atoms"]): r for r in records}
    peers = [f for f in ("MACE", "MACE compiled") if any(r["framework"] == f for r in records)]
    head = "| atoms | task | phljax (ms) | " + " | ".join(f"{f} (ms) | phljax / {f}" for f in peers) + " |"
    lines = [head, "|---|---|---|" + "---|---|" * len(peers)]
    for n in sorted({r["n_atoms"] for r in records}):
        for task in TASKS:
            a = by.get(("phljax", task, n), {})
            cells = [f"{1e3 * a['step_time_s']:.1f}" if "step_time_s" in a else a.get("error", "")[:60]]
            for f in peers:
                b = by.get((f, task, n), {})
                if "step_time_s" not in b:
                    cells += [b.get("error", "")[:60], ""]
                    continue
                r = hygiene.per_round_ratio(a, b) if "step_time_s" in a else None
                ratio = hygiene.ratio_text(r, 3)
                cells += [f"{1e3 * b['step_time_s']:.1f}", ratio]
            lines.append(f"| {n} | {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
