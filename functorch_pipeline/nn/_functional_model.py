"""``functionalize(module)``: any ``nn.Module`` as ``init`` and ``apply`` over variables.

# NOTE [variables]
Variables are ``{"params": {...}, "buffers": {...}}``, each a flat dict keyed by the
dotted names of ``module.named_parameters()`` / ``named_buffers()``: exactly the keys of
``module.state_dict()``, so ``"fc1.weight"`` means what it means to PyTorch, and
``torch.func.functional_call`` takes the dicts as they are. Both collections are always
present (``buffers`` may be empty). Tied parameters (one tensor reachable under two
names) appear once, under the first name; ``apply`` keeps them tied and
``to_state_dict`` writes every alias back. Buffers include non-persistent ones (they are
module state too, and must move with ``fp.tree.to``); ``to_state_dict`` leaves them out,
as ``state_dict()`` does.

# NOTE [frozen parameters]
A parameter with ``requires_grad=False`` is still a parameter: it lives in
``variables["params"]`` and ``apply`` uses it like any other. Freezing is the optimizer's
business. ``apply`` never detaches anything, so a gradient taken over all params has
entries for frozen ones too. The two masks have opposite polarities on purpose:
``model.trainable_mask()`` is ``True`` for trainable leaves, ``model.frozen_mask()`` is
``True`` for frozen ones (the polarity of ``optim.freeze(mask)``). The recommended path
needs neither: ``fp.train.TrainState.create(apply_fn=model.apply, params=..., tx=...)``
reads the mask from the model and zeroes the frozen leaves' updates. By hand, use
``optim.partition({"trainable": tx, "frozen": optim.set_to_zero()}, labels)`` or
``optim.chain(tx, optim.freeze(model.frozen_mask()))``. ``optim.masked(tx,
model.trainable_mask())`` alone does NOT freeze: ``masked`` passes the unselected updates
(the raw gradients) through unchanged, so frozen weights would move by ``+g``.

# NOTE [train returns buffers]
``apply(..., train=False)`` returns the module's output. ``apply(..., train=True)``
always returns ``(output, new_buffers)`` (``new_buffers`` is ``{}`` for a module without
buffers), as Flax's ``apply(..., mutable=[...])`` always returns a pair: the shape of the
result never depends on the model. The buffers handed in are never written: in train
mode ``apply`` runs the module on copies of them. ``new_buffers`` holds the values the
forward left in the module, read from the template while ``torch.func.functional_call``'s
reparametrization is still in force (a forward hook on the template, registered for that
call only): a buffer updated in place (``self.n += 1``, BatchNorm's running stats) is the
updated copy, and a buffer updated by reassignment (``self.avg = 0.9 * self.avg + ...``,
an EMA or counter idiom) is the newly assigned tensor. ``functional_call`` restores the
template's attributes on exit and drops a reassigned tensor, so the dict of copies handed
to it alone would silently keep the old values of reassigned buffers.

# NOTE [apply under torch.compile]
``fp.jit(train_step)`` (``torch.compile`` around ``value_and_grad`` around ``apply(...,
train=True)``) must not graph-break inside ``apply``: after a break inside
``torch.func.grad`` Dynamo resumes in a new frame whose grad-tracking inputs it cannot
fake (``AssertionError: False != True`` on ``is_leaf`` in
``meta_utils.assert_metadata_eq``; with ``aot_eager`` it showed as optree's ``length
mismatch`` in the gradients' unflatten instead). Two things in ``apply`` broke the graph,
both only in train mode with buffers (BatchNorm): the per-sample BatchNorm check (optree's
flatten of the inputs, ``DictMetaData``, and functorch's wrapper queries are opaque to
Dynamo) and the forward hook that reads the new buffers (Dynamo cannot create a
``RemovableHandle``). While Dynamo traces, ``apply`` therefore skips the check and reads
the buffers inside ``torch.nn.utils.stateless._reparametrize_module`` (what
``functional_call`` runs) right after the forward, which gives what the hook gives. The
check is lost only where Dynamo traces a ``vmap`` over the inputs through ``apply`` whole
(in the cases tried it falls back to eager for that ``vmap``, where the check runs);
functorch then refuses the in-place running-statistics update itself, with a vaguer
message. Eager calls take the hook path as before.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import torch
import torch.func
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module

from functorch_pipeline import random as _random
from functorch_pipeline import tree as _tree
from functorch_pipeline.nn._copy import copy_module
from functorch_pipeline.nn._copy import has_lazy
from functorch_pipeline.nn._normalization import batchnorm_error
from functorch_pipeline.nn._normalization import batchnorm_paths
from functorch_pipeline.nn._normalization import instancenorm_error
from functorch_pipeline.nn._normalization import running_instancenorm_paths
from functorch_pipeline.nn._normalization import vmap_levels
from functorch_pipeline.nn._randomness import KeyedRandomness
from functorch_pipeline.nn._unbound import Binding
from functorch_pipeline.nn._unbound import guard_template

__all__ = ["FunctionalModel", "functionalize"]

_COLLECTIONS = ("params", "buffers")
_RANDOM_LAYERS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                  nn.FeatureAlphaDropout, nn.RReLU)


def _where(collection: str, name: str) -> str:
    return _tree.keystr((collection, name))


def _owner(name: str) -> tuple[str, str]:
    prefix, _, local = name.rpartition(".")
    return prefix, local


class FunctionalModel:
    """A pure view of an ``nn.Module``: ``init`` makes variables, ``apply`` runs the module
    as a function of them. Made by :func:`functionalize`; see it for an example.

    The module is kept by reference and never modified: ``apply`` runs a private copy
    whose parameters and buffers live on the ``meta`` device (no memory; the variables'
    tensors are swapped in for each call), and ``init`` works on another throw-away copy.

    Args:
        module: the ``nn.Module`` to view (kept by reference, never modified).
        factory: a zero-argument callable that builds the module, or ``None``; when given,
            ``init`` calls it under the key (what ``fp.functionalize(lambda: Net())`` passes).

    Examples:
        >>> import functorch_pipeline as fp
        >>> model = FunctionalModel(nn.Linear(3, 2))
        >>> variables = model.init(fp.random.key(0))
        >>> model.apply(variables, torch.ones(4, 3)).shape
        torch.Size([4, 2])
    """

    def __init__(self, module: nn.Module, factory: Callable[[], nn.Module] | None = None) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"functionalize(module): `module` must be an nn.Module, got {type(module).__name__}")
        self._module = module
        self._factory = factory
        self._param_names = [n for n, _ in module.named_parameters()]
        self._buffer_names = [n for n, _ in module.named_buffers()]
        self._trainable = {n: p.requires_grad for n, p in module.named_parameters()}
        # Every state_dict key, in state_dict order, with its collection and canonical name.
        first: dict[int, str] = {}
        self._state_keys: list[tuple[str, str, str]] = []
        self._nonpersistent: list[str] = []
        for prefix, m in module.named_modules(remove_duplicate=False):
            dot = f"{prefix}." if prefix else ""
            for collection, items in (("params", m._parameters), ("buffers", m._buffers)):
                for local, t in items.items():
                    if t is None:
                        continue
                    name = first.setdefault(id(t), dot + local)
                    if collection == "buffers" and local in m._non_persistent_buffers_set:
                        if name == dot + local:
                            self._nonpersistent.append(name)
                        continue
                    self._state_keys.append((dot + local, collection, name))
        self._aliases = {key: name for key, _, name in self._state_keys if key != name}
        # (paths, variable names under them, error) per kind of norm that vmap cannot map
        self._stat_norms = []
        for paths, error in ((batchnorm_paths(module), batchnorm_error),
                             (running_instancenorm_paths(module), instancenorm_error)):
            if paths:
                names = [n for n in (*self._param_names, *self._buffer_names)
                         if any(n.startswith(f"{p}.") or not p for p in paths)]
                self._stat_norms.append((paths, names, error))
        random_layers = [n or "<root>" for n, m in module.named_modules() if isinstance(m, _RANDOM_LAYERS)]
        self._no_key_hint = f" (random layers: {', '.join(f'`{n}`' for n in random_layers)})" if random_layers else ""
        self._templates: dict[bool, nn.Module] | None = None
        self._binding = Binding()  # NOTE [modules run after apply returns]
        self._shapes: dict[str, dict[str, torch.Size]] | None = None
        if not has_lazy(module):
            self._set_templates(module)

    # ------------------------------------------------------------------ templates
    def _set_templates(self, materialised: nn.Module) -> None:
        self._templates = {t: copy_module(materialised, meta=True).train(t) for t in (True, False)}
        for template in self._templates.values():
            guard_template(template, self._binding)
        self._shapes = {
            "params": {n: p.shape for n, p in materialised.named_parameters()},
            "buffers": {n: b.shape for n, b in materialised.named_buffers()},
        }

    def _materialise_from(self, params: Mapping[str, Any], buffers: Mapping[str, Any], fn: str) -> None:
        """Give a lazy module its shapes from variables (via ``load_state_dict``'s lazy hook)."""
        m = copy_module(self._module)
        sd = {key: (params if c == "params" else buffers)[name] for key, c, name in self._state_keys}
        with torch.no_grad():
            m.load_state_dict(sd, strict=False)
        if has_lazy(m):
            raise ValueError(
                f"{fn}: the module has lazy parameters that `variables` cannot give shapes to; "
                "call init(key, sample_input) first"
            )
        self._set_templates(m)

    # ------------------------------------------------------------------ checks
    @property
    def module(self) -> nn.Module:
        """The wrapped module (read it; ``apply`` never uses or changes its tensors)."""
        return self._module

    def trainable_mask(self) -> dict[str, bool]:
        """``{name: requires_grad}`` over the params: ``True`` marks a trainable parameter.

        Notes:
          This is the opposite polarity of ``optim.freeze(mask)`` (``True`` = frozen there;
          use :meth:`frozen_mask`), and ``optim.masked(tx, trainable_mask())`` alone does
          not freeze anything: ``masked`` passes the unselected updates (the raw
          gradients) through, so frozen weights would move. The recommended path is
          ``fp.train.TrainState.create(apply_fn=model.apply, params=..., tx=...)``, which
          reads this mask and keeps frozen parameters fixed with no extra step. By hand:
          ``optim.chain(tx, optim.freeze(model.frozen_mask()))``.

        Returns:
          ``{name: bool}`` with the keys of ``variables["params"]``.

        Example:
          >>> net = nn.Linear(2, 2); net.bias.requires_grad_(False)
          Parameter containing: ...
          >>> functionalize(net).trainable_mask()
          {'weight': True, 'bias': False}
        """
        return dict(self._trainable)

    def frozen_mask(self) -> dict[str, bool]:
        """``{name: not requires_grad}`` over the params: ``True`` marks a frozen parameter,
        the polarity of ``optim.freeze(mask)``.

        Returns:
          ``{name: bool}`` with the keys of ``variables["params"]``.

        Example:
          >>> import functorch_pipeline as fp
          >>> net = nn.Linear(2, 2); net.bias.requires_grad_(False)
          Parameter containing: ...
          >>> model = functionalize(net)
          >>> model.frozen_mask()
          {'weight': False, 'bias': True}
          >>> tx = fp.optim.chain(fp.optim.sgd(1.0), fp.optim.freeze(model.frozen_mask()))
          >>> g = {"weight": torch.ones(2, 2), "bias": torch.ones(2)}
          >>> tx.update(g, tx.init(g))[0]["bias"]
          tensor([0., 0.])
        """
        return {n: not t for n, t in self._trainable.items()}

    def _split(self, variables: Any, fn: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """Validate ``variables`` and return ``(params, buffers)``."""
        if not isinstance(variables, Mapping):
            raise TypeError(f"{fn}: `variables` must be a dict {{'params': ..., 'buffers': ...}} as init() returns, "
                            f"got {type(variables).__name__}")
        extra = [k for k in variables if k not in _COLLECTIONS]
        if extra:
            hint = (" It looks like a params dict: pass {'params': params} (and 'buffers')."
                    if any(k in self._trainable for k in extra) else "")
            raise ValueError(f"{fn}: `variables` has keys {extra}; expected only 'params' and 'buffers'.{hint}")
        params, buffers = variables.get("params", {}), variables.get("buffers", {})
        for collection, given, names in (("params", params, self._param_names),
                                         ("buffers", buffers, self._buffer_names)):
            if not isinstance(given, Mapping):
                raise TypeError(f"{fn}: `variables['{collection}']` must be a dict keyed by {collection[:-1]} names, "
                                f"got {type(given).__name__}")
            if len(given) != len(names) or any(n not in given for n in names):
                missing = [_where(collection, n) for n in names if n not in given]
                unknown = [k for k in given if k not in names]
                hints = [f"`{_where(collection, k)}` is tied to `{_where(collection, self._aliases[k])}`; pass it once"
                         for k in unknown if k in self._aliases]
                raise ValueError(
                    f"{fn}: `variables` does not match the module: missing {missing or 'nothing'}, "
                    f"unexpected {[_where(collection, k) for k in unknown] or 'nothing'}"
                    + (f" ({'; '.join(hints)})" if hints else "")
                )
        if self._shapes is None:
            self._materialise_from(params, buffers, fn)
        assert self._shapes is not None
        for collection, given in (("params", params), ("buffers", buffers)):
            for name, shape in self._shapes[collection].items():
                leaf = given[name]
                if not isinstance(leaf, torch.Tensor):
                    raise TypeError(f"{fn}: leaf at path `{_where(collection, name)}` is a {type(leaf).__name__}, not a tensor")
                if leaf.shape != shape:
                    raise ValueError(f"{fn}: leaf at path `{_where(collection, name)}` has shape {tuple(leaf.shape)} "
                                     f"but the module expects {tuple(shape)}")
        return dict(params), dict(buffers)

    # ------------------------------------------------------------------ init
    def init(self, key: torch.Tensor, *sample_args: Any, **sample_kwargs: Any) -> dict[str, dict[str, torch.Tensor]]:
        """Fresh variables drawn from ``key``: ``{"params": {...}, "buffers": {...}}``.

        Every submodule's ``reset_parameters()`` (or ``_reset_parameters()``) runs on a
        private copy, children before parents as during construction, with PyTorch's
        generator seeded from ``key`` inside ``torch.random.fork_rng``: the draws are the
        module's own default initialisation, the same key gives bit-identical variables
        whatever the global RNG state, and the global state is left as it was. Lazy modules
        (``nn.LazyLinear``, ...) are materialised by one eval-mode forward of the sample
        input; otherwise the sample input is not needed and not run.

        Parameters of modules without a reset method (a bare ``nn.Parameter`` in a custom
        module) keep the module's current values, the same for every key; a warning names
        them. Re-draw them with :func:`fp.nn.init.reinitialize`.

        Notes:
          Custom initialisation (NOTE [custom init]): an initialisation run inside
          ``__init__`` (``self.apply(_init_weights)``, as in GPT-2 or ViT) is not a reset
          method, so reset methods alone cannot replay it. Two ways keep it:
          ``fp.functionalize(lambda: Net(...))`` (a factory) makes ``init`` call the
          factory under the key, which replays the module's whole construction, custom
          initialisation included, bit for bit per key; or
          ``variables_from_state_dict(module.state_dict())`` keeps the module's current
          values. With a module instance, ``init`` compares each parameter's current values
          with its reset draw (a constant where the reset is random, different values where
          it is deterministic, or a two-sample Kolmogorov-Smirnov test at level 1e-6 for
          leaves of 64 or more elements) and warns, naming them, when they cannot come from
          the reset: a zero/ones/normal(0.02) init of a layer, or loaded weights. Small
          random leaves (< 64 elements) initialised from a similar distribution can go
          undetected.

        Args:
          key: one key (``fp.random.key``); read on the host.
          *sample_args: a sample input (a batch of one is enough), needed for lazy modules.
          **sample_kwargs: keyword arguments of the sample forward.

        Returns:
          The variables ``{"params": {name: tensor}, "buffers": {name: tensor}}``, keyed by
          the module's ``state_dict`` names (tied parameters once, under the first name;
          non-persistent buffers included); no tensor requires grad.

        >>> import functorch_pipeline as fp
        >>> model = fp.functionalize(nn.Sequential(nn.LazyLinear(3), nn.BatchNorm1d(3)))
        >>> v = model.init(fp.random.key(0), torch.zeros(1, 5))
        >>> {k: tuple(t.shape) for k, t in v["params"].items()}
        {'0.weight': (3, 5), '0.bias': (3,), '1.weight': (3,), '1.bias': (3,)}
        >>> list(v["buffers"])
        ['1.running_mean', '1.running_var', '1.num_batches_tracked']
        """
        fn = "init(key, *sample_args)"
        if not _random.is_key(key) or key.dim() != 1:
            raise TypeError(f"{fn}: `key` must be one key from fp.random.key (int64, shape (2,)), got {key!r}")
        seed = _random.seed_from_key(key)
        m = copy_module(self._module)
        lazy = has_lazy(m)
        if self._factory is not None:
            return self._init_from_factory(seed, m, lazy, sample_args, sample_kwargs, fn)
        if lazy and not (sample_args or sample_kwargs):
            names = [n for n, t in (*m.named_parameters(), *m.named_buffers())
                     if isinstance(t, nn.parameter.UninitializedTensorMixin)]
            raise ValueError(f"{fn}: the module has lazy parameters {names}; pass a sample input so "
                             "init can give them shapes, e.g. init(key, x[:1])")
        tensors = [*m.parameters(), *m.buffers(), *(t for t in _tree.leaves((sample_args, sample_kwargs))
                                                    if isinstance(t, torch.Tensor))]
        cuda = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
        with torch.random.fork_rng(devices=cuda):
            torch.random.default_generator.manual_seed(seed)
            for index in cuda:
                torch.cuda.default_generators[index].manual_seed(seed)
            with torch.no_grad():
                if lazy:
                    m.eval()(*sample_args, **sample_kwargs)
                failed: list[str] = []
                covered = _reset_post_order(m, "", failed)
        uncovered = [n for n in self._param_names
                     if not any(n.startswith(f"{c}.") or c == "" for c in covered)]
        if failed:
            warnings.warn(
                f"{fn}: parametrized tensors {failed} could not be re-derived from their reset "
                "draw (the parametrization's right_inverse failed); their originals keep the "
                "module's current values whatever the key. Functionalize a factory, "
                "fp.functionalize(lambda: Net(...)), which constructs the module again under the key.",
                stacklevel=2,
            )
        if not lazy:
            drawn = dict(m.named_parameters())
            custom = [n for n, p in self._module.named_parameters()
                      if n not in uncovered and _not_from_reset(p.detach(), drawn[n].detach())]
            if custom:
                warnings.warn(
                    f"{fn}: parameters {custom} hold values the modules' reset_parameters() "
                    "would not draw (an initialisation in __init__ such as "
                    "self.apply(_init_weights), or loaded weights); init(key) re-draws them with "
                    "the reset methods and loses those values. To replay the module's own "
                    "initialisation under the key, functionalize a factory: "
                    "fp.functionalize(lambda: Net(...)); to keep the current values, use "
                    "model.variables_from_state_dict(module.state_dict()).",
                    stacklevel=2,
                )
        if uncovered:
            warnings.warn(
                f"{fn}: parameters {uncovered} belong to modules without reset_parameters(); they keep "
                "the module's current values whatever the key. Re-draw them with "
                "fp.nn.init.reinitialize(key, variables['params'], {pattern: initializer}).",
                stacklevel=2,
            )
        if self._templates is None:
            self._set_templates(m)
        return {
            "params": {n: p.detach() for n, p in m.named_parameters()},
            "buffers": {n: b.detach() for n, b in m.named_buffers()},
        }

    def _init_from_factory(
        self, seed: int, m: nn.Module, lazy: bool, sample_args: tuple[Any, ...],
        sample_kwargs: dict[str, Any], fn: str,
    ) -> dict[str, dict[str, torch.Tensor]]:
        """``init`` for a factory: construct the module again under the seeded generator."""
        sample = [t for t in _tree.leaves((sample_args, sample_kwargs))
                  if isinstance(t, torch.Tensor)]
        tensors = [*m.parameters(), *m.buffers(), *sample]
        cuda = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
        assert self._factory is not None
        with torch.random.fork_rng(devices=cuda):
            torch.random.default_generator.manual_seed(seed)
            for index in cuda:
                torch.cuda.default_generators[index].manual_seed(seed)
            fresh = self._factory()
            if not isinstance(fresh, nn.Module):
                raise TypeError(f"{fn}: the factory must return an nn.Module, "
                                f"got {type(fresh).__name__}")
            names = ([n for n, _ in fresh.named_parameters()],
                     [n for n, _ in fresh.named_buffers()])
            if names != (self._param_names, self._buffer_names):
                raise ValueError(f"{fn}: the factory built a module with parameters {names[0]} and "
                                 f"buffers {names[1]}, but the first call gave {self._param_names} "
                                 f"and {self._buffer_names}; it must build the same module "
                                 "every time")
            with torch.no_grad():
                if lazy:
                    if not (sample_args or sample_kwargs):
                        raise ValueError(f"{fn}: the module has lazy parameters; pass a "
                                         "sample input so init can give them shapes, "
                                         "e.g. init(key, x[:1])")
                    fresh.eval()(*sample_args, **sample_kwargs)
        if self._templates is None:
            self._set_templates(fresh)
        return {
            "params": {n: p.detach() for n, p in fresh.named_parameters()},
            "buffers": {n: b.detach() for n, b in fresh.named_buffers()},
        }

    # ------------------------------------------------------------------ apply
    def apply(self, variables: Mapping[str, Any], *args: Any, train: bool = False,
              key: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """Run the module as a pure function of ``variables`` and the inputs.

        Args:
          variables: ``{"params": {name: tensor}, "buffers": {name: tensor}}`` keyed by
            ``state_dict`` names, as ``init`` returns; ``"buffers"`` may be left out for a
            module without buffers.
          *args: the module's positional inputs.
          train: run every submodule in train mode (dropout on, BatchNorm on batch
            statistics) or, by default, in eval mode. This is an argument, not module state.
          key: drives dropout and other random layers from ``fp.random``, never from
            PyTorch's global generator: one key ``(2,)`` for the whole batch, or a key batch
            ``(N, 2)``, one key per example on axis 0 of the inputs (so a batch run equals a
            loop over examples, and ``per_sample_grads`` with per-example keys equals a
            Python loop). Under ``vmap`` a mapped key gives each mapped call its own masks
            (``torch.func``'s ``randomness="different"``), an unmapped key the same masks
            (``"same"``); vmap's default ``randomness="error"`` is fine either way. Needed
            when ``train=True`` and the model has random layers. With a key batch,
            ``apply(v, x, key=keys)`` equals concatenating ``apply(v, x[n:n+1],
            key=keys[n:n+1])`` over ``n``.
          **kwargs: the module's keyword inputs (``train`` and ``key`` are taken by apply).

        Returns:
          The module's output; with ``train=True``, always ``(output, new_buffers)``
          (``new_buffers`` is ``{}`` without buffers), as Flax's ``apply(...,
          mutable=[...])`` returns a pair: the result's shape never depends on the model.
          Inputs are never modified (the module runs on copies of the buffers).

        Raises:
          ValueError: variables with missing or unexpected names, or wrong shapes.
          RuntimeError: a random layer in train mode without ``key``; BatchNorm in train
            mode under per-sample gradients: under ``vmap`` over examples each example is
            its own batch of one, so batch statistics and the in-place running-stat update
            would be wrong (an ensemble, which maps the variables too, is fine). Replace
            BatchNorm with GroupNorm (``fp.nn.replace_batchnorm_with_groupnorm``).

        >>> import functorch_pipeline as fp
        >>> model = fp.functionalize(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)))
        >>> v = model.init(fp.random.key(0))
        >>> x = torch.ones(2, 4)
        >>> torch.equal(model.apply(v, x), model.apply(v, x))
        True
        >>> out, new_buffers = model.apply(v, x, train=True, key=fp.random.key(1))
        >>> out.shape, new_buffers
        (torch.Size([2, 4]), {})
        """
        fn = "apply(variables, *args, train, key)"
        params, buffers = self._split(variables, fn)
        if key is not None and not (_random.is_key(key) and key.dim() in (1, 2)):
            raise TypeError(f"{fn}: `key` must be a key (int64, shape (2,)) or a key batch (int64, shape (N, 2)), "
                            f"got {key!r}")
        # NOTE [BatchNorm and per-sample gradients]; not traceable (NOTE [apply under torch.compile])
        if train and self._stat_norms and not torch.compiler.is_compiling():
            inputs = vmap_levels(_tree.leaves((args, kwargs)))
            for paths, names, error in self._stat_norms:
                if inputs - vmap_levels({**params, **buffers}[n] for n in names):
                    raise error(fn, paths)
        # Copies in both modes: a module that updates a buffer in place in eval mode too (a
        # call counter, an EMA) wrote into the caller's variables, so the same inputs gave
        # another output the next call (and a DPTrainer step changed the old state's buffers).
        buffers = {n: b.clone() for n, b in buffers.items()}
        assert self._templates is not None
        template = self._templates[bool(train)]
        tensors = {**params, **buffers}
        left: dict[str, Any] = {}
        handle = None
        if train and buffers and torch.compiler.is_compiling():  # NOTE [apply under torch.compile]
            return self._apply_train_compiling(template, tensors, buffers, args, kwargs, key, fn)
        if train and buffers:  # NOTE [train returns buffers]: read them before functional_call exits
            def read_buffers(module: nn.Module, inputs: Any, output: Any) -> None:
                left.clear()
                left.update(module.named_buffers(remove_duplicate=False))

            handle = template.register_forward_hook(read_buffers)
        self._binding.depth += 1  # NOTE [modules run after apply returns]
        try:
            if train or key is not None:
                with KeyedRandomness(key, fn, self._no_key_hint):
                    out = torch.func.functional_call(template, tensors, args, kwargs, tie_weights=True,
                                                     strict=False)
            else:
                out = torch.func.functional_call(template, tensors, args, kwargs, tie_weights=True, strict=False)
        finally:
            self._binding.depth -= 1
            if handle is not None:
                handle.remove()
        if not train:
            return out
        new_buffers = {n: left[n] if isinstance(left.get(n), torch.Tensor) else b for n, b in buffers.items()}
        return out, new_buffers

    def _apply_train_compiling(self, template: nn.Module, tensors: dict[str, Any],
                               buffers: dict[str, Any], args: tuple[Any, ...],
                               kwargs: dict[str, Any], key: torch.Tensor | None,
                               fn: str) -> tuple[Any, dict[str, Any]]:
        """``apply(train=True)`` of a module with buffers while Dynamo traces (NOTE [apply
        under torch.compile]): the buffers are read inside the reparametrization instead of
        by a forward hook registered for the call."""
        self._binding.depth += 1  # NOTE [modules run after apply returns]
        try:
            with KeyedRandomness(key, fn, self._no_key_hint), \
                    _reparametrize_module(template, tensors, tie_weights=True, strict=False):
                out = template(*args, **kwargs)
                left = dict(template.named_buffers(remove_duplicate=False))
        finally:
            self._binding.depth -= 1
        new_buffers = {n: left[n] if isinstance(left.get(n), torch.Tensor) else b for n, b in buffers.items()}
        return out, new_buffers

    # ------------------------------------------------------------------ state_dict interop
    def variables_from_state_dict(self, state_dict: Mapping[str, Any], *,
                                  strict: bool = True) -> dict[str, dict[str, torch.Tensor]]:
        """Variables from a ``state_dict`` (the module's, or a ``torch.load``-ed checkpoint).

        Tensors are copied (detached), so the variables share no memory with
        ``state_dict``, and cast to the module's dtype and device, as
        ``module.load_state_dict`` copies a float32 checkpoint into a float64 module. Non-persistent buffers are not in a ``state_dict``; they are copied
        from the module. For tied parameters any of the names may be given; when several
        are, they must be equal.

        Args:
          state_dict: ``{name: tensor}`` with ``module.state_dict()``'s keys.
          strict: if ``False``, unexpected keys are ignored and missing entries are copied
            from the module; if ``True`` (default), both are errors.

        Returns:
          ``{"params": ..., "buffers": ...}``.

        >>> net = nn.Linear(2, 1)
        >>> model = functionalize(net)
        >>> v = model.variables_from_state_dict(net.state_dict())
        >>> torch.equal(v["params"]["weight"], net.weight)
        True
        """
        fn = "variables_from_state_dict(state_dict)"
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"{fn}: `state_dict` must be a mapping of names to tensors, got {type(state_dict).__name__}")
        known = {key for key, _, _ in self._state_keys}
        unexpected = [k for k in state_dict if k not in known]
        out: dict[str, dict[str, Any]] = {"params": {}, "buffers": {}}
        keys_of: dict[str, list[str]] = {}
        current = dict((*self._module.named_parameters(), *self._module.named_buffers()))
        for key, collection, name in self._state_keys:
            keys_of.setdefault(name, []).append(key)
            if key not in state_dict:
                continue
            value = state_dict[key]
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{fn}: entry `{key}` is a {type(value).__name__}, not a tensor")
            # As load_state_dict (which copies into the module's tensors): the module's
            # dtype and device, whatever the checkpoint's.
            own = current[name]
            if not isinstance(own, nn.parameter.UninitializedTensorMixin):
                value = value.to(dtype=own.dtype, device=own.device)
            seen = out[collection].get(name)
            if seen is not None and not torch.equal(seen, value):
                raise ValueError(f"{fn}: `{key}` is tied to `{name}` in the module but the state_dict holds different values")
            out[collection].setdefault(name, value.detach().clone())
        missing = [n for n in (*self._param_names, *self._buffer_names)
                   if n not in out["params"] and n not in out["buffers"] and n not in self._nonpersistent]
        if strict and (missing or unexpected):
            raise ValueError(f"{fn}: the state_dict does not match the module: missing "
                             f"{[keys_of[n][0] for n in missing] or 'nothing'}, unexpected {unexpected or 'nothing'}")
        for n in (*missing, *self._nonpersistent):
            t = current[n]
            if isinstance(t, nn.parameter.UninitializedTensorMixin):
                raise ValueError(f"{fn}: `{n}` is missing and the module's own is still lazy (uninitialised)")
            out["params" if n in self._trainable else "buffers"][n] = t.detach().clone()
        ordered = {
            "params": {n: out["params"][n] for n in self._param_names},
            "buffers": {n: out["buffers"][n] for n in self._buffer_names},
        }
        self._split(ordered, fn)  # shapes (and a lazy module's materialisation)
        return ordered

    def to_state_dict(self, variables: Mapping[str, Any]) -> OrderedDict[str, torch.Tensor]:
        """``variables`` as a ``state_dict`` of the module: same keys and order, tied
        aliases included, non-persistent buffers left out. Tensors are detached views of
        the variables (no copy), as ``module.state_dict()`` returns views of its tensors.

        Args:
          variables: ``{"params": ..., "buffers": ...}`` as made by :meth:`init`.

        Returns:
          An ``OrderedDict`` with the module's ``state_dict`` keys, in its order.

        Examples:
          >>> net = nn.Linear(2, 1)
          >>> model = functionalize(net)
          >>> list(model.to_state_dict(model.variables_from_state_dict(net.state_dict())))
          ['weight', 'bias']
        """
        params, buffers = self._split(variables, "to_state_dict(variables)")
        return OrderedDict((key, (params if c == "params" else buffers)[name].detach())
                           for key, c, name in self._state_keys)

    def to_module(self, variables: Mapping[str, Any], module: nn.Module | None = None) -> nn.Module:
        """Write ``variables`` into a module.

        Args:
          variables: the variables to write.
          module: the module to load them into, in place (the one mutating use, asked for
            explicitly). By default a new copy of the wrapped module is made; the wrapped
            module itself is never touched.

        Returns:
          The module holding copies of the variables' values.

        >>> import functorch_pipeline as fp
        >>> model = fp.functionalize(nn.Linear(2, 1))
        >>> v = model.init(fp.random.key(0))
        >>> torch.equal(model.to_module(v).weight, v["params"]["weight"])
        True
        """
        fn = "to_module(variables, module)"
        params, buffers = self._split(variables, fn)
        target = copy_module(self._module) if module is None else module
        if not isinstance(target, nn.Module):
            raise TypeError(f"{fn}: `module` must be an nn.Module, got {type(target).__name__}")
        try:
            with torch.no_grad():
                target.load_state_dict(self.to_state_dict(variables), strict=True)
                for n in self._nonpersistent:
                    prefix, local = _owner(n)
                    owner = target.get_submodule(prefix)
                    owner._buffers[local] = buffers[n].detach().clone()
        except (RuntimeError, AttributeError) as e:
            raise ValueError(f"{fn}: the variables do not fit `module`: {e}") from None
        return target

    def __repr__(self) -> str:
        return f"FunctionalModel({type(self._module).__name__}, params={len(self._param_names)}, buffers={len(self._buffer_names)})"


# NOTE [custom init]
# Reset methods are the only initialisation init(key) can re-run on an instance. A value
# that the reset cannot have drawn means something else initialised the parameter (a
# custom init in __init__, or loaded weights), and re-drawing it would lose that silently.
# The test is conservative (false alarms must be rare): a deterministic reset (the draw is
# constant, e.g. LayerNorm's ones) must be matched exactly; a random reset never gives a
# constant; otherwise a two-sample KS test at level 1e-6 on up to 4096 elements of each.
_KS_MIN = 64
_KS_MAX = 4096
_KS_C = math.sqrt(-math.log(1e-6 / 2) / 2)  # the KS critical value c(alpha) for alpha=1e-6


def _not_from_reset(current: torch.Tensor, drawn: torch.Tensor) -> bool:
    """Whether ``current`` cannot be a draw of the reset that gave ``drawn``."""
    if (isinstance(current, nn.parameter.UninitializedTensorMixin) or current.shape != drawn.shape
            or current.numel() == 0 or not current.is_floating_point()):
        return False
    a, b = current.detach().reshape(-1), drawn.detach().reshape(-1).to(current.device)
    if b.numel() == 1:  # one draw cannot tell a random reset from a deterministic one
        return False
    if bool((b == b[0]).all()):  # a deterministic reset (ones, zeros, a constant)
        return not torch.equal(a, b)
    if bool((a == a[0]).all()):
        return True
    if a.numel() < _KS_MIN:
        return False
    step = -(-a.numel() // _KS_MAX)  # subsample first: no full float64 copy of a big leaf
    a = a[::step].to("cpu", torch.float64).sort().values
    b = b[::step].to("cpu", torch.float64).sort().values
    both = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, both, right=True) / a.numel()
    cdf_b = torch.searchsorted(b, both, right=True) / b.numel()
    d = float((cdf_a - cdf_b).abs().max())
    return d > _KS_C * math.sqrt(2.0 / a.numel())


# NOTE [init of parametrized tensors]
# On a module with a parametrization (weight_norm, spectral_norm, orthogonal: the
# `torch.nn.utils.parametrize` kind), `self.weight` is recomputed from
# `parametrizations.weight.original*` at each access, so a reset method's in-place draw
# into it is lost and init(key) returned the current originals for every key. The reset
# runs instead on the module with its class switched back to the unparametrized one and
# each parametrized tensor as a plain tensor (the module as it was before the
# parametrization was registered); the drawn values are then assigned to the
# parametrized module, which re-derives the originals through the parametrizations'
# `right_inverse`, as `register_parametrization` does at construction. spectral_norm's
# power-iteration vectors are drawn and iterated again as its constructor does (else
# eval mode would use vectors of the old weight). A tensor that cannot be re-derived
# this way keeps its current values and is named in a warning.


def _redraw_parametrized(m: nn.Module, reset: Callable[[], Any], prefix: str,
                         failed: list[str]) -> None:
    """Run ``reset`` on the unparametrized form of ``m`` (NOTE [init of parametrized tensors])."""
    lists = m.parametrizations
    cls = type(m)
    plain: dict[str, torch.Tensor] = {}
    for name, plist in lists.items():
        value = getattr(m, name).detach().clone()
        is_param = any(isinstance(t, nn.Parameter) for t in plist._parameters.values())
        plain[name] = nn.Parameter(value, requires_grad=False) if is_param else value
    m.__class__ = cls.__bases__[0]  # register_parametrization's injected subclass
    try:
        for name, t in plain.items():
            (m._parameters if isinstance(t, nn.Parameter) else m._buffers)[name] = t
        reset()
    finally:
        for name in plain:
            m._parameters.pop(name, None)
            m._buffers.pop(name, None)
        m.__class__ = cls
    for name, t in plain.items():
        try:
            setattr(m, name, t.detach())
            for p in lists[name]:
                if all(hasattr(p, a) for a in ("_u", "_v", "_power_method", "_reshape_weight_to_matrix")):
                    p._u.normal_(0, 1).copy_(nn.functional.normalize(p._u, dim=0, eps=p.eps))
                    p._v.normal_(0, 1).copy_(nn.functional.normalize(p._v, dim=0, eps=p.eps))
                    p._power_method(p._reshape_weight_to_matrix(t), 15)
        except Exception:  # noqa: BLE001 - any failure of a third-party right_inverse
            failed.append(f"{prefix}.{name}" if prefix else name)


def _reset_post_order(m: nn.Module, prefix: str, failed: list[str] | None = None) -> list[str]:
    """Run reset methods children-first; return the paths whose subtree was reset.

    Parametrized tensors are re-drawn too (NOTE [init of parametrized tensors]); those that
    cannot be are appended to ``failed``.
    """
    failed = [] if failed is None else failed
    covered: list[str] = []
    for name, child in m.named_children():
        covered += _reset_post_order(child, f"{prefix}.{name}" if prefix else name, failed)
    reset = getattr(m, "reset_parameters", None) or getattr(m, "_reset_parameters", None)
    if callable(reset):
        if torch.nn.utils.parametrize.is_parametrized(m):
            _redraw_parametrized(m, reset, prefix, failed)
        else:
            reset()
        covered.append(prefix)
    return covered


def functionalize(module: nn.Module | Callable[[], nn.Module]) -> FunctionalModel:
    """A pure view of ``module``: ``init(key, *sample)`` -> variables and
    ``apply(variables, *inputs, train=False, key=None)`` -> output.

    Args:
      module: any ``nn.Module``; it is never modified. Or a factory, a zero-argument
        callable returning the module (``lambda: GPT2(config)``): it is called once now,
        and ``init(key)`` calls it again under the key, so an initialisation done in the
        module's ``__init__`` is replayed (NOTE [custom init]).

    Returns:
      A :class:`FunctionalModel` (a ``FunctionalModel`` is returned as it is).

    >>> import functorch_pipeline as fp
    >>> net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 2))
    >>> model = fp.functionalize(net)
    >>> variables = model.init(fp.random.key(0))
    >>> x = torch.randn(5, 3)
    >>> model.apply(variables, x).shape
    torch.Size([5, 2])
    >>> grads = fp.grad(lambda p: model.apply({"params": p}, x).sum())(variables["params"])
    >>> sorted(grads) == sorted(variables["params"])
    True

    Notes:
      NOTE [custom init]: ``init(key)`` re-runs reset methods only; a parameter value the reset
        cannot have drawn (a custom init in ``__init__`` or loaded weights) triggers a warning
        that ``init`` re-draws it; functionalize a factory (``lambda: Net(...)``) to replay it.
    """
    if isinstance(module, FunctionalModel):
        return module
    if callable(module) and not isinstance(module, nn.Module):
        try:
            inspect.signature(module).bind()
        except (TypeError, ValueError):
            raise TypeError("functionalize(module): `module` must be an nn.Module or a "
                            f"zero-argument factory returning one, got {module!r}") from None
        built = module()
        if not isinstance(built, nn.Module):
            raise TypeError("functionalize(module): a factory must return an nn.Module, got "
                            f"{type(built).__name__}")
        return FunctionalModel(built, factory=module)
    return FunctionalModel(module)
