"""Pruning methods by name. Adding one is one module plus one line in ``METHODS``."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import SrcompressError

METHODS = {
    "magnitude": "srcompress.compress.scores:MAGNITUDE",
    "random": "srcompress.compress.scores:RANDOM",
    "l1": "srcompress.compress.scores:L1_CHANNELS",
    "random-channels": "srcompress.compress.scores:RANDOM_CHANNELS",
    "surgery": "srcompress.compress.surgery:SURGERY",
    "surgery-pairwise": "srcompress.compress.surgery:SURGERY_PAIRWISE",
    "submodular": "srcompress.compress.submodular:SUBMODULAR",
    "submodular-norw": "srcompress.compress.submodular:SUBMODULAR_NO_REWEIGHT",
}


@dataclass(frozen=True)
class Method:
    """A pruning method.

    ``mask`` methods give element scores (``score``) to the shared mask machinery. ``structured`` methods
    either score units (``unit_score(graph, group, context) -> array``, lowest removed first, which also
    allows global allocation) or choose and compensate group by group (``select(graph, group, count,
    context) -> GroupDecision``). A ``select`` method allows global allocation if it gives ``removal_costs(graph,
    group, context) -> array``: the cost of its 1st, 2nd, ... removal in that group, comparable across groups.
    """

    name: str
    summary: str
    kind: str  # "mask" (zeros in dense weights) or "structured" (physically narrower layers)
    needs_data: bool = False
    score: Callable[..., Any] | None = None
    unit_score: Callable[..., Any] | None = None
    select: Callable[..., Any] | None = None
    removal_costs: Callable[..., Any] | None = None
    default_scope: str = "layer"  # the CLI's --scope when none is given: "layer" (uniform) or "global"
    stops_at_threshold: bool = False  # ``select`` honours StructuredSpec.stop_threshold (a saliency at which to stop)


STRUCTURED_ALIASES = {"magnitude": "l1", "random": "random-channels"}


def get_method(name: "str | Method", structured: bool = False) -> Method:
    """The method registered under ``name`` (a :class:`Method` passes through, e.g. a variant built in code)."""
    if isinstance(name, Method):
        return name
    if structured:
        name = STRUCTURED_ALIASES.get(name, name)
    if name not in METHODS:
        raise SrcompressError(f"unknown method {name!r}", f"use one of {', '.join(sorted(METHODS))}")
    module_name, attr = METHODS[name].split(":")
    method = getattr(importlib.import_module(module_name), attr)
    if structured and method.kind != "structured":
        raise SrcompressError(f"method {name!r} makes masks, not structured pruning", "drop --structured or pick a structured method (l1, random)")
    return method
