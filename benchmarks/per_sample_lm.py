"""Per-sample gradients and clipped sums of a small GPT-2-style language model, against the
plain batch gradient.

Model: token embedding ``wte`` (1,000 x 64) plus a learned positional embedding ``wpe``
looked up with ``torch.arange(T)`` inside the forward (GPT-2's, nanoGPT's), 2 causal
``nn.TransformerEncoderLayer(64, 4 heads, 128, dropout 0)``, a per-token head to the
vocabulary; next-token cross entropy averaged per sequence; batch 32, length 64. The
position lookup has no batch axis (NOTE [derived parameters]); before that rule every fp
method fell back to ``vmap(grad)``, which is a row here for comparison. The yardstick is
one eager ``backward()`` of the batch's mean loss. Rows run in one process, interleaved;
ratios are throughput ratios (> 1 is faster than the yardstick).

With ``--hf`` (and ``transformers`` installed) the model is Hugging Face's own
``GPT2LMHeadModel`` at the same size (its ``Conv1D`` projections are ``torch.addmm`` on the
tokens flattened into rows: NOTE [fused products]). ``vmap`` cannot run it (its attention
mask code branches on tensor values), so the comparison rows there are a per-example
Python loop of ``torch.autograd.grad``, what a user could do before, and the check is
against that loop.

    .venv/bin/python benchmarks/per_sample_lm.py
    .venv/bin/python benchmarks/per_sample_lm.py --batch 16 --seq 128
    .venv/bin/python benchmarks/per_sample_lm.py --hf
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


class LM(torch.nn.Module):
    """wte + wpe(arange(T)) -> causal encoder layers -> per-token logits."""

    def __init__(self, vocab: int, seq: int, width: int = 64) -> None:
        super().__init__()
        nn = torch.nn
        self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(seq, width)
        self.blocks = nn.ModuleList([nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0,
                                                                batch_first=True) for _ in range(2)])
        self.head = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))
        mask = torch.nn.Transformer.generate_square_subsequent_mask(ids.shape[1], dtype=h.dtype)
        for block in self.blocks:
            h = block(h, src_mask=mask, is_causal=True)
        return self.head(h)


def candidates(batch: int, seq: int, vocab: int = 1000) -> dict[str, Any]:
    torch.manual_seed(0)
    model = LM(vocab, seq)
    params = {k: v.detach() for k, v in model.named_parameters()}
    ids = torch.randint(0, vocab, (batch, seq))

    def losses(p: dict, ids: torch.Tensor) -> torch.Tensor:
        logits = torch.func.functional_call(model, p, (ids,))
        return F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(1)

    def batch_grad() -> None:
        model.zero_grad(set_to_none=True)
        losses(dict(model.named_parameters()), ids).mean().backward()

    rows, _ = _common.fast_and_vmap_rows(losses, params, (ids,))
    return {YARDSTICK: batch_grad, **rows}


def hf_candidates(batch: int, seq: int, vocab: int = 1000) -> dict[str, Any] | None:
    """The ``--hf`` rows: Hugging Face's GPT-2 at this file's size, or None (skip printed)."""
    T = _common.optional("transformers")
    if T is None:
        print("  skipped the Hugging Face GPT-2 rows: `transformers` is not installed "
              "(pip install transformers)")
        return None
    import functorch_pipeline as fp

    torch.manual_seed(0)
    config = T.GPT2Config(vocab_size=vocab, n_positions=seq, n_embd=64, n_layer=2, n_head=4,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = T.GPT2LMHeadModel(config).eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    ids = torch.randint(0, vocab, (batch, seq))

    def losses(p: dict, ids: torch.Tensor) -> torch.Tensor:
        logits = torch.func.functional_call(model, p, (ids,)).logits
        return F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(1)

    def batch_grad() -> None:
        model.zero_grad(set_to_none=True)
        losses(dict(model.named_parameters()), ids).mean().backward()

    def loop() -> list[tuple[torch.Tensor, ...]]:
        leaves = [v.requires_grad_() for v in (t.detach() for t in params.values())]
        p = dict(zip(params, leaves, strict=True))
        return [torch.autograd.grad(losses(p, ids[i:i + 1]).sum(), leaves) for i in range(batch)]

    default, clipped = fp.per_sample_grads(losses), fp.clipped_grad(losses, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = default(params, ids)
    want = {k: torch.stack([g[j] for g in loop()]) for j, k in enumerate(params)}
    worst = _common.max_relative_difference([got[k] for k in want], want.values())
    print(f"  check: Hugging Face GPT-2, per_sample_grads default vs the loop, max relative "
          f"difference {worst:.1e}")
    return {YARDSTICK: batch_grad, "fp.per_sample_grads default": lambda: default(params, ids),
            "fp.clipped_grad default": lambda: clipped(params, ids),
            "per-example Python loop": loop}


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--hf", action="store_true", help="Hugging Face's GPT2LMHeadModel instead")
    args = p.parse_args()
    if _common.begin(args):
        return
    fns = hf_candidates(args.batch, args.seq) if args.hf else candidates(args.batch, args.seq)
    if fns is None:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stats = _common.measure(fns, rounds=args.rounds, budget_s=args.budget)
    print(_common.table(stats, {"yardstick": YARDSTICK}, args.batch,
                        f"\nper-sample gradients, {'Hugging Face GPT-2' if args.hf else 'GPT-2-style'} "
                        f"language model, batch {args.batch}, "
                        f"length {args.seq}"))


if __name__ == "__main__":
    main()
