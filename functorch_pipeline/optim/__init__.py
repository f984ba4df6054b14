"""``fp.optim``: pure optimizers in optax's style (names, arguments and defaults).

A :class:`GradientTransformation` is ``(init, update)``; named optimizers are chains of
building blocks; updates are additive (apply them with :func:`apply_updates`). Every
named optimizer that ``torch.optim`` also has reproduces its trajectory with the
arguments given in its docstring.

>>> import torch
>>> from functorch_pipeline import optim
>>> params = {"w": torch.tensor([1.0, -2.0])}
>>> opt = optim.chain(optim.clip_by_global_norm(1.0), optim.sgd(0.1))
>>> state = opt.init(params)
>>> updates, state = opt.update({"w": torch.tensor([3.0, 4.0])}, state, params)
>>> optim.apply_updates(params, updates)
{'w': tensor([ 0.9400, -2.0800])}

Bad input
---------
Before any fused or foreach kernel runs, every leaf of the gradients, the state and the
parameters is checked for shape, dtype and device (cheap: Python metadata, no host
sync; it also runs under ``torch.compile``), and a state must come from this
optimizer's ``init``. Errors name the API, the key path and expected vs got. Dtypes are
not promoted: cast float64 gradients of float32 parameters first.

>>> opt = optim.adam(1e-3)
>>> opt.update({"w": torch.ones(2, 3)}, opt.init({"w": torch.zeros(3, 2)}))
Traceback (most recent call last):
ValueError: scale_by_adam.update: leaf at path `w` has shape (2, 3) in `updates` but (3, 2) in ...

Differentiating through updates
-------------------------------
Updates are differentiable (meta-learning, hypergradients): ``fp.grad``,
``torch.autograd.grad(create_graph=True)``, ``vmap`` of either, and ``jvp``. The fast
paths below switch themselves off while something is differentiated, and
``inplace=True`` then takes the pure path (``apply_updates_`` refuses: use
``apply_updates``). Through ``inject_hyperparams``, learning rates, momenta and weight
decays are differentiable inputs; they are stored in float64. For Adam-type
optimizers, set ``eps_root`` (e.g. 1e-12 in float64) when inner gradients can be exactly
zero, or the meta-gradient is NaN (as in optax).

Speed and memory
----------------
Updates run as multi-tensor ``torch._foreach_*`` kernels (adam/adamw use torch's
single-pass fused Adam kernel), so the pure path costs about what ``torch.optim`` does.
Two things matter for large models:

* **Donation.** ``opt.update(grads, state, params, inplace=True)`` followed by
  ``optim.apply_updates_(params, updates)`` reuses the state, gradient and parameter
  buffers instead of allocating new ones (same numbers, bit for bit). After such a call
  the passed ``grads`` and old ``state`` belong to the optimizer: do not reuse them.
* **glibc malloc.** The pure path allocates fresh parameter-sized tensors every step.
  glibc serves big blocks with ``mmap`` and returns them on ``free``, so each step
  page-faults its memory back in (thousands of faults; up to 2x slower on CPU). Setting
  ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=268435456`` in the
  environment before starting Python keeps those blocks in the heap (see
  ``benchmarks/optimizer_update.py``, which reports faults per step).
"""

