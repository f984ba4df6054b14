"""CheckpointManager: retention (last k + best), latest, restore, interrupted saves."""

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest
import torch
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

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
    assert again.restore()["step"] == 3 and again.run_id == mgr.run_id  # resuming adopts the run
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
    with pytest.raises(ValueError, match=r"`metadata` key 'run_id' is reserved"):
        mgr.save(1, {}, metadata={"run_id": "x"})
    with pytest.raises(ValueError, match=r"`run_id` must be 1 to 64 letters, .* got 'a/b'"):
        CheckpointManager(tmp_path, run_id="a/b")


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
    mgr = CheckpointManager(sys.argv[1], max_to_keep=1, run_id="r")
    mgr.save(2, {"layers": [torch.full((1 << 18,), 2.0) for _ in range(32)], "step": 2})
    """
)


def test_interrupted_save_never_becomes_latest(tmp_path):
    mgr = CheckpointManager(tmp_path, max_to_keep=1, run_id="r")
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
        proc.stdout.close()
    assert any(name.endswith(".tmp") for name in os.listdir(tmp_path))  # it was mid-write
    assert mgr.all_steps() == [1] and mgr.latest_step() == 1
    # A manager opened afterwards removes the killed save's temp file (its pid is dead).
    mgr = CheckpointManager(tmp_path, max_to_keep=1)
    assert sorted(os.listdir(tmp_path)) == ["ckpt_00000001.safetensors"]
    out = mgr.restore()
    assert out["step"] == 1 and all(torch.equal(x, torch.full((1 << 18,), 1.0)) for x in out["layers"])
    # The next save works normally and prunes as usual.
    mgr.save(3, tree(3))
    assert mgr.all_steps() == [3]


# ------------------------------------------------- issue 9 item 2: one run per directory


def snapshot(directory):
    return {n: os.path.getmtime(os.path.join(directory, n)) for n in os.listdir(directory)}


def test_reusing_a_directory_of_a_longer_run_is_refused_not_silently_pruned(tmp_path):
    """The issue's scenario: an earlier run saved up to step 100; a new run in the same
    directory used to have every save deleted at once (the highest steps were kept), and
    --resume then restored the other run."""
    first = CheckpointManager(tmp_path, max_to_keep=3)
    for step in range(10, 101, 10):
        first.save(step, tree(step))
    before = snapshot(tmp_path)
    new_run = CheckpointManager(tmp_path, max_to_keep=3)
    with pytest.raises(fp.CheckpointError, match=r"holds checkpoints of another run \(steps \[80, 90, 100\] of run '[0-9a-f]{32}'\); .*nothing was written.*restore\(\) from it first"):
        new_run.save(10, tree(10))
    assert snapshot(tmp_path) == before  # nothing written, nothing deleted
    # Resuming that run (restore) continues it: saves are kept and pruned within the run.
    resumed = CheckpointManager(tmp_path, max_to_keep=3)
    assert resumed.restore()["step"] == 100 and resumed.run_id == first.run_id
    path = resumed.save(110, tree(110))
    assert os.path.exists(path) and resumed.all_steps() == [90, 100, 110]


def test_a_step_older_than_the_runs_latest_is_refused(tmp_path):
    mgr = CheckpointManager(tmp_path, max_to_keep=1)
    mgr.save(5, tree(5))
    mgr.save(9, tree(9))
    with pytest.raises(fp.CheckpointError, match=r"step 7 is older than this run's latest checkpoint \(step 9\).*nothing was written"):
        mgr.save(7, tree(7))  # with max_to_keep=1 it used to be deleted right after writing
    assert mgr.all_steps() == [9]
    path = mgr.save(9, tree(9.5))  # the same step replaces the file
    assert os.path.exists(path) and mgr.restore()["w"][0] == 9.5


def test_explicit_run_id_and_files_from_older_versions(tmp_path):
    a = CheckpointManager(tmp_path, run_id="exp-1")
    a.save(1, tree(1))
    b = CheckpointManager(tmp_path, run_id="exp-1")  # same run, no restore needed
    b.save(2, tree(2))
    assert b.all_steps() == [1, 2] and b.run_id == "exp-1"
    with pytest.raises(fp.CheckpointError, match=r"steps \[1, 2\] of run 'exp-1'"):
        CheckpointManager(tmp_path, run_id="exp-2").save(3, tree(3))
    # Files written without a run id (older versions): refused until restored from.
    old = tmp_path / "old"
    for step in (3, 4):
        fp.save(CheckpointManager(old).path(step), tree(step))
    mgr = CheckpointManager(old, max_to_keep=2)
    with pytest.raises(fp.CheckpointError, match=r"steps \[3, 4\] of run \(no run id, an older version\)"):
        mgr.save(5, tree(5))
    assert mgr.restore()["step"] == 4
    mgr.save(5, tree(5))
    assert mgr.all_steps() == [4, 5]


def test_unreadable_files_block_saving(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, tree(1))
    with open(mgr.path(2), "wb") as f:
        f.write(b"garbage")
    with pytest.raises(fp.CheckpointError, match=r"unreadable steps \[2\]"):
        mgr.save(3, tree(3))
    assert mgr.all_steps() == [1, 2]


ops = st.lists(
    st.one_of(
        st.tuples(st.just("save"), st.integers(0, 12), st.floats(0, 1)),
        st.tuples(st.just("reopen"), st.booleans(), st.just(0.0)),
    ),
    min_size=1,
    max_size=14,
)


@settings(max_examples=25, deadline=None)
@given(ops, st.sampled_from([None, 1, 2, 3]), st.booleans())
def test_a_save_never_loses_what_it_wrote(ops, keep, with_best):
    """Random saves and re-opened managers (resuming or not), against a model of the
    rules: a save either is refused with nothing changed, or its file exists afterwards
    and the directory holds exactly the last `keep` steps plus the best."""
    kwargs = {"max_to_keep": keep, "best_metric": "loss" if with_best else None}
    with tempfile.TemporaryDirectory() as d:
        mgr = CheckpointManager(d, **kwargs)
        model: dict[int, float] = {}  # step -> loss of the files that must be on disk
        run_has_files = False  # the current manager owns the directory's files
        for op, a, loss in ops:
            if op == "reopen":
                mgr = CheckpointManager(d, **kwargs)
                run_has_files = False
                if a and model:
                    assert mgr.restore()["step"] == max(model)
                    run_has_files = True
                continue
            before = snapshot(d)
            if model and (not run_has_files or a < max(model)):
                with pytest.raises(fp.CheckpointError):
                    mgr.save(a, tree(a), metrics={"loss": loss})
                assert snapshot(d) == before
                continue
            path = mgr.save(a, tree(a), metrics={"loss": loss})
            run_has_files = True
            assert os.path.exists(path) and mgr.restore(step=a)["step"] == a
            model[a] = loss
            steps = sorted(model)
            kept = set(steps if keep is None else steps[-keep:])
            if with_best:
                kept.add(min(steps, key=lambda s: (model[s], -s)))
            model = {s: model[s] for s in kept}
            assert mgr.all_steps() == sorted(model)


# ------------------------------------------------- issue 9 item 3: stale temp files


def test_stale_temp_files_are_removed_on_open_and_nothing_else(tmp_path):
    from functorch_pipeline.serialization import _tempfiles

    host = _tempfiles._HOST
    code = "import os; print(os.getpid())"
    dead_pid = int(subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            f".ckpt_00000003.safetensors.{host}-{dead_pid}-abcd_123.tmp": "removed",  # writer dead
            f".ckpt_00000004.safetensors.{host}-{live.pid}-abcd_123.tmp": "kept",  # still saving
            f".ckpt_00000005.safetensors.{host}-{os.getpid()}-abcd_123.tmp": "kept",  # this process
            f".ckpt_00000006.safetensors.0badf00d-{dead_pid}-abcd_123.tmp": "kept",  # other host, fresh
            f".ckpt_00000007.safetensors.0badf00d-{dead_pid}-zzzz_999.tmp": "old",  # other host, 2 h old
            ".ckpt_00000008.safetensors.q1w2e3r4.tmp": "old",  # older library version, 2 h old
            ".ckpt_00000009.safetensors.q1w2e3r5.tmp": "kept",  # older version, fresh
            f".other_00000001.safetensors.{host}-{dead_pid}-abcd_123.tmp": "kept",  # not this prefix
            f".ckpt.safetensors.{host}-{dead_pid}-abcd_123.tmp": "kept",  # not a step file
            "notes.tmp": "kept",
            "ckpt_00000002.safetensors.tmp": "kept",
        }
        for name, fate in names.items():
            (tmp_path / name).write_bytes(b"partial")
            if fate == "old":
                t = time.time() - 7200
                os.utime(tmp_path / name, (t, t))
        a_dir = f".ckpt_00000010.safetensors.{host}-{dead_pid}-dir_dir_.tmp"
        os.mkdir(tmp_path / a_dir)  # not a regular file: never removed
        CheckpointManager(tmp_path)
        expected = sorted([n for n, fate in names.items() if fate == "kept"] + [a_dir])
        assert sorted(os.listdir(tmp_path)) == expected
    finally:
        live.kill()
        live.wait()
    # The public function: max_age=0 removes every temp file whose writer is not this process.
    mine = f".ckpt_00000005.safetensors.{host}-{os.getpid()}-abcd_123.tmp"
    removed = fp.serialization.clean_temp_files(tmp_path, max_age=0)
    assert sorted(os.path.basename(p) for p in removed) == sorted(
        n for n, fate in names.items() if fate == "kept" and n.startswith(".") and n != mine
    )
    assert mine in os.listdir(tmp_path)
    with pytest.raises(ValueError, match=r"clean_temp_files\(directory\): `max_age` must be >= 0 seconds, got -1"):
        fp.serialization.clean_temp_files(tmp_path, max_age=-1)


def test_numpy_scalar_metrics_are_numbers(tmp_path):
    """np.float32 / np.int64 / np.float16 are numbers.Real but were refused ("must be a
    number, got float32"); they are recorded as the Python numbers they equal."""
    import numpy as np

    mgr = CheckpointManager(str(tmp_path))
    mgr.save(1, tree(1), metrics={"f32": np.float32(0.75), "i64": np.int64(3), "f16": np.float16(0.25),
                                  "f64": np.float64(0.5), "t": torch.tensor(2.0), "py": 7})
    assert mgr.metrics(1) == {"f32": 0.75, "i64": 3, "f16": 0.25, "f64": 0.5, "t": 2.0, "py": 7}
    for bad in (np.bool_(True), True, "0.5", [1.0]):
        with pytest.raises(TypeError, match=r"metric 'm' must be a number"):
            mgr.save(2, tree(2), metrics={"m": bad})
