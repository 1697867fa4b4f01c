"""What both causal-LM task kinds (generation, LM classification) share: the base model with its chat template, a fit
of one rung, retention and domain shift as perplexity, the saved model, size, latency and per-request cost."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fmtune.config import RunConfig
from fmtune.console import progress_bar, stage
from fmtune.tasks.base import Context

RETENTION_CHUNKS, RETENTION_CHUNK_TOKENS = 32, 128  # 4k tokens per model: base and tuned are scored on the same tokens
LATENCY_REQUESTS = 8  # requests timed per model for the per-request cost (batch 1)
LATENCY_BATCH = 4  # batched forward-pass latency: small batches, a causal LM forward on CPU is costly


def bf16_choice(cfg: RunConfig, bf16: bool) -> tuple[str, bool, str]:
    return "bf16", bf16, f"--bf16 {cfg.train.bf16}" + (" (hardware supports bf16)" if bf16 and cfg.train.bf16 == "auto" else " (no bf16 speed-up detected)" if cfg.train.bf16 == "auto" else "")


class CausalTask:
    """The base of GenerationTask and LMClassification: a causal LM, LoRA by default, answers learned as completions."""

    model_path: Path
    tokenizer: Any
    base: Any
    bf16: bool
    pad_id: int
    limit: int
    max_length: int

    def load_base(self, ctx: Context) -> str:
        """The base model on the device, its tokenizer and chat template; returns where the template came from."""
        from fmtune.models import causal_lm, loading

        cfg = ctx.cfg
        with stage("load the base model", ctx.profile):
            self.model_path, self.model_name = causal_lm.resolve_model(cfg.model.model)
            self.tokenizer = causal_lm.load_tokenizer(self.model_path)
            template_why = causal_lm.ensure_chat_template(self.tokenizer)
            self.base = causal_lm.load_model(self.model_path).to(ctx.device)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.bf16 = {"on": True, "off": False}.get(cfg.train.bf16, loading.bf16_supported(ctx.device))
        return template_why

    def fit_rows(self, ctx: Context, label: str, train: list, validation: list, *, lr: float, lora: bool, from_scratch: bool, checkpoint_dir: Path | None):
        """A fresh copy of the base model (or its architecture, randomly initialised) trained on the rows, with a progress bar."""
        from fmtune.training import causal

        model = self._model(ctx, from_scratch)
        cfg, settings = ctx.cfg, ctx.train_settings(ctx.cfg.train, from_scratch)
        with progress_bar() as prog:
            task = prog.add_task(label, total=len(train) * settings.epochs, info="")

            def progress(n: int, row: dict) -> None:
                prog.advance(task, n)
                if row:
                    ctx.epoch_end(row)
                    prog.update(task, info=f"epoch {row['epoch']} val loss {row['val_loss']:.3f}")

            return causal.fit(model, train, validation, settings, pad_id=self.pad_id, learning_rate=lr, seed=cfg.seed, bf16=self.bf16, lora=lora,
                              eval_batch_size=cfg.eval.eval_batch_size, progress=progress, checkpoint_dir=checkpoint_dir, world=ctx.world)

    def _model(self, ctx: Context, from_scratch: bool):
        import torch

        from fmtune.models import causal_lm

        torch.manual_seed(ctx.seed)
        return causal_lm.load_model(self.model_path, from_scratch=from_scratch).to(ctx.device)

    def restore(self, ctx: Context, weights: dict | None, from_scratch: bool):
        model = self._model(ctx, from_scratch)
        if weights is not None:
            model.load_state_dict(weights)
        return model.eval()

    def perplexity_probes(self, ctx: Context, tuned, task_texts: list[str]) -> tuple[dict, dict]:
        """Retention (general-text perplexity, base vs tuned) and domain shift (task text vs general text, base model)."""
        from fmtune.evidence import retention
        from fmtune.models import causal_lm

        cfg, bs = ctx.cfg, ctx.cfg.eval.eval_batch_size
        docs, source = retention.general_documents(cfg.evidence.general_text)
        nll_base, n_chunks = causal_lm.text_nll(self.base, self.tokenizer, docs, RETENTION_CHUNK_TOKENS, RETENTION_CHUNKS, bs, self.bf16)
        nll_tuned, _ = causal_lm.text_nll(tuned, self.tokenizer, docs, RETENTION_CHUNK_TOKENS, RETENTION_CHUNKS, bs, self.bf16)
        retention_ = perplexity_retention(float(np.exp(nll_base)), float(np.exp(nll_tuned)), n_chunks, source, cfg.evidence.max_forgetting)
        nll_task, task_chunks = causal_lm.text_nll(self.base, self.tokenizer, task_texts, RETENTION_CHUNK_TOKENS, RETENTION_CHUNKS, bs, self.bf16)
        return retention_, perplexity_shift(float(np.exp(nll_task)), float(np.exp(nll_base)), task_chunks, n_chunks, source)

    def save(self, ctx: Context, tuned, model_dir: Path) -> None:
        """model/: the merged model, plain transformers, safetensors."""
        tuned.save_pretrained(model_dir, safe_serialization=True)
        self.tokenizer.save_pretrained(model_dir)

    def size_and_latency(self, ctx: Context, tuned, model_dir: Path, chats: list[list[dict]], max_length: int, lora: bool) -> dict:
        """Parameters, size on disk and forward-pass latency of base and tuned on the same test prompts (chat template)."""
        from fmtune.evidence import inference
        from fmtune.models import causal_lm

        prompts = [causal_lm.render(self.tokenizer, c)[0] for c in chats[:64]]
        reps = ctx.cfg.evidence.latency_repeats
        latency = lambda m: inference.latency(m, self.tokenizer, prompts, max_length, self.bf16, reps, batch_size=LATENCY_BATCH)  # noqa: E731
        return {
            "base": inference.describe(self.base, self.model_path, latency(self.base)),
            "fine_tuned": inference.describe(tuned, model_dir, latency(tuned)),
            "note": "Same inputs (test prompts in the chat template), same precision, same threads: one forward pass"
            + (", with the LoRA adapters merged into the weights (same architecture, same size as the base)." if lora else "."),
        }

    measures = "size, latency and cost per request"
    model_kind = "causal"

    def epoch_score(self, row: dict) -> float:
        return -row["val_loss"]  # causal LMs select on the completions' validation loss

    def min_epochs(self, n_train: int) -> int:
        return 1

    def levers(self) -> dict:
        return {}

    def tuning_choices(self, ctx: Context, lora: bool, learning_rate: float) -> dict:
        return {}

    def skipped_rungs(self, cfg: RunConfig) -> dict[str, str] | None:
        return None


def perplexity_retention(base: float, tuned: float, chunks: int, source: str, max_forgetting: float | None) -> dict:
    from fmtune.evidence.retention import DEFAULT_THRESHOLD, forgetting

    rel = (tuned - base) / base
    threshold = max_forgetting if max_forgetting is not None else DEFAULT_THRESHOLD
    return {
        "probe": f"perplexity on general text ({chunks} chunks of {RETENTION_CHUNK_TOKENS} tokens)",
        "base": base,
        "fine_tuned": tuned,
        "relative_change": rel,
        "higher_is_better": False,
        "flag": bool(forgetting(rel, higher_is_better=False) > threshold),
        "threshold": threshold,
        "gate": max_forgetting,
        "explanation": (
            f"Probe: the models' perplexity on {chunks} chunks of {RETENTION_CHUNK_TOKENS} tokens of general-domain text ({source}); "
            f"lower is better. Base {base:.2f}, fine-tuned {tuned:.2f} ({rel:+.1%}). A rise means the tuned model predicts "
            f"general text worse: it forgot some general knowledge. Worry when it rises by more than {threshold:.0%}"
            + (" (your --max-forgetting gate)." if max_forgetting is not None else " (default warning threshold; set a hard gate with --max-forgetting).")
        ),
        "details": {"chunks": chunks, "chunk_tokens": RETENTION_CHUNK_TOKENS, "source": source},
    }


def perplexity_shift(task_ppl: float, general_ppl: float, task_chunks: int, general_chunks: int, source: str) -> dict:
    ratio = task_ppl / general_ppl
    if ratio < 1.0:
        words = "the base model finds the task text easier to predict than general text: it already knows this kind of text; gains from fine-tuning come mostly from the task's format and answers"
    elif ratio < 2.0:
        words = "moderately harder to predict than general text: fine-tuning is likely to help"
    else:
        words = "much harder to predict than general text: the task text is far from what the base model knows, so fine-tuning is expected to help most"
    return {
        "method": f"perplexity ratio: the base model's perplexity on the training prompts and completions divided by its perplexity on general text (chunks of {RETENTION_CHUNK_TOKENS} tokens; 1 = as familiar as general text)",
        "score": ratio,
        "interpretation": f"ratio {ratio:.2f}: {words}.",
        "details": {"task_perplexity": task_ppl, "general_perplexity": general_ppl, "task_chunks": task_chunks, "general_chunks": general_chunks, "general_source": source},
    }
