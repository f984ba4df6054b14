"""NOTE [examples merged into axis 0]: models that fold a per-example axis into the batch
axis (augmentation multiplicity, video frames through a 2-d CNN, flattened tokens), every
engine against a per-example autograd loop in float64; other layouts and tables are
refused, and the default method falls back to the loop's numbers."""

from __future__ import annotations

import math
import warnings

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example
from hypothesis import given
from hypothesis import settings
from per_example_reference import float64_default  # noqa: F401 (autouse fixture)
from per_example_reference import loop_grads
from test_grad_sample_broadcast import check
from test_grad_sample_broadcast import close
from test_grad_sample_broadcast import refused_then_loop

import functorch_pipeline as fp
from functorch_pipeline import optim


def _conv_params(g: torch.Generator, cin: int = 2, cout: int = 4, classes: int = 3) -> dict:
    return {"conv.weight": torch.randn(cout, cin, 3, 3, generator=g) * 0.5,
            "conv.bias": torch.randn(cout, generator=g),
            "norm.weight": torch.rand(cout, generator=g) + 0.5,
            "norm.bias": torch.randn(cout, generator=g),
            "head.weight": torch.randn(classes, cout, generator=g),
            "head.bias": torch.randn(classes, generator=g)}


def _augmented(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """De et al.'s augmentation multiplicity: ``x`` is ``(B, K, C, H, W)``, ``K``
    augmentations of each example, run as one batch of ``B * K`` images; each example's
    loss is the mean over its augmentations."""
    b, k = x.shape[:2]
    logits = _cnn_logits(p, x.reshape(b * k, *x.shape[2:]))  # (B K, classes)
    return F.cross_entropy(logits, y.repeat_interleave(k), reduction="none").reshape(b, k).mean(1)


def _cnn_logits(p: dict, images: torch.Tensor) -> torch.Tensor:
    """Conv, GroupNorm, ReLU, mean pooling and a Linear head, image by image."""
    h = F.conv2d(images, p["conv.weight"], p["conv.bias"], padding=1)
    h = F.relu(F.group_norm(h, 2, p["norm.weight"], p["norm.bias"]))
    return F.linear(h.mean((2, 3)), p["head.weight"], p["head.bias"])


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 4), k=st.integers(1, 4), seed=st.integers(0, 2**16))
@example(batch=2, k=2, seed=0)  # K == B
@example(batch=1, k=3, seed=1)
def test_augmentation_multiplicity_matches_the_loop(batch, k, seed):
    """hooks' per-example gradients and ghost's, hooks' and auto's norms and clipped sums
    of an augmented batch, against the loop (auto must not fall back)."""
    g = torch.Generator().manual_seed(seed)
    params = _conv_params(g)
    x, y = torch.randn(batch, k, 2, 5, 5, generator=g), torch.randint(0, 3, (batch,), generator=g)
    check(_augmented, params, x, y)


def test_video_frames_through_a_2d_cnn_match_the_loop():
    """Frames ``(B, T, C, H, W)`` through a conv as ``B * T`` images, a per-frame Linear on
    the flattened ``(B * T, F)`` features, then the frames averaged per clip."""
    g = torch.Generator().manual_seed(3)
    params = {"conv.weight": torch.randn(3, 1, 3, 3, generator=g),
              "conv.bias": torch.randn(3, generator=g),
              "frame.weight": torch.randn(4, 3 * 4 * 4, generator=g) * 0.2,
              "frame.bias": torch.randn(4, generator=g),
              "ln.weight": torch.rand(4, generator=g) + 0.5, "ln.bias": torch.randn(4, generator=g),
              "head.weight": torch.randn(2, 4, generator=g), "head.bias": torch.randn(2, generator=g)}

    def losses(p, clips, y):
        b, t = clips.shape[:2]
        h = torch.tanh(F.conv2d(clips.flatten(0, 1), p["conv.weight"], p["conv.bias"]))
        h = F.linear(h.flatten(1), p["frame.weight"], p["frame.bias"])  # (B T, 4)
        h = F.layer_norm(torch.tanh(h), (4,), p["ln.weight"], p["ln.bias"]).reshape(b, t, 4)
        return F.cross_entropy(F.linear(h.mean(1), p["head.weight"], p["head.bias"]), y,
                               reduction="none")

    for batch, frames in ((3, 5), (4, 2), (2, 2)):
        check(losses, params, torch.randn(batch, frames, 1, 6, 6, generator=g),
              torch.randint(0, 2, (batch,), generator=g))


