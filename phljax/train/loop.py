"""The training run: data -> splits -> model -> epochs with validation, checkpoints, stopping -> test errors.

`prepare(config)` derives everything a run needs from its config and data with plain functions
(`split_indices`, `dataset_statistics`, `distributed.resolve_devices`, `batch_budgets`) and
returns it as a `Run` record; `train(config, run)` runs the epochs on the sharded step
(`phljax.train.sharded`) and evaluates the best checkpoint (`phljax.evaluation`). The
distributed runtime is initialised by the entry point (`experiments/run.py`) before either is
called (`phljax.distributed.initialize`).

A run stops at the first of: `epochs` (the cap), `early_stopping` epochs without a better
validation loss, or the learning rate at its plateau floor (`min_lr_scale`) with `lr_patience`
epochs without improvement there (converged: it cannot fall further). `results.json` says which.
Neither rule, nor the plateau schedule, counts the first `plateau_warmup` epochs.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from phljax import compile_cache, distributed
from phljax import data as phdata
from phljax.checkpoint import Checkpointer, CheckpointError
from phljax.config import Config
from phljax.data.batching import BatchBudget, GraphBatch
from phljax.data.records import Molecule
from phljax.evaluation import (
    accumulate_errors,
    format_table,
    in_kcal_mol,
    make_eval_step,
    stationary_metrics,
    test_subsets,
)
from phljax.files import write_atomic
from phljax.losses import SCHEMES, STORED_PROBE_MODES, LossConfig
from phljax.models import build_model, init_params, make_energy_fn
from phljax.models.energy import EnergyFn
from phljax.models.nequip import NequIP
from phljax.potential import Potential
from phljax.train import seeds
from phljax.train.optim import (
    FIRST_MONITOR,
    continue_warmup,
    learning_rate_scale,
    make_optimizer,
    nonfinite_steps,
)
from phljax.train.sharded import data_parallel_steps, global_batches
from phljax.train.step import TrainState

__all__ = ["Run", "prepare", "check_labels", "batch_budgets", "split_batches", "initial_record", "train"]


@dataclasses.dataclass
class Run:
    """What a run derives from its config and data (built by `prepare`; holds, does not compute)."""

    config: Config
    loss_config: LossConfig
    molecules: list[Molecule]  # every record; split indices and probe keys refer to this list
    splits: dict[str, np.ndarray]  # 'train' | 'val' | 'test' -> sorted int indices
    model_spec: dict  # model.json: hyper-parameters and data statistics
    model: NequIP
    energy_fn: EnergyFn
    n_devices: int  # on the mesh, all processes
    budget: BatchBudget  # one device's training batch
    eval_budget: BatchBudget  # evaluation batches (with Hessians whenever the data have them)
    steps_per_epoch: int

    @property
    def dtype(self):
        return np.float64 if self.config.x64 else np.float32

    @property
    def has_hessian(self) -> bool:
        return self.eval_budget.with_hessian

    def subset(self, name: str) -> list[Molecule]:
        """The records of split `name`."""
        return [self.molecules[i] for i in self.splits[name]]

    def unidentified_formulas(self) -> dict[str, list[str]]:
        """{'val' | 'test': formulas whose total energy the training compositions do not fix}
        (`phljax.data.unidentified_formulas`; splits without any are left out)."""
        train = self.subset("train")
        found = {
            name: phdata.unidentified_formulas(train, self.subset(name), self.config.elements)
            for name in ("val", "test")
        }
        return {name: formulas for name, formulas in found.items() if formulas}

    def optimizer(self):
        """The configured optimizer; its plateau logic counts this run's steps per epoch."""
        c = self.config
        return make_optimizer(
            c.learning_rate,
            weight_decay=c.weight_decay,
            grad_clip=c.grad_clip,
            lr_factor=c.lr_factor,
            lr_patience=c.lr_patience,
            min_lr_scale=c.min_lr_scale,
            steps_per_epoch=self.steps_per_epoch,
            plateau_warmup=c.plateau_warmup,
        )


