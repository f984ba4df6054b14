"""Whether an op between the batch and a rule's input reordered or mixed the examples.

# NOTE [rows reordered inside loss_fn]
A rule reads row ``b`` of its input as example ``b`` (NOTE [which axis is the batch] in
``_engine``), and an input computed from the batch (it has a graph: NOTE [the batch
requires grad] in ``_api``) passed that test by its size alone. A model that reorders its
examples on the way breaks it: sorting a batch by length before a recurrent layer and
unsorting after (``h[order]``, ``index_select``), reversing it (``flip(0)``), rolling it.
Each example's gradient then went to another example, silently: wrong per-example
gradients, clip norms and DP noise calibration (error 1.31 on a toy model that sorts by a
feature; ``vmap`` and the loop were right). :func:`reordered_by` walks the input's autograd
history back to the batch, following the axis that holds the examples through the ops
that move it (transposes, permutes, views, squeezes, selects, expands), and names the
first op that permutes or gathers rows along that axis: indexing with a tensor whose
entries are not in increasing order (``h[order]``; ``h[torch.arange(B), last]`` and masks
keep the order), ``index_select``, ``gather``, ``scatter``, ``index_copy``, ``index_put``,
``flip``, ``roll``, ``sort``, ``topk``, ``cat`` and ``stack`` along it. The walk stops at
the outputs of earlier rules, whose inputs were checked in turn, and at leaves.

It cannot prove that rows came back in order (``h[order][inverse]``), so a named op
makes the input unproven: the unpadded run keeps the input's rows and goes on (to keep
any other such input's), its backward raises :class:`~._engine.Unproven`, and the padded
run of NOTE [padding an ambiguous batch] in ``_padding`` decides, with at least two
padding examples. There the rows are in order only if (1) the padding rows repeat the
first example's and (2) the first rows equal the unpadded run's. (1) alone let a
permutation through that maps row 0 and the last two rows onto each other at every size
(``h.roll(1, 0).flip(0)``: a random search found it); (2) alone, a descending sort whose
first example sorts last. A permutation computed from the data moves when the padding
joins the batch. A run that draws random numbers (dropout) draws other ones padded, so
there (2) is skipped and (1) decides, with the first example's draws for the padding
(NOTE [random draws in a padded run] in ``_same_draws``). A proven input is remembered
like a table's answer (``Evidence.rows``), so later calls with the same shapes run
unpadded; a refused one falls back to ``vmap``, which is right.

Ops the walk does not know keep the axis when an input has the same size along it, and
end the walk otherwise; a view that splits the examples' axis is named (NOTE [examples
split by a view]), and so are the ops of NOTE [windows over the examples] that move,
resize or mix it. The walk costs several microseconds a
node, about a millisecond a call for a 4-layer transformer encoder (12% of its call at a
batch of 4), so, as the padded runs' answers are, its outcome is remembered per
``loss_fn`` and input shapes (``_padding._WALKED``): a run whose walks found nothing
keeps, for each rule input, the names of the first 8 autograd nodes of its history
(breadth first, up to earlier rules' outputs: ``Engine._fingerprint``), and later calls
skip the walk of each input whose record is the same as that run's. From the first input
whose record differs (a model that mixes or sorts its examples in training mode only,
called in eval mode first; manifold mixup ``0.7 * h + 0.3 * h[perm]`` before an
activation), the walks run again. (Only the input's own node was kept before, and a
reorder under the same op at the input was hidden.) A change further up than those 8
nodes was not seen: a model that flips its batch before its first layer and back after
it in training mode only, both more than 8 nodes from every rule input, called in eval
mode first, then gave each example another's gradients in training mode, silently (0.62
off the loop). So the record of each input also counts the autograd nodes the run made
before it (autograd numbers the nodes it makes on a thread in order: the input's node's
number less the next number when the run began), which any op added or left out before
it changes, however far up; the count costs two integer reads a rule input (a record of
every node name would cost ~30 us a call on a 2-layer transformer encoder, ~0.5% of its
call, more with deeper residual streams). Still not seen: a mode that swaps one op for
another that makes as many nodes, more than 8 nodes up (``x.flip(0)`` in one mode,
``x.flip(1)`` in the other); on a 4-layer transformer encoder at a batch of 4 the longer
record costs nothing measurable (8.6 against 8.7 ms, 8.0 against 7.9 ms a call, ad hoc A/B).

# NOTE [an index in order this time]
The walk follows an integer index along the examples whose values never decrease (a
pooling ``h[torch.arange(B), last]``): it reads the values, which another call may not
share. A model that sorts its examples by length before a recurrent layer and puts them
back after it (``x[argsort(lengths)]`` ... ``h[argsort(idx)]``, the usual stand-in for a
``PackedSequence``) met an already sorted batch on its first call; that run's record let
later calls with the same shapes skip their walks, and a later, unsorted batch got each
example's gradient from another example's row, silently (an LSTM: error 0.18 against the
loop, the norms of examples 0 and 3 swapped). So a run whose walks read index values is
not recorded (``VALUES_READ`` in the walks' memo): each call walks again, and an index
out of order is named as on a first call.

# NOTE [statistics over the examples]
The same walk meets the inputs an op broadcasts over the examples: a bias, a mask with no
graph, and also ``h.mean(0)`` in ``h - h.mean(0)``. The contract of the fast methods is
that example ``b``'s loss depends on example ``b`` alone; a statistic over the batch
broadcast back to its examples (centring or standardising by the batch's mean and
spread, dividing by a total over the batch) breaks it, and the rules, reading row ``b``
as example ``b``'s, gave the batch gradient split by rows, silently: clipping those rows
bounds no one example's influence, which DP-SGD's guarantee needs. BatchNorm in training
mode, the same thing as a layer, was already an error. So an input broadcast over the
examples whose history reaches the batch (its leaves' gradient accumulators) or an
earlier rule's output is a :class:`Mixed` finding, which no padded run can show away
(the padding would only join the statistic): the fast methods refuse it, naming the op,
and ``auto`` falls back to ``vmap``, which runs each example alone and so computes the
statistic over that example only (the per-example loop's numbers). A statistic with no
graph is not in any history the walk reads: one made from integer batch data is caught by
the padded run it asks for (NOTE [a statistic with no graph] in ``_engine``); others
(``(r - r.mean()).detach()`` as a REINFORCE baseline, weights computed from the batch
and multiplied in by hand) are not seen, and the fast methods give the batch-coupled
numbers (documented: ``method="vmap"`` is needed). Statistics per example
(a squeeze-and-excite gate, a norm over features) keep the examples' axis and are
followed as before. An op that combines the entries along one dim into each output entry
(softmax, log-softmax, cumulative sums, products and extrema) along the examples' axis is a
:class:`Mixed` finding too, as is a layer or group norm whose statistics span that axis
(``F.layer_norm(h.T, (B,))``), and so is the operand of a matrix product that every example's
row is multiplied with, when it reaches the batch: a contraction over the examples
(``h @ (h.T @ h)``, scores between the examples ``(h @ h.T).softmax(1) @ h``, an einsum
Gram) is a statistic over them as much as a mean is (before, the walk did not follow that
operand, and these were silent).

# NOTE [statistics in the loss]
The walks start at the rule inputs, so a statistic over the examples taken after the last
layer, in the loss itself, was not seen: an in-batch contrastive loss (``logits = a @
b.T``, cross-entropy against ``arange(B)``), losses divided by their total, mixup of the
outputs. So the per-example losses are checked like a rule input before the backward
(``Engine.backward`` calls ``rows_in_order`` on them): a :class:`Mixed` finding is
refused, and a reorder makes them unproven, for the padded runs to decide (their padding
losses must repeat the first example's, and their first losses be the unpadded run's).
A mix of reordered rows (``0.7 * a + 0.3 * a.flip(0)``) fails there, and so does a plain
reorder of the losses (``losses.flip(0)``), which changes no example's gradient but which
the graph does not tell from a mix: ``vmap`` then, the loop's numbers. A first version
walked the losses for :class:`Mixed` findings alone and let reorders pass; a random
search (models of reorders, mixes and statistics between and after two layers, against a
per-example loop) found it wrong on 19 of 200, every one a reorder in the loss's history
(a statistic behind a flip, mixup after the last layer).

# NOTE [examples split by a view]
A permutation made by reshapes alone (``h.view(2, B // 2, F).transpose(0, 1).reshape(B,
F)`` interleaves the examples) passed: the walk, following the examples' axis back through
the reshape and the transpose, met a view whose input has no axis starting where the
examples' does (they are split over two axes) and stopped there, finding nothing. Such a
view is now named like a reorder, so the padded runs decide. Because a split needs a batch
size that factors, a model may split at one size and not at another (``if B % 2 == 0``):
there the padded run's walk finds no op, and an input proven by finding nothing would pass.
So each rule input counts in its run (``Evidence.occurrence``, found or not), and a padded
run compares an input whose walk finds nothing with the same input of an earlier run that
could not show its order: its first rows must be that run's (skipped in a run that drew
random numbers, whose rows differ by their draws), or the fast methods refuse it.

# NOTE [loss weights with no graph]
Class weights (``F.cross_entropy(..., weight=w)``, ``pos_weight`` and ``weight`` of the
binary cross-entropies, ``multi_margin_loss``'s) are tensors autograd does not
differentiate, so nothing in the graph says where they came from. Computed from the batch
(``w = 1 / torch.bincount(y)``: class-balanced per batch), each example's loss depends on
the others' labels; the fast methods read the losses row by row and gave other numbers
than the loop (which weighs each example as a batch of one), silently (error 1.7 and 3.2
on toy models). A loss node with such a weight is therefore named like a reorder, on a
branch of its own (a statistic further up still wins), and the padded runs decide: a
weight computed from the batch moves when the padding (copies of the first example)
joins it, so the first losses differ from the unpadded run's and the fast methods refuse;
constant weights pass, once per loss_fn and shapes. In a run that draws random numbers
that comparison is skipped (NOTE [rows reordered inside loss_fn]) and batch-derived
weights pass. A weight applied by hand (``losses * w[y]``) is a multiplication by a tensor
with no graph, like a mask, and is not named.

# NOTE [windows over the examples]
Ops that the walk did not know and that kept the examples' axis's size were followed as
if they kept each row in place, and ops that changed its size ended the walk. A random
search of ops between two layers, against a per-example loop, found that both were silent
with the examples moved onto an axis these ops work along: a convolution, pooling,
resampling or reflection pad over the batch (``F.avg_pool1d(h.T[None], 3, 1, 1)``), an
FFT along it, ``torch.renorm`` over the other dim, attention across the batch
(``F.scaled_dot_product_attention`` or ``nn.MultiheadAttention`` with the examples as the
sequence: each example attends to the others), and rows shifted by a pad and a slice
(``F.pad(h, (0, 0, 1, 0))[:-1]``), ``as_strided``, ``take``, ``kron``. Every one gave other
numbers than the loop (errors 6-74 in float64), and ``auto`` kept the fast method. So:

* a convolution reads row ``b`` of its input alone only along its batch axis, along its
  channels when it is depthwise, and along a spatial axis when its kernel, stride and
  padding there are 1, 1 and 0; pooling, resampling, reflection and replication pads,
  ``unfold``/``fold`` and ``grid_sample`` only along their batch (and channel) axes;
  an FFT only off its dims; ``renorm`` only along its dim; attention along its batch
  axes, and along its queries for the query alone (the keys and values are read by
  every query, like the second operand of a matrix product). Elsewhere each is a
  :class:`Mixed` finding, refused (``vmap`` runs);
* an op that moves rows by an arrangement the walk cannot read (``as_strided``,
  ``take``, ``kron``, ``pixel_shuffle`` over the examples) or changes the examples'
  axis's size (a pad, a slice of it) is named like a reorder, for the padded runs to
  decide (a pad up to a size and a slice back prove in order there; a shift does not);
* a repeat that tiles a shorter input along the examples' axis is followed to that
  input, where the walk ended before (``h[:3].repeat(2, 1)``: the slice is then named).

A second search (``narrow_copy``, ``index_fill``, ``glu``, a table gathered by
``F.embedding``, and ~45 other ops) found four more: ``narrow_copy`` is read like a slice,
``index_fill`` along the examples is named, ``glu`` along them is a statistic (row ``r``
gated by row ``r + n / 2``), and the table of ``F.embedding``/``embedding_bag`` without a
rule (not a parameter) is read by every example, like a matrix product's second operand.
Statistics taken on detached tensors (``h.detach().argsort(0)``, ``torch.histc``) have no
graph and stay unseen. A third (~25 ops) found writes into rows: ``masked_scatter`` and
``as_strided_scatter`` (their source is read in an order the walk cannot follow),
``select_scatter``/``slice_scatter``/``diagonal_scatter`` along the examples (named), and
``torch.cdist`` to rows of the batch (its second input is read by every row of the first,
like a matrix product's second operand).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["ROWWISE_UNARY", "VALUES_READ", "BatchStatistics", "Mixed", "Weighted",
           "batch_norm_error", "batch_statistics", "reordered_by"]

_INDEXED = frozenset({"IndexBackward0", "IndexPutBackward0", "IndexPutImplBackward0"})
_ALONG_DIM = frozenset({"IndexSelectBackward0", "GatherBackward0", "ScatterBackward0",
                        "ScatterBackward1", "ScatterAddBackward0", "ScatterReduceBackward0",
                        "IndexCopyBackward0", "IndexAddBackward0", "IndexReduceBackward0",
                        "SortBackward0", "SortBackward1", "TopkBackward0", "CatBackward0"})
_MONOTONE = frozenset({"IndexSelectBackward0"})  # take an index whose order can be read
# Elementwise ops of one input with a graph, whose output row r reads row r of it; shared
# with NOTE [rows kept through elementwise ops] in _engine.
ROWWISE_UNARY = frozenset(f"{name}Backward{v}" for name, vs in (
    ("Relu", "0"), ("Gelu", "0"), ("Silu", "0"), ("Tanh", "0"), ("Sigmoid", "0"), ("Mish", "0"),
    ("Elu", "0"), ("LeakyRelu", "0"), ("Hardtanh", "0"), ("Hardswish", "0"), ("Hardsigmoid", "0"),
    ("Softplus", "0"), ("Threshold", "0"), ("NativeDropout", "0"), ("Neg", "0"), ("Exp", "0"),
    ("Sqrt", "0"), ("Rsqrt", "0"), ("Abs", "0"), ("Erf", "0"), ("Log", "0"), ("ToCopy", "0"),
    ("Clone", "0"), ("Clamp", "01"), ("ClampMin", "0"), ("ClampMax", "0"), ("Pow", "0"),
    ("Sin", "0"), ("Cos", "0"), ("Mul", "1"), ("Div", "1"), ("Add", "1"), ("Sub", "1"),
) for v in vs)
# Ops that combine the entries along one dim into each output entry (NOTE [statistics over
# the examples]): along the examples, each example's output reads the others'.
_ACROSS_DIM = frozenset({"SoftmaxBackward0", "LogSoftmaxBackward0", "CumsumBackward0",
                         "CumprodBackward0", "LogcumsumexpBackward0", "CummaxBackward0",
                         "CumminBackward0"})
# Ops followed without reading shapes, the common case made cheap: ROWWISE_UNARY (every
# axis kept) and these, which keep axes 0 and 1 (pooling, resampling).
_KEEP_LEADING = frozenset(f"{name}Backward0" for name in (
    "MaxPool1DWithIndices", "MaxPool2DWithIndices", "MaxPool3DWithIndices", "AvgPool2D",
    "AvgPool3D", "AdaptiveAvgPool2D", "AdaptiveAvgPool3D", "AdaptiveMaxPool2D",
    "UpsampleNearest2D", "UpsampleBilinear2D", "ReflectionPad2D", "ReplicationPad2D",
))
# Elementwise ops of several inputs that broadcast them to one shape, and repeat (NOTE
# [statistics over the examples]): an input broadcast over the examples is a constant or
# a statistic (expand is followed on its own).
_BROADCASTING = frozenset(f"{name}Backward{v}" for name, vs in (
    ("Add", "0"), ("Sub", "0"), ("Mul", "0"), ("Div", "0"), ("Where", "0"), ("Maximum", "0"),
    ("Minimum", "0"), ("Pow", "12"), ("Addcmul", "0"), ("Addcdiv", "0"), ("Lerp", "01"),
    ("Atan2", "0"), ("Hypot", "0"), ("Fmod", "1"), ("Remainder", "1"), ("Repeat", "0"),
) for v in vs)
# Normalisations whose statistics may span the examples (NOTE [statistics over the
# examples]): see _normalises.
_NORMALISING = frozenset({"NativeLayerNormBackward0", "NativeGroupNormBackward0"})
# Matrix products (NOTE [statistics over the examples]): see _product.
_PRODUCTS = frozenset({"MmBackward0", "AddmmBackward0", "BmmBackward0", "BaddbmmBackward0",
                       "MvBackward0"})
# NOTE [solves over the examples]: see _solve. Linear solves X = A^-1 B (``left``) or
# B A^-1, with the positions of A and B among their inputs...
_SOLVES = {"LinalgSolveTriangularBackward0": (0, 1), "LinalgSolveExBackward0": (0, 1),
           "LinalgLuSolveBackward0": (0, 1), "LinalgLstsqBackward0": (0, 1),
           "CholeskySolveBackward0": (1, 0), "TriangularSolveBackward0": (1, 0)}
# ... and functions of a whole matrix, whose every entry reads every entry of its input's
# last two axes.
_MATRIX_FUNCTIONS = frozenset({"LinalgPinvBackward0", "LinalgInvExBackward0",
                               "LinalgCholeskyExBackward0", "LinalgMatrixExpBackward0",
                               "LinalgLuFactorExBackward0"})
# NOTE [windows over the examples]: ops that read a window, a resampling or a padding of
# their spatial axes (2 and after), their batch and channel axes kept.
_WINDOWED = _KEEP_LEADING | frozenset(f"{name}Backward0" for name in (
    "AdaptiveMaxPool3D", "FractionalMaxPool2D", "FractionalMaxPool3D", "MaxUnpool2D",
    "MaxUnpool3D", "UpsampleNearest1D", "UpsampleNearest3D", "UpsampleNearestExact1D",
    "UpsampleNearestExact2D", "UpsampleNearestExact3D", "UpsampleLinear1D", "UpsampleBicubic2D",
    "UpsampleTrilinear3D", "UpsampleBilinear2DAa", "UpsampleBicubic2DAa", "ReflectionPad1D",
    "ReflectionPad3D", "ReplicationPad1D", "ReplicationPad3D",
))
# ... and ops that rearrange every axis but the batch axis (0): im2col and back, sampling
# at a grid, pixel (un)shuffles.
_BATCH_ONLY = frozenset(f"{name}Backward0" for name in (
    "Im2Col", "Col2Im", "GridSampler2D", "GridSampler3D", "PixelShuffle", "PixelUnshuffle",
    "ChannelShuffle", "NativeChannelShuffle",
))
_FFT = frozenset({"FftC2CBackward0", "FftR2CBackward0", "FftC2RBackward0"})
# Arrangements of rows the walk cannot read: named, for the padded runs.
_UNREADABLE = frozenset({"AsStridedBackward0", "AsStridedBackward1", "TakeBackward0",
                         "KronBackward0"})
# NOTE [loss weights with no graph]: losses that read a weight tensor autograd does not
# differentiate, and the attributes holding it.
_WEIGHTED = {"NllLossBackward0": ("_saved_weight",), "NllLoss2DBackward0": ("_saved_weight",),
             "BinaryCrossEntropyBackward0": ("_saved_weight",),
             "BinaryCrossEntropyWithLogitsBackward0": ("_saved_weight", "_saved_pos_weight"),
             "MultiMarginLossBackward0": ("_saved_weight",)}
_WEIGHTS = "weights"  # the axis of a walk key that stands for a loss's weights
_VIEWS = frozenset({"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0",
                    "_ReshapeAliasBackward0"})  # views with saved sizes (an alias keeps all)


class Mixed(str):
    """A finding of NOTE [statistics over the examples]: no padded run can show it away."""


class Weighted(str):
    """A finding of NOTE [loss weights with no graph]: the padded runs decide."""


class BatchStatistics(Mixed):
    """A :class:`Mixed` finding of NOTE [batch norm without parameters]: an error, as
    BatchNorm in training mode with parameters already is, not a fall-back."""


# NOTE [batch norm without parameters]
# BatchNorm normalising with the batch's statistics (training mode, or
# ``track_running_stats=False`` in either mode) makes each example's output depend on the
# whole batch. With a differentiated weight or bias its rule refuses it (``_rules``); one
# with no parameter in the call (``affine=False``, its affine parameters frozen, a bare
# ``F.batch_norm(..., training=True)``) had no rule to meet, and the walk followed its node
# like an elementwise op: the fast methods then gave the batch-coupled gradients, silently
# (float64, a conv, BatchNorm2d(affine=False) in training mode and a linear head: error
# 4.7 against the per-example loop). The walk now names such a node when it meets the
# examples on any axis but the channels (1), where F.instance_norm puts them: the same
# error as the rule's, from every method (vmap cannot batch the running statistics'
# update either). Eval mode with running statistics normalises each example alone and is
# followed as before. The walks' record of a call (``Engine._fingerprint``) tells the
# modes apart, so a model called in eval mode first is walked again in training mode.
_BATCH_NORMS = frozenset({"NativeBatchNormBackward0", "CudnnBatchNormBackward0",
                          "MiopenBatchNormBackward0"})


def batch_statistics(node: Any) -> bool:
    """Whether ``node`` is a batch norm normalising with the batch's own statistics."""
    return node.name() in _BATCH_NORMS and bool(getattr(node, "_saved_training", False))


