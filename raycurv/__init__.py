"""raycurv: find what a neural network memorizes, by the input-loss curvature of every sample.

The Python API (raycurv.api): ``score``, ``load_run``, ``evaluate``, ``lookup``, ``export`` and the ``Run``
they return; ``Recorder`` (raycurv.checkpoints), the per-epoch hook of your own training loop
whose checkpoints ``score(checkpoints=...)`` scores; every mistake raises ``UsageError``. They
load on first use, so that importing raycurv (and ``raycurv --help``) stays fast.
"""

from __future__ import annotations

import sys
import types
from typing import Any

__version__ = "0.1.0"

__all__ = ["Recorder", "Run", "UsageError", "__version__", "evaluate", "export", "load_run", "lookup",
           "score"]

_API = {"Run", "evaluate", "export", "load_run", "lookup", "score"}


def __getattr__(name: str) -> Any:
    if name in _API:
        from raycurv import api

        return getattr(api, name)
    if name == "Recorder":
        from raycurv.checkpoints import Recorder

        return Recorder
    if name == "UsageError":
        from raycurv.errors import UsageError

        return UsageError
    raise AttributeError(f"module 'raycurv' has no attribute {name!r}")


class _Package(types.ModuleType):
    """The package's module type: the API's ``raycurv.evaluate`` and ``raycurv.export`` stay the
    functions although submodules of those names exist. Importing a submodule binds it to the
    package's attribute of its name; for an API name that binding is skipped (the module stays
    in sys.modules: ``from raycurv.export import ...`` works)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
