"""Bundled examples: a real pretrained model, a real example input and an evaluation, no user files."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from . import assets
from .errors import SrcompressError
from .inputs import set_eval


@dataclass(frozen=True)
class Example:
    name: str
    description: str
    load: Callable[[], nn.Module]
    example_inputs: Callable[[], tuple]
    make_evaluator: Callable[[nn.Module], HeldOutAccuracy]
    calibration: str  # default --calib source for data-driven methods


@dataclass(frozen=True)
class HeldOutAccuracy:
    """Top-1 accuracy on a held-out set; ``inputs`` lets a caller check that nothing trains on them."""

    inputs: torch.Tensor
    labels: torch.Tensor
    dataset: str

    def __call__(self, model: nn.Module) -> dict[str, Any]:
        set_eval(model)
        with torch.no_grad():
            predictions = torch.cat([model(chunk).argmax(1) for chunk in self.inputs.split(500)])
        return {"metric": "accuracy", "dataset": self.dataset, "value": float((predictions == self.labels).float().mean())}


def _mnist_evaluator(_dense: nn.Module) -> HeldOutAccuracy:
    images, labels = assets.mnist5k("test")
    return HeldOutAccuracy(images, labels, f"MNIST-5k held-out ({len(labels)} images)")


EXAMPLES = {
    "mnist": Example(
        "mnist",
        "pretrained MNIST CNN (digit-recognizer-py, 390k parameters) on real MNIST-5k digits",
        assets.pretrained_digit_cnn,
        lambda: (assets.mnist5k("test")[0][:1],),
        _mnist_evaluator,
        "mnist5k",
    ),
}


def get_example(name: str) -> Example:
    if name not in EXAMPLES:
        raise SrcompressError(f"unknown example {name!r}", f"use one of {', '.join(EXAMPLES)}")
    return EXAMPLES[name]
