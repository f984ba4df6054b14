"""``fp.losses``: per-example (unreduced) losses in optax's style.

Every loss returns one value per example (or per element for the regression losses);
reduce with ``.mean()`` yourself. Each matches ``torch.nn.functional`` with
``reduction="none"``; where optax and PyTorch disagree it is said below:

* the class axis is the **last** one (``axis=-1``, JAX) rather than torch's axis 1;
  pass ``axis=1`` for ``(N, C, d1, ...)`` logits;
* :func:`l2_loss` is optax's ``0.5 * (p - t)**2``, half of torch's ``mse_loss``
  (which is :func:`squared_error`);
* :func:`kl_divergence` sums over the class axis (optax); ``F.kl_div(...,
  reduction="none")`` is elementwise and ``reduction="batchmean"`` is the mean over the
  batch of our values;
* :func:`huber_loss` is ``F.huber_loss`` (not ``F.smooth_l1_loss``, which divides by delta).

No function branches on tensor values: they run under ``vmap`` (per-sample gradients)
and ``torch.compile``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "cross_entropy",
    "huber_loss",
    "kl_divergence",
    "l2_loss",
    "nll",
    "sigmoid_binary_cross_entropy",
    "smooth_labels",
    "softmax_cross_entropy",
    "squared_error",
]


def _check_labels(fn: str, logits: torch.Tensor, labels: torch.Tensor, axis: int) -> None:
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(
            f"{fn}: `labels` must be integer class indices, got dtype {labels.dtype}; "
            "for one-hot or probability targets use softmax_cross_entropy"
        )
    want = tuple(s for i, s in enumerate(logits.shape) if i != axis % logits.dim())
    if tuple(labels.shape) != want:
        raise ValueError(
            f"{fn}: `labels` must have the shape of `logits` without the class axis {axis}, "
            f"i.e. {want}, got {tuple(labels.shape)}"
        )


def smooth_labels(labels: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(1 - alpha) * labels + alpha / num_classes`` over the last axis (optax's name).

    Args:
      labels: one-hot or probability targets (classes last).
      alpha: the smoothing weight.

    Returns:
      The smoothed targets.

    >>> smooth_labels(torch.tensor([0.0, 1.0]), 0.2)
    tensor([0.1000, 0.9000])
    """
    return (1.0 - alpha) * labels + alpha / labels.shape[-1]