def batch_norm_error(fn: str, where: str) -> str:
    """The message for NOTE [batch norm without parameters] and its rule."""
    return (f"{fn}: BatchNorm normalising with the batch's statistics (training mode, or "
            f"track_running_stats=False) {where}, so one example's loss depends on the "
            "others and per-example gradients are not defined. Run the model in eval mode "
            "with running statistics, or replace BatchNorm with GroupNorm "
            "(fp.nn.replace_batchnorm_with_groupnorm).")


def reordered_by(x: torch.Tensor, axis: int, stops: Any, memo: dict[Any, Any],
                 sources: Any = frozenset()) -> str | None:
    """The first op in ``x``'s autograd history that permutes or gathers rows along the
    axis holding the examples (``axis`` of ``x``), as a short description, or None; see
    NOTE [rows reordered inside loss_fn].

    Args:
      x: a rule's input that has a graph.
      axis: the axis of ``x`` that holds the examples.
      stops: autograd nodes where the walk ends (the outputs of earlier rules).
      memo: answers for ``(node, output number, axis)``, shared by the walks of one run.
      sources: the batch's own autograd nodes (its leaves' gradient accumulators).

    Returns:
      e.g. ``"IndexBackward0 on axis 0"``, or a :class:`Mixed` naming a statistic over
      the examples broadcast back to them (NOTE [statistics over the examples]; where
      the history has both, a statistic), or None.

    Example:
      >>> h = torch.randn(4, 3, requires_grad=True)
      >>> reordered_by(h[h[:, 0].argsort()].relu(), 0, set(), {})
      'IndexBackward0 on axis 0'
      >>> print(reordered_by(h[:, [2, 0, 1]].relu(), 0, set(), {}))
      None
      >>> src = {torch.autograd.graph.get_gradient_edge(h).node}
      >>> reordered_by(h - h.mean(0), 0, set(), {}, src)
      'MeanBackward1, a statistic over the examples broadcast back to them'
    """
    key, chain = (x.grad_fn, x.output_nr, axis), []
    while key not in memo:  # a chain of one-input ops, walked without the stack below
        own, children = _safe_step(key, stops, sources, memo)
        if own is not None or not children:
            memo[key] = own
        elif len(children) > 1:
            memo[key] = _branching(key, children, stops, sources, memo)
        else:
            chain.append(key)
            key = children[0]
    for k in chain:
        memo[k] = memo[key]
    return memo[key]