def check_labels(molecules: Sequence[Molecule], loss_config: LossConfig) -> None:
    """Raise a ValueError naming the first record that lacks a label the scheme trains on."""
    lc = loss_config
    for i, m in enumerate(molecules):
        where = m.meta.get("origin", f"molecule {i}")
        if m.energy is None or m.forces is None:
            raise ValueError(f"{where}: every scheme needs energies and forces")
        if lc.needs_hessian and m.hessian is None:
            raise ValueError(
                f"{where}: --probe={lc.probe} --probe-mode={lc.probe_mode} needs reference Hessians; "
                "use --probe-mode=data for files with stored probes and HVPs"
            )
        if lc.uses_hvp and lc.probe_mode in STORED_PROBE_MODES and m.num_probes < lc.num_probes:
            raise ValueError(f"{where}: --probe-mode={lc.probe_mode} needs {lc.num_probes} stored probes, "
                             f"has {m.num_probes}")  # fmt: skip


def batch_budgets(molecules: Sequence[Molecule], config: Config, n_devices: int) -> tuple[BatchBudget, BatchBudget]:
    """(one device's training budget, the evaluation budget), sized for every record.

    Training batches carry reference Hessians only when the scheme needs them (E-F batches carry
    none), stored probes only in `--probe-mode=data` (the first K) or `pool` (all, K drawn per
    step); evaluation batches carry Hessians whenever every record has one.
    """
    lc = config.loss()
    has_hessian = all(m.hessian is not None for m in molecules)
    num_stored = min((m.num_probes for m in molecules), default=0)
    budget = phdata.budget_for(
        molecules,
        config.batch_size // n_devices,
        config.cutoff,
        with_hessian=has_hessian and lc.needs_hessian,
        num_probes={"data": config.num_probes, "pool": num_stored}.get(lc.probe_mode, 0) if num_stored else 0,
    )
    return budget, dataclasses.replace(budget, with_hessian=has_hessian)


def prepare(config: Config, molecules: Sequence[Molecule] | None = None) -> Run:
    """Everything a run derives from `config` and its data (loaded from `config.data`, or the
    bundled reaction set, unless `molecules` are given).

    Raises:
        ValueError: for data the scheme cannot train on, a bad split, or a device count that does
            not fit (each quoting what was received); also when the config asks for several
            processes and `phljax.distributed.initialize` has not been called.
    """
    if config.x64:
        jax.config.update("jax_enable_x64", True)
    compile_cache.enable(config.compile_cache)
    if distributed.requested(config.coordinator_address, config.num_processes, config.process_id) and not (
        jax.distributed.is_initialized()
    ):
        raise ValueError(
            "this config asks for several processes: call phljax.distributed.initialize(coordinator_address, "
            "num_processes, process_id) first, before anything touches a JAX device (experiments/run.py does)"
        )
    if molecules is None:
        paths = list(config.data) or phdata.default_data()
        molecules = phdata.load(paths, energy_unit=config.energy_unit, length_unit=config.length_unit)
    molecules = phdata.select_records(molecules, config.select)
    phdata.check_elements(molecules, config.elements)
    loss_config = config.loss()
    splits = phdata.split_indices(
        molecules,
        val_fraction=config.val_fraction,
        test_fraction=config.test_fraction,
        seed=config.split_seed,
        holdout=config.holdout,
        test_reactions=config.test_reactions,
    )
    train_set = [molecules[i] for i in splits["train"]]
    check_labels(train_set, loss_config)
    model_spec = {
        **config.model_hyperparameters(),
        **phdata.dataset_statistics(train_set, config.elements, config.cutoff),
    }
    model = build_model(**model_spec)
    n_devices = distributed.resolve_devices(config.devices, config.batch_size)
    budget, eval_budget = batch_budgets(molecules, config, n_devices)
    return Run(
        config=config,
        loss_config=loss_config,
        molecules=molecules,
        splits=splits,
        model_spec=model_spec,
        model=model,
        energy_fn=make_energy_fn(model),
        n_devices=n_devices,
        budget=budget,
        eval_budget=eval_budget,
        steps_per_epoch=int(np.ceil(len(splits["train"]) / config.batch_size)),
    )


