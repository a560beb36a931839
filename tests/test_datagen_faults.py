"""Faults of the reaction data pipeline: which errors are chemistry, and killed jobs.

- Only a chemistry failure (`chemistry_errors`: SCF non-convergence, geomeTRIC's and Sella's own
  errors, the pipeline's checks) is recorded as a permanent `*.failed.json`; any other exception
  (a TypeError from a code change, a MemoryError) propagates out of the stage and the run, and
  nothing is recorded, so the next run tries again. The expensive calls are replaced here.
- A `make_dataset.py --workers 2` job (at Hartree-Fock/STO-3G, tests/test_reactions.py's settings)
  whose worker is SIGKILLed mid-labelling, or whose main process is SIGKILLed and which is then
  run again, loses nothing stored and stores nothing half-written: every cache file reads, no
  file is recomputed, the workers of a killed job exit, and the data equal an uninterrupted run's.
  The job labels HCN and HNC and normal-mode samples around them; its TS search is left out
  (recorded as failed), as Sella's IRC alone costs more than the rest together (the whole chain
  is killed and resumed in tests/test_reactions.py).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from ase.calculators.lj import LennardJones
from test_reactions import CFG, HCN, ROOT  # skips this module too without PySCF or Sella

from phljax.data import read_h5
from phljax.datagen import dft, reactions
from phljax.datagen.cache import load_json, load_npz, save_npz
from phljax.datagen.reactions import structure
from phljax.datagen.reactions.checks import chemistry_errors
from phljax.optional import import_sella

#: HCN <-> HNC saddle at HF/STO-3G (ts.npz of the CFG pipeline), Angstrom: a TS guess that skips the NEB
TS = np.array([[0.0, 0.762196, 0.259053], [0.0, -0.414814, 0.015129], [0.0, -0.297382, 1.230825]])


def _chemistry() -> dict[str, type]:
    """The chemistry errors and their subclasses (geomeTRIC's GeomOptNotConvergedError, ...), by name."""
    found, classes = {}, list(chemistry_errors())
    while classes:
        found[classes[-1].__name__] = classes[-1]
        classes += classes.pop().__subclasses__()
    return found


# ---------------------------------------------------------------------------------------------
# which errors are chemistry


def test_chemistry_errors_are_the_chemistry_and_nothing_else():
    import geometric.errors
    from sella.internal import NoValidInternalError
    from sella.optimize.irc import IRCInnerLoopConvergenceFailure

    errors = chemistry_errors()
    for chemistry in (dft.SCFNotConvergedError, dft.HessianCheckError, reactions.TSVerificationError,
                      reactions.NotAMinimumError, geometric.errors.GeomOptNotConvergedError,
                      geometric.errors.LinearTorsionError, geometric.errors.EngineError, NoValidInternalError,
                      IRCInnerLoopConvergenceFailure):  # fmt: skip
        assert issubclass(chemistry, errors), chemistry
    for program in (Exception, TypeError, ValueError, RuntimeError, KeyError, MemoryError, OSError):
        assert not issubclass(program, errors), program
    assert chemistry_errors() is errors  # built once


class _Raiser:
    """A stand-in for an expensive call that raises ``exc`` and counts its calls."""

    def __init__(self, exc: type[BaseException]):
        self.exc, self.calls = exc, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        raise self.exc(f"{self.exc.__name__} from the test")


class _CheapCalc(LennardJones):
    """PySCFCalculator's stand-in for the NEB and the IRC: Lennard-Jones (any level argument)."""

    def __init__(self, level=None):
        super().__init__(sigma=1.0, epsilon=0.01, rc=10.0)
        self.n_gradients = self.n_hessians = 0


class _FakeIRC:
    """sella.IRC's stand-in: each branch takes three small steps, calling the observers."""

    def __init__(self, atoms, **kwargs):
        self.atoms, self.observers = atoms, []

    def attach(self, fn):
        self.observers.append(fn)

    def run(self, fmax, steps, direction):
        sign = 1.0 if direction == "forward" else -1.0
        for _ in range(3):
            self.atoms.positions = self.atoms.positions + sign * 0.01
            for fn in self.observers:
                fn()


def _reaction_dir(tmp_path, stage: str) -> reactions.ReactionDir:
    """hcn_hnc's directory with what ``stage`` starts from (made-up values: nothing is computed)."""
    rxn = reactions.read_reaction(HCN)
    if stage == "ts":
        rxn = dataclasses.replace(rxn, ts_guess=TS)  # Sella straight away, no NEB
    st = reactions.ReactionDir(str(tmp_path), rxn)
    if stage != "optimise":
        for role in ("reactant", "product"):
            pos = getattr(rxn, role)
            save_npz(st.path(f"{role}_opt.npz"), numbers=rxn.numbers, start_positions=pos, positions=pos,
                     energy=-91.6, gmax=0.0, n_steps=1, wall=0.0, converged=True)  # fmt: skip
    if stage in ("irc", "irc_end"):
        save_npz(st.path("ts.npz"), positions=TS, energy=-91.5, wall=0.0)
        save_npz(st.path("hess_ts.npz"), numbers=rxn.numbers, positions=TS, hessian=np.zeros((3, 3, 3, 3)))
    return st


def _optimise(st):
    return structure.optimize_stage(CFG, st, "reactant")


def _ts(st):
    return structure.ts_stage(CFG, st)


def _irc(st):
    return structure.irc_stage(CFG, st)


#: stage -> (the call a _Raiser replaces, the chemistry error it raises there, the stage, its failure record)
STAGES = {
    "optimise": ("optimize_geometry", "SCFNotConvergedError", _optimise, "reactant_opt"),  # geomeTRIC on PySCF
    "ts": ("_sella_saddle", "NoValidInternalError", _ts, "ts"),  # Sella from the file's TS guess
    "neb_guess": ("_sella_saddle", "SCFNotConvergedError", _ts, "ts"),  # NEB, then Sella at both levels
    "irc": ("IRC", "EngineError", _irc, "irc"),  # sella.IRC itself
    "irc_end": ("optimize_geometry", "GeomOptNotConvergedError", _irc, "irc"),  # relaxing an IRC end
}


def _patch(monkeypatch, stage: str, exc) -> _Raiser:
    name = STAGES[stage][0]
    raiser = _Raiser(exc)
    monkeypatch.setattr(structure, "PySCFCalculator", _CheapCalc)  # NEB and IRC energies: nothing to converge
    monkeypatch.setattr(import_sella(), "IRC", _FakeIRC)
    monkeypatch.setattr(import_sella() if name == "IRC" else structure, name, raiser)
    return raiser


def _files(st) -> set[str]:
    return set(os.listdir(st.dir))


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("exc", [TypeError, MemoryError])
def test_a_program_error_propagates_and_records_nothing(stage, exc, tmp_path, monkeypatch):
    """A TypeError (a code change) or a MemoryError in any stage is not chemistry: it reaches the
    caller, and no failure is recorded, so the next run tries the stage again."""
    st = _reaction_dir(tmp_path, stage)
    run_stage = STAGES[stage][2]
    before = {f for f in _files(st) if f.endswith(".npz")}
    raiser = _patch(monkeypatch, stage, exc)
    with pytest.raises(exc, match="from the test"):
        run_stage(st)
    assert raiser.calls == 1
    after = _files(st)
    assert not [f for f in after if f.endswith((".failed.json", ".rejected.json"))], after
    assert {f for f in after if f.endswith(".npz")} == before  # no result, no NEB guess
    with pytest.raises(exc):  # tried again
        run_stage(st)
    assert raiser.calls == 2


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_chemistry_error_is_recorded_and_not_retried(stage, tmp_path, monkeypatch):
    _, name, run_stage, failed = STAGES[stage]
    exc = _chemistry()[name]
    st = _reaction_dir(tmp_path, stage)
    raiser = _patch(monkeypatch, stage, exc)
    assert run_stage(st) is None
    record = st.failed(failed)
    assert record["error"] == exc.__name__ and "from the test" in record["reason"], record
    if stage == "neb_guess":  # the failed guess-level refinement fell back to the climbing image
        assert not load_npz(st.path("neb.npz"))["guess_converged"] and raiser.calls == 2
    calls = raiser.calls
    assert run_stage(st) is None and raiser.calls == calls  # a recorded failure is not retried


def test_a_program_error_stops_the_run_and_a_chemistry_error_does_not(tmp_path, monkeypatch):
    rxns = reactions.read_reactions([HCN])
    monkeypatch.setattr(structure, "optimize_geometry", _Raiser(TypeError))
    with pytest.raises(TypeError):
        reactions.run(CFG, rxns, str(tmp_path / "a"), progress=False)
    assert not glob.glob(str(tmp_path / "a" / "**" / "*.failed.json"), recursive=True)
    monkeypatch.setattr(structure, "optimize_geometry", _Raiser(dft.SCFNotConvergedError))
    summary = reactions.run(CFG, rxns, str(tmp_path / "b"), progress=False)
    failures = summary["reactions"]["hcn_hnc"]["failures"]
    assert [f.split(":")[0] for f in failures] == ["product_opt", "reactant_opt"], failures
    assert summary["n_geometries"] == 0 and summary["n_failed_reactions"] == 1


def test_the_committed_cache_records_no_program_error():
    """Every *.failed.json of the committed reaction cache is chemistry under this rule: its recorded
    exception type (or, for a record older than the `error` field, its reason's) is one of them."""
    names = set(_chemistry())
    for path in glob.glob(os.path.join(ROOT, "data", "dft_cache", "reactions", "*", "*.failed.json")):
        record = load_json(path)
        kind = record.get("error") or record["reason"].split(":")[0]
        checks = ("imaginary frequenc", "IRC ends relax", "Sella did not converge", "fewer than 2 points")
        assert kind in names or any(c in record["reason"] for c in checks), (path, record)


# ---------------------------------------------------------------------------------------------
# killed jobs

#: make_dataset.py with the cache's own configuration (its command line has no NEB or IRC
#: settings; the test's cheap ones are stored in the cache's config.json), run as __main__
DRIVER = f"""
import sys
sys.path.insert(0, {os.path.join(ROOT, "tests")!r})
from script_loader import load_script
from phljax.datagen import reactions
from phljax.datagen.cache import load_json

if __name__ == "__main__":
    make_dataset = load_script("experiments", "make_dataset")
    cache = sys.argv[sys.argv.index("--cache") + 1]
    stored = reactions.ReactionConfig.from_json(load_json(cache + "/config.json"))
    make_dataset.config = lambda args: stored
    make_dataset.main(sys.argv[1:])
"""
LABELS = ("nms_*_[0-9][0-9][0-9].npz",)
KILL_CFG = dataclasses.replace(CFG, n_nms=4)  # 2 RTP + 8 NMS labels
TIMEOUT = 600


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """An uninterrupted run of hcn_hnc without its TS search (a failure recorded beforehand), and the
    reaction file it read."""
    cache = str(tmp_path_factory.mktemp("finished") / "cache")
    rxn = reactions.read_reaction(HCN)
    reactions.ReactionDir(cache, rxn).fail("ts", "TS search left out by tests/test_datagen_faults.py")
    summary = reactions.run(KILL_CFG, [rxn], cache, progress=False)
    assert (summary["n_rtp"], summary["n_nms"]) == (2, 2 * KILL_CFG.n_nms), summary
    return cache, HCN


def _unlabelled_copy(finished, tmp_path) -> str:
    """A copy of the finished cache without its NMS labels: the job left is labelling them."""
    copy = str(tmp_path / "cache")
    shutil.copytree(finished[0], copy)
    for pattern in LABELS:
        for p in glob.glob(os.path.join(copy, "hcn_hnc", pattern)):
            os.remove(p)
    return copy


def _start(finished, cache: str, log, workers: int = 2) -> subprocess.Popen:
    cmd = [sys.executable, "-c", DRIVER, "--reactions", finished[1], "--cache", cache, "--out", cache + "/out",
           "--workers", str(workers), "--no-progress"]  # fmt: skip
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "2"})