@pytest.mark.parametrize("batch, length", [(3, 4), (2, 2), (1, 5), (4, 3)])
def test_flattened_tokens_match_the_loop(batch, length):
    """Token ids flattened to one axis (``ids.reshape(-1)``), embedded, and a Linear on
    ``(B * T, E)``; 1-d ids read from the batch with ``T`` per example."""
    g = torch.Generator().manual_seed(batch * 10 + length)
    params = {"emb": torch.randn(7, 4, generator=g), "lin.weight": torch.randn(3, 4, generator=g),
              "lin.bias": torch.randn(3, generator=g)}

    def losses(p, ids):
        b, t = ids.shape
        h = torch.tanh(F.linear(F.embedding(ids.reshape(-1), p["emb"]), p["lin.weight"],
                                p["lin.bias"]))
        return h.reshape(b, t, 3).pow(2).sum((1, 2))

    check(losses, params, torch.randint(0, 7, (batch, length), generator=g))


def test_scale_grad_by_freq_counts_ids_per_example_across_merged_rows():
    """``scale_grad_by_freq`` divides by the count of an id within each example: with the
    examples' ``(T,)`` rows of ids merged into axis 0, the count spans all of an example's
    rows, as the loop's does."""
    g = torch.Generator().manual_seed(5)
    params = {"emb": torch.randn(4, 3, generator=g)}

    def losses(p, ids):
        b, k, t = ids.shape
        e = F.embedding(ids.reshape(b * k, t), p["emb"], scale_grad_by_freq=True)
        return torch.tanh(e).pow(2).reshape(b, -1).sum(1)

    ids = torch.tensor([[[0, 1], [1, 1]], [[2, 2], [3, 0]], [[1, 2], [0, 0]]])
    check(losses, params, ids)


