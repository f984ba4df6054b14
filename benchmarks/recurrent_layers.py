"""Forward+backward time of fp.nn.LSTM / fp.nn.GRU against nn.LSTM / nn.GRU.

The classic text classifier (Embedding(5000, 64) -> 2-layer bidirectional RNN(64, 64) ->
Dropout -> Linear(128, 64) -> ReLU -> mean over time -> Linear(64, 2)), batch 32,
sequence 50, one plain batch gradient (``loss.backward()``) per call. Methods are
interleaved (A B A B ...) in the same process; the table gives medians and the ratio of
each fp layer's time to its ``torch.nn`` twin. ``fp.nn.* (loop)`` rows are the same layers
with ``fused = False`` (the per-step path ``vmap`` and the hooks engine use; the only path
before issue 13); Opacus's ``DPLSTM`` / ``DPGRU`` rows are printed when Opacus is installed.

    .venv/bin/python benchmarks/recurrent_layers.py [--rounds 15] [--threads 2]
"""

from __future__ import annotations

import os
import statistics
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
from models import TextClassifier  # noqa: E402  (examples/models.py, via _common)

import functorch_pipeline as fp  # noqa: E402


def main() -> None:
    parser = _common.parser(__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=50)
    args = parser.parse_args()
    if _common.maybe_respawn(args):
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokens = torch.randint(0, 5000, (args.batch, args.seq))
    labels = torch.randint(0, 2, (args.batch,))
    models = {name: TextClassifier(rnn=rnn) for name, rnn in
              (("nn.LSTM", nn.LSTM), ("fp.nn.LSTM", fp.nn.LSTM), ("nn.GRU", nn.GRU), ("fp.nn.GRU", fp.nn.GRU))}
    models["fp.nn.LSTM"].load_state_dict(models["nn.LSTM"].state_dict())
    models["fp.nn.GRU"].load_state_dict(models["nn.GRU"].state_dict())
    for kind in ("LSTM", "GRU"):
        loop = TextClassifier(rnn=getattr(fp.nn, kind))
        loop.load_state_dict(models[f"nn.{kind}"].state_dict())
        for m in loop.modules():
            if isinstance(m, getattr(fp.nn, kind)):
                m.fused = False
        models[f"fp.nn.{kind} (loop)"] = loop
    opacus = _common.optional("opacus")
    if opacus is not None:
        from opacus.layers import DPGRU
        from opacus.layers import DPLSTM
        models["opacus DPLSTM"] = TextClassifier(rnn=DPLSTM)
        models["opacus DPGRU"] = TextClassifier(rnn=DPGRU)

    def step(model: nn.Module) -> None:
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(tokens), labels).backward()

    stats = _common.measure({name: (lambda m=m: step(m)) for name, m in models.items()}, rounds=args.rounds)
    print(_common.environment())
    print(f"fwd+bwd, classifier, batch {args.batch}, seq {args.seq}, {args.rounds} interleaved rounds")
    print(f"{'method':<18} {'median ms':>10} {'cpu ms':>8} {'examples/s':>11} {'minflt/call':>12} "
          f"{'time ratio':>10} {'cpu ratio':>10}")
    for name, st in stats.items():
        kind = "GRU" if "GRU" in name else "LSTM"
        base = stats[f"nn.{kind}"]
        cpu = statistics.median(st.cpu)
        print(f"{name:<18} {st.median * 1e3:>10.2f} {cpu * 1e3:>8.2f} {args.batch / st.median:>11.0f} "
              f"{statistics.median(st.faults):>12.0f} {st.median / base.median:>9.3f}x "
              f"{cpu / statistics.median(base.cpu):>9.3f}x")
    print("ratios are time / nn twin's time (< 1 is faster); throughput ratio = 1 / ratio")


if __name__ == "__main__":
    main()
