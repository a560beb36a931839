"""Reaction files and the configuration of a reaction data set."""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from ase import Atoms
from ase.data import atomic_numbers, chemical_symbols
from ase.io.extxyz import key_val_str_to_dict, read_xyz

from phljax.datagen.dft import FD_STEP, HESSIAN_LIMITS, HessianLimits, LevelOfTheory
from phljax.datagen.labels import PROBE_KINDS
from phljax.datagen.reactions.checks import ENDPOINT_RMSD, IMAG_TOL_CM
from phljax.datagen.sampling import MIN_FREQ_CM, NMS_TEMPERATURE


class ReactionFileError(ValueError):
    """A reaction file is malformed (names the file and frame)."""


# ----------------------------------------------------------------------------- reactions


@dataclasses.dataclass(frozen=True)
class Reaction:
    """One atom-mapped reaction.

    Attributes:
        id: name (the xyz file's stem unless the file says ``reaction=...``).
        numbers: atomic numbers [N], the same order in every frame.
        reactant, product: start structures [N, 3] Angstrom.
        ts_guess: optional transition-state guess [N, 3] Angstrom (skips the NEB).
        comment: free text (what the reaction is).
        path: the file it came from.
    """

    id: str
    numbers: np.ndarray
    reactant: np.ndarray
    product: np.ndarray
    ts_guess: np.ndarray | None = None
    comment: str = ""
    path: str = ""


def read_reaction(path: str) -> Reaction:
    """Read a reaction from a multi-frame (extended) xyz file.

    Frame 0 is the reactant, frame 1 the product and an optional frame 2 a TS guess, all with the
    same atoms in the same order. Only neutral closed-shell reactions are supported: a comment
    line may say ``charge=0 spin=0``; anything else is refused.

    Each frame is a line with the number of atoms, a comment line (``key=value`` pairs, as
    extended xyz) and one ``symbol x y z`` line per atom (more columns are ignored, unless the
    comment line declares ``Properties=``). Frames follow each other; blank lines may only end the
    file (ase would stop reading at one and drop the frames after it).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ReactionFileError: naming the file and the line or frame, for text that is not such a
            file (not UTF-8, a bad atom count, a truncated frame, a blank line between frames, a
            non-numeric or non-finite coordinate, an unknown element), a wrong frame count,
            different atoms between frames, overlapping atoms, or a charge/spin other than 0.
    """

    if not os.path.exists(path):
        raise FileNotFoundError(f"no such reaction file: {path}")
    frames = _xyz_frames(path)
    if len(frames) not in (2, 3):
        starts = f" (frames at lines {[line for line, _ in frames]})" if frames else " (the file has no frames)"
        raise ReactionFileError(
            f"{path}: expected 2 frames (reactant, product) or 3 (+ TS guess), got {len(frames)}{starts}"
        )
    numbers = frames[0][1].numbers
    for i, (line, f) in enumerate(frames):
        at = f"frame {i} (line {line})"
        bad = (f.numbers < 1) | (f.numbers >= len(chemical_symbols))
        if np.any(bad):
            raise ReactionFileError(f"{path}: {at}: atom {int(np.argmax(bad))} has no element (Z={f.numbers[bad][0]})")
        if not np.array_equal(f.numbers, numbers):
            raise ReactionFileError(
                f"{path}: {at} has atoms {f.get_chemical_formula()} in a different order or composition "
                f"than frame 0 ({frames[0][1].get_chemical_formula()}); atoms must be mapped"
            )
        finite = np.isfinite(f.positions).all(axis=1)
        if not finite.all():
            raise ReactionFileError(f"{path}: {at}: atom {int(np.argmin(finite))} has a non-finite position")
        for key in ("charge", "spin"):
            value = f.info.get(key, 0)
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise ReactionFileError(f"{path}: {at}: {key}={value!r} is not a number")
            if value != 0:
                raise ReactionFileError(f"{path}: {at}: {key}={value}; only neutral closed-shell reactions")
        d = np.linalg.norm(f.positions[:, None] - f.positions[None], axis=-1) + 10 * np.eye(len(f))
        if d.min() < 0.5:
            i_, j_ = np.unravel_index(np.argmin(d), d.shape)
            raise ReactionFileError(f"{path}: {at}: atoms {i_} and {j_} are {d.min():.2f} A apart")
    if (sum(numbers) % 2) != 0:
        raise ReactionFileError(
            f"{path}: odd number of electrons ({sum(numbers)}) in frame 0; only closed-shell reactions"
        )
    rid = str(frames[0][1].info.get("reaction", os.path.splitext(os.path.basename(path))[0]))
    atoms = [f for _, f in frames]
    return Reaction(
        id=rid,
        numbers=np.asarray(numbers, dtype=int),
        reactant=np.asarray(atoms[0].positions, dtype=np.float64),
        product=np.asarray(atoms[1].positions, dtype=np.float64),
        ts_guess=np.asarray(atoms[2].positions, dtype=np.float64) if len(atoms) == 3 else None,
        comment=str(atoms[0].info.get("comment", "")),
        path=os.path.abspath(path),
    )


