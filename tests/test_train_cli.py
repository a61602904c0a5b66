"""`srcompress train` and `srcompress recipe` end to end: data formats, errors, kill-and-resume, torchrun."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from srcompress import assets
from srcompress.models import LeNet5

ROOT = Path(__file__).resolve().parents[1]


class DropNet(nn.Module):
    """A small digit CNN with dropout, so a resume must also restore the RNG state."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 5, padding=2)
        self.conv2 = nn.Conv2d(8, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 64)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = F.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(self.drop(torch.relu(self.fc1(x.flatten(1)))))


def env(threads=None):
    """The child runs with this process's thread count: float results depend on it."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": str(threads or torch.get_num_threads())}


@pytest.fixture
def lenet(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "lenet.pt"
    torch.save(LeNet5(), path)
    path.chmod(0o644)
    return path


@pytest.fixture
def small_data(tmp_path):
    """640 real MNIST-5k training digits (64 per class) and 200 held-out ones, as .pt files."""
    x, y = assets.mnist5k("train")
    index = torch.cat([torch.nonzero(y == c).flatten()[:64] for c in range(10)]).sort().values
    train = tmp_path / "train.pt"
    torch.save({"x": x[index], "y": y[index]}, train)
    xt, yt = assets.mnist5k("test")
    held = tmp_path / "test.pt"
    torch.save((xt[::5], yt[::5]), held)
    return train, held


def weights(path):
    return torch.load(path, weights_only=False).state_dict()


def test_train_mnist5k_cyclical(cli, tmp_path, lenet):
    out = tmp_path / "out.pt"
    result = cli("train", lenet, "--data", "mnist5k", "--epochs", "2", "--sparsity", "0.8", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    report = result.json
    assert report["ok"] and report["steps"] == 2 * 63 and len(report["history"]) == 2
    assert report["data"] == {"train": "mnist5k:train", "train_samples": 4000, "eval": "mnist5k:test", "eval_samples": 1000}
    assert report["sparsity"]["reached"] == pytest.approx(0.8, abs=1e-4)
    assert report["evaluation"]["after"] > 0.5 > report["evaluation"]["before"]
    assert not (tmp_path / "out.pt.ckpt").exists()  # removed after success
    inspected = cli("inspect", out, "--json").json
    assert inspected["totals"]["sparse_layers_sparsity"] == pytest.approx(0.8, abs=1e-3)
    model = torch.load(out, weights_only=False)
    x, y = assets.mnist5k("test")
    with torch.no_grad():
        assert int((model(x).argmax(1) == y).sum()) / len(y) == report["evaluation"]["after"]


@pytest.mark.parametrize("kind", ["npz", "folder"])
def test_data_formats(cli, tmp_path, lenet, kind):
    x, y = assets.mnist5k("train")
    pick = torch.cat([torch.nonzero(y == c).flatten()[:8] for c in range(3)])
    if kind == "npz":
        data = tmp_path / "digits.npz"
        np.savez(data, images=x[pick].numpy(), labels=y[pick].numpy())
        extra = []
    else:
        from PIL import Image

        data = tmp_path / "digits"
        raw = (x[pick] * assets.MNIST_STD + assets.MNIST_MEAN).clamp(0, 1).mul(255).round().byte()
        for i, (image, label) in enumerate(zip(raw, y[pick])):
            folder = data / f"class_{int(label)}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[0].numpy(), mode="L").save(folder / f"{i:03d}.png")
        extra = ["--normalize", f"{assets.MNIST_MEAN},{assets.MNIST_STD}"]
    out = tmp_path / "out.pt"
    result = cli("train", lenet, "--data", data, *extra, "--epochs", "3", "--batch-size", "8", "--schedule", "gmp",
                 "--sparsity", "0.5", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    assert result.json["data"]["train_samples"] == 24 and result.json["evaluation"] is None
    assert result.json["sparsity"]["reached"] == pytest.approx(0.5, abs=1e-4)
    if kind == "folder":  # the folder's pixels, normalised, are the MNIST-5k tensors again
        from srcompress.data import load_data

        loaded = load_data(str(data), (assets.MNIST_MEAN, assets.MNIST_STD))
        assert torch.allclose(loaded.x, x[pick], atol=1e-5) and torch.equal(loaded.y, y[pick])


def test_evaluation_folder_takes_the_training_folders_labels(tmp_path):
    """An evaluation folder without some class still labels each image as the training folder does."""
    from PIL import Image

    from srcompress.data import load_data
    from srcompress.errors import SrcompressError

    def folder(name, classes):
        for label in classes:
            (tmp_path / name / label).mkdir(parents=True)
            Image.fromarray(np.full((4, 4), 40 * len(label), dtype=np.uint8), mode="L").save(tmp_path / name / label / "a.png")
        return str(tmp_path / name)

    train = load_data(folder("train", ["ant", "bee", "cat"]))
    assert train.class_names == ("ant", "bee", "cat") and train.y.tolist() == [0, 1, 2]
    held = load_data(folder("held", ["bee", "cat"]), class_names=train.class_names)
    assert held.y.tolist() == [1, 2]  # alone it would be [0, 1]
    with pytest.raises(SrcompressError, match="class folder 'dog' that the training data does not"):
        load_data(folder("other", ["cat", "dog"]), class_names=train.class_names)


def test_bad_inputs_are_one_line_errors_and_write_nothing(cli, tmp_path, lenet):
    out = tmp_path / "out.pt"
    bad = {}
    bad["floats.pt"] = {"x": torch.randn(4, 1, 28, 28), "y": torch.rand(4)}
    bad["short.pt"] = {"x": torch.randn(4, 1, 28, 28), "y": torch.zeros(3, dtype=torch.long)}
    bad["shape.pt"] = {"x": torch.randn(4, 3, 32, 32), "y": torch.zeros(4, dtype=torch.long)}
    bad["classes.pt"] = {"x": torch.randn(4, 1, 28, 28), "y": torch.tensor([0, 1, 2, 12])}
    bad["other.pt"] = {"weights": torch.randn(3)}
    for name, obj in bad.items():
        torch.save(obj, tmp_path / name)
    (tmp_path / "empty_dir").mkdir()
    cases = [
        (["--data", tmp_path / "missing.pt"], "data not found"),
        (["--data", tmp_path / "floats.pt"], "labels must be a 1-D integer tensor"),
        (["--data", tmp_path / "short.pt"], "has 4 inputs and 3 labels"),
        (["--data", tmp_path / "shape.pt"], "cannot run on a batch of inputs of shape (3, 32, 32)"),
        (["--data", tmp_path / "classes.pt"], "labels up to 12 but the model has 10 outputs"),
        (["--data", tmp_path / "other.pt"], "not inputs and labels"),
        (["--data", tmp_path / "empty_dir"], "no class sub-folders"),
        (["--data", "mnist5k", "--schedule", "cyclical", "--epochs", "1", "--cycles", "40"], "too short"),
        (["--data", "mnist5k", "--sparsity", "1.0"], "outside [0, 1)"),
        (["--data", "mnist5k", "--pattern", "2:4"], "always gives sparsity 0.5"),
        (["--data", "mnist5k", "--eval-data", "mnist5k"], "is also in the training data (mnist5k:train)"),
        (["--data", "mnist5k:all", "--eval-data", "mnist5k:test"], "every sample of the evaluation data (mnist5k:test) is also in"),
        (["--data", "mnist5k", "--eval-data", tmp_path / "shape.pt"], "cannot run on a batch of inputs of shape (3, 32, 32)"),
        (["--data", "mnist5k", "--cycles", "0"], "cycles must be at least 1"),
        (["--data", "mnist5k", "--prune-fraction", "1.5", "--schedule", "oneshot"], "prune fraction 1.5 is outside (0, 1]"),
        (["--data", "mnist5k", "--checkpoint", out, "--force"], "is the output file"),
        (["--data", "mnist5k", "--checkpoint", lenet, "--force"], "is the input model file"),
        (["--data", "mnist5k", "--checkpoint", tmp_path / "floats.pt", "--force"], "is not an srcompress training checkpoint"),
        (["--data", "mnist5k", "--checkpoint", tmp_path / "empty_dir", "--force"], "is not an srcompress training checkpoint"),
        (["--data", "mnist5k", "--sparsity", "-0.5"], "outside [0, 1)"),
        (["--data", "mnist5k", "--momentum", "1.5", "--optimizer", "sgd"], "out of range"),
        (["--data", "mnist5k", "--checkpoint", tmp_path / "nowhere" / "c.ckpt"], "checkpoint folder"),
    ]
    for args, message in cases:
        result = cli("train", lenet, *args, "-o", out, "--json")
        assert result.exit_code == 2, (args, result.stderr)
        assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
        assert result.json == {"ok": False, "error": result.stderr.strip().removeprefix("error: ")}
        assert not out.exists() and not (tmp_path / "out.pt.ckpt").exists()
    assert lenet.is_file() and (tmp_path / "floats.pt").is_file() and (tmp_path / "empty_dir").is_dir()
    unreachable = cli("train", lenet, "--data", "mnist5k", "--sparsity", "0.995", "-o", out, "--json")
    assert unreachable.exit_code == 3 and "at most 99.00% of the pruned layers' weights can go" in unreachable.stderr
    assert not out.exists() and not (tmp_path / "out.pt.ckpt").exists()


def test_resume_after_kill_is_bit_identical(cli, tmp_path, small_data):
    train, held = small_data
    torch.manual_seed(0)
    model = tmp_path / "drop.pt"
    torch.save(DropNet(), model)
    model.chmod(0o644)
    args = ["train", model, "--data", train, "--eval-data", held, "--epochs", "3", "--batch-size", "32", "--cycles", "2",
            "--sparsity", "0.9", "--optimizer", "sgd", "--lr", "0.05", "--checkpoint-every", "7", "--json"]
    straight = cli(*args, "-o", tmp_path / "straight.pt")
    assert straight.exit_code == 0, straight.stderr

    killed = subprocess.run([sys.executable, "-m", "srcompress.cli", *map(str, args), "-o", str(tmp_path / "resumed.pt"),
                             "--stop-after-steps", "31"], capture_output=True, text=True, env=env(), cwd=tmp_path)
    assert killed.returncode == -9, killed.stderr  # SIGKILL after step 31: the last checkpoint holds step 28
    assert (tmp_path / "resumed.pt.ckpt").exists() and not (tmp_path / "resumed.pt").exists()

    again = cli(*args, "-o", tmp_path / "resumed.pt")
    assert again.exit_code == 2 and "pass --resume" in again.stderr
    changed = cli(*[a if a != "0.9" else "0.8" for a in args], "-o", tmp_path / "resumed.pt", "--resume")
    assert changed.exit_code == 2 and "sparsity: 0.9 then, 0.8 now" in changed.stderr

    resumed = cli(*args, "-o", tmp_path / "resumed.pt", "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    assert resumed.json["resumed_from"] == 28 and resumed.json["steps"] == straight.json["steps"] == 60
    a, b = weights(tmp_path / "straight.pt"), weights(tmp_path / "resumed.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.json["history"] == straight.json["history"]
    assert resumed.json["sparsity"] == straight.json["sparsity"]
    assert not any("threads" in note for note in resumed.json["notes"])

    missing = cli(*args, "-o", tmp_path / "other.pt", "--resume")
    assert missing.exit_code == 2 and "no checkpoint to resume from" in missing.stderr


def test_recipe_prunes_then_trains(cli, tmp_path, lenet, small_data):
    train, held = small_data
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f"""
seed = 3
[data]
train = "{train}"
eval = "{held}"

