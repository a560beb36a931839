"""The TS search benchmark's summary and its Markdown tables.

`summarize` counts each criterion per model and (start kind, Hessian mode) over the attempt
records of `phljax.ts_search.search.run_attempt`; `render_tables` turns that into
`<out>/ts_search.md` (written by `phljax.ts_search.benchmark.run_benchmark`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from phljax.ts_search.search import START_KINDS, Model, Settings

__all__ = ["summarize", "render_tables"]


# --- summary and tables -------------------------------------------------------------------------------------------

_CRITERIA = ("converged", "one_imaginary", "rmsd_ok", "irc_connects", "success")


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def summarize(records: Sequence[dict], models: Sequence[Model], settings: Settings) -> dict:
    """Per model (by label) and per (start kind, mode): attempts, counts of each criterion, mean
    Sella steps of the converged searches, mean steps of all, mean wall time.

    Returns:
        {label: {"<kind>/<mode>": {"n", "converged", "one_imaginary", "rmsd_ok", "irc_connects",
        "success", "mean_steps_converged", "mean_steps", "mean_wall_s"}}}
    """
    out = {}
    for model in models:
        mine = [r for r in records if r["model"] == model.key]
        cells = {}
        for kind in START_KINDS:
            for mode in settings.modes:
                group = [r for r in mine if r["start_kind"] == kind and r["mode"] == mode]
                cell = {"n": len(group), **{c: sum(bool(r[c]) for r in group) for c in _CRITERIA}}
                cell["mean_steps_converged"] = _mean([r["steps"] for r in group if r["converged"]])
                cell["mean_steps"] = _mean([r["steps"] for r in group])
                cell["mean_wall_s"] = _mean([r["wall_s"] for r in group])
                cells[f"{kind}/{mode}"] = cell
        out[model.label] = cells
    return out


_MODE_NAMES = {"model": "model H", "sella": "Sella H"}


def _rate(k: int, n: int) -> str:
    return "-" if n == 0 else f"{100 * k / n:.0f}% ({k}/{n})"


def _num(x: float | None, fmt: str = ".0f") -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, fmt)


def render_tables(summary: dict, settings: Settings, title: str = "TS search") -> str:
    """Markdown: one table with a row per model (scheme) and a column per (start kind, Hessian mode)
    giving the success rate and mean steps of the converged searches; then one table per model
    that has attempts with each criterion's rate."""
    columns = [(kind, mode) for kind in START_KINDS for mode in settings.modes]
    lines = [
        f"## {title}",
        "",
        f"Success = converged (fmax {settings.fmax:g} eV/A in {settings.max_steps} Sella steps), one imaginary "
        f"frequency of the model Hessian (below -{settings.imag_tol_cm:g} cm^-1), aligned RMSD to the DFT TS "
        f"< {settings.rmsd_tol:g} A, IRC ends relaxing to the reactant and product. Starts: `guess` = the "
        f"pipeline's TS guess ({settings.guess}); `perturbed` = the DFT TS displaced by RMS "
        f"{settings.rms_range[0]:g}-{settings.rms_range[1]:g} A ({settings.perturbations} per reaction, seed "
        f"{settings.seed}). Model H: the model's Hessian at every step; Sella H: Sella's own. Cells: success "
        f"rate (successes/attempts), mean steps of the converged searches.",
        "",
        "| scheme | " + " | ".join(f"{kind}, {_MODE_NAMES[mode]}" for kind, mode in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for label, cells in summary.items():
        entries = []
        for kind, mode in columns:
            c = cells[f"{kind}/{mode}"]
            entries.append(f"{_rate(c['success'], c['n'])}, {_num(c['mean_steps_converged'])} steps")
        lines.append(f"| {label} | " + " | ".join(entries) + " |")
    for label, cells in summary.items():
        if not any(c["n"] for c in cells.values()):
            continue  # not run yet: its row above says so
        lines += [
            "",
            f"### {label}",
            "",
            "| start | Hessian | n | converged | 1 imaginary | RMSD ok | IRC connects | success | steps (conv.) "
            "| steps (all) | wall (s) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for kind, mode in columns:
            c = cells[f"{kind}/{mode}"]
            rates = " | ".join(_rate(c[k], c["n"]) for k in _CRITERIA)
            lines.append(
                f"| {kind} | {_MODE_NAMES[mode]} | {c['n']} | {rates} | {_num(c['mean_steps_converged'], '.1f')} "
                f"| {_num(c['mean_steps'], '.1f')} | {_num(c['mean_wall_s'], '.1f')} |"
            )
    return "\n".join(lines) + "\n"


# --- the benchmark ---------------------------------------------------------------------------------------------------
