"""Loading and saving models: pickled modules, torch.export programs (.pt2) and state dicts.

Security: a pickled ``nn.Module`` (``torch.save(model)``) executes code from the file when it is
loaded. srcompress loads one only when the file is owned by you (or root) and writable by no one
else, or when you pass ``trust_pickle=True`` (``--trust-pickle``); it always says that it did.
``.pt2`` programs, state dicts and safetensors are loaded without running code from the file.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib
import os
import pickle
import stat
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .errors import SrcompressError
from .inputs import run_model, set_eval

FORMATS = ("pt", "pt2", "state_dict")


@dataclass
class LoadedModel:
    """A model ready to run, and where it came from."""

    module: nn.Module
    format: str
    path: Path | None = None
    sha256: str | None = None
    program: Any = None  # the torch.export.ExportedProgram of a .pt2 input
    example_inputs: tuple | None = None
    notes: list[str] = field(default_factory=list)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise SrcompressError(f"model file not found: {path}", "check the path")
    if path.is_dir():
        raise SrcompressError(f"{path} is a directory, not a model file", "give the path of a .pt, .pt2 or state-dict file")
    if path.stat().st_size == 0:
        raise SrcompressError(f"{path} is empty", "re-save the model with torch.save or torch.export.save")
    if not os.access(path, os.R_OK):
        raise SrcompressError(f"{path} is not readable", "fix its permissions")


def _is_trusted_location(path: Path) -> tuple[bool, str]:
    info = path.stat()
    uid = os.getuid() if hasattr(os, "getuid") else None
    if uid is not None and info.st_uid not in (uid, 0):
        return False, f"it is owned by another user (uid {info.st_uid})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return False, "it is writable by other users"
    return True, "owned by you and writable only by you"


def _archive_kind(path: Path) -> str:
    """'pt2' for a torch.export archive, 'torch' for a torch.save zip, 'safetensors', or 'other'."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    if path.suffix == ".safetensors" or (len(head) > 9 and head[8:9] == b"{"):
        return "safetensors"
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
                damaged = archive.testzip()  # torch reads records without checking their CRCs
        except zipfile.BadZipFile:
            return "other"
        if damaged is not None:
            raise _corrupt(path, ValueError(f"record {damaged} fails its checksum"))
        if any(n.endswith("archive_format") or n.endswith("serialized_exported_program.json") for n in names):
            return "pt2"
        return "torch"
    return "other"


def _starts_like_model(path: Path) -> bool:
    """True if the file begins like a zip archive (perhaps a truncated one) or a pickle (the legacy torch.save format)."""
    with open(path, "rb") as handle:
        head = handle.read(2)
    return head[:1] == b"\x80" or head == b"PK"


def _corrupt(path: Path, err: Exception) -> SrcompressError:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return SrcompressError(
        f"{path} is corrupt or truncated ({reason[:120]})",
        "re-save it with torch.save/torch.export.save and check the copy is complete",
    )


def _tensor_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    """The state dict inside a loaded object, unwrapping common checkpoint layouts."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return obj
    return None


def resolve_arch(arch: str) -> Callable[[], nn.Module]:
    """Import ``module.path:callable`` (the current directory is searched too)."""
    if ":" not in arch:
        raise SrcompressError(f"--arch {arch!r} is not of the form module:callable", "e.g. --arch mypkg.models:resnet18")
    module_name, attr = arch.split(":", 1)
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise SrcompressError(f"--arch: cannot import {module_name!r} ({err})", "install it or run from the directory that holds it") from err
    finally:
        if added:
            sys.path.remove(cwd)
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise SrcompressError(f"--arch: {module_name!r} has no attribute {attr!r}", "check the callable's name")
        target = getattr(target, part)
    if not callable(target):
        raise SrcompressError(f"--arch: {arch} is not callable", "point it at a class or function that builds the model")
    return target


def _build_from_state_dict(state: dict[str, torch.Tensor], arch: str, path: Path) -> nn.Module:
    model = resolve_arch(arch)()
    if not isinstance(model, nn.Module):
        raise SrcompressError(f"--arch {arch} returned {type(model).__name__}, not an nn.Module", "point it at a model constructor")
    state = _with_tied_keys(model, state)
    try:
        result = model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = [ln.strip() for ln in str(err).splitlines() if ln.strip()][1:3]
        raise SrcompressError(
            f"the state dict in {path} does not fit --arch {arch} ({'; '.join(first)[:200]})",
            "use the constructor the weights were trained with",
        ) from err
    del result
    return model


def _with_tied_keys(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` plus the names of tied tensors that it stores once (safetensors keeps one name per shared tensor)."""
    names: dict[int, list[str]] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        names.setdefault(id(tensor), []).append(name)
    state = dict(state)
    for tied in names.values():
        present = next((name for name in tied if name in state), None)
        for name in tied:
            if present is not None and name not in state:
                state[name] = state[present]
    return state


def load_model(path: str | os.PathLike, *, arch: str | None = None, trust_pickle: bool = False) -> LoadedModel:
    """Load a model file (pickled module, .pt2 program, or state dict/safetensors with ``arch``)."""
    path = Path(path)
    _check_readable(path)
    digest = file_sha256(path)
    kind = _archive_kind(path)

    if kind == "pt2":
        try:
            program = torch.export.load(str(path))
        except Exception as err:  # noqa: BLE001 - any deserialisation failure means a bad file
            raise _corrupt(path, err) from err
        example = None
        if getattr(program, "example_inputs", None) is not None:
            args, kwargs = program.example_inputs
            example = tuple(args) if not kwargs else None
        return LoadedModel(program.module(), "pt2", path, digest, program=program, example_inputs=example)

    if kind == "safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as err:
            raise SrcompressError("reading .safetensors needs the safetensors package", "pip install safetensors") from err
        try:
            state = load_file(str(path))
        except Exception as err:  # noqa: BLE001
            raise _corrupt(path, err) from err
        if not arch:
            raise SrcompressError(f"{path} holds only weights (a state dict)", "pass --arch module:callable that builds the model")
        return LoadedModel(_build_from_state_dict(state, arch, path), "state_dict", path, digest)

    if kind == "other" and not _starts_like_model(path):
        raise SrcompressError(f"{path} is not a model file (no torch.save or torch.export archive, safetensors or pickle inside)",
                              "give a file written by torch.save, torch.export.save or safetensors")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):
            raise _corrupt(path, err) from err
        module = _load_pickled_module(path, trust_pickle)
        notes = [f"loaded a pickled module from {path}: this ran code from the file"]
        return LoadedModel(_bake_pruning_state(module, notes), "pt", path, digest, notes=notes)
    except Exception as err:  # noqa: BLE001 - torch.load fails in many ways on damaged files
        raise _corrupt(path, err) from err

    if isinstance(obj, nn.Module):  # only reachable for allow-listed module classes
        notes: list[str] = []
        return LoadedModel(_bake_pruning_state(obj, notes), "pt", path, digest, notes=notes)
    state = _tensor_dict(obj)
    if state is None:
        raise SrcompressError(
            f"{path} holds a {type(obj).__name__}, not a model or a state dict",
            "save the model with torch.save(model), torch.export.save, or torch.save(model.state_dict())",
        )
    if not arch:
        raise SrcompressError(f"{path} holds only weights (a state dict)", "pass --arch module:callable that builds the model")
    return LoadedModel(_build_from_state_dict(state, arch, path), "state_dict", path, digest)


