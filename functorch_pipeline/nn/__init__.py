"""``fp.nn``: any ``nn.Module`` as a pure function over variable pytrees.

``functionalize(module)`` gives ``init``/``apply``; keyed dropout, pure initialisers
(``fp.nn.init``), ensembles, and the BatchNorm helpers live here too.
"""

from functorch_pipeline.nn._convert import replace_rnns
from functorch_pipeline.nn.recurrent import GRU
from functorch_pipeline.nn.recurrent import LSTM

__all__ = [
    "GRU",
    "LSTM",
    "replace_rnns",
]
