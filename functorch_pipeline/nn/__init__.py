"""``fp.nn``: any ``nn.Module`` as a pure function over variable pytrees.

``functionalize(module)`` gives ``init``/``apply``; keyed dropout, pure initialisers
(``fp.nn.init``), ensembles, and the BatchNorm helpers live here too.
"""

__all__: list[str] = []
