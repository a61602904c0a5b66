"""Data-free surgery: exact merges of duplicates and positive multiples, and the greedy order."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from srcompress import assets
from srcompress.compress.graph import build_graph
from srcompress.compress.structured import StructuredSpec
from srcompress.compress.surgery import activation_mode, greedy_merges, incoming, input_moments, outgoing
from srcompress.pipeline import prune_structured


class MLP(nn.Module):
    def __init__(self, activation):
        super().__init__()
        self.fc1 = nn.Linear(10, 8)
        self.act = activation
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _copy_unit(linear: nn.Linear, source: int, target: int, scale: float) -> None:
    with torch.no_grad():
        linear.weight[target] = linear.weight[source] * scale
        linear.bias[target] = linear.bias[source] * scale


@pytest.mark.parametrize("activation,scale,mode", [(nn.ReLU(), 1.0, "homogeneous"), (nn.ReLU(), 3.0, "homogeneous"),
                                                   (nn.ReLU(), 0.4, "homogeneous"), (nn.Identity(), -2.0, "linear"),
                                                   (nn.GELU(), 1.0, "approximate"), (nn.Tanh(), 1.0, "approximate")])
def test_duplicate_or_multiple_is_merged_exactly(activation, scale, mode):
    torch.manual_seed(0)
    model = MLP(activation).eval()
    _copy_unit(model.fc1, 2, 6, scale)
    x = torch.randn(256, 10)
    reference = model(x).detach()
    pair = model.fc1.weight.detach()[[2, 6]].clone()
    report = prune_structured(model, (x[:1],), StructuredSpec(1 / 8), "surgery")
    assert report.ok and model.fc1.out_features == 7
    assert report.groups[0]["info"]["mode"] == mode
    assert report.groups[0]["info"]["merged"] == 1
    kept = model.fc1.weight.detach()
    assert sum(any(torch.equal(row, unit) for unit in pair) for row in kept) == 1  # one of the pair went
    torch.testing.assert_close(model(x).detach(), reference, rtol=1e-5, atol=1e-5)


def test_negative_multiple_is_not_merged_through_relu():
    torch.manual_seed(0)
    model = MLP(nn.ReLU()).eval()
    _copy_unit(model.fc1, 2, 6, -1.0)
    graph = build_graph(model, (torch.randn(1, 10),))
    group = graph.groups[0]
    merges = greedy_merges(incoming(graph, group), outgoing(graph, group), activation_mode(graph, group), 7)
    for j, i, c, _ in merges:
        if {i, j} == {2, 6}:
            assert c == 0.0  # relu(-z) is not a multiple of relu(z): never merged with a negative factor


def test_duplicate_channels_behind_batchnorm_are_found_after_folding():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 2, 3)).eval()
    with torch.no_grad():
        bn = model[1]
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        # channel 4 = 2x channel 1 before BN, and BN scales it back: identical after folding
        model[0].weight[4] = 2 * model[0].weight[1]
        model[0].bias[4] = 2 * model[0].bias[1]
        bn.running_mean[4] = 2 * bn.running_mean[1]
        bn.running_var[4] = 4 * bn.running_var[1] + 3 * bn.eps
        bn.weight[4], bn.bias[4] = bn.weight[1], bn.bias[1]
    x = torch.randn(4, 3, 9, 9)
    reference = model(x).detach()
    report = prune_structured(model, (x[:1],), StructuredSpec(1 / 6), "surgery")
    assert report.ok and model[0].out_channels == 5 and model[1].num_features == 5
    torch.testing.assert_close(model(x).detach(), reference, rtol=1e-5, atol=1e-5)


def _brute_force(u, a, mode, steps):
    """Reference: try every (survivor, removed) pair (and outright deletion) at every step."""
    u, a = u.copy(), a.copy()
    alive = list(range(len(u)))
    sequence = []
    for _ in range(steps):
        best = None
        for j in alive:
            a2 = float(np.mean(a[j] ** 2))
            candidates = [(-1, 0.0)]
            for i in alive:
                if i == j:
                    continue
                c = 1.0 if mode == "approximate" else float(u[i] @ u[j] / (u[i] @ u[i]))
                if mode == "homogeneous":
                    c = max(c, 0.0)
                candidates.append((i, c))
            for i, c in candidates:
                target = c * u[i] if i >= 0 else 0.0
                saliency = a2 * float(np.sum((u[j] - target) ** 2))
                if best is None or saliency < best[0] - 1e-12:
                    best = (saliency, j, i, c)
        saliency, j, i, c = best
        sequence.append((j, i))
        if i >= 0:
            a[i] += c * a[j]
        alive.remove(j)
    return sequence


@pytest.mark.parametrize("mode", ["approximate", "homogeneous", "linear"])
def test_greedy_matches_brute_force(mode):
    rng = np.random.default_rng(3)
    u = rng.normal(size=(7, 5))
    u[5] = 0.97 * u[1] + 0.01 * rng.normal(size=5)
    a = rng.normal(size=(7, 4))
    fast = [(j, i) for j, i, _, _ in greedy_merges(u, a.copy(), mode, 6)]
    assert fast == _brute_force(u, a, mode, 6)


def test_saliency_curve_and_threshold_stop(cli, tmp_path, model_files):
    out = tmp_path / "cnn.pt"
    result = cli("prune", "--method", "surgery", "--saliency-threshold", "0.1", model_files["cnn"], "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    for row in result.json["groups"]:
        curve = row["info"]["saliency_curve"]
        removed = row["units_before"] - row["units_after"]
        assert len(curve) == row["units_before"] - max(1, math.ceil(0.01 * row["units_before"]))  # down to the floor
        assert all(v <= 0.1 for v in curve[:removed]) and (removed == len(curve) or curve[removed] > 0.1)
    assert result.json["reached"]["channels"] > 0


def test_a_threshold_below_every_merge_fails_and_says_so(cli, tmp_path, model_files):
    out = tmp_path / "cnn.pt"
    result = cli("prune", "--method", "surgery", "--saliency-threshold", "0", model_files["cnn"], "-o", out)
    assert result.exit_code == 3 and not out.exists()
    assert "no merge costs less than the saliency threshold 0" in result.stderr and "raise --saliency-threshold" in result.stderr
    assert "surgery, saliency threshold 0" in result.output  # the table's title names what was asked


def test_surgery_needs_no_data_and_beats_l1_on_mnist_fc(cli, tmp_path, model_files):
    """`prune --method surgery` takes no data; on the pretrained CNN's FC layer it keeps the function closer."""
    x, _ = assets.mnist5k("test")
    dense = torch.load(model_files["cnn"], weights_only=False)
    with torch.no_grad():
        reference = dense(x).log_softmax(-1)
    divergence = {}
    for method in ("surgery", "l1"):
        out = tmp_path / f"{method}.pt"
        result = cli("prune", "--method", method, "--structured", "--sparsity", "0.75", "--exclude", "conv_layers*",
                     model_files["cnn"], "-o", out, "--quiet")
        assert result.exit_code == 0, result.stderr
        with torch.no_grad():
            pruned = torch.load(out, weights_only=False)(x).log_softmax(-1)
        divergence[method] = float(torch.nn.functional.kl_div(pruned, reference, log_target=True, reduction="batchmean"))
    assert divergence["surgery"] < divergence["l1"]