def _safe_step(key: Any, stops: Any, sources: Any, memo: dict[Any, Any]) -> tuple[str | None, list[Any]]:
    try:
        if key[2] == _WEIGHTS:  # NOTE [loss weights with no graph]
            return Weighted(f"{key[0].name()} weighted by a tensor with no graph (class "
                            "weights), which may be computed from the batch"), []
        if key[2] is None:  # broadcast over the examples: NOTE [statistics over the examples]
            return (Mixed(f"{key[0].name()}, a statistic over the examples broadcast back to "
                          "them") if _reaches(key[0], stops, sources, memo) else None), []
        return _step(*key, stops, memo)
    except (AttributeError, RuntimeError, TypeError):  # a node unlike its kind's
        return None, []


def _branching(start: Any, children: list[Any], stops: Any, sources: Any,
               memo: dict[Any, Any]) -> str | None:
    """The answer for ``start``, whose inputs ``children`` branch: the graph below it
    walked depth first, each node's answer taken from its inputs' (post-order)."""
    pending: dict[Any, list[Any]] = {start: children}
    todo: list[tuple[Any, bool]] = [(start, True)] + [(c, False) for c in children if c not in memo]
    while todo:
        key, expanded = todo.pop()
        if expanded:
            found = [memo[c] for c in pending.pop(key) if memo.get(c)]  # a statistic first:
            memo[key] = next((f for f in found if isinstance(f, Mixed)), None) or (  # no run
                found[0] if found else None)  # can show it away
            continue
        if key in memo:
            continue
        own, children = _safe_step(key, stops, sources, memo)
        if own is not None or not children:
            memo[key] = own
            continue
        pending[key] = children
        todo.append((key, True))
        todo.extend((c, False) for c in children if c not in memo)
    return memo[start]


