"""No-fine-tuning rungs of the ladder, all on frozen base-model embeddings.

Each rung has the same shape: it takes the embedded splits and returns test predictions, the number of labeled examples it
learned from, the seconds that learning took, and a one-line description.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass
class Embedded:
    """Base-model embeddings of every split (L2-normalised), the labels, and the embedding cost per text."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    y_train: np.ndarray
    y_validation: np.ndarray
    labels: list[str]
    label_texts: list[str]  # what zero-shot compares against (descriptions or label names)
    label_embeddings: np.ndarray
    seconds_per_text: float
    seed: int
    few_shot_k: int


@dataclass
class RungOutput:
    predictions: np.ndarray
    train_examples: int
    train_seconds: float
    description: str


def zero_shot(e: Embedded) -> RungOutput:
    """Nearest label description by cosine similarity: the base FM with no labeled examples."""
    pred = (e.test @ e.label_embeddings.T).argmax(1)
    source = "label descriptions" if e.label_texts != e.labels else "label names"
    return RungOutput(pred, 0, 0.0, f"base FM, no labeled examples: cosine similarity of each text's embedding to the {source}")


def _logistic(x: np.ndarray, y: np.ndarray, c: float, seed: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=2000, class_weight="balanced", random_state=seed).fit(x, y)


def few_shot_indices(y: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k training examples per class (all of a class that has fewer), seeded."""
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(y == c))[:k] for c in np.unique(y)]
    return np.sort(np.concatenate(picks))


def few_shot(e: Embedded) -> RungOutput:
    """A linear classifier on frozen embeddings of k examples per class."""
    idx = few_shot_indices(e.y_train, e.few_shot_k, e.seed)
    start = time.perf_counter()
    clf = _logistic(e.train[idx], e.y_train[idx], 1.0, e.seed)
    seconds = time.perf_counter() - start + e.seconds_per_text * len(idx)
    return RungOutput(clf.predict(e.test), len(idx), seconds, f"base FM frozen + logistic regression on {e.few_shot_k} labeled examples per class")


def head_only(e: Embedded) -> RungOutput:
    """Frozen FM + a linear head on all training data; the regularisation strength is picked on validation."""
    from fmtune.evidence.evaluate import macro_f1

    start = time.perf_counter()
    k = len(e.labels)
    best = max(
        (macro_f1(e.y_validation, _logistic(e.train, e.y_train, c, e.seed).predict(e.validation), k), c) for c in (0.1, 1.0, 10.0)
    )
    clf = _logistic(e.train, e.y_train, best[1], e.seed)
    seconds = time.perf_counter() - start + e.seconds_per_text * len(e.y_train)
    return RungOutput(clf.predict(e.test), len(e.y_train), seconds, f"base FM frozen + logistic regression head on all training data (C={best[1]:g} chosen on validation)")


BASELINES: dict[str, Callable[[Embedded], RungOutput]] = {"zero_shot": zero_shot, "few_shot": few_shot, "head_only": head_only}
