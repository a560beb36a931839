"""The data cards of the reaction set and the size-scaling set, rendered from cache summaries (so they never drift)."""

from __future__ import annotations

from typing import Any

from ase.data import chemical_symbols

_DERIVATIVE_NOTE = """
What this means for the labels. The FD error is flat in the step from 1e-3 to 1e-2 Angstrom, so it
is neither truncation (which would grow as h^2) nor SCF noise (which would grow as 1/h); the data
set's 5e-3 Angstrom lies in the flat part. What is left is a mismatch between PySCF's analytic
Hessian and its gradients, the same size as the Hessians' translational sum-rule error (which the
Hessian of a translation-invariant energy satisfies exactly). Neither PySCF derivative follows the
atom-centred integration grid as it moves (the RKS Hessian's `grid_response` switch gives identical
numbers in PySCF 2.14), but a finer grid (level 7) does not shrink the mismatch, so its origin is
not settled here. For the gradient, `grid_response=True` matches the energy's derivative to the FD
accuracy; the default gradient, used for the labels, does not: for this functional its error is
about 7 times B3LYP's, and the atoms' gradients do not sum to zero (last column; about
1 meV/Angstrom). All of these are far below the force and Hessian errors of models trained on these
data. Switching the labels to grid-response gradients would change the set's level of theory, so
it was not done.
"""


def _hours(summary: dict, done: bool) -> str:
    """The labels' compute time, "so far" while the set is partial."""
    return f"{summary['compute_s'] / 3600:.2f} h" + ("" if done else " so far")


