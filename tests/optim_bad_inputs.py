"""Property check: every registry optimizer, fed one corrupted leaf, raises a clear error.

Run as a script (``python tests/optim_bad_inputs.py [max_examples]``);
``test_optim_validation.py`` launches it in a subprocess, so that a heap corruption
(what ``torch._fused_adam_`` did with a wrong-shaped leaf) fails that test instead of
killing the test session. For each registry entry, hypothesis draws one leaf of the
gradients, the optimizer state (after one valid step, so counts and moments are real)
or the parameters, and gives it a wrong shape, dtype or device ("meta" stands in for a
second device on CPU-only machines). ``update`` followed by ``apply_updates`` must then
raise a ``ValueError``/``TypeError`` whose message starts with the API that failed
(``xxx.update:`` / ``apply_updates(...)``) and names the offending key path or state
field in backticks.

The accepted non-errors, all dtype changes (NOTE [leaf dtypes]): a gradient leaf of
another dtype for a transformation that never combines it with another tree (plain sgd
scales it, with torch's and optax's promotion), a parameter leaf of another *floating*
dtype (``apply_updates`` casts the sum back, as optax does), and an injected
hyperparameter of another dtype (cast, NOTE [injected values]). The check then asserts
that the new parameters have exactly the parameters' dtypes and are finite.
The script prints one ``FAIL`` line per violation and ``OK <n> cases`` at the end; it
exits 1 on any violation.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))

from optim_registry import REGISTRY  # noqa: E402
from optim_registry import _grads  # noqa: E402
from optim_registry import _params  # noqa: E402

import functorch_pipeline as fp  # noqa: E402
from functorch_pipeline import optim  # noqa: E402

API = re.compile(r"^[\w.]+(\([^)]*\))?(\.\w+)?: ")
DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.bool,
]


def _wrong_shape(x: torch.Tensor, how: int) -> torch.Tensor:
    s = list(x.shape)
    if how == 0 or not s:
        s = [*s, 2]  # one more axis
    elif how == 1:
        s = s[:-1]  # one axis less
    elif how == 2:
        s[-1] += 1  # a different size
    else:
        s = s[::-1] if len(s) == 2 and s[0] != s[1] else [*s[:-1], s[-1] + 2]  # transposed
    out = torch.zeros(s, dtype=x.dtype)
    assert out.shape != x.shape
    return out


def _corrupt(x: torch.Tensor, kind: str, data: st.DataObject) -> torch.Tensor:
    if kind == "shape":
        return _wrong_shape(x, data.draw(st.integers(0, 3), label="how"))
    if kind == "dtype":
        dt = data.draw(st.sampled_from([d for d in DTYPES if d != x.dtype]), label="dtype")
        return x.to(dt)
    return torch.empty_like(x, device="meta")


def _tensor_slots(tree):
    leaves, td = fp.tree.flatten(tree)
    return leaves, td, [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]


FAILURES: list[str] = []
CASES = [0]


def _check(name: str, data: st.DataObject) -> None:
    opt = REGISTRY[name]()
    params = _params()
    state = opt.init(params)
    u, state = opt.update(_grads(0), state, params)
    params = optim.apply_updates(params, u)
    grads = _grads(1)
    trees = {"grads": grads, "state": state, "params": params}
    choices = [k for k, t in trees.items() if _tensor_slots(t)[2]]
    target = data.draw(st.sampled_from(choices), label="target")
    leaves, td, slots = _tensor_slots(trees[target])
    i = data.draw(st.sampled_from(slots), label="leaf")
    kind = data.draw(st.sampled_from(["shape", "dtype", "device"]), label="kind")
    bad = _corrupt(leaves[i], kind, data)
    leaves = list(leaves)
    leaves[i] = bad
    trees[target] = fp.tree.unflatten(td, leaves)
    where = f"{name}: {kind} of {target} leaf {i} -> {tuple(bad.shape)} {bad.dtype} {bad.device}"
    CASES[0] += 1
    try:
        u, _ = opt.update(trees["grads"], trees["state"], trees["params"])
        new = optim.apply_updates(trees["params"], u)
    except (ValueError, TypeError) as e:
        msg = str(e)
        if not API.match(msg) or "`" not in msg:
            FAILURES.append(f"FAIL {where}: unclear message {msg!r}")
        return
    except Exception as e:  # noqa: BLE001 - any other exception is the failure we look for
        FAILURES.append(f"FAIL {where}: raised {type(e).__name__}: {e}")
        return
    path = fp.tree.keystr(fp.tree.flatten_with_path(trees[target])[0][i])
    cast_ok = kind == "dtype" and (
        target == "grads"  # promoted by a transformation that only scales them
        or (target == "params" and bad.is_floating_point())  # cast back by apply_updates
        or (target == "state" and "hyperparams" in path)  # NOTE [injected values]
    )
    if not cast_ok:
        FAILURES.append(f"FAIL {where}: no error")
        return
    want = [p.dtype for p in fp.tree.leaves(trees["params"])]
    got = [p.dtype for p in fp.tree.leaves(new)]
    if got != want or not all(torch.isfinite(p.double()).all() for p in fp.tree.leaves(new)):
        FAILURES.append(f"FAIL {where}: accepted a cast but returned dtypes {got} (want {want})")


def _property(name: str):
    def run(data: st.DataObject) -> None:
        _check(name, data)

    return given(data=st.data())(run)


def repro() -> None:
    """Issue 9's repro (a gradient one column too wide): adam and lamb corrupted the heap,
    adamw built its update from the first elements. One ``REPRO`` line each."""
    for name in ("adam", "lamb", "adamw"):
        p = {"w": torch.randn(8, 4)}
        opt = getattr(optim, name)(1e-3)
        s = opt.init(p)
        try:
            u, s = opt.update({"w": torch.randn(8, 5)}, s, p)
            print("REPRO", name, "returned", tuple(u["w"].shape), flush=True)
        except ValueError as e:
            print("REPRO", name, "ValueError", e, flush=True)


def main(max_examples: int) -> int:
    repro()
    for name in sorted(REGISTRY):
        run = _property(name)
        settings(
            max_examples=max_examples,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )(run)()
    for line in FAILURES:
        print(line)
    print(f"{'OK' if not FAILURES else 'FAILED'} {CASES[0]} cases over {len(REGISTRY)} optimizers")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 25))