def _reaches(node: Any, stops: Any, sources: Any, memo: dict[Any, Any]) -> bool:
    """Whether ``node``'s history reaches the batch (``sources``) or an earlier rule's
    output (``stops``, computed from it), memoised per node."""
    todo, seen, found = [node], set(), False
    while todo and not found:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        known = memo.get(("reaches", n))
        found = known if known is not None else n in stops or n in sources
        if not found and known is None:
            todo.extend(m for m, _ in n.next_functions if m is not None)
    if not found:
        for n in seen:  # all of it explored: none reaches
            memo[("reaches", n)] = False
    memo[("reaches", node)] = found
    return found


def _shape(node: Any, nr: int) -> list[int] | None:
    try:
        return list(node._input_metadata[nr].shape)
    except (AttributeError, IndexError, RuntimeError):
        return None


def _norm(d: Any, rank: int) -> int:
    """A saved dim as an axis: autograd hands negative dims back as unsigned 64-bit
    numbers (``flip(-2)``'s ``_saved_dims`` is ``(2**64 - 2,)``)."""
    d = int(d)
    if d >= 1 << 63:
        d -= 1 << 64
    return d + rank if d < 0 else d


VALUES_READ = "values read"  # a memo key: NOTE [an index in order this time]


def _read_values(memo: dict[Any, Any], index: torch.Tensor) -> None:
    """Note that the walk followed an integer index along the examples because its values
    were in order this time (NOTE [an index in order this time])."""
    if index.dtype != torch.bool:
        memo[VALUES_READ] = True


