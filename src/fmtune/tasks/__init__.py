"""Task kinds: one adapter each (encoder classification, LM classification, generation), all of the shape tasks.base.Task."""

from __future__ import annotations

from fmtune.config import RunConfig


def for_config(cfg: RunConfig) -> type:
    """The adapter a run's data and model call for: generation for prompt/completion data, classification with a causal LM
    for a causal-LM model, else encoder classification."""
    from fmtune.data import pairs
    from fmtune.models import causal_lm

    if pairs.detect_task(cfg.data) == "generation":
        from fmtune.tasks.generation import GenerationTask

        return GenerationTask
    if causal_lm.is_causal_lm(cfg.model.model):
        from fmtune.tasks.lm_classification import LMClassification

        return LMClassification
    from fmtune.tasks.encoder import EncoderClassification

    return EncoderClassification
