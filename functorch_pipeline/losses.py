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
* :func:`huber_loss` is ``F.huber_loss`` (not ``F.smooth_l1_loss``, which divides by delta);
* ``where=`` (optax >= 0.2.4; :func:`cross_entropy`, :func:`softmax_cross_entropy`,
  :func:`kl_divergence`) is a boolean mask of the classes to include, the shape of the
  logits or of the batch (then it masks whole examples): excluded classes leave the
  normaliser and the sum, and an example with no class included has loss 0. PyTorch has
  no such argument (slice the logits instead).

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
    "softmax_cross_entropy_with_integer_labels",
    "squared_error",
]


def _where(fn: str, where: torch.Tensor | None, logits: torch.Tensor,
           axis: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(mask, any_class, filled)``: the mask broadcast to the logits, whether each
    example keeps a class, and the logits with excluded classes at -inf (an example with
    none kept gets zeros, so that nothing is NaN, not even its gradient)."""
    if where is None:
        return None
    if not isinstance(where, torch.Tensor) or where.dtype != torch.bool:
        got = where.dtype if isinstance(where, torch.Tensor) else type(where).__name__
        raise TypeError(f"{fn}: `where` must be a bool tensor, got {got}")
    ax = _class_axis(fn, axis, logits)
    given = tuple(where.shape)
    if where.dim() == logits.dim() - 1:
        where = where.unsqueeze(ax)
    try:
        where = torch.broadcast_to(where, logits.shape)
    except RuntimeError:
        raise ValueError(
            f"{fn}: `where` of shape {given} does not broadcast to the logits "
            f"{tuple(logits.shape)} (give the logits' shape or the batch shape)"
        ) from None
    keep = where.any(dim=ax, keepdim=True)
    filled = torch.where(where, logits, torch.full_like(logits, float("-inf")))
    filled = torch.where(keep, filled, torch.zeros_like(logits))
    return where, keep, filled


def _class_axis(fn: str, axis: int, logits: torch.Tensor) -> int:
    """``axis`` as a non-negative index into the logits' axes (optax and torch raise for
    one out of range; wrapping it would take the loss over another axis)."""
    if not -logits.dim() <= axis < logits.dim():
        raise IndexError(f"{fn}: `axis` {axis} is out of range for logits of shape "
                         f"{tuple(logits.shape)}")
    return axis % logits.dim()


def _gather_labels(fn: str, scores: torch.Tensor, labels: torch.Tensor, ax: int) -> torch.Tensor:
    """``scores`` at each example's label along ``ax`` (the axis kept, of size 1)."""
    try:
        return torch.gather(scores, ax, labels.unsqueeze(ax).to(torch.int64))
    except RuntimeError as e:
        if "out of bounds" not in str(e):
            raise
        raise IndexError(
            f"{fn}: `labels` must be class indices in [0, {scores.shape[ax]}) (there is no "
            "ignore_index: leave examples out with `where`)") from e


def _check_labels(fn: str, logits: torch.Tensor, labels: torch.Tensor, axis: int) -> None:
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(
            f"{fn}: `labels` must be integer class indices, got dtype {labels.dtype}; "
            "for one-hot or probability targets use softmax_cross_entropy"
        )
    ax = _class_axis(fn, axis, logits)
    want = tuple(s for i, s in enumerate(logits.shape) if i != ax)
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
    fn = "nll(log_probs, labels)"
    _check_labels(fn, log_probs, labels, axis)
    ax = axis % log_probs.dim()
    return -_gather_labels(fn, log_probs, labels, ax).squeeze(ax)


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    axis: int = -1,
    where: torch.Tensor | None = None,
    *,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    r"""Softmax cross entropy with integer labels, one value per example:
    :math:`\log\sum_{j \in W} e^{x_j} - x_y` (:math:`W`: the classes ``where`` keeps).

    optax's ``softmax_cross_entropy_with_integer_labels`` (also exported under that
    name); equals ``F.cross_entropy(logits, labels, reduction="none", label_smoothing=...)``
    (for ``(N, C)`` logits; torch's class axis is 1, ours ``axis=-1``) for labels in
    ``[0, C)``. There is no ``ignore_index`` (torch's -100 raises here): leave such
    examples out with ``where`` (e.g. ``where=labels >= 0``): their loss is 0 whatever
    their label.

    Args:
      logits: unnormalised scores, classes on ``axis``.
      labels: integer class indices, the shape of ``logits`` without ``axis``.
      axis: the class axis.
      where: optional bool mask of the classes to include (the logits' shape, or the
        labels' shape to mask whole examples); see the module docstring.
      label_smoothing: (not in optax) mix the one-hot target with the uniform
        distribution over the included classes.

    Returns:
      The loss of each example: the shape of ``labels``.

    Examples:
      >>> cross_entropy(torch.tensor([[0.0, 0.0]]), torch.tensor([0]))
      tensor([0.6931])
      >>> cross_entropy(torch.tensor([[0.0, 0.0, 5.0]]), torch.tensor([0]),
      ...               where=torch.tensor([[True, True, False]]))
      tensor([0.6931])
    """
    fn = "cross_entropy(logits, labels)"
    _check_labels(fn, logits, labels, axis)
    masked = _where(fn, where, logits, axis)
    if masked is None:
        logp = torch.log_softmax(logits, dim=axis)
        ax = axis % logits.dim()
        loss = -_gather_labels(fn, logp, labels, ax).squeeze(ax)
        if label_smoothing:
            uniform = -logp.mean(dim=axis)
            loss = (1 - label_smoothing) * loss + label_smoothing * uniform
        return loss
    mask, keep, filled = masked
    lse = torch.logsumexp(filled, dim=axis, keepdim=True)
    ax = axis % logits.dim()
    # an example `where` leaves out entirely may carry any label (-100, torch's ignore_index)
    labels = torch.where(keep.squeeze(ax), labels, torch.zeros_like(labels))
    loss = (lse - _gather_labels(fn, logits, labels, ax)).squeeze(ax)
    if label_smoothing:
        logp = torch.where(mask, logits - lse, torch.zeros_like(logits))
        count = mask.sum(dim=ax).clamp(min=1).to(logits.dtype)
        uniform = -logp.sum(dim=ax) / count
        loss = (1 - label_smoothing) * loss + label_smoothing * uniform
    return torch.where(keep.squeeze(ax), loss, torch.zeros_like(loss))