from functorch_pipeline.optim._adaptive import ScaleByAdaDeltaState
from functorch_pipeline.optim._adaptive import ScaleByAdamState
from functorch_pipeline.optim._adaptive import ScaleByLionState
from functorch_pipeline.optim._adaptive import ScaleByNadamState
from functorch_pipeline.optim._adaptive import ScaleByRmsState
from functorch_pipeline.optim._adaptive import ScaleByRssState
from functorch_pipeline.optim._adaptive import ScaleByRStdDevState
from functorch_pipeline.optim._adaptive import scale_by_adadelta
from functorch_pipeline.optim._adaptive import scale_by_adam
from functorch_pipeline.optim._adaptive import scale_by_adamax
from functorch_pipeline.optim._adaptive import scale_by_lion
from functorch_pipeline.optim._adaptive import scale_by_nadam
from functorch_pipeline.optim._adaptive import scale_by_radam
from functorch_pipeline.optim._adaptive import scale_by_rms
from functorch_pipeline.optim._adaptive import scale_by_rss
from functorch_pipeline.optim._adaptive import scale_by_stddev
from functorch_pipeline.optim._alias import adadelta
from functorch_pipeline.optim._alias import adagrad
from functorch_pipeline.optim._alias import adam
from functorch_pipeline.optim._alias import adamax
from functorch_pipeline.optim._alias import adamw
from functorch_pipeline.optim._alias import lamb
from functorch_pipeline.optim._alias import lion
from functorch_pipeline.optim._alias import nadam
from functorch_pipeline.optim._alias import radam
from functorch_pipeline.optim._alias import rmsprop
from functorch_pipeline.optim._alias import sgd
from functorch_pipeline.optim._alias_more import adabelief
from functorch_pipeline.optim._alias_more import adafactor
from functorch_pipeline.optim._alias_more import adamaxw
from functorch_pipeline.optim._alias_more import amsgrad
from functorch_pipeline.optim._alias_more import fromage
from functorch_pipeline.optim._alias_more import lars
from functorch_pipeline.optim._alias_more import nadamw
from functorch_pipeline.optim._alias_more import noisy_sgd
from functorch_pipeline.optim._alias_more import novograd
from functorch_pipeline.optim._alias_more import optimistic_gradient_descent
from functorch_pipeline.optim._alias_more import rprop
from functorch_pipeline.optim._alias_more import sign_sgd
from functorch_pipeline.optim._alias_more import yogi
from functorch_pipeline.optim._base import EmptyState
from functorch_pipeline.optim._base import GradientTransformation
from functorch_pipeline.optim._base import GradientTransformationExtraArgs
from functorch_pipeline.optim._base import OptState
from functorch_pipeline.optim._base import Params
from functorch_pipeline.optim._base import ScalarOrSchedule
from functorch_pipeline.optim._base import Schedule
from functorch_pipeline.optim._base import Updates
from functorch_pipeline.optim._base import apply_updates
from functorch_pipeline.optim._base import apply_updates_
from functorch_pipeline.optim._base import chain
from functorch_pipeline.optim._base import identity
from functorch_pipeline.optim._base import set_to_zero
from functorch_pipeline.optim._base import stateless
from functorch_pipeline.optim._base import stateless_with_tree_map
from functorch_pipeline.optim._contrib import ReduceLROnPlateauState
from functorch_pipeline.optim._contrib import reduce_on_plateau
from functorch_pipeline.optim._factorized import FactoredState
from functorch_pipeline.optim._factorized import clip_by_block_rms
from functorch_pipeline.optim._factorized import scale_by_factored_rms
from functorch_pipeline.optim._factorized import scale_by_param_block_norm
from functorch_pipeline.optim._factorized import scale_by_param_block_rms
from functorch_pipeline.optim._masking import MaskedNode
from functorch_pipeline.optim._masking import MaskedState
from functorch_pipeline.optim._masking import PartitionState
from functorch_pipeline.optim._masking import freeze
from functorch_pipeline.optim._masking import masked
from functorch_pipeline.optim._masking import multi_transform
from functorch_pipeline.optim._masking import partition
from functorch_pipeline.optim._privacy import AddDPNoiseState
from functorch_pipeline.optim._privacy import DifferentiallyPrivateAggregateState
from functorch_pipeline.optim._privacy import add_dp_noise
from functorch_pipeline.optim._privacy import differentially_private
from functorch_pipeline.optim._privacy import differentially_private_aggregate
from functorch_pipeline.optim._privacy import dpsgd
from functorch_pipeline.optim._privacy import per_example_global_norm_clip
from functorch_pipeline.optim._privacy import per_example_layer_norm_clip
from functorch_pipeline.optim._scalers_more import ScaleByAmsgradState
from functorch_pipeline.optim._scalers_more import ScaleByBeliefState
from functorch_pipeline.optim._scalers_more import ScaleByNovogradState
from functorch_pipeline.optim._scalers_more import ScaleByOptimisticGradientState
from functorch_pipeline.optim._scalers_more import ScaleByRpropState
from functorch_pipeline.optim._scalers_more import ScaleByYogiState
from functorch_pipeline.optim._scalers_more import scale_by_amsgrad
from functorch_pipeline.optim._scalers_more import scale_by_belief
from functorch_pipeline.optim._scalers_more import scale_by_novograd
from functorch_pipeline.optim._scalers_more import scale_by_optimistic_gradient
from functorch_pipeline.optim._scalers_more import scale_by_rprop
from functorch_pipeline.optim._scalers_more import scale_by_sign
from functorch_pipeline.optim._scalers_more import scale_by_yogi
from functorch_pipeline.optim._schedules import constant_schedule
from functorch_pipeline.optim._schedules import cosine_decay_schedule
from functorch_pipeline.optim._schedules import cosine_onecycle_schedule
from functorch_pipeline.optim._schedules import exponential_decay
from functorch_pipeline.optim._schedules import join_schedules
from functorch_pipeline.optim._schedules import linear_schedule
from functorch_pipeline.optim._schedules import piecewise_constant_schedule
from functorch_pipeline.optim._schedules import piecewise_interpolate_schedule
from functorch_pipeline.optim._schedules import polynomial_schedule
from functorch_pipeline.optim._schedules import warmup_cosine_decay_schedule
from functorch_pipeline.optim._schedules_more import linear_onecycle_schedule
from functorch_pipeline.optim._schedules_more import sgdr_schedule
from functorch_pipeline.optim._schedules_more import warmup_constant_schedule
from functorch_pipeline.optim._schedules_more import warmup_exponential_decay_schedule
from functorch_pipeline.optim._transforms import ScaleByScheduleState
from functorch_pipeline.optim._transforms import TraceState
from functorch_pipeline.optim._transforms import add_decayed_weights
from functorch_pipeline.optim._transforms import clip
from functorch_pipeline.optim._transforms import clip_by_global_norm
from functorch_pipeline.optim._transforms import scale
from functorch_pipeline.optim._transforms import scale_by_learning_rate
from functorch_pipeline.optim._transforms import scale_by_schedule
from functorch_pipeline.optim._transforms import scale_by_trust_ratio
from functorch_pipeline.optim._transforms import trace
from functorch_pipeline.optim._updates import global_norm
from functorch_pipeline.optim._updates import incremental_update
from functorch_pipeline.optim._updates import keep_params_nonnegative
from functorch_pipeline.optim._updates import normalize_by_update_norm
from functorch_pipeline.optim._updates import periodic_update
from functorch_pipeline.optim._wrappers import ApplyIfFiniteState
from functorch_pipeline.optim._wrappers import EmaState
from functorch_pipeline.optim._wrappers import InjectHyperparamsState
from functorch_pipeline.optim._wrappers import MultiSteps
from functorch_pipeline.optim._wrappers import MultiStepsState
from functorch_pipeline.optim._wrappers import apply_if_finite
from functorch_pipeline.optim._wrappers import ema
from functorch_pipeline.optim._wrappers import inject_hyperparams
from functorch_pipeline.optim._wrappers_more import AddNoiseState
from functorch_pipeline.optim._wrappers_more import ApplyEvery
from functorch_pipeline.optim._wrappers_more import LookaheadParams
from functorch_pipeline.optim._wrappers_more import LookaheadState
from functorch_pipeline.optim._wrappers_more import ZeroNansState
from functorch_pipeline.optim._wrappers_more import adaptive_grad_clip
from functorch_pipeline.optim._wrappers_more import add_noise
from functorch_pipeline.optim._wrappers_more import apply_every
from functorch_pipeline.optim._wrappers_more import centralize
from functorch_pipeline.optim._wrappers_more import lookahead
from functorch_pipeline.optim._wrappers_more import skip_large_updates
from functorch_pipeline.optim._wrappers_more import skip_not_finite
from functorch_pipeline.optim._wrappers_more import zero_nans

