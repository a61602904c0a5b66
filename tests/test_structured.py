"""Structured engine zoo: real and synthetic models pruned physically, checked five ways each.

(a) output shape unchanged, (b) smaller by the expected parameter count, (c) ONNX export matches in
ONNX Runtime, (d) keep-all is bit-identical, (e) removing units whose consumer weights are zero
leaves the outputs unchanged.
"""

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from srcompress import assets
from srcompress.compress.graph import build_graph, count_params_after, register_module, MODULE_RULES
from srcompress.compress.structured import StructuredSpec, l1_scores, lowest, remove_units, soft_remove
from srcompress.errors import SrcompressError
from srcompress.io import flatten_outputs
from srcompress.pipeline import prune_structured


class ConcatNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.left = nn.Conv2d(16, 12, 3, padding=1)
        self.right = nn.Sequential(nn.Conv2d(16, 20, 1), nn.BatchNorm2d(20))
        self.merge = nn.Conv2d(32, 24, 3, padding=1)
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = torch.cat([F.relu(self.left(x)), F.relu(self.right(x))], dim=1)
        return self.head(F.relu(self.merge(x)).mean(dim=(2, 3)))


class GroupedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.expand = nn.Conv2d(3, 32, 1)
        self.bn = nn.BatchNorm2d(32)
        self.grouped = nn.Conv2d(32, 64, 3, padding=1, groups=4)
        self.depthwise = nn.Conv2d(64, 64, 3, padding=1, groups=64)
        self.project = nn.Conv2d(64, 8, 1)

    def forward(self, x):
        x = F.relu(self.bn(self.expand(x)))
        return self.project(F.relu(self.depthwise(F.relu(self.grouped(x)))))


