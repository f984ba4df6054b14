"""LSTM classifiers with fp.nn.LSTM, so per-sample gradients work.

Default task (offline, real data): sequential MNIST, each image read as 28 time steps of
28 pixels by an LSTM classifier.

    python examples/lstm.py --data-dir ../shared/data                   # sequential MNIST
    python examples/lstm.py --task imdb --imdb-dir /path/to/aclImdb      # the text classifier

IMDB layout: train/pos, train/neg, test/pos, test/neg, one review per .txt file. The
script builds its own tokenizer and vocabulary (--max-words most frequent words,
sequences cut or padded to --max-len) and trains the classic text classifier:
Embedding -> 2-layer bidirectional LSTM -> Dropout -> Linear -> ReLU -> mean over time
-> Linear(2).

After training, --grad-norms N prints per-example gradient norms of N test examples
(fp.per_sample_grads through the LSTM).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
import time
from typing import Any

import torch

import functorch_pipeline as fp
from functorch_pipeline import optim

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import append_jsonl  # noqa: E402
from common import data_key  # noqa: E402
from common import evaluate  # noqa: E402
from common import pick_device  # noqa: E402
from common import plot_curves  # noqa: E402
from common import progress  # noqa: E402
from models import SequenceClassifier  # noqa: E402
from models import TextClassifier  # noqa: E402

PAD, UNK = 0, 1
_TOKEN = re.compile(r"[a-z0-9']+")


def tokenize(text: str) -> list[str]:
    """Lower-case words; IMDB's ``<br />`` line breaks are dropped."""
    return _TOKEN.findall(text.replace("<br />", " ").lower())


def build_vocab(texts: list[list[str]], max_words: int) -> dict[str, int]:
    """The ``max_words - 2`` most frequent words get ids 2.. (0 is padding, 1 unknown)."""
    counts = collections.Counter(w for t in texts for w in t)
    return {w: i + 2 for i, (w, _) in enumerate(counts.most_common(max_words - 2))}


def encode(tokens: list[str], vocab: dict[str, int], max_len: int) -> list[int]:
    ids = [vocab.get(w, UNK) for w in tokens[:max_len]]
    return ids + [PAD] * (max_len - len(ids))


def read_imdb_split(root: str, split: str) -> tuple[list[str], list[int]]:
    texts, labels = [], []
    for label, name in ((0, "neg"), (1, "pos")):
        folder = os.path.join(root, split, name)
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"IMDB data not found: expected folder {folder!r} (layout: {root}/train/pos, train/neg, "
                "test/pos, test/neg, one review per .txt file)"
            )
        for fname in sorted(os.listdir(folder)):
            if fname.endswith(".txt"):
                with open(os.path.join(folder, fname), encoding="utf-8") as f:
                    texts.append(f.read())
                labels.append(label)
    return texts, labels