def test_minilm_ffn_is_reported_approximate():
    model = assets.minilm()[0].auto_model.eval()
    inputs = (torch.randint(0, 30000, (1, 8)),)
    report = prune_structured(model, inputs, StructuredSpec(0.25, exclude=("*attention*",)), "surgery")
    ffn = [row for row in report.groups if row["kind"] == "neurons"]
    assert len(ffn) == 6 and all(row["info"]["approximate"] and row["units_after"] == 1152 for row in ffn)


def test_constant_channel_goes_into_the_consumer_batchnorm():
    """A channel whose BatchNorm output never varies is removed at no cost: its mean moves to the next layer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU6(), nn.Conv2d(6, 4, 3, bias=False),
                          nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.bias.uniform_(-0.5, 1.5)
        model[1].weight[3], model[1].bias[3] = 0.0, 2.0  # channel 3 is always ReLU6(2) = 2
    x = torch.randn(8, 3, 11, 11)
    reference = model(x).detach()
    plain = prune_structured(copy.deepcopy(model), (x[:1],), StructuredSpec(1 / 6), "l1")
    report = prune_structured(model, (x[:1],), StructuredSpec(1 / 6), "surgery")
    info = report.groups[0]["info"]
    assert info["saliency"] == "batchnorm statistics" and info["mean_compensated"] == ["3.weight"]
    assert plain.groups[0]["units_after"] == model[0].out_channels == 5
    assert not ((model[1].weight == 0) & (model[1].bias == 2)).any()  # the constant channel is the one removed
    torch.testing.assert_close(model(x).detach(), reference, rtol=1e-5, atol=1e-5)


def test_batchnorm_moments_predict_mobilenet_inputs():
    """The data-free input means and variances agree with those measured on real photos."""
    model = assets.pretrained_mobilenet_v2()
    images = assets.image_crops("test", 16)
    graph = build_graph(model, (images[:1],))
    assert graph.layers["features.2.conv.2.weight"].feeds == {"features.3.conv.0.0.weight", "features.4.conv.0.0.weight"}
    assert [op for op, *_ in graph.layers["features.3.conv.1.0.weight"].chain] == ["batch_norm", "hardtanh_"]
    seen = {}
    hooks = [model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, i[0]))
             for name in ("features.3.conv.2", "features.11.conv.2", "features.14.conv.0.0")]
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    for group_name, consumer, through_relu6 in [("features.3.conv.0.0", "features.3.conv.2", True),
                                                ("features.11.conv.0.0", "features.11.conv.2", True),
                                                ("features.11.conv.2", "features.14.conv.0.0", False)]:
        moments = input_moments(graph, graph.group(group_name))[consumer + ".weight"]
        measured = seen[consumer].double()
        mean_corr = np.corrcoef(moments.mean, measured.mean((0, 2, 3)).numpy())[0, 1]
        var_corr = np.corrcoef(moments.variance, measured.var((0, 2, 3)).numpy())[0, 1]
        if through_relu6:  # means of a residual stream are all near zero; correlation says nothing there
            assert mean_corr > 0.9, group_name
        assert var_corr > 0.4, group_name


def test_global_allocation_takes_the_cheapest_merges_network_wide(cli, tmp_path, model_files):
    """Under --scope global surgery spends the budget where merging costs least: on exact duplicates first."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    for source, target in ((0, 5), (1, 6), (2, 7)):
        _copy_unit(model[0], source, target, 1.0)
    x = torch.randn(256, 10)
    reference = model(x).detach()
    uniform = prune_structured(copy.deepcopy(model), (x[:1],), StructuredSpec(3 / 16), "surgery")
    assert [row["units_after"] for row in uniform.groups if row["units_before"] == 8] == [6, 6]  # both groups lose units
    report = prune_structured(model, (x[:1],), StructuredSpec(3 / 16, allocation="global"), "surgery")
    assert [row["units_after"] for row in report.groups if row["units_before"] == 8] == [5, 8]
    torch.testing.assert_close(model(x).detach(), reference, rtol=1e-5, atol=1e-5)

    for scope in ([], ["--scope", "global"], ["--scope", "layer"]):  # the CLI's default for surgery is global
        out = tmp_path / f"cnn{len(scope)}{scope[-1] if scope else ''}.pt"
        result = cli("prune", "--method", "surgery", "--structured", "--sparsity", "0.5", *scope, model_files["cnn"], "-o", out,
                     "--json")
        assert result.exit_code == 0, result.stderr
        widths = {row["name"]: row["units_after"] / row["units_before"] for row in result.json["groups"] if "info" in row}
        assert abs(result.json["reached"]["channels"] - 0.5) < 0.01
        assert (len(set(widths.values())) > 1) == (scope != ["--scope", "layer"])  # global: not uniform


