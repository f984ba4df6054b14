"""A full DP step (per-example clipping + noise + Adam) against the non-private step.

Two rows of issue 10's table:

1. Throughput, classic MNIST CNN (``per_sample_cnn.Net``), batch 256: the step of
   ``fp.train.DPTrainer`` (clipped sum by ``fp.clipped_value_and_grad``, Gaussian noise
   from an ``fp.random`` key, Adam, accountant) against the non-private step
   (``fp.value_and_grad`` of the mean loss + Adam), measured in one process, interleaved,
   medians and throughput ratios (target >= 0.85x). Opacus' DP step
   (``GradSampleModule`` + ``DPOptimizer`` over ``torch.optim.Adam``) is a row when
   ``opacus`` is installed, and ``torch.optim.Adam``'s imperative step for scale. When
   ``jax`` and ``optax`` are installed, the same network and weights in JAX
   (``_jax_models.cnn``) add two jitted rows: ``jax.grad`` of the mean loss + ``optax.adam``,
   and ``jax.vmap(jax.grad)`` + ``optax.contrib.differentially_private_aggregate`` chained
   with ``optax.adam``; the table's ratio column is against OUR non-private step, so the JAX
   DP / JAX non-private ratio is printed under it. Their compile is the "1st call s" column.
   The in-process table runs after the check and beside Opacus, whose freed per-example
   gradients raise glibc's mmap and trim thresholds for every row (DESIGN.md,
   "Benchmarking on these machines"), so ``--processes N`` also times the non-private and
   the DP (auto) step (and Opacus' when installed) alone, each in fresh processes of its
   own that run nothing before the timing (NOTE [fresh processes] in ``_common``): the
   state a user's script starts in.
2. Peak memory, 100,000 x 64 Embedding model (``ghost_memory``'s model), batch 1024: the
   DPTrainer step against the non-private step, each in its own fresh subprocess (order
   rotated): whole-process peak RSS and the peak above the RSS before the measured steps
   (target <= 1.5x).

    .venv/bin/python benchmarks/dp_step.py                    # both rows
    .venv/bin/python benchmarks/dp_step.py --part speed --rounds 20
    .venv/bin/python benchmarks/dp_step.py --part speed --rounds 30 --processes 6
    .venv/bin/python benchmarks/dp_step.py --part memory --pairs 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import warnings
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import _common  # noqa: E402
import _jax_models  # noqa: E402
import ghost_memory  # noqa: E402
from per_sample_cnn import Net  # noqa: E402

import functorch_pipeline as fp  # noqa: E402
from functorch_pipeline import optim  # noqa: E402

CLIP, SIGMA, LR = 1.0, 1.0, 1e-3


def _dp_trainer(loss_fn: Any, batch: int, method: str = "auto") -> fp.train.DPTrainer:
    return fp.train.DPTrainer(loss_fn, optim.adam(LR), l2_norm_clip=CLIP, noise_multiplier=SIGMA,
                              sample_rate=batch / 60_000, expected_batch_size=float(batch),
                              method=method)


NONPRIVATE, DP_AUTO = "non-private step: fp grad + adam", "DP step: DPTrainer auto + noise + adam"
OPACUS = "opacus"  # the fresh-process side's name


def _opacus(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> Any:
    """Opacus' DP step (``GradSampleModule`` + ``DPOptimizer`` over ``torch.optim.Adam``) on
    a copy of ``model``, or None without opacus; its ``label`` names the version."""
    opacus = _common.optional("opacus")
    if opacus is None:
        return None
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    net = Net()
    net.load_state_dict(model.state_dict())
    gsm = GradSampleModule(net)
    dp_opt = DPOptimizer(torch.optim.Adam(gsm.parameters(), lr=LR), noise_multiplier=SIGMA,
                         max_grad_norm=CLIP, expected_batch_size=batch)

    def opacus_step() -> None:
        dp_opt.zero_grad(set_to_none=True)
        F.nll_loss(gsm(x), y).backward()
        dp_opt.step()

    opacus_step.label = f"Opacus {opacus.__version__} DP step (hooks) + Adam"
    return opacus_step


def _ours(batch: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The non-private step and the DPTrainer steps (auto, hooks), built without calling
    anything: what a fresh-process side needs (NOTE [fresh processes] in ``_common``).
    ``auto`` picks its method on its first call."""
    torch.manual_seed(0)
    model = Net()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))

    def losses(p: dict, b: Any) -> torch.Tensor:
        return F.nll_loss(torch.func.functional_call(model, p, (b[0],)), b[1], reduction="none")

    adam = optim.adam(LR)
    box: dict[str, Any] = {"p": params, "s": adam.init(params)}
    value_and_grad = fp.value_and_grad(lambda p, b: losses(p, b).mean())

    def nonprivate() -> None:
        _, g = value_and_grad(box["p"], (x, y))
        u, box["s"] = adam.update(g, box["s"], box["p"])
        box["p"] = optim.apply_updates(box["p"], u)

    fns = {NONPRIVATE: nonprivate}
    for method in ("auto", "hooks"):
        trainer = _dp_trainer(losses, batch, method)
        state = {"s": trainer.init(params, fp.random.key(0))}

        def dp(trainer: Any = trainer, state: dict = state) -> None:
            state["s"], _ = trainer.step(state["s"], (x, y))

        fns[f"DP step: DPTrainer {method} + noise + adam"] = dp
    return fns, {"model": model, "x": x, "y": y}