def load_imdb(root: str, max_words: int, max_len: int, device: torch.device) -> tuple[Any, Any, int]:
    train_texts, train_labels = read_imdb_split(root, "train")
    test_texts, test_labels = read_imdb_split(root, "test")
    train_tok = [tokenize(t) for t in train_texts]
    vocab = build_vocab(train_tok, max_words)

    def tensors(toks: list[list[str]], labels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.tensor([encode(t, vocab, max_len) for t in toks], dtype=torch.int64, device=device)
        return x, torch.tensor(labels, dtype=torch.int64, device=device)

    test_tok = [tokenize(t) for t in test_texts]
    return tensors(train_tok, train_labels), tensors(test_tok, test_labels), len(vocab) + 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="LSTM classifiers with functorch_pipeline")
    p.add_argument("--task", default="seqmnist", choices=["seqmnist", "imdb"])
    p.add_argument("--data-dir", default="../shared/data", help="MNIST root (torchvision layout)")
    p.add_argument("--imdb-dir", default=None, help="folder with train/{pos,neg} and test/{pos,neg}")
    p.add_argument("--max-words", type=int, default=5000, help="vocabulary size (imdb)")
    p.add_argument("--max-len", type=int, default=200, help="tokens per review (imdb)")
    p.add_argument("--hidden", type=int, default=128, help="LSTM hidden size (seqmnist; imdb uses 64)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--test-batch-size", type=int, default=1000)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--clip", type=float, default=1.0, help="clip_by_global_norm threshold")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", default=None)
    p.add_argument("--no-cuda", action="store_true")
    p.add_argument("--out-dir", default="runs/lstm")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--save-interval", type=int, default=100, help="batches between checkpoints")
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--limit-test", type=int, default=None)
    p.add_argument("--grad-norms", type=int, default=0, help="per-example gradient norms of N test examples")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-plot", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = pick_device(args.device, args.no_cuda)
    try:
        if args.task == "imdb":
            if not args.imdb_dir:
                raise SystemExit("--task imdb needs --imdb-dir")
            train, test, vocab_size = load_imdb(args.imdb_dir, args.max_words, args.max_len, device)
            net = TextClassifier(vocab_size=vocab_size)
        else:
            train = fp.data.mnist_tensors(args.data_dir, train=True, device=device)
            test = fp.data.mnist_tensors(args.data_dir, train=False, device=device)
            net = SequenceClassifier(hidden=args.hidden)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.limit_train:
        train = fp.tree.map(lambda a: a[: args.limit_train], train)
    if args.limit_test:
        test = fp.tree.map(lambda a: a[: args.limit_test], test)

    model = fp.functionalize(net)
    key = fp.random.key(args.seed, device=device)
    variables = fp.tree.to(model.init(fp.random.fold_in(key, 1), train[0][:1]), device)
    steps_per_epoch = fp.data.num_batches(train[0].shape[0], args.batch_size)
    opt = optim.chain(optim.clip_by_global_norm(args.clip), optim.adam(args.lr))
    state = fp.train.TrainState.create(variables["params"], opt.init(variables["params"]), key)
    manager = fp.train.CheckpointManager(os.path.join(args.out_dir, "checkpoints"), max_to_keep=2)
    metrics_path = os.path.join(args.out_dir, "metrics.jsonl")
    if args.resume and manager.latest_step() is not None:
        state = manager.restore(like=state, device=device)
        print(f"resumed from step {int(state.step)}")
    elif os.path.exists(metrics_path):
        os.remove(metrics_path)

    def loss_fn(params: Any, buffers: Any, batch: Any, key: torch.Tensor) -> tuple[torch.Tensor, Any]:
        x, y = batch
        logits, new_buffers = model.apply({"params": params, "buffers": buffers}, x, train=True, key=key)
        return fp.losses.cross_entropy(logits, y).mean(), new_buffers

    history = []
    for epoch in range(int(state.step) // steps_per_epoch, args.epochs):
        first = int(state.step) - epoch * steps_per_epoch
        it = fp.data.batches(train, args.batch_size, key=data_key(state, epoch), start=first)
        bar = progress(it, steps_per_epoch, first, f"epoch {epoch + 1}/{args.epochs}", args.no_progress)
        loss_sum = torch.zeros((), device=device)
        t0 = time.perf_counter()
        for i, batch in enumerate(bar, start=first):
            state, loss = fp.train.train_step(state, batch, loss_fn, opt)
            loss_sum += loss
            if (i + 1) % 20 == 0 and hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss.item():.4f}")
            if (i + 1) % args.save_interval == 0 and i + 1 < steps_per_epoch:
                manager.save(int(state.step), state)
        epoch_time = time.perf_counter() - t0
        record = {
            "epoch": epoch + 1,
            "step": int(state.step),
            "train_loss": loss_sum.item() / max(1, steps_per_epoch - first),
            **evaluate(lambda x, s=state: model.apply({"params": s.params, "buffers": s.buffers}, x),
                       test, args.test_batch_size),
            "epoch_time_s": round(epoch_time, 3),
        }
        manager.save(int(state.step), state, metrics={"test_accuracy": record["test_accuracy"]})
        append_jsonl(metrics_path, record)
        history.append(record)
        print(f"epoch {record['epoch']}: train loss {record['train_loss']:.4f}, test loss {record['test_loss']:.4f}, "
              f"test accuracy {100 * record['test_accuracy']:.2f}% ({epoch_time:.1f} s)")
    if not args.no_plot:
        plot_curves(metrics_path, os.path.join(args.out_dir, "curves.png"), f"LSTM ({args.task})")

    norms = None
    if args.grad_norms:
        x, y = fp.tree.map(lambda a: a[: args.grad_norms], test)

        def example_loss(params: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return fp.losses.cross_entropy(model.apply({"params": params, "buffers": {}}, x), y).mean()

        grads = fp.per_sample_grads(example_loss)(state.params, x, y)
        norms = fp.vmap(fp.tree.global_norm)(grads)
        print(f"per-example gradient norms of {len(norms)} test examples: "
              f"median {norms.median().item():.4g}, max {norms.max().item():.4g} (example {int(norms.argmax())})")
    return {"history": history, "state": state, "grad_norms": norms}


if __name__ == "__main__":
    main()