__all__ = [
    "AddDPNoiseState",
    "AddNoiseState",
    "ApplyEvery",
    "ApplyIfFiniteState",
    "DifferentiallyPrivateAggregateState",
    "EmaState",
    "EmptyState",
    "FactoredState",
    "GradientTransformation",
    "GradientTransformationExtraArgs",
    "InjectHyperparamsState",
    "LookaheadParams",
    "LookaheadState",
    "MaskedNode",
    "MaskedState",
    "MultiSteps",
    "MultiStepsState",
    "OptState",
    "Params",
    "PartitionState",
    "ReduceLROnPlateauState",
    "ScalarOrSchedule",
    "ScaleByAdaDeltaState",
    "ScaleByAdamState",
    "ScaleByAmsgradState",
    "ScaleByBeliefState",
    "ScaleByLionState",
    "ScaleByNadamState",
    "ScaleByNovogradState",
    "ScaleByOptimisticGradientState",
    "ScaleByRStdDevState",
    "ScaleByRmsState",
    "ScaleByRpropState",
    "ScaleByRssState",
    "ScaleByScheduleState",
    "ScaleByYogiState",
    "Schedule",
    "TraceState",
    "Updates",
    "ZeroNansState",
    "adabelief",
    "adadelta",
    "adafactor",
    "adagrad",
    "adam",
    "adamax",
    "adamaxw",
    "adamw",
    "adaptive_grad_clip",
    "add_decayed_weights",
    "add_dp_noise",
    "add_noise",
    "amsgrad",
    "apply_every",
    "apply_if_finite",
    "apply_updates",
    "apply_updates_",
    "centralize",
    "chain",
    "clip",
    "clip_by_block_rms",
    "clip_by_global_norm",
    "constant_schedule",
    "cosine_decay_schedule",
    "cosine_onecycle_schedule",
    "differentially_private",
    "differentially_private_aggregate",
    "dpsgd",
    "ema",
    "exponential_decay",
    "freeze",
    "fromage",
    "global_norm",
    "identity",
    "incremental_update",
    "inject_hyperparams",
    "join_schedules",
    "keep_params_nonnegative",
    "lamb",
    "lars",
    "linear_onecycle_schedule",
    "linear_schedule",
    "lion",
    "lookahead",
    "masked",
    "multi_transform",
    "nadam",
    "nadamw",
    "noisy_sgd",
    "normalize_by_update_norm",
    "novograd",
    "optimistic_gradient_descent",
    "partition",
    "per_example_global_norm_clip",
    "per_example_layer_norm_clip",
    "periodic_update",
    "piecewise_constant_schedule",
    "piecewise_interpolate_schedule",
    "polynomial_schedule",
    "radam",
    "reduce_on_plateau",
    "rmsprop",
    "rprop",
    "scale",
    "scale_by_adadelta",
    "scale_by_adam",
    "scale_by_adamax",
    "scale_by_amsgrad",
    "scale_by_belief",
    "scale_by_factored_rms",
    "scale_by_learning_rate",
    "scale_by_lion",
    "scale_by_nadam",
    "scale_by_novograd",
    "scale_by_optimistic_gradient",
    "scale_by_param_block_norm",
    "scale_by_param_block_rms",
    "scale_by_radam",
    "scale_by_rms",
    "scale_by_rprop",
    "scale_by_rss",
    "scale_by_schedule",
    "scale_by_sign",
    "scale_by_stddev",
    "scale_by_trust_ratio",
    "scale_by_yogi",
    "set_to_zero",
    "sgd",
    "sgdr_schedule",
    "sign_sgd",
    "skip_large_updates",
    "skip_not_finite",
    "stateless",
    "stateless_with_tree_map",
    "trace",
    "warmup_constant_schedule",
    "warmup_cosine_decay_schedule",
    "warmup_exponential_decay_schedule",
    "yogi",
    "zero_nans",
]
