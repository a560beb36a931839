"""Timing hygiene shared by the benchmark scripts: pinned threads, load marking, interleaved rounds.

Why: on a 2-core machine two steps timed one after the other see different machines (another job
starts, the clock boosts, a torch pool oversubscribes), and a ratio of two medians taken minutes
apart moves by +-40%. So every comparison here is timed *interleaved*: each configuration lives in
its own persistent worker process (its own address space, compiled program and peak RSS; an
out-of-memory failure kills one worker, not the benchmark), all of them are compiled first, and
then the driver runs round after round in which every worker in turn times a few steps while the
others wait blocked on a pipe (using no CPU). Drift hits every configuration alike; a ratio is the
median of the per-round ratios, reported with its spread. Before and after each phase the 1-minute
load average is recorded; the record is marked `loaded` when processes other than the benchmark's
used more than FOREIGN_PER_CORE per core during the timed rounds (`ForeignCpu`: the load average
counts the benchmark's own compiling and timing, ~1 per core by itself).

Worker side:  `serve({"step": fn, ...}, info)` (fn() runs one call and blocks until it is done).
Driver side:  `Worker(cmd)` starts one and waits for its `info`; `interleave({label: (worker,
task)}, base=...)` runs the rounds and returns per-label timings and ratios to `base`.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence

LOADED_PER_CORE = 0.3  # 1-minute load average per core above which the machine counts as busy
FOREIGN_PER_CORE = 0.05  # CPU used by other processes during a phase, per core, above which it is `loaded`


def cpus() -> list[int]:
    """The CPUs this process may run on."""
    return sorted(os.sched_getaffinity(0))


def load_state() -> dict:
    """The load average now: {"load_1m", "load_5m", "cores", "loaded"}."""
    one, five, _ = os.getloadavg()
    cores = len(cpus())
    return {
        "load_1m": round(one, 2),
        "load_5m": round(five, 2),
        "cores": cores,
        "loaded": one / cores > LOADED_PER_CORE,
    }


def _busy_jiffies() -> int:
    """CPU time (clock ticks) all processes have used since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    return user + nice + system + irq + softirq + steal


def _process_jiffies(pids: Sequence[int]) -> int:
    """CPU time (clock ticks: utime + stime) the processes `pids` have used, from /proc/<pid>/stat."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += int(fields[11]) + int(fields[12])
    return total


class ForeignCpu:
    """CPU that processes other than `pids` use between `__init__` and `stop()`.

    The load average cannot tell a benchmark's own work from another job's (a run that has just
    compiled, or one worker timing on both cores, has a load of ~2 on 2 cores by itself), so a
    phase is judged by what everything else used meanwhile: /proc/stat's busy time minus the
    benchmark's processes' own. `stop()` -> {"foreign_cores", "own_cores", "wall_s", "loaded"},
    loaded when the foreign CPU exceeds FOREIGN_PER_CORE per core.
    """

    def __init__(self, pids: Sequence[int]):
        self.pids = list(pids)
        self.t0, self.busy0, self.own0 = time.monotonic(), _busy_jiffies(), _process_jiffies(self.pids)

    def stop(self) -> dict:
        wall = time.monotonic() - self.t0
        tick = os.sysconf("SC_CLK_TCK")
        busy = (_busy_jiffies() - self.busy0) / tick
        own = (_process_jiffies(self.pids) - self.own0) / tick
        foreign = max(busy - own, 0.0) / max(wall, 1e-9)
        return {
            "foreign_cores": round(foreign, 3),
            "own_cores": round(own / max(wall, 1e-9), 3),
            "wall_s": round(wall, 1),
            "loaded": foreign > FOREIGN_PER_CORE * len(cpus()),
        }


def pinned_env(cores: Sequence[int] | None = None, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a worker: OpenMP / MKL / OpenBLAS pools sized to `cores` (default: all of
    this process's CPUs). Workers call `pin(cores)` to set their affinity (XLA's CPU pool is sized
    by the CPUs it may use) and torch's intra-op threads."""
    cores = list(cores if cores is not None else cpus())
    out = dict(os.environ if env is None else env)
    n = str(len(cores))
    out.update(
        OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n, PHLJAX_BENCH_CPUS=",".join(map(str, cores))
    )
    return out


