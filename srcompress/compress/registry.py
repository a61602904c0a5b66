"""Pruning methods by name. Adding one is one module plus one line in ``METHODS``."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import SrcompressError

METHODS = {
    "magnitude": "srcompress.compress.scores:MAGNITUDE",
    "random": "srcompress.compress.scores:RANDOM",
}


@dataclass(frozen=True)
class Method:
    """A pruning method. ``mask`` methods give element scores to the shared mask machinery."""

    name: str
    summary: str
    kind: str  # "mask" (zeros in dense weights) or "structured" (physically narrower layers)
    needs_data: bool = False
    score: Callable[..., Any] | None = None


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise SrcompressError(f"unknown method {name!r}", f"use one of {', '.join(sorted(METHODS))}")
    module_name, attr = METHODS[name].split(":")
    return getattr(importlib.import_module(module_name), attr)
