"""``fp.tree``: pytree utilities on optree.

Trees are nested dicts, lists, tuples, NamedTuples, registered dataclasses and ``None``
(an empty subtree, as in JAX). Dict leaves are visited in sorted key order; rebuilt dicts
keep their original key order.
"""

from functorch_pipeline.tree._core import NAMESPACE
from functorch_pipeline.tree._core import KeyPath
from functorch_pipeline.tree._core import PyTree
from functorch_pipeline.tree._core import flatten
from functorch_pipeline.tree._core import flatten_with_path
from functorch_pipeline.tree._core import is_leaf_none
from functorch_pipeline.tree._core import keystr
from functorch_pipeline.tree._core import leaves
from functorch_pipeline.tree._core import leaves_with_path
from functorch_pipeline.tree._core import map
from functorch_pipeline.tree._core import map_with_path
from functorch_pipeline.tree._core import register_dataclass
from functorch_pipeline.tree._core import register_pytree_node
from functorch_pipeline.tree._core import same_structure
from functorch_pipeline.tree._core import structure
from functorch_pipeline.tree._core import unflatten
from functorch_pipeline.tree._math import add
from functorch_pipeline.tree._math import add_scale
from functorch_pipeline.tree._math import allclose
from functorch_pipeline.tree._math import full_like
from functorch_pipeline.tree._math import global_norm
from functorch_pipeline.tree._math import max
from functorch_pipeline.tree._math import nbytes
from functorch_pipeline.tree._math import norm
from functorch_pipeline.tree._math import ones_like
from functorch_pipeline.tree._math import scale
from functorch_pipeline.tree._math import size
from functorch_pipeline.tree._math import sub
from functorch_pipeline.tree._math import sum
from functorch_pipeline.tree._math import vdot
from functorch_pipeline.tree._math import where
from functorch_pipeline.tree._math import zeros_like
from functorch_pipeline.tree._ops import astype
from functorch_pipeline.tree._ops import clone
from functorch_pipeline.tree._ops import detach
from functorch_pipeline.tree._ops import random_like
from functorch_pipeline.tree._ops import ravel
from functorch_pipeline.tree._ops import stack
from functorch_pipeline.tree._ops import to
from functorch_pipeline.tree._ops import unstack

__all__ = [
    "NAMESPACE",
    "KeyPath",
    "PyTree",
    "add",
    "add_scale",
    "allclose",
    "astype",
    "clone",
    "detach",
    "flatten",
    "flatten_with_path",
    "full_like",
    "global_norm",
    "is_leaf_none",
    "keystr",
    "leaves",
    "leaves_with_path",
    "map",
    "map_with_path",
    "max",
    "nbytes",
    "norm",
    "ones_like",
    "random_like",
    "ravel",
    "register_dataclass",
    "register_pytree_node",
    "same_structure",
    "scale",
    "size",
    "stack",
    "structure",
    "sub",
    "sum",
    "to",
    "unflatten",
    "unstack",
    "vdot",
    "where",
    "zeros_like",
]
