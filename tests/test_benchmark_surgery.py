"""The surgery benchmark's own machinery: the paired sign test, surgery with measured input statistics, the verdicts."""

import copy

import pytest
import torch
from torch import nn

from benchmarks.surgery import InputStatistics, fc_share, measured_surgery, paper_comparison, sign_test, verdicts
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


def _row(setting, amount, method, accuracy, kl, removed=0.0, p=1.0):
    row = {"setting": setting, "amount": amount, "method": method, "accuracy": accuracy, "kl": kl, "params_removed": removed}
    return {**row, "vs_l1": {"sign_p": p}} if method == "surgery" else row


def test_verdicts_say_beats_ties_or_loses_per_point():
    rows = [_row("fc", 0.25, "surgery", 0.99, 0.01), _row("fc", 0.25, "l1", 0.99, 0.02),
            _row("fc", 0.5, "surgery", 0.97, 0.03, p=0.04), _row("fc", 0.5, "l1", 0.98, 0.01)]
    text = verdicts(rows, "accuracy")
    assert "fc 25%: ties L1 on accuracy (0.9900 vs 0.9900, sign-test p 1.00), beats it on KL" in text
    assert "fc 50%: loses to L1 on accuracy (0.9700 vs 0.9800, sign-test p 0.04), loses to it on KL" in text


def test_paper_comparison_takes_the_largest_fc_pruning_within_a_point_of_dense():
    rows = [_row("dense", 0.0, "dense", 0.99, 0.0), _row("fc", 0.5, "surgery", 0.985, 0.0, 0.4),
            _row("fc", 0.9, "surgery", 0.981, 0.0, 0.7), _row("fc", 0.95, "surgery", 0.95, 0.0, 0.75),
            _row("fc", 0.5, "l1", 0.97, 0.0, 0.4), _row("conv", 0.5, "random", 0.99, 0.0, 0.5)]
    text = paper_comparison(rows, 0.8)
    assert "80.0% of the CNN's parameters" in text
    assert "- surgery: 90% of fc neurons, 70.0% of all parameters, accuracy 0.9810" in text
    assert "- l1: none of the measured points" in text
    assert "- random: none of the measured points" in text  # the conv row does not count


def test_fc_share_is_the_first_linear_layers_part_of_the_parameters():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 4), nn.Linear(4, 2))
    assert fc_share(model) == pytest.approx(36 / (20 + 36 + 10))
