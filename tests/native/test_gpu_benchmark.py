"""benchmarks/gpu.py on the CPU: the GPU benchmark's code, run where CI runs (the same script
on a GPU is `make bench-gpu`; docs/performance.md holds what it measured there)."""

import json
import subprocess
import sys

import pytest

from tests.cli_helpers import ROOT

pytestmark = pytest.mark.native

TINY = ["--config", "configs/smoke.yaml", "--set", "data.image_size=[64,64]", "--set", "model.fpn_channels=32"]


def gpu_benchmark(tmp_path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "benchmarks/gpu.py", "--device", "cpu", *TINY, "--json", str(tmp_path / "gpu.json")]
    command += ["--markdown", str(tmp_path / "gpu.md"), *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_the_gpu_benchmark_reports_every_variant_against_one_peak(tmp_path):
    variants = ["ours eager bf16", "ours compiled + CUDA graphs bf16", "torchvision AMP"]
    finished = gpu_benchmark(tmp_path, "--batch-sizes", "2", "--steps", "3", "--variants", *variants)
    assert finished.returncode == 0, finished.stderr[-3000:]
    results = json.loads((tmp_path / "gpu.json").read_text())
    rows = {row["variant"]: row for row in results["rows"]}
    assert list(rows) == variants and all(row["batch_size"] == 2 for row in rows.values())
    ours, compiled, theirs = (rows[v] for v in variants)
    # runtime.compile_mode reached torch.compile (reduce-overhead; CUDA graphs need a GPU) and compiled once.
    assert compiled["compilations_after_warmup"] == 0 and compiled["images_per_second"] > 0
    assert results["peak_source"].startswith("measured: 2048x2048 bf16 matmul")
    # Each run of ours against the peak it measured; torchvision's against the first one's.
    for row, peak in ((ours, ours), (compiled, compiled), (theirs, ours)):
        utilisation = row["achieved_tflops_per_device"] / peak["peak_tflops_per_device"]
        assert row["utilisation"] == pytest.approx(utilisation, abs=1e-3)
    # torchvision's rate on our FLOP count of the same network.
    assert theirs["achieved_tflops_per_device"] == pytest.approx(
        theirs["images_per_second"] * ours["train_flops_per_image"] / 1e12, rel=0.02
    )
    table = (tmp_path / "gpu.md").read_text()
    assert all(f"| {variant} | 2 | " in table for variant in variants)


def test_runs_past_the_time_budget_are_reported_as_skipped(tmp_path):
    finished = gpu_benchmark(tmp_path, "--batch-sizes", "2", "4", "--budget", "1", "--variants", "ours eager bf16")
    assert finished.returncode == 0, finished.stderr[-3000:]
    rows = json.loads((tmp_path / "gpu.json").read_text())["rows"]
    assert [(row["batch_size"], row["skipped"]) for row in rows] == [(2, "time budget spent"), (4, "time budget spent")]
    assert "| ours eager bf16 | 4 | time budget spent |" in (tmp_path / "gpu.md").read_text()


def test_without_a_gpu_the_default_device_says_so_in_one_line(tmp_path):
    finished = subprocess.run([sys.executable, "benchmarks/gpu.py"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 1
    assert finished.stderr.strip() == "benchmarks/gpu.py: no CUDA device here; --device cpu runs it on the CPU"
