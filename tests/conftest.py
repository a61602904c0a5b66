import os

# Must be set before anything imports triton (kernel tests) or Hugging Face (MiniLM).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hashlib  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from srcompress.cli import main  # noqa: E402


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class Cli:
    """Runs ``srcompress`` in-process and keeps stdout and stderr apart."""

    def __init__(self):
        self.runner = CliRunner()

    def __call__(self, *args: str):
        result = self.runner.invoke(main, [str(a) for a in args], catch_exceptions=False)
        result.json = None
        if "--json" in args and result.stdout.strip():
            result.json = json.loads(result.stdout)
        return result


@pytest.fixture
def cli():
    return Cli()


@pytest.fixture(scope="session")
def model_files(tmp_path_factory):
    """The real pretrained models, each saved as a pickled module the way users save them."""
    from srcompress import assets

    folder = tmp_path_factory.mktemp("models")
    files = {}
    for name, build in (("cnn", assets.pretrained_digit_cnn), ("mobilenet", assets.pretrained_mobilenet_v2),
                        ("minilm", lambda: assets.minilm()[0].auto_model)):
        path = folder / f"{name}.pt"
        torch.save(build().eval(), path)
        path.chmod(0o644)
        files[name] = path
    return files
