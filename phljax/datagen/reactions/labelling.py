"""Labels of a reaction's geometries, and the cache directory they live in.

Every labelled geometry is one ``.npz`` in ``<cache>/<reaction>/``, written atomically; a label
that exists is never recomputed.
"""

from __future__ import annotations

import logging
import os
import zlib
from typing import Any

import numpy as np

from phljax.datagen.cache import load_json, load_npz, save_json, save_npz
from phljax.datagen.labels import is_done, label_hessian, label_hvp, make_probes, passes_now
from phljax.datagen.reactions.spec import Reaction, ReactionConfig
from phljax.datagen.sampling import normal_modes, rectilinear_stretch, sample_normal_modes

log = logging.getLogger("phljax.datagen")

STATIONARY = ("reactant", "product", "ts")
SOURCE = "phljax.datagen.reactions (PySCF omegaB97X-D/6-31G(d) + CHG dispersion)"


class ReactionDir:
    """Paths and failure bookkeeping of one reaction's cache directory."""

    def __init__(self, cache_dir: str, reaction: Reaction):
        self.rxn = reaction
        self.dir = os.path.join(cache_dir, reaction.id)
        os.makedirs(self.dir, exist_ok=True)

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def failed(self, name: str) -> dict | None:
        p = self.path(name + ".failed.json")
        return load_json(p) if os.path.exists(p) else None

    def fail(self, name: str, err: Exception | str, **info) -> None:
        """Record stage ``name`` as failed for good (``<name>.failed.json``: never retried).

        Only for a chemistry failure (:func:`~phljax.datagen.reactions.checks.chemistry_errors`, or a
        check that found one). The record holds ``reason`` and ``error`` (the exception's type name, when
        ``err`` is an exception or ``info`` names it), so a cache can be re-examined for code errors.
        """
        log.error("FAILED %s/%s: %s", self.rxn.id, name, err)
        if isinstance(err, BaseException):
            info.setdefault("error", type(err).__name__)
        record = {"reaction": self.rxn.id, "stage": name, "reason": str(err), **info}
        save_json(self.path(name + ".failed.json"), record)


def data_extra(rid: str, category: str, point: str, index: int, **more) -> dict[str, Any]:
    return {"category": category, "reaction": rid, "point": point, "index": index, "source": SOURCE, **more}


def label_point(
    cfg: ReactionConfig, st: ReactionDir, stem: str, positions: np.ndarray, extra: dict, force_hessian: bool = False
) -> dict | None:
    """Label one geometry in the configured way (or with a Hessian if ``force_hessian``)."""
    path = st.path(stem)
    hessian = cfg.labels == "hessian" or force_hessian
    again = hessian and passes_now(path, cfg.max_asym_rel, cfg.max_sum_rule_rel)
    if again:
        log.info("%s/%s: rejected under tighter Hessian checks than now; labelling again", st.rxn.id, stem)
    if not is_done(path) or again:
        if hessian:
            label_hessian(path, st.rxn.numbers, positions, cfg.level, extra, cfg.max_asym_rel, cfg.max_sum_rule_rel)
        else:
            rng = np.random.default_rng([cfg.seed, zlib.crc32(st.rxn.id.encode()), zlib.crc32(stem.encode())])
            probes = make_probes(cfg.probe_kind, cfg.num_probes, len(st.rxn.numbers), rng)
            label_hvp(path, st.rxn.numbers, positions, probes, cfg.level, extra, cfg.fd_step)
    return load_npz(path + ".npz") if os.path.exists(path + ".npz") else None


