"""The training run: data -> model -> epochs with validation, checkpoints, early stopping -> test errors."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from phljax import data as phdata
from phljax.checkpoint import Checkpointer
from phljax.config import Config
from phljax.data.records import Molecule
from phljax.evaluation import accumulate_errors, format_table
from phljax.losses import SCHEMES
from phljax.models import build_model, init_params, make_energy_fn
from phljax.train.optim import learning_rate_scale, make_optimizer
from phljax.train.step import TrainState, make_eval_step
from phljax.units import KCAL_MOL

__all__ = ["Run", "prepare", "train"]

# Fields that may change when a run is resumed from its work directory.
_RESUMABLE = {
    "epochs", "progress", "early_stopping", "workdir", "devices", "hessian_chunk",
    "coordinator_address", "num_processes", "process_id",
}  # fmt: skip


class Run:
    """Everything a run derives from its config: data splits, model, budget, functions."""

    def __init__(self, config: Config, molecules: Sequence[Molecule]):
        self.config = config
        self.dtype = np.float64 if config.x64 else np.float32
        phdata.check_elements(molecules, config.elements)
        loss_config = config.loss()
        self.loss_config = loss_config
        # Held-out categories (e.g. the paper's IRC and NMS sets) are never trained on: all test.
        categories = np.array([str(m.meta.get("category", "")) for m in molecules])
        held = np.isin(categories, list(config.holdout))
        if config.holdout and not held.any():
            raise ValueError(f"--holdout {list(config.holdout)}: no molecule has these categories "
                             f"(the data have {sorted(set(categories.tolist()))})")  # fmt: skip
        pool = np.nonzero(~held)[0]
        train_idx, val_idx, test_idx = (
            pool[i]
            for i in phdata.split(
                len(pool),
                (1 - config.val_fraction - config.test_fraction, config.val_fraction, config.test_fraction),
                config.split_seed,
            )
        )
        test_idx = np.sort(np.concatenate([test_idx, np.nonzero(held)[0]]))
        # global molecule indices key the fixed probes; keep them through the split
        self.molecules = list(molecules)
        self.splits = {"train": train_idx, "val": val_idx, "test": test_idx}
        if len(train_idx) == 0:
            raise ValueError("the training split is empty")
        train = [self.molecules[i] for i in train_idx]
        self._check_labels(train)

        atomic_energies = phdata.fit_atomic_energies(train, config.elements)
        self.model_spec = dict(
            elements=config.elements,
            channels=config.channels,
            num_layers=config.num_layers,
            lmax=config.lmax,
            cutoff=config.cutoff,
            num_radial=config.num_radial,
            radial_hidden=config.radial_hidden,
            avg_num_neighbors=phdata.mean_neighbors(train, config.cutoff),
            atomic_energies=atomic_energies.tolist(),
            scale=phdata.force_rms(train),
        )
        self.model = build_model(**self.model_spec)
        self.energy_fn = make_energy_fn(self.model)
        self.has_hessian = all(m.hessian is not None for m in self.molecules)
        num_stored = min((m.num_probes for m in self.molecules), default=0)
        from phljax import parallel  # noqa: PLC0415

        parallel.initialize_distributed(config.coordinator_address, config.num_processes, config.process_id)
        self.n_devices = parallel.resolve_devices(config.devices, config.batch_size)  # all processes
        self.local_slots = parallel.local_slots(self.n_devices)  # this process's devices on the mesh
        self.budget = phdata.budget_for(  # one device's share of a global batch
            self.molecules,
            config.batch_size // self.n_devices,
            config.cutoff,
            with_hessian=self.has_hessian and loss_config.needs_hessian,  # E-F batches carry no Hessians
            num_probes=config.num_probes if loss_config.probe_mode == "data" and num_stored else 0,
        )
        # evaluation batches carry reference Hessians whenever the data have them
        self.eval_budget = dataclasses.replace(self.budget, with_hessian=self.has_hessian)
        self.steps_per_epoch = int(np.ceil(len(train_idx) / config.batch_size))

    def _check_labels(self, train: Sequence[Molecule]) -> None:
        lc = self.loss_config
        for i, m in enumerate(train):
            where = m.meta.get("origin", f"molecule {i}")
            if m.energy is None or m.forces is None:
                raise ValueError(f"{where}: every scheme needs energies and forces")
            if lc.needs_hessian and m.hessian is None:
                raise ValueError(
                    f"{where}: --probe={lc.probe} --probe-mode={lc.probe_mode} needs reference Hessians; "
                    "use --probe-mode=data for files with stored probes and HVPs"
                )
            if lc.uses_hvp and lc.probe_mode == "data" and m.num_probes < lc.num_probes:
                raise ValueError(f"{where}: --probe-mode=data needs {lc.num_probes} stored probes, has {m.num_probes}")

    def optimizer(self):
        """The configured optimizer; its plateau logic counts this run's steps per epoch."""
        c = self.config
        return make_optimizer(
            c.learning_rate,
            weight_decay=c.weight_decay,
            grad_clip=c.grad_clip,
            lr_factor=c.lr_factor,
            lr_patience=c.lr_patience,
            steps_per_epoch=self.steps_per_epoch,
        )

    def subset(self, name: str) -> list[tuple[int, Molecule]]:
        return [(int(i), self.molecules[i]) for i in self.splits[name]]

    def batches(self, name: str, shuffle_seed: int | None = None):
        """Padded batches of a split (`graph_index` = global molecule index, which keys probes)."""
        items = self.subset(name)
        index = np.array([i for i, _ in items])
        mols = [m for _, m in items]
        for batch in phdata.iterate_batches(
            mols, self.budget, self.config.cutoff, shuffle_seed=shuffle_seed, dtype=self.dtype
        ):
            yield batch._replace(
                graph_index=np.where(batch.graph_index >= 0, index[batch.graph_index], -1).astype(np.int32)
            )

    def global_batches(self, name: str, shuffle_seed: int | None = None):
        """Global batches of `batch_size` molecules, split evenly into one padded batch per device;
        yields this process's sub-batches stacked on a leading [len(local_slots)] axis."""
        from phljax.parallel import stack  # noqa: PLC0415

        index = self.splits[name]
        if shuffle_seed is not None:
            index = index[np.random.default_rng(shuffle_seed).permutation(len(index))]
        size, per = self.config.batch_size, self.config.batch_size // self.n_devices
        for start in range(0, len(index), size):
            chunk = index[start : start + size]
            parts = [chunk[d * per : (d + 1) * per] for d in self.local_slots]
            yield stack(
                [
                    phdata.make_batch(
                        [self.molecules[i] for i in part], self.budget, self.config.cutoff, part, self.dtype
                    )
                    for part in parts
                ]
            )


