"""Calibration data: a fixed number of model inputs in a deterministic order, from files or bundled sets.

Sources (``--calib``):
  * a ``.npz`` or ``.pt`` file of input tensors (first array / ``x`` / ``inputs``), loaded without pickled code;
  * a folder of images (resized and normalised);
  * a ``.txt`` file with one sentence per line, tokenised for a Hugging Face model;
  * ``mnist5k`` (training split), ``photos`` (crops of the calibration photos), ``sentences`` (calibration
    split of the bundled sentences), or ``random`` (Gaussian inputs shaped like the example input, for smoke tests).
Sentences are batched by token length, so no batch holds padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..errors import SrcompressError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass
class CalibrationSet:
    """Model inputs for calibration, already in batches; ``description`` says where they came from."""

    batches: list[tuple[torch.Tensor, ...]]
    description: str
    provenance: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return sum(int(batch[0].shape[0]) for batch in self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        return iter(self.batches)


def first_batches(batches: list[tuple], samples: int) -> list[tuple]:
    """Leading batches holding at least ``samples`` samples (all of them if there are fewer)."""
    chosen, seen = [], 0
    for batch in batches:
        if seen >= samples:
            break
        chosen.append(batch)
        seen += int(batch[0].shape[0])
    return chosen


def _chunks(x: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor]]:
    return [(chunk,) for chunk in x.split(batch_size)]


def _sample(count: int, available: int, seed: int) -> torch.Tensor:
    if count > available:
        raise SrcompressError(f"{count} calibration samples asked for, but the data holds {available}",
                              f"pass --calib-samples {available} or fewer")
    return torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:count].sort().values


def load_calibration(source: str, samples: int = 512, *, seed: int = 0, batch_size: int = 32,
                     example_inputs: tuple | None = None, tokenizer: str | None = None, image_size: int = 224,
                     mean: tuple[float, ...] = (0.485, 0.456, 0.406), std: tuple[float, ...] = (0.229, 0.224, 0.225),
                     model=None) -> CalibrationSet:
    """Load ``samples`` calibration inputs from ``source`` (a file, a folder or a bundled name); with ``model``, check
    that the model runs on them."""
    calibration = _load(source, samples, seed, batch_size, example_inputs, tokenizer, image_size, mean, std, model)
    if model is not None:
        check_fits(calibration, model, source, example_inputs)
    return calibration


def check_fits(calibration: CalibrationSet, model, source: str, example_inputs: tuple | None = None) -> None:
    """Run ``model`` on one calibration sample; data of the wrong shape or kind becomes a one-line error."""
    from ..inputs import run_model

    run_model(model, tuple(t[:1] for t in calibration.batches[0]), what=f"calibration data {source!r}",
              fix="pass --calib data shaped like the model's inputs" + _shape_hint(example_inputs))


def _shape_hint(example_inputs: tuple | None) -> str:
    tensors = [t for t in example_inputs or () if isinstance(t, torch.Tensor)]
    return f" (the example input is {', '.join(str(tuple(t.shape)) for t in tensors)})" if tensors else ""


def _load(source, samples, seed, batch_size, example_inputs, tokenizer, image_size, mean, std, model) -> CalibrationSet:
    from .. import assets

    if samples < 1:
        raise SrcompressError(f"--calib-samples {samples} must be at least 1", "pass e.g. --calib-samples 512")
    if source == "mnist5k":
        x, _ = assets.mnist5k("train")
        index = _sample(samples, len(x), seed)
        return CalibrationSet(_chunks(x[index], batch_size), f"MNIST-5k training split, {samples} images", {"source": source, "seed": seed})
    if source == "photos":
        x = assets.image_crops("calib", samples, size=image_size, seed=seed)
        return CalibrationSet(_chunks(x, batch_size), f"{samples} crops of nine calibration photos", {"source": source, "seed": seed})
    if source == "sentences":
        texts = assets.sentences("calib")
        index = _sample(samples, len(texts), seed)
        return _text_set([texts[i] for i in index.tolist()], tokenizer, model, batch_size, "bundled calibration sentences", seed)
    if source == "random":
        if not example_inputs:
            raise SrcompressError("random calibration needs an example input", "pass --input-shape")
        gen = torch.Generator().manual_seed(seed)
        template = example_inputs[0]
        if template.is_floating_point():
            x = torch.randn((samples, *template.shape[1:]), generator=gen, dtype=template.dtype)
        else:
            x = torch.randint(0, int(template.max()) + 1, (samples, *template.shape[1:]), generator=gen, dtype=template.dtype)
        return CalibrationSet(_chunks(x, batch_size), f"{samples} random inputs (smoke test only)", {"source": source, "seed": seed})
    path = Path(source)
    if not path.exists():
        raise SrcompressError(f"calibration data {source!r} not found",
                              "give a .npz/.pt file, an image folder, a .txt file, or one of mnist5k, photos, sentences, random")
    if path.is_dir():
        return _image_folder(path, samples, seed, batch_size, image_size, mean, std)
    if path.suffix == ".txt":
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        index = _sample(samples, len(lines), seed)
        return _text_set([lines[i] for i in index.tolist()], tokenizer, model, batch_size, str(path), seed)
    return _tensor_file(path, samples, seed, batch_size)


def _tensor_file(path: Path, samples: int, seed: int, batch_size: int) -> CalibrationSet:
    with open(path, "rb") as handle:
        head = handle.read(2)
    if head != b"PK" and head[:1] != b"\x80":  # a zip (torch.save, .npz) or a legacy pickle
        raise SrcompressError(f"calibration file {path} is not a torch.save or numpy file",
                              "save a tensor with torch.save(x, path) or numpy.savez(path, x=x); a .txt file is read as sentences")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                key = "x" if "x" in data.files else data.files[0]
                x = torch.from_numpy(np.asarray(data[key]))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            x = obj if isinstance(obj, torch.Tensor) else next((obj[k] for k in ("x", "inputs", "images") if isinstance(obj, dict) and k in obj), None)
    except Exception as err:  # noqa: BLE001 - any failure means a bad file
        reason = (str(err).strip().splitlines() or [""])[0][:120]
        raise SrcompressError(f"calibration file {path} cannot be read ({type(err).__name__}{': ' + reason if reason else ''})",
                              "save a tensor with torch.save(x, path) or numpy.savez(path, x=x)") from err
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise SrcompressError(f"calibration file {path} holds no input tensor", "store the inputs as a tensor under the key 'x'")
    if x.is_floating_point():
        x = x.float()
    index = _sample(samples, len(x), seed)
    return CalibrationSet(_chunks(x[index], batch_size), f"{samples} samples of {path}", {"source": str(path), "seed": seed})


def _image_folder(path: Path, samples: int, seed: int, batch_size: int, size: int, mean, std) -> CalibrationSet:
    from PIL import Image

    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SrcompressError(f"no images in {path}", f"put {', '.join(sorted(IMAGE_SUFFIXES))} files there")
    index = _sample(samples, len(files), seed)
    m = torch.tensor(mean).view(-1, 1, 1)
    s = torch.tensor(std).view(-1, 1, 1)
    images = []
    for i in index.tolist():
        try:
            with Image.open(files[i]) as image:
                array = np.asarray(image.convert("RGB" if len(mean) == 3 else "L"), dtype=np.float32) / 255.0
        except OSError as err:
            raise SrcompressError(f"image {files[i]} cannot be read ({err})", "remove or replace it") from err
        tensor = torch.from_numpy(array).permute(2, 0, 1) if array.ndim == 3 else torch.from_numpy(array)[None]
        short = min(tensor.shape[1:])
        top, left = (tensor.shape[1] - short) // 2, (tensor.shape[2] - short) // 2
        tensor = tensor[:, top:top + short, left:left + short]  # centre crop, then resize
        tensor = torch.nn.functional.interpolate(tensor[None], size=(size, size), mode="bilinear", antialias=True)[0]
        images.append((tensor - m) / s)
    return CalibrationSet(_chunks(torch.stack(images), batch_size), f"{samples} images of {path}", {"source": str(path), "seed": seed})


def _text_set(texts: list[str], tokenizer: str | None, model, batch_size: int, origin: str, seed: int) -> CalibrationSet:
    tok = _tokenizer(tokenizer, model)
    encoded = [tok(t, truncation=True, max_length=256, return_tensors="pt") for t in texts]
    by_length: dict[int, list] = {}
    for item in encoded:
        by_length.setdefault(int(item["input_ids"].shape[1]), []).append(item)
    batches = []
    for length in sorted(by_length):
        items = by_length[length]
        for start in range(0, len(items), batch_size):
            part = items[start:start + batch_size]
            batches.append((torch.cat([p["input_ids"] for p in part]), torch.cat([p["attention_mask"] for p in part])))
    return CalibrationSet(batches, f"{len(texts)} sentences from {origin}", {"source": origin, "seed": seed})


def _tokenizer(name: str | None, model):
    """A Hugging Face tokenizer: the ``--tokenizer`` folder, else the local folder the model was loaded from."""
    try:
        from transformers import AutoTokenizer
    except ImportError as err:
        raise SrcompressError("text calibration needs transformers", 'pip install -e ".[assets]"') from err
    if name is None:
        source = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
        if not (source and Path(source).is_dir()):
            raise SrcompressError("text calibration needs a tokenizer", "pass --tokenizer with a local Hugging Face tokenizer folder")
        name = source
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as err:  # noqa: BLE001
        raise SrcompressError(f"tokenizer {name!r} cannot be loaded ({str(err).splitlines()[0][:120]})",
                              "pass --tokenizer with a local Hugging Face tokenizer folder") from err
