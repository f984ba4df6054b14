"""fp.save / fp.load: exact round trips, structure, `like=` checks, devices and interop.

Independent references: the raw bytes of each tensor, and the `safetensors` package's own
reader/writer (a second implementation of the same file format).
"""

import collections
import dataclasses
import math
import os
from typing import NamedTuple

import pytest
import safetensors.torch
import torch
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import functorch_pipeline as fp
from functorch_pipeline import serialization

ALL_DTYPES = [
    torch.bfloat16,
    torch.float16,
    torch.float32,
    torch.float64,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.bool,
    torch.complex64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.detach().resolve_conj().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and raw_bytes(a) == raw_bytes(b)


def random_bits(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Every bit pattern possible, incl. NaNs with payloads, infs and subnormals."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape) * dtype.itemsize
    b = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        b = b % 2
    return b.view(dtype).reshape(shape)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (5,), (4, 7)], ids=str)
def test_round_trip_is_bit_exact(tmp_path, dtype, shape):
    x = random_bits(dtype, shape)
    p = tmp_path / "x.safetensors"
    fp.save(p, {"x": x})
    y = fp.load(p)["x"]
    assert same_bits(x, y)
    # The safetensors package (an independent reader) sees the same tensor.
    assert same_bits(safetensors.torch.load_file(p)["x"], x)


def test_non_contiguous_and_shared_storage(tmp_path):
    base = torch.arange(24.0).reshape(4, 6)
    tree = {
        "t": base.t(),  # transposed
        "s": base[:, ::2],  # strided slice
        "e": torch.tensor([1.0, 2.0]).expand(3, 2),  # stride 0
        "a": base[1],  # views sharing base's storage
        "b": base[1:3],
        "base": base,
        "c": torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64).conj(),  # conj view
        "n": torch.tensor([1 + 2j], dtype=torch.complex64).conj().imag,  # neg view
    }
    p = tmp_path / "v.safetensors"
    fp.save(p, tree)
    out = fp.load(p)
    for k, v in tree.items():
        assert torch.equal(out[k], v), k
        assert out[k].is_contiguous()
    # NOTE [shared storage]: after loading, former views are independent tensors.
    out["a"].zero_()
    assert torch.equal(out["base"], base)
    # Stored once per leaf: the file holds exactly the bytes each leaf shows.
    assert os.path.getsize(p) - 8 - int.from_bytes(p.read_bytes()[:8], "little") == sum(
        v.numel() * v.element_size() for v in tree.values()
    )


def test_inputs_not_modified_and_grad_tensors(tmp_path):
    w = torch.randn(3, requires_grad=True)
    tree = {"w": w, "p": torch.nn.Parameter(torch.ones(2))}
    before = w.detach().clone()
    fp.save(tmp_path / "g.safetensors", tree)
    out = fp.load(tmp_path / "g.safetensors")
    assert torch.equal(w.detach(), before) and w.requires_grad
    assert type(out["p"]) is torch.Tensor and not out["w"].requires_grad
    assert torch.equal(out["w"], before)


def test_python_scalars_exact(tmp_path):
    tree = {
        "ints": [0, -1, 2**100, -(2**70)],
        "floats": [0.1, -0.0, math.inf, -math.inf, 5e-324, 1.7976931348623157e308],
        "nan": math.nan,
        "bools": (True, False),
        "s": ["", "naïve ✓", "a\"b\\c\n"],
        "none": None,
        "nested_none": [None, (None,)],
    }
    fp.save(tmp_path / "s.safetensors", tree)
    out = fp.load(tmp_path / "s.safetensors")
    assert math.isnan(out.pop("nan"))
    expected = dict(tree)
    expected.pop("nan")
    assert out == expected
    assert math.copysign(1.0, out["floats"][1]) == -1.0
    # Non-ASCII text in the header stays valid for the safetensors package's own parser.
    assert "functorch_pipeline.tree" in safetensors.safe_open(tmp_path / "s.safetensors", "pt").metadata()
    assert [type(b) for b in out["bools"]] == [bool, bool]