def _load_pickled_module(path: Path, trust_pickle: bool) -> nn.Module:
    trusted, why = _is_trusted_location(path)
    if not (trust_pickle or trusted):
        raise SrcompressError(
            f"{path} is a pickled module and loading it would run code from the file; {why}",
            "pass --trust-pickle if you trust its source, or give a .pt2 program or a state dict with --arch",
        )
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=False)
    except (AttributeError, ModuleNotFoundError) as err:
        raise SrcompressError(f"{path} is a pickled module whose class cannot be imported ({err})", _import_hint(err, path)) from err
    except Exception as err:  # noqa: BLE001
        raise _corrupt(path, err) from err
    if not isinstance(obj, nn.Module):
        raise SrcompressError(f"{path} holds a {type(obj).__name__}, not an nn.Module", "save the model itself with torch.save(model)")
    return obj


def _import_hint(err: Exception, path: Path) -> str:
    """How to make the class importable: a script's class cannot be; a module lying in the working folder or
    beside the model is not imported from there unless the user says so (it would run that folder's code)."""
    if "__main__" in str(err):
        return "the class was defined in a script (__main__): move it into a module and re-save, or save as .pt2 with torch.export.save"
    missing = getattr(err, "name", None)
    if missing:
        top = missing.split(".")[0]
        for folder in dict.fromkeys([Path.cwd(), path.resolve().parent]):
            if (folder / f"{top}.py").is_file() or (folder / top / "__init__.py").is_file():
                return f"{top} is in {folder}, which Python does not search here: run with PYTHONPATH={folder} if you trust its code"
    return "install the package that defines the model, or save it as .pt2 with torch.export.save"


