"""Classification with a causal LM: each example is a chat (an instruction that names the task and the allowed labels,
then the text) whose answer is the label word. Prediction is constrained scoring: every label's answer is scored after
the prompt (summed token log-probabilities, the template's end-of-turn included) and the best one wins, so the model
never answers outside the label set and no free generation is needed.

Scoring shares the prompt: the tokens every (text, label) row starts with (the system turn, the instruction, few-shot
examples) run once; their key/value cache is reused by every batch, and only each text and label run per row.

The no-training rungs (the base model prompted) may be calibrated: summed label log-probabilities carry the model's prior
for each label word, which can make it answer one label for every text. Contextual calibration (Zhao et al. 2021,
"Calibrate Before Use") scores the labels after a few content-free texts in the same prompt and subtracts their mean
per-label log-probability; whether that helps is decided on the validation split (`choose_calibration`).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from fmtune.models import causal_lm
from fmtune.models.causal_lm import IGNORE, Encoded

PROMPT_FILE = "fmtune_label_prompt.json"  # in a run's model/ folder: how to prompt and score the tuned model
TASK = "Task: classify the text below. Answer with exactly one of these labels and nothing else"
SCORING = ("constrained scoring: each label's answer is scored after the prompt (sum of its token log-probabilities, "
           "end-of-turn included) and the highest-scoring label is the prediction")
CONTENT_FREE = ("N/A", "", "[MASK]")  # texts that say nothing: what the model answers for them is its label prior
CACHE_TOKENS_PER_BATCH = 8192  # rows x (shared prefix + row) tokens of key/value cache held at once while scoring


@dataclass(frozen=True)
class LabelPrompt:
    """How a text becomes a chat: the instruction lists the label words as they appear in the data (with their
    --label-descriptions, when given); the answer is the label word. Texts are cut to `max_text_tokens` tokens."""

    labels: tuple[str, ...]
    descriptions: dict[str, str] = field(default_factory=dict)
    max_text_tokens: int | None = None

    def instruction(self) -> str:
        if not any(self.descriptions.get(lab) for lab in self.labels):
            return f"{TASK}: {', '.join(self.labels)}."
        lines = [f"- {lab}: {self.descriptions[lab]}" if self.descriptions.get(lab) else f"- {lab}" for lab in self.labels]
        return f"{TASK}:\n" + "\n".join(lines)

    def messages(self, text: str, shots: list[tuple[str, str]] | tuple = ()) -> list[dict[str, str]]:
        """The chat for `text`; few-shot examples (text, label) come first as previous turns, the instruction once at the start."""
        turns: list[dict[str, str]] = []
        for i, (shot, label) in enumerate(shots):
            turns += [{"role": "user", "content": self._user(shot, i == 0)}, {"role": "assistant", "content": label}]
        return turns + [{"role": "user", "content": self._user(text, not shots)}]

    def _user(self, text: str, with_instruction: bool) -> str:
        return f"{self.instruction()}\n\nText: {text}" if with_instruction else f"Text: {text}"

    def to_dict(self) -> dict:
        return {"labels": list(self.labels), "descriptions": dict(self.descriptions), "max_text_tokens": self.max_text_tokens,
                "instruction": self.instruction(), "scoring": SCORING}

    @classmethod
    def from_dict(cls, d: dict) -> "LabelPrompt":
        return cls(tuple(d["labels"]), dict(d.get("descriptions") or {}), d.get("max_text_tokens"))

    def save(self, folder: Path) -> None:
        (Path(folder) / PROMPT_FILE).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> "LabelPrompt | None":
        path = Path(folder) / PROMPT_FILE
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else None


def cut(tokenizer, text: str, max_tokens: int | None) -> tuple[str, bool]:
    """The text cut to its first `max_tokens` tokens (decoded back to text); whether it was cut."""
    if max_tokens is None:
        return text, False
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text, False
    return tokenizer.decode(ids[:max_tokens], skip_special_tokens=True), True


def training_rows(tokenizer, prompt: LabelPrompt, texts: list[str], labels: list[str], weights: list[float] | None = None) -> list[Encoded]:
    """(prompt, label word) rows with the loss on the label tokens only, weighted per example when `weights` is given."""
    rows = [causal_lm.encode(tokenizer, prompt.messages(t), lab) for t, lab in zip(texts, labels)]
    if weights is not None:
        for r, w in zip(rows, weights):
            r.weight = float(w)
    return rows


def score_rows(model, rows: list[Encoded], pad_id: int, batch_size: int = 32, bf16: bool = False, progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Summed log-probability of each row's scored tokens (labels != IGNORE), in input order. The longest token prefix
    that every row shares (up to the token before the first scored one) runs once; its cache serves every batch."""
    import torch

    from fmtune.evidence.evaluate import autocast

    if not rows:
        return np.zeros(0)
    first_scored = min(next(i for i, t in enumerate(r.labels) if t != IGNORE) for r in rows)
    shared = min(causal_lm.common_prefix([r.input_ids for r in rows]), first_scored - 1)
    suffixes = [Encoded(r.input_ids[shared:], r.labels[shared:]) for r in rows] if shared > 0 else rows
    longest = max(len(r.input_ids) for r in suffixes)
    per_batch = max(1, min(batch_size, CACHE_TOKENS_PER_BATCH // (shared + longest))) if shared > 0 else batch_size
    device = next(model.parameters()).device
    order = np.argsort([len(r.input_ids) for r in suffixes], kind="stable")
    out = np.zeros(len(rows))
    model.eval()
    with torch.inference_mode(), autocast(device, bf16):
        prefix = None
        if shared > 0:
            prefix = causal_lm.prefix_cache(model, rows[0].input_ids[:shared])
        for start in range(0, len(order), per_batch):
            idx = order[start : start + per_batch]
            batch = {k: v.to(device) for k, v in causal_lm.collate([suffixes[i] for i in idx], pad_id).items()}
            past = None
            if prefix is not None:
                past = copy.deepcopy(prefix)
                past.batch_repeat_interleave(len(idx))
            sums, _ = causal_lm.token_losses(model, batch, past)
            out[idx] = -sums.float().cpu().numpy()
            if progress:
                progress(len(idx))
    return out


def label_scores(model, tokenizer, prompt: LabelPrompt, texts: list[str], shots: list[tuple[str, str]] | tuple = (), batch_size: int = 32,
                 bf16: bool = False, progress: Callable[[int], None] | None = None) -> np.ndarray:
    """(len(texts), len(labels)) summed log-probabilities of every label's answer after every text's prompt."""
    rows = [causal_lm.encode(tokenizer, prompt.messages(t, shots), lab) for t in texts for lab in prompt.labels]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    k = len(prompt.labels)
    tick = (lambda n: progress(n / k)) if progress else None
    return score_rows(model, rows, pad_id, batch_size, bf16, tick).reshape(len(texts), k)


def probabilities(scores: np.ndarray) -> np.ndarray:
    """Softmax over the label set of the summed label log-probabilities."""
    z = scores - scores.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def calibrate(scores: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Contextual calibration with a diagonal W on log-probabilities: each label's score minus its content-free score,
    i.e. each label's probability divided by its content-free probability."""
    return scores - prior[None, :]


@dataclass(frozen=True)
class Calibration:
    """Raw or calibrated scoring for one no-training rung, chosen on the validation split (ties keep raw)."""

    applied: bool
    prior: np.ndarray  # the content-free log-probability per label
    validation_raw: float | None  # macro-F1 on validation, raw and calibrated scores (None without validation examples)
    validation_calibrated: float | None
    why: str

    def apply(self, scores: np.ndarray) -> np.ndarray:
        return calibrate(scores, self.prior) if self.applied else scores

    def to_dict(self, labels: list[str] | tuple[str, ...]) -> dict:
        return {"applied": self.applied, "content_free_texts": list(CONTENT_FREE),
                "label_prior": {lab: round(float(p), 4) for lab, p in zip(labels, self.prior)},
                "validation_macro_f1": {"raw": _round(self.validation_raw), "calibrated": _round(self.validation_calibrated)}, "why": self.why}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def choose_calibration(validation_scores: np.ndarray, y_validation: np.ndarray, prior: np.ndarray) -> Calibration:
    """Calibrated when it scores a higher macro-F1 than raw on the validation split; raw on a tie or without validation
    examples. The test split plays no part."""
    from fmtune.evidence.evaluate import macro_f1

    k = len(prior)
    if len(y_validation) == 0:
        return Calibration(False, prior, None, None, "raw: no validation examples to decide whether calibration helps")
    raw = macro_f1(y_validation, validation_scores.argmax(1), k)
    cal = macro_f1(y_validation, calibrate(validation_scores, prior).argmax(1), k)
    numbers = f"validation macro-F1 {cal:.3f} calibrated vs {raw:.3f} raw"
    if cal > raw:
        return Calibration(True, prior, raw, cal, f"calibrated: content-free label prior removed ({numbers})")
    return Calibration(False, prior, raw, cal, f"raw: calibration did not help on validation ({numbers}{'; a tie keeps raw' if cal == raw else ''})")


def fit_calibration(model, tokenizer, prompt: LabelPrompt, shots: list[tuple[str, str]] | tuple, validation_texts: list[str], y_validation: np.ndarray,
                    batch_size: int = 32, bf16: bool = False, progress: Callable[[int], None] | None = None) -> Calibration:
    """Scores the CONTENT_FREE texts and the validation texts in one shared-prefix pass (same prompt, same shots); the
    content-free mean per label is the prior, and choose_calibration picks raw or calibrated on validation."""
    n = len(CONTENT_FREE)
    scores = label_scores(model, tokenizer, prompt, list(CONTENT_FREE) + list(validation_texts), shots, batch_size, bf16, progress)
    return choose_calibration(scores[n:], np.asarray(y_validation), scores[:n].mean(0))


def choose_shots(tokenizer, prompt: LabelPrompt, train_texts: list[str], y_train: np.ndarray, test_texts: list[str], k: int, budget: int,
                 seed: int) -> tuple[list[tuple[str, str]], int, str]:
    """Up to k seeded random training examples per class, classes interleaved (no run of one class right before the
    question); fewer per class while the prompt of the longest of `test_texts` (every text the shots will be scored with),
    with them and the longest label, exceeds `budget` tokens. Returns (shots, per class, why)."""
    rng = np.random.default_rng(seed + 2)
    per_class = [rng.permutation(np.flatnonzero(y_train == c))[:k] for c in range(len(prompt.labels))]
    longest_text = max(test_texts, key=len) if test_texts else ""
    longest_label = max(prompt.labels, key=len)

    def pick(n: int) -> list[tuple[str, str]]:
        return [(train_texts[idx[j]], prompt.labels[c]) for j in range(n) for c, idx in enumerate(per_class) if j < len(idx)]

    def fits(n: int) -> bool:
        return len(causal_lm.encode(tokenizer, prompt.messages(longest_text, pick(n)), longest_label).input_ids) <= budget

    available = min(k, max((len(idx) for idx in per_class), default=0))
    n = available
    while n > 0 and not fits(n):
        n -= 1
    shots = pick(n)
    why = f"{n} training examples per class ({len(shots)} in all) as previous chat turns, classes interleaved (--few-shot-k {k})"
    if n < available:
        why += f"; {n} per class is what fits the model's context of {budget} tokens with the longest text it is scored with"
    short = [prompt.labels[c] for c, idx in enumerate(per_class) if len(idx) < n]
    if short:
        why += f"; fewer for {', '.join(short)}, which have fewer than {n} training examples"
    return shots, n, why


def request_seconds(model, tokenizer, prompt: LabelPrompt, texts: list[str], shots: list[tuple[str, str]] | tuple, bf16: bool) -> dict:
    """Wall time of one classification request at batch 1 (every label scored), per text, after a warm-up; the same
    shape as fmtune.models.causal_lm.request_seconds so that fmtune.evidence.verdict.break_even reads it."""
    label_scores(model, tokenizer, prompt, texts[:1], shots, 1, bf16)
    times = []
    for t in texts:
        start = time.perf_counter()
        label_scores(model, tokenizer, prompt, [t], shots, len(prompt.labels), bf16)
        times.append(time.perf_counter() - start)
    lengths = [len(causal_lm.prompt_ids(tokenizer, prompt.messages(t, shots))) for t in texts]
    return {"p50_s": float(np.percentile(times, 50)), "mean_s": float(np.mean(times)), "requests": len(times), "mean_prompt_tokens": float(np.mean(lengths))}
