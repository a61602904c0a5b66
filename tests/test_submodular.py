"""Submodular selection: greedy vs brute force, re-weighting vs a direct solve, k = n, calibration data."""

import itertools
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from srcompress import assets
from srcompress.calib.capture import capture, input_rows
from srcompress.calib.data import CalibrationSet, load_calibration
from srcompress.compress.structured import StructuredSpec
from srcompress.compress.submodular import _Residual, greedy_keep, refit
from srcompress.errors import SrcompressError
from srcompress.pipeline import prune_structured


def objective(gram, target, cols):
    """F(S) computed directly: energy of the target explained by the columns S."""
    if not cols:
        return 0.0
    cols = np.array(cols)
    return float(np.sum(target[cols] * (np.linalg.pinv(gram[np.ix_(cols, cols)]) @ target[cols])))


def instance(rng, rows, n, outputs, orthogonal=False):
    if orthogonal:
        b, _ = np.linalg.qr(rng.normal(size=(rows, n)))
        b = b * rng.uniform(0.5, 2.0, size=n)
    else:
        b = rng.normal(size=(rows, n)) + 0.5 * rng.normal(size=(rows, 1))
    t = b @ rng.normal(size=(n, outputs)) + 0.1 * rng.normal(size=(rows, outputs))
    return b.T @ b, b.T @ t