def _in_order(index: Any) -> bool:
    """Whether an index along the examples' axis keeps their order: a mask, or a 1-d index
    that never decreases (a pooling ``h[torch.arange(B), last]``, merged rows)."""
    if not isinstance(index, torch.Tensor):
        return False
    if index.dtype == torch.bool:
        return True
    return index.dim() == 1 and bool((index[1:] >= index[:-1]).all())


def _source_rows(node: Any, a: int) -> int | None:
    """The size along axis ``a`` of the tensor an indexing node read from."""
    sizes = getattr(node, "_saved_self_sym_sizes", None)
    if sizes is None:
        saved = getattr(node, "_saved_self", None)
        sizes = saved.shape if isinstance(saved, torch.Tensor) else None
    return int(sizes[a]) if sizes is not None and a < len(sizes) else None


def _repeats(node: Any, index: Any, a: int) -> Mixed | None:
    """A :class:`Mixed` finding when an integer index along the examples' axis ``a`` as long
    as that axis repeats a row: then some output row reads another example's.

    # NOTE [an index that repeats rows]
    An index in order passed the walk (``h[torch.arange(B), last]``), and so did one in
    order with repeats, ``h + h[torch.zeros(B)]``, ``h[(torch.arange(B) - 1).clamp(0)]``,
    ``index_select(0, zeros)``: each example reads another's row, and the padded runs
    cannot show it (the padding repeats the first example, which those indices read too):
    errors 0.95-1.36 against the loop, silently. An index as long as the axis it reads is
    the identity when it keeps each row; any repeat is a mix of examples, refused like a
    statistic over them (``auto``: vmap). Gather's index is checked along the axis the same
    way. An index of another length (a pooling, merged rows) is read as before."""
    if not isinstance(index, torch.Tensor) or index.dtype == torch.bool or index.dim() == 0:
        return None
    n = _source_rows(node, a)
    along = 0 if index.dim() == 1 else a
    if n is None or along >= index.dim() or index.shape[along] != n or n < 2:
        return None
    ordered = index if index.dim() == 1 else index.sort(dim=along).values
    if bool((ordered.narrow(along, 1, n - 1) == ordered.narrow(along, 0, n - 1)).any()):
        return Mixed(f"{node.name()} repeating rows of the examples' axis {a} (an index "
                     "reading one example's row for another), a mix of the examples")
    return None


