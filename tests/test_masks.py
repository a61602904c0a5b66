"""Mask properties: exact counts, N:M validity, whole empty blocks, global caps, determinism."""

import pytest
import torch
from torch import nn

from srcompress import assets
from srcompress.compress.layers import trace_layers
from srcompress.compress.masks import MaskSpec, apply_masks, compute_masks, plan_layers
from srcompress.compress.patterns import Pattern, detect_pattern
from srcompress.compress.scores import magnitude_score, random_score
from srcompress.errors import SrcompressError


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.depthwise = nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.fc1 = nn.Linear(64 * 8 * 8, 128)
        self.fc2 = nn.Linear(128, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = self.depthwise(torch.relu(self.conv2(torch.relu(self.conv1(x)))))
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1))))))


def prune(model, inputs, spec, score=magnitude_score):
    layers, _ = trace_layers(model, inputs)
    plans = plan_layers(layers, spec)
    masks = compute_masks(plans, spec, score)
    apply_masks(plans, masks)
    return plans, masks


@pytest.fixture
def net():
    torch.manual_seed(0)
    return Net().eval(), (torch.randn(1, 4, 8, 8),)


def test_trace_finds_layers_in_order_with_flops(net):
    model, inputs = net
    layers, _ = trace_layers(model, inputs)
    assert [layer.name for layer in layers] == ["conv1.weight", "conv2.weight", "depthwise.weight", "fc1.weight", "fc2.weight", "head.weight"]
    assert layers[0].flops == 2 * 32 * 8 * 8 * 4 * 9
    assert layers[2].groups == 64 and layers[2].flops == 2 * 64 * 8 * 8 * 9
    assert layers[3].flops == 2 * 4096 * 128


def test_trace_finds_bare_and_packed_weights():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(32, 16))  # used as x @ w: the reduction runs over dim 0
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)

        def forward(self, x):
            h = self.attn(x, x, x)[0]
            return h @ self.w

    model = Custom().eval()
    layers, _ = trace_layers(model, (torch.randn(2, 5, 32),))
    names = {layer.name: layer for layer in layers}
    assert {"attn.in_proj_weight", "attn.out_proj.weight", "w"} <= set(names)
    assert names["w"].reduction_dim == 0
    assert names["attn.in_proj_weight"].reduction_dim == 1


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9, 0.97])
def test_layer_scope_exact_counts(net, sparsity):
    model, inputs = net
    plans, _ = prune(model, inputs, MaskSpec(sparsity, scope="layer"))
    for plan in plans:
        zeros = int((plan.layer.param == 0).sum())
        expected = round(sparsity * plan.layer.numel) if plan.pruned else 0
        assert zeros == expected, plan.layer.name


def test_global_scope_exact_total_and_floor(net):
    model, inputs = net
    spec = MaskSpec(0.95, scope="global", min_density=0.2)
    plans, _ = prune(model, inputs, spec)
    pruned = [p for p in plans if p.pruned]
    total = sum(p.layer.numel for p in pruned)
    zeros = sum(int((p.layer.param == 0).sum()) for p in pruned)
    densities = [1 - int((p.layer.param == 0).sum()) / p.layer.numel for p in pruned]
    assert min(densities) >= 0.2 - 1e-9
    # the floor binds, so the total falls short of 95 % but every other unit was taken lowest-first
    assert zeros <= round(0.95 * total)
    spec = MaskSpec(0.6, scope="global", min_density=0.0)
    model2 = Net().eval()
    plans, _ = prune(model2, inputs, spec)
    pruned = [p for p in plans if p.pruned]
    assert sum(int((p.layer.param == 0).sum()) for p in pruned) == round(0.6 * sum(p.layer.numel for p in pruned))