def split_batches(run: Run, name: str, shuffle_seed: int | None = None) -> Iterator[GraphBatch]:
    """Global batches of split `name`, this process's sub-batches stacked (see `global_batches`)."""
    c = run.config
    return global_batches(
        run.molecules,
        run.splits[name],
        run.budget,
        batch_size=c.batch_size,
        n_devices=run.n_devices,
        cutoff=c.cutoff,
        shuffle_seed=shuffle_seed,
        dtype=run.dtype,
    )


def _check_workdir(config: Config) -> None:
    """Refuse a work directory that holds a run of another config; write config.json."""
    path = os.path.join(config.workdir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.loads(Config.from_json(f.read()).to_json())  # fields added since: their defaults
        new = json.loads(config.to_json())
        changed = {k for k in new if k not in Config.resumable_fields() and old.get(k) != new[k]}
        if changed:
            raise ValueError(
                f"{config.workdir} holds a run with a different config ({sorted(changed)}); "
                "use a new --workdir or the same settings to resume"
            )
    distributed.barrier("check_workdir")  # every process has read the old config before process 0 writes
    if distributed.is_main_process():
        try:
            os.makedirs(config.workdir, exist_ok=True)
            write_atomic(path, config.to_json())
        except OSError as e:  # read-only, full, or not a directory: say so before any training
            raise OSError(e.errno, f"cannot write the work directory {config.workdir!r} ({e.strerror})") from e


def _truncate_metrics(path: str, epochs: int) -> None:
    """Keep the lines of the first `epochs` epochs: a run killed after writing an epoch's line but
    before checkpointing it redoes that epoch (deterministically) and writes the line again."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = []
    for line in lines:
        try:
            if json.loads(line)["epoch"] <= epochs:
                kept.append(line)
        except (json.JSONDecodeError, KeyError):  # a line cut short by a kill: the epoch is redone
            continue
    if len(kept) != len(lines):
        write_atomic(path, "".join(kept))


def initial_record(run: Run, optimizer) -> dict:
    """The state a new run starts from, in the checkpoint's layout."""
    keys = seeds.run_keys(run.config.seed)
    first = run.subset("train")[: run.budget.n_graphs - 1]  # the parameters are built on one batch's shapes
    params = init_params(run.model, phdata.make_batch(first, run.budget, run.config.cutoff, dtype=run.dtype), keys.init)
    state = TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32), keys.probes)
    return {
        "state": state._asdict(),
        "epoch": np.zeros((), np.int32),
        "best_val": np.array(np.inf),
        "bad_epochs": np.zeros((), np.int32),
        "monitor": np.array(FIRST_MONITOR),
    }


