"""Example inputs: parse ``--input-shape``, guess one when it is not given, and run the model on it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .errors import SrcompressError

DTYPES = {"float32": torch.float32, "float": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "int64": torch.int64, "long": torch.int64, "int32": torch.int32}
_SPATIAL_GUESSES = (224, 32, 28, 64, 96, 128, 256, 299, 512)


def parse_input_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise SrcompressError(f"--input-shape {text!r} is not a list of positive integers", "write it like 1,3,224,224")
    return shape


def make_input(shape: tuple[int, ...], dtype: str = "float32", *, vocab: int | None = None, seed: int = 0) -> torch.Tensor:
    if dtype not in DTYPES:
        raise SrcompressError(f"--input-dtype {dtype!r} is not supported", f"use one of {', '.join(DTYPES)}")
    gen = torch.Generator().manual_seed(seed)
    torch_dtype = DTYPES[dtype]
    if torch_dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(torch_dtype)
    return torch.randint(0, vocab or 100, shape, generator=gen, dtype=torch_dtype)


def set_eval(model: nn.Module) -> nn.Module:
    """Eval mode; modules unlifted from a torch.export program are fixed in the mode they were exported in."""
    try:
        model.eval()
    except NotImplementedError:
        pass
    return model


INPUT_FIX = "pass --input-shape (and --input-dtype) that the model accepts"


def run_model(model: nn.Module, inputs: tuple, what: str = "an example input", fix: str = INPUT_FIX,
              subject: str = "the model") -> Any:
    """Run the model in eval mode without gradients; a failure becomes a one-line error about ``what`` was given."""
    set_eval(model)
    try:
        with torch.no_grad():
            return model(*inputs)
    except Exception as err:  # noqa: BLE001 - any failure means the input does not fit
        shapes = ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in inputs if isinstance(t, torch.Tensor))
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        if isinstance(err, TypeError) and "argument" in reason and fix == INPUT_FIX:
            fix = "pass one --input-shape per input of the model, e.g. --input-shape '1,20;1,8'"
        raise SrcompressError(f"{subject} cannot run on {what} of shape {shapes} ({reason})", fix) from err


def _first_layer(model: nn.Module) -> nn.Module | None:
    return next((m for m in model.modules() if isinstance(m, (nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))), None)


def with_attention_mask(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Token ids, plus an all-ones attention mask when the model's second input is one (Hugging Face encoders): the
    mask then stays an input of every export, so padded batches are served correctly."""
    import inspect

    try:
        params = [p.name for p in inspect.signature(model.forward).parameters.values()]
    except (TypeError, ValueError):
        params = []
    if ids.is_floating_point() or params[1:2] != ["attention_mask"]:
        return (ids,)
    return ids, torch.ones_like(ids)


def guess_example_inputs(model: nn.Module) -> tuple[torch.Tensor, ...]:
    """An input the model accepts, guessed from its first layer; raises if no guess runs."""
    first = _first_layer(model)
    if isinstance(first, nn.Embedding):
        candidates = [make_input((1, 16), "int64", vocab=first.num_embeddings)]
    elif isinstance(first, nn.Conv2d):
        candidates = [torch.randn(1, first.in_channels, s, s, generator=torch.Generator().manual_seed(0)) for s in _SPATIAL_GUESSES]
    elif isinstance(first, nn.Conv1d):
        candidates = [torch.randn(1, first.in_channels, s, generator=torch.Generator().manual_seed(0)) for s in (128, 256, 1024)]
    elif isinstance(first, nn.Conv3d):
        candidates = [torch.randn(1, first.in_channels, 16, 112, 112, generator=torch.Generator().manual_seed(0))]
    elif isinstance(first, nn.Linear):
        candidates = [torch.randn(1, first.in_features, generator=torch.Generator().manual_seed(0))]
    else:
        candidates = []
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    for candidate in candidates:
        inputs = with_attention_mask(model, candidate.to(dtype) if candidate.is_floating_point() else candidate)
        try:
            run_model(model, inputs)
            return inputs
        except SrcompressError:
            continue
    if hasattr(model, "encode") and hasattr(model, "tokenize"):  # a sentence-transformers pipeline takes a dict of features
        raise SrcompressError(f"{type(model).__name__} wraps its transformer in a pipeline that takes a dict of features",
                              "prune the transformer itself: torch.save(model[0].auto_model, path), then pass that file")
    raise SrcompressError("could not guess an input the model accepts", "pass --input-shape (and --input-dtype int64 for token ids)")


def resolve_example_inputs(model: nn.Module, input_shape: str | None, input_dtype: str | None,
                           known: tuple | None = None) -> tuple[tuple, str]:
    """The example input to use and where it came from ('given', 'stored' or 'guessed')."""
    if input_dtype and not input_shape:
        raise SrcompressError(f"--input-dtype {input_dtype} needs --input-shape", "pass both, e.g. --input-shape 1,128 --input-dtype int64")
    if input_shape:
        first = _first_layer(model)
        vocab = first.num_embeddings if isinstance(first, nn.Embedding) else None
        shapes = [parse_input_shape(part) for part in input_shape.split(";")]
        dtypes = input_dtype.split(";") if input_dtype else ["int64" if vocab else "float32"]
        if len(dtypes) == 1:
            dtypes *= len(shapes)
        if len(dtypes) != len(shapes):
            raise SrcompressError(f"--input-dtype {input_dtype!r} gives {len(dtypes)} dtypes for {len(shapes)} input shapes",
                                  "give one dtype, or one per shape: --input-dtype 'int64;float32'")
        if len(shapes) == 1:
            inputs = with_attention_mask(model, make_input(shapes[0], dtypes[0], vocab=vocab))
        else:
            inputs = tuple(make_input(shape, dtype, vocab=vocab, seed=i) for i, (shape, dtype) in enumerate(zip(shapes, dtypes)))
        run_model(model, inputs)
        return inputs, "given"
    if known is not None:
        single = tuple(t[:1] if isinstance(t, torch.Tensor) and t.dim() > 0 else t for t in known)
        try:
            run_model(model, single)
            return single, "stored"
        except SrcompressError:
            run_model(model, known)
            return known, "stored"
    return guess_example_inputs(model), "guessed"
