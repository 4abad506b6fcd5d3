from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def run_processes():
    """``run_processes(args)`` runs ``args`` (after ``torchrun`` on 2 local processes unless ``launcher`` is given)
    with one thread per process and this interpreter's import path, and fails the test with its stderr."""

    def run(args: list[str], launcher: list[str] = TORCHRUN) -> None:
        # PYTHONFAULTHANDLER: a worker that aborts in C++ prints where Python was
        env = {**os.environ, "PYTHONFAULTHANDLER": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
        done = subprocess.run([*launcher, *args], env=env, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-4000:]

    return run