def render_reaction_card(
    summary: dict[str, Any],
    prefix: str,
    label_cost: dict[str, Any] | None = None,
    checks: dict[str, Any] | None = None,
) -> str:
    """Markdown data card of a reaction data set made by :mod:`phljax.datagen.reactions`.

    Args:
        summary: :func:`phljax.datagen.reactions.summarize` (or ``assemble``) of the cache.
        prefix: file prefix (files ``<prefix>-RTP.h5``, ``-IRC.h5``, ``-NMS.h5``).
        label_cost: optional measured labelling cost per route and size (from
            ``experiments/label_cost.py``), rendered as a table.
        checks: optional ``{"scans": ..., "gradients": ...}``, the JSON outputs of
            ``experiments/check_derivatives.py`` (FD HVP error against the step; analytic
            gradients against FD energies), either may be missing.

    Returns:
        The card as a markdown string.
    """
    cfg = summary["config"] or {}
    level = cfg.get("level", {})
    rxns = summary["reactions"]
    n = summary["n_geometries"]
    planned = summary.get("n_planned", n)
    done = n + summary.get("n_rejected", 0) >= planned
    status = "complete" if done else f"PARTIAL: {n} of {planned} planned geometries so far"
    if level.get("xc") == "hyb_gga_xc_wb97x_d" and level.get("basis") in ("6-31g*", "6-31g(d)"):
        level_name = "omegaB97X-D/6-31G(d)" + ("" if level.get("dispersion", True) else " without dispersion")
    else:
        level_name = f"{level.get('xc')}/{level.get('basis')}" + (" + CHG-D2" if level.get("dispersion", True) else "")

    elements = [chemical_symbols[z] for z in sorted({z for r in rxns.values() for z in r.get("numbers", [])})]
    rows = []
    for rid, r in rxns.items():
        fail = "; ".join(r["failures"]) or ("" if "barrier_kcal" in r else "TS not searched yet")
        rows.append(
            f"| {rid} | {r['comment']} | {r['n_atoms']} | {r.get('barrier_kcal', float('nan')):.1f} | "
            f"{r.get('reaction_energy_kcal', float('nan')):.1f} | {r.get('imaginary_cm', float('nan')):.0f} | "
            f"{r['n_rtp']} | {r['n_irc']} | {r['n_nms']} | {fail} |"
        )
    atoms = sorted({r["n_atoms"] for r in rxns.values()})
    size = (f"{atoms[0]}-{atoms[-1]}" if atoms[-1] > atoms[0] else f"{atoms[0]}") if atoms else "0"
    frozen = [f"{rid} {pt} {', '.join(map(str, f))}" for rid, r in rxns.items()
              for pt, f in r.get("nms_frozen_cm", {}).items()]  # fmt: skip
    frozen_text = f" (here, in cm^-1: {'; '.join(frozen)})" if frozen else ""
    short = [f"{rid} {b} ({k})" for rid, r in rxns.items() for b, k in r.get("short_irc_branches", {}).items()]
    short_text = (
        "; branches that reach their minimum in fewer steps give fewer distinct points: " + ", ".join(short)
        if short
        else ""
    )
    ranges = ""
    if summary.get("label_ranges"):
        rows_r = [
            f"| {c.upper()} | " + " | ".join(f"{x:.1f}" for x in q["energy_kcal"]) + " | "
            + " | ".join(f"{x:.2f}" for x in q["max_force_eV_A"]) + " |"
            for c, q in summary["label_ranges"].items() if "energy_kcal" in q
        ]  # fmt: skip
        ranges = (
            "\nWhat the labels span (min / median / max over the geometries of each category): energy above\n"
            "the reaction's reactant in kcal/mol, and the largest force component in eV/Angstrom.\n\n"
            "| category | E min | E median | E max | max F min | max F median | max F max |\n"
            "|---|---|---|---|---|---|---|\n" + "\n".join(rows_r) + "\n"
        )
    n_stale = sum(r.get("n_stale", 0) for r in rxns.values())
    if n_stale:
        frozen_text += (f". {n_stale} labels of samples drawn before this rule are kept in the cache as "
                        "`stale_*` and are not in the files")  # fmt: skip
    d_shell = "Cartesian" if level.get("cart") else "spherical"
    programs = ", ".join(summary.get("programs") or ["PySCF"])
    disp_word = "" if level.get("dispersion", True) else " NOT"
    rejected = [f"{rid}: {x}" for rid, r in rxns.items() for x in r["rejected"]]
    n_rej = len(rejected)
    rejected_text = f"{n_rej} geometr{'y was' if n_rej == 1 else 'ies were'} rejected (SCF or Hessian check)"
    rejected_text += " and " + ("is" if n_rej == 1 else "are") + " not in the files"
    rejected_text += (": " + "; ".join(rejected) + ".") if rejected else "."
    labels = cfg.get("labels", "hessian")
    label_text = (
        "a full analytic Hessian (`hessian` [n_conf, 3N, 3N], Hartree/Angstrom^2, symmetrised)"
        if labels == "hessian"
        else f"{cfg.get('num_probes')} {cfg.get('probe_kind')} probe vectors (`hvp_probes` [n_conf, K, N, 3], "
        f"dimensionless) and their Hessian-vector products (`hvps` [n_conf, K, N, 3], Hartree/Angstrom^2) by "
        f"central differences of analytic gradients with step {cfg.get('fd_step')} Angstrom"
    )
    cost = ""
    if label_cost:
        crow = [
            f"| {c['name']} | {c['n_atoms']} | {c['hessian_s']:.1f} | {c['gradient_s']:.1f} | "
            f"{c['hvp_s']:.1f} (K={c['num_probes']}) | {c['hessian_s'] / c['hvp_s']:.2f} | {c['fd_rel_error']:.1e} |"
            for c in label_cost["rows"]
        ]
        cost = (
            "\n## Labelling cost: analytic Hessian vs finite-difference HVPs\n\n"
            f"Measured by `{label_cost['command']}` ({label_cost['machine']}). Seconds per geometry; the HVP route "
            "is one SCF + gradient at the geometry and 2K displaced ones started from its density.\n\n"
            "| molecule | atoms | energy+gradient+Hessian, s | energy+gradient, s | FD HVP labels, s | "
            "Hessian / HVP time | FD error, max abs(Hv - FD) / max abs(Hv) |\n|---|---|---|---|---|---|---|\n"
            + "\n".join(crow)
            + "\n"
        )
    checks = checks or {}
    if checks.get("scans"):
        scans = checks["scans"]
        steps = scans["scans"][0]["steps_A"]
        srow = [
            f"| {c['name']} | {c['grid_level']} | " + " | ".join(f"{e:.1e}" for e in c["fd_rel_error"]) + " |"
            for c in scans["scans"]
        ]
        cost += (
            "\nFinite-difference HVP error max abs(Hv - FD) / max abs(Hv) against the step h (Angstrom) and the "
            f"integration grid, measured by `{scans['command']}` ({scans['scans'][0]['num_probes']} Gaussian "
            "probes, the distorted g2 geometry):\n\n"
            "| molecule | grid level | " + " | ".join(f"h = {h:g}" for h in steps) + " |\n"
            "|---|---|" + "---|" * len(steps) + "\n" + "\n".join(srow) + "\n"
        )
    if checks.get("gradients"):
        grads = checks["gradients"]
        grow = [
            f"| {c['name']} | {c['xc']} | {c['grid_level']} | {c['max_abs_gradient']:.1e} | {c['error_default']:.1e} | "
            f"{c['error_grid_response']:.1e} | {c['sum_of_gradients_default']:.1e} |"
            for c in grads["gradients"]
        ]
        cost += (
            f"\nAnalytic DFT gradients against central differences of the energy (`{grads['command']}`), "
            "max abs errors in Hartree/Bohr; the labels use PySCF's default gradient:\n\n"
            "| molecule | xc | grid level | max abs(g) | default gradient | with grid response | "
            "abs(sum of default gradients) |\n|---|---|---|---|---|---|---|\n" + "\n".join(grow) + "\n"
        )
    if checks:
        cost += _DERIVATIVE_NOTE
    return f"""# Data card: `{prefix}-{{RTP,IRC,NMS}}.h5` (reaction set, {level_name})

Status: **{status}**. {n} labelled geometries ({summary["n_rtp"]} RTP, {summary["n_irc"]} IRC,
{summary["n_nms"]} NMS) of {len(rxns)} closed-shell reactions of {", ".join(elements) or "?"} with {size}
atoms, made by `phljax.datagen.reactions` in the layout of the PHL paper's OpenREACT-CHON-EFH
files: reactants, products and transition states (RTP), intrinsic-reaction-coordinate points
(IRC) and normal-mode samples (NMS). Every geometry has an energy, forces and {label_text}.
{rejected_text}

## Reactions

Barrier and reaction energy: electronic, kcal/mol, from the optimised reactant. Imaginary
frequency of the verified TS in cm^-1 (negative = imaginary).

| id | reaction | atoms | barrier | dE | TS freq | RTP | IRC | NMS | failures |
|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

## How each geometry was made

1. Reactant and product (atom-mapped xyz in `data/reactions/`) optimised with geomeTRIC on the
   level below.
2. TS guess: climbing-image NEB ({cfg.get("neb_images")} images, IDPP interpolation, FIRE to
   {cfg.get("neb_fmax")} eV/A) and a Sella saddle search at {cfg.get("guess_xc")}/{cfg.get("guess_basis")};
   then Sella (internal coordinates, exact initial Hessian) at the level below to max force
   {cfg.get("ts_fmax")} eV/A. Accepted only with exactly one frequency below -{cfg.get("imag_tol_cm")} cm^-1
   (translations and rotations projected out) and an IRC whose two ends, relaxed with
   geomeTRIC, are the reactant and the product (same bond graph, or for conformers within
   {cfg.get("endpoint_rmsd")} A RMSD).
3. IRC: Sella's mass-weighted IRC from the TS both ways (step {cfg.get("irc_dx")} A amu^1/2, at most
   {cfg.get("irc_steps")} steps, to max force {cfg.get("irc_fmax")} eV/A); {cfg.get("n_irc")} points per direction kept,
   evenly spaced in arc length (the TS itself is in RTP){short_text}.
4. NMS: {cfg.get("n_nms")} samples around reactant, product and TS from the classical harmonic
   Boltzmann distribution at {cfg.get("temperature")} K (modes below {cfg.get("min_freq_cm")} cm^-1 and the TS's
   imaginary mode not displaced), seeded by `default_rng([seed, crc32(reaction), crc32(point)])`,
   seed {cfg.get("seed")}. Normal modes are straight lines, so a straight step along a rotation-like
   mode (a weakly bound fragment turning, an NH2 wag, a methyl torsion) by its large thermal
   amplitude pulls bonds apart; such modes, whose step by one RMS amplitude lengthens a bond by more
   than {cfg.get("max_rectilinear_stretch", "(not applied)")} at second order, are not displaced either{frozen_text}.
{ranges}
## Level of theory and what the labels contain

- {programs}: restricted Kohn-Sham, libxc functional `{level.get("xc")}`
  (the exchange-correlation part of omegaB97X-D; PySCF refuses the alias `wb97x-d`), basis
  `{level.get("basis")}` (6-31G(d), {d_shell} d), integration grid level {level.get("grid_level")},
  SCF conv_tol {level.get("conv_tol")} Hartree, CPSCF tolerance {level.get("conv_tol_cpscf")}.
- Plus{disp_word} the Chai-Head-Gordon damped D2 dispersion of omegaB97X-D (Grimme-D2 C6
  and radii, damping 1/(1 + 6 (r/R_r)^-12); Chai & Head-Gordon, PCCP 10, 6615 (2008)), computed
  analytically (`phljax.datagen.dispersion`) and added to energy, gradient and Hessian. So
  energy = E_DFT(XC part) + E_disp, forces and Hessians their exact derivatives; the cache
  keeps the two parts apart.
- Every analytic Hessian is checked for symmetry (max|H - H^T|/max|H| <= {cfg.get("max_asym_rel")}) and the
  translational sum rule (max|sum_j H_ij|/max|H| <= {cfg.get("max_sum_rule_rel")}). PySCF's DFT Hessian has no
  integration-grid response, so both errors come from the grid: a finer grid shrinks them, a tighter
  CPSCF tolerance does not. The stored Hessians are symmetrised.

## Files, layout and units

`{prefix}-RTP.h5`, `{prefix}-IRC.h5`, `{prefix}-NMS.h5`, written by `phljax.data.write_h5`: one
group per formula and atom order; `species`, `coordinates` [n_conf, N, 3] Angstrom, `energies`
[n_conf] Hartree (total, no atomic reference subtracted), `forces` [n_conf, N, 3] Hartree/Angstrom,
the labels above, and per geometry `category` (rtp/irc/nms), `reaction` (id), `point`
(reactant, product, ts, irc_forward, irc_reverse, nms_reactant, ...), `index`, `source`; IRC
geometries also `toward` (reactant or product: the end their branch relaxes to, as Sella's
forward direction follows the arbitrary sign of the TS mode).
`phljax.data.read_h5` converts to eV and Angstrom. The per-calculation cache (atomic units) is
`data/dft_cache/reactions/<reaction>/`.

## Compute

{_hours(summary, done)}: the sum of every calculation's wall time, each on the one or two cores its
worker had (on machines shared with other jobs, so an upper bound). With `--workers N`, N
calculations run at once, so the elapsed time is shorter than this sum. Labels of one cache can
come from several machines (`--rounds` shares out a job; the level and program versions above are
read from the labels): the cache's `log.txt` logs its own runs, and labels copied in from another
machine come with their log as `log.<machine>-<date>.txt`.
{cost}
## Regenerate

```
pip install -e '.[data]'
OMP_NUM_THREADS=2 nice -n 10 python experiments/make_dataset.py --workers 2  # all reactions (resumes)
python experiments/make_dataset.py --reactions data/reactions/hcn_hnc.xyz --out runs/hcn --cache runs/hcn/cache
python experiments/make_dataset.py --assemble                              # files from the cache
```

Resuming from the cache recomputes nothing. Given the cached stationary-point Hessians the normal-mode
samples are fixed by the seed. A from-scratch run on another machine or thread count reproduces the
optimised structures only to the optimisers' tolerances, and the eigenvectors' signs are arbitrary
(and so is the basis of a degenerate pair, like the bends of linear HCN and HNC). Its NMS geometries
then differ from these, drawn from the same distribution, and Sella's `irc_forward` may be the other
branch (`toward` says which end each branch reaches).
"""


