"""Lazy loading (issue 13, the lazy-load row): ``fp.load(path, mmap=True)`` and
``fp.serialization.verify_lazy``.

References: a full ``fp.load`` of the same file (bit for bit), the saved tensors
themselves, safetensors' own loader for files from other writers, ``zlib.crc32`` for the
recorded checksums, and the kernel's count of bytes read by this process
(``/proc/self/io`` ``rchar``) for "does not read the data".
"""

import gc
import json
import os
import struct
import tempfile

import pytest
import safetensors.torch
import torch
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import functorch_pipeline as fp
from functorch_pipeline.serialization import CheckpointError
from functorch_pipeline.serialization import _format
from functorch_pipeline.serialization import _lazy
from functorch_pipeline.serialization import verify_lazy


def tmp_path_() -> str:
    return os.path.join(tempfile.mkdtemp(), "ckpt.safetensors")


def saved(tree) -> str:
    p = tmp_path_()
    fp.save(p, tree)
    return p


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def assert_same_tree(a, b) -> None:
    pa, la, ta = fp.tree.flatten_with_path(a)
    pb, lb, tb = fp.tree.flatten_with_path(b)
    assert pa == pb and ta == tb
    for x, y in zip(la, lb, strict=True):
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and same_bits(x, y)
        else:
            assert type(x) is type(y) and x == y


def rchar() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


needs_proc_io = pytest.mark.skipif(
    not os.path.exists("/proc/self/io"), reason="needs Linux /proc/self/io to count bytes read"
)

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int16,
          torch.uint8, torch.bool, torch.complex64]


@st.composite
def trees(draw):
    n = draw(st.integers(1, 6))
    out = {}
    for i in range(n):
        dtype = draw(st.sampled_from(DTYPES))
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
        raw = torch.randint(0, 256, (int(torch.tensor(shape).prod()) * dtype.itemsize,),
                            dtype=torch.uint8, generator=g)
        if dtype == torch.bool:
            raw = raw % 2
        out[f"t{i}"] = raw.view(dtype).reshape(shape)
    out["step"] = draw(st.integers(0, 1000))
    out["nested"] = (draw(st.floats(allow_nan=False)), None)
    return out


# ------------------------------------------------------------------ values


@settings(max_examples=25, deadline=None)
@given(trees())
def test_lazy_equals_full_load_bit_for_bit(tree):
    p = saved(tree)
    lazy = fp.load(p, mmap=True)
    assert_same_tree(lazy, fp.load(p))
    assert_same_tree(lazy, tree)
    # every tensor leaf is checked (empty ones too: their CRC is 0)
    assert verify_lazy(lazy) == sum(isinstance(x, torch.Tensor) for x in fp.tree.leaves(tree))


def test_lazy_with_like_matches_and_mismatches():
    tree = {"w": torch.randn(3, 4, dtype=torch.float64), "b": torch.randn(4), "step": 2}
    p = saved(tree)
    like = {"w": torch.empty(3, 4, dtype=torch.float64, device="meta"),
            "b": torch.empty(4), "step": 0}
    got = fp.load(p, like, mmap=True)
    assert_same_tree(got, tree)
    assert got["w"].device.type == "cpu"
    bad = {"w": torch.empty(4, 3, dtype=torch.float64), "b": torch.empty(4), "step": 0}
    with pytest.raises(CheckpointError, match=r"(?s)load\(path, like\).*`w` has shape \(4, 3\)"):
        fp.load(p, bad, mmap=True)


def test_tensors_outlive_the_rest_of_the_tree():
    tree = {"a": torch.randn(1000), "b": torch.randn(7, 3)}
    p = saved(tree)
    b = fp.load(p, mmap=True)["b"]
    gc.collect()
    assert same_bits(b, tree["b"])


def test_misaligned_file_from_another_writer():
    """A safetensors file whose data section is not aligned (unpadded header): such
    tensors are read eagerly; values equal safetensors' own loader."""
    a = torch.randn(3, dtype=torch.float32)
    c = torch.arange(5, dtype=torch.int64)
    header = {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]},
              "c": {"dtype": "I64", "shape": [5], "data_offsets": [12, 52]}}
    raw = json.dumps(header, separators=(",", ":")).encode() + b" "  # odd length
    assert (8 + len(raw)) % 4
    p = tmp_path_()
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + a.numpy().tobytes() + c.numpy().tobytes())
    ref = safetensors.torch.load_file(p)
    got = fp.load(p, mmap=True)
    assert list(got) == ["a", "c"]
    assert same_bits(got["a"], ref["a"]) and same_bits(got["c"], ref["c"])


