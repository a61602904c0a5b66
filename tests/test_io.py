"""Model I/O: every bad input gives a one-line error, a non-zero exit, no output, and an untouched input."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.nn.utils import prune as torch_prune

from srcompress.errors import SrcompressError
from srcompress.io import atomic_path, load_model, output_format
from srcompress.models import DigitCNN

from .conftest import sha256


def assert_clean_failure(result, out_path, needle, code=2, inputs=()):
    assert result.exit_code == code, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert needle in lines[0], lines[0]
    assert not out_path.exists()
    assert not [p for p in out_path.parent.iterdir() if ".tmp-" in p.name], "temporary file left behind"
    for path, digest in inputs:
        assert sha256(path) == digest, f"{path} was modified"


@pytest.fixture
def cnn_file(tmp_path, model_files):
    path = tmp_path / "cnn.pt"
    path.write_bytes(model_files["cnn"].read_bytes())
    path.chmod(0o644)
    return path


def test_missing_file(cli, tmp_path):
    out = tmp_path / "out.pt"
    result = cli("prune", "--sparsity", "0.5", tmp_path / "nope.pt", "-o", out)
    assert_clean_failure(result, out, "not found")


def test_not_a_model(cli, tmp_path):
    path = tmp_path / "numbers.pt"
    torch.save([1, 2, 3], path)
    out = tmp_path / "out.pt"
    result = cli("prune", "--sparsity", "0.5", path, "-o", out)
    assert_clean_failure(result, out, "not a model", inputs=[(path, sha256(path))])


def test_text_file_is_reported_as_not_a_model_file(cli, tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("this is not a model\n")
    out = tmp_path / "out.pt"
    assert_clean_failure(cli("prune", "--sparsity", "0.5", path, "-o", out), out, "is not a model file (no torch.save",
                         inputs=[(path, sha256(path))])


def test_legacy_pickle_format_still_loads(cli, tmp_path, model_files):
    """The pre-zip torch.save format starts with a pickle marker, not an archive header, and is still read."""
    path = tmp_path / "legacy.pt"
    torch.save(torch.load(model_files["cnn"], weights_only=False), path, _use_new_zipfile_serialization=False)
    result = cli("prune", "--sparsity", "0.5", path, "-o", tmp_path / "out.pt", "--trust-pickle", "--quiet")
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
def test_truncated_file(cli, tmp_path, model_files, suffix):
    source = model_files["cnn"]
    if suffix == ".pt2":
        full = tmp_path / "full.pt2"
        assert cli("prune", "--sparsity", "0.5", source, "--format", "pt2", "-o", full, "--quiet").exit_code == 0
        source = full
    data = source.read_bytes()
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(data[: len(data) // 2])
    out = tmp_path / f"out{suffix}"
    assert_clean_failure(cli("prune", "--sparsity", "0.5", path, "-o", out), out, "corrupt or truncated", inputs=[(path, sha256(path))])


@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
def test_a_flipped_byte_in_the_weights_is_caught(cli, tmp_path, model_files, suffix):
    """A zip keeps its structure when a weight byte flips; torch would load the damaged weights without a word."""
    source = model_files["cnn"]
    if suffix == ".pt2":
        source = tmp_path / "full.pt2"
        assert cli("prune", "--sparsity", "0.5", model_files["cnn"], "-o", source, "--quiet").exit_code == 0
    data = bytearray(source.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the largest record, the fc weights
    path = tmp_path / f"flipped{suffix}"
    path.write_bytes(bytes(data))
    out = tmp_path / f"out{suffix}"
    assert_clean_failure(cli("prune", "--sparsity", "0.5", path, "-o", out), out, "fails its checksum", inputs=[(path, sha256(path))])


def test_a_class_that_cannot_be_imported_gets_a_hint_that_fits(cli, tmp_path):
    (tmp_path / "netdef.py").write_text("import torch\nclass Net(torch.nn.Sequential):\n    pass\n")
    save = "import torch, netdef\ntorch.save(netdef.Net(torch.nn.Linear(8, 4)), 'net.pt')\n"
    script = "import torch\nclass Net(torch.nn.Sequential):\n    pass\ntorch.save(Net(torch.nn.Linear(8, 4)), 'main.pt')\n"
    for code in (save, script):
        subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    out = tmp_path / "out.pt"
    result = cli("prune", "--sparsity", "0.5", tmp_path / "net.pt", "-o", out)  # netdef lies beside the model only
    assert result.exit_code == 2 and f"run with PYTHONPATH={tmp_path} if you trust its code" in result.stderr, result.stderr
    result = cli("prune", "--sparsity", "0.5", tmp_path / "main.pt", "-o", out)
    assert result.exit_code == 2 and "defined in a script (__main__)" in result.stderr, result.stderr
    assert not out.exists()


def test_state_dict_needs_arch(cli, tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(DigitCNN().state_dict(), path)
    out = tmp_path / "out.pt"
    assert_clean_failure(cli("prune", "--sparsity", "0.5", path, "-o", out), out, "--arch", inputs=[(path, sha256(path))])


def test_state_dict_with_wrong_arch(cli, tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(DigitCNN().state_dict(), path)
    out = tmp_path / "out.pt"
    result = cli("prune", "--sparsity", "0.5", path, "--arch", "srcompress.models:LeNet5", "-o", out)
    assert_clean_failure(result, out, "does not fit --arch", inputs=[(path, sha256(path))])


def test_state_dict_with_arch_round_trip(cli, tmp_path):
    from srcompress import assets

    path = tmp_path / "weights.pt"
    torch.save(assets.pretrained_digit_cnn().state_dict(), path)
    digest = sha256(path)
    out = tmp_path / "out.pt"
    result = cli("prune", "--sparsity", "0.5", path, "--arch", "srcompress.models:DigitCNN", "-o", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert sha256(path) == digest
    state = torch.load(out, weights_only=True)
    assert set(state) == set(DigitCNN().state_dict())
    model = DigitCNN()
    model.load_state_dict(state)
    assert (model.fc_layers[0].weight == 0).float().mean() > 0.3


def test_model_that_cannot_run_on_the_input(cli, cnn_file, tmp_path):
    out = tmp_path / "out.pt"
    result = cli("prune", "--sparsity", "0.5", cnn_file, "--input-shape", "1,3,32,32", "-o", out)
    assert_clean_failure(result, out, "cannot run on an example input", inputs=[(cnn_file, sha256(cnn_file))])


def test_bad_input_shape_text(cli, cnn_file, tmp_path):
    out = tmp_path / "out.pt"
    assert_clean_failure(cli("prune", "--sparsity", "0.5", cnn_file, "--input-shape", "a,b", "-o", out), out, "--input-shape")


@pytest.mark.parametrize("value", ["1.0", "-0.1", "1.5"])
def test_sparsity_outside_range(cli, cnn_file, tmp_path, value):
    out = tmp_path / "out.pt"
    assert_clean_failure(cli("prune", "--sparsity", value, cnn_file, "-o", out), out, "outside [0, 1)")


def test_existing_output_needs_force(cli, cnn_file, tmp_path):
    out = tmp_path / "out.pt"
    out.write_bytes(b"keep me")
    result = cli("prune", "--sparsity", "0.5", cnn_file, "-o", out)
    assert result.exit_code == 2 and "--force" in result.stderr
    assert out.read_bytes() == b"keep me"
    assert cli("prune", "--sparsity", "0.5", cnn_file, "-o", out, "--force", "--quiet").exit_code == 0
    assert isinstance(torch.load(out, weights_only=False), torch.nn.Module)


def test_output_may_not_be_the_input(cli, cnn_file):
    digest = sha256(cnn_file)
    result = cli("prune", "--sparsity", "0.5", cnn_file, "-o", cnn_file, "--force")
    assert result.exit_code == 2 and "is the input" in result.stderr
    assert sha256(cnn_file) == digest


def test_missing_output_folder(cli, cnn_file, tmp_path):
    out = tmp_path / "no" / "such" / "out.pt"
    result = cli("prune", "--sparsity", "0.5", cnn_file, "-o", out)
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_pickle_from_untrusted_location_needs_opt_in(cli, cnn_file, tmp_path):
    cnn_file.chmod(0o666)  # writable by anyone: its content cannot be trusted
    out = tmp_path / "out.pt"
    result = cli("prune", "--sparsity", "0.5", cnn_file, "-o", out)
    assert_clean_failure(result, out, "--trust-pickle", inputs=[(cnn_file, sha256(cnn_file))])
    result = cli("prune", "--sparsity", "0.5", cnn_file, "-o", out, "--trust-pickle", "--json")
    assert result.exit_code == 0
    assert any("ran code from the file" in note for note in result.json["notes"])


def test_torch_prune_masks_are_baked_before_saving(cli, tmp_path):
    from srcompress import assets

    model = assets.pretrained_digit_cnn()
    torch_prune.l1_unstructured(model.fc_layers[0], "weight", amount=0.3)
    path = tmp_path / "masked.pt"
    torch.save(model, path)
    path.chmod(0o644)
    for fmt in ("pt", "state_dict", "pt2"):
        out = tmp_path / f"out-{fmt}.pt{'2' if fmt == 'pt2' else ''}"
        result = cli("prune", "--sparsity", "0.6", path, "--format", fmt, "-o", out, "--json")
        assert result.exit_code == 0, result.output
        assert any("baked a torch.nn.utils.prune mask" in n for n in result.json["notes"])
        if fmt == "pt2":
            keys = set(torch.export.load(str(out)).state_dict)
        elif fmt == "pt":
            reloaded = torch.load(out, weights_only=False)
            assert not any(m._forward_pre_hooks for m in reloaded.modules())
            keys = set(reloaded.state_dict())
        else:
            keys = set(torch.load(out, weights_only=True))
        assert not any(k.endswith(("_orig", "_mask")) for k in keys), keys
        assert "fc_layers.0.weight" in keys


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "model.pt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("disk full")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_pt2_output_reloads_without_srcompress_or_pickle(cli, model_files, tmp_path):
    out = tmp_path / "cnn.pt2"
    assert cli("prune", "--sparsity", "0.9", model_files["cnn"], "--format", "pt2", "-o", out, "--quiet").exit_code == 0
    script = textwrap.dedent(f"""
        import pickle, sys
        sys.modules["srcompress"] = None
        def refuse(*a, **k):
            raise AssertionError("unpickling attempted")
        class RefusingUnpickler(pickle.Unpickler):
            def __init__(self, *a, **k):
                refuse()
        pickle.load = pickle.loads = refuse
        pickle.Unpickler = RefusingUnpickler
        import torch
        model = torch.export.load({str(out)!r}).module()
        print(tuple(model(torch.randn(7, 1, 28, 28)).shape))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env={**os.environ})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(7, 10)"


