"""The GPU check's whole logic runs on the CPU (``--dry-run``), so it cannot fail for a typo when a GPU comes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_writes_its_json_and_table(tmp_path: Path) -> None:
    env = dict(os.environ, WANDB_MODE="disabled")
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--output", str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["environment"]["dry_run"] is True
    tests = result["tests"]
    assert tests["tests"] >= 13 and tests["failures"] == 0 and tests["errors"] == 0 and tests["skipped"] == 0
    assert set(result["timings"]) == {"quickstart", "n100_c0.1", "n100_c1.0", "n500_c0.2"}
    for name, setting in result["timings"].items():
        extra = {"batched_per_architecture"} if name == "n100_c1.0" else set()
        assert set(setting["sides"]) == {"plain", "sequential", "batched", "batched_bf16", *extra}
        assert all(side["rounds_per_s"] > 0 for side in setting["sides"].values())
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| n500_c0.2" in table and "batched_bf16" in table
