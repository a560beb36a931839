"""The TS search benchmark's inputs and attempt log: references, starts, models, attempts.jsonl.

`load_references` reads the DFT TS, reactant and product of each bundled reaction and the
pipeline's TS guesses; `make_starts` builds the guess and the seeded perturbed starts;
`model_from_workdir` and `study_models` name the trained runs; `read_attempts`, `_append` and
`_pin_settings` keep `<out>/attempts.jsonl` and `<out>/settings.json`, which make a benchmark
resumable; `run_benchmark` runs (or resumes) every attempt and rewrites `<out>/ts_search.json`
and `<out>/ts_search.md` (`phljax.ts_search.tables`) after every model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import zlib
from collections.abc import Callable, Sequence

import numpy as np

from phljax.calculator import PHLCalculator
from phljax.config import Config
from phljax.data import bundled_path, read_h5
from phljax.datagen.reactions.checks import aligned_rmsd
from phljax.datagen.reactions.spec import read_reaction
from phljax.files import write_atomic
from phljax.losses import SCHEMES
from phljax.potential import Potential
from phljax.study import HVP_PROBES, SCHEME_SLUGS, Cell
from phljax.ts_search.search import Model, Reference, Settings, Start, run_attempt
from phljax.ts_search.tables import render_tables, summarize
from phljax.vibrations import rigid_body_projector

__all__ = [
    "load_references",
    "make_starts",
    "model_from_workdir",
    "study_models",
    "read_attempts",
    "run_benchmark",
]

log = logging.getLogger("phljax.ts_search")

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # phljax/ts_search/ -> repo
REACTIONS_DIR = os.path.join(_REPO, "data", "reactions")  # atom-mapped reactant/product(/TS guess) xyz files
CACHE_DIR = os.path.join(_REPO, "data", "dft_cache", "reactions")  # the pipeline's cache: neb.npz per reaction
ATTEMPTS, SETTINGS, SUMMARY, TABLES = "attempts.jsonl", "settings.json", "ts_search.json", "ts_search.md"


# --- references and starts ----------------------------------------------------------------------------------------


def load_references(
    rtp_path: str | None = None,
    reactions_dir: str = REACTIONS_DIR,
    cache_dir: str = CACHE_DIR,
    reactions: Sequence[str] | None = None,
) -> list[Reference]:
    """The DFT references of the reactions with a TS in the RTP file (sorted by id).

    Args:
        rtp_path: an RTP file (default: the bundled `chon_reactions-RTP.h5`).
        reactions_dir: where `<reaction>.xyz` lives (a TS frame there is the pipeline's guess).
        cache_dir: the pipeline's cache (`<reaction>/neb.npz`).
        reactions: ids to keep (default: all).

    Raises:
        ValueError: an id in `reactions` that the file lacks, a reaction without reactant or
            product, a reaction with neither a TS frame nor a `neb.npz`.
    """
    rtp = read_h5(rtp_path or bundled_path("chon_reactions-RTP.h5"))
    points: dict[str, dict] = {}
    for m in rtp:
        points.setdefault(m.meta["reaction"], {})[m.meta["point"]] = m
    ids = sorted(r for r, p in points.items() if "ts" in p)
    if reactions is not None:
        missing = sorted(set(reactions) - set(ids))
        if missing:
            raise ValueError(f"reaction(s) {missing} have no TS in {rtp_path or 'the bundled RTP file'}; known: {ids}")
        ids = [r for r in ids if r in set(reactions)]
    out = []
    for rid in ids:
        p = points[rid]
        if not {"reactant", "product"} <= set(p):
            raise ValueError(f"reaction {rid}: the RTP file has points {sorted(p)}, needs reactant, product and ts")
        ts = p["ts"]
        guesses, sources = {}, {}
        xyz = os.path.join(reactions_dir, f"{rid}.xyz")
        file_guess = read_reaction(xyz).ts_guess if os.path.exists(xyz) else None
        neb_path = os.path.join(cache_dir, rid, "neb.npz")
        if file_guess is not None:  # the pipeline skips the NEB when the file has a TS frame
            guesses = {"pipeline": file_guess, "climbing": file_guess}
            sources = {"pipeline": f"{xyz} frame 2", "climbing": f"{xyz} frame 2 (no NEB)"}
        elif os.path.exists(neb_path):
            with np.load(neb_path) as neb:
                guesses = {"pipeline": np.array(neb["guess"], np.float64), "climbing": np.array(neb["climbing"])}
            sources = {"pipeline": f"{neb_path} guess", "climbing": f"{neb_path} climbing"}
        else:
            raise ValueError(f"reaction {rid}: no TS guess: neither {xyz} has a TS frame nor {neb_path} exists")
        for k, g in guesses.items():
            if np.shape(g) != ts.positions.shape:
                raise ValueError(f"reaction {rid}: {sources[k]} has shape {np.shape(g)}, the TS {ts.positions.shape}")
        out.append(
            Reference(
                id=rid,
                numbers=np.asarray(ts.numbers),
                ts=np.asarray(ts.positions, np.float64),
                reactant=np.asarray(p["reactant"].positions, np.float64),
                product=np.asarray(p["product"].positions, np.float64),
                guesses={k: np.asarray(v, np.float64) for k, v in guesses.items()},
                guess_source=sources,
            )
        )
    return out


def _rms_values(settings: Settings) -> list[float]:
    lo, hi = settings.rms_range
    k = settings.perturbations
    return [0.5 * (lo + hi)] if k == 1 else np.linspace(lo, hi, k).tolist()


def make_starts(ref: Reference, settings: Settings) -> list[Start]:
    """The guess and the `settings.perturbations` perturbed DFT TS starts of one reaction.

    A perturbation is a Gaussian vector with translations and rotations (about the centroid)
    projected out, scaled to the RMS over atoms sqrt(mean_i |d_i|^2); its random stream is keyed
    by (seed, reaction id, k), so every model gets the same starts whatever else runs.
    """
    guess = ref.guesses[settings.guess]
    starts = [Start(ref.id, "guess", "guess", guess, aligned_rmsd(guess, ref.ts), ref.guess_source[settings.guess])]
    n = len(ref.numbers)
    p, _ = rigid_body_projector(ref.ts, np.ones(n))  # [3N, 3N]; unit masses: plain Cartesian
    for k, rms in enumerate(_rms_values(settings)):
        rng = np.random.default_rng([settings.seed, zlib.crc32(ref.id.encode()), k])
        d = (p @ rng.normal(size=3 * n)).reshape(n, 3)  # [N, 3], no rigid-body part
        d *= rms / np.sqrt((d**2).sum(-1).mean())
        r = ref.ts + d
        starts.append(Start(ref.id, f"perturbed-{k}", "perturbed", r, aligned_rmsd(r, ref.ts), f"rms {rms:.3f} A"))
    return starts


# --- models -------------------------------------------------------------------------------------------------------


def _scheme_label(config: Config, results: dict | None) -> str:
    label = (results or {}).get("scheme") or SCHEMES[config.probe]
    return label + (f" ({config.probe_mode})" if config.probe in HVP_PROBES else "")


def model_from_workdir(workdir: str) -> Model:
    """A `Model` of the training run in `workdir`, labelled by its scheme (results.json, else config.json).

    Raises:
        FileNotFoundError: no config.json in `workdir`.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found; is {workdir!r} the work directory of a training run?")
    with open(path) as f:
        config = Config.from_json(f.read())
    results = None
    if os.path.isfile(os.path.join(workdir, "results.json")):
        with open(os.path.join(workdir, "results.json")) as f:
            results = json.load(f)
    return Model(key=os.path.realpath(workdir), label=_scheme_label(config, results), workdir=workdir)


def study_models(root: str, protocol: str, seed: int) -> list[Model]:
    """Every finished run (results.json written) of `protocol` and `seed` in a study root, in the
    study's scheme order (E-F, E-F-HVP one-hot, E-F-HVP random, E-F-H; randomized before fixed).

    Raises:
        FileNotFoundError: `<root>/<protocol>` does not exist.
    """
    base = os.path.join(root, protocol)
    if not os.path.isdir(base):
        raise FileNotFoundError(f"{base}: no such study protocol directory")
    cells = []
    for name in sorted(os.listdir(base)):
        cell = Cell.parse(protocol, name)
        if cell and cell.seed == seed and os.path.isfile(os.path.join(base, name, "results.json")):
            cells.append(cell)
    order = list(SCHEME_SLUGS)
    cells.sort(key=lambda c: (order.index(c.probe), c.regime or ""))
    return [model_from_workdir(c.workdir(root)) for c in cells]


def _unique_labels(models: Sequence[Model]) -> list[Model]:
    """Models whose labels repeat get their run's directory name appended."""
    labels = [m.label for m in models]
    return [
        dataclasses.replace(m, label=f"{m.label} [{os.path.basename(os.path.normpath(m.workdir))}]")
        if labels.count(m.label) > 1
        else m
        for m in models
    ]


# --- the attempt log -------------------------------------------------------------------------------------------------


def _key(record: dict) -> tuple[str, str, str, str]:
    return record["model"], record["reaction"], record["start"], record["mode"]


def read_attempts(out: str) -> list[dict]:
    """The finished attempts in `<out>/attempts.jsonl` (a torn last line, from a kill mid-write, is skipped)."""
    path = os.path.join(out, ATTEMPTS)
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s:%d: not a JSON line (an interrupted write?); skipped", path, i + 1)
    return records


def _pin_settings(out: str, settings: Settings) -> None:
    path = os.path.join(out, SETTINGS)
    now = settings.to_json()
    if os.path.exists(path):
        with open(path) as f:
            before = json.load(f)
        diff = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
        if diff:
            raise ValueError(
                f"{path}: this benchmark ran with other settings ({', '.join(f'{k}={before.get(k)}' for k in diff)}; "
                f"now {', '.join(f'{k}={now.get(k)}' for k in diff)}); use another --out to change them"
            )
        return
    write_atomic(path, json.dumps(now, indent=1))


def _append(out: str, record: dict) -> None:
    with open(os.path.join(out, ATTEMPTS), "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _write_outputs(out: str, settings: Settings, models: Sequence[Model], records: list[dict], title: str) -> None:
    keys = {m.key for m in models}
    mine = [r for r in records if r["model"] in keys]
    summary = summarize(mine, models, settings)
    doc = {"settings": settings.to_json(), "models": [dataclasses.asdict(m) for m in models], "summary": summary}
    doc["attempts"] = mine
    for name, text in ((SUMMARY, json.dumps(doc, indent=1)), (TABLES, render_tables(summary, settings, title))):
        write_atomic(os.path.join(out, name), text)


def run_benchmark(
    models: Sequence[Model],
    settings: Settings = Settings(),  # noqa: B008 (frozen)
    out: str = "results/ts_search",
    *,
    references: Sequence[Reference] | None = None,
    title: str = "TS search",
    potential_for: Callable[[Model], Potential] | None = None,
) -> dict:
    """Run (or resume) every attempt of `models` x reactions x starts x modes; write the outputs.

    Args:
        models: the trained runs (`model_from_workdir`, `study_models`).
        settings: see `Settings`; pinned in `<out>/settings.json`.
        out: output directory (attempts.jsonl, settings.json, ts_search.json, ts_search.md).
        references: the reactions (default: `load_references()`, all 12 bundled ones).
        title: heading of the Markdown tables.
        potential_for: how to load a model (default `Potential.from_workdir(model.workdir)`).

    Returns:
        The summary (`summarize`) of the models' attempts.

    Raises:
        ValueError: `out` holds a benchmark with other settings; two models with the same key.
    """
    if len({m.key for m in models}) != len(models):
        raise ValueError(f"the same model is given twice: {[m.workdir for m in models]}")
    models = _unique_labels(models)
    references = load_references() if references is None else list(references)
    os.makedirs(out, exist_ok=True)
    _pin_settings(out, settings)
    records = read_attempts(out)
    done = {_key(r) for r in records}
    load = potential_for or (lambda m: Potential.from_workdir(m.workdir))
    for model in models:
        todo = [
            (ref, start, mode)
            for ref in references
            for start in make_starts(ref, settings)
            for mode in settings.modes
            if (model.key, ref.id, start.name, mode) not in done
        ]
        log.info("%s (%s): %d attempts to run", model.label, model.workdir, len(todo))
        if todo:
            calc = PHLCalculator(load(model))
            for ref, start, mode in todo:
                record = {"model": model.key, "label": model.label, **run_attempt(calc, ref, start, mode, settings)}
                _append(out, record)
                records.append(record)
                log.info(
                    "%s %s %s %s: %s, %d steps, %s imaginary, RMSD %s, IRC %s, %.1f s",
                    model.label, ref.id, start.name, mode, record["status"], record["steps"], record["n_imaginary"],
                    "-" if record["rmsd"] is None else f"{record['rmsd']:.3f}", record["irc_connects"],
                    record["wall_s"],
                )  # fmt: skip
        _write_outputs(out, settings, models, records, title)
    keys = {m.key for m in models}
    return summarize([r for r in records if r["model"] in keys], models, settings)
