"""The benchmark scripts' pure helpers (no timing: timings live in benchmarks/, never in tests)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from script_loader import load_script


def test_synthetic_molecule_density_and_separation():
    tc = load_script("benchmarks", "training_cost")
    m = tc.synthetic_molecule(40, seed=3)
    d = np.linalg.norm(m.positions[:, None] - m.positions[None], axis=-1)
    assert m.positions.shape == (40, 3) and m.hessian.shape == (40, 3, 40, 3)
    assert d[~np.eye(40, dtype=bool)].min() >= 1.0
    radius = np.linalg.norm(m.positions, axis=1).max()
    assert 40 / (4 / 3 * np.pi * radius**3) == pytest.approx(tc.DENSITY, rel=0.35)


def test_tables_report_ratios_and_failures():
    tc = load_script("benchmarks", "training_cost")
    base = {"n_atoms": 14, "batch_size": 8, "compile_time_s": 1.0, "n_compiles": 1, "peak_rss_bytes": 2**30}
    records = [
        {**base, "scheme": "E-F", "num_probes": 0, "step_time_s": 0.1, "peak_bytes": 2**20},
        {**base, "scheme": "E-F-HVP random K=1", "num_probes": 1, "step_time_s": 0.15, "peak_bytes": 2 * 2**20},
        {**base, "scheme": "E-F-HVP random K=4", "num_probes": 4, "step_time_s": 0.5, "peak_bytes": 4 * 2**20},
        {
            **base,
            "scheme": "E-F-H",
            "num_probes": 0,
            "step_time_s": 4.3,
            "peak_bytes": 2**30,
            "hessian_chunk": 42,
            "hessian_columns": 42,
        },  # fmt: skip
        {"scheme": "E-F-H", "n_atoms": 500, "num_probes": 0, "batch_size": 1, "error": "RESOURCE_EXHAUSTED"},
    ]
    text = tc.table(records)
    assert "| 1.50x | 2.00x | 28.7x |" in text  # HVP K=1: time / E-F, memory / E-F, E-F-H / HVP
    assert "failed: RESOURCE_EXHAUSTED" in text
    assert "| 14 | 42 | 100.0 | 50.0 | 116.7 |" in tc.column_table(records)  # (4.3 - 0.1) / 42, (0.5 - 0.15) / 3
    rates = tc.throughput_table(records)  # molecules per second: batch 8 / step time
    assert "| 14 | 80.0 | 53.3 | 16.0 | 1.9 |" in rates and "| 500 |  |  |  | failed |" in rates


def test_default_args_are_the_command_lines_defaults():
    """peer_mace runs training_cost's workers with these; a misspelt option must not pass silently."""
    tc = load_script("benchmarks", "training_cost")
    args = tc.default_args(large=10**9, timeout=5.0)
    assert (args.large, args.timeout, args.remat, args.compile_only) == (10**9, 5.0, "none", False)
    assert vars(args).keys() == vars(tc.build_parser().parse_args([])).keys()
    with pytest.raises(TypeError, match="hesian_chunks"):
        tc.default_args(hesian_chunks=[0])


class _Compiled:
    """Stands in for a compiled executable: `cost_analysis()` returns what it is given."""

    def __init__(self, analysis):
        self.analysis = analysis

    def cost_analysis(self):
        return self.analysis

    def as_text(self):
        return ""  # no HLO: no loops to add


def test_xla_cost_reads_a_dict_or_a_list_of_dicts():
    tc = load_script("benchmarks", "training_cost")
    one = {"flops": 2.5e8, "bytes accessed": 4.0e8, "transcendentals": 10.0}
    expected = {"flops": 2.5e8, "bytes_accessed": 4.0e8, "flops_xla": 2.5e8}
    assert tc.xla_cost(_Compiled(one)) == expected  # a dict (some jax versions)
    assert tc.xla_cost(_Compiled([one])) == expected  # a list of one dict (others)
    assert tc.xla_cost(_Compiled([one, {"flops": 1.0, "bytes accessed": 2.0}])) == {
        "flops": 2.5e8 + 1.0,
        "bytes_accessed": 4.0e8 + 2.0,
        "flops_xla": 2.5e8 + 1.0,
    }  # several programs: summed
    none = {"flops": None, "bytes_accessed": None, "flops_xla": None}
    assert tc.xla_cost(_Compiled(None)) == none
    assert tc.xla_cost(_Compiled([{"utilization": 1.0}])) == none