softmax_cross_entropy_with_integer_labels = cross_entropy


def softmax_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    axis: int = -1,
    where: torch.Tensor | None = None,
    *,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    r"""Cross entropy against a distribution (one-hot or probabilities) per example:
    :math:`-\sum_{j \in W} y_j \log \mathrm{softmax}_W(x)_j`.

    Equals ``F.cross_entropy(logits, probs, reduction="none", label_smoothing=...)``.

    Args:
      logits: unnormalised scores, classes on ``axis``.
      labels: a distribution per example, the shape of ``logits``.
      axis: the class axis.
      where: optional bool mask of the classes to include (the logits' shape, or the
        batch shape to mask whole examples); see the module docstring.
      label_smoothing: (not in optax) mix the targets with the uniform distribution
        (without ``where``: over all classes, as torch).

    Returns:
      The loss of each example.

    Examples:
      >>> softmax_cross_entropy(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.5, 0.5]]))
      tensor([0.6931])
      >>> softmax_cross_entropy(torch.tensor([[0.0, 0.0, 9.0]]), torch.tensor([[0.5, 0.5, 0.0]]),
      ...                       where=torch.tensor([[True, True, False]]))
      tensor([0.6931])
    """
    if labels.shape != logits.shape:
        raise ValueError(
            f"softmax_cross_entropy(logits, labels): `labels` must have the shape of `logits` "
            f"{tuple(logits.shape)}, got {tuple(labels.shape)}; integer labels go to cross_entropy"
        )
    masked = _where("softmax_cross_entropy(logits, labels)", where, logits, axis)
    if masked is None:
        if label_smoothing:
            labels = (1.0 - label_smoothing) * labels + label_smoothing / labels.shape[axis]
        return -(labels * torch.log_softmax(logits, dim=axis)).sum(dim=axis)
    mask, keep, filled = masked
    ax = axis % logits.dim()
    if label_smoothing:
        count = mask.sum(dim=ax, keepdim=True).clamp(min=1).to(logits.dtype)
        labels = (1.0 - label_smoothing) * labels + label_smoothing / count
    logp = logits - torch.logsumexp(filled, dim=ax, keepdim=True)
    terms = torch.where(mask, labels * logp, torch.zeros_like(logp))
    loss = -terms.sum(dim=ax)
    return torch.where(keep.squeeze(ax), loss, torch.zeros_like(loss))


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


def kl_divergence(
    log_predictions: torch.Tensor,
    targets: torch.Tensor,
    axis: int = -1,
    where: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""``KL(targets || predictions)`` per example, summed over ``axis``; 0 log 0 is 0:
    :math:`\sum_{j \in W} t_j(\log t_j - \log p_j)`.

    ``F.kl_div(log_predictions, targets, reduction="none").sum(axis)``.

    Args:
      log_predictions: log-probabilities of the model.
      targets: probabilities.
      axis: the class axis.
      where: optional bool mask of the terms to include in the sum (the shape of
        ``targets`` or the batch shape); as optax, nothing is renormalised.

    Returns:
      The divergence of each example.

    >>> kl_divergence(torch.log(torch.tensor([[0.5, 0.5]])), torch.tensor([[1.0, 0.0]]))
    tensor([0.6931])
    """
    safe = torch.where(targets > 0, targets, torch.ones_like(targets))
    terms = torch.where(targets > 0, targets * (torch.log(safe) - log_predictions), torch.zeros_like(targets))
    masked = _where("kl_divergence(log_predictions, targets)", where, targets, axis)
    if masked is not None:
        terms = torch.where(masked[0], terms, torch.zeros_like(terms))
    return terms.sum(dim=axis)