def _step(node: Any, nr: int, a: int, stops: Any, memo: dict[Any, Any]
          ) -> tuple[str | None, list[Any]]:
    """``(the op if ``node`` reorders axis ``a`` of its output ``nr``, or a :class:`Mixed`
    if it combines the examples, the inputs to walk next as (node, output number, axis)
    keys, the axis None for an input broadcast over the examples)``."""
    if node is None or node in stops or not node.next_functions:
        return None, []
    name = node.name()
    if name in ROWWISE_UNARY or (a < 2 and name in _KEEP_LEADING):
        return None, [(n, i, a) for n, i in node.next_functions if n is not None]
    shape = _shape(node, nr)
    if shape is None or a >= len(shape):
        return None, []
    rank = len(shape)
    here = f"{name} on axis {a}"
    nexts = [(n, i) for n, i in node.next_functions if n is not None]
    if name in _INDEXED:
        idx = list(node._saved_indices)
        if a < len(idx) and idx[a] is not None:
            if not _in_order(idx[a]):
                return here, []
            _read_values(memo, idx[a])
            mixed = _repeats(node, idx[a], a)  # NOTE [an index that repeats rows]
            if mixed is not None:
                return mixed, []
        elif any(t is not None for t in idx[:a]):
            return None, []  # an index before the axis may move it: not followed
        return None, _same(nexts, shape, a)
    if name in _ALONG_DIM:
        if _norm(node._saved_dim, rank) == a:
            index = getattr(node, "_saved_index", None)
            if name in ("IndexSelectBackward0", "GatherBackward0"):
                mixed = _repeats(node, index, a)  # NOTE [an index that repeats rows]
                if mixed is not None:
                    _read_values(memo, index)
                    return mixed, []
            if not (name in _MONOTONE and _in_order(index)):
                return here, []
            _read_values(memo, index)
        return None, _same(nexts, shape, a)
    if name in _ACROSS_DIM:
        if _norm(node._saved_dim, rank) == a:
            return Mixed(f"{name} along the examples' axis {a}, a statistic over the examples"), []
        return None, [(n, i, a) for n, i in nexts]
    if name in _WEIGHTED and any(getattr(node, w) is not None for w in _WEIGHTED[name]):
        return None, _same(nexts, shape, a) + [(node, nr, _WEIGHTS)]  # a branch of its own
    windows = _windows(node, name, shape, a, nexts)  # NOTE [windows over the examples]
    if windows is not None:
        return windows
    if a != 1 and batch_statistics(node):  # NOTE [batch norm without parameters]
        return BatchStatistics(f"`F.batch_norm` with the batch's statistics ({name} on the "
                               f"examples' axis {a})"), []
    if name in _NORMALISING and _normalises(node, name, rank, a):
        return Mixed(f"{name} normalising over the examples' axis {a}, a statistic over the "
                     "examples"), []
    if name in ("FlipBackward0", "RollBackward0"):
        dims = [_norm(d, rank) for d in node._saved_dims]
        return (here, []) if not dims or a in dims else (None, _same(nexts, shape, a))
    if name == "StackBackward0":
        d = _norm(node._saved_dim, rank)
        if d == a:
            return here, []
        return None, [(n, i, a - (d < a)) for n, i in nexts]
    if name == "ExpandBackward0":  # an input of size 1 along the examples is broadcast
        sizes = list(node._saved_self_sym_sizes)
        i = a - (rank - len(sizes))
        i = i if i >= 0 and sizes[i] == shape[a] else None  # NOTE [statistics over the examples]
        return None, [(n, j, i) for n, j in nexts[:1]]
    if name in _PRODUCTS:
        return None, _product(node, name, shape, a)
    if name in _SOLVES or name in _MATRIX_FUNCTIONS:
        return _solve(node, name, shape, a, nexts)
    moved = _moved(node, name, shape, a)
    if moved is not None:
        if moved < 0 and name in _VIEWS and shape[a] > 1:  # NOTE [examples split by a view]
            return f"{name} splitting the examples' axis {a}", []
        return None, [(n, i, moved) for n, i in nexts[:1]] if moved >= 0 else []
    return None, _same(nexts, shape, a, name in _BROADCASTING)


def _mixed(name: str, a: int) -> Mixed:
    return Mixed(f"{name} reading several rows of the examples' axis {a}, a statistic over "
                 "the examples")


def _rearranged(name: str, a: int) -> str:
    return f"{name} rearranging the examples' axis {a}"


def _along(node: Any, *axes: int | None) -> list[Any]:
    """Walk keys for ``node``'s first inputs by position, input ``k`` along ``axes[k]``
    (None: broadcast over the examples, NOTE [statistics over the examples]); inputs past
    ``axes`` and inputs without a graph are not followed. By position: with an input
    without a graph left out first (a constant query of an attention), the others took
    its axis (a key from the batch went unseen)."""
    return [(n, i, axis) for (n, i), axis in zip(node.next_functions, axes, strict=False)
            if n is not None]


