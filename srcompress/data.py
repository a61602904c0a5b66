"""Classification data for training: the bundled MNIST-5k, tensors in a .pt/.npz file, or an image folder.

* ``mnist5k`` (or ``mnist5k:train``, ``mnist5k:test``, ``mnist5k:all``): the real digits of
  :func:`srcompress.assets.mnist5k`, normalised like MNIST.
* ``FILE.pt`` / ``FILE.npz``: inputs and integer labels, as a dict with keys ``x``/``y`` (also
  ``inputs``/``labels``, ``images``/``labels``, ``data``/``targets``) or a pair ``(x, y)``.
* ``FOLDER/``: one sub-folder per class (labels in sorted name order) holding images of one size;
  pixels scaled to [0, 1], then ``(p - mean) / std`` when ``normalize=(mean, std)`` is given.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import SrcompressError

KEY_PAIRS = (("x", "y"), ("inputs", "labels"), ("images", "labels"), ("data", "targets"), ("inputs", "targets"))
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
FORMAT_FIX = "give mnist5k, a .pt/.npz file holding x and y, or a folder with one sub-folder of images per class"


@dataclass
class Dataset:
    x: torch.Tensor
    y: torch.Tensor
    name: str
    class_names: tuple[str, ...] | None = None  # an image folder's class sub-folders, in label order

    def __len__(self) -> int:
        return len(self.y)

    @property
    def classes(self) -> int:
        return int(self.y.max()) + 1

    def digest(self) -> str:
        """sha256 of the inputs and labels (checkpoints record it, so a resume uses the same data)."""
        digest = hashlib.sha256()
        for tensor in (self.x, self.y):
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.contiguous().numpy().tobytes())
        return digest.hexdigest()


def _sample_digests(x: torch.Tensor) -> list[bytes]:
    rows = x.reshape(len(x), -1).contiguous().numpy()
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in rows]


def held_out_note(seen_x: torch.Tensor, seen_name: str, eval_x: torch.Tensor, eval_name: str, role: str = "training") -> str | None:
    """Refuse evaluation data whose every sample the model was fitted on (``seen_x``, the ``role`` data): its accuracy
    is not held-out. A note when some are."""
    seen = set(_sample_digests(seen_x))
    shared = sum(digest in seen for digest in _sample_digests(eval_x))
    if shared == len(eval_x):
        raise SrcompressError(f"every sample of the evaluation data ({eval_name}) is also in the {role} data ({seen_name})",
                              f"use {role} data the model is not evaluated on (for the bundled digits: "
                              f"{'--calib mnist5k, their training split' if role == 'calibration' else 'mnist5k:train'})")
    if shared:
        return (f"{shared} of the {len(eval_x)} evaluation samples ({eval_name}) are also in the {role} data: "
                "accuracy on them is not held-out")
    return None


def load_data(source: str, normalize: tuple[float, float] | None = None, class_names: tuple[str, ...] | None = None) -> Dataset:
    """Load a classification data set from its name or path (see the module docstring).

    ``class_names`` (the training folder's classes) labels an evaluation folder the way training did, so an
    evaluation folder lacking a class still gets the right labels.
    """
    if source.split(":")[0] == "mnist5k":
        from . import assets

        split = source.partition(":")[2] or "train"
        x, y = assets.mnist5k(split)
        return Dataset(x, y, f"mnist5k:{split}")
    path = Path(source)
    if not path.exists():
        raise SrcompressError(f"data not found: {source}", FORMAT_FIX)
    if path.is_dir():
        x, y, names = _image_folder(path, normalize, class_names)
        return dataclasses.replace(_checked(x, y, str(path)), class_names=names)
    if path.suffix == ".npz":
        x, y = _npz(path)
    else:
        x, y = _torch_file(path)
    return _checked(x, y, str(path))


def _pick(named: dict, path: Path) -> tuple:
    for xk, yk in KEY_PAIRS:
        if xk in named and yk in named:
            return named[xk], named[yk]
    raise SrcompressError(f"{path} holds {', '.join(sorted(map(str, named)))[:120]}, not inputs and labels", "save it as {'x': inputs, 'y': labels}")


def _torch_file(path: Path) -> tuple:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means it is not a tensor file we can read safely
        reason = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
        raise SrcompressError(f"{path} is not a readable tensor file ({reason})", FORMAT_FIX) from err
    if isinstance(obj, dict):
        return _pick(obj, path)
    if isinstance(obj, (list, tuple)) and len(obj) == 2:
        return obj[0], obj[1]
    raise SrcompressError(f"{path} holds a {type(obj).__name__}, not inputs and labels", "save it as {'x': inputs, 'y': labels}")


def _npz(path: Path) -> tuple:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except Exception as err:  # noqa: BLE001
        raise SrcompressError(f"{path} is not a readable .npz file ({type(err).__name__})", FORMAT_FIX) from err
    if len(arrays) == 2 and not any(all(k in arrays for k in pair) for pair in KEY_PAIRS):
        first, second = (arrays[k] for k in sorted(arrays))
        return first, second
    return _pick(arrays, path)


def _image_folder(path: Path, normalize: tuple[float, float] | None, class_names: tuple[str, ...] | None) -> tuple:
    from PIL import Image

    classes = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise SrcompressError(f"{path} has no class sub-folders", "put the images of each class in their own sub-folder")
    names = tuple(folder.name for folder in classes)
    if class_names is not None:
        unknown = sorted(set(names) - set(class_names))
        if unknown:
            raise SrcompressError(f"{path} has a class folder {unknown[0]!r} that the training data does not",
                                  f"use the training classes ({', '.join(class_names[:6])}{', ...' if len(class_names) > 6 else ''})")
        names = class_names
    labels = {name: label for label, name in enumerate(names)}
    files = [(f, labels[folder.name]) for folder in classes for f in sorted(folder.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise SrcompressError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in the class folders of {path}", FORMAT_FIX)
    images = []
    for file, _ in files:
        try:
            with Image.open(file) as image:
                images.append(image.copy())
        except Exception as err:  # noqa: BLE001
            raise SrcompressError(f"cannot read image {file} ({type(err).__name__})", "remove or re-save it") from err
    mode = "L" if all(image.mode in ("L", "1", "I;16", "I") for image in images) else "RGB"
    arrays = [np.asarray(image.convert(mode), dtype=np.float32) / 255.0 for image in images]
    sizes = {a.shape[:2] for a in arrays}
    if len(sizes) > 1:
        first, second = sorted(sizes)[:2]
        raise SrcompressError(f"images in {path} have different sizes ({first} and {second})", "resize them all to one size")
    x = torch.from_numpy(np.stack(arrays))
    x = x.unsqueeze(1) if mode == "L" else x.permute(0, 3, 1, 2)
    if normalize is not None:
        mean, std = normalize
        x = (x - mean) / std
    return x.contiguous(), torch.tensor([label for _, label in files]), names


def _checked(x, y, name: str) -> Dataset:
    x = torch.as_tensor(np.asarray(x) if isinstance(x, np.ndarray) else x)
    y = torch.as_tensor(np.asarray(y) if isinstance(y, np.ndarray) else y)
    if x.dim() < 2 or not x.is_floating_point():
        raise SrcompressError(f"inputs in {name} have shape {tuple(x.shape)} and dtype {x.dtype}", "inputs must be floating point, one row per sample")
    if y.dim() != 1 or y.is_floating_point() or y.dtype == torch.bool:
        raise SrcompressError(f"labels in {name} have shape {tuple(y.shape)} and dtype {y.dtype}", "labels must be a 1-D integer tensor of class indices")
    if len(x) != len(y) or len(y) == 0:
        raise SrcompressError(f"{name} has {len(x)} inputs and {len(y)} labels", "give one label per input")
    if int(y.min()) < 0:
        raise SrcompressError(f"{name} has negative labels", "labels must be class indices 0..C-1")
    return Dataset(x.float().contiguous(), y.long().contiguous(), name)
