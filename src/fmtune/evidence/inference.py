"""Size and speed of the base and the fine-tuned model, measured the same way."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np


def folder_size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors")) / 1e6


def latency(model, tokenizer, texts: list[str], max_length: int, bf16: bool, repeats: int, batch_size: int = 32) -> dict:
    """p50/p95 wall time of a forward pass at batch 1 and at `batch_size`, after a warm-up."""
    import torch

    from fmtune.evidence.evaluate import autocast

    device = next(model.parameters()).device
    model.eval()

    def timed(batch_texts: list[str]) -> list[float]:
        enc = tokenizer(batch_texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        enc = {k: v.to(device) for k, v in enc.items()}
        out = []
        with torch.inference_mode(), autocast(device, bf16):
            model(**enc)  # warm-up
            for _ in range(repeats):
                t = time.perf_counter()
                model(**enc)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                out.append((time.perf_counter() - t) * 1000)
        return out

    one = timed(texts[:1])
    many = timed((texts * batch_size)[:batch_size])
    return {
        "batch1_p50_ms": float(np.percentile(one, 50)),
        "batch1_p95_ms": float(np.percentile(one, 95)),
        f"batch{batch_size}_p50_ms": float(np.percentile(many, 50)),
        f"batch{batch_size}_p95_ms": float(np.percentile(many, 95)),
        "batch_size": batch_size,
        "repeats": repeats,
        "bf16": bf16,
    }


def describe(model, folder: Path, lat: dict) -> dict:
    return {"parameters": count_parameters(model), "size_mb": round(folder_size_mb(folder), 2), "latency_ms": lat["batch1_p50_ms"], "latency": lat}


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