def train(config: Config, run: Run | None = None) -> dict:
    """Train, resume if `config.workdir` holds a checkpoint, evaluate the best model on the test split.

    Writes `<workdir>/config.json`, `model.json`, `metrics.jsonl` (one line per epoch), checkpoints
    and `results.json`; returns the results dict and prints the results table.
    """
    started, compiles = time.perf_counter(), compile_cache.CompileLog()
    run = run or prepare(config)
    _check_workdir(config)
    if distributed.is_main_process():
        with open(os.path.join(config.workdir, "model.json"), "w") as f:
            json.dump(run.model_spec, f, indent=2)  # everything Potential.from_workdir needs to rebuild the model
    optimizer = run.optimizer()
    ckpt = Checkpointer(config.workdir)
    record = initial_record(run, optimizer)
    metrics_path = os.path.join(config.workdir, "metrics.jsonl")
    restored = ckpt.restore_latest(record)
    if restored is not None:
        record = restored
    elif _epoch_times(config.workdir) and _checkpoint_steps(ckpt):
        raise CheckpointError(
            f"{config.workdir}: metrics.jsonl records epochs and checkpoint folders exist, but orbax finds no "
            f"checkpoint in them; refusing to start from scratch: move {ckpt.root} away to do that"
        )
    state = TrainState(**record["state"])
    start = int(record["epoch"])
    if restored is not None:
        try:
            state = state._replace(opt_state=continue_warmup(state.opt_state, start, config.plateau_warmup))
        except ValueError as e:
            raise ValueError(f"{config.workdir}: cannot resume under --plateau-warmup: {e}; start it afresh") from e
    if restored is not None and int(record["bad_epochs"]) == 0 and ckpt.best.latest_step() != start:
        ckpt.save_best(start, record)  # killed between epoch `start`'s latest save and its best save

    keys = seeds.run_keys(config.seed)
    train_step, val_loss_step, put = data_parallel_steps(
        run.energy_fn, run.loss_config, optimizer, run.n_devices, val_key=keys.val,
        hessian_chunk=config.hessian_chunk or None,
    )  # fmt: skip
    eval_step = jax.jit(
        make_eval_step(run.energy_fn, with_hessian=run.has_hessian, hessian_chunk=config.hessian_chunk or None)
    )
    state = put(state)
    if distributed.is_main_process():
        _truncate_metrics(metrics_path, start)
    best_val, bad, monitor = float(record["best_val"]), int(record["bad_epochs"]), float(record["monitor"])
    epochs = tqdm(
        range(start, config.epochs),
        initial=start,
        total=config.epochs,
        disable=not config.progress or not distributed.is_main_process(),
        desc=SCHEMES[config.probe],
    )
    stopped, first_step_s = "epochs", None
    for epoch in epochs:
        reason = _stop_reason(config, bad, learning_rate_scale(state.opt_state))
        if reason:
            stopped = reason
            break
        t0 = time.perf_counter()
        skipped_before = nonfinite_steps(state.opt_state)[0]
        sums = collections.defaultdict(float)
        n = 0  # steps whose loss was finite (a skipped step's metrics are NaN: left out of the means)
        for batch in split_batches(run, "train", shuffle_seed=seeds.shuffle_seed(config.seed, epoch)):
            state, m = train_step(state, batch, jnp.asarray(monitor, run.dtype))
            if first_step_s is None:  # the user's first wait: start to the first finished step (one sync)
                jax.block_until_ready(m["loss"])
                first_step_s = time.perf_counter() - started
            finite = jnp.isfinite(m["loss"])
            for k, v in m.items():
                sums[k] += jnp.where(finite, v, 0.0)  # on the device: no sync per step
            n += finite.astype(jnp.int32)
        skipped, in_a_row = nonfinite_steps(state.opt_state)
        skipped -= skipped_before
        n = int(n)
        train_metrics = {k: float(v) / n if n else float("nan") for k, v in jax.device_get(dict(sums)).items()}
        t_train = time.perf_counter() - t0
        if in_a_row >= config.max_nonfinite_steps:
            raise FloatingPointError(
                f"{config.workdir}: epoch {epoch + 1}: the last {in_a_row} updates had non-finite gradients and were "
                f"skipped (--max-nonfinite-steps {config.max_nonfinite_steps}); nothing of them was saved. Check the "
                "labels for NaN/inf, or lower --learning-rate"
            )
        val = _mean_loss(val_loss_step, state.params, run) if len(run.splits["val"]) else train_metrics["loss"]
        if not np.isfinite(val):
            raise FloatingPointError(
                f"{config.workdir}: epoch {epoch + 1}: the validation loss is {val} with finite parameters: "
                "a validation label is not finite"
            )
        monitor = val
        improved = val < best_val
        if improved or epoch + 1 <= config.plateau_warmup:  # the warm-up counts no bad epoch
            best_val, bad = min(val, best_val), 0
        else:
            bad += 1
        line = {
            "epoch": epoch + 1,
            "step": int(state.step),
            **{f"train_{k}": v for k, v in train_metrics.items()},
            "val_loss": val,
            "lr": config.learning_rate * learning_rate_scale(state.opt_state),
            "nonfinite_steps": skipped,
            "epoch_time_s": t_train,
        }
        if (
            config.val_errors_every
            and len(run.splits["val"])
            and ((epoch + 1) % config.val_errors_every == 0 or epoch + 1 == config.epochs)
        ):
            errors = accumulate_errors(eval_step, state.params, run.subset("val"), run.eval_budget, config.cutoff,
                                       run.dtype)  # fmt: skip
            line.update({f"val_{k}": v for k, v in errors.items() if k.endswith("_rmse")})  # eV units
        line["wall_time_s"] = time.perf_counter() - t0
        if distributed.is_main_process():
            with open(metrics_path, "a") as f:
                f.write(json.dumps(line) + "\n")
        epochs.set_postfix(loss=f"{train_metrics['loss']:.3g}", val=f"{val:.3g}")
        record = {
            "state": jax.device_get(state)._asdict(),
            "epoch": np.array(epoch + 1, np.int32),
            "best_val": np.array(best_val),
            "bad_epochs": np.array(bad, np.int32),
            "monitor": np.array(monitor),
        }
        ckpt.save(epoch + 1, record, is_best=improved)
    else:
        stopped = _stop_reason(config, bad, learning_rate_scale(state.opt_state)) or "epochs"
    best = ckpt.restore_best(record)
    ckpt.close()
    params = put(best["state"]["params"]) if best is not None else state.params  # replicated, as in training:
    startup = {"first_step_s": first_step_s, **compiles.summary()}  # summary before the test evaluation
    return _finish(config, run, eval_step, params, stopped, startup)  # the eval step traced for validation serves


