"""Generation metrics on normalised text: exact match, token F1, ROUGE-L (LCS F1); loss/perplexity; bootstrap CIs.

Normalisation is the SQuAD recipe: lowercase, punctuation removed, articles (a, an, the) removed, whitespace collapsed.
"""

from __future__ import annotations

import re
import string
from collections import Counter

import numpy as np

TEXT_METRICS = ("rouge_l", "token_f1", "exact_match")  # higher is better, in [0, 1]; any of them can be the primary metric
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalise(text: str) -> str:
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalise(prediction) == normalise(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalise(prediction).split(), normalise(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row at a time)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (beta = 1) on normalised tokens."""
    pred, ref = normalise(prediction).split(), normalise(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def per_example(predictions: list[str], references: list[str]) -> dict[str, np.ndarray]:
    fns = {"rouge_l": rouge_l, "token_f1": token_f1, "exact_match": exact_match}
    return {name: np.array([fns[name](p, r) for p, r in zip(predictions, references)], dtype=float) for name in TEXT_METRICS}


def _ci(boot_values: np.ndarray) -> list[float]:
    return [float(np.percentile(boot_values, 2.5)), float(np.percentile(boot_values, 97.5))]


def generation_metrics(predictions: list[str], references: list[str], nll: np.ndarray | None, boot: np.ndarray, primary: str) -> dict:
    """Mean text metrics and, when the references' per-example mean token NLL is given, loss and perplexity (exp of the
    loss); 95% bootstrap CIs over test examples from the shared resamples `boot` (the primary metric's resampled means are
    returned under _boot_primary for paired comparisons)."""
    scores = per_example(predictions, references)
    metrics = {name: float(v.mean()) for name, v in scores.items()}
    boots = {name: v[boot].mean(1) for name, v in scores.items()}
    ci95 = {name: _ci(b) for name, b in boots.items()}
    if nll is not None:
        nll = np.asarray(nll, dtype=float)
        metrics["loss"] = float(nll.mean())
        metrics["perplexity"] = float(np.exp(nll.mean()))
        lo, hi = _ci(nll[boot].mean(1))
        ci95["loss"] = [lo, hi]
        ci95["perplexity"] = [float(np.exp(lo)), float(np.exp(hi))]
    return {"metrics": metrics, "ci95": ci95, "_boot_primary": boots[primary]}
