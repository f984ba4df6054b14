"""fp.save / fp.load at the edges: what fp.save writes, fp.load reads back.

Registered type names, Python-scalar-heavy trees against the parse budget (NOTE [parse
budget]), long file names against NAME_MAX (NOTE [temp files]), ``load_torch`` on a
safetensors file, leaves the format cannot hold, and CheckpointManager steps.
References: a fresh Python process, the raw header text of the file written, Python's
own limits (``fnmatch``, ``json``) and the values put in.
"""

import dataclasses
import json
import os
import struct
import subprocess
import sys
import textwrap
from typing import NamedTuple

import numpy as np
import pytest
import torch

import functorch_pipeline as fp
from functorch_pipeline import serialization
from functorch_pipeline.serialization import _format
from functorch_pipeline.serialization import _save
from functorch_pipeline.serialization import _tempfiles
from functorch_pipeline.train import CheckpointManager

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tree_json(path) -> dict:
    """The tree JSON recorded in a file's header, read with json alone."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return json.loads(header["__metadata__"]["functorch_pipeline.tree"])


def types_in(node) -> list[str]:
    out = [node["type"]] if "type" in node else []
    for child in node.get("c", []):
        out += types_in(child)
    return out


# ----------------------------------------------------------------- F1: register_type(name=)


def test_register_type_records_the_registered_name(tmp_path):
    class Stats(NamedTuple):
        count: torch.Tensor
        total: float

    serialization.register_type(Stats, name="mylib.stats:Stats")
    p = tmp_path / "c.safetensors"
    fp.save(p, {"s": Stats(torch.ones(2), 3.0)})
    assert types_in(tree_json(p)) == ["mylib.stats:Stats"]
    out = fp.load(p)
    assert type(out["s"]) is Stats and out["s"].total == 3.0
    assert torch.equal(out["s"].count, torch.ones(2))


def test_register_type_name_for_a_registered_dataclass(tmp_path):
    @fp.tree.register_dataclass
    @dataclasses.dataclass
    class Box:
        w: torch.Tensor
        n: int

    serialization.register_type(Box, name="mylib.box:Box")
    p = tmp_path / "c.safetensors"
    fp.save(p, [Box(torch.zeros(3), 4)])
    assert types_in(tree_json(p)) == ["mylib.box:Box"]
    (box,) = fp.load(p)
    assert type(box) is Box and box.n == 4 and torch.equal(box.w, torch.zeros(3))


def test_register_type_name_loads_in_a_fresh_process(tmp_path):
    """Save and load in two processes that both register the class as documented."""
    prog = textwrap.dedent(
        """
        import sys, torch
        torch.set_num_threads(1)
        import functorch_pipeline as fp
        from typing import NamedTuple
        class Stats(NamedTuple):
            count: torch.Tensor
            total: float
        fp.serialization.register_type(Stats, name="mylib.stats:Stats")
        if sys.argv[1] == "save":
            fp.save(sys.argv[2], {"s": Stats(torch.ones(2), 3.0)})
        else:
            s = fp.load(sys.argv[2])["s"]
            assert type(s) is Stats and s.total == 3.0 and s.count.tolist() == [1.0, 1.0]
            print("ok")
        """
    )
    p = str(tmp_path / "c.safetensors")
    env = {**os.environ, "PYTHONPATH": REPO}
    for mode in ("save", "load"):
        r = subprocess.run([sys.executable, "-c", prog, mode, p], capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "ok"
    assert types_in(tree_json(p)) == ["mylib.stats:Stats"]


def test_files_recording_the_default_name_still_load(tmp_path):
    """Files written before the class got a name (or by versions that ignored it)
    recorded ``module:QualName``; they keep loading once the class has a custom name."""

    class Old(NamedTuple):
        a: int

    serialization.register_type(Old)
    p = tmp_path / "old.safetensors"
    fp.save(p, Old(1))
    assert types_in(tree_json(p)) == [serialization._structure.type_name(Old)]
    serialization.register_type(Old, name="mylib:Old")
    assert fp.load(p) == Old(1)
    fp.save(tmp_path / "new.safetensors", Old(2))
    assert types_in(tree_json(tmp_path / "new.safetensors")) == ["mylib:Old"]
    assert fp.load(tmp_path / "new.safetensors") == Old(2)


def test_register_type_name_must_be_a_nonempty_str():
    class P(NamedTuple):
        a: int

    for bad in ("", 3):
        with pytest.raises(TypeError, match=r"register_type\(cls, name\): `name` must be a non-empty str"):
            serialization.register_type(P, name=bad)


# ------------------------------------------------------------- F2: the parse budget


def test_long_history_of_small_ints_round_trips(tmp_path):
    """Small ints are the densest common leaf (~4.8 header bytes per parse unit): 260k
    of them are over the 1M-unit floor and, with few tensor bytes, over the old
    file-size budget; fp.save wrote such files and fp.load refused them."""
    hist = [i % 10 for i in range(260_000)]
    tree = {"params": {"w": torch.randn(10, 10)}, "hist": hist, "step": 7}
    p = tmp_path / "h.safetensors"
    fp.save(p, tree)
    size = os.path.getsize(p)
    with open(p, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        units = _format.count_parse_units(f.read(n))
    assert units > max(_format.MIN_PARSE_UNITS, size // 12)  # refused before the fix
    for kw in ({}, {"verify": False}, {"mmap": True}):
        out = fp.load(p, **kw)
        assert out["hist"] == hist and out["step"] == 7
        assert torch.equal(out["params"]["w"], tree["params"]["w"])


def test_long_privacy_schedule_round_trips(tmp_path):
    """An accountant after 40k steps of a decaying noise schedule (one DpStep per
    distinct setting) inside a train state: a library object fp.load must read back."""
    from functorch_pipeline.privacy import Accountant
    from functorch_pipeline.privacy._backend import DpStep

    steps = tuple(DpStep(noise_multiplier=2.0 - i * 1e-5, sample_rate=0.004, count=1) for i in range(40_000))
    tree = {"params": {"w": torch.randn(64, 64)}, "accountant": Accountant("rdp", history=steps)}
    p = tmp_path / "acc.safetensors"
    fp.save(p, tree)
    assert fp.load(p)["accountant"].history == steps


def test_manager_saves_again_after_a_long_history(tmp_path):
    """CheckpointManager's own previous file read as 'unreadable' and blocked the run."""
    hist = [1.0 / (i + 1) for i in range(250_000)]
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"w": torch.ones(3), "hist": hist})
    mgr.save(2, {"w": torch.ones(3), "hist": hist})
    assert mgr.all_steps() == [1, 2]
    assert mgr.restore()["hist"] == hist