def _windows(node: Any, name: str, shape: list[int], a: int,
             nexts: list[tuple[Any, int]]) -> tuple[str | None, list[Any]] | None:
    """The step of NOTE [windows over the examples] for ``node`` (output axis ``a`` holds
    the examples), or None for an op it is not about."""
    rank = len(shape)
    if name in _WINDOWED or name in _BATCH_ONLY:
        if a == 0 or (a == 1 and name in _WINDOWED):
            return None, _along(node, a)
        return _mixed(name, a), []
    if name == "ConvolutionBackward0":
        return (None, _along(node, a)) if _conv_keeps(node, a) else (_mixed(name, a), [])
    if name in _FFT:
        if a in {_norm(d, rank) for d in node._saved_dim}:
            return _mixed(name, a), []
        return None, _same(nexts, shape, a)
    if name == "RenormBackward0":
        return (None, _same(nexts, shape, a)) if _norm(node._saved_dim, rank) == a else (_mixed(name, a), [])
    if "ScaledDotProduct" in name and "Attention" in name:
        if a < rank - 2:  # batch axes: every input along them
            return None, _same(nexts[:3], shape, a, broadcasts=True)
        held = (True, False, False) if a == rank - 2 else (False, False, True)
        return None, _along(node, *(a if keep else None for keep in held))
    if name in _UNREADABLE:
        if name.startswith("AsStrided") and _strided_rows(node, shape, a, nexts):
            return None, _along(node, 0)
        return _rearranged(name, a), []
    if name == "ConstantPadNdBackward0":
        pad, i = list(node._saved_pad), 2 * (rank - 1 - a)
        return (_rearranged(name, a), []) if any(pad[i:i + 2]) else (None, _same(nexts, shape, a))
    if name in ("IndexFillBackward0", "IndexFillBackward1") and _norm(node._saved_dim, rank) == a:
        return _rearranged(name, a), []  # rows chosen by position get a value: the padded runs decide
    if name == "GluBackward0":  # row r times a gate from row r + n / 2 along its dim
        return (_mixed(name, a), []) if _norm(node._saved_dim, rank) == a else (None, _same(nexts, shape, a))
    if name in ("EmbeddingBackward0", "EmbeddingBagBackward0"):  # every example reads the table
        return None, _along(node, None)
    if name in ("MaskedScatterBackward0", "AsStridedScatterBackward0"):  # source read in any order
        return _rearranged(name, a), []
    if name in ("SelectScatterBackward0", "SliceScatterBackward0"):  # src written into rows
        d = _norm(node._saved_dim, rank)
        if d == a:
            return _rearranged(name, a), []
        src_axis = a - (d < a) if name == "SelectScatterBackward0" else a
        return None, _along(node, a, src_axis)
    if name == "DiagonalScatterBackward0" and a in (_norm(node._saved_dim1, rank),
                                                    _norm(node._saved_dim2, rank)):
        return _rearranged(name, a), []
    if name == "CdistBackward0":  # like a matrix product: x2's rows are read by every x1 row
        if a == rank - 2:
            return None, _along(node, a, None)
        if a == rank - 1:
            return None, _along(node, None, rank - 2)
        return None, _same(nexts, shape, a, broadcasts=True)
    if name in ("SliceBackward0", "NarrowCopyBackward0") and _norm(node._saved_dim, rank) == a:
        resized = int(node._saved_self_sym_sizes[a]) != shape[a]
        return (_rearranged(name, a), []) if resized else (None, _same(nexts, shape, a))
    if name == "RepeatBackward0":  # tiles: followed to a shorter input too (``h[:3].repeat(2, 1)``)
        sizes = list(node._saved_self_sym_sizes)
        j = a - (rank - len(sizes))
        if 0 <= j and 1 < sizes[j] != shape[a] and shape[a] % sizes[j] == 0:
            return None, _along(node, j)
        return None
    if name == "UnfoldBackward0":
        d = _norm(node._saved_dimension, rank - 1)
        return (_mixed(name, a), []) if a in (d, rank - 1) else (None, _along(node, a))
    return None


def _strided_rows(node: Any, shape: list[int], a: int, nexts: list[tuple[Any, int]]) -> bool:
    """Whether an ``as_strided`` view reads row ``r`` of its (contiguous) input as its row
    ``r`` along axis ``a``, everything else of it inside that row: the views autograd
    replays after an in-place op on their base (torchvision's Swin V2 has one at its
    pooling), which are not a reorder."""
    if not nexts:
        return False
    src = _shape(*nexts[0])
    if not src or src[0] != shape[a]:
        return False
    row = 1
    for n in src[1:]:
        row *= n
    stride, offset = list(node._saved_stride), node._saved_storage_offset
    offset = 0 if offset is None else int(offset)
    if shape[a] > 1 and int(stride[a]) != row:
        return False
    extent = offset + sum((n - 1) * int(st) for i, (n, st) in enumerate(zip(shape, stride, strict=True))
                          if i != a)
    return 0 <= offset and extent < row


def _conv_keeps(node: Any, a: int) -> bool:
    """Whether a convolution's output row along axis ``a`` reads the same row of its input
    alone (NOTE [windows over the examples]): its batch axis; its channels when it is
    depthwise (one input and one output channel a group); a spatial axis where its kernel
    is 1 wide, with stride 1, no padding and no output padding."""
    if a == 0:
        return True
    w, groups = node._saved_weight, int(node._saved_groups)
    transposed = bool(node._saved_transposed)
    if a == 1:
        ins = w.shape[0] if transposed else w.shape[1] * groups
        outs = w.shape[1] * groups if transposed else w.shape[0]
        return ins == outs == groups
    i = a - 2
    if i >= w.dim() - 2:
        return False
    out_pad = list(node._saved_output_padding) if transposed else [0] * (w.dim() - 2)
    return (w.shape[a] == 1 and int(node._saved_stride[i]) == 1
            and int(node._saved_padding[i]) == 0 and int(out_pad[i]) == 0)


def _normalises(node: Any, name: str, rank: int, a: int) -> bool:
    """Whether a normalisation without parameters of its own (a rule takes the ones with)
    computes its statistics over axis ``a``: layer norm over its trailing dims, group norm
    over each group's channels and the dims after them."""
    if name == "NativeLayerNormBackward0":
        return a >= rank - len(node._saved_normalized_shape)
    return a >= 2 or (a == 1 and int(node._saved_group) != int(node._saved_C))


def _product(node: Any, name: str, shape: list[int], a: int) -> list[Any]:
    """The inputs of a matrix product (NOTE [statistics over the examples]): the operand
    that holds output axis ``a`` (a batched product's batch axis: both), followed on it;
    the other, which every example's row is multiplied with, as broadcast over the
    examples (``h @ (h.T @ h)``: a Gram matrix of the batch); an added bias, as
    broadcasting aligns it."""
    fns = list(node.next_functions)
    bias = fns.pop(0) if name in ("AddmmBackward0", "BaddbmmBackward0") else None
    if len(fns) != 2:  # not the product this walk knows
        return _same([(n, i) for n, i in node.next_functions if n is not None], shape, a)
    rank = len(shape)
    if name == "MvBackward0" or a == rank - 2:
        held = (True, False)  # rows: the first operand's
    elif name in ("BmmBackward0", "BaddbmmBackward0") and a == 0:
        held = (True, True)  # the batch of products
    else:
        held = (False, True)  # columns: the second operand's
    out = [(n, i, a if keep else None) for (n, i), keep in zip(fns, held, strict=True)
           if n is not None]
    if bias is not None and bias[0] is not None:
        out += _same([bias], shape, a, broadcasts=True)
    return out