def test_global_scope_prunes_lowest_magnitudes_first(net):
    model, inputs = net
    with torch.no_grad():
        model.fc2.weight.mul_(100.0)  # a layer of much larger weights keeps all of them
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    plans, _ = prune(model, inputs, MaskSpec(0.5, scope="global", min_density=0.0))
    pruned_values, kept_values = [], []
    for plan in (p for p in plans if p.pruned):
        before = original[plan.layer.name].abs()
        removed = plan.layer.param.detach() == 0
        pruned_values.append(before[removed])
        kept_values.append(before[~removed])
    assert float(torch.cat(pruned_values).max()) <= float(torch.cat(kept_values).min())
    assert float((model.fc2.weight == 0).float().mean()) < 0.05


def test_two_four_is_valid_along_input_channels(net):
    model, inputs = net
    plans, _ = prune(model, inputs, MaskSpec(0.5, Pattern.parse("2:4"), keep_first=False, keep_last=False))
    skipped = {p.layer.name: p.skipped for p in plans if not p.pruned}
    assert list(skipped) == ["depthwise.weight"] and "depthwise" in skipped["depthwise.weight"]
    for plan in (p for p in plans if p.pruned):
        weight = plan.layer.param.detach()
        groups = (weight.movedim(1, -1) if weight.dim() == 4 else weight).reshape(-1, 4)
        assert bool(((groups == 0).sum(dim=1) == 2).all()), plan.layer.name
        assert detect_pattern(plan.layer) == "2:4"


def test_block_masks_zero_whole_blocks(net):
    model, inputs = net
    spec = MaskSpec(0.8, Pattern.parse("block:16x32"), scope="layer")
    plans, _ = prune(model, inputs, spec)
    pruned = [p for p in plans if p.pruned]
    assert {p.layer.name for p in pruned} == {"conv2.weight", "fc1.weight", "fc2.weight"}
    for plan in pruned:
        matrix = plan.layer.to_matrix(plan.layer.param.detach())
        rows, cols = matrix.shape
        blocks = matrix.reshape(rows // 16, 16, cols // 32, 32).abs().sum(dim=(1, 3))
        empty = int((blocks == 0).sum())
        assert empty == round(0.8 * blocks.numel())
        assert int((matrix == 0).sum()) == empty * 16 * 32  # zeros only in whole blocks
        assert detect_pattern(plan.layer) == "block:16x32"
    skipped = {p.layer.name: p.skipped for p in plans if not p.pruned}
    assert "not divisible" in skipped["depthwise.weight"]


def test_element_mask_leaves_almost_no_empty_blocks(net):
    """The trap of kernels.md 3.5: an element-wise 90 % mask gives (almost) no empty 16x16 blocks."""
    model, inputs = net
    plans, _ = prune(model, inputs, MaskSpec(0.9, scope="layer"))
    fc1 = next(p for p in plans if p.layer.name == "fc1.weight").layer.param.detach()
    blocks = fc1.reshape(8, 16, 256, 16).abs().sum(dim=(1, 3))
    assert int((blocks == 0).sum()) == 0
    assert detect_pattern(next(p for p in plans if p.layer.name == "fc1.weight").layer) == "unstructured"


def test_random_is_deterministic_under_seed(net):
    model, inputs = net
    state = {k: v.clone() for k, v in model.state_dict().items()}
    masks = []
    for seed in (7, 7, 8):
        model.load_state_dict(state)
        _, m = prune(model, inputs, MaskSpec(0.7, seed=seed), score=random_score)
        masks.append(m)
    assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])
    assert not all(torch.equal(masks[0][k], masks[2][k]) for k in masks[0])


def test_ties_are_broken_by_position():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)).eval()
    with torch.no_grad():
        model[1].weight.fill_(0.5)
    layers, _ = trace_layers(model, (torch.randn(1, 8),))
    spec = MaskSpec(0.25, scope="layer")
    plans = plan_layers(layers, spec)
    first = compute_masks(plans, spec, magnitude_score)["1.weight"]
    second = compute_masks(plans, spec, magnitude_score)["1.weight"]
    assert torch.equal(first, second)
    assert not bool(first.flatten()[:16].any()) and bool(first.flatten()[16:].all())


