"""Reaction data pipeline: reactants, products, transition states, IRC paths and normal-mode samples.

For each reaction, given as atom-mapped reactant and product structures (a multi-frame xyz file:
frame 0 the reactant, frame 1 the product, an optional frame 2 a transition-state guess), the
pipeline

1. optimises reactant and product with geomeTRIC on PySCF gradients;
2. labels both with the analytic Hessian (they are RTP data, and their normal modes are needed);
3. finds the transition state: a climbing-image NEB (ASE, IDPP interpolation) at a cheaper
   integration grid gives the guess, Sella refines it as a first-order saddle starting from the
   analytic Hessian; the TS is labelled and accepted only with exactly one imaginary frequency
   after translations and rotations are projected out;
4. follows the intrinsic reaction coordinate from the TS in both directions (Sella's IRC, mass
   weighted), relaxes both ends with geomeTRIC and checks they are the reactant and the product;
   points spread evenly along the path are kept and labelled;
5. draws normal-mode samples (harmonic Boltzmann, ANI-style) around reactant, product and TS (the
   TS's imaginary mode is not displaced) and labels them.

Labels are either analytic Hessians (``labels="hessian"``) or, the case PHL is made for, K probe
vectors per geometry with their Hessian-vector products by central differences of analytic
gradients (``labels="hvp"``). Stationary points always get an analytic Hessian too (needed for
TS verification and normal modes), which in HVP mode validates the finite-difference step.

Every finished calculation is written to ``<cache>/<reaction>/`` at once (atomically), so an
interrupted run resumes where it stopped and never recomputes; failures (SCF non-convergence,
failed TS search, wrong number of imaginary frequencies, IRC not connecting) are written as
``*.failed.json`` / ``*.rejected.json``, logged and summarised, never written as data. Given the
seed, everything is deterministic. :func:`assemble` writes the paper's layout: three ANI-HDF5
files (RTP, IRC, NMS) with each geometry's category, reaction id and point.

Modules: ``spec`` (reaction files, :class:`ReactionConfig`), ``checks`` (TS verification, IRC
end matching), ``structure`` (optimisation, TS search, IRC), ``labelling`` (labels and the cache
directory of a reaction), ``workflow`` (the run, its log, assembly, summary).

Units: positions Angstrom; cache energies Hartree, gradients Hartree/Bohr, Hessians
Hartree/Bohr^2; ASE-side (NEB, Sella) eV and Angstrom.

References:
    G. Henkelman, B. P. Uberuaga, H. Jonsson, J. Chem. Phys. 113, 9901 (2000) (climbing-image NEB).
    S. Smidstrup et al., J. Chem. Phys. 140, 214106 (2014) (IDPP interpolation).
    E. D. Hermes, K. Sargsyan, H. N. Najm, J. Zador, J. Chem. Theory Comput. 18, 6974 (2022) (Sella).
    K. Fukui, Acc. Chem. Res. 14, 363 (1981) (IRC).
"""

from phljax.datagen.reactions.checks import (
    NotAMinimumError,
    TSVerificationError,
    aligned_rmsd,
    bond_graph,
    count_imaginary,
    match_endpoint,
    verify_minimum,
    verify_ts,
)
from phljax.datagen.reactions.labelling import (
    SOURCE,
    STATIONARY,
    ReactionDir,
    label_point,
    nms_samples,
    stationary_hessian,
)
from phljax.datagen.reactions.spec import (
    LABELS,
    Reaction,
    ReactionConfig,
    ReactionFileError,
    read_reaction,
    read_reactions,
)
from phljax.datagen.reactions.structure import (
    guess_level,
    import_sella,
    irc_points,
    irc_stage,
    optimize_stage,
    ts_stage,
)
from phljax.datagen.reactions.workflow import (
    CATEGORIES,
    assemble,
    cached_records,
    cached_records_of,
    run,
    setup_logging,
    summarize,
    tasks,
)

__all__ = [
    "CATEGORIES",
    "LABELS",
    "SOURCE",
    "STATIONARY",
    "Reaction",
    "ReactionConfig",
    "ReactionDir",
    "ReactionFileError",
    "NotAMinimumError",
    "TSVerificationError",
    "aligned_rmsd",
    "assemble",
    "bond_graph",
    "cached_records",
    "cached_records_of",
    "count_imaginary",
    "guess_level",
    "import_sella",
    "irc_points",
    "irc_stage",
    "label_point",
    "match_endpoint",
    "nms_samples",
    "optimize_stage",
    "read_reaction",
    "read_reactions",
    "run",
    "setup_logging",
    "stationary_hessian",
    "summarize",
    "tasks",
    "ts_stage",
    "verify_minimum",
    "verify_ts",
]
