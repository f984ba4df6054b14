"""One train step of the classic MNIST CNN (dropout, Adam, batch 64): fp against imperative.

Rows (all the same network, weights, batch and Adam(1e-3) hyperparameters):

- ``imperative``: ``zero_grad``, forward with ``nn.Dropout``, ``loss.backward()``,
  ``torch.optim.Adam`` (foreach) ``step()``: the reference.
- ``fp pure``: ``fp.value_and_grad`` of ``model.apply(..., train=True, key=k)`` (keyed
  dropout), ``opt.update``, ``optim.apply_updates``.
- ``fp.train.train_step``: the same through :func:`fp.train.train_step`.
- ``fp inplace``: ``opt.update(..., inplace=True)`` + ``optim.apply_updates_`` (donation).
- ``fp pure, no dropout`` / ``imperative, no dropout``: the gradient cost without dropout.
- ``fp.jit step``: the pure step under ``fp.jit`` (``torch.compile``); its cold compile time
  is the "1st call s" column, and the number of compiles over ``--epoch-steps`` further
  steps (fresh batches and keys, as in an epoch) is printed with any warnings compile
  emitted. Skipped with ``--no-jit``. Inductor caches compiled code on disk, so a second
  run's "cold" compile is mostly a cache hit; ``--no-compile-cache`` measures a truly cold
  compile (``torch.compiler.config.force_disable_caches``).
- ``torchopt``: ``torch.func.grad`` + ``torchopt.adam`` when TorchOpt is installed.
- ``jax+optax``: the same network, weights and batch in JAX (``_jax_models.cnn`` with its
  dropout; ``jax.jit`` of the whole step) when JAX and optax are installed. XLA picks its
  own CPU threads: this row is not thread-matched to ``--threads``.

Every row is timed interleaved in one process (rotating order, ``_common.measure``); the
table gives wall and process-CPU medians and ratios to ``imperative``. In one process the
rows share a heap, and one row's allocations change another's page faults (DESIGN.md), so
``--fresh-pairs N --pair-row ROW`` also times ``imperative`` against ``ROW`` each alone in
its own fresh process, N of each in alternating order, with glibc's default malloc and
with freed memory kept, and pools the per-process medians (``_common.fresh_processes``).

    .venv/bin/python benchmarks/train_step.py [--rounds 40] [--threads 1] [--no-jit]
    .venv/bin/python benchmarks/train_step.py --fresh-pairs 4 --pair-row "fp pure" --threads 1
"""

from __future__ import annotations

import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import _jax_models  # noqa: E402
from models import Net  # noqa: E402  (examples/models.py, via _common)

import functorch_pipeline as fp  # noqa: E402
from functorch_pipeline import optim  # noqa: E402


