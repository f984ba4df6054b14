"""Forward+backward time of fp.nn.LSTM / fp.nn.GRU against nn.LSTM / nn.GRU.

The classic text classifier (Embedding(5000, 64) -> 2-layer bidirectional RNN(64, 64) ->
Dropout -> Linear(128, 64) -> ReLU -> mean over time -> Linear(64, 2)), batch 32,
sequence 50, one plain batch gradient (``loss.backward()``) per call. Methods are
interleaved (A B A B ...) in the same process; the table gives medians and the ratio of
each fp layer's time to its ``torch.nn`` twin.

    .venv/bin/python benchmarks/recurrent_layers.py [--repeats 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
from torch import nn

from functorch_pipeline.nn.recurrent import GRU
from functorch_pipeline.nn.recurrent import LSTM


class Classifier(nn.Module):
    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.emb = nn.Embedding(5000, 64)
        self.rnn = rnn
        self.drop = nn.Dropout(0.5)
        self.fc1 = nn.Linear(128, 64)
        self.fc2 = nn.Linear(64, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.rnn(self.emb(tokens))[0]
        return self.fc2(torch.relu(self.fc1(self.drop(out))).mean(1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokens = torch.randint(0, 5000, (args.batch, args.seq))
    labels = torch.randint(0, 2, (args.batch,))
    kw = dict(num_layers=2, bidirectional=True, batch_first=True)
    models = {
        "nn.LSTM": Classifier(nn.LSTM(64, 64, **kw)),
        "fp.nn.LSTM": Classifier(LSTM(64, 64, **kw)),
        "nn.GRU": Classifier(nn.GRU(64, 64, **kw)),
        "fp.nn.GRU": Classifier(GRU(64, 64, **kw)),
    }
    models["fp.nn.LSTM"].load_state_dict(models["nn.LSTM"].state_dict())
    models["fp.nn.GRU"].load_state_dict(models["nn.GRU"].state_dict())

    def step(model: nn.Module) -> None:
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(tokens), labels).backward()

    times: dict[str, list[float]] = {name: [] for name in models}
    faults: dict[str, list[int]] = {name: [] for name in models}
    for model in models.values():  # warm-up
        step(model)
        step(model)
    for _ in range(args.repeats):
        for name, model in models.items():
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            step(model)
            times[name].append(time.perf_counter() - t0)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    print(f"fwd+bwd, classifier, batch {args.batch}, seq {args.seq}, threads {args.threads}, "
          f"{args.repeats} interleaved repeats")
    print(f"{'method':<12} {'median ms':>10} {'examples/s':>11} {'minflt/call':>12} {'ratio':>8}")
    for name in models:
        med = statistics.median(times[name])
        base = statistics.median(times[name.replace("fp.", "")])
        print(f"{name:<12} {med * 1e3:>10.2f} {args.batch / med:>11.0f} "
              f"{statistics.median(faults[name]):>12.0f} {med / base:>7.2f}x")


if __name__ == "__main__":
    main()