# ------------------------------------------------------------------ reads only the header


@needs_proc_io
def test_lazy_load_reads_only_the_header(monkeypatch):
    """A 32 MB checkpoint: the full load reads at least its data, the lazy load reads
    less than 64 KiB (counted by the kernel), and never calls the tensor reader."""
    tree = {"big": torch.randn(8 << 20), "small": torch.randn(3), "step": 1}
    p = saved(tree)
    size = os.path.getsize(p)
    before = rchar()
    full = fp.load(p)
    full_read = rchar() - before

    def no_reads(*args, **kwargs):
        raise AssertionError("the lazy load read tensor data")

    monkeypatch.setattr(_lazy, "read_tensor", no_reads)
    before = rchar()
    lazy = fp.load(p, mmap=True)
    lazy_read = rchar() - before
    assert full_read >= size - 4096
    assert lazy_read < 64 << 10, (lazy_read, size)
    assert_same_tree(lazy, full)
    assert verify_lazy(lazy) == 2


@needs_proc_io
def test_lazy_load_of_a_400mb_sparse_file():
    """A 400 MB file (sparse: no disk space, all zeros): opening it reads the header
    only; touching one element pages in only that page."""
    n = 100 << 20
    raw, _ = _format.build_header([("w", torch.float32, (n,)), ("b", torch.int64, (2,))], {})
    p = tmp_path_()
    with open(p, "wb") as f:
        f.write(raw)
        f.truncate(len(raw) + 4 * n + 16)
    before = rchar()
    got = fp.load(p, mmap=True)
    read = rchar() - before
    assert read < 64 << 10
    assert got["w"].shape == (n,) and got["w"].dtype == torch.float32
    assert got["w"][n - 1].item() == 0.0 and got["b"].tolist() == [0, 0]


# ------------------------------------------------------------------ strictness still applies


def corrupt(blob: bytes, kind: str) -> bytes:
    start = 8 + int.from_bytes(blob[:8], "little")
    if kind == "header byte":
        i = blob.index(b'"shape"', 8)
        return blob[:i + 1] + b"S" + blob[i + 2:]
    if kind == "padded":
        return blob + b"\0" * 8
    if kind == "truncated":
        return blob[:-4]
    if kind == "huge header":
        return struct.pack("<Q", 2**40) + blob[8:]
    if kind == "over the cap":
        return struct.pack("<Q", 100_000_008) + blob[8:]  # then extended (sparse) below
    if kind == "parse budget":
        text = json.dumps({"__metadata__": {"x": "," * 1_100_000}}).encode()
        return struct.pack("<Q", len(text)) + text
    if kind == "tree":
        i = blob.index(b"step", 8)
        return blob[:i] + b"stap" + blob[i + 4:start]  + blob[start:]
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "msg"),
    [
        ("header byte", r"header entry `w` must be an object with exactly"),
        ("padded", r"not fully covered by its tensors: 8 bytes after the last tensor"),
        ("truncated", r"tensor `w` claims bytes \[0, 256\) but the data section has 252"),
        ("huge header", r"the header claims 1099511627776 bytes but only"),
        ("over the cap", r"the header claims 100000008 bytes, more than the 100000000-byte"),
        ("parse budget", r"JSON separators and brackets, more than the \d+ allowed"),
        ("tree", r"header's checksum does not match"),
    ],
)
def test_corrupt_headers_raise_at_open_time(kind, msg):
    tree = {"w": torch.randn(64), "step": 3}
    p = saved(tree)
    with open(p, "rb") as f:
        blob = f.read()
    with open(p, "wb") as f:
        f.write(corrupt(blob, kind))
        if kind == "over the cap":
            f.truncate(100_000_008 + len(blob))
    with pytest.raises(CheckpointError, match=msg) as full:
        fp.load(p)
    with pytest.raises(CheckpointError, match=msg) as lazy:
        fp.load(p, mmap=True)
    assert str(lazy.value) == str(full.value)