def _solve(node: Any, name: str, shape: list[int], a: int,
           nexts: list[tuple[Any, int]]) -> tuple[str | None, list[Any]]:
    """The step of NOTE [solves over the examples] for ``node``.

    # NOTE [solves over the examples]
    A linear solve ``X = A^-1 B`` (``linalg.solve``, ``solve_triangular``, ``lu_solve``,
    ``cholesky_solve``, ``lstsq``; ``B A^-1`` with ``left=False``) computes each column
    of ``X`` (each row, right) from that column of ``B`` and all of ``A``. Batch whitening
    (W-MSE, decorrelated BatchNorm: ``solve_triangular(cholesky(cov(h)), h.T)``) puts the
    examples on those columns and a matrix of the batch in ``A``; the walk followed such
    ops like elementwise ones, did not follow ``A`` (another shape), and the fast methods
    gave the batch-coupled gradients silently (float64, against the per-example loop:
    errors 0.27-0.48; ``h @ inv(L).T`` was caught, as a product). Now the examples' axis
    is followed in ``B`` where each column (row) is solved alone, ``A`` counts as read by
    every example (a statistic when it reaches the batch), and the examples on the other
    axis of ``B``, or on the last two axes of a function of a whole matrix (``pinv``,
    ``inv``, ``cholesky``, ``matrix_exp``, ``lu_factor``), are a statistic over them.
    Leading (batch) axes are followed in every input that has them."""
    rank = len(shape)
    if a < rank - 2:  # a batch axis of the matrices: each matrix alone
        return None, _same(nexts, shape, a, broadcasts=True)
    if name in _MATRIX_FUNCTIONS:
        return _mixed(name, a), []
    left = bool(getattr(node, "_saved_left", True))
    if a != (rank - 1 if left else rank - 2):
        return _mixed(name, a), []
    ia, ib = _SOLVES[name]
    fns = list(node.next_functions)
    rhs = _shape(*fns[ib]) if ib < len(fns) and fns[ib][0] is not None else None
    axes: list[int | None] = [None, None]  # A: read by every example
    axes[ib] = None if rhs is None else a - (rank - len(rhs))
    return None, _along(node, *axes)


def _moved(node: Any, name: str, shape: list[int], a: int) -> int | None:
    """The input axis that holds output axis ``a`` for an op that moves axes (-1: none
    does, the walk ends), or None for other ops."""
    rank = len(shape)
    if name in ("TransposeBackward0", "TransposeBackward1"):
        d0, d1 = _norm(node._saved_dim0, rank), _norm(node._saved_dim1, rank)
        return d1 if a == d0 else d0 if a == d1 else a
    if name == "TBackward0":
        return rank - 1 - a if rank == 2 else a
    if name == "PermuteBackward0":
        return _norm(node._saved_dims[a], rank)
    if name == "UnsqueezeBackward0":
        d = _norm(node._saved_dim, rank)
        return -1 if a == d else a - (a > d)
    if name in ("SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward2"):
        sizes = list(node._saved_self_sym_sizes)
        dims = getattr(node, "_saved_dim", None)
        dims = None if dims is None else {_norm(d, len(sizes)) for d in
                                          (dims if isinstance(dims, tuple) else (dims,))}
        kept = [i for i, s in enumerate(sizes) if s != 1 or (dims is not None and i not in dims)]
        return kept[a] if a < len(kept) else -1
    if name == "SelectBackward0":
        d = _norm(node._saved_dim, rank + 1)
        return a + (a >= d)
    if name == "AliasBackward0":  # a slice that keeps everything (``h[:]``): every axis kept
        return a
    if name in _VIEWS:
        return _viewed(list(node._saved_self_sym_sizes), shape, a)
    if name == "ViewAsRealBackward0":  # (..., 2) from a complex (...): ``z.real``, ``z.imag``
        return a if a < rank - 1 else -1
    if name == "ViewAsComplexBackward0":
        return a
    return None


def _viewed(sizes: list[int], shape: list[int], a: int) -> int:
    """The axis of a view's input ``sizes`` that holds output axis ``a`` of ``shape``: the
    one that starts at the same offset (elements before it) and whose size is ``shape[a]``
    or a multiple of it (merged rows), or the outermost of the axes merged into it; -1
    when no axis starts there."""
    before, seen = 1, 1
    for s in shape[:a]:
        before *= s
    for i, s in enumerate(sizes):
        if seen == before and s > 1:
            return i if s % shape[a] == 0 or shape[a] % s == 0 else -1
        if seen > before:
            return -1
        seen *= s
    return -1


def _same(nexts: list[tuple[Any, int]], shape: list[int], a: int, broadcasts: bool = False) -> list[Any]:
    """The inputs of an op that keeps the axis (elementwise ops, convolutions, norms,
    matmuls over other axes): those with the same size along it, right-aligned as
    broadcasting aligns them, and, for an elementwise op that ``broadcasts``, those
    broadcast over the examples (no such axis, or size 1 there), as ``(node, output
    number, None)`` (NOTE [statistics over the examples]); contracted ones are not
    followed."""
    out = []
    for n, i in nexts:
        s = _shape(n, i)
        if s is None:
            continue
        j = a - (len(shape) - len(s)) if len(s) <= len(shape) else (a if a == 0 else -1)
        if 0 <= j < len(s) and s[j] == shape[a]:
            out.append((n, i, j))
        elif broadcasts and ((j < 0 and len(s) < len(shape)) or (0 <= j < len(s) and s[j] == 1)):
            out.append((n, i, None))
    return out