def prepare(config: Config) -> Run:
    """Load the configured data (or the bundled reaction set, RTP + IRC + NMS) and derive the run."""
    if config.x64:
        jax.config.update("jax_enable_x64", True)
    paths = list(config.data) or phdata.default_data()
    molecules = phdata.load(paths, energy_unit=config.energy_unit, length_unit=config.length_unit)
    return Run(config, molecules)


def _check_workdir(config: Config) -> None:
    path = os.path.join(config.workdir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        new = json.loads(config.to_json())
        changed = {k for k in new if k not in _RESUMABLE and old.get(k) != new[k]}
        if changed:
            raise ValueError(
                f"{config.workdir} holds a run with a different config ({sorted(changed)}); "
                "use a new --workdir or the same settings to resume"
            )
    from phljax.parallel import barrier, is_main_process  # noqa: PLC0415

    barrier("check_workdir")  # every process has read the old config before process 0 writes
    if is_main_process():
        os.makedirs(config.workdir, exist_ok=True)
        with open(path, "w") as f:
            f.write(config.to_json())


def train(config: Config, run: Run | None = None) -> dict:
    """Train, resume if `config.workdir` holds a checkpoint, evaluate the best model on the test split.

    Writes `<workdir>/config.json`, `metrics.jsonl` (one line per epoch), checkpoints and
    `results.json`; returns the results dict and prints the results table.
    """
    from phljax.parallel import data_parallel_steps, is_main_process  # noqa: PLC0415 (parallel builds on train)

    run = run or prepare(config)
    _check_workdir(config)
    if is_main_process():
        with open(os.path.join(config.workdir, "model.json"), "w") as f:
            json.dump(run.model_spec, f, indent=2)  # everything evaluate.py needs to rebuild the model
    optimizer = run.optimizer()
    chunk = config.hessian_chunk or None
    first = next(run.batches("train"))
    params = init_params(run.model, first, jax.random.PRNGKey(config.seed))
    state = TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32), jax.random.PRNGKey(config.seed + 1))
    record = {
        "state": state._asdict(),
        "epoch": np.zeros((), np.int32),
        "best_val": np.array(np.inf),
        "bad_epochs": np.zeros((), np.int32),
        "monitor": np.array(1e30),
    }
    ckpt = Checkpointer(config.workdir)
    restored = ckpt.restore_latest(record)
    if restored is not None:
        record = restored
        state = TrainState(**record["state"])
    start = int(record["epoch"])

    train_step, val_loss_step, put = data_parallel_steps(run, optimizer, hessian_chunk=chunk)
    state = put(state)

    metrics_path = os.path.join(config.workdir, "metrics.jsonl")
    best_val, bad, monitor = float(record["best_val"]), int(record["bad_epochs"]), float(record["monitor"])
    epochs = tqdm(
        range(start, config.epochs),
        initial=start,
        total=config.epochs,
        disable=not config.progress or not is_main_process(),
        desc=SCHEMES[config.probe],
    )
    for epoch in epochs:
        if config.early_stopping and bad >= config.early_stopping:
            break
        t0 = time.perf_counter()
        sums = collections.defaultdict(float)
        n = 0
        for batch in run.global_batches("train", shuffle_seed=config.seed * 100003 + epoch):
            state, m = train_step(state, batch, jnp.asarray(monitor, run.dtype))
            for k, v in m.items():
                sums[k] += v
            n += 1
        train_metrics = {k: float(v) / n for k, v in jax.device_get(dict(sums)).items()}
        t_train = time.perf_counter() - t0
        val = _mean_loss(val_loss_step, state.params, run) if len(run.splits["val"]) else train_metrics["loss"]
        monitor = val
        improved = val < best_val
        if improved:
            best_val, bad = val, 0
        else:
            bad += 1
        line = {
            "epoch": epoch + 1,
            "step": int(state.step),
            **{f"train_{k}": v for k, v in train_metrics.items()},
            "val_loss": val,
            "lr": config.learning_rate * learning_rate_scale(state.opt_state),
            "epoch_time_s": t_train,
            "wall_time_s": time.perf_counter() - t0,
        }
        if is_main_process():
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
    best = ckpt.restore_best(record)
    ckpt.close()
    params = best["state"]["params"] if best is not None else jax.device_get(state.params)
    return _finish(config, run, params)


