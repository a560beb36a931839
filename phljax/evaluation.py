"""Test-set errors: energy, force and Hessian MAE/RMSE, in eV-based and kcal/mol-based units.

Owns its metric step (`make_eval_step`), the per-category subsets every report uses
(`test_subsets`) and the evaluation of a trained run's best checkpoint on HDF5 files
(`evaluate_workdir`, through `phljax.Potential`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from phljax import derivatives, units
from phljax.data.batching import BatchBudget, GraphBatch, budget_for, iterate_batches
from phljax.data.prepare import check_elements, load
from phljax.data.records import Molecule, formula
from phljax.models.energy import EnergyFn
from phljax.potential import Potential
from phljax.vibrations import harmonic_analysis

__all__ = [
    "UNITS",
    "CATEGORY_ORDER",
    "make_eval_step",
    "accumulate_errors",
    "relative_energy_errors",
    "test_subsets",
    "STATIONARY",
    "stationary_metrics",
    "stationary_rows",
    "reduce_stationary",
    "evaluate_molecules",
    "evaluate_workdir",
    "in_kcal_mol",
    "format_table",
]

# quantity -> (eV-based unit, kcal/mol-based unit)
UNITS = {
    "energy": ("eV", "kcal/mol"),
    "forces": ("eV/A", "kcal/mol/A"),
    "hessian": ("eV/A^2", "kcal/mol/A^2"),
}
#: The paper's test categories, in its order; any other category follows, alphabetically.
CATEGORY_ORDER = ("rtp", "irc", "nms")
#: Stationary points (`meta['point']`) -> the number of imaginary frequencies they have
STATIONARY = {"reactant": 0, "product": 0, "ts": 1}
# stationary-point metrics -> unit (not converted by `in_kcal_mol` unless the unit is eV-based)
STATIONARY_UNITS = {
    "frequency_mae_cm1": "cm^-1",
    "hessian_eigenvalue_mae": "eV/A^2",
    "stationary_index_correct": "fraction",
    "ts_imaginary_frequency_mae_cm1": "cm^-1",
}


def make_eval_step(energy_fn: EnergyFn, *, with_hessian: bool, hessian_chunk: int | None = None):
    """`eval_step(params, batch) -> sums` of absolute and squared errors and counts.

    Energy errors count molecules, force errors Cartesian components, Hessian errors entries of
    each molecule's [3N, 3N] Hessian (model Hessian from 3A HVPs of the batch). `energy_errors`
    [G] (eV, 0 on padding graphs) are the per-molecule energy errors, for `relative_energy_errors`.
    """

    def eval_step(params, batch: GraphBatch):
        e, g, blocks = derivatives.batch_derivatives(
            energy_fn, params, batch, hessian_blocks=with_hessian, chunk_size=hessian_chunk
        )
        gmask = batch.graph_mask.astype(e.dtype)
        nmask = batch.node_mask.astype(e.dtype)[:, None]
        de = (e - batch.energy) * gmask
        df = (-g - batch.forces) * nmask
        out = {
            "energy_abs": jnp.sum(jnp.abs(de)),
            "energy_sq": jnp.sum(de**2),
            "energy_n": jnp.sum(gmask),
            "energy_errors": de,
            "forces_abs": jnp.sum(jnp.abs(df)),
            "forces_sq": jnp.sum(df**2),
            "forces_n": 3 * jnp.sum(nmask),
        }
        if with_hessian:
            max_atoms = batch.graph_nodes.shape[1]
            real_col = jnp.arange(max_atoms)[None, :] < batch.n_atoms[batch.node_graph][:, None]  # [N, A]
            hmask = (real_col & batch.node_mask[:, None]).astype(e.dtype)[:, None, :, None]
            dh = (blocks - batch.hessian) * hmask
            out.update(
                hessian_abs=jnp.sum(jnp.abs(dh)),
                hessian_sq=jnp.sum(dh**2),
                hessian_n=9 * jnp.sum(hmask),
            )
        return out

    return eval_step


def relative_energy_errors(errors: np.ndarray, molecules: Sequence[Molecule]) -> dict[str, float]:
    """Energy MAE and RMSE after removing each chemical formula's mean error (eV).

    What energy differences between molecules of one formula see (barrier heights, reaction and
    conformer energies of isomerisations), and what stays meaningful when a formula's total energy
    is not fixed by the training data (`phljax.data.unidentified_formulas`). A formula with one
    molecule contributes a zero error; `n_energy_rel` counts the molecules of formulas with two or
    more, `n_formulas` the formulas.

    Args:
        errors: [len(molecules)] predicted minus reference energy, eV.
        molecules: the records (their `numbers` define the formula).
    """
    groups: dict[str, list[int]] = {}
    for i, m in enumerate(molecules):
        groups.setdefault(formula(m.numbers), []).append(i)
    centred = np.asarray(errors, float).copy()
    for members in groups.values():
        centred[members] -= centred[members].mean()
    return {
        "energy_rel_mae": float(np.mean(np.abs(centred))),
        "energy_rel_rmse": float(np.sqrt(np.mean(centred**2))),
        "n_energy_rel": sum(len(g) for g in groups.values() if len(g) > 1),
        "n_formulas": len(groups),
    }


def accumulate_errors(
    eval_step: Callable,
    params,
    molecules: Sequence[Molecule],
    budget: BatchBudget,
    cutoff: float,
    dtype=np.float32,
) -> dict[str, float]:
    """MAE and RMSE over `molecules` (eV units): {'energy_mae': ..., 'forces_rmse': ..., 'n_molecules': ...},
    and the per-formula relative energy errors of `relative_energy_errors` when `eval_step` returns
    `energy_errors`."""
    sums: dict[str, float] = {}
    per_molecule, have_errors = np.zeros(len(molecules)), False
    for batch in iterate_batches(molecules, budget, cutoff, dtype=dtype):
        out = jax.device_get(eval_step(params, batch))
        errors = out.pop("energy_errors", None)
        if errors is not None:
            have_errors = True
            per_molecule[batch.graph_index[batch.graph_mask]] = np.asarray(errors)[batch.graph_mask]
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    result = {"n_molecules": len(molecules)}
    for q in UNITS:
        n = sums.get(f"{q}_n", 0.0)
        if n > 0:
            result[f"{q}_mae"] = sums[f"{q}_abs"] / n
            result[f"{q}_rmse"] = float(np.sqrt(sums[f"{q}_sq"] / n))
    if have_errors:
        result.update(relative_energy_errors(per_molecule, molecules))
    return result


def _category_key(category: str) -> tuple[int, str]:
    order = {c: i for i, c in enumerate(CATEGORY_ORDER)}
    return order.get(category, len(order)), category


def test_subsets(molecules: Sequence[Molecule], name: str) -> dict[str, list[Molecule]]:
    """`{name: molecules, name/<category>: ...}`: the whole set, then one subset per category
    (`meta['category']`) when the records carry several, in the paper's order (rtp, irc, nms,
    then others alphabetically). Empty subsets are left out."""
    subsets = {name: list(molecules)} if molecules else {}
    categories = sorted({str(m.meta["category"]) for m in molecules if "category" in m.meta}, key=_category_key)
    if len(categories) > 1:
        for c in categories:
            subsets[f"{name}/{c}"] = [m for m in molecules if str(m.meta.get("category")) == c]
    return subsets


def stationary_metrics(potential: Potential, molecules: Sequence[Molecule]) -> dict[str, float]:
    """What a Hessian is for, at the stationary points among `molecules` (`meta['point']` in
    reactant, product, ts, with a reference Hessian); {} when there are none.

    From the model's Hessian (float64) against the reference one at the same geometry:
    `frequency_mae_cm1`, the MAE of the harmonic frequencies (cm^-1; translations and rotations
    projected out, imaginary ones negative, `phljax.vibrations.harmonic_analysis`);
    `hessian_eigenvalue_mae` (eV/A^2), the MAE of the sorted Cartesian Hessian eigenvalues;
    `stationary_index_correct`, the fraction of minima with no imaginary frequency and of TSs with
    exactly one (|nu| > 10 cm^-1); `ts_imaginary_frequency_mae_cm1`, the error of the TS's
    imaginary frequency (TSs only); and the counts `n_stationary`, `n_ts`.
    """
    points = [m for m in molecules if m.meta.get("point") in STATIONARY and m.hessian is not None]
    return reduce_stationary(stationary_rows(potential, points))


def stationary_rows(potential: Potential, points: Sequence[Molecule]) -> list[dict]:
    """Per stationary point (`meta['point']` in reactant, product, ts; reference Hessian required):
    `point`, `freq_abs_err` [M] cm^-1, `eig_abs_err` [3N] eV/A^2, `index_correct` and, at a TS,
    `ts_imag_abs_err` cm^-1; the model Hessians (float64) of all points in one call.
    `reduce_stationary` turns any subset of the rows into `stationary_metrics`' dict."""
    if not points:
        return []
    model = potential.hessian([m.numbers for m in points], [m.positions for m in points], dtype=np.float64)
    rows = []
    for m, h in zip(points, model, strict=True):
        n = m.n_atoms
        h_ref = m.hessian.reshape(3 * n, 3 * n)
        ref = harmonic_analysis(m.numbers, m.positions, h_ref)
        mod = harmonic_analysis(m.numbers, m.positions, h)
        row = {
            "point": m.meta["point"],
            "freq_abs_err": np.abs(mod.frequencies - ref.frequencies),
            "eig_abs_err": np.abs(np.linalg.eigvalsh(h) - np.linalg.eigvalsh(0.5 * (h_ref + h_ref.T))),
            "index_correct": mod.n_imaginary() == STATIONARY[m.meta["point"]],
        }
        if m.meta["point"] == "ts":
            row["ts_imag_abs_err"] = abs(mod.frequencies[0] - ref.frequencies[0])
        rows.append(row)
    return rows