def test_exclude_and_defaults_keep_layers_dense(net):
    model, inputs = net
    plans, _ = prune(model, inputs, MaskSpec(0.5, exclude=("fc2", "depth*")))
    reasons = {p.layer.name: p.skipped for p in plans}
    assert reasons["conv1.weight"].startswith("first conv")
    assert reasons["head.weight"].startswith("last layer")
    assert reasons["fc2.weight"] == "--exclude fc2" and reasons["depthwise.weight"] == "--exclude depth*"
    assert float((model.fc2.weight == 0).float().mean()) == 0.0


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(8, 16)
        self.classes, self.box = nn.Linear(16, 3), nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.body(x))
        return self.classes(h).softmax(-1), (torch.sigmoid(self.box(h)) * 2).view(-1, 2, 2)


def test_every_output_head_is_kept_dense_not_only_the_last():
    layers, _ = trace_layers(TwoHeads(), (torch.randn(2, 8),))
    assert [layer.is_output for layer in layers] == [False, True, True]
    kept = {p.layer.name: p.skipped for p in plan_layers(layers, MaskSpec(0.5)) if p.skipped}
    assert kept == {"classes.weight": "output layer (--prune-last)", "box.weight": "last layer (--prune-last)"}
    assert not any(p.skipped for p in plan_layers(layers, MaskSpec(0.5, keep_last=False)))


class CrossAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.memory = nn.Linear(16, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x, y):
        m = self.memory(y)
        return self.head(self.attn(x, m, m, need_weights=False)[0].mean(1))


def test_packed_attention_weights_used_in_chunks_are_layers_with_their_flops():
    """Cross-attention projects q and k/v with row blocks of in_proj_weight: the layer is found and counted in full."""
    layers, _ = trace_layers(CrossAttention().eval(), (torch.randn(1, 5, 16), torch.randn(1, 7, 16)))
    found = {layer.name: layer for layer in layers}
    packed = found["attn.in_proj_weight"]
    assert packed.reduction_dim == 1 and packed.matrix_shape() == (48, 16)
    assert packed.flops == 2 * 5 * 16 * 16 + 2 * 7 * 16 * 32  # q from 5 queries, k and v from 7 memory tokens


def test_pattern_parsing_errors():
    with pytest.raises(SrcompressError, match="unknown pattern"):
        Pattern.parse("diagonal")
    with pytest.raises(SrcompressError, match="0 < N < M"):
        Pattern.parse("4:4")
    with pytest.raises(SrcompressError, match="always gives sparsity 0.5"):
        MaskSpec(0.9, Pattern.parse("2:4")).validate()
    assert Pattern.parse("block:32") == Pattern("block", block=(32, 32))


def test_real_models_detect_their_patterns():
    model = assets.pretrained_mobilenet_v2()
    inputs = (torch.randn(1, 3, 224, 224),)
    plans, _ = prune(model, inputs, MaskSpec(0.9, Pattern.parse("block:32x32"), scope="global"))
    patterns = {detect_pattern(p.layer) for p in plans if p.pruned}
    assert patterns <= {"block:32x32", "block:64x32", "block:32x64", "block:64x64", "dense"}  # global may spare a layer
    assert "block:32x32" in patterns


class _Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 32)
        self.lstm = nn.LSTM(32, 64, batch_first=True)
        self.head = nn.Linear(64, 5)

    def forward(self, x):
        out, _ = self.lstm(self.emb(x))
        return self.head(out[:, -1])


def test_weights_mask_pruning_does_not_cover_are_named_in_the_report():
    from srcompress.pipeline import prune_model

    torch.manual_seed(0)
    model = _Recurrent().eval()
    report = prune_model(model, (torch.randint(0, 100, (1, 12)),), MaskSpec(0.5, keep_last=False))
    lstm = sum(p.numel() for n, p in model.lstm.named_parameters() if p.dim() == 2)
    note = next(n for n in report.notes if "mask pruning does not cover" in n)
    assert note.startswith(f"{lstm:,} weights") and note.endswith("lstm (LSTM)")
    assert all(torch.count_nonzero(p) == p.numel() for p in model.lstm.parameters())
