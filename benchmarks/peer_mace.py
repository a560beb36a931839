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
phljax's 16.7k). Both use float32 and, on this CPU, the same number of threads. Each framework runs
in its own subprocess. The JSON holds one record per (framework, task, size) with step_time_s
(median), and the ratios phljax / MACE are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

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


def measure_mace(n_atoms: int, batch_size: int, repeats: int, time_budget: float, device: str = "cpu") -> list[dict]:
    """Time MACE's three training steps and its Hessian inference at one size (this process), on a
    torch `device` ("cpu" or "cuda"; every timed call ends with a synchronisation)."""
    import time

    import mace  # noqa: F401
    import numpy as np
    import torch
    from mace.calculators import MACECalculator

    from phljax import data as phdata

    cutoff = 5.0
    mols = [training_cost.synthetic_molecule(n_atoms, seed) for seed in range(batch_size)]
    torch.manual_seed(0)
    model = build_mace(cutoff, phdata.mean_neighbors(mols, cutoff)).to(device)
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
        out = model(data, training=True, compute_force=True)
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

    records = []
    for scheme in TASKS[:3]:
        if training_cost.time_calls(lambda s=scheme: step(s), 1, 0.0)[0] < 2.0:  # warm-up
            step(scheme)
        times = training_cost.time_calls(lambda s=scheme: step(s), repeats, time_budget)
        records.append(dict(task=scheme, step_times_s=times, step_time_s=float(np.median(times))))

    calc = MACECalculator(models=build_mace(cutoff).eval(), device=device, default_dtype="float32")
    import ase

    atoms = ase.Atoms(numbers=mols[0].numbers, positions=mols[0].positions)
    t0 = time.perf_counter()
    hessian = calc.get_hessian(atoms)
    first_call = time.perf_counter() - t0
    assert hessian.size == (3 * n_atoms) ** 2, hessian.shape
    times = training_cost.time_calls(lambda: calc.get_hessian(atoms), repeats, time_budget)
    records.append(dict(task="Hessian inference", first_call_s=first_call, step_times_s=times))
    records[-1]["step_time_s"] = float(np.median(times))
    for r in records:
        r.update(
            framework="mace-torch", n_atoms=n_atoms, n_params=n_params, threads=torch.get_num_threads(), device=device
        )
        r["batch_size"] = 1 if r["task"] == "Hessian inference" else batch_size
    return records


def measure_phljax_hessian(n_atoms: int, repeats: int, time_budget: float, chunk: int | None) -> dict:
    """Jitted `phljax.hessian` of one molecule (the fastest chunk is chosen by the caller)."""
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np

    import phljax

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
    times = training_cost.time_calls(
        lambda: jax.block_until_ready(compiled(params, batch, positions)), repeats, time_budget
    )
    return dict(
        framework="phljax",
        task="Hessian inference",
        n_atoms=n_atoms,
        batch_size=1,
        hessian_chunk=chunk or 3 * n_atoms,
        compile_time_s=compile_time,
        step_times_s=times,
        step_time_s=float(np.median(times)),
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--atoms", type=int, nargs="+", default=[12, 24])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--time-budget", type=float, default=60.0)
    p.add_argument("--hessian-chunks", type=int, nargs="+", default=[0, 12])
    p.add_argument("--out", default="benchmarks/results/peer_mace.json")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--device", default="cpu", help='torch device of MACE ("cuda" on a GPU; phljax uses JAX\'s default)')
    p.add_argument("--mem-limit-gb", type=float, default=20.0, help="address-space cap of phljax workers (0: none)")
    p.add_argument("--worker", nargs=2, metavar=("WHAT", "N"), help=argparse.SUPPRESS)
    p.add_argument("--chunk", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        what, n = args.worker[0], int(args.worker[1])
        if what == "mace":
            out = measure_mace(n, args.batch_size, args.repeats, args.time_budget, args.device)
        else:
            out = measure_phljax_hessian(n, args.repeats, args.time_budget, args.chunk or None)
        print(json.dumps(out))
        return

    bench = training_cost.default_args(
        batch_size=args.batch_size,
        large=10**9,  # the same batch at every size, as MACE gets
        repeats=args.repeats,
        time_budget=args.time_budget,
        mem_limit_gb=args.mem_limit_gb,
        hessian_chunks=args.hessian_chunks,
        timeout=args.timeout,
    )
    records = []
    me = [sys.executable, os.path.abspath(__file__), "--batch-size", str(args.batch_size), "--repeats",
          str(args.repeats), "--time-budget", str(args.time_budget), "--device", args.device]  # fmt: skip
    for n in args.atoms:
        for label, probe, k in training_cost.SCHEMES:
            if label in TASKS:
                r = training_cost.run_one(label, probe, k, n, bench)
                records.append({"framework": "phljax", "task": label, **r})
        trials = [training_cost.run_worker(me + ["--worker", "phljax", str(n), "--chunk", str(c)], args.timeout)
                  for c in sorted({c if 0 < c < 3 * n else 0 for c in args.hessian_chunks})]  # fmt: skip
        ok = [t for t in trials if "error" not in t]
        best = min(ok, key=lambda t: t["step_time_s"]) if ok else {"error": trials[0]["error"]}
        records.append({"framework": "phljax", "task": "Hessian inference", "n_atoms": n, **best})
        mace_out = training_cost.run_worker(me + ["--worker", "mace", str(n)], args.timeout)
        if isinstance(mace_out, dict):  # an error
            records += [{"framework": "mace-torch", "task": t, "n_atoms": n, **mace_out} for t in TASKS]
        else:
            records += mace_out
        for r in records[-8:]:
            status = r.get("error") or f"{1e3 * r['step_time_s']:.1f} ms"
            print(f"{n:>4} atoms  {r['framework']:<10} {r['task']:<20} {status}", flush=True)
        with open(args.out, "w") as f:
            json.dump(records, f, indent=2)
    print()
    print(table(records))
    print(f"\nwrote {args.out}")


def table(records: list[dict]) -> str:
    """Markdown: per size and task, phljax and MACE times and phljax / MACE."""
    by = {(r["framework"], r["task"], r["n_atoms"]): r for r in records}
    lines = [
        "| atoms | task | phljax (ms) | MACE (ms) | phljax / MACE |",
        "|---|---|---|---|---|",
    ]
    for n in sorted({r["n_atoms"] for r in records}):
        for task in TASKS:
            a, b = by.get(("phljax", task, n), {}), by.get(("mace-torch", task, n), {})
            ta, tb = a.get("step_time_s"), b.get("step_time_s")
            fa = f"{1e3 * ta:.1f}" if ta else a.get("error", "")[:60]
            fb = f"{1e3 * tb:.1f}" if tb else b.get("error", "")[:60]
            ratio = f"{ta / tb:.3f}x" if ta and tb else ""
            lines.append(f"| {n} | {task} | {fa} | {fb} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