def _bake_pruning_state(module: nn.Module, notes: list[str]) -> nn.Module:
    """Fold torch.nn.utils.prune masks and parametrizations into plain weights."""
    from torch.nn.utils import parametrize, prune

    for name, sub in module.named_modules():
        hooks = [h for h in sub._forward_pre_hooks.values() if isinstance(h, prune.BasePruningMethod)]
        for hook in hooks:
            prune.remove(sub, hook._tensor_name)
            notes.append(f"baked a torch.nn.utils.prune mask into {name or 'model'}.{hook._tensor_name}")
        if parametrize.is_parametrized(sub):
            for tensor_name in list(sub.parametrizations.keys()):
                parametrize.remove_parametrizations(sub, tensor_name, leave_parametrized=True)
                notes.append(f"baked the parametrization of {name or 'model'}.{tensor_name}")
    return module


def check_output_path(path: str | os.PathLike, *, force: bool, protected: tuple[Path, ...] = ()) -> Path:
    """Refuse to write over an input, into a missing folder, or over a file without ``force``."""
    path = Path(path)
    for other in protected:
        if other is not None and other.exists() and path.exists() and os.path.samefile(path, other):
            raise SrcompressError(f"output {path} is the input file", "choose another -o; srcompress never overwrites its input")
    if not path.parent.exists():
        raise SrcompressError(f"output folder {path.parent} does not exist", "create it or choose another -o")
    if path.is_dir():
        raise SrcompressError(f"output {path} is a directory", "give a file name with -o")
    if path.exists() and not force:
        raise SrcompressError(f"output {path} already exists", "pass --force to overwrite it or choose another -o")
    return path


_SUFFIX_FORMATS = {".pt2": "pt2", ".safetensors": "state_dict"}
_PICKLE_SUFFIXES = (".pt", ".pth")


def output_format(path: str | os.PathLike, fmt: str | None, input_format: str, from_program: bool = False) -> str:
    """The format to write: ``fmt``, else the one the file name implies (.pt2, .safetensors), else the input's.
    A name that contradicts the format (a .pt2 that is no torch.export program, a .pt that torch.load cannot read)
    is refused rather than written silently, and so is pickling a module read from a program (``from_program``)."""
    path = Path(path)
    implied = _SUFFIX_FORMATS.get(path.suffix)
    chosen = fmt or implied or input_format
    if chosen not in FORMATS:
        raise SrcompressError(f"unknown output format {chosen!r}", f"use one of {', '.join(FORMATS)}")
    if implied and chosen != implied:
        raise SrcompressError(f"output {path.name} names a {implied} file but --format is {chosen}",
                              f"drop --format, or name the output {path.stem}{_FORMAT_SUFFIX[chosen]}")
    if chosen == "pt2" and path.suffix in _PICKLE_SUFFIXES:
        raise SrcompressError(f"output {path.name} would hold a torch.export program, which torch.load cannot read",
                              f"name it {path.stem}.pt2, or pass --format pt (a pickled module) or --format state_dict")
    if chosen == "pt" and from_program:
        raise SrcompressError("a model read from a .pt2 program cannot be written as a pickled module (--format pt)",
                              f"write a program ({path.stem}.pt2) or its weights ({path.stem}.safetensors)")
    return chosen