def _concatenated(p: dict, x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Augmentation multiplicity written with ``torch.cat``: ``k`` augmentations of the
    whole batch (shifts and a scale) stacked as blocks, row ``j * B + b`` (NOTE [examples
    last] in ``_engine``); the same conv, GroupNorm and Linear as :func:`_augmented`."""
    b = x.shape[0]
    augs = torch.cat([torch.roll(x, j, dims=-1) * (1 + 0.1 * j) for j in range(k)])
    logits = _cnn_logits(p, augs)  # (k B, classes)
    return F.cross_entropy(logits, y.repeat(k), reduction="none").reshape(k, b).mean(0)


@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 4), k=st.integers(2, 3), seed=st.integers(0, 2**16))
@example(batch=2, k=2, seed=0)  # K == B
@example(batch=3, k=2, seed=1)
def test_augmentations_concatenated_as_blocks_match_the_loop(batch, k, seed):
    """NOTE [examples last]: ``torch.cat`` of ``k`` augmented copies of the batch was
    refused (hooks) and fell back to ``vmap`` (auto); a padded run now shows the blocks,
    and hooks' per-example gradients and ghost's, hooks' and auto's norms and clipped sums
    are the loop's (auto must not fall back)."""
    g = torch.Generator().manual_seed(seed)
    params = _conv_params(g)
    x, y = torch.randn(batch, 2, 5, 5, generator=g), torch.randint(0, 3, (batch,), generator=g)
    check(lambda p, x, y: _concatenated(p, x, y, k), params, x, y)


@pytest.mark.parametrize("batch", [2, 3])
def test_rows_in_neither_layout_are_refused_and_fall_back(batch):
    """A ``(K * B, ...)`` input whose rows are neither ``K`` per example nor ``K`` blocks of
    the batch (the blocks' rows rolled by one) is refused by hooks, and the default method
    falls back to the loop's numbers; the blocks themselves are taken (examples last)."""
    g = torch.Generator().manual_seed(batch)
    params = {"w": torch.randn(3, 4, generator=g), "v": torch.randn(3, generator=g)}

    def blocks(p, x):  # (B, 2, 4) -> (2 B, 4), row k * B + b
        h = torch.tanh(F.linear(x.transpose(0, 1).reshape(-1, 4), p["w"], p["v"]))
        return h.reshape(2, -1, 3).pow(2).sum((0, 2))

    def rolled_rows(p, x):  # row k * B + b moved to the next row
        h = torch.tanh(F.linear(x.transpose(0, 1).reshape(-1, 4).roll(1, 0), p["w"], p["v"]))
        return h.roll(-1, 0).reshape(2, -1, 3).pow(2).sum((0, 2))

    x = torch.randn(batch, 2, 4, generator=g)
    check(blocks, params, x)
    refused_then_loop(rolled_rows, params, x, match="holds neither 2 consecutive rows per example")


def test_a_batch_of_one_takes_any_rows_as_its_own():
    """With one example every row is its own, whatever the layout (examples last, a table of
    rows): no padded run is needed, so ``has_aux``, which is never padded, takes hooks too."""
    g = torch.Generator().manual_seed(1)
    params = {"w": torch.randn(3, 4, generator=g), "v": torch.randn(3, generator=g)}
    table = torch.randn(5, 4, generator=g)

    def losses(p, x):  # (1, 2, 4) -> (2, 4) rows, and a (5, 4) table
        h = torch.tanh(F.linear(x.transpose(0, 1).reshape(-1, 4), p["w"], p["v"]))
        t = torch.tanh(F.linear(table, p["w"])).sum(0)
        return h.reshape(2, -1, 3).pow(2).sum((0, 2)) + t.sum()

    x = torch.randn(1, 2, 4, generator=g)
    check(losses, params, x)
    want = loop_grads(losses, params, x)
    got, aux = fp.per_sample_grads(lambda p, x: (losses(p, x), x.sum()), method="hooks",
                                   has_aux=True)(params, x)
    assert all(close(got[k], want[k]) for k in want)


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_a_table_with_a_multiple_of_b_rows_is_a_constant(batch):
    """A constant table with ``2 * B`` rows through a Linear is neither ``2`` rows per
    example (its padding rows do not repeat) nor the examples: at a padded size it has no
    batch axis, so its result is a derived tensor (NOTE [constants or batch data])."""
    g = torch.Generator().manual_seed(batch)
    params = {"w": torch.randn(3, 4, generator=g), "v": torch.randn(3, generator=g)}
    table = torch.randn(2 * batch, 4, generator=g)

    def losses(p, x):
        h = torch.tanh(F.linear(table, p["w"], p["v"]))  # (2 B, 3), no examples
        return torch.tanh(x.flatten(1)[:, :3] * h.mean(0)).sum(1)

    check(losses, params, torch.randn(batch, 2, 4, generator=g))


def test_has_aux_with_merged_rows_falls_back():
    """``has_aux`` is never padded, so merged rows cannot be shown: ghost clipping refuses,
    and the default method falls back (one warning) to the loop's norms and clipped sum."""
    g = torch.Generator().manual_seed(7)
    params = _conv_params(g)
    x, y = torch.randn(3, 2, 2, 5, 5, generator=g), torch.randint(0, 3, (3,), generator=g)

    def with_aux(p, x, y):
        losses = _augmented(p, x, y)
        return losses, losses.detach() * 2

    with pytest.raises(ValueError, match="which only a padded batch can show"):
        fp.clipped_grad(with_aux, 1.0, has_aux=True, method="ghost")(params, x, y)
    with pytest.warns(UserWarning, match="'vmap'"):
        (total, norms), aux = fp.clipped_grad(with_aux, 0.5, has_aux=True)(params, x, y)
    per = loop_grads(_augmented, params, x, y)
    want_norms = sum(v.reshape(3, -1).pow(2).sum(1) for v in per.values()).sqrt()
    factor = (0.5 / want_norms).clamp(max=1.0)
    assert close(norms, want_norms)
    assert all(close(total[k], (per[k] * factor.reshape(-1, *[1] * (per[k].dim() - 1))).sum(0))
               for k in per)
    assert close(aux.reshape(-1), 2 * _augmented(params, x, y))  # vmap: (B, 1) per example


@pytest.mark.parametrize("chunk", [None, 2])
def test_a_dp_step_with_augmentation_multiplicity(chunk):
    """``DPTrainer.clipped_sum`` on an augmented batch with a mask and physical chunks:
    the clipped sum of the masked-in examples' gradients (each the gradient of its mean
    over augmentations), against the loop; the default method, with no fall-back."""
    g = torch.Generator().manual_seed(11)
    params = _conv_params(g)
    x, y = torch.randn(5, 3, 2, 5, 5, generator=g), torch.randint(0, 3, (5,), generator=g)
    mask = torch.tensor([True, True, False, True, False])

    def losses(p, batch):
        return _augmented(p, *batch)

    trainer = fp.train.DPTrainer(losses, optim.sgd(1.0), l2_norm_clip=0.3, noise_multiplier=0.0,
                                 sample_rate=0.5, expected_batch_size=5.0,
                                 max_physical_batch_size=chunk)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        total, _, norms = trainer.clipped_sum(params, (x, y), mask)
    per = loop_grads(_augmented, params, x, y)
    want = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(5):
        norm = math.sqrt(sum(float(per[k][i].pow(2).sum()) for k in per))
        if mask[i]:
            assert abs(float(norms[i]) - norm) <= 1e-10 * max(1.0, norm)
            for k in per:
                want[k] += per[k][i] * min(1.0, 0.3 / norm)
    assert all(close(total[k], want[k]) for k in want)


@pytest.mark.parametrize("batch, k, positions", [(2, 3, 3), (2, 2, 3), (3, 2, 4)])
def test_merged_rows_with_an_axis_of_the_padded_size(batch, k, positions):
    """Merged rows ``(B * K, P, D)`` whose position axis ``P`` equals the padded batch
    size: an activation at the padded size looks sequence-first ``(T, B', D)`` by size,
    and was read that way (a random search: per-example gradients off by 5.9). Padded,
    axis 1 must repeat the first example too, so the rows are read as merged."""
    g = torch.Generator().manual_seed(batch * 10 + k)
    params = {"w1": torch.randn(4, 3, generator=g), "b1": torch.randn(4, generator=g),
              "head": torch.randn(2, 4, generator=g)}

    def losses(p, x):
        b, m = x.shape[:2]
        h = torch.tanh(F.linear(x.reshape(b * m, *x.shape[2:]), p["w1"], p["b1"]))
        return F.linear(h, p["head"]).pow(2).reshape(b, -1).sum(1)

    check(losses, params, torch.randn(batch, k, positions, 3, generator=g))


@pytest.mark.parametrize("batch", [1, 2, 3])
@pytest.mark.parametrize("kw", [{}, {"add_bias_kv": True, "kdim": 3, "vdim": 3}],
                         ids=["packed", "bias_kv-separate"])
def test_attention_on_merged_rows_matches_the_loop(batch, kw):
    """``nn.MultiheadAttention`` (batch first) on ``K = 2`` augmentations of each example
    merged into its batch axis: the query has ``2 * B`` rows, proven by the padded run; the
    rule's per-row parts (``bias_k``, ``bias_v``, a separate projection's bias) are summed
    per example."""
    torch.manual_seed(batch)
    mha = torch.nn.MultiheadAttention(4, 2, batch_first=True, **kw)
    head = torch.nn.Linear(4, 1)
    params = {**{f"mha.{k}": v.detach() for k, v in mha.named_parameters()},
              **{f"head.{k}": v.detach() for k, v in head.named_parameters()}}
    proj = torch.randn(3, 4)

    def losses(p, x):
        b, k = x.shape[:2]
        q = x.reshape(b * k, *x.shape[2:])  # (B K, T, 3)
        mp = {k[4:]: v for k, v in p.items() if k.startswith("mha.")}
        kv = q if kw else q @ proj
        out, _ = torch.func.functional_call(mha, mp, (q @ proj, kv, kv), {"need_weights": False})
        y = torch.func.functional_call(head, {"weight": p["head.weight"], "bias": p["head.bias"]},
                                       (torch.tanh(out),))
        return y.pow(2).reshape(b, -1).sum(1)

    check(losses, params, torch.randn(batch, 2, 3, 3))


def test_weight_standardised_convs_with_augmentation_multiplicity():
    """De et al.'s recipe: weight-standardised convs (a weight derived from the parameter,
    NOTE [derived parameters]) with GroupNorm, on ``K`` augmentations merged into the
    batch axis: the per-row gradients of the derived weight are summed per example, then
    pulled back through the standardisation."""
    g = torch.Generator().manual_seed(13)
    params = _conv_params(g)

    def standardised(w):
        return (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)

    def losses(p, x, y):
        q = dict(p, **{"conv.weight": standardised(p["conv.weight"])})
        return _augmented(q, x, y)

    for batch, k in ((3, 2), (2, 4), (1, 3)):
        check(losses, params, torch.randn(batch, k, 2, 5, 5, generator=g),
              torch.randint(0, 3, (batch,), generator=g))


@pytest.mark.parametrize("batch", [1, 2, 3])
@pytest.mark.parametrize("layout", ["example-major", "examples last"])
def test_a_parameter_expanded_to_a_row_per_augmentation(batch, layout):
    """``tok.expand(B * K, -1)``: the expand follows the batch at two sizes, so its rows
    are taken as ``K`` per example, and their output gradients must show it (padding
    examples' rows repeat the first's). Example-major, that holds and hooks and ghost
    match the loop; with the examples last, where only the gradients could tell, the
    expand is refused and the default method falls back to the loop's numbers."""
    g = torch.Generator().manual_seed(batch)
    params = {"tok": torch.randn(1, 4, generator=g)}

    def losses(p, x):
        b, k = x.shape[:2]
        rows = (x.reshape(b * k, 4) if layout == "example-major"
                else x.transpose(0, 1).reshape(k * b, 4))
        out = torch.tanh(rows * p["tok"].expand(b * k, -1))
        if layout == "example-major":
            return out.pow(2).reshape(b, -1).sum(1)
        return out.pow(2).reshape(k, b, 4).sum((0, 2))

    x = torch.randn(batch, 2, 4, generator=g)
    if layout == "example-major":
        check(losses, params, x)
    elif batch > 1:  # a batch of one has one layout
        refused_then_loop(losses, params, x, match="do not group by example")


def test_a_vision_transformer_with_augmentation_multiplicity():
    """torchvision's ``VisionTransformer`` on ``K`` augmentations merged into the batch
    axis: the class token expanded to ``B * K`` rows, the positional embedding, attention
    on merged rows; hooks and ghost against the loop."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=8, patch_size=4, num_layers=1,
                                                 num_heads=2, hidden_dim=8, mlp_dim=16,
                                                 num_classes=3)
    torch.nn.init.normal_(model.heads.head.weight, std=0.1)  # torchvision zeroes it
    params = {k: v.detach() for k, v in model.named_parameters()}

    def losses(p, x, y):
        b, k = x.shape[:2]
        out = torch.func.functional_call(model, p, (x.reshape(b * k, *x.shape[2:]),))
        return F.cross_entropy(out, y.repeat_interleave(k), reduction="none").reshape(b, k).mean(1)

    g = torch.Generator().manual_seed(1)
    for batch, k in ((3, 2), (1, 3)):
        check(losses, params, torch.randn(batch, k, 3, 8, 8, generator=g),
              torch.randint(0, 3, (batch,), generator=g))


@pytest.mark.parametrize("layer", ["conv2d", "conv1d", "conv3d", "conv_transpose2d"])
@pytest.mark.parametrize("chunked", [False, True])
def test_conv_rows_are_summed_per_example_in_chunks(layer, chunked, monkeypatch):
    """A conv's per-row weight gradients on merged rows are formed a chunk of examples at a
    time (``Engine.summed_rows``: at most ``MERGED_BYTES`` of them at once; 1 byte here
    makes every example its own chunk) and summed per example: the same numbers as the
    loop either way, for every conv rule."""
    from functorch_pipeline.transforms._grad_sample import _engine

    if chunked:
        monkeypatch.setattr(_engine, "MERGED_BYTES", 1)
    g = torch.Generator().manual_seed(len(layer))
    make = {"conv2d": lambda: torch.nn.Conv2d(2, 3, 2), "conv1d": lambda: torch.nn.Conv1d(2, 3, 2),
            "conv3d": lambda: torch.nn.Conv3d(2, 3, 2),
            "conv_transpose2d": lambda: torch.nn.ConvTranspose2d(2, 3, 2, stride=2)}[layer]
    torch.manual_seed(0)
    conv = make()
    params = {k: v.detach() for k, v in conv.named_parameters()}
    shape = {"conv2d": (4, 4), "conv1d": (5,), "conv3d": (3, 3, 3), "conv_transpose2d": (3, 3)}[layer]

    def losses(p, x):
        b, k = x.shape[:2]
        out = torch.func.functional_call(conv, p, (x.reshape(b * k, *x.shape[2:]),))
        return torch.tanh(out).pow(2).reshape(b, -1).sum(1)

    x = torch.randn(3, 2, 2, *shape, generator=g)
    if layer in ("conv2d", "conv1d"):
        check(losses, params, x)
        return
    # conv3d and transposed convs have hooks rules only (ghost refuses them: HooksOnly)
    want = loop_grads(losses, params, x)
    got = fp.per_sample_grads(losses, method="hooks")(params, x)
    assert all(close(got[k], want[k]) for k in want)
    norms = sum(v.reshape(3, -1).pow(2).sum(1) for v in want.values()).sqrt()
    total, n = fp.clipped_grad(losses, float(norms.median()), method="hooks")(params, x)
    factor = (norms.median() / norms).clamp(max=1.0)
    assert close(n, norms)
    assert all(close(total[k], (want[k] * factor.reshape(-1, *[1] * (want[k].dim() - 1))).sum(0))
               for k in want)


def test_a_reshape_of_the_examples_needs_no_padded_run():
    """Rows made by reshaping a tensor whose axis 0 holds the examples (the batch's
    ``x.reshape(B * K, ...)``, an activation's ``h.view(-1, F)``) are ``K`` rows per
    example by construction: no padded run, so ``has_aux``, which is never padded, takes
    hooks at B > 1 too (it fell back to ``vmap``)."""
    g = torch.Generator().manual_seed(3)
    params = {"w": torch.randn(3, 4, generator=g), "v": torch.randn(3, generator=g),
              "u": torch.randn(2, 3, generator=g)}

    def losses(p, x):
        b, k = x.shape[:2]
        h = torch.tanh(F.linear(x.reshape(b * k, 4), p["w"], p["v"]))  # the batch reshaped
        h = torch.sin(h.view(b, k, 3))  # a fresh (B, K, 3) activation
        h = F.linear(h.reshape(-1, 3), p["u"])  # viewed as rows
        return h.pow(2).reshape(b, -1).sum(1)

    x = torch.randn(3, 2, 4, generator=g)
    want = loop_grads(losses, params, x)
    got, aux = fp.per_sample_grads(lambda p, x: (losses(p, x), x.sum()), method="hooks",
                                   has_aux=True)(params, x)
    assert all(close(got[k], want[k]) for k in want)
    check(losses, params, x)


def test_dropout_in_training_mode_on_flattened_rows_takes_hooks():
    """GPT-2's Conv1D flattens tokens into rows (``x.view(-1, F)``). With dropout in
    training mode a padded run cannot show the layout (the padding rows draw their own
    masks) and the call was refused; the reshape shows it. Per-example gradients come from
    the batch's own draws, so their sum equals the batch gradient under the same seed."""
    from test_grad_sample_products import GPT2Block

    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Dropout(0.2), GPT2Block(), torch.nn.Dropout(0.2)).train()
    params = {k: v.detach() for k, v in block.named_parameters()}

    def losses(p, x):
        return torch.func.functional_call(block, p, (x,)).pow(2).sum((1, 2))

    x = torch.randn(3, 4, 4)
    torch.manual_seed(7)
    got = fp.per_sample_grads(losses, method="hooks")(params, x)
    torch.manual_seed(7)
    want = fp.grad(lambda p, x: losses(p, x).sum())(params, x)
    for k in want:
        torch.testing.assert_close(got[k].sum(0), want[k], rtol=1e-10, atol=1e-12)


class _ReplayedDropout(torch.nn.Module):
    """Dropout that keeps the masks it draws, or multiplies by ``replay`` when set: the
    loop over examples replays each example's rows of the batch's mask."""

    def __init__(self) -> None:
        super().__init__()
        self.masks: list[torch.Tensor] = []
        self.replay: torch.Tensor | None = None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.replay is not None:
            return z * self.replay
        mask = (torch.rand_like(z) > 0.3).to(z.dtype) / 0.7
        self.masks.append(mask)
        return z * mask


class _OPTFeedForward(torch.nn.Module):
    """OPT's feed-forward block: tokens flattened to rows, ``fc2(dropout(relu(fc1(.))))``,
    then viewed back and added to the residual."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(d, 3 * d), torch.nn.Linear(3 * d, d)
        self.drop, self.head, self.d = _ReplayedDropout(), torch.nn.Linear(d, 2), d

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.fc2(self.drop(F.relu(self.fc1(h.reshape(-1, self.d)))))
        return self.head(z.view(h.shape) + h).sum(1)


@pytest.mark.parametrize("batch, length", [(3, 5), (2, 2), (4, 1)])
def test_dropout_between_two_layers_on_flattened_rows_matches_the_loop(batch, length):
    """NOTE [rows kept through elementwise ops]: ``fc2`` reads ``dropout(relu(fc1(rows)))``,
    fresh rows that only a padded run could place, and dropout defeats it (hooks and ghost
    refused, ``auto``'s ``vmap`` cannot draw random numbers). The rows are ``fc1``'s, kept
    through two elementwise ops: one forward, one mask, and each example's gradient with
    its own rows of that mask equals the loop's."""
    torch.manual_seed(0)
    model = _OPTFeedForward().double()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def losses(p, x):
        return torch.func.functional_call(model, p, (x,)).pow(2).sum(1)

    x = torch.randn(batch, length, 4)
    runs = {"hooks": lambda: fp.per_sample_grads(losses, method="hooks")(params, x),
            "auto": lambda: fp.per_sample_grads(losses)(params, x),
            "ghost": lambda: fp.per_sample_grad_norms(losses, method="ghost")(params, x),
            "clipped": lambda: fp.clipped_grad(losses, 0.5, method="ghost")(params, x)}
    for name, run in runs.items():
        model.drop.masks.clear()
        got = run()
        assert len(model.drop.masks) == 1, name  # no padded run
        mask = model.drop.masks[0]
        try:
            per = []
            for i in range(batch):
                model.drop.replay = mask[i * length:(i + 1) * length]
                per.append(loop_grads(losses, params, x[i:i + 1]))
        finally:
            model.drop.replay = None
        want = {k: torch.cat([r[k] for r in per]) for k in params}
        norms = torch.cat([w.flatten(1) for w in want.values()], 1).norm(dim=1)
        if name == "ghost":
            torch.testing.assert_close(got, norms, rtol=1e-10, atol=1e-12)
        elif name == "clipped":
            grads, got_norms = got
            scale = (0.5 / norms).clamp(max=1.0)
            for k in want:
                torch.testing.assert_close(
                    grads[k], (want[k] * scale.reshape(-1, *[1] * (want[k].dim() - 1))).sum(0),
                    rtol=1e-10, atol=1e-12)
        else:
            assert all(close(got[k], want[k]) for k in want), name


def test_rows_are_not_kept_through_a_second_input_with_a_graph():
    """A residual sum of two activations ends the walk (either could be anything): the
    padded run decides, as before, and the numbers are the loop's."""
    g = torch.Generator().manual_seed(5)
    params = {"w1": torch.randn(6, 4, generator=g), "w2": torch.randn(6, 6, generator=g),
              "w3": torch.randn(2, 6, generator=g)}
    forwards = []

    def losses(p, x):
        forwards.append(x.shape[0])
        z = F.linear(x.reshape(-1, 4), p["w1"])
        z = F.gelu(z) + torch.tanh(z)  # two inputs with a graph
        z = F.linear(z, p["w2"]) * 0.5  # its input needs the padded run
        return F.linear(z, p["w3"]).reshape(x.shape[0], -1).pow(2).sum(1)

    x = torch.randn(3, 2, 4, generator=g)
    got = fp.per_sample_grads(losses, method="hooks")(params, x)
    assert len(forwards) == 2 and forwards[1] > 3  # the batch ran again, padded
    want = loop_grads(losses, params, x)
    assert all(close(got[k], want[k]) for k in want)


def test_rows_are_kept_through_a_chain_of_elementwise_ops_with_one_forward():
    g = torch.Generator().manual_seed(6)
    params = {"w1": torch.randn(5, 4, generator=g), "b1": torch.randn(5, generator=g),
              "w2": torch.randn(3, 5, generator=g)}
    scale = torch.rand(5, generator=g) + 0.5  # a constant broadcast over the rows
    forwards = []

    def losses(p, x):
        forwards.append(x.shape[0])
        z = F.linear(x.reshape(-1, 4), p["w1"], p["b1"])
        z = (torch.tanh(F.gelu(z)) * scale - 0.25).clamp(min=-0.5).exp()
        return F.linear(z, p["w2"]).reshape(x.shape[0], -1).pow(2).sum(1)

    x = torch.randn(4, 3, 4, generator=g)
    got = fp.per_sample_grads(losses, method="hooks")(params, x)
    assert forwards == [4]  # no padded run
    want = loop_grads(losses, params, x)
    assert all(close(got[k], want[k]) for k in want)


@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 4), positions=st.integers(1, 4), heads=st.integers(1, 2),
       derived=st.booleans(), seed=st.integers(0, 2 ** 16))
