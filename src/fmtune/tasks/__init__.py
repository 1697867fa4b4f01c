"""One adapter per task kind (encoder classification, LM classification, generation), each the same small shape
(fmtune.tasks.base.Task); for_config picks the one a run's data and model call for."""

from __future__ import annotations

from fmtune.config import RunConfig


def for_config(cfg: RunConfig) -> type:
    """Generation for prompt/completion data; classification with a causal LM for a causal-LM model; else an encoder."""
    from fmtune import causal_lm, gen_data

    if gen_data.detect_task(cfg.data) == "generation":
        from fmtune.tasks.generation import GenerationTask

        return GenerationTask
    if causal_lm.is_causal_lm(cfg.model.model):
        from fmtune.tasks.lm_classification import LMClassification

        return LMClassification
    from fmtune.tasks.encoder import EncoderClassification

    return EncoderClassification