def test_parse_budget_scales_with_the_header():
    assert _format.parse_budget(0) == _format.MIN_PARSE_UNITS
    assert _format.parse_budget(120_000_000) == 10_000_000
    assert _format.parse_budget(12_500_000, 12_400_000) == 3_100_000
    assert _format.parse_budget(8 + 100_000_000, 100_000_000) == 25_000_000
    assert _format.count_parse_units(b'{"a":[1,2],"b":"x,y"}') == 7  # inside strings too


@pytest.mark.parametrize(
    ("kind", "msg"),
    [
        ("commas", r"the tree's header would have \d+ JSON separators and brackets, more than the \d+ fp\.load allows"),
        ("deep", r"the tree's key paths are too long in total \(\d+ entries over all leaves, more than the \d+"),
    ],
)
def test_save_refuses_what_load_would_refuse(tmp_path, monkeypatch, kind, msg):
    """fp.save runs fp.load's own budget on the header it is about to write and refuses
    before writing; the same file written anyway is refused by fp.load."""
    if kind == "commas":
        tree = {"w": torch.ones(2), "s": ",:[{" * 300_000}
    else:
        tree = list(range(60_000))
        for _ in range(20):
            tree = [tree]
    p = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match=r"save\(path, tree\): " + msg + r".*torch\.tensor.*nothing was written"):
        fp.save(p, tree)
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(_save, "_check_loadable", lambda *a: None)
    fp.save(p, tree)
    load_msg = r"JSON separators and brackets, more than" if kind == "commas" else r"key paths are too long in total"
    with pytest.raises(fp.CheckpointError, match=load_msg):
        fp.load(p)


