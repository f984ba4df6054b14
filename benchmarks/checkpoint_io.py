"""Checkpoint I/O: fp.save / fp.load against torch.save / torch.load, same run, interleaved.

Two trees: a 100M-parameter float32 model (BERT-base-shaped: 12 layers, width 768, a
20k-token embedding) and an Adam state for it (params + mu + nu + count, 1.2 GB).

Save is timed with and without the fsync that crash safety needs; the fsync share of
fp.save (file + directory) and the fsync of a file already written by torch.save are
timed on their own. Load is timed three ways:
  warm                 file in the page cache, loaded again in this process: the memory
                       may be recycled from earlier loads (page faults vary run to run);
  warm, new process    file in the page cache, one load in a fresh process (fresh memory,
                       as when resuming a run): page faults are the same for all methods;
  cold, new process    the file's pages dropped first with posix_fadvise(DONTNEED), i.e.
                       the disk (on a VM the host may still cache).
Each figure is the median over --reps interleaved rounds (A B A B ...); minflt is the
median number of minor page faults of one call.

    .venv/bin/python benchmarks/checkpoint_io.py [--reps 5] [--dir /tmp] [--small]

The cost of fp.load's checksum verification (NOTE [checksum]), and the throughput of the
checksum functions available without new dependencies:

    .venv/bin/python benchmarks/checkpoint_io.py --verify [--reps 9]
    .venv/bin/python benchmarks/checkpoint_io.py --checksums [--reps 5]

Issue 13's grid (1M to 100M parameters, 10 to 1,000 leaves): fp.save against torch.save +
fsync, and fp.load (default, ``verify=False``, and with NOTE [prefault] switched off)
against torch.load, warm in this process and in fresh processes, interleaved:

    .venv/bin/python benchmarks/checkpoint_io.py --grid [--reps 5]

Issue 13's lazy-load row: ``fp.load(path, mmap=True)`` (NOTE [lazy load]) against a full
``fp.load``, with ``torch.load(mmap=True)`` and safetensors' ``safe_open`` as peers, also
followed by reading one small leaf and by ``verify_lazy`` (which reads everything):

    .venv/bin/python benchmarks/checkpoint_io.py --lazy [--reps 5]
"""

from __future__ import annotations

import argparse
import binascii
import gc
import hashlib
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable

import safetensors.torch
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import functorch_pipeline as fp  # noqa: E402


def model_tree(width: int = 768, layers: int = 12, vocab: int = 20_000) -> dict:
    g = torch.Generator().manual_seed(0)

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    tree: dict = {"embed": {"weight": w(vocab, width), "pos": w(512, width)}, "layers": []}
    for _ in range(layers):
        tree["layers"].append(
            {
                "attn": {k: {"weight": w(width, width), "bias": w(width)} for k in ("q", "k", "v", "o")},
                "ln1": {"scale": w(width), "bias": w(width)},
                "mlp": {"fc1": {"weight": w(4 * width, width), "bias": w(4 * width)},
                        "fc2": {"weight": w(width, 4 * width), "bias": w(width)}},
                "ln2": {"scale": w(width), "bias": w(width)},
            }
        )
    return tree


def adam_tree(params: dict) -> dict:
    return {
        "params": params,
        "mu": fp.tree.map(lambda x: x * 0.1, params),
        "nu": fp.tree.map(lambda x: x * x, params),
        "count": torch.tensor(1000, dtype=torch.int64),
    }


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


_FSYNC_SECONDS = [0.0]
_real_fsync = os.fsync


def _counting_fsync(fd: int) -> None:
    t0 = time.perf_counter()
    _real_fsync(fd)
    _FSYNC_SECONDS[0] += time.perf_counter() - t0


os.fsync = _counting_fsync  # to report the fsync share of fp.save (file + directory)


def timed(fn: Callable[[], object]) -> tuple[float, int]:
    gc.collect()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    flt = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    del out
    return dt, flt


LOADERS: dict[str, Callable[[str], object]] = {
    "fp.load": lambda p: fp.load(p),
    "fp.load (verify=False)": lambda p: fp.load(p, verify=False),
    "torch.load": lambda p: torch.load(p, weights_only=True),
    "safetensors (pread)": lambda p: safetensors.torch.load_file(p, backend="pread"),
}