def test_containers_rebuilt_without_like(tmp_path):
    od = collections.OrderedDict([("z", torch.ones(1)), ("a", 2)])
    tree = {"b": 1, "a": [torch.zeros(2), (3, {"k": od})], 7: "int key", "empty": {}, "el": [], "et": ()}
    fp.save(tmp_path / "c.safetensors", tree)
    out = fp.load(tmp_path / "c.safetensors")
    assert list(out) == ["b", "a", 7, "empty", "el", "et"]  # insertion order kept
    assert type(out["a"]) is list and type(out["a"][1]) is tuple
    assert type(out["a"][1][1]["k"]) is collections.OrderedDict
    assert list(out["a"][1][1]["k"]) == ["z", "a"]
    assert out["empty"] == {} and out["el"] == [] and out["et"] == ()


class UserState(NamedTuple):
    count: torch.Tensor
    mu: dict


@fp.tree.register_dataclass(meta_fields=("name",))
@dataclasses.dataclass
class UserBox:
    value: torch.Tensor
    extra: object
    name: str


def test_unknown_types_refused_then_registered(tmp_path):
    tree = {"s": UserState(torch.tensor(3), {"w": torch.ones(2)})}
    p = tmp_path / "u.safetensors"
    fp.save(p, tree)
    with pytest.raises(fp.CheckpointError, match=r"needs type `test_serialization:UserState` at path `s`.*register_type.*like="):
        fp.load(p)
    # With like= no registration is needed: containers come from the template.
    out = fp.load(p, like={"s": UserState(torch.tensor(0), {"w": torch.zeros(2)})})
    assert isinstance(out["s"], UserState) and torch.equal(out["s"].mu["w"], torch.ones(2))
    serialization.register_type(UserState)
    out = fp.load(p)
    assert isinstance(out["s"], UserState) and int(out["s"].count) == 3


def test_registered_dataclass_with_meta_fields(tmp_path):
    serialization.register_type(UserBox)
    box = UserBox(torch.arange(3), [1, None, torch.ones(1)], name="cfg")
    fp.save(tmp_path / "d.safetensors", {"box": box})
    out = fp.load(tmp_path / "d.safetensors")["box"]
    assert isinstance(out, UserBox) and out.name == "cfg"
    assert torch.equal(out.value, box.value) and out.extra[1] is None
    assert [x for x in fp.tree.leaves(out)] == [out.value, out.extra[0], out.extra[2]]


def test_register_type_rejects_plain_classes():
    with pytest.raises(TypeError, match=r"register_type\(cls\): `cls` must be a NamedTuple"):
        serialization.register_type(dict)


def test_library_types_need_no_registration(tmp_path):
    from functorch_pipeline import optim
    params = {"w": torch.randn(3, 2), "b": torch.zeros(2)}
    opt = optim.adam(1e-3)
    state = opt.init(params)
    grads = fp.tree.map(torch.ones_like, params)
    _, state = opt.update(grads, state, params)
    fp.save(tmp_path / "o.safetensors", state)
    out = fp.load(tmp_path / "o.safetensors")
    assert fp.tree.structure(out) == fp.tree.structure(state)
    assert all(same_bits(a, b) for a, b in zip(fp.tree.leaves(out), fp.tree.leaves(state), strict=True))


def test_unsupported_values_name_their_path(tmp_path):
    import numpy as np

    p = tmp_path / "bad.safetensors"
    cases = [
        ({"a": {"b": np.zeros(2)}}, r"path `a.b` is a numpy.ndarray"),
        ({"s": {1, 2}}, r"path `s` is a builtins.set"),
        ({"c": torch.zeros(2, dtype=torch.complex128)}, r"path `c` has dtype torch.complex128"),
        ({"m": torch.empty(2, device="meta")}, r"path `m` is a meta tensor"),
        ({"sp": torch.eye(2).to_sparse()}, r"path `sp` is a torch.sparse_coo tensor"),
        ({(1, 2): 3}, r"path `<root>` is a dict with key \(1, 2\) of type tuple"),
        ({"d": collections.defaultdict(int)}, r"path `d` is a collections.defaultdict"),
    ]
    for tree, msg in cases:
        with pytest.raises(TypeError, match=r"save\(path, tree\): value at " + msg):
            fp.save(p, tree)
        assert not p.exists()  # nothing written, no temp file left behind
    assert os.listdir(tmp_path) == []


