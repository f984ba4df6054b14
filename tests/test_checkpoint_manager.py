"""CheckpointManager: retention (last k + best), latest, restore, interrupted saves."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import functorch_pipeline as fp
from functorch_pipeline.train import CheckpointManager

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tree(step):
    return {"w": torch.full((3,), float(step)), "step": step}


def test_empty_directory(tmp_path):
    mgr = CheckpointManager(tmp_path / "new")
    assert os.path.isdir(tmp_path / "new")
    assert mgr.all_steps() == [] and mgr.latest_step() is None and mgr.latest() is None and mgr.best_step() is None
    with pytest.raises(FileNotFoundError, match=r"CheckpointManager.restore\(\): no checkpoint in"):
        mgr.restore()


def test_keeps_last_k(tmp_path):
    mgr = CheckpointManager(tmp_path, max_to_keep=3)
    for step in range(0, 100, 10):
        path = mgr.save(step, tree(step))
        assert path == mgr.path(step) and os.path.exists(path)
    assert mgr.all_steps() == [70, 80, 90]
    assert sorted(os.listdir(tmp_path)) == ["ckpt_00000070.safetensors", "ckpt_00000080.safetensors", "ckpt_00000090.safetensors"]
    assert mgr.latest_step() == 90 and mgr.latest() == mgr.path(90)
    assert mgr.restore()["step"] == 90
    assert mgr.restore(step=80)["step"] == 80
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 10 .* steps on disk: \[70, 80, 90\]"):
        mgr.restore(step=10)


def test_keep_all(tmp_path):
    mgr = CheckpointManager(tmp_path, max_to_keep=None)
    for step in range(5):
        mgr.save(step, tree(step))
    assert mgr.all_steps() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(("mode", "best"), [("min", 3), ("max", 6)])
def test_keeps_the_best_by_metric(tmp_path, mode, best):
    losses = {1: 0.9, 2: 0.5, 3: 0.1, 4: 0.4, 5: 0.3, 6: 1.2, 7: 0.35, 8: 0.6}
    mgr = CheckpointManager(tmp_path, max_to_keep=2, best_metric="loss", mode=mode)
    for step, loss in losses.items():
        mgr.save(step, tree(step), metrics={"loss": torch.tensor(loss), "acc": 1 - loss})
    assert mgr.best_step() == best
    assert mgr.all_steps() == sorted({best, 7, 8})
    assert mgr.metrics(best)["loss"] == pytest.approx(losses[best])
    assert mgr.restore(step=mgr.best_step())["step"] == best


def test_state_rebuilt_from_directory_in_a_new_manager(tmp_path):
    mgr = CheckpointManager(tmp_path, max_to_keep=2, best_metric="acc", mode="max")
    for step, acc in [(1, 0.9), (2, 0.5), (3, 0.6)]:
        mgr.save(step, tree(step), metrics={"acc": acc})
    again = CheckpointManager(tmp_path, max_to_keep=2, best_metric="acc", mode="max")
    assert again.all_steps() == [1, 2, 3] and again.best_step() == 1 and again.latest_step() == 3
    again.save(4, tree(4), metrics={"acc": 0.1})
    assert again.all_steps() == [1, 3, 4]


def test_restore_with_like_and_train_state(tmp_path):
    mgr = CheckpointManager(tmp_path)
    state = fp.TrainState.create({"w": torch.randn(4)}, (torch.zeros(4),), fp.random.key(0), step=12)
    mgr.save(int(state.step), state)
    out = mgr.restore(like=state)
    assert isinstance(out, fp.TrainState) and torch.equal(out.params["w"], state.params["w"])
    with pytest.raises(fp.CheckpointError, match=r"leaf at path `params.w` has shape \(5,\) in `like` but \(4,\) on disk"):
        mgr.restore(like=state.replace(params={"w": torch.zeros(5)}))


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"`max_to_keep` must be an int >= 1 or None, got 0"):
        CheckpointManager(tmp_path, max_to_keep=0)
    with pytest.raises(ValueError, match=r"`mode` must be 'min' or 'max'"):
        CheckpointManager(tmp_path, mode="best")
    with pytest.raises(ValueError, match=r"`prefix` must be letters"):
        CheckpointManager(tmp_path, prefix="a/b")
    mgr = CheckpointManager(tmp_path)
    with pytest.raises(ValueError, match=r"`step` must be >= 0"):
        mgr.save(-1, {})
    with pytest.raises(TypeError, match=r"metric 'loss' must be a number, got str"):
        mgr.save(1, {}, metrics={"loss": "low"})
    with pytest.raises(ValueError, match=r"`metadata` key 'metrics' is reserved"):
        mgr.save(1, {}, metadata={"metrics": "{}"})


def test_foreign_and_temp_files_are_ignored(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(5, tree(5))
    for name in [".ckpt_00000009.safetensors.x1y2.tmp", "ckpt_9.safetensors", "ckpt_00000009.safetensors.bak", "notes.txt"]:
        (tmp_path / name).write_bytes(b"junk")
    assert mgr.all_steps() == [5] and mgr.latest_step() == 5


WRITER = textwrap.dedent(
    """
    import sys, time, torch
    import functorch_pipeline.serialization._save as save_mod
    from functorch_pipeline.train import CheckpointManager

    real = save_mod.write_tensor
    def slow(fd, t, *a):
        real(fd, t, *a)
        print("tensor", flush=True)
        time.sleep(0.05)
    save_mod.write_tensor = slow
    mgr = CheckpointManager(sys.argv[1], max_to_keep=1)
    mgr.save(2, {"layers": [torch.full((1 << 18,), 2.0) for _ in range(32)], "step": 2})
    """
)


def test_interrupted_save_never_becomes_latest(tmp_path):
    mgr = CheckpointManager(tmp_path, max_to_keep=1)
    mgr.save(1, {"layers": [torch.full((1 << 18,), 1.0) for _ in range(32)], "step": 1})
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        for _ in range(5):
            assert proc.stdout.readline() == "tensor\n"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert any(name.endswith(".tmp") for name in os.listdir(tmp_path))  # it was mid-write
    assert mgr.all_steps() == [1] and mgr.latest_step() == 1
    out = mgr.restore()
    assert out["step"] == 1 and all(torch.equal(x, torch.full((1 << 18,), 1.0)) for x in out["layers"])
    # The next save works normally and prunes as usual.
    mgr.save(3, tree(3))
    assert mgr.all_steps() == [3]
