"""examples/mnist.py under ``torchrun --nproc_per_node 2`` on small synthetic MNIST files:
it runs, rank 0 alone prints, every rank holds the same state, and a 1-process ``--resume``
continues the 2-rank run (same optimizer state). (An uneven --batch-size exits 2 before
training; checked by hand, not here: each torchrun costs seconds.)"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest

import functorch_pipeline as fp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))


def _run(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    """Run with a hard timeout that kills the whole process group (torchrun's workers too)."""
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{cmd[:3]} timed out:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed next to this Python")
def test_mnist_example_under_torchrun(tmp_path: object) -> None:
    data, out = os.path.join(tmp_path, "data"), os.path.join(tmp_path, "out")
    fp.data.write_synthetic_mnist(data, num_train=128, num_test=32)
    flags = [
        "--data-dir",
        data,
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--no-progress",
        "--no-plot",
        "--out-dir",
        out,
        "--save-interval",
        "2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = _run(
        [TORCHRUN, "--standalone", "--nproc_per_node", "2", "examples/mnist.py", *flags], env
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("epoch 1: train loss") == 1  # rank 1 is silent
    mine = fp.train.CheckpointManager(os.path.join(out, "checkpoints"))
    mirror = fp.train.CheckpointManager(os.path.join(out + ".rank1", "checkpoints"))
    assert mine.latest_step() == mirror.latest_step() == 4
    assert fp.tree.allclose(mine.restore(), mirror.restore(), rtol=0, atol=0)
    # the 2-rank checkpoint resumes in one process: the optimizer state is the plain one
    again = _run(
        [sys.executable, "examples/mnist.py", *flags[:3], "2", *flags[4:], "--resume"], env
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from step 4" in again.stdout and "epoch 2: train loss" in again.stdout