[[stage]]
kind = "prune"
sparsity = 0.5

[[stage]]
kind = "train"
sparsity = 0.8
schedule = "gmp"
pattern = "block:4x4"
epochs = 2
batch_size = 32
""")
    out = tmp_path / "out.pt"
    result = cli("recipe", recipe, lenet, "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    first, second = result.json["stages"]
    assert first["kind"] == "prune" and first["report"]["sparsity"]["reached"] == pytest.approx(0.5, abs=1e-3)
    assert second["kind"] == "train" and second["config"]["seed"] == 3 and second["steps"] == 40
    assert second["sparsity"]["reached"] == pytest.approx(0.8, abs=0.01) and 0 <= second["eval_after"] <= 1
    state = weights(out)
    blocks = [state[name].reshape(state[name].shape[0] // 4, 4, -1, 4).abs().sum(dim=(1, 3)) for name in ("classifier.0.weight", "classifier.2.weight")]
    total = sum(b.numel() for b in blocks)
    assert sum(int((b == 0).sum()) for b in blocks) >= round(0.8 * total)  # 80 % of the 4x4 blocks are entirely zero
    assert second["sparsity"]["layers"][1] == {"name": "features.3.weight", "params": 2400, "skipped": "16x150 not divisible by 4x4", "sparsity": 0.0}

    for text, message in ((recipe.read_text().replace("epochs = 2", "epoch = 2"), "recipe stage 2: train stage: unknown key 'epoch'"),
                          (recipe.read_text().replace("epochs = 2", 'epochs = "2"'), "recipe stage 2: epochs must be an integer, not '2'"),
                          (recipe.read_text().replace("sparsity = 0.5", 'sparsity = "0.5"'), "recipe stage 1: sparsity must be a number"),
                          (recipe.read_text().replace("epochs = 2", 'epochs = 2\nexclude = "classifier*"'),
                           "recipe stage 2: exclude must be a list of globs, not 'classifier*'"),
                          (recipe.read_text().replace("epochs = 2", 'epochs = 2\nexclude = ["nomatch*"]'),
                           "recipe stage 2: --exclude 'nomatch*' matches no prunable layer"),
                          (recipe.read_text().replace("epochs = 2", "epochs = 2\ncycles = 0"), "recipe stage 2: cycles must be at least 1"),
                          (recipe.read_text().replace('kind = "prune"', 'kind = ["prune"]'), "recipe stage 1: unknown kind ['prune']"),
                          (recipe.read_text().replace('kind = "prune"', 'kind = "surgery"'), "recipe stage 1: unknown kind 'surgery'"),
                          ("seed = [", "is not valid TOML")):
        recipe.write_text(text)
        bad = cli("recipe", recipe, lenet, "-o", tmp_path / "bad.pt")
        assert bad.exit_code == 2 and message in bad.stderr and not (tmp_path / "bad.pt").exists(), bad.stderr


def test_recipe_structured_then_cyclical_on_the_pretrained_cnn(cli, tmp_path, small_data):
    """The pipeline's stages 2 and 3 in one recipe: channels removed physically, then cyclical sparse fine-tuning."""
    train, held = small_data
    recipe = tmp_path / "recipe.toml"
    good = f"""
[data]
train = "{train}"
eval = "{held}"

[[stage]]
kind = "structured"
method = "submodular"
calib = "mnist5k"
calib_samples = 200
sparsity = 0.5
exclude = ["conv_layers.0"]

[[stage]]
kind = "train"
sparsity = 0.7
schedule = "cyclical"
cycles = 2
epochs = 2
batch_size = 32
lr = 0.0005
"""
    recipe.write_text(good)
    out = tmp_path / "out.pt2"
    result = cli("recipe", recipe, "--example", "mnist", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    structured, trained = result.json["stages"]
    widths = {g["name"]: (g["units_before"], g["units_after"]) for g in structured["report"]["groups"]}
    assert widths["fc_layers.0"] == (256, 128) and widths["conv_layers.3"] == (64, 32) and widths["conv_layers.0"] == (32, 32)
    assert structured["report"]["after"]["params"] < 0.5 * structured["report"]["before"]["params"]
    assert trained["sparsity"]["reached"] == pytest.approx(0.7, abs=0.01)
    assert result.json["evaluation"]["after"] > 0.95  # the bundled example's held-out digits
    reloaded = torch.export.load(str(out))
    assert reloaded.state_dict["fc_layers.0.weight"].shape[0] == 128
    assert tuple(reloaded.module()(torch.randn(3, 1, 28, 28)).shape) == (3, 10)

    for old, new, message in (('calib = "mnist5k"', "", "method 'submodular' needs calibration data"),
                              ('kind = "structured"', 'kind = "prune"', "prune stage: unknown key 'calib'"),
                              ("sparsity = 0.5", "sparsity = 1.5", "outside [0, 1)"),
                              (f'train = "{train}"', 'train = "mnist5k:test"',  # the example is evaluated on these digits
                               "recipe stage 2: every sample of the evaluation data (MNIST-5k held-out (1000 images)) is also in")):
        recipe.write_text(good.replace(old, new))
        bad = cli("recipe", recipe, "--example", "mnist", "-o", tmp_path / "bad.pt2")
        assert bad.exit_code == 2 and message in bad.stderr and not (tmp_path / "bad.pt2").exists(), bad.stderr


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="torchrun not installed")
def test_torchrun_two_processes(tmp_path, lenet, small_data):
    train, held = small_data
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "ddp.pt"
    command = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "srcompress.cli", "train", str(lenet), "--data", str(train),
               "--eval-data", str(held), "--epochs", "2", "--batch-size", "32", "--sparsity", "0.8", "--cycles", "2", "-o", str(out), "--json"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(threads=1), cwd=tmp_path,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:  # a hung run: end the launcher and both workers
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, stderr[-2000:]
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report["steps"] == 2 * 10  # 640 samples, 320 per rank, batches of 32
    assert report["sparsity"]["reached"] == pytest.approx(0.8, abs=1e-4)
    assert report["evaluation"]["after"] > report["evaluation"]["before"]
    assert out.exists() and not (tmp_path / "ddp.pt.ckpt").exists()


