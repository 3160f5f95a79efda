"""A model given as an ``nn.Module`` instance (``raycurv.score(model=module)``), as a spec carries
it to every process that builds the model: the module pickled by value, and a readable name.

The name (``instance of package.module.Class``) is all that a spec's JSON form keeps: the run
record and the score table's metadata. A spec read back from JSON names the instance but cannot
build it (raycurv.models says so in one line). Torch-free, so that specs (raycurv.config) stay
light to import; raycurv.models packs a module into one (``pack_instance``).
"""

from __future__ import annotations

import pickle
from typing import Any

from pydantic_core import core_schema

INSTANCE_PREFIX = "instance of "


class ModelInstance:
    """A packed ``nn.Module`` instance: a model factory like the registered ones, whose every call
    returns a fresh copy of the module with the parameters and buffers it had when packed.

    Attributes
    ----------
    name : str
        ``instance of package.module.Class``: how specs, run records and score tables name it.
    pickled : bytes
        The module, on the CPU, pickled with cloudpickle (a class defined in a notebook or a
        script travels by value; one defined in a module is imported where it is unpickled).

    A plain class, not a dataclass: pydantic would dump a dataclass to a dict, and a spec's Python
    dump (a training worker's config) must hold the instance itself.
    """

    __slots__ = ("name", "pickled")

    def __init__(self, name: str, pickled: bytes):
        self.name, self.pickled = name, pickled

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, ModelInstance)
                and (self.name, self.pickled) == (other.name, other.pickled))

    def __hash__(self) -> int:
        return hash((self.name, self.pickled))

    def __repr__(self) -> str:
        return f"ModelInstance({self.name!r})"

    def __call__(self, in_channels: int, num_classes: int) -> Any:
        """A fresh copy of the module. ``in_channels`` and ``num_classes`` are the dataset's: the
        instance has its own, which raycurv.models.check_model checks against them."""
        return pickle.loads(self.pickled)

    def __str__(self) -> str:
        return self.name

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> core_schema.CoreSchema:
        """A spec field holds the instance itself (a Python dump too); its JSON form is the name."""
        as_name = core_schema.plain_serializer_function_ser_schema(str, when_used="json")
        return core_schema.is_instance_schema(cls, serialization=as_name)


def is_instance_name(name: str) -> bool:
    """Whether ``name`` is a model instance's name, as a spec read back from JSON holds it."""
    return name.startswith(INSTANCE_PREFIX)
