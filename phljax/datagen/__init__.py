"""DFT data generation for phljax: omegaB97X-D/6-31G(d) labels with PySCF (optional extra).

Modules:
    dispersion: the Chai--Head-Gordon damped D2 dispersion of omegaB97X-D (numpy, atomic units).
    dft: PySCF energies, gradients, analytic Hessians, geomeTRIC optimisation, Hessian checks
        (and their limits, :data:`~phljax.datagen.dft.HESSIAN_LIMITS`), FD HVPs.
    sampling: normal-mode sampling of distorted geometries around a minimum.
    cache: crash-safe cache files.
    labels: one geometry's labels (analytic Hessian or FD HVPs) into the cache, and back out
        as ``phljax.data.Molecule``.
    reactions: the data-generation pipeline (minima, transition states, IRC, normal-mode
        samples), run by ``experiments/make_dataset.py``.
    card: the data cards of the reaction set and the size-scaling set, rendered from cache summaries.
    xtb: GFN2-xTB through tblite (the `scale` extra): energies, analytic gradients, checked
        finite-difference Hessians, FD HVPs, an ASE calculator and LBFGS relaxation.
    molecules: the size-scaling set's molecules (SMILES, size bins) and their RDKit ETKDG conformers.
    scale: the size-scaling set (10-180 atoms from SMILES, RDKit conformers, xTB minima, normal-mode
        samples, E/F + test Hessians + HVPs of the largest), run by ``experiments/make_scale_data.py``.

Unit constants come from :mod:`phljax.units` (its DFT-side, CODATA 2018 values).

PySCF and geomeTRIC (and tblite and RDKit) are imported lazily inside the functions that need them,
so importing this package costs nothing when they are not installed.
"""

from phljax.datagen.dispersion import chg_dispersion, chg_dispersion_energy

__all__ = ["chg_dispersion", "chg_dispersion_energy"]