def test_pt2_input_is_accepted(cli, model_files, tmp_path):
    first = tmp_path / "a.pt2"
    assert cli("prune", "--sparsity", "0.5", model_files["cnn"], "--format", "pt2", "-o", first, "--quiet").exit_code == 0
    digest = sha256(first)
    second = tmp_path / "b.pt2"
    result = cli("prune", "--sparsity", "0.9", first, "-o", second, "--json")
    assert result.exit_code == 0, result.output
    assert result.json["files"]["format"] == "pt2"
    assert result.json["example_input"]["source"] == "stored"
    assert abs(result.json["sparsity"]["reached"] - 0.9) < 1e-3
    assert sha256(first) == digest
    loaded = load_model(second)
    assert loaded.format == "pt2"


def test_atomic_write_gives_the_usual_file_mode(tmp_path):
    """Also when the writer replaces the temporary file with a new one (as safetensors does)."""
    old = os.umask(0o022)
    try:
        for name, write in (("model.pt", lambda tmp: tmp.write_bytes(b"weights")),
                            ("model.safetensors", lambda tmp: (tmp.unlink(), tmp.write_bytes(b"weights"), tmp.chmod(0o600)))):
            target = tmp_path / name
            with atomic_path(target) as tmp:
                write(tmp)
            assert target.read_bytes() == b"weights" and (target.stat().st_mode & 0o777) == 0o644, name
    finally:
        os.umask(old)