def _children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (from /proc)."""
    out = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            out.append(int(stat.split("/")[2]))
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline") as f:
            return f.read().replace("\0", " ")
    except OSError:
        return ""


def _workers(pid: int) -> list[int]:
    return [c for c in _children(pid) if "spawn_main" in _cmdline(c)]


def _labels(cache: str) -> list[str]:
    return sorted(os.path.basename(p) for pat in LABELS for p in glob.glob(os.path.join(cache, "hcn_hnc", pat)))


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _mtimes(cache: str) -> dict[str, float]:
    """Modification times of the reaction's cache files (results, records and stage logs)."""
    d = os.path.join(cache, "hcn_hnc")
    return {f: os.stat(os.path.join(d, f)).st_mtime_ns for f in os.listdir(d) if not f.endswith(".tmp")}


def _all_readable(cache: str) -> list[str]:
    """Load every .npz and .json of the cache fully; returns the leftover temporary files."""
    leftovers = []
    for dirpath, _, files in os.walk(cache):
        for f in files:
            p = os.path.join(dirpath, f)
            if f.endswith(".npz"):
                with np.load(p, allow_pickle=False) as z:
                    for k in z.files:
                        z[k]
            elif f.endswith(".json"):
                with open(p) as fh:
                    json.load(fh)
            elif f.endswith(".tmp"):
                leftovers.append(p)
    return leftovers


