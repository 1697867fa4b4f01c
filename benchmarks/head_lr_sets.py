"""The new classifier head's learning rate: one rate for every parameter against the head at HEAD_LR_FACTOR x the rate
(`fmtune run`'s default), fine-tuning only, on four labeled sets of different shape, three seeds each.

    .venv/bin/python benchmarks/head_lr_sets.py            # about 25 minutes on 2 cores
    .venv/bin/python benchmarks/head_lr_sets.py --quick    # smoke run: one set, one seed

The sets come from packaged data (no downloads): Rotten Tomatoes snippets (2 classes, the quickstart's 3,200), and
the chatterbot corpus's statements labeled by their file's topic in English (20 topics of 16-536 statements), Spanish
(9 topics) and Italian (19 topics capped at 50, two of them at 3-4: many small, imbalanced classes). Each run is what
`fmtune run` does for the fine_tuned rung (same split, max length, class weights, epoch limit and early stopping)
with only the head's rate changed. Writes benchmarks/results/head_lr_sets.json: every run's test macro-F1 and, per
set, the mean over seeds and the difference.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from sets import _chatterbot_statements  # benchmarks/sets.py (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parent
SEEDS = (0, 1, 2)


def _write(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def build_sets(folder: Path) -> dict[str, Path]:
    from fmtune.data.quickstart import rotten_tomatoes_csv

    sets = {"rotten_tomatoes_2": rotten_tomatoes_csv(3200, 0)}
    for lang, name in (("english", "chatterbot_en_20"), ("spanish", "chatterbot_es_9")):
        seen: set[str] = set()
        rows = []
        for topic, statements in _chatterbot_statements(lang).items():  # a statement in two files keeps its first topic
            rows += [(s, topic) for s in statements if s not in seen]
            seen.update(statements)
        counts = {t: sum(1 for _, lab in rows if lab == t) for t in {lab for _, lab in rows}}
        sets[name] = _write(folder / f"{name}.csv", [r for r in rows if counts[r[1]] >= 10])
    rows = []
    for topic, statements in _chatterbot_statements("italian").items():
        rows += [(s, topic) for s in statements[: {"health": 3, "trivia": 4}.get(topic, 50)]]
    random.Random(1).shuffle(rows)
    sets["chatterbot_it_19"] = _write(folder / "chatterbot_it_19.csv", rows)
    return sets


def fine_tune(path: Path, seed: int, head_factor: float) -> dict:
    """The fine_tuned rung of `fmtune run --data path --seed seed`, the head at head_factor x the learning rate."""
    import numpy as np
    import torch

    from fmtune.config import RunConfig
    from fmtune.data import labeled, tokens
    from fmtune.evidence.evaluate import macro_f1
    from fmtune.models import loading
    from fmtune.tasks.choices import choose_max_length
    from fmtune.tasks.encoder import max_epochs
    from fmtune.training import train

    cfg = RunConfig.model_validate({"data": {"data": str(path)}, "seed": seed})
    splits = labeled.load_splits(cfg.data, seed)
    labels = splits.labels
    model_path = loading.resolve_model_path("minilm")
    tokenizer = loading.load_tokenizer(model_path)
    index = {label: i for i, label in enumerate(labels)}
    texts = {s: [e.text for e in getattr(splits, s)] for s in ("train", "validation", "test")}
    y = {s: np.array([index[e.label] for e in getattr(splits, s)], dtype=np.int64) for s in texts}
    tokenised = {s: tokens.tokenise(tokenizer, t) for s, t in texts.items()}
    encoder = loading.load_encoder(model_path)
    max_length, _ = choose_max_length(tokenised["train"].lengths, loading.model_token_limit(encoder.config, tokenizer), None)
    ids = {s: tokens.truncate(tokenizer, t, tokenised[s].ids, max_length) for s, t in texts.items()}
    class_weight, _ = train.class_weight_vector(y["train"], len(labels), cfg.train.class_weights)
    epochs, _ = max_epochs(len(y["train"]), cfg.train)
    train_cfg = cfg.train.model_copy(update={"epochs": epochs})
    bf16 = loading.bf16_supported(torch.device("cpu"))
    torch.manual_seed(seed)
    model, head = loading.load_classifier_and_head(model_path, labels)
    start = time.perf_counter()
    result = train.fit(model, tokenizer, (ids["train"], y["train"]), (ids["validation"], y["validation"]), train_cfg, learning_rate=train_cfg.learning_rate,
                       n_classes=len(labels), seed=seed, bf16=bf16, class_weight=class_weight, head=head, head_learning_rate=train_cfg.learning_rate * head_factor)
    _, pred = train.evaluate_split(result.model, ids["test"], y["test"], tokenizer.pad_token_id, 64, bf16)
    return {"seed": seed, "head_factor": head_factor, "train_examples": len(y["train"]), "classes": len(labels), "test_macro_f1": round(macro_f1(y["test"], pred, len(labels)), 4),
            "best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "max_epochs": epochs, "train_seconds": round(time.perf_counter() - start, 1),
            "val_macro_f1": [round(h["val_macro_f1"], 3) for h in result.history]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one set (chatterbot_es_9), one seed")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "head_lr_sets.json")
    args = parser.parse_args()
    from fmtune.models.loading import hardware_description
    from fmtune.tasks.encoder import HEAD_LR_FACTOR

    factors = (1.0, float(HEAD_LR_FACTOR))
    started = datetime.datetime.now(datetime.timezone.utc)
    wall = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        sets = build_sets(Path(tmp))
        if args.quick:
            sets = {"chatterbot_es_9": sets["chatterbot_es_9"]}
        runs: dict[str, list[dict]] = {}
        for name, path in sets.items():
            runs[name] = []
            for seed in SEEDS[:1] if args.quick else SEEDS:
                for factor in factors:
                    row = fine_tune(path, seed, factor)
                    runs[name].append(row)
                    print(f"{name:18s} seed {seed} head x{factor:<4g} test macro-F1 {row['test_macro_f1']:.4f}  epochs {row['best_epoch']}/{row['epochs_run']}  {row['train_seconds']:.0f} s", flush=True)
    summary = {}
    for name, rows in runs.items():
        mean = {f: round(statistics.mean(r["test_macro_f1"] for r in rows if r["head_factor"] == f), 4) for f in factors}
        summary[name] = {"classes": rows[0]["classes"], "train_examples": rows[0]["train_examples"], "mean_test_macro_f1": {f"x{f:g}": m for f, m in mean.items()},
                         "difference": round(mean[factors[1]] - mean[factors[0]], 4)}
    result = {"benchmark": "head_lr_sets", "date": started.isoformat(timespec="seconds"), "machine": hardware_description(), "head_factor": HEAD_LR_FACTOR,
              "seeds": list(SEEDS[:1] if args.quick else SEEDS), "summary": summary, "runs": runs, "wall_seconds": round(time.perf_counter() - wall, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'set':18s} {'classes':>7s} {'x1':>7s} {f'x{HEAD_LR_FACTOR}':>7s} {'diff':>7s}")
    for name, s in summary.items():
        one, ours = s["mean_test_macro_f1"].values()
        print(f"{name:18s} {s['classes']:7d} {one:7.4f} {ours:7.4f} {s['difference']:+7.4f}")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
