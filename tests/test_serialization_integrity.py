"""Strict files (issue 9 items 4-5): exact data coverage, checksums, header amplification.

References: safetensors' own loader for the coverage rules, `zlib`/`binascii` CRC-32 of
the tensors' bytes for the recorded checksums, tracemalloc for allocation bounds.
"""

import binascii
import json
import os
import struct
import tempfile
import tracemalloc

import pytest
import safetensors.torch
import torch
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import functorch_pipeline as fp
from functorch_pipeline.serialization import _format


def write(data: bytes) -> str:
    d = tempfile.mkdtemp()
    p = os.path.join(d, "x.safetensors")
    with open(p, "wb") as f:
        f.write(data)
    return p


def header_file(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def saved(tree) -> bytes:
    p = write(b"")
    fp.save(p, tree)
    with open(p, "rb") as f:
        return f.read()


def data_start(blob: bytes) -> int:
    return 8 + int.from_bytes(blob[:8], "little")


# ------------------------------------------------------------------ exact coverage


@pytest.mark.parametrize(
    ("tensors", "data_len", "msg"),
    [
        (
            {"a": (0, 4)},
            8,
            r"4 bytes after the last tensor's end at byte 4 of the 8-byte data section \(padded",
        ),
        (
            {"a": (4, 8)},
            8,
            r"a gap of 4 bytes at the start \(tensor `a` starts at byte 4, expected 0\); shifted",
        ),
        (
            {"a": (0, 4), "b": (8, 12)},
            12,
            r"a gap of 4 bytes after tensor `a` \(tensor `b` starts at byte 8",
        ),
        (
            {"a": (0, 8), "e": (4, 4)},
            8,
            r"an overlap after tensor `a` \(tensor `e` starts at byte 4, expected 8\)",
        ),
        ({}, 3, r"3 bytes after the last tensor's end at byte 0"),
    ],
)
def test_files_not_fully_covered_are_rejected(tensors, data_len, msg):
    header = {
        n: {"dtype": "U8", "shape": [e - s], "data_offsets": [s, e]}
        for n, (s, e) in tensors.items()
    }
    p = write(header_file(header, bytes(data_len)))
    with pytest.raises(
        fp.CheckpointError,
        match=r"load\(path\): .*: the file is not fully covered by its tensors: " + msg,
    ):
        fp.load(p)
    with pytest.raises(
        Exception, match=r"not fully covered|invalid offset"
    ):  # the reference agrees
        safetensors.torch.load_file(p)


def test_shifted_and_padded_saved_file_is_rejected():
    blob = saved(
        {"w": torch.arange(4, dtype=torch.float32), "b": torch.ones(2, dtype=torch.float64)}
    )
    with pytest.raises(fp.CheckpointError, match=r"not fully covered"):
        fp.load(write(blob + b"\0" * 8))  # padded: used to load silently
    start = data_start(blob)
    shifted = blob[:start] + b"\0" * 8 + blob[start:-8]  # same size, data moved by 8 bytes
    with pytest.raises(fp.CheckpointError, match=r"checksum"):
        fp.load(write(shifted))  # caught by the checksums (the layout itself is consistent)


layouts = st.lists(st.tuples(st.integers(0, 12), st.integers(0, 6)), min_size=0, max_size=3)


@settings(max_examples=150, deadline=None)
@given(layouts, st.integers(0, 20))
def test_coverage_rules_match_safetensors(spans, data_len):
    """Random layouts (each entry self-consistent: its shape matches its span): fp.load
    accepts a plain safetensors file exactly when safetensors itself does, with the
    same bytes."""
    header = {
        f"t{i}": {"dtype": "U8", "shape": [n], "data_offsets": [s, s + n]}
        for i, (s, n) in enumerate(spans)
    }
    data = bytes(range(data_len))
    p = write(header_file(header, data))
    try:
        ref = safetensors.torch.load_file(p)
    except Exception:
        ref = None
    try:
        out = fp.load(p)
    except fp.CheckpointError:
        out = None
    assert (out is None) == (ref is None)
    if out is not None:
        assert out.keys() == ref.keys() and all(torch.equal(out[k], ref[k]) for k in ref)


# ------------------------------------------------------------------ checksums


def test_recorded_checksums_are_crc32_of_each_tensor():
    tree = {
        "w": torch.randn(3, 5, dtype=torch.float64),
        "e": torch.zeros(0),
        "i": torch.arange(7, dtype=torch.int16),
    }
    blob = saved(tree)
    meta = json.loads(blob[8 : data_start(blob)])["__metadata__"]
    value = meta["functorch_pipeline.crc32"]
    header = json.loads(blob[8 : data_start(blob)])
    order = sorted(
        (k for k in header if k != "__metadata__"), key=lambda k: tuple(header[k]["data_offsets"])
    )
    want = [binascii.crc32(tree[k].numpy().tobytes()) for k in order]
    assert [int(x, 16) for x in value.split(",")[1:]] == want
    # the header's own CRC: the header JSON as written first, with the field all zeros
    zeroed = blob[8 : data_start(blob)].replace(value.encode(), ",".join(["00000000"] * 4).encode())
    assert int(value.split(",")[0], 16) == binascii.crc32(zeroed)


def test_every_single_bit_flip_is_detected():
    """Every bit of a small checkpoint, header and data: a flip never loads silently."""
    blob = saved({"w": torch.arange(6, dtype=torch.float32), "step": 7, "lr": 0.5, "name": "run"})
    for pos in range(len(blob)):
        for bit in range(8):
            bad = bytearray(blob)
            bad[pos] ^= 1 << bit
            with pytest.raises(fp.CheckpointError):
                fp.load(write(bytes(bad)))


def test_data_flip_error_names_the_tensor_and_verify_false_skips_it():
    big = torch.arange(1 << 19, dtype=torch.float32)  # 2 MiB: checksummed on the worker thread
    tree = {"big": big, "small": torch.ones(3)}
    blob = bytearray(saved(tree))
    start = data_start(blob)
    blob[start + 4 * 1000 + 1] ^= 0x10  # inside big[1000]
    p = write(bytes(blob))
    with pytest.raises(
        fp.CheckpointError,
        match=r"tensor `big` \(bytes \[0, 2097152\) of the data section\) does not match its checksum \(CRC-32 [0-9a-f]{8}, recorded [0-9a-f]{8}\).*verify=False",
    ):
        fp.load(p)
    with pytest.raises(fp.CheckpointError, match=r"tensor `big`"):
        fp.load(p, like=tree, device="cpu")
    out = fp.load(p, verify=False)
    expected = big.clone()
    expected.view(torch.uint8)[4 * 1000 + 1] ^= 0x10
    assert torch.equal(out["big"], expected) and torch.equal(out["small"], tree["small"])


def test_header_flip_is_detected_even_when_the_json_stays_valid():
    blob = saved({"w": torch.zeros(2), "step": 7})
    bad = blob.replace(b'\\"v\\":7', b'\\"v\\":5')  # '7' -> '5' is one bit; still valid JSON
    assert bad != blob
    with pytest.raises(fp.CheckpointError, match=r"the header's checksum does not match"):
        fp.load(write(bad))
    assert fp.load(write(bad), verify=False)["step"] == 5


def test_files_without_checksums_still_load():
    """Files written before checksums existed (and plain safetensors files)."""
    tree = {
        "t": "dict",
        "k": [{"t": "str", "v": "w"}, {"t": "str", "v": "step"}],
        "c": [{"t": "tensor", "n": "w"}, {"t": "int", "v": 3}],
    }
    header = {
        "__metadata__": {
            "functorch_pipeline.format": "1",
            "functorch_pipeline.tree": json.dumps(tree),
        },
        "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
    }
    out = fp.load(write(header_file(header, torch.tensor([1.5, -2.0]).numpy().tobytes())))
    assert out["step"] == 3 and torch.equal(out["w"], torch.tensor([1.5, -2.0]))
    p = write(b"")
    safetensors.torch.save_file({"a": torch.ones(3)}, p)
    assert torch.equal(fp.load(p)["a"], torch.ones(3))


def test_misplaced_or_malformed_checksum_field():
    header = {
        "__metadata__": {
            "functorch_pipeline.format": "1",
            "functorch_pipeline.crc32": "zz",
            "functorch_pipeline.tree": '{"t":"none"}',
        },
    }
    with pytest.raises(
        fp.CheckpointError,
        match=r"the checksum field `functorch_pipeline.crc32` is malformed or not where fp.save puts it",
    ):
        fp.load(write(header_file(header)))
    assert fp.load(write(header_file(header)), verify=False) is None
    header["__metadata__"]["functorch_pipeline.format"] = "2"
    del header["__metadata__"]["functorch_pipeline.crc32"]
    with pytest.raises(
        fp.CheckpointError,
        match=r"the checksum field `functorch_pipeline.crc32` that format version 2 requires is missing",
    ):
        fp.load(write(header_file(header)))


# ------------------------------------------------------------------ header amplification


def test_header_cap_is_safetensors_100_000_000_bytes():
    assert _format.MAX_HEADER_BYTES == 100_000_000


def test_header_with_too_many_json_values_is_refused_before_parsing():
    """A file just over the parse budget (NOTE [parse budget]), the small cousin of the
    issue's 100 MB header of 8M nodes (2.9 GB, 17.5 s): refused before any JSON is
    parsed, allocating nothing near what parsing would."""
    n = _format.MIN_PARSE_UNITS // 2  # two units per node: `{` and `,`
    tree = '{"t":"list","c":[' + ",".join(["{}"] * n) + "]}"
    blob = header_file(
        {"__metadata__": {"functorch_pipeline.format": "1", "functorch_pipeline.tree": tree}}
    )
    p = write(blob)
    assert len(blob) < 4_000_000
    tracemalloc.start()
    try:
        with pytest.raises(
            fp.CheckpointError,
            match=r"the header has \d+ JSON separators and brackets, more than the 1048576 allowed for a \d+-byte file",
        ):
            fp.load(p)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * len(blob)  # parsing it would take ~30x (a 64-byte dict per 3 bytes)


def test_deep_tree_with_many_leaves_is_refused():
    """Key paths cost depth x leaves; a deep tree within the value budget is refused
    before its paths are built."""
    depth, leaves = 300, 4000
    tree = '{"t":"list","c":[' * depth + ",".join(['{"t":"int","v":0}'] * leaves) + "]}" * depth
    blob = header_file(
        {"__metadata__": {"functorch_pipeline.format": "1", "functorch_pipeline.tree": tree}}
    )
    with pytest.raises(
        fp.CheckpointError,
        match=r"the tree's key paths are too long in total for the file's size \(a leaf at depth 300",
    ):
        fp.load(write(blob))
    shallow = '{"t":"list","c":[' + ",".join(['{"t":"int","v":0}'] * leaves) + "]}"
    blob = header_file(
        {"__metadata__": {"functorch_pipeline.format": "1", "functorch_pipeline.tree": shallow}}
    )
    assert fp.load(write(blob)) == [0] * leaves
