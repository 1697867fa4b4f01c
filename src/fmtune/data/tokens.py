"""Tokenise once, cached by content hash.

A run tokenises every text once, without truncation (the audit needs the true lengths), and derives the truncated ids
the model trains on from those: a text that fits `max_length` keeps its ids; only the texts over it (about 1% with the
derived max length) are tokenised again with the tokenizer's own truncation, so special tokens and the truncation side
are the tokenizer's. The untruncated ids are cached as safetensors under the fmtune cache (`FMTUNE_CACHE`), keyed by
the sha256 of the tokenizer's full serialisation and of the texts, so a re-run, a resumed run or another run on the
same data reads them back instead of tokenising again; a changed text or tokenizer is a different key, never a stale hit.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VERSION = "1"  # bump when the stored layout changes


@dataclass(frozen=True)
class Tokenised:
    ids: list[list[int]]  # untruncated, special tokens included
    key: str  # the cache key (sha256 of tokenizer + texts)
    source: str  # "cache" (read back), "tokenised" (and written to the cache) or "tokenised, not cached"
    seconds: float

    @property
    def lengths(self) -> list[int]:
        return [len(r) for r in self.ids]


def fingerprint(tokenizer) -> str:
    """sha256 of what decides a tokenizer's output: its class, its full serialisation (normaliser, pre-tokeniser, vocabulary,
    merges, post-processor) where it has one, else its vocabulary and special tokens."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        import json

        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)  # call state: the last call's truncation/padding settings, not the tokenizer
        spec.pop("padding", None)
        h.update(json.dumps(spec, sort_keys=True).encode())
    else:
        h.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr(getattr(tokenizer, "special_tokens_map", {})).encode())
    h.update(repr(getattr(tokenizer, "truncation_side", "right")).encode())
    return h.hexdigest()


def texts_hash(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def cache_key(tokenizer, texts: list[str]) -> str:
    return hashlib.sha256(f"{VERSION}:{fingerprint(tokenizer)}:{texts_hash(texts)}:{len(texts)}".encode()).hexdigest()


def default_cache() -> Path:
    from fmtune.data.quickstart import cache_dir

    return cache_dir() / "tokens"


def _read(path: Path, n: int) -> list[list[int]] | None:
    from safetensors.numpy import load_file

    try:
        stored = load_file(str(path))
        flat, offsets = stored["ids"], stored["offsets"]
    except Exception:  # a damaged or foreign file is a miss, never an error: it is rewritten below
        return None
    if len(offsets) != n + 1 or int(offsets[-1]) != len(flat):
        return None
    flat = flat.tolist()
    return [flat[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]


def _write(path: Path, ids: list[list[int]]) -> bool:
    from safetensors.numpy import save_file

    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in ids], out=offsets[1:])
    flat = np.fromiter((t for r in ids for t in r), dtype=np.int64, count=int(offsets[-1]))
    dtype = np.int32 if flat.size == 0 or flat.max() < 2**31 else np.int64
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        save_file({"ids": flat.astype(dtype), "offsets": offsets}, str(tmp))
        os.replace(tmp, path)
        return True
    except OSError:  # a read-only or full cache never stops a run
        return False


def tokenise(tokenizer, texts: list[str], cache: Path | None = None, use_cache: bool = True) -> Tokenised:
    """Untruncated ids (special tokens included) of `texts`, read from the cache when the same tokenizer saw the same
    texts before; otherwise tokenised in one batched call and written to the cache."""
    import time

    start = time.perf_counter()
    key = cache_key(tokenizer, texts) if use_cache else ""
    path = (cache or default_cache()) / f"{key}.safetensors" if use_cache else None
    if path is not None and path.is_file():
        ids = _read(path, len(texts))
        if ids is not None:
            return Tokenised(ids, key, "cache", time.perf_counter() - start)
    # untruncated on purpose (the lengths choose max_length; `truncate` cuts), so transformers' "longer than the maximum
    # sequence length ... indexing errors" warning would be a false alarm
    warned = getattr(tokenizer, "deprecation_warnings", None)
    if isinstance(warned, dict):
        warned["sequence-length-is-longer-than-the-specified-maximum"] = True
    ids = tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"] if texts else []
    written = path is not None and _write(path, ids)
    return Tokenised(ids, key, "tokenised" if written else "tokenised, not cached", time.perf_counter() - start)


def truncate(tokenizer, texts: list[str], ids: list[list[int]], max_length: int) -> list[list[int]]:
    """The ids the tokenizer gives with truncation to `max_length`: unchanged for texts that fit, tokenised again with
    truncation for the texts that do not."""
    long = [i for i, r in enumerate(ids) if len(r) > max_length]
    if not long:
        return ids
    cut = tokenizer([texts[i] for i in long], add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    out = list(ids)
    for i, r in zip(long, cut):
        out[i] = r
    return out