def test_metadata(tmp_path):
    p = tmp_path / "m.safetensors"
    fp.save(p, {"w": torch.ones(1)}, metadata={"epoch": "3", "note": "ok"})
    assert serialization.read_metadata(p) == {"epoch": "3", "note": "ok"}
    assert safetensors.safe_open(p, "pt").metadata()["epoch"] == "3"
    with pytest.raises(TypeError, match=r"`metadata` must map str to str"):
        fp.save(p, {}, metadata={"epoch": 3})
    with pytest.raises(ValueError, match=r"`metadata` key 'functorch_pipeline.tree' is reserved"):
        fp.save(p, {}, metadata={"functorch_pipeline.tree": "x"})


def test_like_checks_and_names_every_path(tmp_path):
    p = tmp_path / "l.safetensors"
    fp.save(p, {"params": {"fc1": {"weight": torch.zeros(10, 320), "bias": torch.zeros(10)}}, "step": 3, "extra": 1.5})
    like = {
        "params": {"fc1": {"weight": torch.empty(50, 320), "bias": torch.empty(10, dtype=torch.float16)}},
        "step": 0.0,
        "missing": torch.zeros(1),
    }
    with pytest.raises(fp.CheckpointError) as e:
        fp.load(p, like=like)
    msg = str(e.value)
    assert "leaf at path `params.fc1.weight` has shape (50, 320) in `like` but (10, 320) on disk" in msg
    assert "leaf at path `params.fc1.bias` has dtype torch.float16 in `like` but torch.float32 on disk" in msg
    assert "leaf at path `step` is a float in `like` but an int (3) on disk" in msg
    assert "leaf at path `missing` is in `like` but not on disk" in msg
    assert "leaf at path `extra` is on disk but not in `like`" in msg
    assert "(5 problems)" in msg


def test_like_rebuilds_template_containers_and_accepts_meta(tmp_path):
    p = tmp_path / "l.safetensors"
    fp.save(p, {"a": [torch.ones(2), 4], "b": torch.arange(3)})
    like = {"a": (torch.empty(2, device="meta"), 0), "b": torch.empty(3, dtype=torch.int64, device="meta")}
    out = fp.load(p, like=like)
    assert type(out["a"]) is tuple and out["a"][1] == 4
    assert out["b"].device.type == "cpu" and torch.equal(out["b"], torch.arange(3))
    with pytest.raises(fp.CheckpointError, match=r"leaf at path `a\[1\]` is a tensor in `like` but an int \(4\) on disk"):
        fp.load(p, like={"a": [4, torch.ones(2)], "b": torch.arange(3)})


def test_device_argument_maps_tensors(tmp_path):
    p = tmp_path / "dev.safetensors"
    fp.save(p, {"w": torch.ones(2), "n": 1})
    out = fp.load(p, device="meta")  # map_location onto another device
    assert out["w"].device.type == "meta" and out["w"].shape == (2,) and out["n"] == 1
    assert fp.load(p, device=torch.device("cpu"))["w"].device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_checkpoint_loads_on_cpu_and_back(tmp_path):
    p = tmp_path / "cuda.safetensors"
    tree = {"w": torch.randn(4, 3, device="cuda").t(), "h": torch.randn(5, device="cuda", dtype=torch.bfloat16)}
    fp.save(p, tree)
    cpu = fp.load(p)
    assert cpu["w"].device.type == "cpu" and same_bits(cpu["w"], tree["w"].cpu())
    gpu = fp.load(p, device="cuda")
    assert gpu["h"].device.type == "cuda" and same_bits(gpu["h"].cpu(), tree["h"].cpu())
    follow = fp.load(p, like=tree)  # no device=: follows the template's devices
    assert follow["w"].device.type == "cuda"


