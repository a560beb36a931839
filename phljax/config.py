"""The one place for configuration: a flat `Config` dataclass, its CLI flags and its JSON form.

Every field is a command-line flag of `experiments/run.py` (`num_probes` -> `--num-probes`); the
resolved config is written as JSON next to the checkpoints and restored with them.

Defaults and choice lists are not restated here: the loss fields take theirs from
`phljax.losses.LossConfig` and `phljax.losses.CHOICES`, the model fields from `phljax.models.NequIP`,
and `loss()` / `model_hyperparameters()` copy fields by name, so a field added there is one line here.
Fields marked `resumable` may change when a run is resumed from its work directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from collections.abc import Sequence

from phljax.losses import CHOICES, LossConfig
from phljax.models.nequip import NequIP

__all__ = ["Config", "parse_args", "config_parser"]

_LOSS = LossConfig()
_MODEL = {f.name: f.default for f in dataclasses.fields(NequIP)}


def _resumable(default):
    """A field that may differ between a run and its resumption (execution, not science)."""
    return dataclasses.field(default=default, metadata={"resumable": True})


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
    test_reactions: tuple[str, ...] = ()  # reactions (meta 'reaction') kept out of train/val, all tested
    select: tuple[str, ...] = ()  # KEY=VALUE filters on the records' meta, all must hold (e.g. size_bin=10-15)
    # model (defaults: phljax.models.NequIP)
    elements: tuple[int, ...] = tuple(_MODEL["elements"])
    channels: int = _MODEL["channels"]
    num_layers: int = _MODEL["num_layers"]
    lmax: int = _MODEL["lmax"]
    cutoff: float = _MODEL["cutoff"]  # Angstrom
    num_radial: int = _MODEL["num_radial"]
    radial_hidden: int = _MODEL["radial_hidden"]
    # scheme and loss (defaults: phljax.losses.LossConfig, the paper's)
    probe: str = _LOSS.probe  # none (E-F) | onehot | random | full (E-F-H)
    probe_dist: str = _LOSS.probe_dist  # gaussian | rademacher | orthogonal
    num_probes: int = _LOSS.num_probes
    probe_mode: str = _LOSS.probe_mode  # randomized | fixed | data | pool
    energy_weight: float = _LOSS.energy_weight
    force_weight: float = _LOSS.force_weight
    hessian_weight: float = _LOSS.hessian_weight
    energy_norm: str = _LOSS.energy_norm  # sqrt_atoms | none | atoms
    # optimisation
    epochs: int = _resumable(150)  # the cap on epochs
    batch_size: int = 16
    learning_rate: float = 3e-3
    weight_decay: float = 1e-6
    grad_clip: float = 10.0
    lr_factor: float = 0.5  # plateau: multiply the rate by this ...
    lr_patience: int = 15  # ... after this many epochs without validation improvement
    min_lr_scale: float = 1e-3  # ... down to this fraction of learning_rate
    early_stopping: int = _resumable(50)  # stop after this many epochs without improvement (0: never)
    # the first epochs, in which neither the plateau schedule nor early stopping counts epochs without
    # improvement (the best validation loss is still tracked); Keras' start_from_epoch
    plateau_warmup: int = _resumable(0)
    max_nonfinite_steps: int = _resumable(10)  # stop after this many non-finite (skipped) updates in a row
    val_errors_every: int = _resumable(5)  # validation E/F/H RMSE into metrics.jsonl every this many epochs (0: never)
    seed: int = 0  # model initialisation, probes and shuffling (phljax.train.seeds)
    # execution
    workdir: str = _resumable("")  # "" = runs/<probe>
    x64: bool = False
    compile_cache: str = _resumable("auto")  # JAX's persistent compilation cache: auto | off | DIR (compile_cache.py)
    hessian_chunk: int = _resumable(0)  # Hessian columns per HVP batch (0: all at once)
    devices: int = _resumable(0)  # data-parallel devices per process (0: all local devices)
    coordinator_address: str | None = _resumable(None)  # multi-host: host:port of process 0 ($JAX_COORDINATOR_ADDRESS)
    num_processes: int | None = _resumable(None)  # multi-host: process count ($JAX_NUM_PROCESSES, SLURM, else 1)
    process_id: int | None = _resumable(None)  # multi-host: this process's rank ($JAX_PROCESS_ID, SLURM)
    progress: bool = _resumable(True)

    def __post_init__(self):
        self.loss()  # validates the scheme
        for name in ("epochs", "batch_size", "channels", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.val_fraction < 1 or not 0 <= self.test_fraction < 1:
            raise ValueError("val_fraction and test_fraction must lie in [0, 1)")
        if not self.workdir:
            object.__setattr__(self, "workdir", f"runs/{self.probe}")

    def loss(self) -> LossConfig:
        """The loss fields, by name."""
        return LossConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LossConfig)})

    def model_hyperparameters(self) -> dict:
        """The model fields, by name (`phljax.models.build_model` adds the data statistics)."""
        return {name: getattr(self, name) for name in _MODEL if name in _FIELDS}

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Config:
        raw = json.loads(text)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})

    def replace(self, **changes) -> Config:
        return dataclasses.replace(self, **changes)

    @staticmethod
    def resumable_fields() -> frozenset[str]:
        """Fields that may change when a run is resumed."""
        return frozenset(f.name for f in dataclasses.fields(Config) if f.metadata.get("resumable"))


_FIELDS = frozenset(f.name for f in dataclasses.fields(Config))
_HELP = {"workdir": "(default: runs/<probe>)"}


def config_parser(description: str = "", **kwargs) -> argparse.ArgumentParser:
    """An argparse parser with one flag per `Config` field (extra kwargs go to ArgumentParser)."""
    parser = argparse.ArgumentParser(description=description, **kwargs)
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
        if field.name in CHOICES:
            kwargs["choices"] = CHOICES[field.name]
        kwargs["help"] = _HELP.get(field.name, f"(default: {field.default})")
        parser.add_argument(flag, **kwargs)
    return parser


def parse_args(
    argv: Sequence[str] | None = None, base: Config | None = None, parser: argparse.ArgumentParser | None = None
) -> Config:
    """Flags -> Config (unset flags keep `base`'s values; an unset --workdir follows --probe)."""
    ns = vars((parser or config_parser()).parse_args(argv))
    ns = {k: tuple(v) if isinstance(v, list) else v for k, v in ns.items() if k in _FIELDS}
    base = base or Config()
    if "workdir" not in ns and "probe" in ns and base.workdir == f"runs/{base.probe}":
        ns["workdir"] = ""  # the default follows the scheme
    return dataclasses.replace(base, **ns)
