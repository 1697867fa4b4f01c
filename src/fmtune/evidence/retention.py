"""Retention of general knowledge: the same general-domain probe on the base and the fine-tuned encoder."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from fmtune.errors import DataError
from fmtune.packages import package_dir

DEFAULT_THRESHOLD = 0.10  # a relative drop beyond this is flagged in the report


def general_documents(path: Path | None) -> tuple[list[str], str]:
    """General-domain documents, one per line: --general-text FILE, or the Lee news corpus shipped in gensim."""
    if path is None:
        root = package_dir("gensim")
        if root is None:
            raise DataError("the default general text (Lee news corpus) comes with gensim. Fix: pip install --no-deps gensim, or pass --general-text FILE.")
        path = root / "test" / "test_data" / "lee_background.cor"
        source = "Lee news corpus (gensim test_data/lee_background.cor)"
    else:
        source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}). Fix: re-save the general text as UTF-8.") from None
    docs = [line.strip() for line in text.splitlines() if line.strip()]
    if len(docs) < 5:
        raise DataError(f"{path}: only {len(docs)} non-empty lines; the general text needs at least 5 documents, one per line.")
    return docs, source


def sentences_by_document(docs: list[str], max_sentences: int = 600, min_words: int = 6) -> tuple[list[str], np.ndarray]:
    """Sentences of at least `min_words` words from documents with at least 3 of them, with their document ids."""
    texts, owners = [], []
    per_doc = max(3, max_sentences // max(len(docs), 1) + 1)
    for d, doc in enumerate(docs):
        sents = [s.strip() for s in re.split(r"(?<=[.!?])\s+", doc) if len(s.split()) >= min_words]
        if len(sents) >= 3:
            sents = sents[:per_doc]
            texts.extend(sents)
            owners.extend([d] * len(sents))
    return texts[:max_sentences], np.asarray(owners[:max_sentences])


def same_document_recall(emb: np.ndarray, owners: np.ndarray) -> float:
    """Share of sentences whose nearest other sentence (cosine) comes from the same document."""
    sims = emb @ emb.T
    np.fill_diagonal(sims, -np.inf)
    return float((owners[sims.argmax(1)] == owners).mean())


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear centered kernel alignment between two representations of the same inputs (1 = same structure)."""
    x = x - x.mean(0)
    y = y - y.mean(0)
    num = np.linalg.norm(y.T @ x) ** 2
    return float(num / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def forgetting(relative_change: float, higher_is_better: bool = True) -> float:
    """The share of general knowledge the fine-tune lost, positive when it got worse, for every probe: a drop of a
    higher-is-better score (recall) or a rise of a lower-is-better one (perplexity)."""
    return -relative_change if higher_is_better else relative_change


def gate(retention_: dict, max_forgetting: float | None) -> dict:
    """The --max-forgetting gate: passed unless set and the probe lost more than it allows."""
    return {"max_forgetting": max_forgetting, "passed": max_forgetting is None or forgetting(retention_["relative_change"], retention_.get("higher_is_better", True)) <= max_forgetting}


def gate_failure(retention_: dict, max_forgetting: float, out) -> str:
    worse = "dropped" if retention_.get("higher_is_better", True) else "rose"
    return (f"retention: {retention_['probe']} {worse} {retention_['relative_change']:+.1%} ({retention_['base']:.3f} -> {retention_['fine_tuned']:.3f}), "
            f"past --max-forgetting {max_forgetting:.0%}. The run folder {out} is complete; the gate failed.")


def retention(base_emb: np.ndarray, tuned_emb: np.ndarray, owners: np.ndarray, source: str, max_forgetting: float | None) -> dict:
    base = same_document_recall(base_emb, owners)
    tuned = same_document_recall(tuned_emb, owners)
    rel = (tuned - base) / base if base > 0 else 0.0
    threshold = max_forgetting if max_forgetting is not None else DEFAULT_THRESHOLD
    flag = forgetting(rel) > threshold
    cka = linear_cka(base_emb, tuned_emb)
    explanation = (
        f"Probe: for {len(owners)} general-domain sentences ({source}), how often each sentence's nearest neighbour in the "
        f"model's embedding space comes from the same news article (recall@1). It measures whether the model still organises "
        f"general text by topic as the base model did. Base {base:.3f}, fine-tuned {tuned:.3f} ({rel:+.1%}). "
        f"Linear CKA between base and tuned representations of the same sentences: {cka:.3f} (1 = unchanged structure). "
        f"Worry when the relative drop passes {threshold:.0%}"
        + (" (your --max-forgetting gate)." if max_forgetting is not None else " (default warning threshold; set a hard gate with --max-forgetting).")
    )
    return {
        "probe": "same-article nearest-neighbour recall@1 on general news sentences",
        "base": base,
        "fine_tuned": tuned,
        "relative_change": rel,
        "higher_is_better": True,
        "flag": bool(flag),
        "threshold": threshold,
        "gate": max_forgetting,
        "explanation": explanation,
        "details": {"linear_cka": cka, "sentences": int(len(owners)), "documents": int(len(set(owners.tolist()))), "source": source},
    }