_FORMAT_SUFFIX = {"pt": ".pt", "pt2": ".pt2", "state_dict": ".pt"}


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600 (and a writer may recreate it); the mode a plain open() gives
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _flat_output_view(module: nn.Module, inputs: tuple) -> nn.Module:
    """The module itself if it returns tensors; else a view of it (same parameters and names) returning a tuple."""
    out = run_model(module, inputs)
    if isinstance(out, torch.Tensor) or (isinstance(out, tuple) and all(isinstance(t, torch.Tensor) for t in out)):
        return module
    base = type(module)

    @functools.wraps(base.forward)  # keeps the signature, which torch.export matches inputs against
    def forward(self, *args, **kwargs):
        return tuple(flatten_outputs(base.forward(self, *args, **kwargs)))

    view = copy.copy(module)
    view.__class__ = type(f"Flat{base.__name__}", (base,), {"forward": forward})
    return view


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """All tensors in a model output (tensor, tuple, dict or Hugging Face ModelOutput), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        values = out.values()
    elif isinstance(out, (list, tuple)):
        values = out
    elif hasattr(out, "to_tuple"):
        values = out.to_tuple()
    else:
        return []
    return [t for v in values for t in flatten_outputs(v)]


def fixed_batch(program) -> int | None:
    """The batch size a torch.export program's first tensor input is fixed at (torch.export's default), or None
    if that dimension is dynamic."""
    from torch.export.graph_signature import InputKind

    placeholders = [node for node in program.graph.nodes if node.op == "placeholder"]
    for spec, node in zip(program.graph_signature.input_specs, placeholders):
        value = node.meta.get("val")
        if spec.kind == InputKind.USER_INPUT and isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0]) if isinstance(value.shape[0], int) else None
    return None


def export_program(module: nn.Module, example_inputs: tuple):
    """torch.export the model (outputs flattened to a tuple of tensors), leaving every dimension that can vary dynamic.

    The batch is doubled first so that a batch of one does not fix it; a model that only runs at its example batch
    (a program exported with a static batch) is exported at that batch.
    """
    from torch.export import Dim

    doubled = tuple(_at_least_batch_two(t) for t in example_inputs)
    attempts = [doubled] if all(a is b for a, b in zip(doubled, example_inputs)) else [doubled, example_inputs]
    for attempt, inputs in enumerate(attempts, 1):
        dynamic = tuple({d: Dim.AUTO for d in range(t.dim()) if t.shape[d] > 1} if isinstance(t, torch.Tensor) else None for t in inputs)
        try:
            return torch.export.export(_flat_output_view(module, inputs), inputs, dynamic_shapes=dynamic, strict=False)
        except Exception as err:  # noqa: BLE001 - report the tracer's reason
            if attempt < len(attempts):
                continue
            if isinstance(err, SrcompressError):
                raise
            reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
            raise SrcompressError(f"torch.export could not trace the model ({reason})", "save with --format pt or --format state_dict") from err


def _at_least_batch_two(t: Any) -> Any:
    if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == 1:
        return torch.cat([t, t], dim=0)
    return t


def save_model(
    loaded: LoadedModel,
    path: str | os.PathLike,
    fmt: str | None = None,
    *,
    example_inputs: tuple | None = None,
    force: bool = False,
    reuse_program: bool = True,
) -> Path:
    """Write the model atomically in ``fmt`` (default: the one the file name implies, else the input's)."""
    fmt = output_format(path, fmt, loaded.format, from_program=loaded.program is not None)
    path = check_output_path(path, force=force, protected=(loaded.path,) if loaded.path else ())
    module = loaded.module
    set_eval(module)
    with atomic_path(path) as tmp:  # saved through a handle: the archive's root is "archive", not the temp name
        if fmt == "pt":
            _save_through_handle(torch.save, module, tmp)
        elif fmt == "state_dict":
            state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
            if path.suffix == ".safetensors":
                from safetensors.torch import save_model as save_safetensors

                save_safetensors(module, str(tmp))
            else:
                _save_through_handle(torch.save, state, tmp)
        else:
            if loaded.program is not None and reuse_program:
                program = loaded.program  # its weights are the (pruned) parameters of ``module``
            else:
                inputs = example_inputs or loaded.example_inputs
                if inputs is None:
                    raise SrcompressError("saving as .pt2 needs an example input", "pass --input-shape")
                program = export_program(module, inputs)
            _save_through_handle(torch.export.save, program, tmp)
    return path


def _save_through_handle(save: Callable, obj: Any, path: Path) -> None:
    """``save(obj, handle)``: torch names an archive's root folder after the file, so writing to a temp name through
    a path would make every output differ; through a handle the root is always "archive" and equal runs are equal
    byte for byte."""
    with open(path, "wb") as handle:
        save(obj, handle)
