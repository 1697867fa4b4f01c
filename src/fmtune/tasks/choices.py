"""Choices and rows shared by the task kinds: the max length from the training texts' token lengths, the primary
metric of classification (--metric), and a classification rung's report row with its bootstrap draws."""

from __future__ import annotations

import numpy as np

from fmtune.config import RunConfig
from fmtune.errors import ConfigError

PRIMARY = "macro_f1"  # the default primary metric of classification (--metric)


def classification_primary(cfg: RunConfig) -> str:
    """The metric the ladder, learning curve and verdict of a classification run are decided on (--metric)."""
    from fmtune.evidence.evaluate import CLASSIFICATION_METRICS

    metric = cfg.eval.metric or PRIMARY
    if metric not in CLASSIFICATION_METRICS:
        raise ConfigError(f"--metric {metric}: not a classification metric; choose one of {', '.join(CLASSIFICATION_METRICS)} (default {PRIMARY}).")
    return metric


def choose_max_length(train_lengths: list[int], model_limit: int, given: int | None) -> tuple[int, str]:
    """Max tokens per text: given, or the 99th percentile of training lengths rounded up to 8, capped by the model."""
    truncated = lambda m: sum(1 for n in train_lengths if n > m)  # noqa: E731
    if given is not None:
        m = min(given, model_limit)
        return m, f"set with --max-length {given}" + (f", capped at the model's limit {model_limit}" if given > model_limit else "") + f"; {truncated(m)} training texts truncated"
    p99 = int(np.percentile(train_lengths, 99))
    m = max(16, min(model_limit, int(np.ceil(p99 / 8) * 8)))
    why = f"99th percentile of training token lengths ({p99}) rounded up to a multiple of 8"
    if p99 > model_limit:
        why += f", capped at the model's limit {model_limit} (long texts: consider chunking)"
    return m, f"{why}; {truncated(m)} of {len(train_lengths)} training texts ({truncated(m) / max(len(train_lengths), 1):.1%}) truncated"


def classification_rung(name: str, description: str, y_true, y_pred, labels, boot, train_examples: int, train_seconds: float, primary: str = PRIMARY, **extra) -> tuple[dict, np.ndarray]:
    from fmtune.evidence.evaluate import classification_metrics

    m = classification_metrics(np.asarray(y_true), np.asarray(y_pred), labels, boot, primary)
    boot_primary = m.pop("_boot_primary")
    row = {"name": name, "description": description, **m, "train_examples": int(train_examples), "train_seconds": round(float(train_seconds), 3), **extra}
    return row, boot_primary