def test_xla_cost_counts_every_trip_of_a_loop():
    """XLA's cost_analysis counts a while body once; a chunked Hessian (lax.map) is such a loop.
    xla_cost adds the other trips; flops.py's recount with trip counts agrees."""
    tc = load_script("benchmarks", "training_cost")
    fl = load_script("benchmarks", "flops")
    a = jnp.ones((16, 16), jnp.float32)
    compiled = jax.jit(lambda c: jax.lax.scan(lambda c, _: (c @ a, None), c, None, length=10)[0]).lower(a).compile()
    cost = tc.xla_cost(compiled)
    one = 2 * 16 * 16 * 16
    assert one <= cost["flops_xla"] < 2 * one  # XLA: the body once
    assert 10 * one <= cost["flops"] < 11 * one
    assert sum(op[0] for op in fl.op_costs(compiled.as_text())[0]) == pytest.approx(cost["flops"])


def test_xla_cost_of_a_real_compilation_counts_a_matrix_product():
    tc = load_script("benchmarks", "training_cost")
    a = jnp.ones((8, 16), jnp.float32)
    cost = tc.xla_cost(jax.jit(lambda x, y: x @ y).lower(a, a.T).compile())
    assert cost["flops"] == 2 * 8 * 8 * 16  # one multiply-add per term
    assert cost["bytes_accessed"] >= (2 * 8 * 16 + 8 * 8) * 4  # reads both operands, writes the product


def test_flop_tables_put_flop_ratios_beside_time_ratios():
    tc = load_script("benchmarks", "training_cost")
    base = {"n_atoms": 14, "batch_size": 8, "compile_time_s": 1.0, "n_compiles": 1, "peak_rss_bytes": 2**30}
    records = [
        {**base, "scheme": "E-F", "step_time_s": 0.1, "flops": 2e8, "bytes_accessed": 4e8},
        {**base, "scheme": "E-F-HVP random K=1", "step_time_s": 0.2, "flops": 4.4e8, "bytes_accessed": 1e9},
        {**base, "scheme": "E-F-HVP random K=4", "step_time_s": 0.5, "flops": 1.1e9, "bytes_accessed": 3e9},
        {**base, "scheme": "E-F-H", "flops": 1.6e10, "bytes_accessed": 5e10, "hessian_chunk": 42},  # untimed
    ]
    text = tc.flop_table(records)
    assert "| 14 | 8 | E-F-HVP random K=1 | 0.440 | 1.000 | 2.20x | 2.50x | 2.00x |" in text
    assert "| 14 | 8 | E-F-H (chunk 42) | 16.000 | 50.000 | 80.00x | 125.00x |  |" in text
    ratios = tc.flop_ratios(records)
    assert "| 14 | HVP random K=1 / E-F | 2.20x | 2.00x |" in ratios
    assert "| 14 | marginal random probe: (K=4 - K=1) / 3 / E-F | 1.10x | 1.00x |" in ratios  # (1.1 - 0.44) / 3 / 0.2
    assert "| 14 | E-F-H / E-F | 80.00x |  |" in ratios
    assert "one-hot" not in ratios  # no one-hot records, no one-hot rows


