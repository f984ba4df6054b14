"""``fp.distributed``: JAX-named collectives over pytrees on ``torch.distributed``.

Launch with ``torchrun --nproc_per_node N script.py`` and call :func:`initialize` (gloo on
CPUs, NCCL on GPUs); :func:`spawn` starts N local ranks from Python (tests, notebooks) and
:func:`local_group` makes a one-rank group. No transport of our own: eager calls use
``torch.distributed``'s c10d collectives, traced ones its functional collectives, so they
work eagerly and under ``fp.jit(fullgraph=True)``.

- Collectives: :func:`psum`, :func:`pmean`, :func:`pmax`, :func:`pmin`,
  :func:`all_gather`, :func:`broadcast`, :func:`psum_scatter` (= :func:`reduce_scatter`):
  one collective per dtype (4 MB chunks when eager), trees checked across ranks,
  differentiable with JAX's rules (the backward is a collective on every rank too).
- Ranks and keys: :func:`rank`, :func:`world_size`, :func:`barrier`, :func:`shared_key`,
  :func:`rank_key`.
- Data parallel: :func:`shard` a global batch, average gradients with
  :func:`data_parallel` / :func:`pmean_gradients`; DP-SGD with
  :func:`differentially_private_aggregate` and :func:`poisson_indices`.
- Sharded optimizer state (ZeRO 1/2): :func:`shard_optimizer`, :func:`clip_by_global_norm`.
- Checkpoints: :func:`save`, :func:`load`, :func:`save_checkpoint`,
  :func:`restore_checkpoint` (rank 0 writes; everyone waits for the complete file).
"""

from functorch_pipeline.distributed._checkpoint import load
from functorch_pipeline.distributed._checkpoint import restore_checkpoint
from functorch_pipeline.distributed._checkpoint import save
from functorch_pipeline.distributed._checkpoint import save_checkpoint
from functorch_pipeline.distributed._collectives import all_gather
from functorch_pipeline.distributed._collectives import broadcast
from functorch_pipeline.distributed._collectives import check_same_tree
from functorch_pipeline.distributed._collectives import pmax
from functorch_pipeline.distributed._collectives import pmean
from functorch_pipeline.distributed._collectives import pmin
from functorch_pipeline.distributed._collectives import psum
from functorch_pipeline.distributed._collectives import psum_scatter
from functorch_pipeline.distributed._collectives import reduce_scatter
from functorch_pipeline.distributed._data_parallel import data_parallel
from functorch_pipeline.distributed._data_parallel import differentially_private_aggregate
from functorch_pipeline.distributed._data_parallel import pmean_gradients
from functorch_pipeline.distributed._data_parallel import poisson_indices
from functorch_pipeline.distributed._data_parallel import shard
from functorch_pipeline.distributed._keys import rank_key
from functorch_pipeline.distributed._keys import shared_key
from functorch_pipeline.distributed._launch import local_group
from functorch_pipeline.distributed._launch import spawn
from functorch_pipeline.distributed._runtime import barrier
from functorch_pipeline.distributed._runtime import initialize
from functorch_pipeline.distributed._runtime import is_initialized
from functorch_pipeline.distributed._runtime import rank
from functorch_pipeline.distributed._runtime import world_size
from functorch_pipeline.distributed._zero import ShardedOptimizer
from functorch_pipeline.distributed._zero import clip_by_global_norm
from functorch_pipeline.distributed._zero import shard_optimizer

__all__ = [
    "ShardedOptimizer",
    "all_gather",
    "barrier",
    "broadcast",
    "check_same_tree",
    "data_parallel",
    "clip_by_global_norm",
    "differentially_private_aggregate",
    "initialize",
    "is_initialized",
    "load",
    "local_group",
    "pmax",
    "pmean",
    "pmean_gradients",
    "pmin",
    "poisson_indices",
    "psum",
    "psum_scatter",
    "rank",
    "rank_key",
    "reduce_scatter",
    "restore_checkpoint",
    "save",
    "save_checkpoint",
    "shard",
    "shard_optimizer",
    "shared_key",
    "spawn",
    "world_size",
]