def test_save_refuses_a_header_over_the_cap(tmp_path, monkeypatch):
    monkeypatch.setattr(_save, "MAX_HEADER_BYTES", 1_000)
    with pytest.raises(ValueError, match=r"header would be \d+ bytes, more than the 1000-byte limit fp\.load"):
        fp.save(tmp_path / "x.safetensors", {"xs": list(range(200))})
    assert os.listdir(tmp_path) == []


def test_a_flood_of_empty_dicts_is_refused_at_save(tmp_path):
    """Below ~4 header bytes per unit (3.9 for empty dicts): refused up front."""
    with pytest.raises(ValueError, match=r"too many Python scalars or empty containers"):
        fp.save(tmp_path / "x.safetensors", [{} for _ in range(300_000)])
    assert os.listdir(tmp_path) == []


def test_manager_names_unreadable_steps_without_another_run(tmp_path):
    mgr = CheckpointManager(tmp_path)
    with open(mgr.path(3), "wb") as f:
        f.write(b"garbage")
    with pytest.raises(fp.CheckpointError) as e:
        mgr.save(4, {"w": torch.ones(1)})
    text = str(e.value)
    assert "unreadable steps [3]" in text and "read_metadata" in text
    assert "another run (" not in text and "(;" not in text
    assert mgr.all_steps() == [3]


# ----------------------------------------------------------------- F3: long file names


@pytest.mark.parametrize("length", [200, 221, 222, 224, 240, 255])
def test_long_file_names_save(tmp_path, length):
    name = ("run_" + "lr0.001_bs256_wd0.0001_" * 12)[: length - len(".safetensors")] + ".safetensors"
    assert len(name) == length
    p = tmp_path / name
    fp.save(p, {"w": torch.ones(2), "step": 1})
    fp.save(p, {"w": torch.zeros(2), "step": 2})  # replacing works too
    assert fp.load(p)["step"] == 2
    assert os.listdir(tmp_path) == [name]  # no temp file left


def test_long_multibyte_file_name_saves(tmp_path):
    name = "é" * 121 + ".safetensors"  # 254 bytes, 133 characters
    assert len(os.fsencode(name)) == 254
    fp.save(tmp_path / name, {"a": 1})
    assert fp.load(tmp_path / name) == {"a": 1}
    target = _tempfiles.temp_target(name)
    assert len(os.fsencode(target)) <= _tempfiles._MAX_TARGET and target.startswith("é")


def dead_pid() -> int:
    r = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(r.stdout)


def leftover(directory, basename: str) -> str:
    """The name a save to ``basename`` by a killed process would leave behind."""
    prefix = _tempfiles.temp_prefix(basename).replace(f"-{os.getpid()}-", f"-{dead_pid()}-")
    name = prefix + "abcd1234.tmp"
    open(os.path.join(directory, name), "wb").close()
    return name


def test_long_name_temp_files_fit_and_are_cleaned(tmp_path):
    long = "run_" + "x" * 239 + ".safetensors"  # 255 bytes
    short = "ckpt_00000001.safetensors"
    tmp = leftover(tmp_path, long)
    assert len(os.fsencode(tmp)) <= 255
    assert serialization.clean_temp_files(tmp_path, target="ckpt_*.safetensors") == []
    assert serialization.clean_temp_files(tmp_path, target="run_y*") == []
    assert serialization.clean_temp_files(tmp_path, target="run_" + "x" * 238 + "z.safetensors") == []
    for target in (None, long, "run_*.safetensors", "run_x?x*", "*.safetensors", "[r]un_*"):
        tmp = tmp if os.path.exists(tmp_path / tmp) else leftover(tmp_path, long)
        assert serialization.clean_temp_files(tmp_path, target=target) == [str(tmp_path / tmp)], target
    s = leftover(tmp_path, short)
    assert serialization.clean_temp_files(tmp_path, target="ckpt_*.safetensors") == [str(tmp_path / s)]