def _mean_loss(loss_step, params, run: Run) -> float:
    total = count = 0.0
    for batch in run.global_batches("val"):
        s, c = jax.device_get(loss_step(params, batch))
        total, count = total + float(s), count + float(c)
    return total / max(count, 1.0)


def _epoch_times(workdir: str) -> list[float]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line)["epoch_time_s"] for line in f if line.strip()]


def _finish(config: Config, run: Run, params) -> dict:
    from phljax.parallel import is_main_process  # noqa: PLC0415

    eval_step = jax.jit(
        make_eval_step(run.energy_fn, with_hessian=run.has_hessian, hessian_chunk=config.hessian_chunk or None)
    )
    subsets = {"test": [m for _, m in run.subset("test")]}
    paper_order = {"rtp": 0, "irc": 1, "nms": 2}  # the paper's test sets first, then any others
    categories = sorted({str(m.meta["category"]) for m in subsets["test"] if "category" in m.meta},
                        key=lambda c: (paper_order.get(c, 3), c))  # fmt: skip
    if len(categories) > 1:
        for c in categories:
            subsets[f"test/{c}"] = [m for m in subsets["test"] if str(m.meta.get("category")) == c]
    errors = {
        name: accumulate_errors(eval_step, params, mols, run.eval_budget, config.cutoff, run.dtype)
        for name, mols in subsets.items()
        if mols
    }
    times = _epoch_times(config.workdir)
    steady = times[1:] or times  # the first epoch includes compilation
    results = {
        "scheme": SCHEMES[config.probe],
        "config": json.loads(config.to_json()),
        "errors_ev": errors,
        "errors_kcal_mol": {
            name: {k: (v / KCAL_MOL if k != "n_molecules" else v) for k, v in r.items()} for name, r in errors.items()
        },
        "epochs_run": len(times),
        "mean_epoch_time_s": float(np.mean(steady)) if steady else None,
        "first_epoch_time_s": times[0] if times else None,
        "n_molecules": {k: len(v) for k, v in run.splits.items()},
    }
    if is_main_process():
        with open(os.path.join(config.workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        print(f"\n{results['scheme']} ({results['epochs_run']} epochs, {results['n_molecules']})")
        print(format_table(errors, results["mean_epoch_time_s"]))
    return results