def load_in_new_process(method: str, path: str) -> tuple[float, int]:
    out = subprocess.run([sys.executable, __file__, "--child", method, path], capture_output=True, text=True, check=True)
    dt, flt = out.stdout.split()
    return float(dt), int(flt)


def child(method: str, path: str) -> None:
    dt, flt = timed(lambda: LOADERS[method](path))
    print(dt, flt)


def run(name: str, tree: dict, reps: int, directory: str) -> list[tuple[str, str, float, float, int]]:
    nbytes = fp.tree.nbytes(tree)
    fp_path = os.path.join(directory, "bench.safetensors")
    pt_path = os.path.join(directory, "bench.pt")
    save_methods: dict[str, Callable[[], object]] = {
        "fp.save (fsync)": lambda: fp.save(fp_path, tree),
        "fp.save (no fsync)": lambda: fp.save(fp_path, tree, sync=False),
        "torch.save": lambda: torch.save(tree, pt_path),
    }
    times: dict[str, list[float]] = {k: [] for k in [*save_methods, "fsync inside fp.save", "fsync after torch.save"]}
    faults: dict[str, list[int]] = {k: [] for k in times}
    for r in range(reps):
        order = list(save_methods) if r % 2 == 0 else list(reversed(save_methods))
        for k in order:
            _FSYNC_SECONDS[0] = 0.0
            dt, flt = timed(save_methods[k])
            times[k].append(dt)
            faults[k].append(flt)
            if k == "fp.save (fsync)":
                times["fsync inside fp.save"].append(_FSYNC_SECONDS[0])
                faults["fsync inside fp.save"].append(0)
            if k == "torch.save":
                dt, flt = timed(lambda: fsync_path(pt_path))
                times["fsync after torch.save"].append(dt)
                faults["fsync after torch.save"].append(flt)
    times["torch.save + fsync"] = [a + b for a, b in zip(times["torch.save"], times["fsync after torch.save"], strict=True)]
    faults["torch.save + fsync"] = faults["torch.save"]
    fp.save(fp_path, tree)
    torch.save(tree, pt_path)
    fsync_path(pt_path)
    st_path = os.path.join(directory, "bench_plain.safetensors")
    flat = dict(zip(map(fp.tree.keystr, fp.tree.flatten_with_path(tree)[0]), fp.tree.leaves(tree), strict=True))
    safetensors.torch.save_file(flat, st_path)
    paths = {"fp.load": fp_path, "torch.load": pt_path, "safetensors (pread)": st_path}
    load_methods = {k: (p, lambda k=k, p=p: LOADERS[k](p)) for k, p in paths.items()}
    # NOTE: a load in a process that already loaded (and freed) the same sizes may get
    # recycled heap memory (no page faults) or fresh pages, depending on glibc's dynamic
    # mmap threshold, so in-process repeats vary with allocation history. A load in a new
    # process (what resuming a run does) always starts from fresh memory.
    for mode in ("warm", "warm, new process", "cold, new process"):
        tag = f" {mode}"
        for k in load_methods:
            times[k + tag], faults[k + tag] = [], []
        for r in range(reps):
            order = list(load_methods) if r % 2 == 0 else list(reversed(load_methods))
            for k in order:
                path, fn = load_methods[k]
                if mode.startswith("cold"):
                    drop_cache(path)
                else:
                    fn()  # make sure it is in the page cache
                dt, flt = timed(fn) if mode == "warm" else load_in_new_process(k, path)
                times[k + tag].append(dt)
                faults[k + tag].append(flt)
    for p in (fp_path, pt_path, st_path):
        os.remove(p)
    return [(name, k, statistics.median(v), nbytes / statistics.median(v) / 1e9, int(statistics.median(faults[k])))
            for k, v in times.items()]


def _no_prefault_load(p: str) -> object:
    from functorch_pipeline.serialization import _prefault
    _prefault._enabled[0] = False
    try:
        return fp.load(p)
    finally:
        _prefault._enabled[0] = _prefault._madvise is not None


