"""``fp.serialization``: save and load pytrees as one safe, self-describing file.

A checkpoint is a safetensors file: tensors named by key path in the safetensors layout,
the tree structure and non-tensor leaves as JSON in the header, and a format version.
Loading never unpickles; writes are atomic (:func:`clean_temp_files` removes what killed
saves leave behind); files carry CRC-32 checksums that loading verifies; bad files raise
:class:`CheckpointError`.
``fp.save`` and ``fp.load`` are re-exported at the top level.
"""

from functorch_pipeline.serialization._format import FORMAT_VERSION
from functorch_pipeline.serialization._format import CheckpointError
from functorch_pipeline.serialization._lazy import verify_lazy
from functorch_pipeline.serialization._load import load
from functorch_pipeline.serialization._load import read_metadata
from functorch_pipeline.serialization._save import atomic_write
from functorch_pipeline.serialization._save import save
from functorch_pipeline.serialization._structure import register_type
from functorch_pipeline.serialization._tempfiles import clean_temp_files
from functorch_pipeline.serialization._torch import load_torch

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "atomic_write",
    "clean_temp_files",
    "load",
    "load_torch",
    "read_metadata",
    "register_type",
    "save",
    "verify_lazy",
]