def render_scale_card(summary: dict[str, Any], prefix: str) -> str:
    """Markdown data card of the size-scaling set made by :mod:`phljax.datagen.scale`.

    Args:
        summary: :func:`phljax.datagen.scale.summarize` (or ``assemble``) of the cache.
        prefix: file prefix (files ``<prefix>-train.h5``, ``-train-<kind>.h5``, ``-test.h5``, ``-minima.h5``).

    Returns:
        The card as a markdown string.
    """
    cfg = summary["config"] or {}
    level = summary.get("level") or cfg.get("level", {})
    mols = summary["molecules"]
    n, planned = summary["n_geometries"], summary["n_planned"]
    done = summary["n_settled"] >= planned
    status = "complete" if done else f"PARTIAL: {n} of {planned} planned geometries so far"
    rows = [
        f"| {name} | {m['family']} | {m['n_atoms']} | {m['size_bin']} | {m['n_train']} | {m['n_test']} | "
        f"{m['n_train_hessian']} | {m.get('lowest_freq_cm', float('nan')):.0f} | {m.get('n_frozen', 0)} | "
        f"{m.get('s_per_gradient', float('nan')):.3f} | {'; '.join(m['rejected'])} |"
        for name, m in sorted(mols.items(), key=lambda kv: kv[1]["n_atoms"])
    ]
    bins = [
        f"| {b} | {c['molecules']} | {c['train']} | {c['test']} | {c['train_hessian']} |"
        for b, c in summary["bins"].items()
    ]
    limits = cfg.get("limits", {})
    atoms = sorted(m["n_atoms"] for m in mols.values())
    size = f"{atoms[0]}-{atoms[-1]}" if atoms else "0"
    started = sum(m["n_train"] + m["n_test"] > 0 for m in mols.values())
    method = level.get("method", "GFN2-xTB")
    return f"""# Data card: `{prefix}-{{train,train-<kind>,test,minima}}.h5` (size-scaling set, {method})

Status: **{status}**. {n} labelled normal-mode samples of {started} of the {len(mols)} neutral
closed-shell C/H/N/O molecules of {size} atoms (alkanes, alcohols, amides and peptides, rings and aromatics, larger
flexible molecules), made by `phljax.datagen.scale` for the size-scaling study (issue 19), plus
the minimum of each molecule.
{summary["n_rejected"]} calculations were rejected and are not in the files.

## Level of theory: deliberately not the reaction set's

{level.get("method", "GFN2-xTB")} (tblite {level.get("tblite_version", "?")}; accuracy {level.get("accuracy")},
electronic temperature {level.get("electronic_temperature")} K), not the omegaB97X-D/6-31G(d) of
`chon_reactions`. The set asks how the training methods (E-F, E-F-HVP one-hot and random, E-F-H)
scale with molecule size; any consistent reference surface answers that, and GFN2-xTB is cheap
enough for thousands of geometries up to ~180 atoms on 2 cores. Do not mix these labels with the
DFT set's, and do not read its errors as DFT accuracy.

## Labels

- Every geometry: energy (`energies`, Hartree, total) and forces (`forces`, Hartree/Angstrom, the
  negative analytic gradient).
- Test subset (`{prefix}-test.h5`; {cfg.get("n_test_per_bin")} samples per size bin, dealt round-robin over
  the bin's molecules) and every minimum (`{prefix}-minima.h5`): a full Hessian (`hessian`
  [n_conf, 3N, 3N], Hartree/Angstrom^2) by central differences of analytic gradients with step
  {cfg.get("fd_step")} Angstrom, symmetrised; accepted only with max|H - H^T|/max|H| <= {limits.get("max_asym_rel")},
  translational sum rule max|sum_j H_ij|/max|H| <= {limits.get("max_sum_rule_rel")}, and
  {cfg.get("check_columns")} columns recomputed with step 2h agreeing to {limits.get("max_step_rel")} of max|H|.
- Training samples (`{prefix}-train.h5`): E and F; for molecules of at most
  {cfg.get("train_hessian_max_atoms")} atoms also the full checked Hessian (the randomized regime and E-F-H
  train on those).
- Probe pools of every training sample (`{prefix}-train-<kind>.h5`, one file per kind of
  {", ".join(cfg.get("pool_kinds", ()))}): {cfg.get("pool_size")} probes (`hvp_probes` [n_conf, K, N, 3], dimensionless,
  E[v v^T] = I; one-hot sqrt(3N) e_c) and their Hessian-vector products (`hvps`, Hartree/Angstrom^2): exact
  products with the Hessian where the sample has one, else central differences of gradients along each
  probe (2 gradients per probe), for `--probe-mode data`. All kinds are drawn for the same samples, so
  one-hot and random probes are compared on the same geometries at every size.
- Provenance per geometry: `name`, `family`, `smiles`, `size_bin`, `split` (train, test, minimum),
  `category` (nms, minimum), `index` (sample), `source`.

## How each geometry was made

1. RDKit ETKDG (v3) conformer from the SMILES, `randomSeed` {cfg.get("seed")}; relaxed with GFN2-xTB by
   ASE's LBFGS to max per-atom |F| <= {cfg.get("fmax")} eV/Angstrom.
2. The checked FD Hessian at the minimum; harmonic analysis with translations and rotations projected
   out (`phljax.datagen.sampling.normal_modes`).
3. {cfg.get("n_nms")} normal-mode samples per molecule from the classical harmonic Boltzmann distribution
   at {cfg.get("temperature")} K, as for the reaction set: modes below {cfg.get("min_freq_cm")} cm^-1 (and imaginary
   ones) and rotation-like modes (second-order bond stretch > {cfg.get("max_rectilinear_stretch")} at one RMS
   amplitude) not displaced; seeded by `default_rng([seed, crc32(name)])`.

## Size bins

| atoms | molecules | train | test (Hessian) | train with Hessian |
|---|---|---|---|---|
{chr(10).join(bins)}

## Molecules

Lowest frequency at the minimum (cm^-1), modes not displaced as rotation-like, and the median wall
time per gradient of the molecule's labels (seconds, on the machine and load of the run).

| name | family | atoms | bin | train | test | train H | lowest freq | frozen | s/gradient | rejected |
|---|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

## Compute

{_hours(summary, done)} (the sum of every calculation's wall time, relaxations included).

## Regenerate

```
pip install -e '.[scale]'
OMP_NUM_THREADS=1 nice -n 10 python experiments/make_scale_data.py            # all molecules (resumes)
python experiments/make_scale_data.py --only propane,benzene --cache runs/s/cache --out runs/s
python experiments/make_scale_data.py --assemble                              # files from the cache
```

Resuming recomputes nothing. The conformers are fixed by the seed, the minima by the optimiser to its
tolerance; given a cached minimum Hessian the samples are fixed by the seed.
"""