LOADERS["fp.load (no prefault)"] = _no_prefault_load
GRID = [(1_000_000, 10), (1_000_000, 1_000), (10_000_000, 100), (50_000_000, 10),
        (100_000_000, 1_000)]


def grid(reps: int, directory: str, rows: list[int] | None = None) -> None:
    """Issue 13's save/load rows over GRID (or the ``rows`` indices of it): medians of
    interleaved rounds, ratios to torch."""
    print(f"{'params':>6} {'leaves':>6} {'measure':36} {'fp s':>8} {'torch s':>8} {'ratio':>6}")
    for n, leaves in [GRID[i] for i in rows] if rows else GRID:
        _grid_row(n, leaves, reps, directory)


def _grid_row(n: int, leaves: int, reps: int, directory: str) -> None:
    g = torch.Generator().manual_seed(0)
    tree = {f"l{i}": torch.randn(n // leaves, generator=g) for i in range(leaves)}
    fp_path = os.path.join(directory, "grid.safetensors")
    pt_path = os.path.join(directory, "grid.pt")

    def torch_save() -> None:
        torch.save(tree, pt_path)
        fsync_path(pt_path)

    cands = {"fp.save": lambda: fp.save(fp_path, tree), "torch.save + fsync": torch_save}
    t: dict[str, list[float]] = {k: [] for k in cands}
    for r in range(reps):
        for k in (list(cands) if r % 2 == 0 else list(reversed(cands))):
            t[k].append(timed(cands[k])[0])
    loads = {k: (fp_path if k.startswith("fp") else pt_path) for k in
             ("fp.load", "fp.load (verify=False)", "fp.load (no prefault)", "torch.load")}
    for mode in ("warm", "new process"):
        for k in loads:
            t[f"{k} {mode}"] = []
        for r in range(reps):
            for k in (list(loads) if r % 2 == 0 else list(reversed(loads))):
                LOADERS[k](loads[k])  # in the page cache
                dt = (timed(lambda k=k: LOADERS[k](loads[k]))[0] if mode == "warm"
                      else load_in_new_process(k, loads[k])[0])
                t[f"{k} {mode}"].append(dt)
    med = {k: statistics.median(v) for k, v in t.items()}
    rows = [("fp.save vs torch.save + fsync", "fp.save", "torch.save + fsync")]
    for mode in ("warm", "new process"):
        for k in ("fp.load", "fp.load (verify=False)", "fp.load (no prefault)"):
            rows.append((f"{k} {mode}", f"{k} {mode}", f"torch.load {mode}"))
    for label, a, b in rows:
        print(f"{n / 1e6:>5.0f}M {leaves:>6} {label:36} {med[a]:8.4f} {med[b]:8.4f} "
              f"{med[a] / med[b]:5.2f}x", flush=True)
    for p in (fp_path, pt_path):
        os.remove(p)


def checksum_throughput(reps: int) -> None:
    """GB/s of each checksum over 100 MB of float32 (interleaved rounds, medians)."""
    t = torch.randn(25_000_000, generator=torch.Generator().manual_seed(0))
    mv = memoryview(t.view(torch.uint8).numpy()).cast("B")
    words = t.view(torch.int64)
    fns: dict[str, Callable[[], object]] = {
        "zlib.crc32 (used)": lambda: zlib.crc32(mv),
        "binascii.crc32": lambda: binascii.crc32(mv),
        "zlib.adler32": lambda: zlib.adler32(mv),
        "hashlib.blake2b": lambda: hashlib.blake2b(mv).digest(),
        "hashlib.sha1": lambda: hashlib.sha1(mv).digest(),
        "torch int64 sum": lambda: int(words.sum()),
    }
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(reps):
        for k in fns if r % 2 == 0 else reversed(fns):
            times[k].append(timed(fns[k])[0])
    print(f"checksums over {len(mv) / 1e6:.0f} MB, {reps} interleaved rounds, "
          f"zlib {zlib.ZLIB_RUNTIME_VERSION}:")
    for k, v in times.items():
        m = statistics.median(v)
        print(f"  {k:20} {m * 1e3:8.1f} ms  {len(mv) / m / 1e9:6.2f} GB/s")


def verify_cost(reps: int, directory: str) -> None:
    """fp.load with and without checksum verification, 100M params, interleaved."""
    tree = model_tree()
    path = os.path.join(directory, "verify.safetensors")
    fp.save(path, tree)
    size = os.path.getsize(path)
    methods = ["fp.load", "fp.load (verify=False)"]
    for mode in ("warm", "warm, new process"):
        times: dict[str, list[float]] = {k: [] for k in methods}
        for r in range(reps):
            for k in methods if r % 2 == 0 else reversed(methods):
                if mode == "warm":
                    times[k].append(timed(lambda k=k: LOADERS[k](path))[0])
                else:
                    times[k].append(load_in_new_process(k, path)[0])
        a, b = (statistics.median(times[k]) for k in methods)
        print(f"{fp.tree.size(tree) / 1e6:.0f}M params, {size / 1e9:.2f} GB, {mode}, {reps} "
              f"interleaved rounds: verify {a:.3f} s, verify=False {b:.3f} s (medians), "
              f"ratio {a / b:.3f} (+{100 * (a / b - 1):.1f}%); per round: "
              + " ".join(f"{x / y:.2f}" for x, y in zip(*times.values(), strict=True)))
    os.remove(path)


def _lazy_touch(p: str) -> object:
    """Lazy open, then read one 768-float bias (the use case: a part of a big file)."""
    tree = fp.load(p, mmap=True)
    return tree["layers"][0]["ln1"]["bias"].sum()


def _lazy_verify(p: str) -> object:
    """Lazy open, then check every tensor's checksum (reads all the data)."""
    tree = fp.load(p, mmap=True)
    fp.serialization.verify_lazy(tree)
    return tree


LOADERS["fp.load (mmap=True)"] = lambda p: fp.load(p, mmap=True)
LOADERS["fp.load (mmap=True) + read one leaf"] = _lazy_touch
LOADERS["fp.load (mmap=True) + verify_lazy"] = _lazy_verify
LOADERS["torch.load (mmap=True)"] = lambda p: torch.load(p, weights_only=True, mmap=True)
LOADERS["safetensors safe_open (keys)"] = lambda p: _safe_open_keys(p)


def _safe_open_keys(p: str) -> object:
    with safetensors.safe_open(p, framework="pt") as f:
        return list(f.keys())


def lazy_open(reps: int, directory: str) -> None:
    """Issue 13's lazy-load row: time to open a checkpoint lazily vs a full load, 10M and
    100M parameters, in this process (file in the page cache) and in fresh processes."""
    for tree in (model_tree(vocab=2_000, layers=1), model_tree()):
        paths = {"fp": os.path.join(directory, "lazy.safetensors"),
                 "torch": os.path.join(directory, "lazy.pt"),
                 "st": os.path.join(directory, "lazy_plain.safetensors")}
        fp.save(paths["fp"], tree)
        torch.save(tree, paths["torch"])
        flat = dict(zip(map(fp.tree.keystr, fp.tree.flatten_with_path(tree)[0]),
                        fp.tree.leaves(tree), strict=True))
        safetensors.torch.save_file(flat, paths["st"])
        with open(paths["fp"], "rb") as f:
            head = int.from_bytes(f.read(8), "little")
        size = os.path.getsize(paths["fp"])
        n, leaves = fp.tree.size(tree), len(fp.tree.leaves(tree))
        del tree, flat
        methods = {k: paths["fp"] for k in ("fp.load", "fp.load (mmap=True)",
                                          "fp.load (mmap=True) + read one leaf",
                                          "fp.load (mmap=True) + verify_lazy")}
        methods["torch.load"] = methods["torch.load (mmap=True)"] = paths["torch"]
        methods["safetensors safe_open (keys)"] = paths["st"]
        print(f"{n / 1e6:.0f}M params, {leaves} leaves, file {size / 1e9:.3f} GB, header "
              f"{head / 1e3:.1f} kB, {reps} interleaved rounds, medians:")
        for mode in ("warm", "new process"):
            t: dict[str, list[float]] = {k: [] for k in methods}
            for r in range(reps):
                for k in list(methods) if r % 2 == 0 else list(reversed(methods)):
                    LOADERS[k](methods[k])  # in the page cache
                    dt = (timed(lambda k=k, p=methods[k]: LOADERS[k](p))[0] if mode == "warm"
                          else load_in_new_process(k, methods[k])[0])
                    t[k].append(dt)
            full = statistics.median(t["fp.load"])
            for k, v in t.items():
                m = statistics.median(v)
                print(f"  {mode:12} {k:38} {m * 1e3:10.3f} ms  {m / full:8.4f}x fp.load",
                      flush=True)
        for p in paths.values():
            os.remove(p)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--verify", action="store_true", help="only the checksum verification cost")
    ap.add_argument("--checksums", action="store_true", help="only checksum throughputs")
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    ap.add_argument("--small", action="store_true", help="a 10x smaller model, for a quick look")
    ap.add_argument("--grid", action="store_true", help="issue 13's sizes x leaves grid only")
    ap.add_argument("--lazy", action="store_true",
                    help="only the lazy-load row: fp.load(mmap=True) vs a full load")
    ap.add_argument("--grid-rows", type=int, nargs="*", default=None,
                    help="indices into GRID to run (default all)")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.lazy:
        print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {os.cpu_count()} "
              f"cpus, load average {os.getloadavg()[0]:.1f} at start")
        lazy_open(args.reps, args.dir or tempfile.mkdtemp(prefix="ckpt_bench_"))
        print(f"load average {os.getloadavg()[0]:.1f} at the end")
        return
    if args.grid:
        print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {os.cpu_count()} "
              f"cpus, load average {os.getloadavg()[0]:.1f} at start, {args.reps} reps")
        grid(args.reps, args.dir or tempfile.mkdtemp(prefix="ckpt_bench_"), args.grid_rows)
        print(f"load average {os.getloadavg()[0]:.1f} at the end")
        return
    if args.checksums or args.verify:
        print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {os.cpu_count()} "
              f"cpus, load average {os.getloadavg()[0]:.1f} at start")
        if args.checksums:
            checksum_throughput(args.reps)
        if args.verify:
            verify_cost(args.reps, args.dir or tempfile.mkdtemp(prefix="ckpt_bench_"))
        print(f"load average {os.getloadavg()[0]:.1f} at the end")
        return
    params = model_tree(vocab=2_000, layers=1) if args.small else model_tree()
    trees = {
        f"model {fp.tree.size(params) / 1e6:.0f}M params": params,
        "Adam state (params+mu+nu+count)": adam_tree(params),
    }
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {os.cpu_count()} cpus, "
          f"load average {os.getloadavg()[0]:.1f} at start, MALLOC_MMAP_THRESHOLD_="
          f"{os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset')}")
    directory = args.dir or tempfile.mkdtemp(prefix="ckpt_bench_")
    rows = []
    for name, tree in trees.items():
        print(f"{name}: {fp.tree.nbytes(tree) / 1e9:.2f} GB, {len(fp.tree.leaves(tree))} leaves, {args.reps} reps ...", flush=True)
        rows += run(name, tree, args.reps, directory)
    base = {"fp.save (fsync)": "torch.save + fsync", "fp.save (no fsync)": "torch.save"}
    for mode in ("warm", "warm, new process", "cold, new process"):
        for k in ("fp.load", "safetensors (pread)"):
            base[f"{k} {mode}"] = f"torch.load {mode}"
    print(f"\n{'tree':34} {'method':40} {'median s':>9} {'GB/s':>7} {'minflt':>8}  ratio (time / torch)")
    for name, k, t, gbs, flt in rows:
        ratio = ""
        if k in base:
            ref = next(r[2] for r in rows if r[0] == name and r[1] == base[k])
            ratio = f"{t / ref:.2f}x of {base[k]}"
        print(f"{name:34} {k:40} {t:9.3f} {gbs:7.2f} {flt:8d}  {ratio}")
    print(f"load average {os.getloadavg()[0]:.1f} at the end. GB/s = tree bytes / median time. "
          "'fp.save (no fsync)' also pays ext4's auto_da_alloc: renaming over an existing file "
          "starts writeback of the new file's data.")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], sys.argv[3])
    else:
        main()
