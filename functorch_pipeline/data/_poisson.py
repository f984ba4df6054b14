"""Poisson-sampled batches, the sampling that DP-SGD's privacy accounting assumes.

# NOTE [Poisson batches are a pure function of (key, i)]
Batch ``i`` takes each example independently with probability ``q``: its membership
mask is ``fp.random.bernoulli(fold_in(key, i), q, (n,))``. It depends on nothing but the
key and ``i`` (not on earlier batches, not on PyTorch's global RNG), so a run resumed at
batch ``i`` (``start=i``) draws exactly the batches an uninterrupted run draws, and the
accountant's assumption holds for every batch: sizes are Binomial(n, q), not fixed,
and an example may appear in no batch or in several. The Bernoulli draw compares a 32-bit
hash with ``round(q * 2**32)``: its probability is ``q`` to within ``2**-33``.

# NOTE [overflow of a padded batch]
With ``max_batch_size``, batches are padded to one shape. A batch that draws more than
``max_batch_size`` examples raises ``ValueError``: dropping examples would change the
mechanism (the accountant would then under-report epsilon) and silently growing the shape
would defeat the point of a fixed shape. Pick the cap with :func:`poisson_max_batch_size`,
which makes an overflow as unlikely as you ask (1e-9 per batch by default).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from functorch_pipeline import random as _random
from functorch_pipeline import tree as _tree
from functorch_pipeline.data._batches import _as_float
from functorch_pipeline.data._batches import _as_int
from functorch_pipeline.data._batches import _check_key
from functorch_pipeline.data._batches import _num_examples
from functorch_pipeline.random._core import _bernoulli_positions

__all__ = ["poisson_batches", "poisson_mask", "poisson_max_batch_size"]


def _check_rate(where: str, sample_rate: Any) -> float:
    q = _as_float(sample_rate)
    if q is None:
        got = type(sample_rate).__name__
        raise TypeError(f"{where}: `sample_rate` must be a number, got {got}")
    if not 0 < q <= 1:
        raise ValueError(f"{where}: `sample_rate` must be in (0, 1], got {sample_rate!r}")
    return q


def _check_count(where: str, name: str, value: Any, low: int) -> int:
    v = _as_int(value)
    if v is None or v < low:
        raise ValueError(f"{where}: `{name}` must be an int >= {low}, got {value!r}")
    return v


def poisson_mask(key: torch.Tensor, num_examples: int, sample_rate: float) -> torch.Tensor:
    """Which of ``num_examples`` examples join one Poisson-sampled batch.

    Each is ``True`` independently with probability ``sample_rate``. A pure function of
    the key, computed on the key's device with no host sync (works under ``vmap`` over a
    batch of keys and under ``torch.compile``).

    One key gives one batch. A batch of keys (shape ``(k, 2)``) is refused outside
    ``vmap``, as ``jax.random`` functions refuse a key array: map over it with
    ``fp.vmap(lambda k: poisson_mask(k, n, q))(keys)`` for a ``(k, n)`` stack of masks.

    Args:
      key: one ``fp.random`` key, shape ``(2,)`` (use ``fold_in(key, i)`` for batch ``i``).
      num_examples: the dataset size ``n``, an int >= 0.
      sample_rate: ``q`` in (0, 1] (a Python or numpy real number).

    Returns:
      A ``(num_examples,)`` bool tensor.

    Raises:
      TypeError: ``key`` is not one key, or ``sample_rate`` is not a number.
      ValueError: ``num_examples`` or ``sample_rate`` is out of range.

    Example:
      >>> m = poisson_mask(_random.key(0), 10000, 0.1)
      >>> m.dtype, m.shape, 900 < int(m.sum()) < 1100
      (torch.bool, torch.Size([10000]), True)
    """
    where = "poisson_mask(key, num_examples, sample_rate)"
    q = _check_rate(where, sample_rate)
    n = _check_count(where, "num_examples", num_examples, 0)
    _check_key(where, key)
    return _random.bernoulli(key, q, (n,))


def poisson_max_batch_size(
    num_examples: int, sample_rate: float, overflow_probability: float = 1e-9
) -> int:
    """The smallest cap whose chance of being exceeded by one batch is <= a bound.

    That is, the smallest ``m`` with ``P(Binomial(n, q) > m) <= overflow_probability``,
    computed exactly (in float64 log space). Over ``T`` batches the chance of any overflow
    is at most ``T * overflow_probability``.

    Args:
      num_examples: the dataset size ``n``.
      sample_rate: ``q`` in (0, 1].
      overflow_probability: the per-batch bound, in (0, 1).

    Returns:
      The cap, an int in ``[0, n]``.

    Example:
      MNIST with Opacus's expected batch of 240 (the mean plus ~6 standard deviations):

      >>> poisson_max_batch_size(60000, 0.004)
      338
    """
    where = "poisson_max_batch_size(num_examples, sample_rate)"
    n = _check_count(where, "num_examples", num_examples, 0)
    q = _check_rate(where, sample_rate)
    p = _as_float(overflow_probability)
    if p is None or not 0 < p < 1:
        raise ValueError(
            f"{where}: `overflow_probability` must be in (0, 1), got {overflow_probability!r}"
        )
    if n == 0 or q == 1:
        return n
    k = torch.arange(n + 1, dtype=torch.float64)
    logp = torch.distributions.Binomial(n, probs=torch.tensor(q, dtype=torch.float64)).log_prob(k)
    # tail[m] = log P(X > m) = logsumexp(logp[m + 1:]), via a reversed cumulative logsumexp
    tail = torch.logcumsumexp(logp.flip(0), 0).flip(0)
    tail = torch.cat([tail[1:], tail.new_full((1,), -math.inf)])
    return int(torch.nonzero(tail <= math.log(p))[0, 0])


def poisson_batches(
    data: Any,
    sample_rate: float,
    *,
    key: torch.Tensor,
    num_batches: int | None = None,
    start: int = 0,
    max_batch_size: int | None = None,
) -> Iterator[Any]:
    """Poisson-sampled minibatches of a pytree of tensors, the sampling DP-SGD assumes.

    Batch ``i`` holds each example independently with probability ``sample_rate``
    (membership ``poisson_mask(fold_in(key, i), n, sample_rate)``), so batch sizes vary
    (Binomial(n, q), possibly 0) and batch ``i`` is a pure function of ``(key, i)``: see
    NOTE [Poisson batches are a pure function of (key, i)]. Members keep dataset order.
    This is Opacus's ``DPDataLoader`` (``UniformWithReplacementSampler``) as a pure
    function of a key. ``fp.privacy`` accounts for ``num_batches`` steps at this
    ``sample_rate``.

    Args:
      data: a pytree of tensors sharing axis 0 (the ``n`` examples), e.g. ``(x, y)``.
      sample_rate: ``q`` in (0, 1]; the expected batch size is ``q * n``.
      key: an ``fp.random`` key. For several "epochs", pass a fresh key per epoch
        (``fold_in(base_key, epoch)``) or one key and a larger ``num_batches``.
      num_batches: how many batches (batch indices ``0 .. num_batches - 1``); default
        ``round(1 / sample_rate)``, one epoch in expectation (Opacus truncates,
        ``int(1 / sample_rate)``: 6 batches at ``q = 0.15`` where this gives 7; pass
        ``num_batches`` to match it).
      start: the first batch index to yield (resume inside the run).
      max_batch_size: ``None`` yields variable-size batches. An int yields fixed-shape
        ``(batch, mask)`` pairs: every leaf padded to ``max_batch_size`` rows (copies of
        the batch's first member; of example 0 if the batch is empty) and a
        ``(max_batch_size,)`` bool mask, ``True`` on real rows, which come first. A batch
        larger than the cap raises ``ValueError`` (see NOTE [overflow of a padded
        batch]); choose the cap with :func:`poisson_max_batch_size`.

    Returns:
      An iterator of batches shaped like ``data`` (or of ``(batch, mask)`` pairs).

    Raises:
      ValueError: an argument is out of range, or a padded batch overflows its cap.

    Notes:
      NOTE [Poisson batches are a pure function of (key, i)]: batch ``i``'s membership mask is
        ``fp.random.bernoulli(fold_in(key, i), q, (n,))``, independent of earlier batches and of the
        global RNG, so a run resumed at ``start=i`` draws the same batches and sizes stay
        Binomial(n, q) as the accountant assumes.
      NOTE [overflow of a padded batch]: a batch drawing more than ``max_batch_size`` examples
        raises rather than dropping examples (which would make the accountant under-report epsilon);
        choose the cap with ``poisson_max_batch_size``.

    Examples:
      >>> x, y = torch.arange(100.0), torch.arange(100)
      >>> k = _random.key(0)
      >>> a = [b[1].tolist() for b in poisson_batches((x, y), 0.1, key=k)]
      >>> len(a), 60 < sum(map(len, a)) < 140  # 10 batches of 10 examples on average
      (10, True)
      >>> a[3:] == [b[1].tolist() for b in poisson_batches((x, y), 0.1, key=k, start=3)]
      True
      >>> (bx, by), mask = next(poisson_batches((x, y), 0.1, key=k, max_batch_size=40))
      >>> by.shape, mask.shape, by[mask].tolist() == a[0]
      (torch.Size([40]), torch.Size([40]), True)
    """
    where = "poisson_batches(data, sample_rate)"
    q = _check_rate(where, sample_rate)
    _check_key(where, key)
    n = _num_examples(data, where)
    total = max(1, round(1 / q)) if num_batches is None else num_batches
    total = _check_count(where, "num_batches", total, 0)
    first = _as_int(start)
    if first is None or not 0 <= first <= total:
        raise ValueError(f"{where}: `start` must be an int in [0, {total}], got {start!r}")
    start = first
    if max_batch_size is not None:
        max_batch_size = _check_count(where, "max_batch_size", max_batch_size, 1)
        if n == 0:  # no example 0 to pad with (it failed inside torch's index_select)
            raise ValueError(f"{where}: the dataset is empty, so fixed-shape batches have no "
                             "example to pad with; use max_batch_size=None (empty batches)")
    return _iterate(data, n, q, key, total, start, max_batch_size)


def _iterate(
    data: Any, n: int, q: float, key: torch.Tensor, total: int, start: int, cap: int | None
) -> Iterator[Any]:
    leaves, treedef = _tree.flatten(data)
    first_dev = leaves[0].device
    for i in range(start, total):
        # poisson_mask's True positions (the same, found on the host when it can)
        idx = _bernoulli_positions(_random.fold_in(key, i), q, n)
        size = idx.numel()
        mask = None
        if cap is not None:
            if size > cap:
                raise ValueError(
                    f"poisson_batches: batch {i} drew {size} examples, more than "
                    f"`max_batch_size`={cap}; examples are never dropped (that would void the "
                    f"Poisson sampling the privacy accounting assumes). Use a larger cap, e.g. "
                    f"fp.data.poisson_max_batch_size({n}, {q}) = {poisson_max_batch_size(n, q)}"
                )
            pad = idx[:1] if size else idx.new_zeros(1)
            idx = torch.cat([idx, pad.expand(cap - size)])
            mask = torch.arange(cap, device=first_dev) < size
        by_dev = {x.device: idx.to(x.device) for x in leaves}
        batch = _tree.unflatten(treedef, [x.index_select(0, by_dev[x.device]) for x in leaves])
        yield batch if mask is None else (batch, mask)
