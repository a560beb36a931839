"""The benchmark scripts' pure helpers (no timing: timings live in benchmarks/, never in tests)."""

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
    assert "| 14 | 42 | 100.0 | 50.0 | 100.0 |" in tc.column_table(records)  # (4.3 - 0.1) / 42 s per column
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
