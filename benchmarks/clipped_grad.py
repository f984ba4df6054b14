"""Clipped per-example gradient sums of the classic MNIST CNN: ghost, hooks, vmap.

``fp.clipped_grad(losses, max_norm, method=...)`` computed three ways (ghost clipping:
norms from activations and output gradients, no per-example gradients; hooks and vmap:
per-example gradients, then clipping), against the plain batch gradient (one eager
``backward()`` of the mean loss) measured in the same process, interleaved. Ratios are
throughput ratios (> 1 is faster than the yardstick). When Opacus is installed, its
ghost-clipping step (``GradSampleModuleFastGradientClipping``: two backward passes) is a
row too.

    .venv/bin/python benchmarks/clipped_grad.py                  # batch 256
    .venv/bin/python benchmarks/clipped_grad.py --malloc both    # + tuned glibc malloc
    .venv/bin/python benchmarks/clipped_grad.py --lstm           # + LSTM text classifier
    .venv/bin/python benchmarks/clipped_grad.py --transformer    # + transformer text classifier
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _common  # noqa: E402
from per_sample_cnn import Net  # noqa: E402

import functorch_pipeline as fp  # noqa: E402

MAX_NORM = 1.0


def _opacus_row(model: Net, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Opacus's ghost clipping (two backward passes), or nothing when it is absent."""
    try:
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
    except ImportError as e:
        print(f"  skipped Opacus ghost clipping: {e}")
        return {}
    twin = Net()
    twin.load_state_dict(model.state_dict())
    gsm = GradSampleModuleFastGradientClipping(twin, max_grad_norm=MAX_NORM, use_ghost_clipping=True,
                                               loss_reduction="sum")
    opt = DPOptimizerFastGradientClipping(torch.optim.SGD(gsm.parameters(), lr=0.0),
                                          noise_multiplier=0.0, max_grad_norm=MAX_NORM,
                                          expected_batch_size=x.shape[0], loss_reduction="sum")
    crit = DPLossFastGradientClipping(gsm, opt, torch.nn.NLLLoss(reduction="sum"), "sum")

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        crit(gsm(x), y).backward()

    # Opacus clips with max_norm / (norm + 1e-6): the same sum up to ~1e-6 relative.
    step()
    params = {k: v.detach() for k, v in model.named_parameters()}
    ours, _ = fp.clipped_grad(_losses(model), MAX_NORM, method="ghost")(params, x, y)
    worst = max(float((p.grad - ours[k]).abs().max() / ours[k].abs().max())
                for k, p in twin.named_parameters())
    print(f"  check: Opacus ghost clipping vs ours, max relative difference {worst:.1e}")
    return {"Opacus ghost clipping (2 backwards)": step}


def _losses(model: Net) -> Any:
    def losses(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.nll_loss(torch.func.functional_call(model, p, (x,)), y, reduction="none")

    return losses


def candidates(batch: int) -> tuple[dict, dict[str, str]]:
    torch.manual_seed(0)
    model = Net()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))

    losses = _losses(model)

    def batch_grad() -> None:
        model.zero_grad(set_to_none=True)
        F.nll_loss(model(x), y).backward()

    methods = {m: fp.clipped_grad(losses, MAX_NORM, method=m) for m in ("ghost", "hooks", "vmap")}
    fns = {"batch gradient (yardstick)": batch_grad}
    fns.update({f"clipped_grad {m}": (lambda f=f: f(params, x, y)) for m, f in methods.items()})
    fns.update(_opacus_row(model, x, y))

    # Same numbers first.
    (a, na), (b, nb) = methods["ghost"](params, x, y), methods["vmap"](params, x, y)
    worst = max(float((a[k] - b[k]).abs().max() / b[k].abs().max()) for k in a)
    worst = max(worst, float(((na - nb).abs() / nb).max()))
    print(f"  check: ghost vs vmap, max relative difference {worst:.1e}")
    assert worst < 1e-4, worst
    return fns, {"yardstick": "batch gradient (yardstick)", "hooks": "clipped_grad hooks"}