def test_hlo_recount_matches_xla_cost_analysis():
    """benchmarks/flops.py re-counts XLA's FLOPs op by op (fusions, reduces, scatters, slices of
    fused producers); its total must be cost_analysis()'s."""
    fl = load_script("benchmarks", "flops")
    tc = load_script("benchmarks", "training_cost")

    def f(x, w, idx):
        y = jnp.tanh(x @ w) * 2.0 + 1.0  # dot, transcendental (not a FLOP), elementwise
        parts = [jnp.sum(y[:, i : i + 4] * y[:, :4], axis=1) for i in (0, 4)]  # slices of a fused producer
        s = jax.ops.segment_sum(y, idx, num_segments=3)  # scatter-add
        return parts[0] + parts[1], s.max(axis=0)  # reduces

    args = (jnp.ones((10, 6)), jnp.ones((6, 8)), jnp.arange(10) % 3)
    compiled = jax.jit(f).lower(*args).compile()
    ops, _ = fl.op_costs(compiled.as_text())
    assert sum(op[0] for op in ops) == tc.xla_cost(compiled)["flops"]
    assert sum(op[0] for op in ops if op[1] == "dot") == 2 * 10 * 8 * 6
    assert sum(op[5] for op in ops) <= sum(op[0] for op in ops)  # read FLOPs never exceed XLA's count


def test_schedule_part_reads_the_name_stack():
    fl = load_script("benchmarks", "flops")
    part = lambda name, functions=(): fl.schedule_part(name, list(functions))  # noqa: E731
    assert part("jit(step)/jvp(jvp(NequIP))/_Interaction_0/mul") == "forward"
    assert part("jit(step)/jvp(transpose(jvp(NequIP)))/_Interaction_0/mul") == "backward (forces)"
    assert part("jit(step)/transpose(jvp(transpose(jvp(NequIP))))/mul") == "param. gradient of backward (forces)"
    assert part("jit(step)/jvp(vmap(jvp(jvp(NequIP))))/mul") == "tangent forward"
    assert part("jit(step)/transpose(jvp(vmap(jvp(transpose(jvp(NequIP))))))/mul") == (
        "param. gradient of tangent backward"
    )
    assert part("jit(step)/jvp(nias,knas->kni)/dot_general", ["reference_hvp"]) == (
        "reference HVP (H_ref v from the stored blocks)"
    )
    assert part("jit(step)/cond/branch_1_fun/mul", ["make_train_step.<locals>.step"]) == (
        "optimizer (clip, AdamW, plateau)"
    )
    assert part("") == "unattributed (no metadata)"


def _peer_record(framework, task, ms, ratio_same, ratio_ef, flops=2e8):
    """A peer_jax record with per-round ratios [median - 0.1, median + 0.1] interquartile."""

    def ratio(m):
        return {"median": m, "q25": m - 0.1, "q75": m + 0.1, "min": m - 0.2, "max": m + 0.2, "rounds": 3}

    return {"framework": framework, "task": task, "n_atoms": 12, "batch_size": 8, "n_params": 16000,
            "step_time_s": ms / 1e3, "compile_time_s": 20.0, "flops": flops,
            "ratio_to_phljax_same_task": ratio(ratio_same), "ratio_to_phljax_ef": ratio(ratio_ef)}  # fmt: skip


def test_peer_jax_table_and_summary_on_synthetic_records():
    pj = load_script("benchmarks", "peer_jax")
    records = [
        _peer_record("phljax", "E-F", 30.0, 1.0, 1.0),
        _peer_record("mlip-nequip", "E-F", 60.0, 2.0, 2.0, flops=4e8),
        _peer_record("nequix", "E-F", 15.0, 0.5, 0.5),
        _peer_record("phljax", "E-F-HVP K=1", 90.0, 1.0, 3.0, flops=6e8),
        _peer_record("mlip-nequip", "E-F-HVP K=1", 270.0, 3.0, 9.0, flops=6e8),
        {"framework": "mlip-mace", "task": "E-F-HVP K=1", "n_atoms": 12, "error": "exit code 1: boom"},
    ]
    text = pj.table(records)
    # ms, GFLOP, compile s, time / phljax at the same task [IQR], FLOPs / phljax, time / phljax E-F [IQR]
    assert "| E-F | mlip-nequip | 16000 | 60.0 | 0.400 | 20.0 | 2.00x [1.90-2.10] | 2.00x | 2.00x [1.90-2.10] |" in text
    assert "| 12 | E-F-HVP K=1 | mlip-nequip | 16000 | 270.0 | 0.600 | 20.0 | 3.00x [2.90-3.10] | 1.00x |" in text
    assert "| 12 | E-F-HVP K=1 | mlip-mace | failed: exit code 1: boom |" in text
    assert text.index("| 12 | E-F | phljax") < text.index("| 12 | E-F-HVP K=1 | phljax")  # tasks in order
    lines = pj.summary(records)
    assert lines[0] == "12 atoms, E-F: fastest nequix; slower: phljax 2.00x, mlip-nequip 4.00x"
    assert lines[1] == "12 atoms, E-F-HVP K=1: fastest phljax; slower: mlip-nequip 3.00x"


