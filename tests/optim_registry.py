"""The registry of optimizer configurations every property test runs over (shared by
``test_optim_registry.py``, ``test_optim_validation.py``, ``test_optim_differentiable.py``
and the subprocess checker ``optim_bad_inputs.py``)."""

import torch

import functorch_pipeline as fp
from functorch_pipeline import optim

F64 = torch.float64


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "fc": {"w": torch.randn(3, 2, generator=g, dtype=F64), "b": torch.randn(2, generator=g, dtype=F64)},
        "s": torch.randn((), generator=g, dtype=F64),
    }


def _grads(step, member=0):
    return fp.tree.scale(_params(100 + 7 * step + 31 * member), 1.0)


def _sched():
    return optim.warmup_cosine_decay_schedule(0.0, 0.1, 2, 10)


def _plateau():
    """reduce_on_plateau needs ``value=``: feed it the gradients' squared norm."""
    tx = optim.chain(optim.adam(1e-2), optim.reduce_on_plateau(factor=0.5, patience=1))

    def update(updates, state, params=None, **kw):
        value = sum((x * x).sum() for x in fp.tree.leaves(updates))
        return tx.update(updates, state, params, value=value, **kw)

    return optim.GradientTransformation(tx.init, update)


REGISTRY = {
    "sgd": lambda: optim.sgd(0.1),
    "sgd_nesterov": lambda: optim.sgd(0.1, 0.9, True),
    "sgd_dampening": lambda: optim.sgd(0.1, 0.9, dampening=0.2),
    "sgd_schedule": lambda: optim.sgd(_sched(), 0.5),
    "adam": lambda: optim.adam(1e-2),
    "adam_nesterov_eps_root": lambda: optim.adam(1e-2, eps_root=1e-8, nesterov=True),
    "adam_mu_dtype": lambda: optim.adam(1e-2, mu_dtype=torch.float32),
    "adamw": lambda: optim.adamw(1e-2, weight_decay=0.1),
    "adamw_schedule": lambda: optim.adamw(_sched()),
    "nadam": lambda: optim.nadam(1e-2),
    "nadam_torch": lambda: optim.nadam(1e-2, momentum_decay=4e-3),
    "radam": lambda: optim.radam(1e-2),
    "adamax": lambda: optim.adamax(1e-2),
    "rmsprop": lambda: optim.rmsprop(1e-2),
    "rmsprop_centered": lambda: optim.rmsprop(1e-2, centered=True, momentum=0.9, bias_correction=True),
    "adagrad": lambda: optim.adagrad(1e-1),
    "adadelta": lambda: optim.adadelta(1.0, weight_decay=0.01),
    "lion": lambda: optim.lion(1e-2),
    "lamb": lambda: optim.lamb(1e-2, weight_decay=0.01),
    "clipping": lambda: optim.chain(optim.clip(0.5), optim.clip_by_global_norm(1.0), optim.adam(1e-2)),
    "trust_ratio": lambda: optim.chain(optim.scale_by_trust_ratio(), optim.scale(-0.1)),
    "masked": lambda: optim.masked(optim.adam(1e-2), {"fc": {"w": True, "b": False}, "s": True}),
    "partition": lambda: optim.partition(
        {"a": optim.adam(1e-2), "b": optim.sgd(0.1, 0.9)}, lambda path, leaf: "a" if leaf.dim() == 2 else "b"
    ),
    "freeze": lambda: optim.chain(optim.freeze({"fc": True, "s": False}), optim.sgd(0.1)),
    "decay_mask": lambda: optim.adamw(1e-2, mask={"fc": {"w": True, "b": False}, "s": False}),
    "multi_steps": lambda: optim.MultiSteps(optim.adam(1e-2), 2).gradient_transformation(),
    "apply_if_finite": lambda: optim.apply_if_finite(optim.adam(1e-2), 3),
    "inject_hyperparams": lambda: optim.inject_hyperparams(optim.adamw)(learning_rate=_sched(), weight_decay=0.1),
    "ema": lambda: optim.chain(optim.ema(0.9), optim.scale(-0.1)),
    # issue 14 part B: optax 0.2.8 completeness
    "amsgrad": lambda: optim.amsgrad(1e-2),
    "amsgrad_torch": lambda: optim.amsgrad(1e-2, debias_after_max=True),
    "adabelief": lambda: optim.adabelief(1e-2),
    "adabelief_nesterov": lambda: optim.adabelief(1e-2, nesterov=True),
    "adamaxw": lambda: optim.adamaxw(1e-2, weight_decay=0.1),
    "nadamw": lambda: optim.nadamw(1e-2, weight_decay=0.1),
    "lars": lambda: optim.lars(1e-1, weight_decay=0.01, trust_ratio_mask={"fc": True, "s": False}),
    "novograd": lambda: optim.novograd(1e-2, weight_decay=0.01),
    "yogi": lambda: optim.yogi(1e-2),
    "sign_sgd": lambda: optim.sign_sgd(1e-2),
    "rprop": lambda: optim.rprop(1e-2),
    "adafactor": lambda: optim.adafactor(
        1e-2, min_dim_size_to_factor=2, momentum=0.9, weight_decay_rate=0.01
    ),
    "noisy_sgd": lambda: optim.noisy_sgd(1e-2, key=1),
    "fromage": lambda: optim.fromage(1e-2),
    "optimistic_gd": lambda: optim.optimistic_gradient_descent(1e-2, 1.0, 0.5),
    "param_block_norm": lambda: optim.chain(optim.scale_by_param_block_norm(), optim.sgd(0.1)),
    "nonnegative": lambda: optim.chain(optim.sgd(0.1), optim.keep_params_nonnegative()),
    "normalize_by_update_norm": lambda: optim.chain(
        optim.normalize_by_update_norm(), optim.sgd(0.1)
    ),
    "lion_smooth": lambda: optim.chain(
        optim.scale_by_lion(mode="smooth", smooth_beta=2.0), optim.scale_by_learning_rate(1e-2)
    ),
    "lion_refined": lambda: optim.chain(
        optim.scale_by_lion(mode="refined"), optim.scale_by_learning_rate(1e-2)
    ),
    "zero_nans": lambda: optim.chain(optim.zero_nans(), optim.sgd(0.1)),
    "add_noise": lambda: optim.chain(optim.add_noise(0.01, 0.55, key=0), optim.sgd(0.1)),
    "apply_every": lambda: optim.chain(optim.apply_every(2), optim.sgd(0.1, 0.9)),
    "centralize": lambda: optim.chain(optim.centralize(), optim.adam(1e-2)),
    "adaptive_grad_clip": lambda: optim.chain(optim.adaptive_grad_clip(0.1), optim.sgd(0.1)),
    "multi_transform": lambda: optim.multi_transform(
        # NOTE: not {"fc": "a", "s": "b"}: a dict subtree masked as a whole does not
        # compile (fullgraph) -- Dynamo's pytree polyfill, also true of plain masked()
        {"a": optim.yogi(1e-2), "b": optim.sgd(0.1)}, {"fc": {"w": "a", "b": "b"}, "s": "a"},
        mask_compatible_extra_args=True,
    ),
    "multi_steps_acc_dtype": lambda: optim.MultiSteps(
        optim.adam(1e-2), 2, accumulator_dtype=torch.float64
    ).gradient_transformation(),
    "reduce_on_plateau": _plateau,
    "stateless": lambda: optim.chain(
        optim.stateless_with_tree_map(lambda g, p: 0.5 * g + 0.01 * p), optim.scale_by_learning_rate(0.1)
    ),
}