def reduce_stationary(rows: Sequence[dict]) -> dict[str, float]:
    """`stationary_metrics`' dict from `stationary_rows` ({} for no rows)."""
    if not rows:
        return {}
    ts = [r["ts_imag_abs_err"] for r in rows if "ts_imag_abs_err" in r]
    out = {
        "n_stationary": len(rows),
        "frequency_mae_cm1": float(np.mean(np.concatenate([r["freq_abs_err"] for r in rows]))),
        "hessian_eigenvalue_mae": float(np.mean(np.concatenate([r["eig_abs_err"] for r in rows]))),
        "stationary_index_correct": float(np.mean([r["index_correct"] for r in rows])),
        "n_ts": len(ts),
    }
    if ts:
        out["ts_imaginary_frequency_mae_cm1"] = float(np.mean(ts))
    return out


def evaluate_molecules(
    potential: Potential,
    subsets: dict[str, Sequence[Molecule]],
    *,
    batch_size: int = 16,
    hessian_chunk: int | None = None,
    budget: BatchBudget | None = None,
) -> dict[str, dict]:
    """Errors of `potential` on each named subset (eV units; Hessian errors when every record has one).

    One jitted metric step serves every subset of the same budget (by default sized for all of them).
    """
    everything = [m for mols in subsets.values() for m in mols]
    if not everything:
        return {}
    check_elements(everything, potential.elements)
    with_hessian = all(m.hessian is not None for m in everything)
    if budget is None:
        budget = budget_for(everything, batch_size, potential.cutoff, with_hessian=with_hessian)
    step = jax.jit(make_eval_step(potential.energy_fn, with_hessian=with_hessian, hessian_chunk=hessian_chunk))
    x64 = bool(potential.config and potential.config.x64)
    dtype = np.float64 if x64 else np.float32
    return {
        name: {
            **accumulate_errors(step, potential.params, mols, budget, potential.cutoff, dtype),
            **stationary_metrics(potential, mols),
        }
        for name, mols in subsets.items()
        if mols
    }


