"""Shared fixtures: a tiny random BERT built in code and tiny labeled data (CPU, seconds)."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest

WORDS = (
    "good great fun superb moving brilliant charming delight bad awful dull boring mess tedious weak poor "
    "the a film movie plot actor story scene is was very quite and but not it this"
).split()
POSITIVE = WORDS[:8]
NEGATIVE = WORDS[8:16]
FILLER = WORDS[16:]


def make_tiny_bert(folder: Path, seed: int = 0) -> Path:
    """A 2-layer, hidden-32 random BERT with a word-level vocab, saved as safetensors with its tokenizer."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + [w.upper() for w in "abcdefghijklmnopqrstuvwxyz"] + list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'\"-")
    vocab = list(dict.fromkeys(vocab))
    # transformers 5 takes the vocabulary itself (a vocab_file argument is silently ignored: every token becomes [UNK])
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True, model_max_length=64)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def make_reviews(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Easy synthetic sentiment: positive words -> 'pos', negative words -> 'neg'."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.sample(POSITIVE if label == "pos" else NEGATIVE, 2) + rng.sample(FILLER, rng.randint(2, 8))
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def write_csv(path: Path, rows, header=("text", "label")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture()
def reviews_csv(tmp_path) -> Path:
    return write_csv(tmp_path / "reviews.csv", make_reviews(200))


@pytest.fixture(autouse=True, scope="session")
def _isolated_session_state(tmp_path_factory):
    """Module- and session-scoped fixtures run before the per-test isolation below: keep them out of the user's folders too."""
    import os

    root = tmp_path_factory.mktemp("state")
    saved = {k: os.environ.get(k) for k in ("FMTUNE_REGISTRY", "FMTUNE_CACHE", "FMTUNE_SEARCH")}
    os.environ["FMTUNE_REGISTRY"] = str(root / "registry.sqlite")
    os.environ.setdefault("FMTUNE_SEARCH", "off")  # one trial per rung keeps the tiny runs fast; tests of the search set it
    os.environ.setdefault("FMTUNE_CACHE", str(root / "cache"))
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path, monkeypatch):
    """Registry and caches of tests live in the test's tmp folder, never in the user's."""
    monkeypatch.setenv("FMTUNE_REGISTRY", str(tmp_path / "registry.sqlite"))
    monkeypatch.setenv("FMTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-hub"))  # a Hub id resolves against the test's own (empty) cache
