"""`srcompress prune` and `inspect` end to end on the real pretrained models."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from srcompress import assets
from srcompress.compress.masks import MaskSpec
from srcompress.examples import get_example
from srcompress.pipeline import prune_model

from .conftest import sha256

CASES = [("unstructured", "0.9"), ("2:4", "0.5"), ("block:32x32", "0.9")]


def run_output(path: Path, name: str):
    model = torch.load(path, weights_only=False)
    if name == "cnn":
        x = assets.mnist5k("test")[0][:4]
    elif name == "mobilenet":
        x = torch.randn(2, 3, 224, 224)
    else:
        x = torch.randint(0, 30000, (2, 12))
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, torch.Tensor) else out[0]


@pytest.mark.parametrize("name", ["cnn", "mobilenet", "minilm"])
@pytest.mark.parametrize("pattern,sparsity", CASES)
def test_prune_real_models(cli, tmp_path, model_files, name, pattern, sparsity):
    source = model_files[name]
    digest = sha256(source)
    out = tmp_path / f"{name}.pt"
    result = cli("prune", "--sparsity", sparsity, "--pattern", pattern, source, "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    report = result.json
    assert report["ok"] and report["sparsity"]["pruned_layers"] > 0
    assert sha256(source) == digest
    output = run_output(out, name)
    assert torch.isfinite(output).all()

    inspected = cli("inspect", out, "--json").json
    asked = float(sparsity)
    layers = {row["name"]: row for row in inspected["layers"]}
    pruned = [row for row in report["layers"] if not row["skipped"]]
    if pattern.startswith("block"):
        # within one 32x32 block per pruned layer
        total = sum(row["params"] for row in pruned)
        zeros = sum(row["params"] - layers[row["name"]]["nonzeros"] for row in pruned)
        assert abs(zeros / total - asked) <= 1024 * len(pruned) / total
        assert {layers[row["name"]]["pattern"] for row in pruned} <= {"block:32x32", "block:64x32", "block:32x64", "block:64x64", "dense"}
    else:
        assert abs(inspected["totals"]["sparse_layers_sparsity"] - asked) <= 0.005
        if pattern == "2:4":
            assert {layers[row["name"]]["pattern"] for row in pruned} == {"2:4"}
    assert report["form"]["form"]


def test_mnist_half_sparsity_keeps_accuracy():
    example = get_example("mnist")
    model = example.load()
    report = prune_model(model, example.example_inputs(), MaskSpec(0.5), "magnitude", evaluate=example.make_evaluator(model))
    assert report.ok
    assert report.evaluation["after"] >= report.evaluation["before"] - 0.01
    assert abs(report.sparsity["reached"] - 0.5) < 1e-4


def test_seed_gives_identical_outputs(cli, tmp_path, model_files):
    outputs = []
    for index, seed in enumerate((3, 3, 4)):
        out = tmp_path / f"r{index}.pt"
        assert cli("prune", "--sparsity", "0.7", "--method", "random", "--seed", seed, model_files["cnn"], "-o", out, "--quiet").exit_code == 0
        outputs.append(torch.load(out, weights_only=False).state_dict())
    assert all(torch.equal(outputs[0][k], outputs[1][k]) for k in outputs[0])
    assert (tmp_path / "r0.pt").read_bytes() == (tmp_path / "r1.pt").read_bytes()  # byte for byte, not only equal weights
    assert not all(torch.equal(outputs[0][k], outputs[2][k]) for k in outputs[0])


def test_no_op_is_an_error(cli, tmp_path, model_files):
    out = tmp_path / "out.pt"
    result = cli("prune", "--sparsity", "0", model_files["cnn"], "-o", out)
    assert result.exit_code == 3 and "nothing changed" in result.stderr and not out.exists()
    result = cli("prune", "--sparsity", "0.5", model_files["cnn"], "--exclude", "*", "-o", out, "--json")
    assert result.exit_code == 3 and not result.json["ok"] and "no layer could be pruned" in result.stderr
    assert not out.exists()
    result = cli("prune", "--sparsity", "0.5", "--min-density", "1", model_files["cnn"], "-o", out)
    assert result.exit_code == 3 and "nothing changed: --min-density 1 keeps the pruned layers at 0.00% sparsity" in result.stderr
    result = cli("prune", "--sparsity", "0.5", "--pattern", "block:7x7", model_files["cnn"], "-o", out)
    assert result.exit_code == 3 and "not divisible by 7x7" in result.stderr and "pick a --pattern whose block divides" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("args, needle", [(["prune", "--sparsity", "abc"], "'--sparsity': 'abc' is not a valid float"),
                                          (["prune", "--bogus"], "No such option '--bogus'"),
                                          (["export", "--example", "mnist", "--int8-target-error"], "requires an argument")])
def test_a_usage_error_under_json_still_prints_json(cli, args, needle):
    result = cli(*args, "--example", "mnist", "--json") if args[0] == "prune" else cli(*args[:3], "--json", *args[3:])
    assert result.exit_code == 2 and result.json == {"ok": False, "error": result.json["error"]}
    assert needle in result.json["error"] and needle in result.stderr


@pytest.mark.parametrize("args, needle", [
    (["--method", "l1", "--saliency-threshold", "0.1"], "'l1' has no saliency to stop at"),
    (["--method", "surgery", "--saliency-threshold", "-1"], "--saliency-threshold -1 is negative"),
    (["--structured", "--sparsity", "0.5", "--prune-first"], "--prune-first and --prune-last apply to mask pruning"),
    (["--sparsity", "0.5", "--input-dtype", "int64"], "--input-dtype int64 needs --input-shape"),
    (["--sparsity", "0.5", "--exclude", "conv9"], "--exclude 'conv9' matches no prunable layer"),
    (["--structured", "--sparsity", "0.5", "--exclude", "fc_layers.0", "--exclude", "conv9"], "'conv9' matches no prunable"),
])
def test_an_option_that_would_be_ignored_is_refused(cli, tmp_path, model_files, args, needle):
    out = tmp_path / "out.pt"
    result = cli("prune", *args, model_files["cnn"], "-o", out, "--json")
    assert result.exit_code == 2 and needle in result.json["error"], result.output
    assert not out.exists()


def test_a_structured_target_outside_0_1_names_the_target(cli, tmp_path, model_files):
    out = tmp_path / "out.pt"
    result = cli("prune", "--structured", "--target", "flops:2", model_files["cnn"], "-o", out)
    assert result.exit_code == 2 and "--target flops:2: the fraction 2 is outside [0, 1)" in result.stderr
    assert "e.g. --target flops:0.5" in result.stderr and not out.exists()
    for density in ("-1", "2"):
        result = cli("prune", "--structured", "--sparsity", "0.5", "--min-density", density, model_files["cnn"], "-o", out)
        assert result.exit_code == 2 and f"min density {float(density)} is outside [0, 1]" in result.stderr and not out.exists()


def test_target_missed_is_an_error(cli, tmp_path, model_files):
    out = tmp_path / "out.pt"
    result = cli("prune", "--sparsity", "0.99", "--min-density", "0.5", model_files["cnn"], "-o", out)
    assert result.exit_code == 3 and "capped by --min-density" in result.stderr and not out.exists()


def test_already_pruned_model_is_reported(cli, tmp_path, model_files):
    first = tmp_path / "first.pt"
    assert cli("prune", "--sparsity", "0.9", model_files["cnn"], "-o", first, "--quiet").exit_code == 0
    out = tmp_path / "second.pt"
    result = cli("prune", "--sparsity", "0.5", first, "-o", out)
    assert result.exit_code == 3 and "already at 90.00%" in result.stderr and not out.exists()


def test_report_json_fields(cli, tmp_path, model_files):
    out = tmp_path / "out.pt"
    result = cli("prune", "--sparsity", "0.8", "--exclude", "conv_layers.3", model_files["cnn"], "-o", out, "--json")
    report = result.json
    assert report["provenance"]["input_sha256"] == sha256(model_files["cnn"])
    assert report["provenance"]["seed"] == 0 and report["provenance"]["torch"] == torch.__version__
    assert report["files"]["output_bytes"] == out.stat().st_size
    assert report["before"]["params"] == report["after"]["params"] == 390410
    assert report["after"]["effective_flops"] < report["before"]["effective_flops"]
    skipped = {row["name"]: row["skipped"] for row in report["layers"]}
    assert skipped["conv_layers.3.weight"] == "--exclude conv_layers.3"
    assert "no speedup" in report["form"]["speed"]


def test_example_entry_point_prints_accuracy(tmp_path):
    """The README's main job, through the installed console script."""
    exe = Path(sys.executable).with_name("srcompress")
    done = subprocess.run([str(exe), "prune", "--sparsity", "0.9", "--example", "mnist", "--json"],
                          capture_output=True, text=True, cwd=tmp_path, env={**os.environ})
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["evaluation"]["before"] > 0.99
    assert report["evaluation"]["after"] > 0.95
    assert (tmp_path / "mnist.pruned.pt2").exists()
    loaded = torch.export.load(str(tmp_path / "mnist.pruned.pt2")).module()
    x, y = assets.mnist5k("test")
    accuracy = float((loaded(x).argmax(1) == y).float().mean())
    assert abs(accuracy - report["evaluation"]["after"]) < 1e-6


class TwoInputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.image, self.extra, self.out = torch.nn.Linear(20, 32), torch.nn.Linear(6, 32), torch.nn.Linear(32, 3)

    def forward(self, x, y):
        return self.out(torch.relu(self.image(x) + self.extra(y)))


def test_a_model_with_two_inputs_takes_one_shape_each(cli, tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "two.pt"
    torch.save(TwoInputs(), path)
    path.chmod(0o644)
    out = tmp_path / "out.pt"
    one = cli("prune", "--sparsity", "0.5", path, "--input-shape", "1,20", "-o", out, "--json")
    assert one.exit_code == 2 and "missing 1 required positional argument" in one.stderr and "--input-shape '1,20;1,8'" in one.stderr
    both = cli("prune", "--sparsity", "0.5", path, "--input-shape", "1,20;1,6", "-o", out, "--json")
    assert both.exit_code == 0, both.stderr
    assert both.json["example_input"]["shapes"] == [[1, 20], [1, 6]]
    assert {layer["name"] for layer in both.json["layers"]} == {"image.weight", "extra.weight", "out.weight"}
    mismatch = cli("prune", "--sparsity", "0.5", path, "--input-shape", "1,20;1,6", "--input-dtype", "float32;int64;int64",
                   "-o", tmp_path / "x.pt")
    assert mismatch.exit_code == 2 and "gives 3 dtypes for 2 input shapes" in mismatch.stderr


def test_tied_embedding_notes_say_what_happened():
    from .test_io import TiedHead  # an embedding table that is also the output layer's weight

    ids = (torch.randint(0, 50, (1, 9)),)
    kept = prune_model(TiedHead(), ids, MaskSpec(0.5), "magnitude")
    assert "1 embedding table(s) kept dense: emb.weight" in kept.notes
    assert not any("does not cover" in note for note in kept.notes)  # out.weight is the same tensor
    model = TiedHead()
    pruned = prune_model(model, ids, MaskSpec(0.5, keep_last=False), "magnitude")
    assert any(note.startswith("embedding table emb.weight is also a layer's weight (tied)") for note in pruned.notes)
    assert not any("kept dense: emb.weight" in note for note in pruned.notes) and float((model.emb.weight == 0).float().mean()) > 0
