"""Fast per-sample gradients from one batched forward and backward (``method="hooks"``).

See NOTE [how the engine works] in ``_engine``, the per-op rules in ``_rules`` (linear,
conv1d/2d, embedding, normalisation), ``_rules_conv`` (conv3d, transposed convolutions),
``_rules_misc`` (embedding_bag, instance_norm, rms_norm, built-in RNN kernels),
``_rules_attention`` (multi_head_attention_forward), ``_rules_broadcast`` (a parameter
added to, multiplied with or expanded over the batch: NOTE [broadcast parameters]),
``_rules_elementwise`` (a parameter in ``torch.maximum``, ``clamp``, ``lerp``, ``pow``,
``where`` and other elementwise ops: NOTE [elementwise parameters]),
``_rules_matmul`` (``x @ w``: NOTE [x @ w]), ``_rules_cells`` (``nn.LSTMCell``/``GRUCell``/
``RNNCell``: NOTE [recurrent cells]), ``_rules_index`` (``p[ids]`` and ``h[key] = p``:
NOTE [a parameter indexed by the batch], NOTE [a parameter written into the batch]), the fused LSTM/GRU rules in
``_recurrent`` and the recycled output buffers in ``_buffers``. Higher layers make a
composite op replaceable with :func:`overridable` and give it a rule with
:func:`register_rule`.
"""

from functorch_pipeline.transforms._grad_sample import _rules_attention  # noqa: F401 (registers)
from functorch_pipeline.transforms._grad_sample import _rules_broadcast  # noqa: F401 (registers)
from functorch_pipeline.transforms._grad_sample import _rules_cells  # noqa: F401 (registers)
from functorch_pipeline.transforms._grad_sample import _rules_conv  # noqa: F401 (registers)
from functorch_pipeline.transforms._grad_sample import _rules_elementwise  # noqa: F401 (registers)
from functorch_pipeline.transforms._grad_sample import _rules_index  # noqa: F401 (registers)
from functorch_pipeline.transforms._grad_sample import _rules_matmul  # noqa: F401 (registers)
from functorch_pipeline.transforms._grad_sample import _rules_misc  # noqa: F401 (registers)
from functorch_pipeline.transforms._grad_sample._api import Unsupported
from functorch_pipeline.transforms._grad_sample._api import hooks_value_and_grad
from functorch_pipeline.transforms._grad_sample._recurrent import gru_direction_rule
from functorch_pipeline.transforms._grad_sample._recurrent import gru_update
from functorch_pipeline.transforms._grad_sample._recurrent import lstm_direction_rule
from functorch_pipeline.transforms._grad_sample._rules import overridable
from functorch_pipeline.transforms._grad_sample._rules import register_rule

__all__ = [
    "Unsupported",
    "gru_direction_rule",
    "gru_update",
    "hooks_value_and_grad",
    "lstm_direction_rule",
    "overridable",
    "register_rule",
]
