"""A user's first wait: seconds from `experiments/run.py` starting to its first training step, cold and
with the persistent compilation cache warm (issue 17 item 3).

    python benchmarks/startup.py --out benchmarks/results/quiet/startup.json
    python benchmarks/startup.py --run-args --probe=full --out /tmp/efh.json      # another scheme

Runs `run.py --epochs 1` (the bundled data, run.py's default model, `--probe=random` unless
--run-args says otherwise) twice in fresh processes sharing one fresh cache directory: the first
compiles every program and stores it, the second loads them. Each run's `results.json["startup"]`
(`phljax.compile_cache.CompileLog`) gives the time to the first finished step and the XLA programs
it compiled or loaded, by function; the process's wall time and the load average are recorded too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import hygiene  # sibling module: load marking, pinned threads

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_run(workdir: str, cache: str, run_args: list[str]) -> dict:
    """One `run.py --epochs 1` in a fresh process; its startup record, wall time and load."""
    cmd = [sys.executable, os.path.join(REPO, "experiments", "run.py"), "--epochs", "1", "--workdir", workdir,
           "--compile-cache", cache, "--no-progress", *run_args]  # fmt: skip
    before = hygiene.load_state()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=hygiene.pinned_env(), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    after = hygiene.load_state()
    return {
        **results["startup"],
        "process_wall_s": wall,
        "load_before": before,
        "load_after": after,
        "loaded": before["loaded"] or after["loaded"],
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results/startup.json")
    p.add_argument("--run-args", nargs=argparse.REMAINDER, default=["--probe=random"], help="run.py options")
    args = p.parse_args(argv)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "cache")
        for label in ("cold", "warm"):
            r = {"run": label, "run_args": args.run_args, **one_run(os.path.join(tmp, label), cache, args.run_args)}
            records.append(r)
            print(
                f"{label}: first step after {r['first_step_s']:.1f} s (process {r['process_wall_s']:.1f} s); "
                f"{r['programs']} programs, {r['from_cache']} from the cache, {r['seconds']:.1f} s compiling or loading"
                + ("  [loaded machine]" if r["loaded"] else ""),
                flush=True,
            )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(records, f, indent=2)
    print("\n| run | first step (s) | programs | from cache | compile or load (s) | biggest programs (s) |")
    print("|---|---|---|---|---|---|")
    for r in records:
        top = ", ".join(f"{name} {s:.1f}" for name, (_, s) in list(r["by_function"].items())[:4])
        row = [r["run"], f"{r['first_step_s']:.1f}", r["programs"], r["from_cache"], f"{r['seconds']:.1f}", top]
        print("| " + " | ".join(map(str, row)) + " |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