def pin() -> dict:
    """In a worker: restrict this process to the CPUs its driver chose (PHLJAX_BENCH_CPUS) and
    return what was pinned (for the record). Torch, when imported by the caller, is set separately
    (`torch.set_num_threads(len(cores))`)."""
    spec = os.environ.get("PHLJAX_BENCH_CPUS")
    if spec:
        os.sched_setaffinity(0, {int(c) for c in spec.split(",")})
    return {
        "cpus": cpus(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def _reply(obj) -> None:
    sys.stdout.write("@@" + json.dumps(obj) + "\n")
    sys.stdout.flush()


def serve(tasks: Mapping[str, Callable[[], object]], info: dict, status: Callable[[], dict] = lambda: {}) -> None:
    """Worker loop: announce `info`, then answer {"task", "steps"} requests with each call's time.

    Replies are JSON lines prefixed "@@" on stdout (other output passes through), with the peak
    RSS and `status()` (e.g. a trace count); a request {"quit": true} or end of input ends the loop.
    """
    _reply({"ready": info, "tasks": sorted(tasks)})
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("quit"):
            break
        fn, times = tasks[request["task"]], []
        for _ in range(int(request["steps"])):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        _reply({"times": times, "peak_rss_bytes": rss, "status": status()})


class WorkerError(RuntimeError):
    """A worker died or failed to start; the message is the tail of its stderr."""


class Worker:
    """A persistent worker process speaking `serve`'s protocol (default environment: `pinned_env()`).

    No timeout: a worker that hangs hangs the benchmark (a failure, an out-of-memory kill or an
    exception ends it and raises WorkerError)."""

    def __init__(self, cmd: Sequence[str], env: Mapping[str, str] | None = None):
        self.cmd = list(cmd)
        self.stderr_path = f"/tmp/phljax-bench-{os.getpid()}-{id(self)}.err"
        self._err = open(self.stderr_path, "w+")  # noqa: SIM115 (lives as long as the worker)
        self.proc = subprocess.Popen(
            self.cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            text=True,
            env=dict(pinned_env() if env is None else env),
        )
        self.peak_rss_bytes = 0
        self.status: dict = {}  # the worker's `status()` after its last request
        self.info = self._read()["ready"]

    def _read(self) -> dict:
        """The worker's next reply; WorkerError with its stderr's tail if it exits instead."""
        for line in self.proc.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        self.proc.kill()
        self._err.seek(0)
        tail = [x for x in self._err.read().strip().splitlines() if x.strip()][-3:]
        code = self.proc.wait()
        reason = f"killed by signal {-code} (out of memory?)" if code < 0 else f"exit code {code}"
        raise WorkerError(f"{' '.join(self.cmd[-6:])}: {reason}: {' | '.join(tail)[-400:]}")

    def run(self, task: str, steps: int) -> list[float]:
        """Time `steps` calls of `task` in the worker; their durations (s)."""
        self.proc.stdin.write(json.dumps({"task": task, "steps": steps}) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        self.peak_rss_bytes = max(self.peak_rss_bytes, int(reply["peak_rss_bytes"]))
        self.status = reply.get("status", {})
        return reply["times"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
        self._err.close()
        os.remove(self.stderr_path)


def quantile(xs: Sequence[float], q: float) -> float:
    xs = sorted(xs)
    i = q * (len(xs) - 1)
    lo = int(i)
    return xs[lo] + (xs[min(lo + 1, len(xs) - 1)] - xs[lo]) * (i - lo)


def ratio_stats(ratios: Sequence[float]) -> dict:
    """Median, quartiles, range and count of per-round ratios."""
    return {
        "median": statistics.median(ratios),
        "q25": quantile(ratios, 0.25),
        "q75": quantile(ratios, 0.75),
        "min": min(ratios),
        "max": max(ratios),
        "rounds": len(ratios),
    }


def per_round_ratio(num: dict, den: dict, minus: dict | None = None, scale: float = 1.0) -> dict | None:
    """Median and spread over rounds of (num - minus) / scale / den from records' `round_medians_s`
    (one interleaved session, so round r of each was taken back to back); None if not comparable."""
    rounds = [r.get("round_medians_s") for r in (num, den, minus or den)]
    if any(not x for x in rounds) or len({len(x) for x in rounds}) != 1:
        return None
    a, b, c = rounds
    ratios = [(x - (z if minus else 0.0)) / scale / y for x, y, z in zip(a, b, c, strict=True)]
    return ratio_stats(ratios)


def summarize(rounds: Mapping[str, Sequence[float]], base: str | None) -> dict[str, dict]:
    """Per label: the median of its per-round times and, against `base`, the per-round ratios'
    median, quartiles and range. `rounds[label][r]` is the label's median step time in round r."""
    out = {}
    for label, times in rounds.items():
        rec = {"round_medians_s": [round(t, 6) for t in times], "step_time_s": statistics.median(times)}
        if base is not None and base in rounds:
            ratios = [t / b for t, b in zip(times, rounds[base], strict=True)]
            rec["ratio"] = {"to": base, **ratio_stats(ratios)}
        out[label] = rec
    return out


def interleave(
    tasks: Mapping[str, tuple[Worker, str]],
    base: str | None,
    *,
    rounds: int = 12,
    round_s: float = 0.6,
    max_steps: int = 10,
    warmup: int = 2,
    log: Callable[[str], None] = print,
) -> dict:
    """Time every (worker, task) in `tasks` in interleaved rounds; ratios against `base`.

    Each label first runs `warmup` untimed steps (the first calls allocate; one when that call
    takes over 5 round_s) and one step to size its rounds: `steps = clip(round_s / step, 1,
    max_steps)`. Round r visits the labels in an order
    rotated by r, so none is always first after a pause. Returns {"labels": summarize(...),
    "steps": per-label steps per round, "load_before", "load_after", "foreign_cpu" (`ForeignCpu`),
    "loaded", "rounds", "round_s"}.
    """
    before = load_state()
    meter = ForeignCpu([os.getpid(), *{w.proc.pid for w, _ in tasks.values()}])
    steps = {}
    for label, (worker, task) in tasks.items():
        (probe,) = worker.run(task, 1)
        if probe < 5 * round_s:  # a slow task (seconds per call) is warm after one call
            worker.run(task, warmup - 1)
            (probe,) = worker.run(task, 1)
        steps[label] = max(1, min(max_steps, round(round_s / max(probe, 1e-9))))
    labels = list(tasks)
    per_round: dict[str, list[float]] = {label: [] for label in labels}
    for r in range(rounds):
        for label in labels[r % len(labels) :] + labels[: r % len(labels)]:
            worker, task = tasks[label]
            per_round[label].append(statistics.median(worker.run(task, steps[label])))
        if base is not None:
            b = per_round[base][-1]
            log(f"      round {r + 1}/{rounds}: " + ", ".join(f"{k} {per_round[k][-1] / b:.2f}x" for k in labels))
        else:
            log(f"      round {r + 1}/{rounds}: " + ", ".join(f"{k} {1e3 * per_round[k][-1]:.1f} ms" for k in labels))
    foreign = meter.stop()
    return {
        "labels": summarize(per_round, base),
        "steps": steps,
        "load_before": before,
        "load_after": load_state(),
        "foreign_cpu": foreign,
        "loaded": foreign["loaded"],
        "rounds": rounds,
        "round_s": round_s,
    }


def ratio_text(ratio: dict | None, digits: int = 2) -> str:
    """'2.31x [2.20-2.40]': a `ratio_stats` median and interquartile range ('' for None)."""
    if not ratio:
        return ""
    return f"{ratio['median']:.{digits}f}x [{ratio['q25']:.{digits}f}-{ratio['q75']:.{digits}f}]"
