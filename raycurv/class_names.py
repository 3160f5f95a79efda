"""Class names of a run's labels, where the run has them: the table's metadata (``class_names``,
a list indexed by label) first, else the names a built-in dataset is known to use. None where
neither says (digits, MNIST and the numbered classes of image folders and Parquet files)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                "truck"),
}


def class_names(metadata: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The names of labels 0..C-1 of a run with table ``metadata``, or None when unknown."""
    named = metadata.get("class_names")
    if isinstance(named, list | tuple) and named and all(isinstance(n, str) for n in named):
        return tuple(named)
    return CLASS_NAMES.get(str(metadata.get("dataset", "")))
