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

    @classmethod
    def from_run(cls, run_dir: Path | str, bf16: bool | None = None) -> "Predictor":
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from fmtune.models import bf16_supported, check_safe_folder

        run_dir = Path(run_dir)
        model_dir = run_dir / "model"
        if not model_dir.is_dir():
            raise FmtuneError(f"{run_dir}: no model/ folder here. Is this a finished fmtune run folder? (see `fmtune runs list`)")
        check_safe_folder(model_dir)
        report_path = run_dir / "report.json"
        report = json.loads(report_path.read_text()) if report_path.is_file() else {}
        if report.get("task", {}).get("type", "classification") != "classification":
            raise FmtuneError(f"{run_dir}: this run is a {report['task']['type']} run; use --prompt for generation runs.")
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, local_files_only=True, trust_remote_code=False, use_safetensors=True
        )
        model.eval()
        id2label = model.config.id2label
        labels = [id2label[i] for i in range(len(id2label))]
        max_length = int(report.get("base_model", {}).get("max_length") or min(tokenizer.model_max_length, 512))
        use_bf16 = bf16_supported(torch.device("cpu")) if bf16 is None else bf16
        return cls(run_dir, model, tokenizer, labels, max_length, use_bf16, report)

    def predict_proba(self, texts: list[str], batch_size: int = 64):
        """Class probabilities, shape (len(texts), len(labels)), in the input order."""
        from fmtune.evaluate import predict_logits

        import torch

        logits = predict_logits(self.model, self.tokenizer, texts, self.max_length, batch_size=batch_size, bf16=self.bf16)
        return torch.softmax(torch.as_tensor(logits, dtype=torch.float32), dim=-1).numpy()

    def predict(self, texts: list[str], batch_size: int = 64) -> list[dict]:
        """One {"label", "probabilities"} per text, in the input order."""
        probs = self.predict_proba(texts, batch_size=batch_size)
        out = []
        for row in probs:
            best = int(row.argmax())
            out.append({"label": self.labels[best], "probabilities": {lab: float(p) for lab, p in zip(self.labels, row)}})
        return out
