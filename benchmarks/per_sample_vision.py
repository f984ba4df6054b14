"""Per-sample gradients and clipped sums of the image models DP researchers train, against
the plain batch gradient.

Four models, 32 x 32 RGB inputs, 10 classes, cross entropy per example:

* ``resnet``: a small CIFAR ResNet-style GroupNorm network (3 -> 16 stem, 16 -> 16,
  16 -> 32 stride 2, 32 -> 32), batch 128. Its 3-channel first conv takes the grouped
  forward kernel (NOTE [first-layer kernels]); an Opacus ``GradSampleModule`` row when
  ``opacus`` is installed.
* ``augmult``: the same network with augmentation multiplicity (De et al. 2022): ``K = 4``
  augmentations of each of 64 examples as one batch of 256 images, each example's loss the
  mean over its augmentations (NOTE [examples merged into axis 0]). Before this stop every
  fp method fell back to ``vmap(grad)``. Opacus has no row: its per-sample gradients
  would be per image, not per example.
* ``convnext``: a patchify stem and two torchvision ``CNBlock`` (depthwise 7 x 7,
  channels-last LayerNorm and MLP, ``layer_scale`` of shape ``(C, 1, 1)``: NOTE
  [broadcast parameters]), batch 64; it fell back to ``vmap`` before.
* ``swin``: torchvision's ``SwinTransformer`` at 32 x 32 (patch 2, width 32, depths 2 and
  2, window 4), batch 32: windows merged into the batch axis and the relative position
  bias read through its index buffer (NOTE [derived parameters]); it fell back to
  ``vmap`` before.
* ``vit-augmult``: ``per_sample_vit.py``'s ``VisionTransformer`` (4 x 4 patches, 2 layers,
  width 64) with ``K = 4`` augmentations of each of 16 examples: the class token expanded
  to a row per augmentation, attention on merged rows; it fell back to ``vmap`` before.

The yardstick is ``fp.grad`` of the batch's mean loss; the ``vmap`` rows are what the
default method ran before (each checked against the default first). Rows run in one
process, interleaved; ratios are throughput ratios against the yardstick.

    .venv/bin/python benchmarks/per_sample_vision.py
    .venv/bin/python benchmarks/per_sample_vision.py --model augmult --rounds 20
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _common  # noqa: E402

import functorch_pipeline as fp  # noqa: E402

YARDSTICK = "fp.grad of the mean loss (yardstick)"
MODELS = ("resnet", "augmult", "convnext", "swin", "vit-augmult")


def resnet() -> nn.Module:
    """The CIFAR ResNet-style GroupNorm network of ``resnet`` and ``augmult``, seeded."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.GroupNorm(4, 32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.GroupNorm(4, 32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def convnext() -> nn.Module:
    """A patchify stem (4 x 4, stride 4) and two torchvision ``CNBlock``, seeded."""
    from functools import partial

    from torchvision.models.convnext import CNBlock
    from torchvision.models.convnext import LayerNorm2d

    torch.manual_seed(0)
    norm = partial(nn.LayerNorm, eps=1e-6)
    return nn.Sequential(nn.Conv2d(3, 48, 4, stride=4), LayerNorm2d(48),
                         CNBlock(48, 0.1, 0.0, norm), CNBlock(48, 0.1, 0.0, norm),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 10))


def swin() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.SwinTransformer(
        patch_size=[2, 2], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
        num_classes=10).eval()


def vit() -> nn.Module:
    from per_sample_vit import _model

    return _model()


def setup(name: str, batch: int | None) -> tuple[Callable[..., torch.Tensor], nn.Module,
                                                  tuple[torch.Tensor, torch.Tensor]]:
    """``(losses, model, (x, y))`` for one model at its default (or the given) batch."""
    make = {"resnet": resnet, "augmult": resnet, "convnext": convnext, "swin": swin,
            "vit-augmult": vit}[name]
    model = make()
    n = batch or {"resnet": 128, "augmult": 64, "convnext": 64, "swin": 32, "vit-augmult": 16}[name]
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 10, (n,), generator=g)
    if name.endswith("augmult"):
        x = torch.randn(n, 4, 3, 32, 32, generator=g)

        def losses(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            b, k = x.shape[:2]
            out = torch.func.functional_call(model, p, (x.reshape(b * k, *x.shape[2:]),))
            each = F.cross_entropy(out, y.repeat_interleave(k), reduction="none")
            return each.reshape(b, k).mean(1)
    else:
        x = torch.randn(n, 3, 32, 32, generator=g)

        def losses(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(torch.func.functional_call(model, p, (x,)), y, reduction="none")

    return losses, model, (x, y)


def candidates(name: str, batch: int | None = None) -> tuple[dict[str, Any], int]:
    losses, model, (x, y) = setup(name, batch)
    params = {k: v.detach() for k, v in model.named_parameters()}
    grad = fp.grad(lambda p, x, y: losses(p, x, y).mean())
    rows, want = _common.fast_and_vmap_rows(losses, params, (x, y))
    fns = {YARDSTICK: lambda: grad(params, x, y), **rows}
    if name == "resnet":
        fns.update(_common.opacus_row(resnet, F.cross_entropy, x, y, want.values()))
    elif name.endswith("augmult"):
        print("  Opacus: no row (its per-sample gradients are per image, not per example)")
    return fns, x.shape[0]


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--model", choices=(*MODELS, "all"), default="all")
    p.add_argument("--batch", type=int, default=None, help="examples per batch (default: per model)")
    args = p.parse_args()
    if _common.begin(args):
        return
    for name in MODELS if args.model == "all" else (args.model,):
        print(f"\n{name}:")
        fns, n = candidates(name, args.batch)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stats = _common.measure(fns, rounds=args.rounds, budget_s=args.budget)
        print(_common.table(stats, {"yardstick": YARDSTICK}, n,
                            f"per-sample gradients, {name}, batch {n}"))


if __name__ == "__main__":
    main()