def test_pt2_input_trains_and_saves_pt2(cli, tmp_path, small_data):
    train, held = small_data
    torch.manual_seed(0)
    source = tmp_path / "lenet.pt2"
    fixed = tmp_path / "fixed.pt2"
    torch.export.save(torch.export.export(LeNet5().eval(), (torch.zeros(2, 1, 28, 28),)), str(fixed))
    result = cli("train", fixed, "--data", train, "--epochs", "1", "-o", tmp_path / "x.pt2")
    assert result.exit_code == 2 and "exported with a dynamic batch size" in result.stderr
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(LeNet5().eval(), (torch.zeros(2, 1, 28, 28),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(source))
    out = tmp_path / "out.pt2"
    result = cli("train", source, "--data", train, "--eval-data", held, "--epochs", "2", "--batch-size", "32",
                 "--schedule", "oneshot", "--sparsity", "0.7", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    assert any("trains in the mode it was exported in" for note in result.json["notes"])
    model = torch.export.load(str(out)).module()
    x, y = torch.load(held, weights_only=True)
    assert int((model(x).argmax(1) == y).sum()) / len(y) == result.json["evaluation"]["after"]
    assert cli("inspect", out, "--json").json["totals"]["sparse_layers_sparsity"] == pytest.approx(0.7, abs=1e-3)