class TiedNet(nn.Module):
    """A square layer applied twice (shared weight) and a bare parameter used as a matmul weight."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(10, 48)
        self.shared = nn.Linear(48, 48)
        self.bare = nn.Parameter(torch.randn(48, 32) / 7)
        self.out = nn.Linear(32, 3)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        h = torch.relu(self.shared(h))
        h = torch.relu(self.shared(h))
        return self.out(torch.relu(h @ self.bare))


class FlattenNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3)
        self.fc = nn.Linear(8 * 4 * 4, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.conv(x)), 2)
        return self.out(torch.relu(self.fc(x.flatten(1))))


class AttentionNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(12, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.out = nn.Linear(32, 2)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.out(h + self.ffn(h))


def _mnist():
    return assets.pretrained_digit_cnn(), (assets.mnist5k("test")[0][:3],)


def _mobilenet():
    return assets.pretrained_mobilenet_v2(), (torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)),)


def _minilm():
    return assets.minilm()[0].auto_model.eval(), (torch.randint(0, 30000, (2, 12), generator=torch.Generator().manual_seed(0)),)


def _seeded(cls, *inputs):
    def build():
        torch.manual_seed(0)
        model = cls().eval()
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):  # non-trivial statistics so BN slicing matters
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
        gen = torch.Generator().manual_seed(1)
        return model, tuple(torch.randn(*shape, generator=gen) for shape in inputs)

    return build


ZOO = {
    "mnist_cnn": _mnist,
    "mobilenet_v2": _mobilenet,
    "minilm": _minilm,
    "concat": _seeded(ConcatNet, (2, 3, 8, 8)),
    "grouped": _seeded(GroupedNet, (2, 3, 6, 6)),
    "tied": _seeded(TiedNet, (4, 10)),
    "flatten": _seeded(FlattenNet, (2, 1, 10, 10)),
    "attention": _seeded(AttentionNet, (2, 7, 12)),
}


def outputs(model, inputs):
    with torch.no_grad():
        return flatten_outputs(model(*inputs))


def half_l1(graph):
    return {g.index: lowest(l1_scores(graph, g), g.size // 2) for g in graph.groups if g.size > 1}


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo(name, tmp_path):
    model, inputs = ZOO[name]()
    reference = outputs(model, inputs)
    graph = build_graph(model, inputs)
    assert graph.groups, "nothing prunable found"

    # (d) keep-all indices: bit-identical
    keep_all = copy.deepcopy(model)
    remove_units(build_graph(keep_all, inputs), {})
    assert all(torch.equal(a, b) for a, b in zip(reference, outputs(keep_all, inputs)))

    # (e) zero the consumer inputs of half the units, then remove exactly those units
    decisions = half_l1(graph)
    for group in graph.groups:
        if group.index in decisions:
            soft_remove(graph, group, decisions[group.index])
    zeroed = outputs(model, inputs)
    roots = {graph.groups[g].units[u] for g, units in decisions.items() for u in units}
    expected_shapes = count_params_after(graph, roots)
    expected_params = sum(int(np.prod(expected_shapes.get(n, tuple(p.shape)))) for n, p in model.named_parameters())
    params_before = sum(p.numel() for p in model.parameters())
    remove_units(graph, decisions)
    pruned = outputs(model, inputs)

    # (a) shapes and (e) values
    assert [o.shape for o in pruned] == [r.shape for r in reference]
    for a, b in zip(pruned, zeroed):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), float((a - b).abs().max())
    # (b) smaller by the expected count, and module attributes agree with the new tensors
    params_after = sum(p.numel() for p in model.parameters())
    assert params_after == expected_params < params_before
    for module in model.modules():
        if isinstance(module, nn.Linear):
            assert (module.out_features, module.in_features) == tuple(module.weight.shape)
        if isinstance(module, nn.Conv2d):
            assert module.weight.shape[0] == module.out_channels
            assert module.weight.shape[1] * module.groups == module.in_channels
        if isinstance(module, nn.BatchNorm2d):
            assert module.num_features == module.running_mean.shape[0] == module.weight.shape[0]

    # (c) ONNX export of the pruned model matches PyTorch in ONNX Runtime
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(model, inputs, str(path), dynamo=True, external_data=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    onnx_out = session.run(None, feeds)
    for a, b in zip(pruned, onnx_out):
        np.testing.assert_allclose(a.numpy(), b, rtol=1e-3, atol=1e-4)

    # it reloads as a plain module
    torch.save(model, tmp_path / "m.pt")
    reloaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert all(torch.equal(a, b) for a, b in zip(pruned, outputs(reloaded, inputs)))


def test_group_structure_of_synthetic_models():
    model, inputs = ZOO["concat"]()
    groups = {g.name: g for g in build_graph(model, inputs).groups}
    assert groups["left"].size == 12 and groups["right.0"].size == 20  # each branch of the concat is its own group
    assert ("merge.weight", 1) in groups["left"].consumers and ("merge.weight", 1) in groups["right.0"].consumers

    model, inputs = ZOO["grouped"]()
    graph = build_graph(model, inputs)
    (group,) = graph.groups  # 32 channels feed a 4-group conv, whose 64 outputs feed a depthwise conv
    assert (group.kind, group.size, group.unit_width) == ("groups", 4, 8)  # so whole groups go, through all three
    assert {p for p, _ in group.producers} == {"expand.weight", "grouped.weight", "depthwise.weight"}

    model, inputs = ZOO["tied"]()
    graph = build_graph(model, inputs)
    shared = [g for g in graph.groups if ("shared.weight", 0) in g.producers]
    assert len(shared) == 1 and ("shared.weight", 1) in shared[0].consumers  # square layer stays square
    assert any(("bare", 1) in g.producers for g in graph.groups)

    model, inputs = ZOO["flatten"]()
    conv = next(g for g in build_graph(model, inputs).groups if g.name == "conv")
    fc_slot = next(s for s in conv.slots[0] if s.tensor == "fc.weight")
    assert list(fc_slot.positions) == list(range(16))  # channel 0 -> 4x4 columns of fc

    model, inputs = ZOO["attention"]()
    heads = next(g for g in build_graph(model, inputs).groups if g.kind == "heads")
    assert heads.size == 4


def test_minilm_heads_and_ffn_are_units():
    model, inputs = _minilm()
    graph = build_graph(model, inputs)
    kinds = sorted((g.kind, g.size) for g in graph.groups)
    assert kinds == [("heads", 12)] * 6 + [("neurons", 1536)] * 6
    assert "embeddings.word_embeddings.weight" in graph.unplaced


def test_mobilenet_residual_groups_share_one_channel_set():
    model, inputs = _mobilenet()
    graph = build_graph(model, inputs)
    stream = next(g for g in graph.groups if ("features.4.conv.2.weight", 0) in g.producers)
    assert {p for p, _ in stream.producers} >= {"features.4.conv.2.weight", "features.5.conv.2.weight", "features.6.conv.2.weight"}
    assert len(graph.groups) == 25


def test_prune_structured_targets_and_rounding():
    model, inputs = _mobilenet()
    report = prune_structured(model, inputs, StructuredSpec(0.5, target="flops", round_to=8), "l1")
    assert report.ok and report.reached["flops"] >= 0.5
    widths = [row["units_after"] for row in report.groups if not row["skipped"] and row["units_after"] != row["units_before"]]
    assert widths and all(w % 8 == 0 for w in widths)


def test_uniform_widths_keep_hf_config_expressible():
    model, inputs = _minilm()
    spec = StructuredSpec(0.5, allocation="global", exclude=("*attention*",), uniform_widths=True)
    report = prune_structured(model, inputs, spec, "l1")
    assert report.ok
    widths = {m.out_features for n, m in model.named_modules() if n.endswith("intermediate.dense")}
    assert widths == {768}
    assert report.hf_config["config_expressible"] and model.config.intermediate_size == 768


def test_custom_op_is_listed_then_registered():
    @torch.library.custom_op("srcompress_test::gate", mutates_args=())
    def gate(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(scale)[None, :, None, None]

    @gate.register_fake
    def _(x, scale):
        return torch.empty_like(x)

    class Gate(nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.scale = nn.Parameter(torch.randn(channels))

        def forward(self, x):
            return gate(x, self.scale)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 16, 3)
            self.gate = Gate(16)
            self.conv2 = nn.Conv2d(16, 4, 3)

        def forward(self, x):
            return self.conv2(self.gate(torch.relu(self.conv1(x))))

    torch.manual_seed(0)
    model, inputs = Net().eval(), (torch.randn(1, 3, 9, 9),)
    graph = build_graph(model, inputs)
    assert not graph.groups
    assert "srcompress_test.gate" in graph.unplaced["conv1.weight"] and "does not understand" in graph.unplaced["conv1.weight"]

    def couple(c):
        channels = c.module.scale.shape[0]
        x = c.input_dim(0, 1, channels)
        c.same(x, c.param("scale", 0))
        c.role("scale", 0, "norm")
        for node in c.outputs():
            c.set_output(node, 1, x)

    register_module(Gate, couple)
    try:
        report = prune_structured(model, inputs, StructuredSpec(0.5), "l1")
        assert report.ok and model.gate.scale.shape == (8,) and model.conv1.out_channels == 8
    finally:
        MODULE_RULES.pop(Gate)


def test_untraceable_model_gets_a_clear_error():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x):
            h = self.a(x)
            if h.sum() > 0:
                h = h * 2
            return self.b(h)

    with pytest.raises(SrcompressError, match="could not trace the model with torch.export"):
        build_graph(DataDependent().eval(), (torch.randn(1, 4),))


def test_hard_coded_reshape_is_caught_not_silently_wrong():
    class HardCoded(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 8, 3)
            self.fc = nn.Linear(8 * 4 * 4, 2)

        def forward(self, x):
            return self.fc(self.conv(x).reshape(x.shape[0], 128))

    model = HardCoded().eval()
    with pytest.raises(SrcompressError, match="no longer runs"):
        prune_structured(model, (torch.randn(1, 1, 6, 6),), StructuredSpec(0.5), "l1")


class HandAttention(nn.Module):
    """Self-attention written out by hand; ``fixed_heads`` splits with the head count, else with the head width."""

    def __init__(self, fixed_heads: bool):
        super().__init__()
        self.fixed_heads, self.heads, self.width = fixed_heads, 4, 8
        self.inp = nn.Linear(6, 32)
        self.q, self.k, self.v, self.o = (nn.Linear(32, 32) for _ in range(4))
        self.head = nn.Linear(32, 3)

    def split(self, t):
        b, n, _ = t.shape
        return (t.view(b, n, self.heads, -1) if self.fixed_heads else t.view(b, n, -1, self.width)).transpose(1, 2)

    def forward(self, x):
        h = self.inp(x)
        q, k, v = self.split(self.q(h)), self.split(self.k(h)), self.split(self.v(h))
        y = ((q @ k.transpose(-1, -2)) / self.width ** 0.5).softmax(-1) @ v
        return self.head((h + self.o(y.transpose(1, 2).flatten(2))).mean(1))


def test_head_count_fixed_in_code_is_refused_not_silently_wrong():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6)
    spec = StructuredSpec(0.5, exclude=("inp",))
    model = HandAttention(fixed_heads=False).eval()
    reference = copy.deepcopy(model)
    report = prune_structured(model, (x,), spec, "l1")
    heads = next(g for g in report.groups if g["name"] == "q")  # q, k, v and o's columns, one unit per head
    assert (heads["units_before"], heads["units_after"], heads["unit_width"]) == (4, 2, 8) and model.q.out_features == 16
    kept = [int((reference.q.weight - row).abs().sum(1).argmin()) for row in model.q.weight]
    with torch.no_grad():  # removing two heads equals zeroing their columns of the output projection
        reference.o.weight[:, [c for c in range(32) if c not in kept]] = 0
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-6)
    with pytest.raises(SrcompressError, match=r"splits the kept channels into \(2, 5, 4, 4\) instead of \(2, 5, 2, 8\)") as info:
        prune_structured(HandAttention(fixed_heads=True).eval(), (x,), spec, "l1")
    assert "--exclude 'q'" in info.value.fix


class KdimAttention(nn.Module):
    """Cross-attention whose keys and values are narrower than the queries (kdim, vdim): separate projections."""

    def __init__(self):
        super().__init__()
        self.q, self.kv = nn.Linear(6, 32), nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(32, 4, kdim=16, vdim=16, batch_first=True)
        self.ff, self.head = nn.Linear(32, 32), nn.Linear(32, 3)

    def forward(self, x):
        kv = self.kv(x.flip(1))
        return self.head(torch.relu(self.ff(self.attn(self.q(x), kv, kv, need_weights=False)[0])).mean(1))


def test_attention_with_its_own_key_width_keeps_its_inputs_and_prunes_the_rest():
    torch.manual_seed(0)
    model = KdimAttention().eval()
    report = prune_structured(model, (torch.randn(2, 5, 6),), StructuredSpec(0.5), "l1")
    assert report.ok and model.ff.out_features == 16
    assert model.q.out_features == 32 and model.kv.out_features == 16  # the attention's query and key/value widths
    assert "separate q/k/v sizes" in report.unplaced["kv.weight"]


def test_program_with_baked_group_count_says_to_prune_the_module():
    model, inputs = ZOO["grouped"]()
    program = torch.export.export(model, inputs).module()
    with pytest.raises(SrcompressError, match="a .pt2 program keeps widths as constants") as info:
        prune_structured(program, inputs, StructuredSpec(0.25), "l1")
    assert "prune the model's nn.Module instead" in info.value.fix
    prune_structured(model, inputs, StructuredSpec(0.25), "l1")  # the module itself prunes


def test_structured_cli(cli, tmp_path, model_files):
    out = tmp_path / "cnn.pt2"
    result = cli("prune", "--structured", "--sparsity", "0.5", model_files["cnn"], "--format", "pt2", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    report = result.json
    assert report["reached"]["channels"] == 0.5
    assert report["after"]["params"] < 0.3 * report["before"]["params"]
    rows = {row["name"]: row for row in report["groups"]}
    assert rows["conv_layers.0"]["units_after"] == 16 and rows["fc_layers.0"]["units_after"] == 128
    reloaded = torch.export.load(str(out)).module()
    assert reloaded(torch.randn(5, 1, 28, 28)).shape == (5, 10)
    bad = cli("prune", "--structured", "--sparsity", "0.5", "--pattern", "2:4", model_files["cnn"], "-o", tmp_path / "x.pt")
    assert bad.exit_code == 2 and "--pattern does not apply" in bad.stderr
    noop = cli("prune", "--structured", "--sparsity", "0.5", "--exclude", "*", model_files["cnn"], "-o", tmp_path / "y.pt")
    assert noop.exit_code == 3 and not (tmp_path / "y.pt").exists()
