"""Test-set errors: energy, force and Hessian MAE/RMSE, in eV-based and kcal/mol-based units."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np

from phljax import units
from phljax.data.batching import BatchBudget, iterate_batches
from phljax.data.records import Molecule

__all__ = ["accumulate_errors", "format_table", "UNITS"]

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
            lines.append(
                f"{subset:<14}{q:<9}{mae:>11.4g}{rmse:>11.4g}  {ev_unit:<13}{mae * k:>11.4g}{rmse * k:>11.4g}  {kcal_unit}"
            )
    if epoch_time is not None:
        lines.append(f"mean epoch time: {epoch_time:.3f} s")
    return "\n".join(lines)
