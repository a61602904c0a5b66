"""The surgery benchmark's own machinery: the paired sign test and surgery with measured input statistics."""

import copy

import pytest
import torch
from torch import nn

from benchmarks.surgery import InputStatistics, measured_surgery, sign_test
from srcompress.compress.structured import StructuredSpec
from srcompress.pipeline import prune_structured


def test_sign_test_is_exact():
    assert sign_test(0, 0) == 1.0 and sign_test(3, 3) == 1.0
    assert sign_test(5, 0) == pytest.approx(2 / 32) and sign_test(0, 5) == pytest.approx(2 / 32)
    assert sign_test(9, 1) == pytest.approx(2 * 11 / 1024)


def test_measured_surgery_removes_a_fixed_pattern_channel_and_compensates_each_position():
    """A conv channel whose output is the same spatial pattern on every image is removed with outputs unchanged:
    its mean, one value per flattened position, goes into the linear layer's bias."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
    with torch.no_grad():
        model[0].weight[2, 0] = 0.0  # channel 2 reads only input channel 1, which never changes
        model[0].bias[2] = 3.0
    x = torch.randn(64, 2, 8, 8)
    x[:, 1] = torch.linspace(-1, 1, 64).reshape(8, 8)
    reference = model(x).detach()
    data_free = copy.deepcopy(model)
    prune_structured(data_free, (x[:1],), StructuredSpec(0.25), "surgery")
    assert not torch.allclose(data_free(x), reference, atol=1e-3)  # without statistics the channel is not free
    prune_structured(model, (x[:1],), StructuredSpec(0.25), measured_surgery(InputStatistics(model, x)))
    assert model[0].out_channels == 3
    torch.testing.assert_close(model(x).detach(), reference, rtol=1e-5, atol=1e-5)