@settings(max_examples=10, deadline=None)
@given(st.data())
def test_flipped_data_bit_caught_by_verify_lazy(data):
    tree = {"a": torch.randn(40, dtype=torch.float64), "b": torch.randn(5), "step": 1}
    p = saved(tree)
    with open(p, "rb") as f:
        blob = bytearray(f.read())
    start = 8 + int.from_bytes(blob[:8], "little")
    bit = data.draw(st.integers(0, 8 * (len(blob) - start) - 1))
    blob[start + bit // 8] ^= 1 << (bit % 8)
    with open(p, "wb") as f:
        f.write(blob)
    name = "a" if bit // 8 < 320 else "b"
    with pytest.raises(CheckpointError, match=rf"tensor `{name}` .* does not match its checksum"):
        fp.load(p)  # the reference: a full load refuses the file
    lazy = fp.load(p, mmap=True)  # the header is intact: opens
    other = "b" if name == "a" else "a"
    assert verify_lazy({other: lazy[other]}) == 1
    with pytest.raises(
        CheckpointError,
        match=rf"verify_lazy\(tree\): leaf at path `{name}`, load\(path\): .*tensor `{name}` .*"
        r"does not match its checksum",
    ):
        verify_lazy(lazy)
    # a device other than the CPU means reading, so the check happens at load time
    with pytest.raises(CheckpointError, match=rf"tensor `{name}` .* does not match"):
        fp.load(p, mmap=True, device="meta")
    # verify=False: nothing recorded, nothing checked
    assert verify_lazy(fp.load(p, mmap=True, verify=False)) == 0


def test_verify_lazy_skips_other_tensors_and_copies():
    p = saved({"w": torch.randn(4)})
    w = fp.load(p, mmap=True)["w"]
    assert verify_lazy({"x": w.clone(), "y": torch.ones(2), "z": 3, "w": w}) == 1


# ------------------------------------------------------------------ mapping semantics


def test_mutation_does_not_modify_the_file():
    tree = {"w": torch.randn(5000), "step": 0}
    p = saved(tree)
    with open(p, "rb") as f:
        before = f.read()
    lazy = fp.load(p, mmap=True)
    other = fp.load(p, mmap=True)
    lazy["w"].add_(1.0)
    lazy["w"][0] = 123.0
    assert lazy["w"][0].item() == 123.0
    with open(p, "rb") as f:
        assert f.read() == before
    assert same_bits(other["w"], tree["w"])  # a second mapping is unaffected
    assert_same_tree(fp.load(p), tree)
    with pytest.raises(CheckpointError, match="modified after the lazy load"):
        verify_lazy(lazy)


@pytest.mark.skipif(os.name != "posix", reason="POSIX unlink/rename semantics")
def test_file_deleted_or_replaced_while_mapped():
    old = {"w": torch.randn(20000), "step": 0}
    p = saved(old)
    lazy = fp.load(p, mmap=True)
    fp.save(p, {"w": torch.zeros(20000), "step": 1})  # atomic replace (rename)
    assert same_bits(lazy["w"], old["w"])
    assert fp.load(p)["step"] == 1
    lazy2 = fp.load(p, mmap=True)
    os.remove(p)
    assert torch.count_nonzero(lazy2["w"]).item() == 0 and lazy2["step"] == 1
    assert verify_lazy(lazy) == 1 and verify_lazy(lazy2) == 1


def test_lazy_tree_saved_back_to_its_own_path():
    """fp.save replaces the file by rename, so saving a tree that is still mapped from
    that very file writes the mapped (old) bytes correctly."""
    tree = {"w": torch.randn(3000), "b": torch.arange(4), "step": 5}
    p = saved(tree)
    lazy = fp.load(p, mmap=True)
    lazy["b"].add_(1)
    fp.save(p, lazy)
    want = {"w": tree["w"], "b": tree["b"] + 1, "step": 5}
    assert_same_tree(fp.load(p), want)
    assert_same_tree(lazy, want)


def test_non_cpu_device_reads_and_verifies():
    tree = {"w": torch.randn(6, dtype=torch.float64), "step": 0}
    p = saved(tree)
    got = fp.load(p, mmap=True, device="meta")
    assert got["w"].device.type == "meta" and got["w"].shape == (6,)
    assert verify_lazy(got) == 0  # copies on another device are not mapped, not recorded
