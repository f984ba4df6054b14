"""The examples fail clearly (issue 9 item 6, issue 14 "Examples").

Bad flags, devices this machine lacks, ``--resume`` with nothing to resume and a reused
``--out-dir`` exit with status 2 and ONE line on stderr, before any data is read (the
tests point ``--data-dir`` at a folder that does not exist, so reading data first would
print the missing-data message instead). A few run as real subprocesses to see the exit
status and the absence of a traceback end to end; the rest call ``main(argv)`` in-process
(fast). A diverging run stops (status 1); Ctrl-C (a real SIGINT) saves the step and prints
the resume command; a resumed epoch's metrics equal the uninterrupted run's; every flag's
help shows its default. Data: tiny synthetic MNIST-format files.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import functorch_pipeline as fp

EXAMPLES = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, "examples"))
sys.path.insert(0, EXAMPLES)

import common  # noqa: E402
import lstm  # noqa: E402
import mnist  # noqa: E402
import per_sample_grads  # noqa: E402

MODULES = {"mnist": mnist, "lstm": lstm, "per_sample_grads": per_sample_grads}
HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    fp.data.write_synthetic_mnist(root, num_train=64, num_test=32)
    return str(root)


def _tiny(data_root, out_dir, *extra):
    return ["--data-dir", data_root, "--batch-size", "32", "--test-batch-size", "32",
            "--no-progress", "--device", "cpu", "--out-dir", str(out_dir), *extra]


def _one_line_exit(capsys, main, argv, status=2):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == status
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


BAD_FLAGS = [
    ("mnist", ["--device", "tpu"],
     r"mnist.py: error: argument --device: unknown device 'tpu'; this machine has: cpu"),
    ("mnist", ["--optimizer", "adamx"],
     r"argument --optimizer: invalid choice: 'adamx' "
     r"\(choose from 'adadelta', 'adagrad', 'adam', .*'sgd'\)"),
    ("mnist", ["--batch-size", "0"], r"argument --batch-size: must be an integer >= 1, got '0'"),
    ("mnist", ["--batch-size", "-3"], r"argument --batch-size: must be an integer >= 1, got '-3'"),
    ("mnist", ["--epochs", "0"], r"argument --epochs: must be an integer >= 1, got '0'"),
    ("mnist", ["--lr", "nan"], r"argument --lr: must be a finite number > 0, got 'nan'"),
    ("mnist", ["--seed", str(2**70)],
     r"argument --seed: must be an integer in \[-2\*\*63, 2\*\*63\)"),
    ("mnist", ["--save-interval", "0"], r"argument --save-interval: must be an integer >= 1"),
    ("mnist", ["--bogus"], r"unrecognized arguments: --bogus"),
    ("lstm", ["--device", "tpu"], r"lstm.py: error: argument --device: unknown device 'tpu'"),
    ("lstm", ["--batch-size", "0"], r"argument --batch-size: must be an integer >= 1"),
    ("lstm", ["--epochs", "0"], r"argument --epochs: must be an integer >= 1"),
    ("lstm", ["--task", "imdb"], r"--task imdb needs --imdb-dir"),
    ("per_sample_grads", ["--device", "tpu"],
     r"per_sample_grads.py: error: argument --device: unknown device"),
    ("per_sample_grads", ["--batch-size", "0"], r"argument --batch-size: must be an integer >= 1"),
    ("per_sample_grads", ["--chunk-size", "-1"], r"argument --chunk-size: must be an integer >= 1"),
    ("per_sample_grads", ["--sigma", "-1"], r"argument --sigma: must be a finite number >= 0"),
]
if not HAS_CUDA:
    BAD_FLAGS += [
        (name, ["--device", dev],
         rf"argument --device: '{dev}' requested but CUDA is not available "
         r"on this machine .*; use --device cpu")
        for name in MODULES for dev in ("cuda", "cuda:1")
    ]


@pytest.mark.parametrize("name, argv, match", BAD_FLAGS,
                         ids=[f"{n}{' '.join(a)}" for n, a, _ in BAD_FLAGS])
def test_bad_flags_exit_2_with_one_line_before_reading_data(name, argv, match, tmp_path, capsys):
    nowhere = str(tmp_path / "no_data")  # reading data first would print the missing-data message
    argv = ["--data-dir", nowhere, "--out-dir", str(tmp_path / "o"), *argv]
    err = _one_line_exit(capsys, MODULES[name].main, argv)
    assert re.search(match, err), err
    assert "MNIST not found" not in err and not (tmp_path / "o").exists()


def test_cuda_index_beyond_the_devices_this_machine_has():
    if HAS_CUDA:
        n = torch.cuda.device_count()
        match = rf"'cuda:{n}' does not exist: this machine has {n} CUDA device"
        with pytest.raises(ValueError, match=match):
            common.check_device(f"cuda:{n}")
        assert common.check_device("cuda:0") == torch.device("cuda:0")
    else:
        with pytest.raises(ValueError, match=r"'cuda:7' requested but CUDA is not available"):
            common.check_device("cuda:7")
    assert common.check_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device 'meta' is not available on this machine"):
        common.check_device("meta")


def test_subprocess_errors_have_status_2_one_line_and_no_traceback(tmp_path):
    """End to end: the real interpreter, two failures started together (bounded time)."""
    bad_device = "tpu" if HAS_CUDA else "cuda"
    nowhere = str(tmp_path / "no_data")
    runs = {
        "device": ["mnist.py", "--device", bad_device, "--epochs", "2", "--data-dir", nowhere],
        "resume": ["lstm.py", "--resume", "--out-dir", str(tmp_path / "empty"),
                   "--data-dir", nowhere],
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {k: subprocess.Popen([sys.executable, os.path.join(EXAMPLES, a[0]), *a[1:]],
                                 cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
             for k, a in runs.items()}
    out = {k: (*p.communicate(timeout=120), p.returncode) for k, p in procs.items()}
    for k, (stdout, stderr, rc) in out.items():
        assert rc == 2, (k, stderr)
        assert stderr.count("\n") == 1 and "Traceback" not in stderr, (k, stderr)
        assert stdout == "", (k, stdout)
    device_err = out["device"][1]
    assert ("argument --device: unknown device" in device_err
            or "CUDA is not available" in device_err)
    assert re.search(r"--resume: no checkpoint to resume from in .*empty.checkpoints; "
                     r"run without --resume", out["resume"][1])


def test_resume_with_nothing_to_resume_and_reused_out_dir(data_root, tmp_path, capsys):
    run = tmp_path / "run"
    err = _one_line_exit(capsys, mnist.main, _tiny(data_root, run, "--epochs", "1", "--resume"))
    assert "--resume: no checkpoint to resume from" in err
    # before: a silent fresh start. Now a real run, then the same folder again without --resume
    mnist.main(_tiny(data_root, run, "--epochs", "1", "--no-plot", "--save-interval", "1"))
    before = sorted(os.listdir(run / "checkpoints"))
    metrics = (run / "metrics.jsonl").read_text()
    err = _one_line_exit(capsys, mnist.main, _tiny(data_root, run, "--epochs", "1"))
    assert re.search(r"--out-dir .*run already holds a run \(checkpoints up to step 2 .*\); "
                     r"pass --resume", err)
    # resuming with flags the checkpoint cannot satisfy: one line, no traceback
    resume = _tiny(data_root, run, "--epochs", "2", "--resume")
    err = _one_line_exit(capsys, mnist.main, [*resume, "--optimizer", "adam"])
    assert re.search(r"--resume: .*ckpt_00000002.safetensors does not fit this run's model or "
                     r"optimizer", err)
    err = _one_line_exit(capsys, mnist.main, [*resume, "--batch-size", "16"])
    assert ("was trained with batch_size=32 but this run has 16; "
            "resume with the same --batch-size") in err
    # a corrupted newest checkpoint is named as such, with the older step offered (it blamed
    # --model/--optimizer, which no flag fixes)
    newest = run / "checkpoints" / "ckpt_00000002.safetensors"
    saved = newest.read_bytes()
    data = bytearray(saved)
    data[-5] ^= 0xFF
    newest.write_bytes(bytes(data))
    err = _one_line_exit(capsys, mnist.main, resume)
    assert re.search(r"--resume: .*ckpt_00000002.safetensors cannot be read \(.*checksum.*\); the "
                     r"older checkpoints \(steps \[1\]\) may be intact: move .* away to resume "
                     r"from step 1", err)
    newest.write_bytes(saved)
    # nothing was touched, and --epochs 0 (before: exit 0 and metrics.jsonl deleted) neither
    _one_line_exit(capsys, mnist.main, _tiny(data_root, run, "--epochs", "0", "--resume"))
    assert sorted(os.listdir(run / "checkpoints")) == before
    assert (run / "metrics.jsonl").read_text() == metrics
    # --overwrite starts over: the same run again, not a continuation (one epoch, two steps)
    again = mnist.main(_tiny(data_root, run, "--epochs", "1", "--no-plot", "--overwrite",
                             "--save-interval", "1"))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert int(again["state"].step) == 2 and len(rows) == 1
    assert rows[0]["train_loss"] == json.loads(metrics)["train_loss"]


def test_non_finite_loss_stops_the_run_and_saves_nothing_non_finite(data_root, tmp_path, capsys):
    run = tmp_path / "run"
    err = _one_line_exit(capsys, mnist.main, _tiny(data_root, run, "--epochs", "3", "--lr", "1e30",
                                                  "--save-interval", "1", "--no-plot"), status=1)
    # before: every epoch trained on NaN and the run exited 0
    assert re.search(r"mnist.py: error: non-finite train loss \(nan\) at step \d+ \(epoch 1\); "
                     r"stopping\. The last good checkpoint is .*", err), err
    for name in os.listdir(run / "checkpoints"):
        state = fp.load(str(run / "checkpoints" / name))
        floats = [x for x in fp.tree.leaves(state) if x.is_floating_point()]
        assert all(bool(torch.isfinite(x).all()) for x in floats)
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    assert steps[0]["loss"] == pytest.approx(2.3, abs=0.2)
    assert any(s["loss"] != s["loss"] for s in steps)  # NaN was recorded


def test_all_finite():
    assert bool(common.all_finite({"a": torch.ones(2), "n": torch.arange(3)}))
    assert not bool(common.all_finite({"a": torch.tensor([1.0, float("inf")])}))
    assert not bool(common.all_finite([torch.zeros(1), torch.tensor(float("nan"))]))


def test_ctrl_c_saves_the_step_and_resume_continues_exactly(data_root, tmp_path):
    run = tmp_path / "run"
    flags = ["--save-interval", "1", "--no-plot", "--optimizer", "adam", "--lr", "3e-3"]
    argv = _tiny(data_root, run, *flags)
    # the same environment as this process (thread count included): resumed here, it must match
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, os.path.join(EXAMPLES, "mnist.py"), *argv,
                             "--epochs", "1000"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoints").is_dir() or not os.listdir(run / "checkpoints"):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    m = re.search(r"mnist.py: interrupted at step (\d+) \(epoch \d+\); "
                  r"(?:saved|its checkpoint is) (\S+)", stderr)
    assert m, stderr
    step, path = int(m.group(1)), m.group(2)
    assert os.path.isabs(path) or (tmp_path / path).exists()
    assert max(fp.train.CheckpointManager(run / "checkpoints").all_steps()) == step
    cmd = re.search(r"continue with: (.*)", stderr).group(1)
    assert cmd.endswith("--resume") and "--epochs 1000" in cmd and str(run) in cmd
    # resume to the end of the interrupted epoch: the parameters and metrics of one straight run
    epochs = step // 2 + 1
    resumed = mnist.main([*argv, "--epochs", str(epochs), "--resume"])
    straight = mnist.main([*_tiny(data_root, tmp_path / "straight", *flags),
                           "--epochs", str(epochs)])
    pairs = zip(fp.tree.leaves(straight["state"].params), fp.tree.leaves(resumed["state"].params),
                strict=True)
    for a, b in pairs:
        assert torch.equal(a, b)
    rows = {d: [json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("run", "straight")}
    for r in (*rows["run"], *rows["straight"]):
        r.pop("epoch_time_s")
    assert rows["run"] == rows["straight"]


def test_resumed_epoch_metrics_cover_the_whole_epoch(data_root, tmp_path, capsys):
    common_args = ["--save-interval", "1", "--optimizer", "adam", "--lr", "3e-3", "--epochs", "1"]
    straight = mnist.main(_tiny(data_root, tmp_path / "a", *common_args))
    out = capsys.readouterr().out
    # the demo says where everything went
    for what in ("checkpoints", "metrics.jsonl", "steps.jsonl", "curves.png"):
        assert str(tmp_path / "a" / what) in out, out
    # crash after step 1 of 2: keep only that checkpoint, then resume
    mnist.main(_tiny(data_root, tmp_path / "b", *common_args, "--no-plot"))
    ckdir = tmp_path / "b" / "checkpoints"
    for f in os.listdir(ckdir):
        if not f.endswith("00000001.safetensors"):
            os.remove(ckdir / f)
    resumed = mnist.main(_tiny(data_root, tmp_path / "b", *common_args, "--resume"))
    # before: the resumed epoch's train loss averaged only the steps after the resume
    assert resumed["history"][0]["train_loss"] == straight["history"][0]["train_loss"]
    steps = {d: [json.loads(line) for line in (tmp_path / d / "steps.jsonl").read_text().splitlines()]
             for d in ("a", "b")}
    assert steps["a"] == steps["b"] and [s["step"] for s in steps["a"]] == [1, 2]
    # the per-step losses (a separate record, float64 sum) average to the epoch's train loss
    mean = sum(s["loss"] for s in steps["a"]) / 2
    assert straight["history"][0]["train_loss"] == pytest.approx(mean, rel=1e-6)
    assert (tmp_path / "b" / "curves.png").stat().st_size > 1000


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_flag_has_help_and_shows_its_default(name):
    parser = MODULES[name].build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, type(parser._actions[0])) and action.dest == "help":
            continue
        flag = action.option_strings[0]
        assert action.help and len(action.help) > 5, f"{name} {flag} has no help"
        text = formatter._expand_help(action)
        assert "default" in text, f"{name} {flag}: help does not show the default: {text!r}"
        if action.default not in (None, False):
            assert str(action.default) in text, f"{name} {flag}: {text!r}"
    assert "(default: " in parser.format_help()


def test_data_dir_default_is_found_from_the_repository(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.setattr(common, "REPO_ROOT", str(repo))
    assert common.default_data_dir() == str(repo / "data")  # no shared folder next to the repo
    (tmp_path / "shared" / "data").mkdir(parents=True)
    assert common.default_data_dir() == str(tmp_path / "shared" / "data")
    monkeypatch.chdir(tmp_path / "shared")  # not the current directory
    assert common.default_data_dir() == str(tmp_path / "shared" / "data")
    monkeypatch.undo()
    expected = os.path.normpath(os.path.join(EXAMPLES, os.pardir, os.pardir, "shared", "data"))
    if os.path.isdir(expected):
        for module in MODULES.values():
            assert module.build_parser().get_default("data_dir") == expected


def test_missing_data_says_how_to_get_it_offline(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        lstm.main(["--data-dir", str(tmp_path / "nowhere"), "--device", "cpu",
                   "--out-dir", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lstm.py: error: MNIST not found") and "Traceback" not in err
    assert "offline" in err and "train-images-idx3-ubyte" in err and "download=True" not in err
    assert "write_synthetic_mnist" in err
