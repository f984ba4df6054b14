"""Per-sample gradients of a transformer text classifier in both layouts, against the plain
batch gradient.

Model: Embedding(1000, 64) -> 2 x ``nn.TransformerEncoderLayer(64, 4 heads, 128, dropout
0)`` -> mean over time -> Linear(64, 2); cross entropy; batch 32, sequence length 64
(``--vocab`` sets the embedding rows: its dense per-example gradients grow with it). The
same weights run twice: ``batch_first=True``, and ``batch_first=False`` (the PyTorch
default: the embedded ``(B, T, E)`` tokens are transposed to ``(T, B, E)`` before the
encoder, whose Linear and LayerNorm layers then see the examples on axis 1, NOTE
[sequence-first inputs]). The yardstick is one eager ``backward()`` of the mean loss of
the batch-first model. Every row runs in the same process, interleaved; ratios are
throughput ratios (> 1 is faster than the yardstick). When ``opacus`` is installed, its
``GradSampleModule`` on the batch-first model (``ModuleValidator.fix`` swaps in
``DPMultiheadAttention``; :func:`opacus_twin` copies the weights) is a row.

    .venv/bin/python benchmarks/per_sample_transformer.py
    .venv/bin/python benchmarks/per_sample_transformer.py --threads 1 --rounds 30
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _common  # noqa: E402

import functorch_pipeline as fp  # noqa: E402

YARDSTICK = "batch gradient, batch_first=True (yardstick)"


class TextTransformer(nn.Module):
    """Embedding -> encoder -> mean over time -> Linear, in either layout."""

    def __init__(self, batch_first: bool, vocab: int, dim: int = 64) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=batch_first)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens)
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.head(self.enc(h).mean(1 if self.batch_first else 0))


def candidates(batch: int, seq: int, vocab: int) -> dict[str, Any]:
    torch.manual_seed(0)
    first = TextTransformer(batch_first=True, vocab=vocab)
    second = TextTransformer(batch_first=False, vocab=vocab)
    second.load_state_dict(first.state_dict())
    params = {k: v.detach() for k, v in first.named_parameters()}
    tokens, labels = torch.randint(0, vocab, (batch, seq)), torch.randint(0, 2, (batch,))

    def losses_of(model: nn.Module) -> Any:
        def losses(p: dict, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(torch.func.functional_call(model, p, (t,)), y, reduction="none")
        return losses

    def batch_grad() -> None:
        first.zero_grad(set_to_none=True)
        F.cross_entropy(first(tokens), labels).backward()

    fns: dict[str, Any] = {YARDSTICK: batch_grad}
    want = None
    for model, layout in ((first, "batch_first=True"), (second, "batch_first=False")):
        losses = losses_of(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            default = fp.per_sample_grads(losses)
            got = default(params, tokens, labels)
        fallback = [str(w.message) for w in caught if "falls back" in str(w.message)]
        print(f"  {layout}: the default method {'falls back: ' + fallback[0] if fallback else 'takes hooks'}")
        vmap = fp.per_sample_grads(losses, method="vmap")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.func's "performance drop" under vmap
            ref = vmap(params, tokens, labels)
        want = ref if want is None else want
        for name, g in (("default", got), ("vmap(grad)", ref)):
            worst = max(float((g[k] - want[k]).abs().max() / want[k].abs().max()) for k in want)
            print(f"  check: {layout} {name} vs batch_first=True vmap(grad), max relative "
                  f"difference {worst:.1e}")
            assert worst < 1e-4, worst
        fns[f"fp.per_sample_grads default, {layout}"] = (
            lambda default=default: default(params, tokens, labels))
        fns[f"torch.func vmap(grad), {layout}"] = lambda vmap=vmap: vmap(params, tokens, labels)
    opacus_row = _opacus(first, tokens, labels)
    if opacus_row is None:
        print("  skipped Opacus: `opacus` is not installed (pip install opacus)")
    else:
        fns["Opacus GradSampleModule, batch_first=True"] = opacus_row
    return fns


def _opacus(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> Any:
    """Opacus' per-sample gradients of ``model`` (DPMultiheadAttention swapped in by
    ``ModuleValidator.fix``); None without opacus."""
    if _common.optional("opacus") is None:
        return None
    twin = opacus_twin(model)
    return _common.opacus_per_sample(twin, F.cross_entropy, tokens, labels)


def opacus_twin(model: nn.Module) -> nn.Module:
    """``model`` with Opacus' ``DPMultiheadAttention`` swapped in by ``ModuleValidator.fix``
    and the same weights: the packed ``in_proj`` split into its q, k, v linears (``fix``
    initialises them afresh). The outputs are compared and the difference printed: Opacus
    1.6's ``DPMultiheadAttention(batch_first=True)`` reshapes its heads wrongly (opacus
    PR #825), so its row times the same amount of work, not the same function."""
    from opacus.validators import ModuleValidator

    twin = ModuleValidator.fix(model)
    with torch.no_grad():
        for layer, dp_layer in zip(model.enc.layers, twin.enc.layers, strict=True):
            attn, dp_attn = layer.self_attn, dp_layer.self_attn
            for i, lin in enumerate((dp_attn.qlinear, dp_attn.klinear, dp_attn.vlinear)):
                lin.weight.copy_(attn.in_proj_weight.chunk(3)[i])
                lin.bias.copy_(attn.in_proj_bias.chunk(3)[i])
            dp_attn.out_proj.load_state_dict(attn.out_proj.state_dict())
        tokens = torch.randint(0, model.emb.num_embeddings, (2, 5))
        worst = float((twin.eval()(tokens) - model.eval()(tokens)).abs().max())
    model.train()
    twin.train()
    if worst < 1e-5:
        print(f"  check: Opacus twin (DPMultiheadAttention) vs the model, max abs output "
              f"difference {worst:.1e}")
    else:
        print(f"  note: the Opacus twin's output differs from the model's by up to {worst:.2f}: "
              "its DPMultiheadAttention(batch_first=True) mixes heads and positions (opacus "
              "PR #825), so the Opacus row times the same work, not the same numbers")
    return twin


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--vocab", type=int, default=1000,
                   help="embedding rows (its dense per-example gradients grow with it)")
    args = p.parse_args()
    if _common.begin(args):
        return
    fns = candidates(args.batch, args.seq, args.vocab)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stats = _common.measure(fns, rounds=args.rounds, budget_s=args.budget)
    print(_common.table(stats, {"yardstick": YARDSTICK}, args.batch,
                        f"\nper-sample gradients, transformer text classifier, batch {args.batch}, "
                        f"seq {args.seq}, vocab {args.vocab}"))


if __name__ == "__main__":
    main()
