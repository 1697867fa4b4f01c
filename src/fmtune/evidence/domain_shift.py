"""Domain shift: how far the task texts are from general text, as the base model sees them."""

from __future__ import annotations

import numpy as np


def domain_shift(task_emb: np.ndarray, general_emb: np.ndarray, seed: int) -> dict:
    """Two-sample classifier test: cross-validated AUC of telling task from general text on base-model embeddings."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    rng = np.random.default_rng(seed)
    n = min(len(task_emb), len(general_emb), 1000)
    a = task_emb[rng.permutation(len(task_emb))[:n]]
    b = general_emb[rng.permutation(len(general_emb))[:n]]
    x = np.vstack([a, b])
    y = np.r_[np.ones(n), np.zeros(n)]
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    scores = cross_val_predict(LogisticRegression(C=1.0, max_iter=2000), x, y, cv=folds, method="predict_proba")[:, 1]
    auc = float(roc_auc_score(y, scores))
    ca, cb = a.mean(0), b.mean(0)
    centroid = float(1 - ca @ cb / (np.linalg.norm(ca) * np.linalg.norm(cb)))
    coverage = float((a @ b.T).max(1).mean())
    if auc < 0.7:
        words = "close to general text: the base model already sees this kind of text; fine-tuning gains may come mostly from learning the labels"
    elif auc < 0.9:
        words = "moderately different from general text: fine-tuning is likely to help"
    else:
        words = "far from general text: the task's texts are easy to tell apart from general text, so fine-tuning is expected to help most"
    return {
        "method": "two-sample classifier test: 5-fold cross-validated ROC AUC of a logistic regression telling task texts from general text on base-model embeddings (0.5 = indistinguishable, 1.0 = fully separable)",
        "score": auc,
        "interpretation": f"AUC {auc:.2f}: {words}.",
        "details": {"samples_per_side": int(n), "centroid_cosine_distance": centroid, "mean_nearest_general_similarity": coverage},
    }
