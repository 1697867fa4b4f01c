"""Learning curve: fit 1 - metric = a * n^(-b) to nested-subset results and forecast more data, with uncertainty."""

from __future__ import annotations

import numpy as np


def nested_subsets(y: np.ndarray, fractions: list[float], seed: int) -> dict[float, np.ndarray]:
    """Stratified nested subsets: each smaller subset is contained in the larger ones; every class keeps >= 1 example."""
    rng = np.random.default_rng(seed + 1)
    per_class = {c: rng.permutation(np.flatnonzero(y == c)) for c in np.unique(y)}
    out = {}
    for f in sorted(fractions):
        parts = [idx[: max(1, int(round(f * len(idx))))] for idx in per_class.values()]
        out[f] = np.sort(np.concatenate(parts))
    return out


def _fit(n: np.ndarray, metric: np.ndarray) -> tuple[float, float]:
    err = np.clip(1.0 - metric, 1e-4, None)
    slope, intercept = np.polyfit(np.log(n), np.log(err), 1)
    return float(np.exp(intercept)), float(-slope)


def _predict(a: float, b: float, n: float) -> float:
    return float(1.0 - a * n ** (-b))


def forecast(points: list[dict], boots: list[np.ndarray], target: float | None) -> dict:
    """Power-law fit of the points; the interval comes from refitting on bootstrap resamples of every point's metric."""
    n = np.array([p["train_examples"] for p in points], dtype=float)
    m = np.array([p["metric"] for p in points], dtype=float)
    if len(points) < 3 or len(set(n.tolist())) < 3:
        return {"skipped": "fewer than 3 distinct subset sizes: no curve fitted"}
    a, b = _fit(n, m)
    n2 = 2 * n.max()
    draws = np.stack(boots, 1)  # (resamples, points)
    fits = [_fit(n, row) for row in draws]
    at2 = np.array([_predict(fa, fb, n2) for fa, fb in fits])
    result = {
        "model": "1 - metric = a * n^(-b), least squares in log-log space",
        "params": {"a": a, "b": b},
        "at_2x": {"train_examples": int(n2), "metric": _predict(a, b, n2), "interval": [float(np.percentile(at2, 5)), float(np.percentile(at2, 95))], "interval_level": 0.9},
        "expected_gain_at_2x": _predict(a, b, n2) - float(m[np.argmax(n)]),
    }
    if b <= 0:
        result["note"] = "the metric does not improve with more data in these points: more data is not forecast to help"
    if target is not None:
        if b > 0 and 1 - target > 0:
            need = (a / (1 - target)) ** (1 / b)
            result["target"] = {"metric": target, "train_examples": int(np.ceil(need)), "reachable": bool(need < 1e7), "already_met": bool(m[np.argmax(n)] >= target)}
        else:
            result["target"] = {"metric": target, "train_examples": None, "reachable": False, "already_met": bool(m[np.argmax(n)] >= target)}
    return result