def stationary_hessian(cfg: ReactionConfig, st: ReactionDir, point: str, positions: np.ndarray) -> dict | None:
    """Analytic-Hessian label of a stationary point (``hess_<point>``); in HVP mode its
    finite-difference labels (``rtp_<point>``) are made too and validated against it."""
    extra = data_extra(st.rxn.id, "rtp", point, 0)
    rec = label_point(cfg, st, f"hess_{point}" if cfg.labels == "hvp" else f"rtp_{point}", positions, extra, True)
    if rec is not None and cfg.labels == "hvp" and not is_done(st.path(f"rtp_{point}")):
        rng = np.random.default_rng([cfg.seed, zlib.crc32(st.rxn.id.encode()), zlib.crc32(f"rtp_{point}".encode())])
        probes = make_probes(cfg.probe_kind, cfg.num_probes, len(st.rxn.numbers), rng)
        label_hvp(st.path(f"rtp_{point}"), st.rxn.numbers, positions, probes, cfg.level, extra, cfg.fd_step,
                  reference_hessian=rec["hessian"])  # fmt: skip
    return rec


def hessian_record(st: ReactionDir, point: str, cfg: ReactionConfig) -> dict | None:
    """The analytic-Hessian record of a stationary point (the TS's, verified or not)."""
    names = ["hess_" + point, "rtp_" + point] if cfg.labels == "hessian" else ["hess_" + point]
    for name in names:
        if os.path.exists(st.path(name + ".npz")):
            return load_npz(st.path(name + ".npz"))
    return None


def nms_samples(cfg: ReactionConfig, st: ReactionDir, point: str, hessian_record: dict) -> dict:
    """Normal-mode samples around a stationary point (drawn once, cached, seeded).

    Modes below ``cfg.min_freq_cm`` and rotation-like modes (``rectilinear_stretch`` above
    ``cfg.max_rectilinear_stretch``) are not displaced; the file records which (``frozen``).
    A file drawn before that rule (no ``frozen``) is kept if the rule freezes no mode of this
    point; otherwise it and the labels of its samples are moved to ``stale_*`` (out of the data,
    still counted in the compute time) and the samples are drawn again.
    """
    out = st.path(f"nms_{point}_samples.npz")
    cached = load_npz(out) if os.path.exists(out) else None
    if cached is not None and "frozen" in cached:
        return cached
    rec = hessian_record
    nm = normal_modes(rec["numbers"], rec["positions"], rec["hessian"])
    stretch = rectilinear_stretch(rec["numbers"], rec["positions"], nm["modes"], nm["omega2"], cfg.temperature)
    frozen = (stretch > cfg.max_rectilinear_stretch) & (nm["freq_cm"] >= cfg.min_freq_cm)
    if cached is not None:
        if not frozen.any():  # the same draw as the rule makes now
            save_npz(out, **cached, frozen=frozen, rectilinear_stretch=stretch)
            return load_npz(out)
        _retire_samples(st, point, frozen_cm=nm["freq_cm"][frozen])
    rng = np.random.default_rng([cfg.seed, zlib.crc32(st.rxn.id.encode()), zlib.crc32(point.encode())])
    samples, e_harm = sample_normal_modes(rec["positions"], nm["modes"], nm["omega2"], nm["freq_cm"], cfg.n_nms,
                                          cfg.temperature, rng, cfg.min_freq_cm, frozen)  # fmt: skip
    save_npz(out, positions=samples, harmonic_energy=e_harm, freq_cm=nm["freq_cm"], frozen=frozen,
             rectilinear_stretch=stretch)  # fmt: skip
    return load_npz(out)


def _retire_samples(st: ReactionDir, point: str, frozen_cm: np.ndarray) -> None:
    """Move the samples of ``point`` drawn with rotation-like modes, and their labels, to ``stale_*``.

    The samples file moves last: a run killed in between finds it still there and moves the rest.
    """
    names = sorted(
        f for f in os.listdir(st.dir) if f.startswith(f"nms_{point}_") and f[len(f"nms_{point}_") :][:3].isdigit()
    ) + [f"nms_{point}_samples.npz"]
    for name in names:
        try:
            os.replace(st.path(name), st.path("stale_" + name))
        except FileNotFoundError:  # another worker moved it first
            pass
    log.warning("%s: NMS samples around the %s were drawn with rotation-like modes (%s cm^-1) displaced; "
                "they and %d labels moved to stale_*, drawing again",
                st.rxn.id, point, ", ".join(f"{f:.0f}" for f in frozen_cm), len(names) - 1)  # fmt: skip


# ----------------------------------------------------------------------------- the run
