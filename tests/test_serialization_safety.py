"""fp.load on hostile input: truncated, corrupted, random and crafted files.

Every failure must be a `fp.CheckpointError` with a clear message: never another
exception, a crash, a hang, a large allocation or code execution.
"""

import json
import math
import os
import pickle
import struct
import tempfile
import tracemalloc
from typing import NamedTuple

import pytest
import torch
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import functorch_pipeline as fp
from functorch_pipeline import serialization


class Pair(NamedTuple):
    a: torch.Tensor
    b: object


def small_checkpoint() -> bytes:
    tree = {
        "params": {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2, dtype=torch.bfloat16)},
        "opt": [Pair(torch.tensor(3), 0.5), None],
        "step": 7,
        "name": "run",
    }
    serialization.register_type(Pair)
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "c.safetensors")
        fp.save(p, tree)
        with open(p, "rb") as f:
            return f.read()


GOOD = small_checkpoint()


def load_bytes(data: bytes, **kwargs):
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "x.safetensors")
        with open(p, "wb") as f:
            f.write(data)
        return fp.load(p, **kwargs)


def header_file(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def test_good_file_loads():
    out = load_bytes(GOOD)
    assert out["step"] == 7 and isinstance(out["opt"][0], Pair)


def test_every_truncation_is_a_checkpoint_error():
    for n in range(len(GOOD)):
        with pytest.raises(fp.CheckpointError, match=r"load\(path\): .*x.safetensors: "):
            load_bytes(GOOD[:n])


def test_empty_and_tiny_files():
    with pytest.raises(fp.CheckpointError, match=r"the file is 0 bytes long, too short"):
        load_bytes(b"")
    with pytest.raises(fp.CheckpointError, match=r"the header is 0 bytes long, too short to hold a JSON object"):
        load_bytes(bytes(8))


def test_huge_claimed_header_does_not_allocate(tmp_path):
    # 1) a length far beyond the file size.
    with pytest.raises(fp.CheckpointError, match=r"the header claims 9223372036854775807 bytes but only 2 follow"):
        load_bytes(struct.pack("<Q", 2**63 - 1) + b"{}")
    # 2) a length that fits a (sparse) 1 GiB file but is over the 100 MB cap.
    p = tmp_path / "sparse.safetensors"
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", 900 * 2**20))
        f.truncate(2**30)
    tracemalloc.start()
    try:
        with pytest.raises(fp.CheckpointError, match=r"the header claims 943718400 bytes, more than the 100000000-byte limit"):
            fp.load(p)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # nothing near the claimed size was allocated


def test_huge_claimed_tensor_does_not_allocate():
    header = {"w": {"dtype": "F32", "shape": [2**40, 2**20], "data_offsets": [0, 2**62]}}
    with pytest.raises(fp.CheckpointError, match=r"tensor `w` claims bytes \[0, 4611686018427387904\) but the data section has 4 bytes"):
        load_bytes(header_file(header, bytes(4)))


@pytest.mark.parametrize(
    ("header", "msg"),
    [
        ({"w": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, r"tensor `w` has unknown dtype 'F99'"),
        ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, r"tensor `w` has an invalid shape"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, r"needs 8 bytes but its data_offsets span 4"),
        ({"w": {"dtype": "F32", "shape": [0, 2**63], "data_offsets": [0, 0]}}, r"tensor `w` has an impossibly large shape"),
        ({"w": {"dtype": "U8", "shape": [2**31, 2**31, 0], "data_offsets": [0, 0]}}, r"impossibly large shape"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, r"claims bytes \[4, 0\)"),
        ({"w": {"dtype": "F32", "shape": [1]}}, r"header entry `w` must be an object with exactly"),
        (
            {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}},
            r"tensors `a` and `b` overlap",
        ),
        ({"__metadata__": {"k": 1}}, r"`__metadata__` in the header must map strings to strings"),
        ({"__metadata__": {"functorch_pipeline.format": "999", "functorch_pipeline.tree": "{}"}}, r"format version 999 .* upgrade"),
        ({"__metadata__": {"functorch_pipeline.format": "1", "functorch_pipeline.tree": "{"}}, r"the tree in the header is not valid JSON"),
        ({"__metadata__": {"functorch_pipeline.format": "1", "functorch_pipeline.tree": '{"t": "set"}'}}, r"unknown node kind 'set'"),
        (
            {"__metadata__": {"functorch_pipeline.format": "1", "functorch_pipeline.tree": '{"t": "tensor", "n": "zz"}'}},
            r"names tensor `zz`, which is not in the file",
        ),
        (
            {"__metadata__": {"functorch_pipeline.format": "1", "functorch_pipeline.tree": '{"t": "list", "c": [{"t": "float", "v": 1.5}]}'}},
            r"a float node must hold a hex string",
        ),
        ({"__metadata__": {"functorch_pipeline.format": "1", "functorch_pipeline.tree": '{"t": "none"}'}, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, r"not part of the tree"),
    ],
)
def test_crafted_headers(header, msg):
    with pytest.raises(fp.CheckpointError, match=msg):
        load_bytes(header_file(header, bytes(8)))


def test_deeply_nested_json_is_an_error_not_a_crash():
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(fp.CheckpointError, match=r"not valid JSON"):
        load_bytes(header_file({"__metadata__": {"functorch_pipeline.format": "1", "functorch_pipeline.tree": deep}}))
    node = '{"t":"list","c":[' * 5000 + '{"t":"none"}' + "]}" * 5000
    with pytest.raises(fp.CheckpointError):
        load_bytes(header_file({"__metadata__": {"functorch_pipeline.format": "1", "functorch_pipeline.tree": node}}))
    raw = (b"[" * 100_000) + (b"]" * 100_000)
    with pytest.raises(fp.CheckpointError, match=r"does not start with '\{'"):
        load_bytes(struct.pack("<Q", len(raw)) + raw)


class Boom:
    """Unpickling this would create a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payloads_never_run(tmp_path):
    marker = tmp_path / "PWNED"
    payload = pickle.dumps({"w": Boom(str(marker))})
    pickle_file = tmp_path / "evil.pkl"
    pickle_file.write_bytes(payload)
    torch_file = tmp_path / "evil.pt"
    torch.save({"w": Boom(str(marker))}, torch_file)
    assert not marker.exists()
    with pytest.raises(fp.CheckpointError, match=r"this is a pickle.*never unpickled"):
        fp.load(pickle_file)
    with pytest.raises(fp.CheckpointError, match=r"this is a zip archive.*never unpickled"):
        fp.load(torch_file)
    with pytest.raises(fp.CheckpointError, match=r"could not be loaded with torch.load\(weights_only=True\)"):
        serialization.load_torch(torch_file)
    # A pickle hidden in a header value is just an unusable string.
    for key in ("functorch_pipeline.tree", "anything"):
        data = header_file({"__metadata__": {"functorch_pipeline.format": "1", key: payload.decode("latin-1")}})
        with pytest.raises(fp.CheckpointError):
            load_bytes(data)
    assert not marker.exists()
    # Control: the payload is live, so the checks above could have failed.
    pickle.loads(payload)["w"].close()
    assert marker.exists()


@pytest.mark.parametrize(
    "type_name",
    [
        "builtins:open",
        "os:system",
        "subprocess:Popen",
        "functorch_pipeline.serialization._save:os.system",
        "functorch_pipeline.serialization._structure:importlib.import_module",
        "functorch_pipeline:serialization.save",
        "functorch_pipeline.no_such_module:X",
        "functorch_pipeline.tree._core:optree.PyTreeSpec",
        "functorch_pipeline.serialization._format:CheckpointError",
        "functorch_pipeline; import os:X",
    ],
)
def test_crafted_type_names_are_refused(tmp_path, type_name):
    marker = tmp_path / "PWNED"
    tree = {
        "t": "namedtuple",
        "type": type_name,
        "f": ["file", "mode"],
        "c": [{"t": "str", "v": str(marker)}, {"t": "str", "v": "w"}],
    }
    meta = {"functorch_pipeline.format": "1", "functorch_pipeline.tree": json.dumps(tree)}
    with pytest.raises(fp.CheckpointError, match=r"needs type .* which is not registered"):
        load_bytes(header_file({"__metadata__": meta}))
    tree["t"] = "node"
    tree["aux"] = {"t": "none"}
    meta["functorch_pipeline.tree"] = json.dumps(tree)
    with pytest.raises(fp.CheckpointError, match=r"needs type .* which is not registered"):
        load_bytes(header_file({"__metadata__": meta}))
    assert not marker.exists()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_fuzz_byte_mutations(mutations):
    data = bytearray(GOOD)
    for pos, value in mutations:
        data[pos] = value
    try:
        load_bytes(bytes(data))
    except fp.CheckpointError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 400))
def test_fuzz_random_files(data, claimed):
    for blob in (data, struct.pack("<Q", claimed) + data):
        try:
            load_bytes(blob)
        except fp.CheckpointError:
            pass


@settings(max_examples=150, deadline=None)
@given(st.integers(0, len(GOOD) - 1), st.binary(min_size=1, max_size=40))
def test_fuzz_insertions_and_deletions(pos, chunk):
    for blob in (GOOD[:pos] + chunk + GOOD[pos:], GOOD[:pos] + GOOD[pos + len(chunk) :]):
        try:
            load_bytes(blob)
        except fp.CheckpointError:
            pass


json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=6),
    st.sampled_from([0, 1, 2**31, 2**62, 2**63, 2**64, -1]),
)
json_values = st.recursive(json_scalars, lambda k: st.lists(k, max_size=4) | st.dictionaries(st.text(max_size=4), k, max_size=4), max_leaves=10)
dims = st.one_of(st.sampled_from([0, 1, 2, 2**31, 2**40, 2**62, 2**63, 2**64, -1]), st.integers(0, 4), json_scalars)
entries = st.fixed_dictionaries(
    {
        "dtype": st.one_of(st.sampled_from(["F32", "BF16", "U8", "BOOL", "I64", "F8_E4M3", "X"]), json_scalars),
        "shape": st.one_of(st.lists(dims, max_size=4), json_values),
        "data_offsets": st.one_of(
            st.sampled_from([[0, 0], [0, 4], [0, 8], [4, 8], [8, 8]]),
            st.lists(st.one_of(st.integers(0, 40), dims), min_size=2, max_size=2),
            json_values,
        ),
    }
)
nodes = st.recursive(
    st.one_of(
        st.fixed_dictionaries({"t": st.sampled_from(["tensor", "none", "int", "float", "str", "bool", "x"]), "n": st.sampled_from(["a", "b"]), "v": json_scalars}),
        json_values,
    ),
    lambda k: st.fixed_dictionaries(
        {
            "t": st.sampled_from(["dict", "odict", "list", "tuple", "namedtuple", "node"]),
            "k": st.lists(k, max_size=3),
            "c": st.lists(k, max_size=3),
            "f": st.lists(st.one_of(st.text(max_size=3), st.integers(0, 3)), max_size=3),
            "type": st.sampled_from(["functorch_pipeline.train._state:TrainState", "functorch_pipeline.optim._base:EmptyState", "os:system"]),
            "aux": k,
        }
    ),
    max_leaves=8,
)


ITEMSIZE = {"F32": 4, "BF16": 2, "U8": 1, "BOOL": 1, "I64": 8, "F8_E4M3": 1}


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(ITEMSIZE)), st.lists(st.one_of(st.sampled_from([0, 1, 3, 2**31, 2**62, 2**63, 2**64]), st.integers(0, 5)), max_size=5))
def test_fuzz_self_consistent_headers_with_hostile_shapes(dtype, shape):
    """Offsets agree with the shape, so only the shape itself can be the problem."""
    nbytes = math.prod(shape) * ITEMSIZE[dtype]
    header = {"a": {"dtype": dtype, "shape": shape, "data_offsets": [0, nbytes]}}
    try:
        out = load_bytes(header_file(header, bytes(min(nbytes, 64))))
        assert tuple(out["a"].shape) == tuple(shape)
    except fp.CheckpointError:
        pass


def tree_of(names):
    return {"t": "dict", "k": [{"t": "str", "v": n} for n in names], "c": [{"t": "tensor", "n": n} for n in names]}


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["a", "b"]), entries, max_size=2), nodes, st.booleans(), st.binary(max_size=40))
def test_fuzz_structured_headers(tensors, tree, valid_tree, data):
    """Well-formed JSON with hostile values; half the time the tree is valid, so the
    tensor entries themselves reach the reading code."""
    header = dict(tensors)
    tree = tree_of(sorted(tensors)) if valid_tree else tree
    header["__metadata__"] = {"functorch_pipeline.format": "1", "functorch_pipeline.tree": json.dumps(tree)}
    try:
        load_bytes(header_file(header, data))
    except fp.CheckpointError:
        pass
