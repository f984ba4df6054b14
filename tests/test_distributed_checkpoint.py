"""Distributed checkpoints in spawned gloo ranks: resume 2 -> 1 -> 2 ranks with sharded
optimizer state gives the one-process trajectory; a writer that dies mid-save leaves the
previous checkpoint as the latest and makes the other rank fail quickly."""

from __future__ import annotations

import os
import re
import time

import pytest
import torch

import functorch_pipeline as fp
from functorch_pipeline import distributed as fpd
from functorch_pipeline import optim

TIMEOUT = 120
BATCH = 8


def _params() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(5, 3, generator=g, dtype=torch.float64),
        "b": torch.randn(3, generator=g, dtype=torch.float64),
    }


def _loss(params: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((torch.tanh(x @ params["w"] + params["b"]) - y) ** 2).mean()


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(BATCH, 5, generator=g, dtype=torch.float64), torch.randn(
        BATCH, 3, generator=g, dtype=torch.float64
    )


def _steps(params: dict, state: object, opt: object, start: int, stop: int) -> tuple[dict, object]:
    for step in range(start, stop):
        batch = fpd.shard(_batch(step)) if fpd.is_initialized() else _batch(step)
        grads = fp.grad(_loss)(params, *batch)
        updates, state = opt.update(grads, state, params)
        params = optim.apply_updates(params, updates)
    return params, state


def _phase(rank: int, directory: str, start: int, stop: int) -> dict:
    opt = fpd.shard_optimizer(optim.adam(0.05))
    manager = fp.train.CheckpointManager(directory, max_to_keep=2)
    if start == 0:
        params = _params()
        state = opt.init(params)
    else:
        saved = fpd.restore_checkpoint(manager)
        params, state = saved["params"], opt.shard_state(saved["opt_state"], saved["params"])
        assert int(saved["step"]) == start
        # the world-size-independent state survives a cut and a gather exactly
        assert fp.tree.allclose(opt.gather_state(state, params), saved["opt_state"], rtol=0, atol=0)
    params, state = _steps(params, state, opt, start, stop)
    full = opt.gather_state(state, params)
    fpd.save_checkpoint(
        manager, stop, {"params": params, "opt_state": full, "step": torch.tensor(stop)}
    )
    out = {
        "params": params,
        "state_bytes": fp.tree.nbytes(state),
        "full_bytes": fp.tree.nbytes(full),
    }
    try:  # a failed write raises on every rank, not only the writer
        fpd.save(os.path.join(directory, "missing", "dir", "x.safetensors"), {"w": torch.ones(1)})
    except Exception as e:  # noqa: BLE001 - reported to the test
        out["failed_save"] = f"{type(e).__name__}: {e}"
    return out


def test_resume_with_another_world_size_follows_one_process(tmp_path: object) -> None:
    d = str(tmp_path)
    a = fpd.spawn(_phase, 2, d, 0, 4, timeout_s=TIMEOUT)
    with fpd.local_group():  # the 1-rank phase in this process: a spawn costs seconds
        b = [_phase(0, d, 4, 8)]
    c = fpd.spawn(_phase, 2, d, 8, 12, timeout_s=TIMEOUT)
    ref_opt = optim.adam(0.05)
    ref, _ = _steps(_params(), ref_opt.init(_params()), ref_opt, 0, 12)
    for got in c:
        assert fp.tree.allclose(got["params"], ref, rtol=0, atol=1e-12)
    assert not fp.tree.allclose(a[0]["params"], ref, rtol=0, atol=1e-3)  # the later phases moved on
    # 18 parameters: adam's mu and nu are 2 x 18 float64 whole, 2 x 9 per rank with 2 ranks
    assert [x["state_bytes"] for x in a + b + c] == [2 * 9 * 8 + 4] * 2 + [2 * 18 * 8 + 4] + [
        2 * 9 * 8 + 4
    ] * 2
    assert fp.train.CheckpointManager(d).all_steps() == [8, 12]
    assert re.search(r"FileNotFoundError|No such file", a[0]["failed_save"])
    assert a[1]["failed_save"] == (
        "RuntimeError: fp.distributed.save: rank 0 failed to write the checkpoint (see its error)"
    )


def _dies_mid_save(rank: int, directory: str) -> None:
    manager = fp.train.CheckpointManager(directory)
    tree = {"w": torch.full((1000,), float(rank))}
    fpd.save_checkpoint(manager, 1, tree)
    if rank == 0:
        os.replace = lambda *a, **k: os._exit(
            7
        )  # killed after writing the temporary file, before the rename
    fpd.save_checkpoint(manager, 2, {"w": torch.full((1000,), 2.0)})


def test_writer_dying_mid_save_keeps_latest_consistent(tmp_path: object) -> None:
    start = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        fpd.spawn(_dies_mid_save, 2, str(tmp_path), timeout_s=20)
    msg = str(info.value)
    assert "rank 0: exited with code 7 without a result" in msg
    assert re.search(
        r"rank 1: RuntimeError: fp.distributed.broadcast: the collective failed on rank 1 "
        r"\(a peer rank may have died",
        msg,
    )
    assert time.monotonic() - start < 50
    manager = fp.train.CheckpointManager(str(tmp_path))
    assert manager.latest_step() == 1
    assert torch.equal(manager.restore()["w"], torch.zeros(1000))
