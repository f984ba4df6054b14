"""The benchmarks' networks in JAX, with weights copied from the torch models: the peer rows.

Every function imports JAX lazily, so the benchmark scripts import this module whether or not
the ``bench`` extra is installed; :func:`modules` returns None without jax/optax and the
scripts print a skip line instead of the JAX rows.

- :func:`cnn`: the classic MNIST CNN (``per_sample_cnn.Net`` and, with a dropout key,
  ``examples/models.py``'s ``Net``): conv 1->10 k5, max pool 2, relu, conv 10->20 k5,
  [Dropout2d], max pool 2, relu, fc 320->50, relu, [dropout], fc 50->10, log_softmax.
- :func:`text_classifier`: ``examples/models.py``'s ``TextClassifier`` (Embedding ->
  2-layer bidirectional LSTM -> dropout -> fc -> relu -> mean over time -> fc), its LSTM a
  ``jax.lax.scan`` over torch's ``nn.LSTM`` cell equations.

Parameters are dicts keyed by the torch ``named_parameters()`` names, with torch's layouts
(conv OIHW, linear ``(out, in)``), so gradients compare leaf by leaf with torch's.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch


def modules() -> tuple[Any, Any, Any] | None:
    """``(jax, jax.numpy, optax)``, or None when jax or optax is not importable."""
    try:
        import jax
        import jax.numpy as jnp
        import optax
    except ImportError:
        return None
    return jax, jnp, optax


def skip_line(what: str) -> str:
    """The line a script prints instead of its JAX rows when :func:`modules` is None."""
    return (f"  skipped {what}: `jax` and `optax` are not both installed "
            '(pip install "functorch-pipeline[bench]")')


def threads_line() -> str:
    """NOTE [JAX threads]: XLA sizes its own CPU thread pool; we do not set XLA_FLAGS (a
    user would not), so ``--threads`` applies to torch only."""
    return (f"  JAX rows: XLA picks its own CPU threads, so they are not thread-matched to "
            f"torch's {torch.get_num_threads()} (--threads sets torch's only); they are timed "
            "after the torch rows, not interleaved with them (NOTE [peers timed apart])")


def rows(names: Iterable[str]) -> list[str]:
    """The JAX rows among a benchmark's candidate names (timed apart, see ``_common``)."""
    return [n for n in names if n.lower().startswith("jax")]


def to_jax(t: torch.Tensor) -> Any:
    """A torch tensor as a JAX array (integers as int32, JAX's default without x64)."""
    import jax.numpy as jnp

    a = t.detach().cpu().numpy()
    return jnp.asarray(a.astype(np.int32) if np.issubdtype(a.dtype, np.integer) else a)


def params_from_torch(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, Any]:
    """Copies of ``module.named_parameters()`` (or any name -> tensor pairs) as JAX arrays."""
    return {name: to_jax(p) for name, p in named}


def max_relative_difference(got: dict[str, Any], want: dict[str, torch.Tensor]) -> float:
    """max over leaves of ``max|got - want| / max|want|`` (the benchmarks' checks)."""
    worst = 0.0
    for name, w in want.items():
        g = torch.from_numpy(np.array(got[name])).to(w.dtype)  # np.array: a writable copy
        worst = max(worst, float((g - w).abs().max() / w.abs().max()))
    return worst


def checked_row(name: str, fn: Any, args: tuple[Any, ...], want: dict[str, torch.Tensor],
                against: str, tol: float | None = None) -> Any:
    """A timed row for the jitted ``fn(*args)``: its first (compiling) call checks the result
    against torch's ``want`` and prints the worst relative difference (asserting it is
    below ``tol`` when given); the returned callable blocks until JAX is done, and its
    ``note`` gives the compile + first call time."""
    import time

    import jax

    start = time.perf_counter()
    got = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    worst = max_relative_difference(got, want)
    print(f"  check: {name} vs {against}, max relative difference {worst:.1e}")
    assert tol is None or worst < tol, worst

    def run() -> Any:
        return jax.block_until_ready(fn(*args))

    run.note = f"compile + first call {first:.2f} s (in the check, before timing)"
    return run


def conv2d(x: Any, w: Any, b: Any) -> Any:
    """``F.conv2d(x, w, b)``: stride 1, no padding, NCHW input, OIHW weight."""
    import jax

    out = jax.lax.conv_general_dilated(x, w, (1, 1), "VALID",
                                       dimension_numbers=("NCHW", "OIHW", "NCHW"))
    return out + b[None, :, None, None]


def max_pool2d(x: Any, k: int = 2) -> Any:
    """``F.max_pool2d(x, k)`` on NCHW."""
    import jax
    import jax.numpy as jnp

    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, k, k), (1, 1, k, k), "VALID")


def linear(x: Any, params: dict[str, Any], name: str) -> Any:
    """``F.linear`` with torch's ``(out, in)`` weight ``params[name + ".weight"]``."""
    return x @ params[f"{name}.weight"].T + params[f"{name}.bias"]