def evaluate_workdir(
    workdir: str,
    paths: Sequence[str],
    *,
    energy_unit: str | None = None,
    length_unit: str | None = None,
    batch_size: int = 16,
    hessian_chunk: int | None = None,
) -> dict[str, dict]:
    """Errors of the best checkpoint in `workdir` on HDF5 files of the ANI layout (eV units).

    Reports each file by its name, and each `category` within a file (`<file>/<category>`, the
    paper's order) when the records carry several.
    """
    potential = Potential.from_workdir(workdir)
    results = {}
    for path in paths:
        molecules = load([path], energy_unit=energy_unit, length_unit=length_unit)
        subsets = test_subsets(molecules, os.path.basename(path))
        results.update(evaluate_molecules(potential, subsets, batch_size=batch_size, hessian_chunk=hessian_chunk))
    return results


def _ev_based(key: str) -> bool:
    return key.split("_")[0] in UNITS  # energy_*, forces_*, hessian_* (incl. hessian_eigenvalue_mae)


def in_kcal_mol(errors: dict[str, dict]) -> dict[str, dict]:
    """The same error dict with eV-based values converted to kcal/mol-based units (counts,
    frequencies and fractions unchanged)."""
    return {name: {k: (v / units.KCAL_MOL if _ev_based(k) else v) for k, v in r.items()} for name, r in errors.items()}


def format_table(results: dict[str, dict], epoch_time: float | None = None) -> str:
    """A text table of MAE/RMSE per subset and quantity, in eV and kcal/mol units."""
    width = max([14, *(len(s) + 2 for s in results)])
    lines = [f"{'subset':<{width}}{'quantity':<11}{'MAE':>11}{'RMSE':>11}  {'unit':<13}{'MAE':>11}{'RMSE':>11}  unit"]
    for subset, r in results.items():
        for q, (ev_unit, kcal_unit) in {**UNITS, "energy_rel": UNITS["energy"]}.items():
            if f"{q}_mae" not in r:
                continue
            mae, rmse = r[f"{q}_mae"], r[f"{q}_rmse"]
            k = 1.0 / units.KCAL_MOL
            ev = f"{mae:>11.4g}{rmse:>11.4g}  {ev_unit:<13}"
            lines.append(f"{subset:<{width}}{q:<11}{ev}{mae * k:>11.4g}{rmse * k:>11.4g}  {kcal_unit}")
    stationary = {name: r for name, r in results.items() if "n_stationary" in r}
    if stationary:
        lines.append("")
        head = ("stationary", "freq MAE", "eig MAE", "index ok", "TS imag")
        unit = ("points", "cm^-1", "eV/A^2", "fraction", "cm^-1 MAE")
        for row, label in ((head, "subset"), (unit, "")):
            lines.append(f"{label:<{width}}" + "".join(f"{c:>11}" for c in row))
        for name, r in stationary.items():
            ts = r.get("ts_imaginary_frequency_mae_cm1")
            lines.append(
                f"{name:<{width}}{r['n_stationary']:>11}{r['frequency_mae_cm1']:>11.4g}{r['hessian_eigenvalue_mae']:>11.4g}"
                f"{r['stationary_index_correct']:>11.3g}{'' if ts is None else f'{ts:.4g}':>11}"
            )
    if epoch_time is not None:
        lines.append(f"mean epoch time: {epoch_time:.3f} s")
    return "\n".join(lines)