def test_plain_safetensors_interop_both_ways(tmp_path):
    p = tmp_path / "plain.safetensors"
    tensors = {"model.embed.weight": torch.randn(5, 3), "model.norm.scale": torch.ones(3, dtype=torch.bfloat16)}
    safetensors.torch.save_file(tensors, p, metadata={"source": "elsewhere"})
    out = fp.load(p)
    assert list(out) == list(safetensors.torch.load_file(p))  # flat dict in file order
    assert all(same_bits(out[k], v) for k, v in tensors.items())
    assert serialization.read_metadata(p) == {"source": "elsewhere"}
    # And our own files are valid safetensors, named by key path.
    q = tmp_path / "ours.safetensors"
    fp.save(q, {"params": {"fc1": {"weight": tensors["model.embed.weight"]}}, "layers": [torch.zeros(1)]})
    assert sorted(safetensors.torch.load_file(q)) == ["layers[0]", "params.fc1.weight"]


def test_load_torch_state_dict(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    p = tmp_path / "model.pt"
    torch.save(net.state_dict(), p)
    flat = serialization.load_torch(p)
    assert type(flat) is dict and list(flat) == list(net.state_dict())
    assert all(torch.equal(flat[k], v) for k, v in net.state_dict().items())
    nested = serialization.load_torch(p, nested=True)
    assert torch.equal(nested["1"]["running_var"], net[1].running_var)
    torch.save([1, 2], p)
    with pytest.raises(fp.CheckpointError, match=r"expected a state_dict \(a dict of tensors\), got a list"):
        serialization.load_torch(p)


def test_missing_file_is_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        fp.load(tmp_path / "nope.safetensors")


leaf = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.booleans(),
    st.text(max_size=5),
    st.none(),
    st.builds(
        lambda d, s, seed: random_bits(d, tuple(s), seed),
        st.sampled_from(ALL_DTYPES),
        st.lists(st.integers(0, 3), max_size=3),
        st.integers(0, 1000),
    ),
)
trees = st.recursive(
    leaf,
    lambda kids: st.one_of(
        st.lists(kids, max_size=3),
        st.lists(kids, max_size=3).map(tuple),
        st.dictionaries(st.text(max_size=4), kids, max_size=3),
    ),
    max_leaves=12,
)


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and same_bits(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return type(b) is dict and list(a) == list(b) and all(_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and (a == b or (a != a and b != b))


@settings(max_examples=40, deadline=None)
@given(trees)
def test_random_trees_round_trip(tree):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "h.safetensors")
        fp.save(p, tree)
        assert _equal(tree, fp.load(p))


def test_large_tensors_with_and_without_prefault(tmp_path, monkeypatch):
    from functorch_pipeline.serialization import _prefault

    big = {"a": random_bits(torch.float32, (3, 1 << 20)), "b": random_bits(torch.uint8, (5 << 20,), seed=1)}
    p = tmp_path / "big.safetensors"
    fp.save(p, big)
    assert all(same_bits(fp.load(p)[k], v) for k, v in big.items())  # NOTE [prefault] active (Linux)
    calls = []

    def failing_madvise(addr, length, advice):
        calls.append((addr % _prefault._PAGE, advice))
        return -1

    monkeypatch.setattr(_prefault, "_madvise", failing_madvise)
    monkeypatch.setattr(_prefault, "_enabled", [True])
    # memory freed by the load above may come back resident, and resident ranges are
    # skipped (NOTE [prefault only fresh memory]): make every range look fresh here
    monkeypatch.setattr(_prefault, "_resident", lambda lo, hi: False)
    assert all(same_bits(fp.load(p)[k], v) for k, v in big.items())
    assert calls == [(0, 23)]  # page-aligned, asked once, then never again after failing
    monkeypatch.setattr(_prefault, "_madvise", None)  # not Linux
    assert all(same_bits(fp.load(p)[k], v) for k, v in big.items())