def test_output_format_follows_the_file_name_and_refuses_a_contradiction(cli, tmp_path, model_files):
    assert output_format("m.pt2", None, "pt") == "pt2"
    assert output_format("m.safetensors", None, "pt") == "state_dict"
    assert output_format("m.pt", None, "state_dict") == "state_dict"
    assert output_format("m.pt", "pt", "pt2") == "pt"
    for name, fmt, source in [("m.pt2", "pt", "pt"), ("m.safetensors", "pt2", "pt"), ("m.pt", None, "pt2"), ("m.pth", "pt2", "pt")]:
        with pytest.raises(SrcompressError):
            output_format(name, fmt, source)
    implied = tmp_path / "cnn.pt2"  # no --format: the name decides, and a program is written
    assert cli("prune", "--sparsity", "0.5", model_files["cnn"], "-o", implied, "--quiet").exit_code == 0
    assert tuple(torch.export.load(str(implied)).module()(torch.randn(2, 1, 28, 28)).shape) == (2, 10)
    for args, needle in [(["--format", "pt", "-o", tmp_path / "x.pt2"], "names a pt2 file but --format is pt"),
                         (["--example", "mnist", "-o", tmp_path / "x.pt"], "torch.load cannot read")]:
        source = [] if "--example" in args else [model_files["cnn"]]
        result = cli("prune", "--sparsity", "0.5", *source, *args)
        assert result.exit_code == 2 and needle in result.stderr, result.stderr
        assert not args[-1].exists()