def speed_candidates(batch: int) -> dict[str, Any]:
    fns, parts = _ours(batch)
    model, x, y = parts["model"], parts["x"], parts["y"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in fns:  # auto picks its method on the first call; hooks warns once
            if name != NONPRIVATE:
                fns[name]()
    imperative = Net()
    imperative.load_state_dict(model.state_dict())
    torch_adam = torch.optim.Adam(imperative.parameters(), lr=LR)

    def torch_step() -> None:
        torch_adam.zero_grad(set_to_none=True)
        F.nll_loss(imperative(x), y).backward()
        torch_adam.step()

    fns["torch.optim.Adam imperative step"] = torch_step
    opacus_step = _opacus(model, x, y, batch)
    if opacus_step is None:
        print("  skipped Opacus' DP step: `opacus` is not installed (pip install opacus)")
    else:
        fns[opacus_step.label] = opacus_step
    if _jax_models.modules() is None:
        print(_jax_models.skip_line("the JAX+optax steps"))
    else:
        print(_jax_models.threads_line())
        fns.update(jax_steps(model, x, y))
    return fns


JAX_NONPRIVATE, JAX_DP = "JAX+optax non-private step (jit)", "JAX+optax DP step (jit)"


def jax_steps(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """The two JAX+optax rows on ``model``'s weights and the same batch: one jitted step
    each (loss gradient, optax transform, ``optax.apply_updates``)."""
    jax, _, optax = _jax_models.modules()
    params = _jax_models.params_from_torch(model.named_parameters())
    jx, jy = _jax_models.to_jax(x), _jax_models.to_jax(y)
    per_example = jax.vmap(jax.grad(_jax_models.cnn_example_loss), in_axes=(None, 0, 0))
    aggregate = optax.contrib.differentially_private_aggregate

    def make(tx: Any, grad_fn: Any) -> Any:
        @jax.jit
        def step(p: Any, s: Any, xb: Any, yb: Any) -> Any:
            u, s = tx.update(grad_fn(p, xb, yb), s, p)
            return optax.apply_updates(p, u), s

        box = {"p": params, "s": tx.init(params)}

        def run() -> None:
            box["p"], box["s"] = jax.block_until_ready(step(box["p"], box["s"], jx, jy))

        return run

    # The DP transform with sigma = 0 is the mean of the clipped per-example gradients:
    # check it against the per-example loop (float32, so to 1e-4 relative).
    few = 8
    tx0 = aggregate(CLIP, 0.0, key=jax.random.key(0))
    got, _ = tx0.update(per_example(params, jx[:few], jy[:few]), tx0.init(params))
    grads = _common.python_loop_grads(model, F.nll_loss, x[:few], y[:few])
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()
    factor = (CLIP / norms).clamp(max=1.0)
    want = {k: (g * factor.view(-1, *[1] * (g.dim() - 1))).mean(0)
            for (k, _), g in zip(model.named_parameters(), grads, strict=True)}
    worst = _jax_models.max_relative_difference(got, want)
    print(f"  check: optax differentially_private_aggregate (sigma 0) vs per-example loop "
          f"clipped mean: max relative difference {worst:.1e}")
    assert worst < 1e-4, worst

    dp_tx = optax.chain(aggregate(CLIP, SIGMA, key=jax.random.key(0)), optax.adam(LR))
    return {JAX_NONPRIVATE: make(optax.adam(LR), jax.grad(_jax_models.cnn_mean_loss)),
            JAX_DP: make(dp_tx, per_example)}


def check_same_numbers(batch: int) -> None:
    """Before timing: the DP step with sigma = 0 equals Adam on the per-example loop's clipped
    mean (so the timed step computes the right thing)."""
    torch.manual_seed(0)
    model = Net().double()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    x, y = torch.randn(8, 1, 28, 28, dtype=torch.float64), torch.randint(0, 10, (8,))

    def losses(p: dict, b: Any) -> torch.Tensor:
        return F.nll_loss(torch.func.functional_call(model, p, (b[0],)), b[1], reduction="none")

    trainer = fp.train.DPTrainer(losses, optim.sgd(1.0), l2_norm_clip=CLIP, noise_multiplier=0.0,
                                 sample_rate=0.5, expected_batch_size=8.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        total, _, _ = trainer.clipped_sum(params, (x, y))
    grads = _common.python_loop_grads(model, F.nll_loss, x, y)
    names = [k for k, _ in model.named_parameters()]
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()
    factor = (CLIP / norms).clamp(max=1.0)
    worst = max(float((total[k] - (g * factor.view(-1, *[1] * (g.dim() - 1))).sum(0)).abs().max())
                for k, g in zip(names, grads, strict=True))
    print(f"  check: DPTrainer clipped sum vs per-example loop (float64): max abs diff {worst:.1e}")
    assert worst < 1e-10, worst


def memory_child(method: str, batch: int, tokens: int, steps: int) -> None:
    """One fresh-process measurement of the Embedding model, printed as a JSON line."""
    V, D, C = ghost_memory.VOCAB, ghost_memory.DIM, ghost_memory.CLASSES
    torch.manual_seed(0)
    params = {"emb": torch.randn(V, D) * 0.1, "fc.weight": torch.randn(C, D) * 0.1,
              "fc.bias": torch.zeros(C)}
    data = (torch.randint(0, V, (batch, tokens)), torch.randint(0, C, (batch,)))

    def losses(p: dict, b: Any) -> torch.Tensor:
        h = F.embedding(b[0], p["emb"]).mean(1)
        return F.cross_entropy(F.linear(h, p["fc.weight"], p["fc.bias"]), b[1], reduction="none")

    if method == "nonprivate":
        adam = optim.adam(LR)
        box: dict[str, Any] = {"p": params, "s": adam.init(params)}
        grad = fp.grad(lambda p, b: losses(p, b).mean())

        def step() -> None:
            u, box["s"] = adam.update(grad(box["p"], data), box["s"], box["p"])
            box["p"] = optim.apply_updates(box["p"], u)
    else:
        trainer = _dp_trainer(losses, batch, "ghost")
        box = {"s": trainer.init(params, fp.random.key(0))}

        def step() -> None:
            box["s"], _ = trainer.step(box["s"], data)

    step()  # warm: lazy initialisation, optimizer state, allocator pools
    before = ghost_memory._rss_kb("VmRSS")
    exact = ghost_memory._reset_peak()
    for _ in range(steps):
        step()
    peak = (ghost_memory._rss_kb("VmHWM") if exact
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    print(json.dumps({"method": method, "before_kb": before, "peak_kb": peak, "exact": exact}))


def memory(batch: int, tokens: int, steps: int, pairs: int) -> None:
    n = ghost_memory.VOCAB * ghost_memory.DIM + ghost_memory.CLASSES * (ghost_memory.DIM + 1)
    print(f"\npeak memory, Embedding {ghost_memory.VOCAB} x {ghost_memory.DIM} + Linear: {n:,} "
          f"parameters, batch {batch}, {tokens} tokens, Adam; one fresh process per measurement, "
          f"{pairs} rounds (order alternated)")
    names = ["nonprivate", "dp"]
    results: dict[str, list[dict]] = {m: [] for m in names}
    for i in range(pairs):
        for method in names[i % 2:] + names[:i % 2]:
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", method,
                                  "--memory-batch", str(batch), "--tokens", str(tokens),
                                  "--steps", str(steps)],
                                 check=True, capture_output=True, text=True).stdout
            results[method].append(json.loads(out.strip().splitlines()[-1]))
    labels = {"nonprivate": "non-private: grad + adam", "dp": "DPTrainer: ghost + noise + adam"}
    print(f"| {'step':<32} | peak RSS MiB | above pre-step MiB | x non-private (RSS, above) |")
    print(f"|{'-' * 34}|--------------|--------------------|----------------------------|")
    med = {}
    for method, rs in results.items():
        total = statistics.median(r["peak_kb"] for r in rs) / 1024
        extra = statistics.median(r["peak_kb"] - r["before_kb"] for r in rs) / 1024
        med[method] = (total, extra)
        t0, e0 = med["nonprivate"]
        ratio = f"{total / t0:.3f}, {extra / max(e0, 1e-9):.3f}"
        print(f"| {labels[method]:<32} | {total:12.1f} | {extra:18.1f} | {ratio:>26} |")
    print("target: a DP step <= 1.5x the non-private step's peak")


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--part", choices=("both", "speed", "memory"), default="both")
    p.add_argument("--batch", type=int, default=256, help="batch of the speed row")
    p.add_argument("--memory-batch", type=int, default=1024, help="batch of the memory row")
    p.add_argument("--tokens", type=int, default=16, help="tokens per example (memory row)")
    p.add_argument("--steps", type=int, default=3, help="steps per memory process")
    p.add_argument("--pairs", type=int, default=3, help="memory rounds (fresh processes)")
    p.add_argument("--processes", type=int, default=0,
                   help="also time the non-private, the DP (auto) and Opacus' DP step in N fresh "
                        "processes each (speed part)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--speed-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--keep-freed-memory", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        memory_child(args.child, args.memory_batch, args.tokens, args.steps)
        return
    if args.speed_child:
        _common.keep_freed_memory_if(sys.argv)
        if args.threads:
            torch.set_num_threads(args.threads)
        fns, parts = _ours(args.batch)
        fn = (_opacus(parts["model"], parts["x"], parts["y"], args.batch)
              if args.speed_child == OPACUS else fns[args.speed_child])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus' full-backward-hook warning
            _common.child_times(fn, args.rounds)
        return
    if _common.maybe_respawn(args):
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    print(_common.environment())
    if args.part in ("both", "speed"):
        check_same_numbers(args.batch)
        fns = speed_candidates(args.batch)
        stats = _common.measure(fns, rounds=args.rounds, budget_s=args.budget,
                                apart=_jax_models.rows(fns))
        print(_common.table(stats, {"non-private": NONPRIVATE}, args.batch,
                            f"\nfull DP step (clip + noise + Adam), MNIST CNN, batch {args.batch}"
                            f" (target: DP step >= 0.85x the non-private step)"))
        if JAX_DP in stats:
            print(f"  JAX+optax DP step / JAX+optax non-private step: throughput ratio "
                  f"{stats[JAX_NONPRIVATE].median / stats[JAX_DP].median:.3f}")
        if args.processes:
            sides, labels = [NONPRIVATE, DP_AUTO], ["non-private step", "DP step (auto)"]
            if _common.optional("opacus") is not None:
                sides.append(OPACUS)
                labels.append("Opacus DP step + Adam")

            def command(side: int, keep: bool) -> list[str]:
                return ([sys.executable, os.path.abspath(__file__), "--speed-child", sides[side],
                         "--batch", str(args.batch), "--rounds", str(args.rounds)]
                        + (["--threads", str(args.threads)] if args.threads else [])
                        + (["--keep-freed-memory"] if keep else []))

            _common.fresh_processes(command, labels, args.processes,
                                    f"full DP step vs non-private step, batch {args.batch}, "
                                    f"{args.rounds} steps each")
    if args.part in ("both", "memory"):
        memory(args.memory_batch, args.tokens, args.steps, args.pairs)


if __name__ == "__main__":
    main()
