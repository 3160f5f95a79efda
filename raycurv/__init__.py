"""raycurv: find what a neural network memorizes, by the input-loss curvature of every sample.

The Python API (raycurv.api): ``score``, ``load_run``, ``evaluate``, ``lookup`` and the ``Run``
they return; every mistake raises ``UsageError``. They load on first use, so that importing
raycurv (and ``raycurv --help``) stays fast.
"""

from __future__ import annotations

import sys
import types
from typing import Any

__version__ = "0.1.0"

__all__ = ["Run", "UsageError", "__version__", "evaluate", "load_run", "lookup", "score"]

_API = {"Run", "load_run", "lookup", "score"}  # and evaluate: _Package below


def __getattr__(name: str) -> Any:
    if name in _API:
        from raycurv import api

        return getattr(api, name)
    if name == "UsageError":
        from raycurv.errors import UsageError

        return UsageError
    raise AttributeError(f"module 'raycurv' has no attribute {name!r}")


class _Package(types.ModuleType):
    """The package's module type: ``raycurv.evaluate`` is the API function, although a submodule
    of the same name exists (importing it binds the module to the package attribute; that binding
    is ignored here; the module stays reachable by ``from raycurv.evaluate import ...``)."""

    @property
    def evaluate(self) -> Any:
        from raycurv.api import evaluate

        return evaluate

    @evaluate.setter
    def evaluate(self, module: types.ModuleType) -> None:
        pass


sys.modules[__name__].__class__ = _Package