def _xyz_frames(path: str) -> list[tuple[int, Atoms]]:
    """The frames of an xyz file with the line each starts at (1-based), each read by ase's extxyz
    reader once this scan has found its lines well formed (ase names neither line nor frame)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise ReactionFileError(f"{path}: cannot read: {err}") from err
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ReactionFileError(f"{path}: line {line}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")  # as open() in text mode reads it
    frames: list[tuple[int, Atoms]] = []
    i = 0
    while i < len(lines):
        k, first = len(frames), i + 1
        if not lines[i].strip():
            rest = next((j for j in range(i, len(lines)) if lines[j].strip()), None)
            if rest is None:
                break
            raise ReactionFileError(
                f"{path}: line {first}: blank line where frame {k} should begin (line {rest + 1} has text); "
                "frames must follow each other without blank lines"
            )
        header = lines[i].strip()
        try:
            natoms = int(header)
        except ValueError:
            raise ReactionFileError(
                f"{path}: line {first}: frame {k}: expected the number of atoms, got {header[:40]!r}"
            ) from None
        if natoms < 1:
            raise ReactionFileError(f"{path}: line {first}: frame {k}: {natoms} atoms; a frame needs at least one")
        if i + 1 + natoms >= len(lines):
            have = max(0, len(lines) - i - 2 - (lines[-1] == ""))
            raise ReactionFileError(
                f"{path}: line {first}: frame {k} declares {natoms} atoms but the file ends after {have} atom lines"
            )
        comment = lines[i + 1].strip()
        try:
            info = key_val_str_to_dict(comment) if comment else {}
        except Exception as err:  # ase's parser raises several types for a malformed line
            raise ReactionFileError(
                f"{path}: line {first + 1}: frame {k}: cannot parse the comment line: {err!r}"
            ) from err
        for a in range(natoms):
            n_line, fields = i + 3 + a, lines[i + 2 + a].split()
            where = f"{path}: line {n_line}: frame {k}, atom {a}"
            if not fields:
                raise ReactionFileError(f"{where}: blank line instead of an atom ({natoms} declared at line {first})")
            if "Properties" in info:
                continue  # custom columns: ase checks them, the checks of read_reaction follow
            if len(fields) < 4:
                raise ReactionFileError(f"{where}: expected 'symbol x y z', got {lines[i + 2 + a].strip()[:60]!r}")
            symbol = fields[0].capitalize()  # as ase reads it
            if symbol not in atomic_numbers or symbol == "X":
                raise ReactionFileError(f"{where}: unknown element {fields[0][:20]!r}")
            for c, value in zip("xyz", fields[1:4], strict=True):
                try:
                    x = float(value)
                except ValueError:
                    raise ReactionFileError(f"{where}: {c} = {value[:20]!r} is not a number") from None
                if not np.isfinite(x):
                    raise ReactionFileError(f"{where}: {c} = {value[:20]!r} is not finite")
        last = i + 2 + natoms
        try:
            atoms = next(read_xyz(io.StringIO("\n".join(lines[i:last]) + "\n"), index=0))
        except Exception as err:  # ase raises many types for a malformed frame
            raise ReactionFileError(f"{path}: lines {first}-{last}: frame {k}: cannot read as xyz: {err!r}") from err
        frames.append((first, atoms))
        i = last
    return frames


def read_reactions(paths: Sequence[str]) -> list[Reaction]:
    """Read reaction xyz files; a ``.txt`` path lists xyz files (one per line, relative to it).

    Raises:
        ReactionFileError: also for two reactions with the same id.
    """
    files: list[str] = []
    for p in paths:
        if p.endswith(".txt"):
            with open(p) as f:
                base = os.path.dirname(os.path.abspath(p))
                files += [os.path.join(base, ln.strip()) for ln in f if ln.strip() and not ln.startswith("#")]
        else:
            files.append(p)
    reactions = [read_reaction(p) for p in files]
    ids = [r.id for r in reactions]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ReactionFileError(f"reaction ids {dup} appear more than once in {files}")
    return reactions


#: The settings that only decide whether a finished label is accepted, not what is computed: the
#: fields of :class:`~phljax.datagen.dft.HessianLimits`. A cache may loosen them (its rejections are
#: then decided again, see :func:`phljax.datagen.labels.passes_now`), never tighten them (its labels
#: passed the old ones).
ACCEPTANCE = tuple(f.name for f in dataclasses.fields(HessianLimits))

#: What a geometry can be labelled with: an analytic Hessian, or finite-difference HVPs.
LABELS = ("hessian", "hvp")


@dataclasses.dataclass(frozen=True)
class ReactionConfig:
    """How a reaction data set is made (all of it is stored with the data).

    Attributes:
        level: level of theory of every label, optimisation, TS search and IRC.
        guess_xc, guess_basis: the cheap level (PySCF xc name, basis; no dispersion) of the TS
            guess: a climbing-image NEB between the reactant and product (both optimised at
            ``level``) and a Sella saddle search at this level give the start of the saddle
            search at ``level``. Hartree-Fock/3-21G is fast and its saddles lie close to DFT's.
        neb_images: NEB images including the two ends.
        neb_steps: maximum NEB optimiser steps.
        neb_fmax: NEB convergence, eV/Angstrom.
        ts_fmax: Sella convergence, max force eV/Angstrom.
        ts_steps: maximum Sella steps.
        imag_tol_cm: frequencies below -imag_tol_cm count as imaginary, cm^-1 (smaller negative
            ones are numerical noise of the projection).
        irc_dx: IRC step, Angstrom amu^1/2 (mass weighted).
        irc_steps: maximum IRC steps per direction.
        irc_fmax: IRC stops when max force falls below this, eV/Angstrom.
        n_irc: IRC points kept and labelled per direction (evenly spaced along the path).
        n_nms: normal-mode samples per stationary point (reactant, product, TS).
        temperature: NMS temperature, Kelvin.
        min_freq_cm: modes softer than this are not displaced, cm^-1.
        max_rectilinear_stretch: modes whose straight-line displacement by their thermal RMS
            amplitude lengthens a bond by more than this fraction at second order (librations,
            hindered rotations: see :func:`phljax.datagen.sampling.rectilinear_stretch`) are not
            displaced either.
        labels: one of :data:`LABELS`: ``"hessian"`` (analytic) or ``"hvp"`` (K finite-difference
            HVPs per geometry).
        num_probes: K, probes per geometry for ``labels="hvp"``.
        probe_kind: one of :data:`phljax.datagen.labels.PROBE_KINDS` (``"gaussian"`` or ``"onehot"``).
        fd_step: finite-difference displacement for HVP labels, Angstrom.
        endpoint_rmsd: IRC end and reactant/product are the same minimum when their bond graphs
            agree, or (same graph for both ends, e.g. a rotamer) the end is within this RMSD,
            Angstrom, of one and nearer to it than to the other.
        seed: base seed of NMS displacements and probes.
        max_asym_rel, max_sum_rule_rel: Hessian checks (relative to max |H|), the
            :data:`ACCEPTANCE` limits; defaults :data:`phljax.datagen.dft.HESSIAN_LIMITS` (see
            :class:`~phljax.datagen.dft.HessianLimits` for why they are what they are).
    """

    level: LevelOfTheory = LevelOfTheory()
    guess_xc: str = "hf"
    guess_basis: str = "3-21g"
    neb_images: int = 7
    neb_steps: int = 300
    neb_fmax: float = 0.2
    ts_fmax: float = 0.02
    ts_steps: int = 150
    imag_tol_cm: float = IMAG_TOL_CM
    irc_dx: float = 0.15
    irc_steps: int = 40
    irc_fmax: float = 0.1
    n_irc: int = 8
    n_nms: int = 20
    temperature: float = NMS_TEMPERATURE
    min_freq_cm: float = MIN_FREQ_CM
    max_rectilinear_stretch: float = 0.04
    labels: str = "hessian"
    num_probes: int = 4
    probe_kind: str = "gaussian"
    fd_step: float = FD_STEP
    endpoint_rmsd: float = ENDPOINT_RMSD
    seed: int = 0
    max_asym_rel: float = HESSIAN_LIMITS.max_asym_rel
    max_sum_rule_rel: float = HESSIAN_LIMITS.max_sum_rule_rel

    def __post_init__(self):
        if self.labels not in LABELS:
            raise ValueError(f"labels must be one of {LABELS}, got {self.labels!r}")
        if self.probe_kind not in PROBE_KINDS:
            raise ValueError(f"probe_kind must be one of {PROBE_KINDS}, got {self.probe_kind!r}")
        if self.neb_images < 3:
            raise ValueError(f"neb_images must be >= 3, got {self.neb_images}")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ReactionConfig:
        d = dict(d)
        d["level"] = LevelOfTheory(**d["level"])
        return cls(**d)
