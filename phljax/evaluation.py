"""Test-set errors: energy, force and Hessian MAE/RMSE, in eV-based and kcal/mol-based units."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np

from phljax import units
from phljax.data.batching import BatchBudget, iterate_batches
from phljax.data.records import Molecule

__all__ = ["accumulate_errors", "evaluate_checkpoint", "format_table", "UNITS"]

# quantity -> (eV-based unit, kcal/mol-based unit)
UNITS = {
    "energy": ("eV", "kcal/mol"),
    "forces": ("eV/A", "kcal/mol/A"),
    "hessian": ("eV/A^2", "kcal/mol/A^2"),
}


def accumulate_errors(
    eval_step: Callable,
    params,
    molecules: Sequence[Molecule],
    budget: BatchBudget,
    cutoff: float,
    dtype=np.float32,
) -> dict[str, float]:
    """MAE and RMSE over `molecules` (eV units): {'energy_mae': ..., 'forces_rmse': ..., 'n_molecules': ...}."""
    sums: dict[str, float] = {}
    for batch in iterate_batches(molecules, budget, cutoff, dtype=dtype):
        out = jax.device_get(eval_step(params, batch))
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    result = {"n_molecules": len(molecules)}
    for q in UNITS:
        n = sums.get(f"{q}_n", 0.0)
        if n > 0:
            result[f"{q}_mae"] = sums[f"{q}_abs"] / n
            result[f"{q}_rmse"] = float(np.sqrt(sums[f"{q}_sq"] / n))
    return result


def format_table(results: dict[str, dict], epoch_time: float | None = None) -> str:
    """A text table of MAE/RMSE per subset and quantity, in eV and kcal/mol units."""
    lines = [f"{'subset':<14}{'quantity':<9}{'MAE':>11}{'RMSE':>11}  {'unit':<13}{'MAE':>11}{'RMSE':>11}  unit"]
    for subset, r in results.items():
        for q, (ev_unit, kcal_unit) in UNITS.items():
            if f"{q}_mae" not in r:
                continue
            mae, rmse = r[f"{q}_mae"], r[f"{q}_rmse"]
            k = 1.0 / units.KCAL_MOL
            ev = f"{mae:>11.4g}{rmse:>11.4g}  {ev_unit:<13}"
            lines.append(f"{subset:<14}{q:<9}{ev}{mae * k:>11.4g}{rmse * k:>11.4g}  {kcal_unit}")
    if epoch_time is not None:
        lines.append(f"mean epoch time: {epoch_time:.3f} s")
    return "\n".join(lines)


def evaluate_checkpoint(
    workdir: str,
    paths: Sequence[str],
    *,
    energy_unit: str | None = None,
    length_unit: str | None = None,
    batch_size: int = 16,
    hessian_chunk: int | None = None,
) -> dict[str, dict]:
    """Errors of the best checkpoint in `workdir` on HDF5 files of the ANI layout.

    Rebuilds the model from `<workdir>/model.json` and `config.json`; reports each file, and each
    `category` within a file when the records carry several.
    """
    import json
    import os

    import jax.numpy as jnp

    from phljax.checkpoint import Checkpointer
    from phljax.config import Config
    from phljax.data.batching import budget_for
    from phljax.data.prepare import check_elements, load
    from phljax.models import build_model, make_energy_fn
    from phljax.train.step import make_eval_step

    with open(os.path.join(workdir, "config.json")) as f:
        config = Config.from_json(f.read())
    with open(os.path.join(workdir, "model.json")) as f:
        spec = json.load(f)
    if config.x64:
        jax.config.update("jax_enable_x64", True)
    model = build_model(**spec)
    ckpt = Checkpointer(workdir)
    params = jax.tree.map(jnp.asarray, ckpt.best_params())
    ckpt.close()
    dtype = np.float64 if config.x64 else np.float32
    results = {}
    for path in paths:
        molecules = load([path], energy_unit=energy_unit, length_unit=length_unit)
        check_elements(molecules, spec["elements"])
        with_hessian = all(m.hessian is not None for m in molecules)
        budget = budget_for(molecules, batch_size, model.cutoff, with_hessian=with_hessian)
        step = jax.jit(make_eval_step(make_energy_fn(model), with_hessian=with_hessian, hessian_chunk=hessian_chunk))
        name = os.path.basename(path)
        results[name] = accumulate_errors(step, params, molecules, budget, model.cutoff, dtype)
        categories = sorted({str(m.meta["category"]) for m in molecules if "category" in m.meta})
        if len(categories) > 1:
            for c in categories:
                subset = [m for m in molecules if str(m.meta.get("category")) == c]
                results[f"{name}/{c}"] = accumulate_errors(step, params, subset, budget, model.cutoff, dtype)
    return results
