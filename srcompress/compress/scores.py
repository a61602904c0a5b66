"""The baselines every other method is compared against: weight magnitude / L1 norm and random."""

from __future__ import annotations

import torch

from .layers import Layer
from .registry import Method
from .structured import l1_scores, random_scores


def magnitude_score(layer: Layer, matrix: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """|w|: small weights go first (block patterns average it over each block)."""
    return matrix.abs()


def random_score(layer: Layer, matrix: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Uniform noise from the seeded generator: the floor any real method must beat."""
    return torch.rand(matrix.shape, generator=gen)


MAGNITUDE = Method("magnitude", "prune the smallest |w| (data-free)", kind="mask", score=magnitude_score)
RANDOM = Method("random", "prune at random (seeded baseline)", kind="mask", score=random_score)


L1_CHANNELS = Method("l1", "remove the units with the smallest L1 norm of their weights (data-free)", kind="structured",
                     unit_score=lambda graph, group, context: l1_scores(graph, group))
RANDOM_CHANNELS = Method("random-channels", "remove random units (seeded baseline)", kind="structured",
                         unit_score=lambda graph, group, context: random_scores(group, context.seed))