def test_a_sentence_transformers_pipeline_is_pointed_at_its_transformer():
    from srcompress import assets
    from srcompress.inputs import guess_example_inputs

    with pytest.raises(SrcompressError, match=r"SentenceTransformer wraps its transformer .*model\[0\]\.auto_model"):
        guess_example_inputs(assets.minilm())


class TiedHead(torch.nn.Module):
    """An embedding whose table is also the output layer's weight (as in language models)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(50, 16)
        self.mix = torch.nn.Linear(16, 16)
        self.out = torch.nn.Linear(16, 50, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        return self.out(torch.relu(self.mix(self.emb(ids))))


def test_safetensors_of_a_model_with_tied_weights_reloads(cli, tmp_path):
    """safetensors stores a shared tensor once; reading it back with --arch restores every name that shares it."""
    path = tmp_path / "tied.safetensors"
    from safetensors.torch import save_model

    save_model(TiedHead(), str(path))
    out = tmp_path / "out.safetensors"
    arch = "tests.test_io:TiedHead"
    result = cli("prune", "--sparsity", "0.5", path, "--arch", arch, "--input-shape", "1,7", "--input-dtype", "int64", "-o", out, "--quiet")
    assert result.exit_code == 0, result.output
    reloaded = load_model(out, arch=arch).module
    assert reloaded.out.weight is reloaded.emb.weight and float((reloaded.mix.weight == 0).float().mean()) > 0.3
    inspected = cli("inspect", out, "--arch", arch, "--input-shape", "1,7", "--input-dtype", "int64", "--json")
    assert inspected.exit_code == 0, inspected.output


def test_a_pt2_input_is_not_written_as_a_pickle(cli, tmp_path):
    from srcompress import assets

    program = tmp_path / "cnn.pt2"
    torch.export.save(torch.export.export(assets.pretrained_digit_cnn().eval(), (torch.randn(2, 1, 28, 28),)), str(program))
    out = tmp_path / "out.pt"
    result = cli("prune", "--sparsity", "0.5", program, "-o", out, "--format", "pt", "--json")
    assert_clean_failure(result, out, "cannot be written as a pickled module", inputs=[(program, sha256(program))])
    assert result.json["ok"] is False


def test_structured_pruning_of_a_program_exported_at_batch_one(cli, tmp_path):
    """torch.export's default fixes the batch at the example's; the pruned program keeps that batch instead of failing."""
    from srcompress import assets

    program = tmp_path / "cnn.pt2"
    torch.export.save(torch.export.export(assets.pretrained_digit_cnn().eval(), (torch.randn(1, 1, 28, 28),)), str(program))
    out = tmp_path / "out.pt2"
    result = cli("prune", "--structured", "--sparsity", "0.5", program, "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    pruned = torch.export.load(str(out))
    assert pruned.state_dict["fc_layers.0.weight"].shape[0] == 128
    assert tuple(pruned.module()(torch.randn(1, 1, 28, 28)).shape) == (1, 10)
