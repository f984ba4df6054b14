"""DP-SGD training: a Poisson-sampled logical batch in physical chunks, noise once, any
optimizer, the accountant stepping alongside, exact resume."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from functorch_pipeline import optim
from functorch_pipeline import random as _random
from functorch_pipeline import tree as _tree
from functorch_pipeline.optim._masking import broadcast_to_leaves
from functorch_pipeline.privacy import Accountant
from functorch_pipeline.train._state import _DATA
from functorch_pipeline.train._state import TrainState
from functorch_pipeline.train._state import _Code
from functorch_pipeline.train._state import _flatten
from functorch_pipeline.train._state import _freeze_frozen
from functorch_pipeline.train._state import _with_code
from functorch_pipeline.transforms import clipped_value_and_grad

__all__ = ["DPTrainState", "DPTrainer"]

_NOISE_STREAM = 0x0D15E  # NOTE [noise key]: the noise key is fold_in(state.key, _NOISE_STREAM)


@dataclasses.dataclass(frozen=True)
class DPTrainState(TrainState):
    """A :class:`TrainState` that also carries the privacy :class:`~fp.privacy.Accountant`.

    Everything a DP run needs to continue exactly: ``params``, ``buffers``, ``opt_state``
    (which holds the noise key and the noise step count), ``step``, ``key`` and
    ``accountant``. A registered pytree: ``fp.save``/``fp.load`` round-trip it without
    ``like=`` (the accountant's structure grows with its history, so prefer loading
    without a template). ``fp.train.train_step`` accepts it too (a non-private step, which
    its accountant records as a step without noise). As in :class:`TrainState`, ``apply_fn`` and ``tx``
    (given with ``.replace``) are static: ``fp.tree.map``, ``torch.func`` transforms,
    device moves, ``fp.jit`` and ``fp.load(like=state)`` keep them, and a checkpoint never
    holds them.

    NOTE [code is not saved]: ``apply_fn`` and ``tx`` are code, not data: they travel as
    static pytree metadata (so transforms and device moves keep them) and are left out of
    checkpoints; after ``fp.load`` without ``like=``, give them back with ``.replace``.

    Attributes:
      params, buffers, opt_state, step, key: as :class:`TrainState`.
      accountant: the ``fp.privacy.Accountant`` of the steps taken so far.

    Example:
      >>> import functorch_pipeline as fp
      >>> s = DPTrainState.create({"w": torch.zeros(2)}, (), fp.random.key(0),
      ...                         accountant=fp.privacy.Accountant("rdp"))
      >>> int(s.step), s.accountant.steps
      (0, 0)
    """

    accountant: Any = None

    @classmethod
    def create(  # type: ignore[override]
        cls,
        params: Any,
        opt_state: Any,
        key: torch.Tensor,
        *,
        buffers: Any = None,
        step: int | torch.Tensor = 0,
        accountant: Accountant | None = None,
    ) -> DPTrainState:
        """A fresh state (see :meth:`TrainState.create`) with an accountant.

        Args:
          params: the trainable parameters.
          opt_state: the optimizer state.
          key: the run's ``fp.random`` key.
          buffers: non-trainable state (default ``{}``).
          step: the number of completed steps.
          accountant: an ``fp.privacy.Accountant`` (default ``Accountant("rdp")``).

        Returns:
          A :class:`DPTrainState`.

        Example:
          >>> import functorch_pipeline as fp
          >>> DPTrainState.create({}, (), fp.random.key(1)).accountant.kind
          'rdp'
        """
        base = TrainState.create(params, opt_state, key, buffers=buffers, step=step)
        acc = Accountant("rdp") if accountant is None else accountant
        if not isinstance(acc, Accountant):
            raise TypeError(
                "DPTrainState.create: `accountant` must be an fp.privacy.Accountant, got "
                f"{type(acc).__name__}"
            )
        fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(TrainState)}
        return cls(**fields, accountant=acc)


_DP_DATA = (*_DATA, "accountant")


def _dp_flatten(s: DPTrainState) -> tuple[list[Any], Any]:
    """TrainState's flatten (``apply_fn``/``tx`` as static aux, NOTE [code is not saved])
    plus the accountant. A state without code has aux ``()``, as the plain dataclass
    registration this replaces, so older checkpoints load unchanged."""
    children, code = _flatten(s)
    return [*children, s.accountant], code


def _dp_unflatten(aux: Any, children: Any) -> DPTrainState:
    obj = object.__new__(DPTrainState)
    for n, v in zip(_DP_DATA, children, strict=True):
        object.__setattr__(obj, n, v)
    if isinstance(aux, _Code):
        _with_code(obj, aux.apply_fn, aux.tx)
    return obj


_tree.register_pytree_node(DPTrainState, _dp_flatten, _dp_unflatten, field_names=_DP_DATA)


def _check_positive(where: str, name: str, value: Any, *, integer: bool = False,
                    high: float | None = None, finite: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an int" if integer else "a number"
        raise TypeError(f"{where}: `{name}` must be {kind}, got {type(value).__name__}")
    if not value > 0 or (high is not None and value > high) or (finite and math.isinf(value)):
        rng = f"in (0, {high}]" if high is not None else "a finite number > 0" if finite else "> 0"
        raise ValueError(f"{where}: `{name}` must be {rng}, got {value!r}")


def _num_rows(where: str, batch: Any) -> int:
    leaves = _tree.leaves(batch)
    if not leaves:
        raise ValueError(f"{where}: the batch has no tensor leaves")
    if all(isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == leaves[0].shape[0]
           for x in leaves):
        return int(leaves[0].shape[0])
    flat = _tree.flatten_with_path(batch)[0]  # key paths only for the error
    n = None
    for p, x in zip(flat, leaves, strict=True):
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            raise ValueError(f"{where}: leaf at path `{_tree.keystr(p)}` of the batch has no "
                             "batch axis (axis 0)")
        if n is None:
            n = x.shape[0]
        elif x.shape[0] != n:
            raise ValueError(f"{where}: leaf at path `{_tree.keystr(p)}` of the batch has "
                             f"{x.shape[0]} rows but the first leaf has {n}")
    return int(n)


def _finite_padding(batch: Any, mask: torch.Tensor) -> Any:
    """``batch`` with its padding rows (``mask`` False; at least one row is real) replaced
    by copies of the first real row.

    # NOTE [padding rows]
    A padding row's loss is replaced by 0 (``masked_losses``), which makes its output
    gradients 0; its weight gradients are its activations times those, 0 only where the
    activations are finite. Padding holding NaN or inf (garbage past a fixed-shape batch's
    end, or a zero row that a model normalises, ``x / x.norm()``) turned every method's
    clipped sum, and so every parameter, NaN, although the rows are documented as dropped.
    Copies of a real row are as finite as the data, and their zero loss keeps them out of
    the sum exactly. The gather copies the batch once per step, only when it has padding.
    """
    if bool(mask.all()):
        return batch
    rows = torch.arange(mask.shape[0], device=mask.device)
    rows = torch.where(mask, rows, rows[mask][0])
    return _tree.map(lambda a: a.index_select(0, rows.to(a.device)), batch)


def _averaging_factory(tx: Any) -> str | None:
    """``"data_parallel"`` or ``"pmean_gradients"`` when ``tx`` is made by that
    ``fp.distributed`` factory (its update averages over ranks), else None. A chain that
    holds one is not seen here; the process-group check catches it (NOTE [DPTrainer is one
    process])."""
    update = getattr(tx, "update", None)
    if getattr(update, "__module__", None) != "functorch_pipeline.distributed._data_parallel":
        return None
    name = getattr(update, "__qualname__", "").split(".")[0]
    return name if name in ("data_parallel", "pmean_gradients") else None


_USE_DISTRIBUTED_DP = (
    "For DP-SGD across ranks use fp.distributed.differentially_private_aggregate (each rank "
    "clips its own examples, one psum adds the clipped sums, the noise is added once) with "
    "fp.distributed.poisson_indices for each rank's share of the Poisson batch"
)


def _check_one_process(where: str) -> None:
    """Refuse a process group of several ranks (NOTE [DPTrainer is one process]): ~0.2 us
    without one."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError(
            f"{where}: running in a torch.distributed process group of {dist.get_world_size()} "
            "ranks, but DPTrainer has no multi-process mode: it adds the noise to the clipped sum "
            "of the examples this rank was given, so averaging its updates over ranks (as "
            "fp.distributed.data_parallel does) is not the one-process DP-SGD step the accountant "
            f"assumes (half the signal with the full noise on 2 ranks). {_USE_DISTRIBUTED_DP}. If "
            "every rank trains its own model independently (no averaging), pass "
            "DPTrainer(..., independent_processes=True)"
        )