def test_peer_jax_ratio_between_uses_rounds_of_one_session():
    pj = load_script("benchmarks", "peer_jax")
    r = pj.ratio_between({"round_medians_s": [2.0, 3.0, 8.0]}, {"round_medians_s": [1.0, 1.0, 2.0]})
    assert (r["median"], r["min"], r["max"], r["rounds"]) == (3.0, 2.0, 4.0, 3)
    assert pj.ratio_between({"round_medians_s": [1.0]}, {"round_medians_s": [1.0, 2.0]}) is None


_TRIVIAL_WORKER = r"""
import sys
sys.path.insert(0, sys.argv[1])
import hygiene
import numpy as np
pinned = hygiene.pin()
a = np.ones((int(sys.argv[2]), int(sys.argv[2])))
hygiene.serve({"step": lambda: a @ a, "other": lambda: a.sum()}, {"n": int(sys.argv[2]), "pin": pinned})
"""


def test_hygiene_workers_serve_and_interleave_end_to_end():
    """The protocol and the structure of interleave's result with two trivial numpy workers (no
    assertion on timings)."""
    import os
    import sys

    hygiene = load_script("benchmarks", "hygiene")
    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    env = hygiene.pinned_env()
    small = hygiene.Worker([sys.executable, "-c", _TRIVIAL_WORKER, bench, "8"], env=env)
    big = hygiene.Worker([sys.executable, "-c", _TRIVIAL_WORKER, bench, "64"], env=env)
    try:
        assert small.info["n"] == 8 and big.info["n"] == 64  # the worker's info comes back as sent
        assert small.info["pin"]["cpus"] == hygiene.cpus()  # pinned to the driver's CPUs
        assert small.info["pin"]["omp_num_threads"] == str(len(hygiene.cpus()))
        times = small.run("other", 3)
        assert len(times) == 3 and all(t >= 0 for t in times) and small.peak_rss_bytes > 0
        logged = []
        out = hygiene.interleave(
            {"small": (small, "step"), "big": (big, "step"), "small other": (small, "other")},
            "small",
            rounds=3,
            round_s=0.001,
            max_steps=2,
            log=logged.append,
        )
    finally:
        small.close()
        big.close()
    assert set(out) >= {"labels", "steps", "load_before", "load_after", "rounds", "round_s"}
    assert set(out["labels"]) == {"small", "big", "small other"} and out["rounds"] == 3 and len(logged) == 3
    assert all(1 <= s <= 2 for s in out["steps"].values())
    for rec in out["labels"].values():
        assert len(rec["round_medians_s"]) == 3 and rec["step_time_s"] >= 0
        assert rec["ratio"]["to"] == "small" and rec["ratio"]["rounds"] == 3
        assert rec["ratio"]["min"] <= rec["ratio"]["q25"] <= rec["ratio"]["median"] <= rec["ratio"]["q75"]
    assert out["labels"]["small"]["ratio"]["median"] == 1.0
    assert set(out["load_before"]) == {"load_1m", "load_5m", "cores", "loaded"}
    assert "round 1/3: small 1.00x" in logged[0]  # each round logs every label's ratio to the base


def test_hygiene_worker_that_dies_raises_with_its_stderr():
    import sys

    hygiene = load_script("benchmarks", "hygiene")
    with pytest.raises(hygiene.WorkerError, match=r"exit code 3: .*no model here"):
        hygiene.Worker([sys.executable, "-c", "import sys; sys.stderr.write('no model here\\n'); sys.exit(3)"])
