"""The PHL study: a grid of training runs (protocol x scheme x probe regime x seed), run resumably,
and its aggregation into the paper's tables with paired statistics over seeds.

The question it answers: do E-F-HVP schemes match full-Hessian E-F-H training, and do random
probes beat one-hot ones? One cell is one `phljax.train.train` run; seed s sets both the
initialisation (and probes) and the split, so the schemes of one seed are paired.

    grid.py    cells, protocols, each cell's config, the study's settings and a cell's files
    runner.py  run_study (priority order, locks, STOP), status and its ETA, reevaluate
    stats.py   aggregate (stats over seeds, paired t-tests), tables, learning curves, time to target
    stationary.py item 5 at every stationary point: frequencies, eigenvalues, TS index per cell
    scaling.py the size-scaling study (issue 19): per size bin, probe families x regimes on the xTB
               set, estimator variances on the trained error matrices, exponents in N
    scaling_report.py its tables, headline sentences and RESULTS.md's generated block
"""

from phljax.losses import SCHEMES
from phljax.study.grid import (
    EXECUTION_FIELDS,
    FAILED,
    HVP_PROBES,
    LOCK,
    OWNED_FIELDS,
    PROTOCOLS,
    QUANTITIES,
    REGIMES,
    SCHEME_SLUGS,
    STOP,
    STUDY_JSON,
    SUBSETS,
    UNITS,
    Cell,
    Study,
    cell_config,
    cell_metrics,
    cell_results,
    dataset_reactions,
    open_study,
    protocol_config,
    reaction_folds,
)  # fmt: skip
from phljax.study.runner import (
    CellStatus,
    acquire_lock,
    format_status,
    reevaluate,
    release_lock,
    run_study,
    status,
)
from phljax.study.stats import aggregate, comparison_pairs, learning_curves, render_tables, table_quantities
from phljax.train import train
from phljax.units import KCAL_MOL

__all__ = [
    "HVP_PROBES",
    "UNITS",
    "STOP",
    "LOCK",
    "FAILED",
    "STUDY_JSON",
    "OWNED_FIELDS",
    "EXECUTION_FIELDS",
    "cell_metrics",
    "cell_results",
    "SCHEME_SLUGS",
    "REGIMES",
    "PROTOCOLS",
    "SUBSETS",
    "QUANTITIES",
    "Cell",
    "Study",
    "CellStatus",
    "protocol_config",
    "reaction_folds",
    "dataset_reactions",
    "cell_config",
    "open_study",
    "acquire_lock",
    "release_lock",
    "run_study",
    "reevaluate",
    "status",
    "format_status",
    "comparison_pairs",
    "learning_curves",
    "table_quantities",
]
