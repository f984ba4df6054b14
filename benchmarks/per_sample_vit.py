"""Per-sample gradients and clipped sums of a vision transformer, against the plain batch
gradient.

Model: torchvision's ``VisionTransformer`` (32 x 32 images, 4 x 4 patches: 64 patch
tokens and a class token; 2 layers, 4 heads, width 64, MLP 128, dropout 0), 10 classes,
cross entropy, batch 32. Its class token (``class_token.expand(B, -1, -1)``) and
positional embedding (``x + pos_embedding``) are parameters broadcast over the batch
(NOTE [broadcast parameters]); before those rules every fp method fell back to
``vmap(grad)``, which is a row here for comparison. The yardstick is one eager
``backward()`` of the mean loss. Rows run in one process, interleaved; ratios are
throughput ratios (> 1 is faster than the yardstick). When ``opacus`` is installed its
``GradSampleModule`` is tried on the same model and is a row if it accepts it.

    .venv/bin/python benchmarks/per_sample_vit.py
    .venv/bin/python benchmarks/per_sample_vit.py --batch 64 --rounds 20
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _common  # noqa: E402

YARDSTICK = "batch gradient (yardstick)"


def _model() -> torch.nn.Module:
    """The ViT, seeded; its classifier head re-initialised (torchvision zeroes it, which
    would make every gradient but the head's zero at these weights)."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=4, num_layers=2,
                                                 num_heads=4, hidden_dim=64, mlp_dim=128,
                                                 num_classes=10)
    torch.nn.init.normal_(model.heads.head.weight, std=0.1)
    return model


def candidates(batch: int) -> dict[str, Any]:
    model = _model()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))

    def losses(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(torch.func.functional_call(model, p, (x,)), y, reduction="none")

    def batch_grad() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    rows, want = _common.fast_and_vmap_rows(losses, params, (x, y))
    fns = {YARDSTICK: batch_grad, **rows}
    fns.update(_common.opacus_row(_model, F.cross_entropy, x, y, want.values()))
    return fns


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    if _common.begin(args):
        return
    fns = candidates(args.batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stats = _common.measure(fns, rounds=args.rounds, budget_s=args.budget)
    print(_common.table(stats, {"yardstick": YARDSTICK}, args.batch,
                        f"\nper-sample gradients, torchvision VisionTransformer (65 tokens), "
                        f"batch {args.batch}"))


if __name__ == "__main__":
    main()