def _text_rows(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor
               ) -> tuple[dict, dict[str, str]]:
    """The ghost and hooks rows for a text classifier (cross entropy over token batches),
    against its eager batch gradient, after checking ghost against hooks."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def losses(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(torch.func.functional_call(model, p, (x,)), y, reduction="none")

    def batch_grad() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    methods = {m: fp.clipped_grad(losses, MAX_NORM, method=m) for m in ("ghost", "hooks")}
    fns = {"batch gradient (yardstick)": batch_grad}
    fns.update({f"clipped_grad {m}": (lambda f=f: f(params, x, y)) for m, f in methods.items()})
    (a, na), (b, nb) = methods["ghost"](params, x, y), methods["hooks"](params, x, y)
    worst = max(float((a[k] - b[k]).abs().max() / b[k].abs().max()) for k in a)
    worst = max(worst, float(((na - nb).abs() / nb).max()))
    print(f"  check: ghost vs hooks, max relative difference {worst:.1e}")
    assert worst < 1e-4, worst
    return fns, {"yardstick": "batch gradient (yardstick)", "hooks": "clipped_grad hooks"}


def candidates_lstm(batch: int, seq: int) -> tuple[dict, dict[str, str]]:
    """The examples' TextClassifier (embedding 5000 x 64, 2-layer bidirectional fp.nn.LSTM,
    eval mode: no dropout), where hooks forms a (B, 5000, 64) embedding gradient."""
    from models import TextClassifier

    torch.manual_seed(0)
    model = TextClassifier().eval()
    return _text_rows(model, torch.randint(0, 5000, (batch, seq)), torch.randint(0, 2, (batch,)))


def candidates_transformer(batch: int, seq: int) -> tuple[dict, dict[str, str]]:
    """``per_sample_transformer``'s text classifier (2 encoder layers, ``batch_first=False``:
    attention, sequence-first Linear and LayerNorm uses), where ghost clipping keeps no
    per-example gradient."""
    from per_sample_transformer import TextTransformer

    torch.manual_seed(0)
    model = TextTransformer(batch_first=False, vocab=1000)
    rows = _text_rows(model, torch.randint(0, 1000, (batch, seq)), torch.randint(0, 2, (batch,)))
    print("  no Opacus row: its DPMultiheadAttention needs batch_first=True for this model's "
          "embedding layout, where Opacus 1.6 computes a different function (opacus PR #825)")
    return rows


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--batch", default="256", help="comma-separated batch sizes")
    p.add_argument("--lstm", action="store_true",
                   help="also the examples' LSTM text classifier (batch 32, 50 tokens)")
    p.add_argument("--transformer", action="store_true",
                   help="also a 2-layer transformer text classifier (batch 32, 64 tokens)")
    args = p.parse_args()
    if _common.begin(args):
        return
    for batch in (int(b) for b in args.batch.split(",")):
        fns, baselines = candidates(batch)
        stats = _common.measure(fns, rounds=args.rounds, budget_s=args.budget)
        print(_common.table(stats, baselines, batch,
                            f"\nclipped per-example gradient sum, MNIST CNN, batch {batch}"))
    if args.lstm:
        fns, baselines = candidates_lstm(32, 50)
        stats = _common.measure(fns, rounds=args.rounds, budget_s=args.budget)
        print(_common.table(stats, baselines, 32, "\nclipped per-example gradient sum, "
                            "LSTM text classifier, batch 32, 50 tokens"))
    if args.transformer:
        fns, baselines = candidates_transformer(32, 64)
        stats = _common.measure(fns, rounds=args.rounds, budget_s=args.budget)
        print(_common.table(stats, baselines, 32, "\nclipped per-example gradient sum, "
                            "transformer text classifier (batch_first=False), batch 32, 64 tokens"))


if __name__ == "__main__":
    main()