def build(batch: int, jit: bool, epoch_steps: int) -> tuple[dict, dict]:
    """The candidates: name -> zero-argument step, plus notes for some rows."""
    torch.manual_seed(0)
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    net = Net()
    model = fp.functionalize(net)
    variables = model.init(fp.random.key(1), x[:1])
    params0 = variables["params"]
    opt = optim.adam(1e-3)
    fns: dict = {}
    notes: dict = {}

    def imperative_row(train: bool):
        module = Net()
        module.load_state_dict(model.to_state_dict(variables))
        module.train(train)
        topt = torch.optim.Adam(module.parameters(), lr=1e-3)

        def step():
            topt.zero_grad(set_to_none=True)
            F.nll_loss(module(x), y).backward()
            topt.step()
        return step

    fns["imperative"] = imperative_row(True)

    def loss(params, k, train=True):
        if train:
            out, _ = model.apply({"params": params}, x, train=True, key=k)
        else:
            out = model.apply({"params": params}, x)
        return fp.losses.nll(out, y).mean()

    grad_fn = fp.value_and_grad(loss)
    box = {"p": {k: v.clone() for k, v in params0.items()}}
    box["s"] = opt.init(box["p"])
    box["i"] = 0

    def pure():
        box["i"] += 1
        _, g = grad_fn(box["p"], fp.random.fold_in(fp.random.key(2), box["i"]))
        u, box["s"] = opt.update(g, box["s"], box["p"])
        box["p"] = optim.apply_updates(box["p"], u)

    fns["fp pure"] = pure

    state = {"st": fp.train.TrainState.create(params0, opt.init(params0), fp.random.key(3),
                                              buffers=variables["buffers"])}

    def loss_fn(params, buffers, b, k):
        out, new_buffers = model.apply({"params": params, "buffers": buffers}, b[0], train=True,
                                       key=k)
        return fp.losses.nll(out, b[1]).mean(), new_buffers

    def train_step():
        state["st"], _ = fp.train.train_step(state["st"], (x, y), loss_fn, opt)

    fns["fp.train.train_step"] = train_step

    ibox = {"p": {k: v.clone() for k, v in params0.items()}}
    ibox["s"] = opt.init(ibox["p"])

    def inplace():
        _, g = grad_fn(ibox["p"], fp.random.key(4))
        u, ibox["s"] = opt.update(g, ibox["s"], ibox["p"], inplace=True)
        ibox["p"] = optim.apply_updates_(ibox["p"], u)

    fns["fp inplace"] = inplace
    fns["imperative, no dropout"] = imperative_row(False)
    nbox = {"p": {k: v.clone() for k, v in params0.items()}}
    nbox["s"] = opt.init(nbox["p"])
    grad_eval = fp.value_and_grad(lambda p: loss(p, None, train=False))

    def pure_nodrop():
        _, g = grad_eval(nbox["p"])
        u, nbox["s"] = opt.update(g, nbox["s"], nbox["p"])
        nbox["p"] = optim.apply_updates(nbox["p"], u)

    fns["fp pure, no dropout"] = pure_nodrop

    if jit:
        def step(params, opt_state, xb, yb, k):
            def lf(p):
                out, _ = model.apply({"params": p}, xb, train=True, key=k)
                return fp.losses.nll(out, yb).mean()
            value, g = fp.value_and_grad(lf)(params)
            u, opt_state = opt.update(g, opt_state, params)
            return optim.apply_updates(params, u), opt_state, value

        jstep = fp.jit(step)
        jbox = {"p": {k: v.clone() for k, v in params0.items()}, "i": 0}
        jbox["s"] = opt.init(jbox["p"])

        def jitted():
            jbox["i"] += 1
            jbox["p"], jbox["s"], _ = jstep(jbox["p"], jbox["s"], x, y,
                                             fp.random.fold_in(fp.random.key(5), jbox["i"]))

        from torch._dynamo.utils import counters
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            jitted()
            cold = time.perf_counter() - t0
            frames = sum(counters["stats"].values()) and counters["stats"]["unique_graphs"]
            xs, ys = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
            for _ in range(epoch_steps):  # fresh data and keys every step, as in an epoch
                jbox["i"] += 1
                jbox["p"], jbox["s"], _ = jstep(jbox["p"], jbox["s"], xs, ys,
                                                 fp.random.fold_in(fp.random.key(5), jbox["i"]))
            recompiles = counters["stats"]["unique_graphs"] - frames
        msgs = sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0][:120]}"
                       for w in caught})
        fns["fp.jit step"] = jitted
        notes["fp.jit step"] = (f"cold compile {cold:.1f} s ({frames} graphs); "
                                f"{recompiles} recompiles over {epoch_steps} more steps; "
                                f"warnings: {msgs or 'none'}")

    torchopt = _common.optional("torchopt")
    if torchopt is not None:
        tx = torchopt.adam(1e-3)
        module = Net()
        module.load_state_dict(model.to_state_dict(variables))
        module.train()
        tbox = {"p": {k: v.clone() for k, v in params0.items()}}
        tbox["s"] = tx.init(tbox["p"])

        def tloss(p):
            return F.nll_loss(torch.func.functional_call(module, p, (x,)), y)

        tgrad = torch.func.grad(tloss)

        def torchopt_step():
            g = tgrad(tbox["p"])
            u, tbox["s"] = tx.update(g, tbox["s"], params=tbox["p"], inplace=False)
            tbox["p"] = torchopt.apply_updates(tbox["p"], u, inplace=False)

        # global-RNG dropout under torch.func.grad (randomness is fine outside vmap)
        fns["torchopt"] = torchopt_step
    else:
        notes["imperative"] = "torchopt not installed: no TorchOpt row"

    jaxrow = _jax_row(params0, x, y)
    if jaxrow is not None:
        fns["jax+optax"] = jaxrow
        notes["jax+optax"] = _jax_models.threads_line().strip()
    else:
        notes["imperative"] = "; ".join(
            n for n in (notes.get("imperative"), "jax/optax not installed: no JAX row") if n)
    return fns, notes


