"""Predictions with a run's fine-tuned model (used by `fmtune predict` and `fmtune serve`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fmtune.errors import FmtuneError


@dataclass
class Predictor:
    """A run's tuned classifier, ready for batched, length-sorted, no-grad inference."""

    run_dir: Path
    model: Any
    tokenizer: Any
    labels: list[str]
    max_length: int
    bf16: bool
    report: dict = field(default_factory=dict)
    label_prompt: Any = None  # a causal-LM classifier: its fmtune.models.lm_classify.LabelPrompt (labels are scored as answers)

    @classmethod
    def from_run(cls, run_dir: Path | str, bf16: bool | None = None) -> "Predictor":
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from fmtune.models.loading import bf16_supported, check_safe_folder

        run_dir = Path(run_dir)
        model_dir = run_dir / "model"
        if not model_dir.is_dir():
            raise FmtuneError(f"{run_dir}: no model/ folder here. Is this a finished fmtune run folder? (see `fmtune runs list`)")
        check_safe_folder(model_dir)
        report_path = run_dir / "report.json"
        report = json.loads(report_path.read_text()) if report_path.is_file() else {}
        if report.get("task", {}).get("type", "classification") != "classification":
            raise FmtuneError(f"{run_dir}: this run is a {report['task']['type']} run, not a classifier; load it with "
                              "fmtune.serving.predict.load_predictor (or `fmtune predict RUN --prompt ...`).")
        use_bf16 = bf16_supported(torch.device("cpu")) if bf16 is None else bf16
        from fmtune.models.lm_classify import LabelPrompt

        prompt = LabelPrompt.load(model_dir)
        if prompt is not None:  # a causal LM fine-tuned to answer with the label word
            from fmtune.models import causal_lm

            model = causal_lm.load_model(model_dir)
            model.eval()
            return cls(run_dir, model, causal_lm.load_tokenizer(model_dir), list(prompt.labels), prompt.max_text_tokens, use_bf16, report, prompt)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, local_files_only=True, trust_remote_code=False, use_safetensors=True
        )
        model.eval()
        id2label = model.config.id2label
        labels = [id2label[i] for i in range(len(id2label))]
        max_length = int(report.get("base_model", {}).get("max_length") or min(tokenizer.model_max_length, 512))
        return cls(run_dir, model, tokenizer, labels, max_length, use_bf16, report)

    def label_scores(self, texts: list[str], batch_size: int = 64):
        """Causal-LM classifiers: summed log-probability of every label's answer, shape (len(texts), len(labels))."""
        from fmtune.models import lm_classify

        cut = [lm_classify.cut(self.tokenizer, t, self.max_length)[0] for t in texts]
        return lm_classify.label_scores(self.model, self.tokenizer, self.label_prompt, cut, (), batch_size, self.bf16)

    def predict_proba(self, texts: list[str], batch_size: int = 64):
        """Class probabilities, shape (len(texts), len(labels)), in the input order."""
        import torch

        from fmtune.evidence.evaluate import predict_logits

        if self.label_prompt is not None:
            from fmtune.models.lm_classify import probabilities

            return probabilities(self.label_scores(texts, batch_size))
        logits = predict_logits(self.model, self.tokenizer, texts, self.max_length, batch_size=batch_size, bf16=self.bf16)
        return torch.softmax(torch.as_tensor(logits, dtype=torch.float32), dim=-1).numpy()

    def predict(self, texts: list[str], batch_size: int = 64) -> list[dict]:
        """One {"label", "probabilities"} per text, in the input order; causal-LM classifiers add "log_probs", the summed
        log-probability of each label's answer (the probabilities are their softmax over the label set)."""
        if self.label_prompt is not None:
            from fmtune.models.lm_classify import probabilities

            scores = self.label_scores(texts, batch_size)
            return [{**p, "log_probs": {lab: float(s) for lab, s in zip(self.labels, row)}} for p, row in zip(self._rows(probabilities(scores)), scores)]
        return self._rows(self.predict_proba(texts, batch_size=batch_size))

    def _rows(self, probs) -> list[dict]:
        return [{"label": self.labels[int(row.argmax())], "probabilities": {lab: float(p) for lab, p in zip(self.labels, row)}} for row in probs]


def load_predictor(run_dir: Path | str, bf16: bool | None = None) -> Any:
    """The run's model, by the task its report.json names: a GenerationPredictor (.generate) for a
    generation run, otherwise a Predictor (.predict). A folder without report.json loads as a classifier."""
    run_dir = Path(run_dir)
    report_path = run_dir / "report.json"
    task = None
    if report_path.is_file():
        try:
            task = json.loads(report_path.read_text(encoding="utf-8")).get("task", {}).get("type")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FmtuneError(f"{report_path}: not a JSON report ({exc}); is this a finished fmtune run folder? "
                              "`fmtune verify RUN_DIR` checks its files against manifest.json.") from None
    if task == "generation":
        return GenerationPredictor.from_run(run_dir, bf16=bf16)
    return Predictor.from_run(run_dir, bf16=bf16)


@dataclass
class GenerationPredictor:
    """A generation run's tuned (merged) model: `fmtune predict RUN --prompt ...` and `fmtune serve` call .generate."""

    run_dir: Path
    model: Any
    tokenizer: Any
    bf16: bool
    report: dict

    @classmethod
    def from_run(cls, run_dir: Path | str, bf16: bool | None = None) -> "GenerationPredictor":
        import json

        import torch

        from fmtune.models import causal_lm
        from fmtune.models.loading import bf16_supported

        run_dir = Path(run_dir)
        model_dir = run_dir / "model"
        if not model_dir.is_dir():
            raise FmtuneError(f"{run_dir}: no model/ folder here. Is this a finished fmtune run folder? (see `fmtune runs list`)")
        report_path = run_dir / "report.json"
        report = json.loads(report_path.read_text()) if report_path.is_file() else {}
        kind = report.get("task", {}).get("type")
        if kind is not None and kind != "generation":
            raise FmtuneError(f"{run_dir}: this run is a {kind} run; use --text for classification runs.")
        model, tokenizer = causal_lm.load_model(model_dir), causal_lm.load_tokenizer(model_dir)
        use_bf16 = bf16_supported(torch.device("cpu")) if bf16 is None else bf16
        if use_bf16:  # served in bf16: cast once at load, the fp32 weights are not kept
            model = model.to(torch.bfloat16)
        return cls(run_dir, model, tokenizer, use_bf16, report)

    @property
    def max_new_tokens(self) -> int:
        """The run's decoding budget (derived from its training answers, or --max-new-tokens); 64 for older runs."""
        return int((self.report.get("task") or {}).get("max_new_tokens") or 64)

    def generate(self, prompts: list[str], max_new_tokens: int | None = None, batch_size: int = 16) -> list[str]:
        """Greedy completions, one per prompt (each a user message in the model's chat template), in input order;
        at most `max_new_tokens` new tokens each (default: the run's own budget)."""
        from fmtune.models import causal_lm
        from fmtune.models.loading import model_token_limit

        max_new_tokens = max_new_tokens or self.max_new_tokens
        budget = max(1, model_token_limit(self.model.config, self.tokenizer) - max_new_tokens)
        conversations = [[{"role": "user", "content": p}] for p in prompts]
        return causal_lm.generate(self.model, self.tokenizer, conversations, max_new_tokens, batch_size, self.bf16, budget)
