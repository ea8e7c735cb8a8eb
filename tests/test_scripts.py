"""The README's test command installs what the tests need when run as root, as CI runs it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="the install step runs only as root")
def test_the_test_command_installs_slurm_and_the_dataset_when_root_and_missing(tmp_path: Path) -> None:
    stubs = tmp_path / "bin"
    stubs.mkdir()
    calls = tmp_path / "apt-calls"
    (stubs / "apt-get").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (stubs / "apt-get").chmod(0o755)
    # A machine without Slurm: PATH without the folders its daemons live in, the stub apt-get first.
    hidden = {str(Path(p).parent) for p in (shutil.which("slurmctld"), shutil.which("munged")) if p}
    path = [str(stubs), *(p for p in os.environ["PATH"].split(os.pathsep) if p not in hidden and "sbin" not in p)]
    env = dict(os.environ, PATH=os.pathsep.join(path), WANDB_MODE="disabled")
    done = subprocess.run(
        ["bash", "scripts/test.sh", "-q", "-k", "no_test_has_this_name", "-p", "no:cacheprovider"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]  # pytest's "no test selected" is no failure
    installed = calls.read_text()
    assert "update" in installed
    assert all(name in installed for name in ("install", "slurm-wlm", "munge", "dataset-fashion-mnist"))
