"""DFT data generation for phljax: omegaB97X-D/6-31G(d) labels with PySCF (optional extra).

Modules:
    dispersion: the Chai--Head-Gordon damped D2 dispersion of omegaB97X-D (numpy, atomic units).
    dft: PySCF energies, gradients, analytic Hessians, geomeTRIC optimisation, Hessian checks.
    sampling: normal-mode sampling of distorted geometries around a minimum.
    pipeline: the resumable, cached generation of the small bundled data set (and its assembly).
    reactions: the reaction pipeline (minima, transition states, IRC, normal-mode samples).
    card: the data card rendered from the cache summary.

PySCF and geomeTRIC are imported lazily inside the functions that need them, so importing this
package costs nothing when they are not installed.
"""

from phljax.datagen.dispersion import chg_dispersion, chg_dispersion_energy

__all__ = ["chg_dispersion", "chg_dispersion_energy"]
