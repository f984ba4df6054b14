"""``fp.nn``: any ``nn.Module`` as a pure function over variable pytrees.

``functionalize(module)`` gives ``init``/``apply``; keyed dropout, pure initialisers
(``fp.nn.init``), ensembles, and the BatchNorm helpers live here too.
"""

from functorch_pipeline.nn import init
from functorch_pipeline.nn._convert import replace_rnns
from functorch_pipeline.nn._ensemble import ensemble_apply
from functorch_pipeline.nn._ensemble import ensemble_init
from functorch_pipeline.nn._functional_model import FunctionalModel
from functorch_pipeline.nn._functional_model import functionalize
from functorch_pipeline.nn._normalization import replace_batchnorm_with_groupnorm
from functorch_pipeline.nn.recurrent import GRU
from functorch_pipeline.nn.recurrent import LSTM
from functorch_pipeline.nn.recurrent import RNN

__all__ = [
    "FunctionalModel",
    "GRU",
    "LSTM",
    "RNN",
    "ensemble_apply",
    "ensemble_init",
    "functionalize",
    "init",
    "replace_batchnorm_with_groupnorm",
    "replace_rnns",
]