class DPTrainer:
    """DP-SGD (or DP-Adam, DP-anything) one line away from ``fp.train.train_step``.

    Each :meth:`step` takes one *logical* batch (Poisson sampled: every example joined
    with probability ``sample_rate``; variable-size, or fixed-size with a ``mask``),
    splits it into *physical* chunks of at most ``max_physical_batch_size`` examples
    (what Opacus' ``BatchMemoryManager`` does, so memory is bounded by the chunk),
    sums the per-example gradients each clipped to ``l2_norm_clip`` over all chunks,
    adds Gaussian noise of std ``l2_norm_clip * noise_multiplier`` once, divides by
    ``expected_batch_size`` (NOTE [expected batch size] in ``fp.optim.add_dp_noise``),
    applies ``optimizer`` and records the step in the state's accountant. A trainer with
    ``noise_multiplier=0`` (no noise: not private) records its steps with
    ``Accountant.step_without_noise``, so the state's accountant reports epsilon = inf
    from the first such step on (NOTE [steps without noise] in ``fp.privacy.Accountant``).

    The noise comes from ``fold_in(fold_in(state.key, NOISE), count)`` kept in the
    optimizer state (NOTE [noise key]), so a state saved with ``fp.save`` and loaded in
    a new process continues bit for bit (NOTE [exact resume]).

    Args:
      loss_fn: ``(params, batch) -> (B,)`` per-example losses (``reduction="none"``;
        example ``i``'s loss must depend on example ``i`` alone: no BatchNorm in training
        mode). Written for a whole batch; see ``method``.
      optimizer: any ``fp.optim`` transformation (``sgd``, ``adam``, ...): it receives
        the noisy mean gradient.
      l2_norm_clip: the per-example bound ``C``.
      noise_multiplier: ``σ``, a finite number >= 0 (0: no noise and no privacy guarantee).
      sample_rate: ``q``, the Poisson sampling probability (for the accountant).
      expected_batch_size: ``q * N``, the divisor of the noisy sum (finite, > 0).
      max_physical_batch_size: the largest chunk computed at once (default: no split).
      method: ``fp.clipped_grad``'s method: ``"auto"`` (default: ghost clipping, else
        hooks, else vmap: the first that can run ``loss_fn``), ``"ghost"``, ``"hooks"``
        or ``"vmap"``.
      trainable: a tree of bools with the structure of the parameters, or a prefix of it
        (``False``: frozen), e.g. a functionalized model's ``trainable_mask()``; default
        everything trained.
        Frozen leaves get no per-example gradients (their gradients count in no
        example's clipped norm, as Opacus clips the parameters that require grad), no
        noise and no update (NOTE [frozen parameters in DP-SGD]).
      independent_processes: ``True`` lets :meth:`init` and :meth:`step` run in a
        ``torch.distributed`` process group of several ranks, each rank running its own,
        independent DP training (nothing is communicated). Default ``False``: refused,
        since DPTrainer has no data-parallel mode (NOTE [DPTrainer is one process]).

    Notes:
      NOTE [exact resume]: everything random comes from ``state.key`` folded with the step, and the
        key never advances, so a state saved at step N and resumed in a new process continues bit
        for bit.
      NOTE [expected batch size]: with Poisson sampling the batch size is random, so (like Opacus)
        the noisy sum is divided by the *expected* batch size ``q * N``, not the sampled one.
      NOTE [noise key]: the DP noise key lives in the optimizer state (built from the run's key at
        ``init``), so it is saved and restored with the state.
      NOTE [frozen parameters in DP-SGD]: a mask given to the optimizer alone
        (``chain(tx, optim.freeze(...))``) kept frozen leaves fixed, but their gradients still
        counted in each example's norm, so the trained leaves were clipped harder than by
        Opacus (which clips only parameters that require grad), and without a mask frozen
        leaves were trained. With ``trainable``, ``loss_fn`` gets the frozen leaves as
        constants and the per-example gradients, norms and noise cover the trained leaves
        alone; the optimizer runs on them (``optim.partition`` with zero updates for the rest).
      NOTE [DPTrainer is one process]: DPTrainer adds the noise to the clipped sum of the
        examples it is given. Composed with ``fp.distributed.data_parallel`` on N ranks, each
        rank added the same noise to its own share's sum and the average gave ``(S/N + z)/E``
        (1/N of the signal, the full noise; with a per-rank ``E/N``, ``(S + N z)/E``): silently
        not the one-process step the accountant records. So an ``optimizer`` made by
        ``fp.distributed.data_parallel`` or ``pmean_gradients`` is refused, and so is a step
        in a process group of more than one rank, unless ``independent_processes=True``.
        DP-SGD across ranks is ``fp.distributed.differentially_private_aggregate`` (a ``psum``
        of the clipped sums, then the noise once) with ``fp.distributed.poisson_indices``.
      NOTE [steps without noise]: a step with ``noise_multiplier=0`` releases an exact clipped
        gradient, so no (epsilon, delta) guarantee holds for a run that took one; the accountant
        records it (``Accountant.step_without_noise``) and reports epsilon = inf, delta = 1.

    Example:
      >>> import functorch_pipeline as fp
      >>> def loss_fn(params, batch):
      ...     x, y = batch
      ...     return (torch.nn.functional.linear(x, params["w"])[:, 0] - y) ** 2  # (B,)
      >>> trainer = fp.train.DPTrainer(loss_fn, fp.optim.adam(0.1), l2_norm_clip=1.0,
      ...     noise_multiplier=1.1, sample_rate=0.5, expected_batch_size=2.0,
      ...     max_physical_batch_size=2)
      >>> state = trainer.init({"w": torch.zeros(1, 3)}, fp.random.key(0))
      >>> x, y = torch.randn(3, 3), torch.randn(3)
      >>> state, metrics = trainer.step(state, (x, y))
      >>> int(state.step), state.accountant.steps, int(metrics["num_examples"])
      (1, 1, 3)
    """

    def __init__(
        self,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        optimizer: optim.GradientTransformation,
        *,
        l2_norm_clip: float,
        noise_multiplier: float,
        sample_rate: float,
        expected_batch_size: float,
        max_physical_batch_size: int | None = None,
        method: str = "auto",
        trainable: Any = None,
        independent_processes: bool = False,
    ) -> None:
        where = "DPTrainer"
        if not callable(loss_fn):
            raise TypeError(f"{where}: `loss_fn` must be callable, got {type(loss_fn).__name__}")
        averaging = _averaging_factory(optimizer)
        if averaging is not None:  # NOTE [DPTrainer is one process]
            raise ValueError(
                f"{where}: `optimizer` is fp.distributed.{averaging}(...), which averages the "
                "updates over ranks after DPTrainer has added the noise on each rank: the result "
                f"is not DP-SGD on the union batch (half the signal on 2 ranks). {_USE_DISTRIBUTED_DP}; "
                "give DPTrainer the optimizer itself"
            )
        if not isinstance(independent_processes, bool):
            raise TypeError(f"{where}: `independent_processes` must be a bool, got "
                            f"{type(independent_processes).__name__}")
        _check_positive(where, "l2_norm_clip", l2_norm_clip)
        if isinstance(noise_multiplier, bool) or not isinstance(noise_multiplier, (int, float)):
            raise TypeError(f"{where}: `noise_multiplier` must be a number, got "
                            f"{type(noise_multiplier).__name__}")
        if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):  # NaN: False
            raise ValueError(f"{where}: `noise_multiplier` must be a finite number >= 0, got "
                             f"{noise_multiplier!r}")
        if noise_multiplier > 0 and math.isinf(l2_norm_clip):
            raise ValueError(f"{where}: `l2_norm_clip` must be finite when noise_multiplier > 0 "
                             f"(the noise std is their product), got {l2_norm_clip!r}")
        _check_positive(where, "sample_rate", sample_rate, high=1.0)
        # NOTE [expected batch size]: an infinite divisor made every update silently 0
        _check_positive(where, "expected_batch_size", expected_batch_size, finite=True)
        if max_physical_batch_size is not None:
            _check_positive(where, "max_physical_batch_size", max_physical_batch_size, integer=True)
        self.loss_fn = loss_fn
        self.l2_norm_clip = float(l2_norm_clip)
        self.noise_multiplier = float(noise_multiplier)
        self.sample_rate = float(sample_rate)
        self.expected_batch_size = float(expected_batch_size)
        self.max_physical_batch_size = max_physical_batch_size
        self.method = method
        self.independent_processes = independent_processes
        self._init_params: Any = None  # (treedef, paths) of the last init's params, for errors
        # NOTE [noise key]: update() reads the noise key from the optimizer state only;
        # init() builds that state from the run's key, so the 0 here is never used.
        self.trainable = trainable  # NOTE [frozen parameters in DP-SGD]; checked just below
        self.optimizer = _freeze_frozen(optim.differentially_private(
            optimizer, self.l2_norm_clip, self.noise_multiplier, key=0,
            batch_size=self.expected_batch_size,
        ), None, None, trainable, where)
        self._inner = optimizer
        self._split: dict[Any, tuple[Any, Any]] = {}  # (treedef, flags) -> clipped fns

        def masked_losses(params: Any, batch: Any, mask: torch.Tensor) -> torch.Tensor:
            # NOTE [padding rows]: a padding row's loss is replaced by 0, so its output
            # gradients, norm and clipped part are 0, provided its activations are finite
            # (0 * inf and 0 * NaN are NaN in every method): clipped_sum hands loss_fn the
            # padding rows as copies of a real row (_finite_padding).
            losses = loss_fn(params, batch)
            if not isinstance(losses, torch.Tensor) or losses.numel() != mask.numel():
                got = (f"shape {tuple(losses.shape)}" if isinstance(losses, torch.Tensor)
                       else type(losses).__name__)
                raise ValueError(f"DPTrainer: with a `mask`, loss_fn must return one loss per "
                                 f"example, shape ({mask.numel()},), got {got}: return the "
                                 "unreduced losses (reduction='none'), not their mean or sum")
            return torch.where(mask.reshape(losses.shape), losses, torch.zeros_like(losses))

        self._clipped_masked = clipped_value_and_grad(masked_losses, self.l2_norm_clip,
                                                      method=method)
        self._clipped = clipped_value_and_grad(loss_fn, self.l2_norm_clip, method=method)
        self._masked_losses = masked_losses

    def init(self, params: Any, key: torch.Tensor, *, buffers: Any = None,
             accountant: str | Accountant = "rdp") -> DPTrainState:
        """The state of a fresh run.

        Args:
          params: the initial parameters. Their values are taken (detached): a DP step
            trains them and builds no autograd graph across steps, so
            ``dict(model.named_parameters())`` works as the detached tree does (NOTE
            [parameters that require grad in DPTrainer]).
          key: the run's ``fp.random`` key (the noise key is derived from it).
          buffers: non-trainable state, e.g. eval-mode BatchNorm statistics, carried in
            the state and its checkpoints. ``loss_fn(params, batch)`` does not receive them:
            it reads the buffers of the model it closes over, so after ``fp.load`` put these
            back into that model (``model.load_state_dict(..., strict=False)``) or close
            over ``state.buffers`` in ``loss_fn`` (``functional_call(model, {**params,
            **buffers}, ...)``).
          accountant: ``"rdp"``, ``"pld"`` or an ``fp.privacy.Accountant`` to continue.

        Returns:
          A :class:`DPTrainState` at step 0.

        Example:
          >>> import torch.nn.functional as F
          >>> import functorch_pipeline as fp
          >>> t = DPTrainer(lambda w, x: F.linear(x, w)[:, 0], fp.optim.sgd(0.1), l2_norm_clip=1.0,
          ...               noise_multiplier=1.0, sample_rate=0.1, expected_batch_size=10)
          >>> t.init(torch.zeros(1, 2), fp.random.key(0), accountant="pld").accountant.kind
          'pld'
        """
        if not _random.is_key(key):
            raise TypeError(f"DPTrainer.init: `key` must be an fp.random key, got {key!r}")
        if not self.independent_processes:
            _check_one_process("DPTrainer.init")
        acc = Accountant(accountant) if isinstance(accountant, str) else accountant
        # NOTE [parameters that require grad in DPTrainer]
        # nn.Parameters (dict(model.named_parameters()), Opacus' habit) require grad: each
        # step's parameters then came from the last through the optimizer's graph, which
        # autograd kept from the first step on (317 MB over 12 steps of a small CNN against
        # 6 MB detached), and auto took vmap for them (its result keeps a graph). A DP step
        # differentiates nothing through its own steps, so the run starts from the values.
        params = _tree.map(lambda p: p.detach() if isinstance(p, torch.Tensor) else p, params)
        tx = _freeze_frozen(optim.differentially_private(
            self._inner, self.l2_norm_clip, self.noise_multiplier,
            key=_random.fold_in(key, _NOISE_STREAM), batch_size=self.expected_batch_size,
        ), None, None, self.trainable, "DPTrainer.init")
        if self.trainable is not None and not any(self._flags("DPTrainer.init", params)):
            raise ValueError("DPTrainer.init: `trainable` marks no parameter trainable: a DP "
                             "step would train nothing (and spend privacy budget)")
        paths, _, treedef = _tree.flatten_with_path(params)
        self._init_params = (treedef, paths)
        return DPTrainState.create(params, tx.init(params), key, buffers=buffers, accountant=acc)

    def clipped_sum(self, params: Any, batch: Any, mask: torch.Tensor | None = None
                    ) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """The sum over the batch of per-example gradients clipped to ``l2_norm_clip``,
        computed in physical chunks; no noise.

        Args:
          params: the parameters.
          batch: a pytree whose leaves have the examples on axis 0.
          mask: optional ``(B,)`` bool tensor, ``False`` on padding rows (dropped).

        Returns:
          ``(clipped_sum, losses, norms)``: the sum (shaped like ``params``), and the
          ``(B,)`` per-example losses and gradient norms (padding rows included).

        Example:
          >>> import torch.nn.functional as F
          >>> import functorch_pipeline as fp
          >>> t = DPTrainer(lambda w, x: F.linear(x, w)[:, 0], fp.optim.sgd(0.1), l2_norm_clip=1.0,
          ...               noise_multiplier=0.0, sample_rate=0.1, expected_batch_size=10)
          >>> x = torch.tensor([[3., 4.], [.3, .4]])
          >>> s, losses, norms = t.clipped_sum(torch.zeros(1, 2), x)
          >>> s, norms
          (tensor([[0.9000, 1.2000]]), tensor([5.0000, 0.5000]))
        """
        where = "DPTrainer.clipped_sum"
        n = _num_rows(where, batch)
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != (n,):
                got = (f"{mask.dtype} of shape {tuple(mask.shape)}"
                       if isinstance(mask, torch.Tensor) else type(mask).__name__)
                raise ValueError(f"{where}: `mask` must be a bool tensor of shape ({n},) (one "
                                 f"entry per example), got {got}")
        if n == 0 or mask is not None and not bool(mask.any()):  # nothing to clip
            leaf = _tree.leaves(params)[0]
            nothing = torch.zeros(n, dtype=leaf.dtype, device=leaf.device)
            return _tree.map(torch.zeros_like, params), nothing, nothing
        if mask is not None:
            batch = _finite_padding(batch, mask)
        size = self.max_physical_batch_size or n
        clipped, clipped_masked, args = self._clipped, self._clipped_masked, (params,)
        split = self._split_params(where, params)
        if split is not None:  # NOTE [frozen parameters in DP-SGD]
            (clipped, clipped_masked), args, flags = split
        total, losses, norms = None, [], []
        for start in range(0, n, size):
            chunk = batch if size >= n else _tree.map(lambda a, s=start: a[s:s + size], batch)
            if mask is None:
                chunk_losses, (summed, chunk_norms) = clipped(*args, chunk)
            else:
                chunk_losses, (summed, chunk_norms) = clipped_masked(
                    *args, chunk, mask[start:start + size])
            total = summed if total is None else _tree.map(torch.add, total, summed)
            losses.append(chunk_losses.reshape(-1))
            norms.append(chunk_norms)
        if split is not None:  # the frozen leaves' share of the sum: zeros
            leaves, td = _tree.flatten(params)
            zeros = [torch.zeros_like(leaf) for leaf, f in zip(leaves, flags, strict=True) if not f]
            total = _tree.unflatten(td, _interleave(flags, total, zeros))
        if len(losses) == 1:
            return total, losses[0], norms[0]
        return total, torch.cat(losses), torch.cat(norms)

    def _flags(self, where: str, params: Any) -> tuple[bool, ...]:
        """``trainable`` (a tree like ``params`` or a prefix of it) as one bool per leaf."""
        return tuple(broadcast_to_leaves(where, "trainable", self.trainable, params))

    def _split_params(self, where: str, params: Any
                      ) -> tuple[tuple[Any, Any], tuple[Any, Any], tuple[bool, ...]] | None:
        """With frozen leaves: the clipped functions of the trainable leaves alone, their
        ``(trainable, frozen)`` arguments and the flags (NOTE [frozen parameters in
        DP-SGD]); else None."""
        if self.trainable is None:
            return None
        flags = self._flags(where, params)
        if all(flags):
            return None
        leaves, td = _tree.flatten(params)
        fns = self._split.get((td, flags))
        if fns is None:
            def merged(train: list[Any], frozen: list[Any]) -> Any:
                return _tree.unflatten(td, _interleave(flags, train, frozen))

            def split_losses(train: list[Any], frozen: list[Any], batch: Any) -> torch.Tensor:
                return self.loss_fn(merged(train, frozen), batch)

            def split_masked(train: list[Any], frozen: list[Any], batch: Any,
                             mask: torch.Tensor) -> torch.Tensor:
                return self._masked_losses(merged(train, frozen), batch, mask)

            fns = (clipped_value_and_grad(split_losses, self.l2_norm_clip, method=self.method,
                                          batch_argnums=(2,)),
                   clipped_value_and_grad(split_masked, self.l2_norm_clip, method=self.method,
                                          batch_argnums=(2, 3)))
            self._split[(td, flags)] = fns
        train = [leaf for leaf, f in zip(leaves, flags, strict=True) if f]
        frozen = [leaf for leaf, f in zip(leaves, flags, strict=True) if not f]
        return fns, (train, frozen), flags

    def _params_mismatch(self, params: Any) -> ValueError | None:
        """After a failed step: a ValueError naming the key paths in which ``params`` differs
        from the parameters of this trainer's last :meth:`init` (whose structure the
        optimizer state was built for), or None when they match or no init was seen."""
        if self._init_params is None:
            return None
        treedef, paths = self._init_params
        have, _, got_def = _tree.flatten_with_path(params)
        if got_def == treedef:
            return None
        want, got = {_tree.keystr(p) for p in paths}, {_tree.keystr(p) for p in have}
        detail = (f"paths only in `state.params`: {sorted(got - want) or 'none'}; only in the "
                  f"parameters given to DPTrainer.init: {sorted(want - got) or 'none'}"
                  if want != got else f"same paths, other containers: {got_def} vs {treedef}")
        return ValueError(
            "DPTrainer.step: `state.params` no longer has the structure of the parameters "
            f"DPTrainer.init built the state's optimizer state for ({detail}); give the state "
            "parameters of that structure, or start again from DPTrainer.init(new_params, key)"
        )

    def step(self, state: DPTrainState, batch: Any, mask: torch.Tensor | None = None
             ) -> tuple[DPTrainState, dict[str, torch.Tensor]]:
        """One DP step on a logical batch.

        Args:
          state: the current :class:`DPTrainState`.
          batch: the logical batch (any pytree with examples on axis 0; may be empty).
          mask: optional ``(B,)`` bool mask of real rows, for fixed-shape padded batches.

        Returns:
          ``(new_state, metrics)``; metrics are 0-d tensors: ``loss`` (mean over real
          examples, not private), ``num_examples`` and ``num_clipped``.

        Raises:
          RuntimeError: in a ``torch.distributed`` process group of several ranks, unless
            the trainer has ``independent_processes=True`` (NOTE [DPTrainer is one process]).
          ValueError: ``state.params`` no longer has the structure of the parameters this
            trainer's :meth:`init` built the optimizer state for (the key paths are named);
            raised from the error the step hit.

        Example:
          >>> import torch.nn.functional as F
          >>> import functorch_pipeline as fp
          >>> t = DPTrainer(lambda w, x: F.linear(x, w)[:, 0], fp.optim.sgd(0.1), l2_norm_clip=1.0,
          ...               noise_multiplier=0.0, sample_rate=0.5, expected_batch_size=2)
          >>> s = t.init(torch.zeros(1, 2), fp.random.key(0))
          >>> s, m = t.step(s, torch.tensor([[3., 4.], [.3, .4]]))
          >>> s.params, int(m["num_clipped"])
          (tensor([[-0.0450, -0.0600]]), 1)
        """
        if not isinstance(state, DPTrainState):
            raise TypeError(f"DPTrainer.step: `state` must be a DPTrainState (from "
                            f"DPTrainer.init), got {type(state).__name__}")
        if not self.independent_processes:
            _check_one_process("DPTrainer.step")  # NOTE [DPTrainer is one process]
        try:
            total, losses, norms = self.clipped_sum(state.params, batch, mask)
            updates, opt_state = self.optimizer.update(total, state.opt_state, state.params)
        except (KeyError, IndexError, TypeError, ValueError) as e:
            mismatch = self._params_mismatch(state.params)
            if mismatch is None:
                raise
            raise mismatch from e
        params = optim.apply_updates(state.params, updates)
        if mask is None and norms.shape[0]:  # every row is real
            count = torch.full((), norms.shape[0], dtype=torch.int64, device=norms.device)
            loss, clipped = losses.mean(), (norms > self.l2_norm_clip).sum()
        else:
            real = torch.ones_like(norms, dtype=torch.bool) if mask is None else mask
            count = real.sum()
            loss = torch.where(real, losses.reshape(real.shape), 0).sum() / count.clamp(min=1)
            clipped = ((norms > self.l2_norm_clip) & real).sum()
        accountant = state.accountant
        if self.noise_multiplier > 0:
            accountant = accountant.step(noise_multiplier=self.noise_multiplier,
                                         sample_rate=self.sample_rate)
        else:  # NOTE [steps without noise]: no guarantee from here on (epsilon = inf)
            accountant = accountant.step_without_noise(sample_rate=self.sample_rate)
        new = state.replace(params=params, opt_state=opt_state, step=state.step + 1,
                            accountant=accountant)
        metrics = {"loss": loss.detach(), "num_examples": count,
                   "num_clipped": clipped}
        return new, metrics


def _interleave(flags: tuple[bool, ...], train: list[Any], frozen: list[Any]) -> list[Any]:
    """The leaves in order: ``train``'s where ``flags`` is true, ``frozen``'s elsewhere."""
    it, fz = iter(train), iter(frozen)
    return [next(it) if f else next(fz) for f in flags]
