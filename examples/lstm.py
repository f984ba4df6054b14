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

Outputs, --resume, Ctrl-C and exit statuses as in examples/mnist.py (examples/common.py's
``fit``).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import sys
from typing import Any

import torch

import functorch_pipeline as fp
from functorch_pipeline import optim

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ArgumentParser  # noqa: E402
from common import check_mnist_files  # noqa: E402
from common import default_data_dir  # noqa: E402
from common import device_arg  # noqa: E402
from common import fail  # noqa: E402
from common import finite_positive_float  # noqa: E402
from common import fit  # noqa: E402
from common import limit  # noqa: E402
from common import load_mnist  # noqa: E402
from common import non_negative_int  # noqa: E402
from common import pick_device  # noqa: E402
from common import positive_float  # noqa: E402
from common import positive_int  # noqa: E402
from common import prepare_out_dir  # noqa: E402
from common import resume_command  # noqa: E402
from common import run_main  # noqa: E402
from common import seed_int  # noqa: E402
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


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="lstm.py", description="LSTM classifiers with functorch_pipeline")
    p.add_argument("--task", default="seqmnist", choices=["seqmnist", "imdb"],
                   help="sequential MNIST (offline) or IMDB reviews (needs --imdb-dir)")
    p.add_argument("--data-dir", default=default_data_dir(),
                   help="dataset root holding MNIST/raw/ (torchvision layout)")
    p.add_argument("--imdb-dir", default=None,
                   help="folder with train/{pos,neg} and test/{pos,neg} (default: none; "
                   "required for --task imdb)")
    p.add_argument("--max-words", type=positive_int, default=5000, help="vocabulary size (imdb)")
    p.add_argument("--max-len", type=positive_int, default=200, help="tokens per review (imdb)")
    p.add_argument("--hidden", type=positive_int, default=128,
                   help="LSTM hidden size (seqmnist; imdb uses 64)")
    p.add_argument("--epochs", type=positive_int, default=3,
                   help="epochs to train (in total, counting those a resumed run already did)")
    p.add_argument("--batch-size", type=positive_int, default=128, help="training batch size")
    p.add_argument("--test-batch-size", type=positive_int, default=1000, help="test batch size")
    p.add_argument("--lr", type=finite_positive_float, default=2e-3, help="Adam learning rate")
    p.add_argument("--clip", type=positive_float, default=1.0,
                   help="clip_by_global_norm threshold (inf: no clipping)")
    p.add_argument("--seed", type=seed_int, default=1, help="random seed (-2**63 <= seed < 2**63)")
    p.add_argument("--device", type=device_arg, default=None,
                   help="cpu, cuda, cuda:1, mps, ... (default: CUDA if available, else CPU)")
    p.add_argument("--no-cuda", action="store_true", help="disable CUDA even when available")
    p.add_argument("--out-dir", default="runs/lstm",
                   help="where checkpoints/, metrics.jsonl, steps.jsonl and curves.png go")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --out-dir "
                   "(an error if there is none)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the run already in --out-dir and start over")
    p.add_argument("--save-interval", type=positive_int, default=100,
                   help="batches between checkpoints")
    p.add_argument("--limit-train", type=positive_int, default=None,
                   help="use only the first N training examples (default: all)")
    p.add_argument("--limit-test", type=positive_int, default=None,
                   help="use only the first N test examples (default: all)")
    p.add_argument("--grad-norms", type=non_negative_int, default=0,
                   help="per-example gradient norms of N test examples after training (0: skip)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-plot", action="store_true", help="do not write curves.png")
    p.add_argument("--jit", action="store_true",
                   help="compile the train step with fp.jit (torch.compile); prints the cold "
                   "compile time, which grows with the sequence length (default: eager)")
    p.add_argument("--jit-backend", default="inductor",
                   help="torch.compile backend for --jit (eager: no code generation, for tests)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = pick_device(args.device, args.no_cuda)
    if args.task == "imdb" and not args.imdb_dir:
        fail("--task imdb needs --imdb-dir (a folder with train/{pos,neg} and test/{pos,neg})")
    if args.task == "imdb" and args.max_words < 3:
        fail("argument --max-words: must be >= 3 (padding, unknown and one word), "
             f"got {args.max_words}")
    prepare_out_dir(args.out_dir, args.resume, args.overwrite, keep=2)  # before reading data
    if args.task == "seqmnist":
        check_mnist_files(args.data_dir)
    try:
        if args.task == "imdb":
            train, test, vocab_size = load_imdb(args.imdb_dir, args.max_words, args.max_len, device)
            net = TextClassifier(vocab_size=vocab_size)
        else:
            train, test = load_mnist(args.data_dir, device)
            net = SequenceClassifier(hidden=args.hidden)
    except FileNotFoundError as e:
        fail(str(e))
    train, test = limit(train, args.limit_train), limit(test, args.limit_test)

    model = fp.functionalize(net)
    key = fp.random.key(args.seed, device=device)
    variables = fp.tree.to(model.init(fp.random.fold_in(key, 1), train[0][:1]), device)
    opt = optim.chain(optim.clip_by_global_norm(args.clip), optim.adam(args.lr))
    state = fp.train.TrainState.create(variables["params"], opt.init(variables["params"]), key)
    def loss_fn(params: Any, buffers: Any, batch: Any, key: torch.Tensor) -> tuple[torch.Tensor, Any]:
        x, y = batch
        logits, new_buffers = model.apply({"params": params, "buffers": buffers}, x, train=True, key=key)
        return fp.losses.cross_entropy(logits, y).mean(), new_buffers

    state, history = fit(
        model, state, loss_fn, opt, train, test, epochs=args.epochs, batch_size=args.batch_size,
        test_batch_size=args.test_batch_size, out_dir=args.out_dir, save_interval=args.save_interval,
        keep=2, resume=args.resume, log_interval=20, no_progress=args.no_progress,
        title=f"LSTM ({args.task})", plot=not args.no_plot, overwrite=args.overwrite,
        resume_hint=resume_command(__file__, argv), jit=args.jit, jit_backend=args.jit_backend)

    norms = None
    if args.grad_norms:
        x, y = fp.tree.map(lambda a: a[: args.grad_norms], test)

        def example_loss(params: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            # per-example losses: the fast "hooks" method of per_sample_grads needs them
            return fp.losses.cross_entropy(model.apply({"params": params, "buffers": {}}, x), y)

        grads = fp.per_sample_grads(example_loss)(state.params, x, y)
        norms = fp.vmap(fp.tree.global_norm)(grads)
        print(f"per-example gradient norms of {len(norms)} test examples: "
              f"median {norms.median().item():.4g}, max {norms.max().item():.4g} (example {int(norms.argmax())})")
    return {"history": history, "state": state, "grad_norms": norms}


if __name__ == "__main__":
    run_main(main)