@example(batch=3, positions=3, heads=1, derived=True, seed=0)  # positions as many as examples
def test_a_matrix_per_position_over_merged_rows_matches_the_loop(batch, positions, heads, derived, seed):
    """NOTE [a matrix per position]: MViT's temporal relative-position term, ``r_q`` of
    shape ``(T, B * heads * S, d)`` (a permute, then the examples merged with the other axes
    into the rows) times a ``(T, d, K)`` stack, a parameter or looked up from a table with a
    constant index and transposed (``rel_pos_t[dist].transpose(1, 2)``)."""
    g = torch.Generator().manual_seed(seed)
    T, S, d, K = positions, 2, 3, 2
    params = {"W": torch.randn(T, d, K, generator=g), "table": torch.randn(2 * T - 1, d, generator=g),
              "proj": torch.randn(d, d, generator=g)}
    x = torch.randn(batch, heads, T, S, d, generator=g)

    def losses(p, xb):
        B = xb.shape[0]
        h = F.linear(xb, p["proj"])  # the rows have a graph, as MViT's queries do
        r_q = h.permute(2, 0, 1, 3, 4).reshape(T, B * heads * S, d)
        if derived:  # (T, d, T), MViT's Rt.transpose(1, 2)
            dist = torch.arange(T)[:, None] - torch.arange(T)[None, :] + T - 1
            stack = p["table"][dist].transpose(1, 2)
        else:
            stack = p["W"]  # (T, d, K)
        out = torch.matmul(r_q, stack).transpose(0, 1)  # (B heads S, T, K or T)
        return torch.tanh(out).reshape(B, -1).pow(2).sum(1)

    check(losses, params, x)


@pytest.mark.parametrize("batch, length", [(1, 3), (2, 3), (3, 3), (4, 2)])
@pytest.mark.parametrize("eq", ["nd,dhk->nhk", "nd,dhk->hnk"])
def test_an_einsum_on_merged_rows_sums_each_examples_rows_in_the_product(batch, length, eq):
    """NOTE [a matrix per position]: an einsum's per-example part over ``m`` rows per
    example is formed summed (the examples' index first in the output, or not)."""
    g = torch.Generator().manual_seed(batch + length)
    d = 3
    params = {"proj": torch.randn(d, d, generator=g), "R": torch.randn(d, 2, 2, generator=g)}
    x = torch.randn(batch, length, d, generator=g)

    def losses(p, xb):
        h = F.linear(xb, p["proj"]).reshape(-1, d)  # (B T, d): T rows per example
        out = torch.einsum(eq, h, p["R"])
        out = out.transpose(0, 1) if eq.endswith("hnk") else out
        return torch.tanh(out).reshape(xb.shape[0], -1).pow(2).sum(1)

    check(losses, params, x)