def _jax_row(params: dict, x: torch.Tensor, y: torch.Tensor):
    """The same network (``_jax_models.cnn`` with its dropout), weights, batch and Adam step
    in JAX + optax under ``jax.jit``, a fresh dropout key each step; or None."""
    mods = _jax_models.modules()
    if mods is None:
        return None
    jax, _, optax = mods
    jparams = _jax_models.params_from_torch(params.items())
    jx, jy = _jax_models.to_jax(x), _jax_models.to_jax(y)
    tx = optax.adam(1e-3)

    @jax.jit
    def step(p, s, xb, yb, k):
        g = jax.grad(_jax_models.cnn_mean_loss)(p, xb, yb, k)
        upd, s = tx.update(g, s, p)
        return optax.apply_updates(p, upd), s

    box = {"p": jparams, "s": tx.init(jparams), "k": jax.random.key(0)}

    def run():
        box["k"], k = jax.random.split(box["k"])
        box["p"], box["s"] = step(box["p"], box["s"], jx, jy, k)
        jax.block_until_ready(box["p"])

    return run


def argparse_hidden() -> str:
    return "internal: run one row alone and print its medians"


def fresh_pairs(args) -> None:
    """``imperative`` and ``args.pair_row`` each alone in a fresh process (NOTE [fresh
    processes] in ``_common``), in both malloc regimes."""
    base = [sys.executable, os.path.abspath(__file__), "--rounds", str(args.rounds),
            "--batch", str(args.batch), "--no-jit"]
    if args.threads:
        base += ["--threads", str(args.threads)]
    if args.pair_row == "fp.jit step":
        base.remove("--no-jit")
    sides = ["imperative", args.pair_row]

    def command(side: int, keep: bool) -> list[str]:
        return [*base, "--solo", sides[side]] + (["--keep-freed-memory"] if keep else [])

    print(_common.environment())
    _common.fresh_processes(command, sides, args.fresh_pairs,
                            f"{args.pair_row} against imperative, {args.rounds} calls per process")


def main() -> None:
    parser = _common.parser(__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--no-jit", action="store_true")
    parser.add_argument("--epoch-steps", type=int, default=50,
                        help="steps after the cold compile over which recompiles are counted")
    parser.add_argument("--no-compile-cache", action="store_true",
                        help="disable Inductor's on-disk caches (a truly cold compile)")
    parser.add_argument("--fresh-pairs", type=int, default=0,
                        help="time imperative and --pair-row alone in N pairs of fresh processes")
    parser.add_argument("--pair-row", default="fp pure")
    parser.add_argument("--solo", default=None, help=argparse_hidden())
    parser.add_argument("--keep-freed-memory", action="store_true", help=argparse_hidden())
    parser.add_argument("--only", default=None,
                        help="comma-separated rows to keep (imperative is always kept)")
    args = parser.parse_args()
    if _common.maybe_respawn(args):
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.fresh_pairs:
        fresh_pairs(args)
        return
    if args.no_compile_cache:
        torch.compiler.config.force_disable_caches = True
    if args.solo:
        _common.keep_freed_memory_if(sys.argv)
    fns, notes = build(args.batch, not args.no_jit, args.epoch_steps)
    if args.solo:
        _common.child_times(fns[args.solo], args.rounds)
        return
    if args.only:
        keep = {"imperative", *args.only.split(",")}
        fns = {k: v for k, v in fns.items() if k in keep}
    stats = _common.measure(fns, rounds=args.rounds, warmup=3, budget_s=args.budget,
                            apart=_jax_models.rows(fns))
    for name, note in notes.items():
        if name in stats:
            stats[name].note = note
    print(_common.environment())
    title = (f"train step, classic MNIST CNN with dropout, Adam(1e-3), batch {args.batch}, "
             f"{args.rounds} interleaved rounds")
    print(_common.table(stats, {"imperative": "imperative"}, args.batch, title))
    print("x imperative = imperative median / row median (> 1 is faster than imperative); "
          "time ratio (issue 13's measure) = 1 / that")


if __name__ == "__main__":
    main()