def test_glob_prefix_automaton_against_fnmatch():
    """`_glob_could_match_prefix(head, glob)` is true iff fnmatch matches some head+tail;
    checked against fnmatch on every tail from a small alphabet."""
    import fnmatch
    import itertools

    heads = ["", "a", "ab", "abc", "ba", "a.b"]
    globs = ["a*", "*c", "a?c", "[ab]*", "[!a]*", "*.b", "abc", "ab", "x*", "a*b*c", "?", "[a-b]b"]
    tails = ["".join(t) for n in range(4) for t in itertools.product("abcx.", repeat=n)]
    for h, g in itertools.product(heads, globs):
        want = any(fnmatch.fnmatchcase(h + t, g) for t in tails)
        assert _tempfiles._glob_could_match_prefix(h, g) == want, (h, g)


# ------------------------------------------------------------- F4: load_torch on fp files


def test_load_torch_refuses_an_fp_save_file(tmp_path):
    p = tmp_path / "ckpt.safetensors"
    fp.save(p, {"params": {"w": torch.ones(2, 2)}, "step": 7})
    with pytest.raises(fp.CheckpointError, match=r"load_torch\(path\): .*this is a safetensors file .*use fp\.load|load it with fp\.load"):
        serialization.load_torch(p)
    q = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2)}, q)
    assert torch.equal(serialization.load_torch(q)["w"], torch.ones(2))


# ------------------------------------------------------------------ F5: unsupported leaves


@pytest.mark.parametrize(
    ("leaf", "msg"),
    [
        ("nested", r"is a nested tensor; only dense \(strided\) tensors can be saved"),
        ("jagged", r"is a nested tensor; only dense \(strided\) tensors can be saved"),
        ("surrogate", r"is a str that is not valid UTF-8 \(surrogates not allowed"),
        ("bigint", r"is an int of \d+ bits, more than 4300 decimal digits.*store it as a str"),
    ],
)
def test_unsupported_leaves_name_their_path(tmp_path, leaf, msg):
    value = {
        "nested": lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]),
        "jagged": lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=torch.jagged),
        "surrogate": lambda: "\udcff.bin",
        "bigint": lambda: 10**4300,
    }[leaf]
    with pytest.warns() if leaf == "nested" else _nothing():
        v = value()
    with pytest.raises(TypeError, match=r"save\(path, tree\): value at path `model\.x` " + msg):
        fp.save(tmp_path / "c.safetensors", {"model": {"x": v}})
    assert os.listdir(tmp_path) == []


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_surrogate_keys_and_metadata_are_refused(tmp_path):
    p = tmp_path / "c.safetensors"
    with pytest.raises(TypeError, match=r"value at path `model` is a dict with key '\\udcff' that is not valid UTF-8"):
        fp.save(p, {"model": {"\udcff": 1}})
    with pytest.raises(TypeError, match=r"`metadata` entry 'name' holds a str that is not valid UTF-8"):
        fp.save(p, {"a": 1}, metadata={"name": "\udcff"})
    assert os.listdir(tmp_path) == []


def test_largest_int_json_allows_round_trips(tmp_path):
    big = 10**4300 - 1  # 4300 digits
    fp.save(tmp_path / "c.safetensors", {"n": big, "m": -big})
    assert fp.load(tmp_path / "c.safetensors") == {"n": big, "m": -big}


def test_save_accepts_bytes_paths_like_load(tmp_path):
    p = os.fsencode(str(tmp_path / "c.safetensors"))
    fp.save(p, {"a": 1})
    assert fp.load(p) == {"a": 1}
    assert os.listdir(tmp_path) == ["c.safetensors"]


@pytest.mark.parametrize("bad", [5.7, True, float("nan"), "3", torch.tensor(2.5), torch.tensor(True)])
def test_manager_refuses_non_integral_steps(tmp_path, bad):
    mgr = CheckpointManager(tmp_path)
    with pytest.raises(TypeError, match=r"CheckpointManager.save\(step, tree\): `step` must be a(n integer| whole number)"):
        mgr.save(bad, {"w": torch.ones(1)})
    assert mgr.all_steps() == []


@pytest.mark.parametrize("good", [5, 5.0, np.int64(5), torch.tensor(5), torch.tensor(5.0)])
def test_manager_accepts_integral_steps(tmp_path, good):
    mgr = CheckpointManager(tmp_path)
    mgr.save(good, {"w": torch.ones(1)})
    assert mgr.all_steps() == [5]
