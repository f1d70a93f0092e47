"""The GPU check's dry run (benchmarks/gpu_check.sh --dry-run): every stage on the CPU, small, so
the script a lent GPU runs first keeps working where no GPU is."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_check_dry_run_runs_every_stage_and_writes_its_summary(tmp_path, zoo):
    # the vllm stage is left out: vllm_backend.py starts three backends' processes (minutes on 2 cores)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path / "out"),
                           "--work", str(tmp_path / "work"), "--zoo", zoo["root"],
                           "--stages", "environment", "cuda_tests", "engine", "search"],
                          capture_output=True, text=True, env=os.environ | {"OUT": ""}, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    stages = summary["stages"]
    assert summary["dry_run"] and summary["device"] == "cpu"
    assert {k: v["result"] for k, v in stages.items()} == dict.fromkeys(
        ["environment", "cuda_tests", "engine", "search"], "ok")
    assert "skipped" in stages["cuda_tests"]["figures"]["pytest"]  # no GPU here: pytest skips them itself
    engine = stages["engine"]["figures"]
    assert engine["parameters"] > 100_000 and engine["copy_tb_s"] > 0
    assert all(engine[m]["apply_ms"] > 0 and 0 < engine[m]["share_of_copy_bandwidth"] for m in ("ties", "dare_ties"))
    search = stages["search"]["figures"]
    assert search["candidates"] == 4 and search["merge_ms"] > 0 and search["fitness_ms"] > 0
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert md.startswith("# evomerge GPU check (dry run, CPU)") and md.count("| ok |") == 4


def test_the_gpu_check_refuses_to_run_without_a_gpu_unless_dry(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "evomerge: error: gpu_check: no CUDA device here (use --dry-run for the CPU)"
    assert not (tmp_path / "gpu_check.json").exists()