@pytest.mark.parametrize("seed", range(5))
def test_greedy_is_optimal_when_columns_are_orthogonal(seed):
    """With orthogonal columns F is modular (gamma = 1): greedy must find the best subset exactly."""
    rng = np.random.default_rng(seed)
    gram, target = instance(rng, 40, 8, 3, orthogonal=True)
    columns = [np.array([i]) for i in range(8)]
    for keep in (1, 3, 5):
        chosen, reached, total = greedy_keep([(gram, target, columns, np.array([], dtype=int))], keep)
        best = max(objective(gram, target, list(s)) for s in itertools.combinations(range(8), keep))
        assert reached == pytest.approx(best, rel=1e-9)
        assert objective(gram, target, chosen) == pytest.approx(reached, rel=1e-9)
        assert total == pytest.approx(objective(gram, target, list(range(8))), rel=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_greedy_meets_its_guarantee_on_correlated_columns(seed):
    rng = np.random.default_rng(10 + seed)
    gram, target = instance(rng, 30, 9, 2)
    columns = [np.array([i]) for i in range(9)]
    for keep in (2, 4):
        _, reached, _ = greedy_keep([(gram, target, columns, np.array([], dtype=int))], keep)
        best = max(objective(gram, target, list(s)) for s in itertools.combinations(range(9), keep))
        assert reached >= (1 - np.exp(-1)) * best - 1e-9
        assert reached <= best + 1e-9


def test_greedy_keeps_the_strongest_units_once_the_calibration_rows_are_exhausted():
    """3 rows cannot tell 8 units apart after 3 picks: the rest go by what each explains alone, not by index."""
    rng = np.random.default_rng(3)
    b = rng.normal(size=(3, 8)) * np.array([0.1, 0.2, 3.0, 0.3, 2.0, 0.4, 1.0, 5.0])
    t = b @ rng.normal(size=(8, 2))
    gram, target = b.T @ b, b.T @ t
    columns = [np.array([i]) for i in range(8)]
    chosen, reached, total = greedy_keep([(gram, target, columns, np.array([], dtype=int))], 6)
    assert reached == pytest.approx(total, rel=1e-6)  # three units already explain everything the rows show
    solo = [objective(gram, target, [u]) for u in range(8)]
    rest = [u for u in range(8) if u not in chosen[:3]]
    assert chosen[3:] == sorted(rest, key=lambda u: -solo[u])[:3]


def test_block_gains_match_direct_objective():
    rng = np.random.default_rng(0)
    gram, target = instance(rng, 60, 12, 4)
    blocks = [np.arange(3 * i, 3 * i + 3) for i in range(4)]
    state = _Residual(gram, target)
    gains = state.gains(blocks)
    assert gains == pytest.approx([objective(gram, target, list(b)) for b in blocks], rel=1e-8)


def test_refit_equals_direct_least_squares():
    rng = np.random.default_rng(1)
    b = rng.normal(size=(200, 6))
    cols = np.array([0, 2, 5])
    t = b[:, cols] @ rng.normal(size=(3, 3)) + 0.01 * rng.normal(size=(200, 3))
    initial = rng.normal(size=(6, 3))
    folds = [b[i::2] for i in range(2)]
    targets = [t[i::2] for i in range(2)]
    weights, lam = refit([f.T @ f for f in folds], [f.T @ tt for f, tt in zip(folds, targets)], initial, cols)
    g = b[:, cols].T @ b[:, cols]
    direct = np.linalg.solve(g + lam * np.eye(3), b[:, cols].T @ t + lam * initial[cols])
    np.testing.assert_allclose(weights, direct, rtol=1e-8)
    plain = np.linalg.lstsq(b[:, cols], t, rcond=None)[0]
    np.testing.assert_allclose(weights, plain, rtol=1e-3, atol=1e-4)  # the kept columns explain t: the smallest ridge wins


def test_input_rows_unfold_conv_columns_as_channel_times_taps():
    conv = nn.Conv2d(2, 3, 3, padding=1)
    x = torch.randn(1, 2, 4, 4)
    rows = input_rows(conv, x)
    assert rows.shape == (16, 2 * 9 + 1) and torch.all(rows[:, -1] == 1)
    out = rows[:, :-1] @ conv.weight.detach().reshape(3, -1).T + conv.bias.detach()
    torch.testing.assert_close(out.T.reshape(1, 3, 4, 4), conv(x).detach(), rtol=1e-5, atol=1e-5)


def test_capture_streams_second_moments():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 2)).eval()
    x = torch.randn(40, 5)
    stats = capture(model, ["2.weight"], [(x[:16],), (x[16:],)])["2.weight"]
    hidden = torch.relu(model[0](x)).detach().double()
    full = torch.cat([hidden, torch.ones(40, 1, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(stats.gram, full.T @ full, rtol=1e-5, atol=1e-5)
    assert stats.rows == 40 and len(stats.grams) == 2


def test_keeping_everything_changes_nothing():
    model = assets.pretrained_digit_cnn()
    x, _ = assets.mnist5k("test")
    reference = model(x[:64]).detach()
    calib = load_calibration("mnist5k", 64)
    report = prune_structured(model, (x[:1],), StructuredSpec(0.0), "submodular", calibration=calib)
    assert not report.ok and "nothing changed" in report.problem
    torch.testing.assert_close(model(x[:64]).detach(), reference)


def test_mnist_cnn_few_samples_beats_l1_thanks_to_reweighting():
    x, y = assets.mnist5k("test")
    accuracy = {}
    calib = load_calibration("mnist5k", 50, seed=0)  # 5 per class on average
    for method in ("submodular", "submodular-norw", "l1"):
        model = assets.pretrained_digit_cnn()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = prune_structured(model, (x[:1],), StructuredSpec(0.75), method, calibration=calib)
        assert report.ok
        accuracy[method] = float((model(x).argmax(1) == y).float().mean())
    assert accuracy["submodular"] > max(accuracy["submodular-norw"], accuracy["l1"])
    assert accuracy["submodular"] >= 0.90


def test_few_samples_are_noted_in_the_report():
    calib = load_calibration("mnist5k", 20)
    model = assets.pretrained_digit_cnn()
    report = prune_structured(model, (assets.mnist5k("test")[0][:1],), StructuredSpec(0.5), "submodular", calibration=calib)
    assert any("20 calibration rows for" in note and "ill-posed" in note for note in report.notes)


def test_multihead_attention_heads_fall_back_to_l1_and_say_so(tmp_path):
    """nn.MultiheadAttention reads out_proj.weight inside its forward, so that consumer's inputs are never captured."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32))
    attention = nn.MultiheadAttention(32, 4, batch_first=True)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.attn, self.out = model[0], attention, nn.Linear(32, 3)

        def forward(self, x):
            h = self.inp(x)
            return self.out((h + self.attn(h, h, h, need_weights=False)[0]).mean(1))

    net = Net().eval()
    x = torch.randn(64, 5, 6)
    torch.save(x, tmp_path / "x.pt")
    calib = load_calibration(str(tmp_path / "x.pt"), 64, example_inputs=(x[:1],))
    report = prune_structured(net, (x[:1],), StructuredSpec(0.5, exclude=("inp",)), "submodular", calibration=calib)
    heads = next(g for g in report.groups if g["kind"] == "heads")
    assert report.ok and (heads["units_before"], heads["units_after"]) == (4, 2)
    assert any("attn.out_proj.weight is read by its parent module" in note and "pruned by L1" in note for note in report.notes)


def test_calibration_sources(tmp_path):
    x = torch.randn(30, 3, 8, 8)
    torch.save(x, tmp_path / "x.pt")
    np.savez(tmp_path / "x.npz", x=x.numpy())
    for path in ("x.pt", "x.npz"):
        calib = load_calibration(str(tmp_path / path), 20, batch_size=8, seed=1)
        assert len(calib) == 20 and [b[0].shape[0] for b in calib] == [8, 8, 4]
    again = load_calibration(str(tmp_path / "x.pt"), 20, batch_size=8, seed=1)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(calib, again))
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray((np.random.default_rng(i).random((40, 50, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    images = load_calibration(str(folder), 3, image_size=32)
    assert images.batches[0][0].shape == (3, 3, 32, 32)
    text = tmp_path / "s.txt"
    text.write_text("\n".join(assets.sentences("calib", 12)))
    st = assets.minilm()
    sentences = load_calibration(str(text), 12, model=st[0].auto_model)
    assert len(sentences) == 12 and all(b[0].shape == b[1].shape for b in sentences)
    assert all(bool(b[1].all()) for b in sentences)  # batched by length: no padding
    with pytest.raises(SrcompressError, match="not found"):
        load_calibration(str(tmp_path / "missing"), 4)
    with pytest.raises(SrcompressError, match="30 or fewer"):
        load_calibration(str(tmp_path / "x.pt"), 31)
    (tmp_path / "notes.pt").write_text("not tensors\n")
    with pytest.raises(SrcompressError, match="is not a torch.save or numpy file"):
        load_calibration(str(tmp_path / "notes.pt"), 4)
    (tmp_path / "cut.pt").write_bytes((tmp_path / "x.pt").read_bytes()[:2000])
    with pytest.raises(SrcompressError, match=r"cannot be read \(RuntimeError: "):
        load_calibration(str(tmp_path / "cut.pt"), 4)


def test_cli_submodular_needs_calibration(cli, tmp_path, model_files):
    out = tmp_path / "o.pt"
    result = cli("prune", "--method", "submodular", "--sparsity", "0.5", model_files["cnn"], "-o", out)
    assert result.exit_code == 2 and "--calib" in result.stderr and not out.exists()
    result = cli("prune", "--method", "submodular", "--sparsity", "0.5", "--calib", "mnist5k", "--calib-samples", "100",
                 model_files["cnn"], "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    assert result.json["request"]["calibration"]["samples"] == 100
    assert all(0 < row["info"]["objective"] <= 1 + 1e-9 for row in result.json["groups"])
    result = cli("prune", "--method", "submodular", "--sparsity", "0.5", "--calib", "photos", "--calib-samples", "4",
                 model_files["cnn"], "-o", out, "--force")  # RGB photos for a one-channel digit CNN
    assert result.exit_code == 2 and "calibration data 'photos'" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2


class _ReusesAnEarlyOutput(nn.Module):
    """The stem's output is used again after later Sequential blocks: skipping the stem would be wrong."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1))
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        early = self.stem(x)
        return self.head(torch.cat([early, self.body(self.mid(early))], 1))


def _prune_with_and_without_prefix_cache(monkeypatch, build, example, calibration, spec):
    """Prune the same model with the capture resuming from cached checkpoints and with every pass in full."""
    from srcompress.calib import capture as capture_module

    resumed, caches, models = [], [], {}
    real_enter, real_init = capture_module._Resumed.__enter__, capture_module.PrefixCache.__init__

    def counting_enter(self):
        resumed.append(1)
        return real_enter(self)

    def remembering_init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        caches.append(self)

    monkeypatch.setattr(capture_module._Resumed, "__enter__", counting_enter)
    monkeypatch.setattr(capture_module.PrefixCache, "__init__", remembering_init)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models["cached"] = build()
        prune_structured(models["cached"], example, spec, "submodular", calibration=calibration)
        with monkeypatch.context() as m:
            m.setattr(capture_module.PrefixCache, "plan", lambda self, *a: (None, None))
            models["full"] = build()
            prune_structured(models["full"], example, spec, "submodular", calibration=calibration)
    return models, len(resumed), caches[0]


def test_prefix_cache_resumes_mobilenet_captures_with_identical_results(monkeypatch):
    crops = assets.image_crops("calib", 16)
    calibration = CalibrationSet([(c,) for c in crops.split(4)], "16 calibration crops")
    spec = StructuredSpec(0.25, exclude=("features.[5-9].*", "features.1[0-9].*", "features.0.0", "features.1.*", "*.conv.2"))
    models, resumed, cache = _prune_with_and_without_prefix_cache(
        monkeypatch, lambda: assets.pretrained_mobilenet_v2().eval(), (crops[:1],), calibration, spec)
    assert resumed == 2 * 4 and cache.enabled  # blocks 3 and 4 resumed from the outputs of blocks 1 and 2, every batch
    full, cached = dict(models["full"].state_dict()), dict(models["cached"].state_dict())
    assert full.keys() == cached.keys() and all(full[k].shape == cached[k].shape for k in full)
    for name in full:
        torch.testing.assert_close(cached[name], full[name], rtol=1e-4, atol=1e-5)


def test_prefix_cache_turns_itself_off_when_the_model_reuses_a_skipped_output(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(32, 3, 8, 8)
    calibration = CalibrationSet([(c,) for c in x.split(8)], "random")
    state = _ReusesAnEarlyOutput().state_dict()

    def build():
        model = _ReusesAnEarlyOutput()
        model.load_state_dict(state)
        return model.eval()

    models, resumed, cache = _prune_with_and_without_prefix_cache(monkeypatch, build, (x[:1],), calibration, StructuredSpec(0.5))
    assert resumed >= 1 and not cache.enabled
    torch.testing.assert_close(models["cached"](x), models["full"](x))


def test_image_crops_from_one_half_never_see_the_other(monkeypatch):
    """In-distribution calibration: crops of the left halves and of the right halves share no pixels."""
    split = np.zeros((60, 80, 3), dtype=np.uint8)
    split[:, 40:] = 255
    monkeypatch.setattr(assets, "_photo", lambda name: split)
    left, right = assets.image_crops("test", 12, size=32, half="left"), assets.image_crops("test", 12, size=32, half="right")
    mean, std = torch.tensor(assets.IMAGENET_MEAN).view(3, 1, 1), torch.tensor(assets.IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(left * std + mean, torch.zeros_like(left), atol=1e-6, rtol=0)
    torch.testing.assert_close(right * std + mean, torch.ones_like(right), atol=1e-6, rtol=0)
    with pytest.raises(SrcompressError, match="half"):
        assets.image_crops("test", 2, half="top")


def test_calibrating_on_the_evaluation_digits_is_refused(cli, tmp_path):
    """Submodular re-fits the weights to its calibration inputs, so accuracy on those same digits is not held-out."""
    x, _ = assets.mnist5k("test")
    torch.save(x, tmp_path / "test_digits.pt")
    out = tmp_path / "out.pt2"
    result = cli("prune", "--example", "mnist", "--structured", "--method", "submodular", "--calib", tmp_path / "test_digits.pt",
                 "--calib-samples", "1000", "--sparsity", "0.5", "-o", out, "--json")
    assert result.exit_code == 2 and not out.exists()
    assert "every sample of the evaluation data (MNIST-5k held-out (1000 images)) is also in the calibration data" in result.json["error"]
    assert "--calib mnist5k, their training split" in result.json["error"]  # a value --calib accepts


def test_held_out_note_refuses_all_and_notes_some():
    from srcompress.data import held_out_note

    seen, other = torch.randn(6, 3), torch.randn(4, 3)
    assert held_out_note(seen, "fit", other, "eval") is None
    assert held_out_note(seen, "fit", torch.cat([seen[:2], other]), "eval", role="calibration").startswith(
        "2 of the 6 evaluation samples (eval) are also in the calibration data")
    with pytest.raises(SrcompressError, match=r"every sample of the evaluation data \(eval\) is also in the training data \(fit\)"):
        held_out_note(seen, "fit", seen[[3, 1]], "eval")
