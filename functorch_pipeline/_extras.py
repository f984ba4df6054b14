"""Optional dependencies: import one lazily, or raise an ImportError naming the extra.

``import functorch_pipeline`` imports none of them (``tests/test_privacy.py`` checks it for
``dp-accounting``); the calls that need one import it on first use through
:func:`require_extra`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require_extra"]


def require_extra(module: str, where: str, purpose: str, package: str, extra: str) -> ModuleType:
    """Import ``module``, or raise an ImportError naming the call, the package and the extra.

    Args:
      module: the module to import (``"dp_accounting"``).
      where: the public call that needs it, first in the message (``"epsilon"``).
      purpose: what it is needed for (``"privacy accounting"``).
      package: the package as a user would name it (``"Google's `dp-accounting` package"``).
      extra: this package's extra that installs it (``"privacy"``).

    Returns:
      The imported module.

    Raises:
      ImportError: ``module`` cannot be imported; the original error is its ``__cause__``.

    Examples:
      >>> require_extra("math", "demo", "arithmetic", "`math`", "none").sqrt(4.0)
      2.0
      >>> require_extra("no_such_module_xyz", "demo", "nothing", "`xyz`", "privacy")
      Traceback (most recent call last):
      ...
      ImportError: demo: nothing needs `xyz`, which is not installed; install it with the extra: `pip install "functorch-pipeline[privacy]"`
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{where}: {purpose} needs {package}, which is not installed; install it with the "
            f'extra: `pip install "functorch-pipeline[{extra}]"`'
        ) from e
