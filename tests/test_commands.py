"""The README's two commands, the CI script and the benchmark's command line."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from pnmf import PNMF, make_counts
from pnmf.benchmarks.__main__ import main

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second():
    benchmark, tests = _readme_commands()
    assert benchmark.endswith("python -m pnmf.benchmarks")
    assert tests.endswith("pytest")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci


def test_benchmark_command_line_writes_table_json_and_figures(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    runs = main(["--backend", "numpy", "--max-iter", "30", "--out", str(tmp_path), "--no-progress"])
    printed = capsys.readouterr().out
    assert len(runs) == 9  # 3 modes x (standard, natural + multiplicative, natural + Adam)
    assert "| backend | device | mode" in printed and "held-out dev." in printed
    record = json.loads((tmp_path / "natural_gradient.json").read_text())
    assert len(record["runs"]) == 9 and record["setting"]["max_iter"] == 30
    assert all(len(run["history"]) == run["n_iter"] <= 30 for run in record["runs"])
    for name in ("natural_gradient_comparison.png", "natural_gradient_elbo_comparison.png"):
        assert (tmp_path / name).stat().st_size > 10_000


def test_benchmark_rejects_an_unknown_backend():
    with pytest.raises(SystemExit):
        main(["--backend", "jax"])


def test_speed_suite_measures_in_a_fresh_process():
    from pnmf.benchmarks import speed

    x = speed.sparse_counts(300, 200, 3000)
    assert x.shape == (300, 200) and 2800 <= x.nnz <= 3000 and x.data.min() >= 1
    result = speed.sparse_run("numpy", (300, 200), 3000, monte_carlo=True)
    assert result["nnz"] == x.nnz  # the same matrix, built again in the child
    # Per-iteration figures are differences of two timings: finite, but their sign is the machine's business.
    for key in ("lower-bound_s_per_iter", "expanded_s_per_iter_E1", "expanded_s_per_sample"):
        assert np.isfinite(result[key])
    assert result["scipy_pair_s"] > 0 and 0 < result["peak_rss_gb"] < 8
    table = speed.report({"digits": [], "sparse": [result], "scaling": [result]})
    assert "two SciPy products" in table and "peak GB" in table


def test_peer_timing_alternates_rounds_and_keeps_each_sides_best(tmp_path, monkeypatch):
    # A stand-in for the PyPI package: same import name and interface, a known cost per iteration.
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "PNMF.py").write_text(
        "import time\n"
        "class PNMF:\n"
        "    def __init__(self, n_components, random_state=None):\n"
        "        self.n_iter_ = 0\n"
        "    def fit_transform(self, x):\n"
        "        self.n_iter_ = 20\n"
        "        time.sleep(0.02)\n"
        "        return x[:, :5]\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(fake))
    from pnmf.benchmarks import speed

    monkeypatch.setattr(speed, "PEER_ROUNDS", 2)
    monkeypatch.setattr(speed, "PEER_ITERATIONS", 5)
    result = speed.peer_run(sys.executable, ["numpy"])
    assert result["peer_n_iter"] == 20 and result["rounds"] == 2
    assert 0.001 <= result["peer_s_per_iter"] < 0.01  # 20 ms over 20 iterations, plus start-up
    assert {(o["backend"], o["training"]) for o in result["ours"]} == {("numpy", "standard"), ("numpy", "natural")}
    for o in result["ours"]:
        assert o["ratio_to_peer"] == pytest.approx(o["s_per_iter"] / result["peer_s_per_iter"])
    assert "ratio to PyPI pnmf" in speed.report({"peer": result, "digits": [], "sparse": [], "scaling": []})


def test_the_gpu_check_runs_its_tests_and_suite_where_there_is_no_gpu(tmp_path):
    # On a CPU the GPU tests skip and the suite runs at its quick sizes on the CPU.
    import subprocess

    env = dict(os.environ, PYTHON=sys.executable, PNMF_GPU_CHECK_ARGS="--quick", PNMF_WHEELS=str(tmp_path / "none"))
    script = Path(__file__).parents[1] / "benchmarks" / "gpu_check.sh"
    done = subprocess.run(["bash", str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    record = json.loads((tmp_path / "gpu.json").read_text())
    on_cpu = [r for r in record["runs"] if r["device"] == "cpu"]
    assert record["quick"] and len(on_cpu) == 1
    assert on_cpu[0]["sparse"]["s_per_iter"] > 0 and on_cpu[0]["dense"]["converged"]
    assert "skipped" in (tmp_path / "gpu_tests.txt").read_text()
    assert "tests exit 0, suite exit 0" in (tmp_path / "gpu_summary.txt").read_text()


def test_the_version_lives_in_one_place_and_ci_checks_the_wheel():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from importlib.metadata import version

    import pnmf

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert version(project["name"]) == pnmf.__version__
    assert project["scripts"]["pnmf"] == "pnmf.cli:main"
    assert "bash .ci/wheel" in (ROOT / ".ci" / "run").read_text().splitlines()
    wheel = (ROOT / ".ci" / "wheel").read_text()
    assert "twine check --strict" in wheel and 'pnmf" --help' in wheel


def test_the_gpu_suites_cpu_part_joins_the_record_a_gpu_machine_left(tmp_path):
    from pnmf.benchmarks.natural_gradient import machine

    fits = {"s_per_iter": 0.01, "setup_s": 1.0, "s": 2.0, "n_iter": 100, "converged": True, "elbo": -1.0}
    gpu_entry = {"backend": "torch", "device": "cuda", "dense": fits, "sparse": dict(fits, peak_device_gb=1.0)}
    old_cpu = {"backend": "torch", "device": "cpu", "dense": fits, "sparse": fits}
    earlier = {"machine": "a GPU machine", "quick": True, "runs": [gpu_entry, old_cpu], "sparse_nnz": 10}
    (tmp_path / "gpu.json").write_text(json.dumps(earlier))
    main(["--suite", "gpu", "--quick", "--cpu", "only", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "gpu.json").read_text())
    assert record["machine"] == "a GPU machine" and record["cpu_machine"] == machine()
    assert [r["device"] for r in record["runs"]] == ["cuda", "cpu"]
    assert record["runs"][0] == gpu_entry and record["runs"][1]["sparse"]["s_per_iter"] != 0.01
    summary = (tmp_path / "gpu_summary.txt").read_text()
    assert "the CPU's fits on" in summary and "faster per iteration than 2 CPU threads" in summary


def test_the_gpu_suite_leaves_torchs_parts_out_where_torch_is_missing(monkeypatch):
    # On an MLX-only machine the floor (torch.sparse.mm) and the CPU's fits (torch) are skipped.
    from pnmf.benchmarks import gpu

    monkeypatch.setattr(gpu, "available", lambda: ["mlx", "numpy"])
    assert gpu.cusparse_floor(None, 3) is None
    record = gpu.run(quick=True, cpu="only", progress=lambda message: None)
    assert record["runs"] == []


def test_restart_times_compare_lanes_with_one_by_one_and_the_gpu_report_shows_them(monkeypatch):
    from pnmf import restarts
    from pnmf.benchmarks import gpu, workflow

    x, _, _ = make_counts(200, 100, 5, random_state=42)
    steps = []
    original = restarts.LaneTrainer.step
    monkeypatch.setattr(restarts.LaneTrainer, "step", lambda *a: steps.append(1) or original(*a))
    times = workflow.restart_times(x, 5, "numpy", repeats=1)
    assert times["together_s"] > 0 and times["one_by_one_s"] > 0
    lane_steps = len(steps)
    assert lane_steps > 0 and restarts.MIN_LANES == 4  # lanes in the first timing only, then restored
    with workflow.one_by_one():
        PNMF(5)._fit_restarts(x, [0, 1, 2, 3, 4])
    assert len(steps) == lane_steps
    fits = {"s_per_iter": 0.01, "setup_s": 1.0, "s": 2.0, "n_iter": 100, "converged": True, "elbo": -1.0}
    entry = {"backend": "mlx", "device": "gpu", "dense": fits, "sparse": fits}
    entry["restarts"] = {"together_s": 0.1, "one_by_one_s": 0.5}
    text = gpu.report({"machine": "m", "quick": False, "runs": [entry], "sparse_nnz": 10})
    assert "10 restarts of the seed data (lower-bound): 0.100 s together, 0.500 s one by one (5.00x)" in text


def test_the_gpu_report_says_when_an_iteration_is_below_the_timings_noise():
    from pnmf.benchmarks import gpu

    fits = {"s_per_iter": 0.02, "setup_s": 7.0, "s": 9.7, "n_iter": 150, "converged": True, "elbo": -1.0}
    torch_entry = {"backend": "torch", "device": "cuda", "dense": fits, "sparse": fits}
    mlx_entry = {"backend": "mlx", "device": "gpu", "dense": fits, "sparse": {**fits, "s_per_iter": -0.0038}}
    mlx_entry["sparse_gathered"] = {"s_per_iter": 0.1514, "setup_s": 3.8, "peak_device_gb": 26.9}
    record = {"machine": "m", "quick": False, "runs": [torch_entry, mlx_entry], "sparse_nnz": 10}
    text = gpu.report({**record, "cusparse_floor_s": 0.014})
    mlx_lines = text.split("mlx:gpu")[1]
    assert "sparse (10 non-zeros): time per iteration below the noise of the fits' difference, set-up 7.00 s" in text
    assert not re.search(r"-\d", mlx_lines)  # no negative time or ratio
    assert "151.4 ms per iteration; peak device memory 26.90 GB" in mlx_lines
    assert "20.0 ms per iteration, set-up 7.00 s; 1.43x the cuSPARSE floor" in text.split("mlx:gpu")[0]


def test_the_gpu_suite_times_mlx_in_new_processes_and_reports_why_a_part_failed():
    pytest.importorskip("mlx.core")
    from pnmf.benchmarks import gpu

    runs = gpu.new_processes("cpu")
    for label in ("empty_cache", "filled_cache"):
        assert runs[label]["first_fit_s"] > 0 and runs[label]["second_fit_s"] > 0, runs[label]
    assert runs["no_cuda_graphs"]["natural_s_per_iter"] > 0
    fits = {"s_per_iter": 0.01, "setup_s": 1.0, "s": 2.0, "n_iter": 100, "converged": True, "elbo": -1.0}
    entry = {"backend": "mlx", "device": "gpu", "dense": fits, "sparse": fits}
    entry["seed_blocked_sums"] = {"natural": 0.0009, "standard": 0.001}
    record = {"machine": "m", "quick": False, "runs": [entry], "sparse_nnz": 10, "mlx_new_process": runs}
    text = gpu.report(record)
    assert "seed setting, full sums in blocks of 32: 0.900 ms (natural), 1.000 ms (standard)" in text
    assert "in new processes\n  kernel cache empty: import" in text and "kernel cache filled: import" in text
    assert "MLX_USE_CUDA_GRAPHS=0: " in text
    failed = gpu.new_processes("cpu", timeout=0.01)
    assert failed["empty_cache"]["error"] == "did not end within 0.01 s"
    assert "kernel cache empty: did not end within 0.01 s" in gpu.report({**record, "mlx_new_process": failed})


def test_the_scale_suites_out_of_core_fits_at_two_densities_are_written_and_reported(tmp_path, monkeypatch):
    anndata = pytest.importorskip("anndata")
    from pnmf.benchmarks import scale

    monkeypatch.setattr(scale, "DISK_SHAPE", (400, 500))
    for density in (scale.DISK_DENSITY, scale.DENSER_DISK_DENSITY):
        path = tmp_path / f"{density}.h5ad"
        scale._write_h5ad(str(path), density)
        nnz = anndata.read_h5ad(path).X.nnz
        assert 0.9 * 400 * 500 * density <= nnz <= 400 * 500 * density
    disk = {"shape": [400, 50], "nnz": 200, "n_components": 3, "steps": 5, "batch_size": 50, "seconds": 1.0}
    disk |= {"peak_rss_gb": 0.2, "rss_after_imports_gb": 0.1, "rss_after_open_gb": 0.15, "outputs_gb": 0.01}
    record = json.loads((ROOT / "benchmarks" / "scale_numpy.json").read_text())
    record["out_of_core"] = dict(disk, x_in_memory_gb=0.1)
    record["out_of_core_denser"] = dict(disk, nnz=1000, x_in_memory_gb=0.5)
    lines = [line for line in scale.report(record).splitlines() if line.startswith("out of core")]
    assert [re.search(r"([\d,]+) non-zeros", line).group(1) for line in lines] == ["200", "1,000"]
    # the fit's own peak (0.2 - 0.15 GB) and the process's, each against X
    assert "the fit's own peak 0.05 GB (0.50x;" in lines[0] and "the process's 0.20 GB (2.00x;" in lines[0]
    assert "the fit's own peak 0.05 GB (0.10x;" in lines[1] and "the process's 0.20 GB (0.40x;" in lines[1]


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="resident memory is read from /proc (Linux)")
def test_resident_memory_is_read_now_and_the_peak_in_the_same_units():
    from pnmf.benchmarks.speed import peak_rss_gb, rss_gb

    before = rss_gb()
    block = np.ones(2**25)  # 0.25 GiB, every page touched
    held = rss_gb()
    assert 0.2 < held - before < 0.3
    del block
    # the peak remembers the block after it is gone; resident memory now does not
    assert rss_gb() < held - 0.2 and peak_rss_gb() >= held - 0.01
