"""``manifest.json``: what a bundle holds, validated against ``manifest.schema.json`` (shipped in the package)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from ..errors import SrcompressError
from ..io import file_sha256

SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")
MANIFEST = "manifest.json"


@lru_cache(maxsize=1)
def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def validate(manifest: dict) -> None:
    """Raise SrcompressError naming the first schema violation."""
    try:
        import jsonschema
    except ImportError as err:
        raise SrcompressError("validating a manifest needs jsonschema", 'pip install "srcompress[onnx]"') from err
    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(manifest), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        where = "/".join(str(p) for p in first.absolute_path) or "(top level)"
        raise SrcompressError(f"manifest.json does not match the schema at {where}: {first.message[:160]}",
                              "re-export the bundle with srcompress export")


def file_table(folder: Path, names: list[str]) -> dict[str, dict]:
    return {name: {"sha256": file_sha256(folder / name), "bytes": (folder / name).stat().st_size} for name in sorted(set(names))}


def write(folder: Path, manifest: dict) -> Path:
    validate(manifest)
    path = folder / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def load_and_verify(folder: Path) -> dict:
    """The bundle's manifest after checking the schema and every file's size and SHA-256."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SrcompressError(f"bundle {folder} is not a folder", "give the folder written by srcompress export")
    path = folder / MANIFEST
    if not path.is_file():
        raise SrcompressError(f"{folder} has no manifest.json", "give the folder written by srcompress export")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SrcompressError(f"{path} is not valid JSON ({err})", "re-export the bundle") from err
    validate(manifest)
    for name, entry in manifest["files"].items():
        file = folder / name
        if not file.is_file():
            raise SrcompressError(f"bundle file {name} listed in manifest.json is missing", "re-export or re-copy the bundle")
        if file.stat().st_size != entry["bytes"] or file_sha256(file) != entry["sha256"]:
            raise SrcompressError(f"bundle file {name} does not match its SHA-256 in manifest.json (corrupt or from another export)",
                                  "re-export or re-copy the bundle")
    for artifact in manifest["artifacts"]:
        if artifact["file"] not in manifest["files"]:
            raise SrcompressError(f"artifact {artifact['file']} is not in the manifest's file table", "re-export the bundle")
    return manifest
