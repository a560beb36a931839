"""One process of a multi-process run dies: the others stop with an error in bounded time, not hang.

Two processes joined on localhost by `phljax.distributed.initialize` (one CPU device each, gloo
collectives) run all-reduces and barriers in a loop (tests/distributed_fault_worker.py) until one
of them is SIGKILLed, or SIGSTOPped (frozen: a hung node or a lost network, whose connections stay
open): the coordinator (process 0, which hosts jax's coordination service) or the other one. The
survivor must exit with a non-zero status and jax's message that another task died within `BOUND`
seconds; the subprocess timeout is the hang detector.

What happens (jax 0.10.2): a collective with a killed process fails at once (gloo: "Connection
reset by peer"), and the survivor's exception then waits in jax's shutdown barrier; a frozen
process fails nothing. Either way, once the dead or frozen process has sent no heartbeat for the
heartbeat timeout, the coordination service (or, the coordinator gone, the survivor's client)
reports it and jax aborts the survivor (SIGABRT, "Terminating process because the JAX distributed
service detected fatal errors"). So the survivor exits within about the heartbeat timeout: 10 s
here (HEARTBEAT_S, to keep the test short), `phljax.distributed.HEARTBEAT_TIMEOUT_S` by default.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO
from test_parallel import free_port, worker_env

pytestmark = pytest.mark.multidevice

WORKER = os.path.join(REPO, "tests", "distributed_fault_worker.py")
HEARTBEAT_S, SHUTDOWN_S = 10, 10
BOUND = HEARTBEAT_S + 30  # s from the kill to the survivor's exit (slack for a loaded machine)
START = 300  # s for both processes to start, join and run their first steps


def _steps(path) -> int:
    with open(path) as f:
        return sum(line.startswith("step ") for line in f)


@pytest.mark.parametrize(
    ("victim", "how"),
    [(1, signal.SIGKILL), (0, signal.SIGSTOP)],  # two of the four combinations: all four pass, at ~20 s each
    ids=["other-killed", "coordinator-frozen"],
)
def test_survivor_of_a_killed_process_stops_with_an_error(victim, how, tmp_path):
    port = str(free_port())
    logs = [tmp_path / f"process{rank}.log" for rank in (0, 1)]
    procs = []
    try:
        for rank, log in enumerate(logs):
            cmd = [sys.executable, WORKER, port, str(rank), str(HEARTBEAT_S), str(SHUTDOWN_S)]
            with open(log, "w") as f:
                procs.append(subprocess.Popen(cmd, env=worker_env(1), cwd=REPO, stdout=f, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + START
        while min(_steps(log) for log in logs) < 10:
            assert all(p.poll() is None for p in procs), [log.read_text()[-2000:] for log in logs]
            assert time.monotonic() < deadline, "the processes did not start: " + logs[0].read_text()[-2000:]
            time.sleep(0.1)
        survivor, log = procs[1 - victim], logs[1 - victim]
        steps = _steps(log)
        os.kill(procs[victim].pid, how)
        t0 = time.monotonic()
        try:
            code = survivor.wait(timeout=BOUND)
        except subprocess.TimeoutExpired:
            pytest.fail(f"process {1 - victim} still runs {BOUND} s after process {victim} was killed (a hang):\n"
                        + log.read_text()[-3000:])  # fmt: skip
        elapsed = time.monotonic() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()  # a stopped process too
            p.wait()
    text = log.read_text()
    print(f"process {victim} {how.name} after {steps} steps: process {1 - victim} exited with {code} after "
          f"{elapsed:.1f} s, {_steps(log) - steps} more steps; its output ends:\n{text[-2500:]}")  # fmt: skip
    assert code != 0, text[-3000:]
    assert "Terminating process because the JAX distributed service detected fatal errors" in text, text[-3000:]
