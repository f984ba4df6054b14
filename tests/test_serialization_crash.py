"""Crash safety: SIGKILL a process in the middle of fp.save; the previous file survives."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import functorch_pipeline as fp

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WRITER = textwrap.dedent(
    """
    import sys, time, torch
    import functorch_pipeline as fp
    import functorch_pipeline.serialization._save as save_mod

    path, mode = sys.argv[1], sys.argv[2]
    tree = {"layers": [torch.full((1 << 18,), 2.0 + i) for i in range(48)], "step": 2}  # 48 MiB
    if mode == "slow":
        real = save_mod.write_tensor
        def slow(fd, t, *a):  # deterministic: report progress after each tensor, then dawdle
            real(fd, t, *a)
            print("tensor", flush=True)
            time.sleep(0.05)
        save_mod.write_tensor = slow
        fp.save(path, tree)
    else:
        print("start", flush=True)
        while True:  # overwrite the checkpoint again and again until killed
            fp.save(path, tree)
    """
)


def v1_tree():
    return {"layers": [torch.full((1 << 18,), 1.0 + i) for i in range(48)], "step": 1}


def start_writer(path, mode):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), mode], stdout=subprocess.PIPE, text=True, env=env
    )


def temp_files(directory):
    return [f for f in os.listdir(directory) if f.endswith(".tmp")]


def test_sigkill_mid_write_keeps_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    fp.save(path, v1_tree())
    proc = start_writer(path, "slow")
    try:
        for _ in range(10):  # wait until 10 of 48 big tensors are on disk
            assert proc.stdout.readline() == "tensor\n"
        [tmp] = temp_files(tmp_path)
        partial = os.path.getsize(tmp_path / tmp)
        assert 0 < partial < os.path.getsize(path)  # killed midway, not before or after
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    out = fp.load(path, like=v1_tree())
    assert out["step"] == 1
    assert all(torch.equal(a, b) for a, b in zip(out["layers"], v1_tree()["layers"], strict=True))
    # The half-written temp file is left beside it, never at `path`; clean_temp_files
    # removes it (its writer is dead) and nothing else.
    assert len(temp_files(tmp_path)) == 1
    removed = fp.serialization.clean_temp_files(tmp_path)
    assert [os.path.basename(p) for p in removed] == [tmp] and os.listdir(tmp_path) == ["ckpt.safetensors"]


def test_sigkill_during_repeated_overwrites_never_leaves_a_partial_file(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    fp.save(path, v1_tree())
    proc = start_writer(path, "loop")
    try:
        assert proc.stdout.readline() == "start\n"
        deadline = time.monotonic() + 30
        while not temp_files(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
    out = fp.load(path)  # whichever version is at `path`, it is complete
    step = out["step"]
    assert step in (1, 2)
    assert all(torch.equal(x, torch.full((1 << 18,), step + i)) for i, x in enumerate(out["layers"]))