def _batchnorm_mlp(seed: int) -> nn.Sequential:
    """Linear -> BatchNorm -> Linear whose BatchNorm statistics are exactly those of white Gaussian inputs, with
    units 4..9 mixtures of units 0..3 plus noise (redundant, but never a copy of one unit)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 10), nn.BatchNorm1d(10), nn.Linear(10, 5)).eval()
    with torch.no_grad():
        base = model[0].weight[:4].clone()
        model[0].weight[4:] = torch.randn(6, 4) @ base + 0.3 * torch.randn(6, 12)
        model[1].running_mean.copy_(model[0].bias)
        model[1].running_var.copy_(model[0].weight.pow(2).sum(1) - model[1].eps)
        model[1].weight.uniform_(0.5, 2.0)
        model[1].bias.uniform_(-1.0, 1.0)
    return model


def test_least_squares_fold_beats_pairwise_fold_when_the_statistics_hold():
    """On inputs that match the BatchNorm statistics, regressing each removed unit on every survivor loses less
    than folding it into its one closest survivor, and both stay exact on an exact duplicate."""
    errors = {"surgery": [], "surgery-pairwise": []}
    for seed in range(5):
        dense = _batchnorm_mlp(seed)
        x = torch.randn(4096, 12)
        reference = dense(x).detach()
        for method in errors:
            model = copy.deepcopy(dense)
            report = prune_structured(model, (x[:1],), StructuredSpec(0.3), method)
            assert report.groups[0]["info"]["fold"] == ("least squares" if method == "surgery" else "pairwise")
            errors[method].append(float((model(x).detach() - reference).pow(2).mean()))
    assert all(ls < 0.9 * pair for ls, pair in zip(errors["surgery"], errors["surgery-pairwise"])), errors

    dense = _batchnorm_mlp(0)
    with torch.no_grad():
        dense[0].weight[9], dense[0].bias[9] = dense[0].weight[2], dense[0].bias[2]
        for name in ("running_mean", "running_var", "weight", "bias"):
            getattr(dense[1], name)[9] = getattr(dense[1], name)[2]
    x = torch.randn(512, 12)
    reference = dense(x).detach()
    report = prune_structured(dense, (x[:1],), StructuredSpec(0.1), "surgery")
    assert report.groups[0]["units_after"] == 9 and report.groups[0]["info"]["fold"] == "least squares"
    torch.testing.assert_close(dense(x).detach(), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["surgery", "magnitude"])
def test_calibration_given_to_a_data_free_method_only_measures_drift(cli, tmp_path, model_files, method):
    """--calib with a data-free method (structured or masks): the same model as without it, plus a held-out
    output-drift figure."""
    plain, measured = tmp_path / "plain.pt", tmp_path / "measured.pt"
    args = ("prune", "--method", method, "--sparsity", "0.5", model_files["cnn"])
    assert cli(*args, "-o", plain, "--quiet").exit_code == 0
    result = cli(*args, "--calib", "mnist5k", "--calib-samples", "100", "-o", measured, "--json")
    assert result.exit_code == 0, result.stderr
    a, b = (torch.load(p, weights_only=False).state_dict() for p in (plain, measured))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert result.json["request"]["calibration"]["used_for"] == "measuring output drift only"
    drift = result.json["drift"]
    assert drift["inputs"] == "64 calibration samples (not used by the data-free method: held out)"
    assert 0 < drift["relative_error"] < 1 and 0.9 <= drift["top1_agreement"] <= 1


def test_submodular_reports_drift_on_the_samples_it_saw(cli, tmp_path, model_files):
    result = cli("prune", "--method", "submodular", "--sparsity", "0.5", "--calib", "mnist5k", "--calib-samples", "100",
                 model_files["cnn"], "-o", tmp_path / "s.pt", "--json")
    assert result.exit_code == 0, result.stderr
    drift = result.json["drift"]
    assert drift["inputs"] == "64 calibration samples (seen while pruning)" and 0 < drift["relative_error"] < 1
    assert result.json["request"]["calibration"]["used_for"] == "choosing units"
