"""srcompress: turn a trained PyTorch model into a smaller, faster model you can ship.

Python API (imported lazily, so ``srcompress --version`` stays fast)::

    from srcompress import MaskSpec, Pattern, load_model, prune_model, save_model
"""

__version__ = "0.1.0"

_API = {
    "MaskSpec": "srcompress.compress.masks",
    "Pattern": "srcompress.compress.patterns",
    "prune_model": "srcompress.pipeline",
    "load_model": "srcompress.io",
    "save_model": "srcompress.io",
    "SrcompressError": "srcompress.errors",
}


def __getattr__(name):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'srcompress' has no attribute {name!r}")