def _assert_same_data(cache: str, reference: str) -> None:
    """Every cached file of hcn_hnc equals the reference's (wall times aside; SCF to 1e-10 Eh)."""
    names = sorted(f for f in os.listdir(os.path.join(reference, "hcn_hnc")) if f.endswith(".npz"))
    assert sorted(f for f in os.listdir(os.path.join(cache, "hcn_hnc")) if f.endswith(".npz")) == names
    for name in names:
        a, b = load_npz(os.path.join(cache, "hcn_hnc", name)), load_npz(os.path.join(reference, "hcn_hnc", name))
        assert a.keys() == b.keys(), name
        for k in a:
            if k.startswith("wall"):
                continue
            if a[k].dtype.kind in "US":
                assert a[k] == b[k], (name, k)
                continue
            np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-8, err_msg=f"{name}: {k}")


def test_a_killed_worker_of_make_dataset_loses_nothing(finished, tmp_path):
    """SIGKILL one of the two workers of a running `make_dataset.py --workers 2` while it labels:
    new workers take over and the job completes; nothing stored before was recomputed, every file
    reads, and the data equal the uninterrupted run's (tests/test_reactions.py kills a worker of
    `run` in a thread; this is the script as a job, checked file by file)."""
    cache = _unlabelled_copy(finished, tmp_path)
    before = _mtimes(cache)
    with open(tmp_path / "log", "w") as log:
        job = _start(finished, cache, log)
        try:
            _wait_for(lambda: _labels(cache) or job.poll() is not None, TIMEOUT, "the first label")
            victims = _workers(job.pid)
            assert len(victims) == 2 and job.poll() is None, (victims, job.poll())
            os.kill(victims[0], signal.SIGKILL)
            assert job.wait(TIMEOUT) == 0, (tmp_path / "log").read_text()[-3000:]
        finally:
            if job.poll() is None:
                job.kill()
                job.wait()
    text = (tmp_path / "log").read_text()
    assert "worker process died" in text and "new workers take over" in text, text[-3000:]
    assert not _all_readable(cache)
    assert {f: t for f, t in _mtimes(cache).items() if f in before} == before
    _assert_same_data(cache, finished[0])
    counts = {c: len(read_h5(os.path.join(cache, "out", f"chon_reactions-{c}.h5"))) for c in ("RTP", "NMS")}
    assert counts == {"RTP": 2, "NMS": 2 * KILL_CFG.n_nms}


