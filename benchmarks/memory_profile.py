"""Where the HVP step's memory goes: XLA temporaries of each derivative level, one compile each.

    python benchmarks/memory_profile.py --atoms 14 --batch-size 8

Prints a Markdown table of `compiled.memory_analysis().temp_size_in_bytes` (MB) for the energy,
energy + forces, energy + forces + one HVP (no parameter gradient), and the parameter gradient of
the energy, of the E-F loss and of the E-F-HVP (random, K = 1) loss, on the synthetic molecules of
training_cost.py with phljax's default model. Needs no timing, so a loaded machine is fine.
"""

from __future__ import annotations

import argparse


def profile(n_atoms: int, batch_size: int) -> list[tuple[str, float]]:
    """(pass, XLA temp MB) rows."""
    import jax
    import training_cost

    from phljax import derivatives, losses
    from phljax.models import make_energy_fn

    _, batch, model, params, cfg = training_cost.setup("random", 1, n_atoms, batch_size, {})
    energy_fn = make_energy_fn(model)
    v = jax.random.normal(jax.random.PRNGKey(0), (1, *batch.positions.shape))  # [K=1, N, 3]

    def total(p, r):  # eV, summed over the batch
        return energy_fn(p, batch._replace(positions=r)).sum()

    ef_loss = losses.make_loss_fn(energy_fn, losses.LossConfig(probe="none"))
    hvp_loss = losses.make_loss_fn(energy_fn, cfg)
    key = jax.random.PRNGKey(1)
    passes = {
        "energy": lambda p: total(p, batch.positions),
        "energy + forces": lambda p: jax.value_and_grad(total, argnums=1)(p, batch.positions),
        "energy + forces + HVP": lambda p: derivatives.value_grad_and_hvp(lambda r: total(p, r), batch.positions, v),
        "parameter gradient of the energy": lambda p: jax.grad(total)(p, batch.positions),
        "parameter gradient of the E-F loss": lambda p: jax.grad(ef_loss, has_aux=True)(p, batch, key),
        "parameter gradient of the E-F-HVP loss": lambda p: jax.grad(hvp_loss, has_aux=True)(p, batch, key),
    }
    rows = []
    for name, fn in passes.items():
        mem = jax.jit(fn).lower(params).compile().memory_analysis()
        rows.append((name, mem.temp_size_in_bytes / 2**20))
        print(f"| {name} | {rows[-1][1]:.1f} |", flush=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--atoms", type=int, default=14)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)
    print(f"{args.atoms} atoms x {args.batch_size} molecules\n\n| pass | XLA temporaries (MB) |\n|---|---|")
    profile(args.atoms, args.batch_size)


if __name__ == "__main__":
    main()