def dropout(key: Any, x: Any, rate: float, shape: tuple[int, ...] | None = None) -> Any:
    """Inverted dropout (``F.dropout`` in train mode); ``shape`` broadcasts one draw per
    channel (``Dropout2d``: ``x.shape[:2] + (1, 1)``)."""
    import jax
    import jax.numpy as jnp

    keep = jax.random.bernoulli(key, 1 - rate, x.shape if shape is None else shape)
    return jnp.where(keep, x / (1 - rate), 0)


def nll(logp: Any, y: Any) -> Any:
    """Per-example ``F.nll_loss(logp, y, reduction="none")``."""
    import jax.numpy as jnp

    return -jnp.take_along_axis(logp, y[:, None], axis=1)[:, 0]


def cnn(params: dict[str, Any], x: Any, key: Any = None) -> Any:
    """The MNIST CNN's log-probabilities for ``x`` (N, 1, 28, 28); with a ``key``, the
    example's Dropout2d(0.5) after conv2 and dropout(0.5) after fc1 (train mode)."""
    import jax

    h = jax.nn.relu(max_pool2d(conv2d(x, params["conv1.weight"], params["conv1.bias"])))
    h = conv2d(h, params["conv2.weight"], params["conv2.bias"])
    if key is not None:
        key, k = jax.random.split(key)
        h = dropout(k, h, 0.5, h.shape[:2] + (1, 1))
    h = jax.nn.relu(max_pool2d(h))
    h = jax.nn.relu(linear(h.reshape(h.shape[0], -1), params, "fc1"))
    if key is not None:
        h = dropout(key, h, 0.5)
    return jax.nn.log_softmax(linear(h, params, "fc2"), axis=-1)


def cnn_mean_loss(params: dict[str, Any], x: Any, y: Any, key: Any = None) -> Any:
    """``F.nll_loss(cnn(params, x), y)`` (mean over the batch)."""
    return nll(cnn(params, x, key), y).mean()


def cnn_example_loss(params: dict[str, Any], xi: Any, yi: Any) -> Any:
    """One example's loss (``xi`` (1, 28, 28), ``yi`` a scalar): what ``vmap(grad)`` maps."""
    return cnn_mean_loss(params, xi[None], yi[None])


def lstm_direction(xs: Any, params: dict[str, Any], suffix: str, reverse: bool) -> Any:
    """One direction of one ``nn.LSTM`` layer over time-major ``xs`` (T, N, I), zero initial
    state; returns every step's hidden state (T, N, H), aligned with ``xs`` also when
    ``reverse`` (``lax.scan(reverse=True)``, as torch's bidirectional output is).

    Gates in torch's order (input, forget, cell, output):
    ``g = x W_ih^T + b_ih + h W_hh^T + b_hh``, ``c' = s(f) c + s(i) tanh(g_c)``,
    ``h' = s(o) tanh(c')``.
    """
    import jax
    import jax.numpy as jnp

    w_hh = params[f"weight_hh_{suffix}"]
    # NOTE [input projection]: x W_ih^T for all steps in one matmul, outside the scan.
    projected = xs @ params[f"weight_ih_{suffix}"].T + params[f"bias_ih_{suffix}"] \
        + params[f"bias_hh_{suffix}"]

    def step(carry: tuple[Any, Any], gx: Any) -> tuple[tuple[Any, Any], Any]:
        h, c = carry
        i, f, g, o = jnp.split(gx + h @ w_hh.T, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h

    zeros = jnp.zeros(xs.shape[1:-1] + (w_hh.shape[1],), xs.dtype)
    _, hs = jax.lax.scan(step, (zeros, zeros), projected, reverse=reverse)
    return hs


def text_classifier(params: dict[str, Any], tokens: Any, key: Any = None,
                    num_layers: int = 2) -> Any:
    """``TextClassifier`` logits for ``tokens`` (N, T); with a ``key``, dropout(0.5) on the
    LSTM output (train mode)."""
    import jax
    import jax.numpy as jnp

    sub = {k.removeprefix("lstm."): v for k, v in params.items() if k.startswith("lstm.")}
    h = params["embedding.weight"][tokens].swapaxes(0, 1)  # time-major (T, N, E)
    for layer in range(num_layers):
        h = jnp.concatenate([lstm_direction(h, sub, f"l{layer}", False),
                             lstm_direction(h, sub, f"l{layer}_reverse", True)], axis=-1)
    h = h.swapaxes(0, 1)
    if key is not None:
        h = dropout(key, h, 0.5)
    h = jax.nn.relu(linear(h, params, "fc1"))
    return linear(h.mean(axis=1), params, "fc2")


def text_mean_loss(params: dict[str, Any], tokens: Any, y: Any, key: Any = None) -> Any:
    """``F.cross_entropy(text_classifier(params, tokens), y)`` (mean over the batch)."""
    import jax

    return nll(jax.nn.log_softmax(text_classifier(params, tokens, key), axis=-1), y).mean()


def text_example_loss(params: dict[str, Any], ti: Any, yi: Any, key: Any = None) -> Any:
    """One sequence's loss (``ti`` (T,), ``yi`` a scalar, its own dropout ``key``)."""
    return text_mean_loss(params, ti[None], yi[None], key)