def test_a_killed_make_dataset_job_resumes_where_it_stopped(finished, tmp_path):
    """SIGKILL the main process of a `make_dataset.py --workers 2` job mid-labelling: its workers
    exit (none is left computing or waiting), every file it stored reads, and a second run
    computes only what is missing; the data equal the uninterrupted run's."""
    cache = _unlabelled_copy(finished, tmp_path)
    todo = 2 * KILL_CFG.n_nms
    workers = []
    with open(tmp_path / "log1", "w") as log:
        job = _start(finished, cache, log)
        try:
            _wait_for(lambda: len(_labels(cache)) >= 3 or job.poll() is not None, TIMEOUT, "three labels")
            workers = _workers(job.pid)
            assert job.poll() is None and len(workers) == 2, "the job ended before the kill"
            os.kill(job.pid, signal.SIGKILL)
            job.wait()
            _wait_for(lambda: not any(os.path.exists(f"/proc/{w}") and _cmdline(w) for w in workers), 30,
                      "the killed job's workers to exit")  # fmt: skip
        finally:
            for pid in [job.pid, *workers]:  # the job's processes, should any be left
                if _cmdline(pid):
                    os.kill(pid, signal.SIGKILL)
    leftovers = _all_readable(cache)  # a temporary file of a write in flight is the most a kill leaves
    stored = _labels(cache)
    assert 3 <= len(stored) < todo, stored
    before = _mtimes(cache)
    with open(tmp_path / "log2", "w") as log:
        rerun = _start(finished, cache, log, workers=1)  # any number of workers resumes it
        assert rerun.wait(TIMEOUT) == 0, (tmp_path / "log2").read_text()[-3000:]
    relabelled = (tmp_path / "log2").read_text().count("labelled hcn_hnc/")
    assert relabelled == todo - len(stored)  # only what was missing
    assert {f: t for f, t in _mtimes(cache).items() if f in before} == before
    assert len(_all_readable(cache)) == len(leftovers)
    _assert_same_data(cache, finished[0])