def _stop_reason(config: Config, bad: int, lr_scale: float) -> str | None:
    """Why the run stops before another epoch: 'early_stopping', 'lr_floor' or None (go on)."""
    if config.early_stopping and bad >= config.early_stopping:
        return "early_stopping"
    if lr_scale <= config.min_lr_scale * (1 + 1e-6) and bad >= config.lr_patience:
        return "lr_floor"
    return None


def _checkpoint_steps(ckpt: Checkpointer) -> list[str]:
    """Step folders (named by a number) under the checkpoint managers, readable or not."""
    found = []
    for manager in ("latest", "best"):
        folder = os.path.join(ckpt.root, manager)
        if os.path.isdir(folder):
            found += [os.path.join(folder, d) for d in os.listdir(folder) if d.isdigit()]
    return found


def _mean_loss(loss_step, params, run: Run) -> float:
    total = count = 0.0
    for batch in split_batches(run, "val"):
        s, c = jax.device_get(loss_step(params, batch))
        total, count = total + float(s), count + float(c)
    return total / max(count, 1.0)


def _epoch_times(workdir: str) -> list[float]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line)["epoch_time_s"] for line in f if line.strip()]


def _finish(config: Config, run: Run, eval_step, params, stopped: str, startup: dict) -> dict:
    subsets = test_subsets(run.subset("test"), "test")
    potential = Potential(run.model, jax.device_get(params), config=config, spec=run.model_spec)
    errors = {
        name: {
            **accumulate_errors(eval_step, params, mols, run.eval_budget, config.cutoff, run.dtype),
            **stationary_metrics(potential, mols),  # frequencies etc. at the reactants, products and TSs
        }
        for name, mols in subsets.items()
    }
    times = _epoch_times(config.workdir)
    steady = times[1:] or times  # the first epoch includes compilation
    results = {
        "scheme": SCHEMES[config.probe],
        "config": json.loads(config.to_json()),
        "errors_ev": errors,
        "errors_kcal_mol": in_kcal_mol(errors),
        "epochs_run": len(times),
        "stopped": stopped,  # epochs (the cap) | early_stopping | lr_floor
        "mean_epoch_time_s": float(np.mean(steady)) if steady else None,
        "first_epoch_time_s": times[0] if times else None,
        "n_molecules": {k: len(v) for k, v in run.splits.items()},
        # formulas whose absolute energy errors are not meaningful: compare energy_rel_* there
        "unidentified_formulas": run.unidentified_formulas(),
        # this process: seconds from train() to its first finished step, XLA programs compiled (or
        # loaded from the compile cache) up to the test evaluation, by function
        "startup": startup,
    }
    if distributed.is_main_process():
        with open(os.path.join(config.workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        print(f"\n{results['scheme']} ({results['epochs_run']} epochs, {results['n_molecules']})")
        print(format_table(errors, results["mean_epoch_time_s"]))
        for name, formulas in results["unidentified_formulas"].items():
            print(
                f"{name}: the training compositions do not fix the total energy of {', '.join(formulas)}; "
                "their energy errors include an arbitrary offset (energy_rel_* removes it per formula)"
            )
        if startup["first_step_s"] is not None:
            print(
                f"first training step after {startup['first_step_s']:.1f} s; {startup['programs']} XLA programs "
                f"({startup['from_cache']} from the compile cache) took {startup['seconds']:.1f} s to compile or load"
            )
    return results
