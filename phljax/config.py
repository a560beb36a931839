"""The one place for configuration: a flat `Config` dataclass, its CLI flags and its JSON form.

Every field is a command-line flag of `experiments/run.py` (`num_probes` -> `--num-probes`); the
resolved config is written as JSON next to the checkpoints and restored with them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from collections.abc import Sequence

from phljax.losses import LossConfig

__all__ = ["Config", "parse_args", "config_parser"]


@dataclasses.dataclass(frozen=True)
class Config:
    # data
    data: tuple[str, ...] = ()  # HDF5 files; empty = the bundled reaction set (phljax.data.DEFAULT_DATA)
    energy_unit: str | None = None  # file energy unit override (default: file attribute, else hartree)
    length_unit: str | None = None  # file length unit override (default: file attribute, else angstrom)
    split_seed: int = 0  # train/val/test split is deterministic in this seed
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    holdout: tuple[str, ...] = ()  # data categories kept out of train/val, all tested (e.g. irc nms)
    # model
    elements: tuple[int, ...] = (1, 6, 7, 8)
    channels: int = 16
    num_layers: int = 2
    lmax: int = 2
    cutoff: float = 5.0  # Angstrom
    num_radial: int = 8
    radial_hidden: int = 32
    # scheme and loss
    probe: str = "random"  # none (E-F) | onehot | random | full (E-F-H)
    probe_dist: str = "gaussian"  # gaussian | rademacher
    num_probes: int = 1
    probe_mode: str = "randomized"  # randomized | fixed | data
    energy_weight: float = 1.0
    force_weight: float = 0.30
    hessian_weight: float = 0.09
    energy_norm: str = "sqrt_atoms"  # sqrt_atoms | none | atoms
    # optimisation
    epochs: int = 150
    batch_size: int = 16
    learning_rate: float = 3e-3
    weight_decay: float = 1e-6
    grad_clip: float = 10.0
    lr_factor: float = 0.5  # plateau: multiply the rate by this ...
    lr_patience: int = 15  # ... after this many epochs without validation improvement
    early_stopping: int = 50  # stop after this many epochs without improvement (0: never)
    seed: int = 0
    # execution
    workdir: str = "runs/default"
    x64: bool = False
    hessian_chunk: int = 0  # Hessian columns per HVP batch (0: all at once)
    devices: int = 0  # data-parallel devices per process (0: all local devices)
    coordinator_address: str | None = None  # multi-host: host:port of process 0 (default: $JAX_COORDINATOR_ADDRESS)
    num_processes: int | None = None  # multi-host: process count (default: $JAX_NUM_PROCESSES, SLURM, else 1)
    process_id: int | None = None  # multi-host: this process's rank (default: $JAX_PROCESS_ID, SLURM)
    progress: bool = True

    def __post_init__(self):
        self.loss()  # validates the scheme
        for name in ("epochs", "batch_size", "channels", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.val_fraction < 1 or not 0 <= self.test_fraction < 1:
            raise ValueError("val_fraction and test_fraction must lie in [0, 1)")

    def loss(self) -> LossConfig:
        return LossConfig(
            probe=self.probe,
            probe_dist=self.probe_dist,
            num_probes=self.num_probes,
            probe_mode=self.probe_mode,
            energy_weight=self.energy_weight,
            force_weight=self.force_weight,
            hessian_weight=self.hessian_weight,
            energy_norm=self.energy_norm,
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Config:
        raw = json.loads(text)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})

    def replace(self, **changes) -> Config:
        return dataclasses.replace(self, **changes)


_CHOICES = {
    "probe": ("none", "onehot", "random", "full"),
    "probe_dist": ("gaussian", "rademacher"),
    "probe_mode": ("randomized", "fixed", "data"),
    "energy_norm": ("sqrt_atoms", "none", "atoms"),
}


def config_parser(description: str = "") -> argparse.ArgumentParser:
    """An argparse parser with one flag per `Config` field."""
    parser = argparse.ArgumentParser(description=description)
    hints = typing.get_type_hints(Config)
    for field in dataclasses.fields(Config):
        flag = "--" + field.name.replace("_", "-")
        hint = hints[field.name]
        kwargs = {"default": argparse.SUPPRESS, "dest": field.name}
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is tuple:
            kwargs["nargs"] = "+"
            kwargs["type"] = typing.get_args(hint)[0]
        else:
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            kwargs["type"] = args[0] if args else hint
        if field.name in _CHOICES:
            kwargs["choices"] = _CHOICES[field.name]
        kwargs["help"] = f"(default: {field.default})"
        parser.add_argument(flag, **kwargs)
    return parser


def parse_args(argv: Sequence[str] | None = None, base: Config | None = None) -> Config:
    """Flags -> Config (unset flags keep `base`'s values)."""
    ns = vars(config_parser().parse_args(argv))
    ns = {k: tuple(v) if isinstance(v, list) else v for k, v in ns.items()}
    return dataclasses.replace(base or Config(), **ns)