def nll(log_probs: torch.Tensor, labels: torch.Tensor, axis: int = -1) -> torch.Tensor:
    """Negative log-likelihood ``-log_probs[label]`` of integer labels (``F.nll_loss``).

    Args:
      log_probs: log-probabilities, classes on ``axis``.
      labels: integer class indices.
      axis: the class axis.

    Returns:
      The loss of each example.

    >>> nll(torch.log(torch.tensor([[0.25, 0.75]])), torch.tensor([1]))
    tensor([0.2877])
    """
    _check_labels("nll(log_probs, labels)", log_probs, labels, axis)
    idx = labels.unsqueeze(axis % log_probs.dim()).to(torch.int64)
    return -torch.gather(log_probs, axis, idx).squeeze(axis % log_probs.dim())


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, axis: int = -1, *, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Softmax cross entropy with integer labels, one value per example.

    optax's ``softmax_cross_entropy_with_integer_labels``; equals
    ``F.cross_entropy(logits, labels, reduction="none", label_smoothing=...)`` (for
    ``(N, C)`` logits; torch's class axis is 1, ours ``axis=-1``).

    Args:
      logits: unnormalised scores, classes on ``axis``.
      labels: integer class indices, the shape of ``logits`` without ``axis``.
      axis: the class axis.
      label_smoothing: mix the one-hot target with the uniform distribution.

    Returns:
      The loss of each example: the shape of ``labels``.

    >>> cross_entropy(torch.tensor([[0.0, 0.0]]), torch.tensor([0]))
    tensor([0.6931])
    """
    _check_labels("cross_entropy(logits, labels)", logits, labels, axis)
    logp = torch.log_softmax(logits, dim=axis)
    loss = nll(logp, labels, axis)
    if label_smoothing:
        uniform = -logp.mean(dim=axis)
        loss = (1 - label_smoothing) * loss + label_smoothing * uniform
    return loss


def softmax_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, axis: int = -1, *, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Cross entropy against a distribution (one-hot or probabilities) per example.

    Equals ``F.cross_entropy(logits, probs, reduction="none", label_smoothing=...)``.

    Args:
      logits: unnormalised scores, classes on ``axis``.
      labels: a distribution per example, the shape of ``logits``.
      axis: the class axis.
      label_smoothing: mix the targets with the uniform distribution.

    Returns:
      The loss of each example.

    >>> softmax_cross_entropy(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.5, 0.5]]))
    tensor([0.6931])
    """
    if labels.shape != logits.shape:
        raise ValueError(
            f"softmax_cross_entropy(logits, labels): `labels` must have the shape of `logits` "
            f"{tuple(logits.shape)}, got {tuple(labels.shape)}; integer labels go to cross_entropy"
        )
    if label_smoothing:
        labels = (1.0 - label_smoothing) * labels + label_smoothing / labels.shape[axis]
    return -(labels * torch.log_softmax(logits, dim=axis)).sum(dim=axis)


def sigmoid_binary_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Elementwise binary cross entropy on logits (``F.binary_cross_entropy_with_logits``).

    Args:
      logits: unnormalised log-odds.
      labels: targets in [0, 1], same shape.

    Returns:
      The elementwise loss.

    >>> sigmoid_binary_cross_entropy(torch.tensor([0.0]), torch.tensor([1.0]))
    tensor([0.6931])
    """
    labels = labels.to(logits.dtype)
    return -labels * F.logsigmoid(logits) - (1 - labels) * F.logsigmoid(-logits)


def squared_error(predictions: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """Elementwise ``(predictions - targets)**2`` (``F.mse_loss(reduction="none")``).

    Args:
      predictions: the predictions.
      targets: the targets (None: zero).

    Returns:
      The elementwise loss.

    >>> squared_error(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 1.0]))
    tensor([1., 4.])
    """
    err = predictions if targets is None else predictions - targets
    return err * err


def l2_loss(predictions: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """Elementwise ``0.5 * (predictions - targets)**2`` (optax; half of torch's MSE).

    Args:
      predictions: the predictions.
      targets: the targets (None: zero).

    Returns:
      The elementwise loss.

    >>> l2_loss(torch.tensor([2.0]))
    tensor([2.])
    """
    return 0.5 * squared_error(predictions, targets)


def huber_loss(predictions: torch.Tensor, targets: torch.Tensor | None = None, delta: float = 1.0) -> torch.Tensor:
    """Elementwise Huber loss: quadratic within ``delta``, linear outside (``F.huber_loss``).

    Args:
      predictions: the predictions.
      targets: the targets (None: zero).
      delta: where the loss turns linear.

    Returns:
      The elementwise loss.

    >>> huber_loss(torch.tensor([0.5, 3.0]), torch.tensor([0.0, 0.0]))
    tensor([0.1250, 2.5000])
    """
    err = predictions if targets is None else predictions - targets
    abs_err = torch.abs(err)
    quadratic = torch.clamp(abs_err, max=delta)
    linear = abs_err - quadratic
    return 0.5 * quadratic * quadratic + delta * linear


def kl_divergence(log_predictions: torch.Tensor, targets: torch.Tensor, axis: int = -1) -> torch.Tensor:
    """``KL(targets || predictions)`` per example, summed over ``axis``; 0 log 0 is 0.

    ``F.kl_div(log_predictions, targets, reduction="none").sum(axis)``.

    Args:
      log_predictions: log-probabilities of the model.
      targets: probabilities.
      axis: the class axis.

    Returns:
      The divergence of each example.

    >>> kl_divergence(torch.log(torch.tensor([[0.5, 0.5]])), torch.tensor([[1.0, 0.0]]))
    tensor([0.6931])
    """
    safe = torch.where(targets > 0, targets, torch.ones_like(targets))
    terms = torch.where(targets > 0, targets * (torch.log(safe) - log_predictions), torch.zeros_like(targets))
    return terms.sum(dim=axis)
