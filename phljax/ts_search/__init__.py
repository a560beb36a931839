"""The TS search benchmark: do a model's forces and Hessian find the DFT transition states?

For every reaction of the bundled set and every model, Sella (`order=1`, internal coordinates, as
the data pipeline runs it) searches a first-order saddle of the model from

- ``guess``: the pipeline's own TS guess, the start of its DFT saddle search (`Start`): the
  reaction file's TS frame when it has one, else `neb.npz["guess"]` (the HF/3-21G climbing-image
  NEB saddle refined by Sella at HF/3-21G) or, with `Settings.guess="climbing"`, the raw climbing
  image `neb.npz["climbing"]`;
- ``perturbed-k``: the DFT TS (`chon_reactions-RTP.h5`, point 'ts') displaced by a seeded random
  vector, translations and rotations removed, of RMS between `rms_range` (evenly spaced).

Each start runs in two Hessian modes:

- ``model``: the model's analytic Hessian (`PHLCalculator.get_hessian`) at the start and again
  after every step. Sella 2.6 recomputes the Hessian at a step when its counter of steps since the
  last one, -1 after the initial Hessian, is >= `diag_every_n`; `diag_every_n=-1` therefore gives a
  Hessian at every step including the first (`n_hessians == steps + 1`; 0 would skip step 1).
  Sella's IRC gets the same `hessian_function` (it uses it at the TS only).
- ``sella``: no Hessian from the model: Sella's own iterative (finite-difference Davidson)
  eigensolver and quasi-Newton updates, in the search and in the IRC.

From the saddle found, Sella's IRC runs both ways (step `irc_dx` amu^1/2 A, at most `irc_steps`
per branch, a branch ending once its max force is below `irc_fmax`, as in the pipeline), and each
end is relaxed with BFGS on the model. An attempt records (`run_attempt`):

- `converged`: max force below `fmax` (eV/A) within `max_steps` Sella steps (and `max_wall_s`);
- `n_imaginary`: imaginary frequencies of the model Hessian at the saddle (mass weighted,
  translations and rotations projected out: `harmonic_analysis(...).n_imaginary(imag_tol_cm)`);
  `one_imaginary` is that count == 1;
- `rmsd`: aligned RMSD to the DFT TS (Kabsch, same atom order), `rmsd_ok` below `rmsd_tol`;
- `irc_connects`: the relaxed IRC ends are the reaction's reactant and product (the DFT minima of
  the RTP file), decided as the pipeline does (`checks.match_endpoint`: bond graphs, or RMSD for
  conformers);
- `success`: all four.

Attempts are appended as JSON lines to `<out>/attempts.jsonl` the moment they finish, keyed by
(model, reaction, start, mode): `run_benchmark` skips the finished ones, so a stopped benchmark
resumes. `<out>/settings.json` pins the settings (a different setting needs a new `out`).
`<out>/ts_search.json` (settings, models, attempts, summary) and `<out>/ts_search.md` (tables) are
rewritten at the end of every model.

The package, imports running one way (search <- tables <- benchmark):

    search.py     one attempt: Settings, Reference, Start, MODES, run_attempt (the Sella search and
                  the saddle's checks), follow_irc, relax
    tables.py     summarize and render_tables (the summary and its markdown tables)
    benchmark.py  the inputs, the attempt log and the driver: load_references, make_starts,
                  model_from_workdir, study_models, read_attempts (attempts.jsonl, settings.json),
                  and run_benchmark, which runs the attempts and writes ts_search.json and ts_search.md

Units: positions Angstrom, energies eV, forces eV/A, Hessians eV/A^2, frequencies cm^-1.
"""

from phljax.ts_search.benchmark import (
    ATTEMPTS,
    CACHE_DIR,
    REACTIONS_DIR,
    SETTINGS,
    SUMMARY,
    TABLES,
    load_references,
    make_starts,
    model_from_workdir,
    read_attempts,
    run_benchmark,
    study_models,
)
from phljax.ts_search.search import (
    EVERY_STEP,
    MODES,
    START_KINDS,
    Model,
    Reference,
    Settings,
    Start,
    follow_irc,
    relax,
    run_attempt,
)
from phljax.ts_search.tables import render_tables, summarize

__all__ = [
    "Settings",
    "Reference",
    "Start",
    "Model",
    "MODES",
    "START_KINDS",
    "EVERY_STEP",
    "ATTEMPTS",
    "SETTINGS",
    "SUMMARY",
    "TABLES",
    "REACTIONS_DIR",
    "CACHE_DIR",
    "load_references",
    "make_starts",
    "model_from_workdir",
    "study_models",
    "follow_irc",
    "relax",
    "run_attempt",
    "run_benchmark",
    "read_attempts",
    "summarize",
    "render_tables",
]
