"""Training speed: fmtune's fine-tune against Hugging Face Trainer on the same machine, model, data and hyperparameters.

    .venv/bin/python benchmarks/train_speed.py                       # the full comparison (about 15 minutes on 2 cores)
    .venv/bin/python benchmarks/train_speed.py --repeats 1 --quick   # smoke run (small data, one repeat)

Recipes (benchmarks/train_speed.yaml): `fmtune` calls fmtune.training.train.fit (pre-tokenised, length-bucketed, bf16 where
fmtune.models.loading.bf16_supported says it pays, fused AdamW, per-epoch validation for best-epoch selection);
`trainer_plain` is Trainer in fp32 with texts padded to max length; `trainer_dynamic` adds dynamic padding and
group_by_length; `trainer_bf16` adds bf16 autocast (run only where the CPU has bf16). Every run is a fresh subprocess
(so peak RSS is per recipe), repeats are interleaved in a rotated order, and the table reports medians. Model FLOPs
utilisation = 6 x non-embedding parameters x real (non-pad) tokens / training seconds, against fp32 and bf16 matmul
ceilings measured in the same session. Writes benchmarks/results/train_speed.json; ratios are printed last.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent
TRAINER_RECIPES = {"trainer_plain": dict(padded=True, bf16=False), "trainer_dynamic": dict(padded=False, bf16=False), "trainer_bf16": dict(padded=False, bf16=True)}


def load_split(cfg: dict) -> dict:
    """A fixed train/validation/test split of Rotten Tomatoes snippets (labels 0 = rotten, 1 = fresh)."""
    import pandas as pd

    from fmtune.data.quickstart import rotten_tomatoes_csv

    n_train, n_val, n_test = cfg["train_examples"], cfg["validation_examples"], cfg["test_examples"]
    per_text = cfg.get("snippets_per_text", 1)  # > 1: long documents, each that many consecutive snippets of one label
    total = n_train + n_val + n_test
    df = pd.read_csv(rotten_tomatoes_csv(total * per_text + 4 * per_text, cfg["seed"]), dtype=str, keep_default_na=False)
    texts, y = df["text"].tolist(), [int(lab == "fresh") for lab in df["label"]]
    if per_text > 1:
        open_docs: dict[int, list[str]] = {0: [], 1: []}
        docs: list[tuple[str, int]] = []
        for text, label in zip(texts, y):
            open_docs[label].append(text)
            if len(open_docs[label]) == per_text:
                docs.append((" ".join(open_docs[label]), label))
                open_docs[label] = []
        texts, y = [d for d, _ in docs[:total]], [lab for _, lab in docs[:total]]
    cut = [0, n_train, n_train + n_val, n_train + n_val + n_test]
    return {name: (texts[a:b], y[a:b]) for name, a, b in zip(("train", "validation", "test"), cut, cut[1:])}


def matmul_ceilings() -> dict:
    """Best-of-5 TFLOP/s of a 2048^3 matmul in fp32 and in bf16 (the most a dense layer can get here)."""
    import torch

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
        a @ b
        best = min(_timed(lambda: a @ b) for _ in range(5))
        out[name] = round(2 * 2048**3 / best / 1e12, 4)
    return out


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def non_embedding_parameters(model) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if "embeddings" not in name)


def run_fmtune(recipe: str, cfg: dict, split: dict, model_path: Path, tokenizer) -> dict:
    import numpy as np
    import torch

    from fmtune.config import TrainConfig
    from fmtune.models import loading
    from fmtune.tasks.encoder import HEAD_LR_FACTOR
    from fmtune.training import train

    bf16_measure_start = time.perf_counter()
    bf16 = recipe != "fmtune_fp32" and loading.bf16_supported(torch.device("cpu"))
    bf16_decision_seconds = time.perf_counter() - bf16_measure_start
    dropout = 0.0 if recipe == "fmtune_no_dropout" else None
    if recipe == "fmtune_unchunked_attention":
        from fmtune.training import fast_dropout

        fast_dropout.CHUNK_SCORES = 2**62
    torch.manual_seed(cfg["seed"])
    model, head = loading.load_classifier_and_head(model_path, ["rotten", "fresh"], dropout=dropout)
    # the speed recipes keep Trainer's hyperparameters (one learning rate); fmtune_head_lr adds the `fmtune run` default,
    # the new classifier head at HEAD_LR_FACTOR x the learning rate
    head_lr = cfg["learning_rate"] * HEAD_LR_FACTOR if recipe == "fmtune_head_lr" else None
    tc = TrainConfig(epochs=cfg["epochs"], patience=cfg["epochs"], batch_size=cfg["batch_size"], weight_decay=cfg["weight_decay"], warmup_ratio=cfg["warmup_ratio"], class_weights="none",
                     fast_dropout=recipe != "fmtune_torch_dropout", bf16_weights=recipe != "fmtune_autocast", sparse_embedding_grad=recipe != "fmtune_dense_embedding_grad",
                     embedding_rows=recipe != "fmtune_all_embedding_rows", fused_step=recipe != "fmtune_torch_step",
                     compile=recipe == "fmtune_compile")
    start = time.perf_counter()
    ids = {s: train.token_ids(tokenizer, split[s][0], cfg["max_length"]) for s in ("train", "validation")}
    tokenise_seconds = time.perf_counter() - start
    result = train.fit(model, tokenizer, (ids["train"], np.array(split["train"][1])), (ids["validation"], np.array(split["validation"][1])), tc,
                       learning_rate=cfg["learning_rate"], n_classes=2, seed=cfg["seed"], bf16=bf16, head=head, head_learning_rate=head_lr)
    extra = {"levers": result.levers, "best_epoch": result.best_epoch, "history": result.history, "bf16_decision_seconds": round(bf16_decision_seconds, 2),
             "bf16_speedup_measured": round(loading.bf16_speedup(), 3) if "avx512_bf16" in loading.cpu_flags() and "amx_bf16" not in loading.cpu_flags() else None}
    return dict(model=result.model, seconds=result.train_seconds, tokenise_seconds=tokenise_seconds, bf16=bf16, real_tokens=result.real_tokens, **extra)


def run_trainer(recipe: str, cfg: dict, split: dict, model_path: Path, tokenizer) -> dict:
    import torch
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from fmtune.models import loading

    padded, bf16 = TRAINER_RECIPES[recipe]["padded"], TRAINER_RECIPES[recipe]["bf16"]
    torch.manual_seed(cfg["seed"])
    model = loading.load_classifier(model_path, ["rotten", "fresh"])
    start = time.perf_counter()
    texts, labels = split["train"]
    enc = tokenizer(texts, truncation=True, max_length=cfg["max_length"], padding="max_length" if padded else False)
    data = Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    tokenise_seconds = time.perf_counter() - start
    real_tokens = cfg["epochs"] * sum(sum(m) for m in enc["attention_mask"])
    steps = cfg["epochs"] * -(-len(texts) // cfg["batch_size"])
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=cfg["batch_size"], num_train_epochs=cfg["epochs"], learning_rate=cfg["learning_rate"],
            weight_decay=cfg["weight_decay"], warmup_steps=int(cfg["warmup_ratio"] * steps), seed=cfg["seed"], bf16=bf16, use_cpu=True,
            train_sampling_strategy="random" if padded else "group_by_length", save_strategy="no", eval_strategy="no", logging_strategy="no",
            report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=None if padded else DataCollatorWithPadding(tokenizer))
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    return dict(model=trainer.model, seconds=seconds, tokenise_seconds=tokenise_seconds, bf16=bf16, real_tokens=real_tokens)


def child(recipe: str, cfg: dict) -> dict:
    """One recipe in this (fresh) process: train, then score the test split with the same fp32 evaluation for all.
    fmtune's recipes choose the OpenMP wait policy as the fmtune CLI does (fmtune.training.threads, before torch starts);
    Trainer's recipes run in the environment a Trainer user has (OpenMP's defaults), `fmtune_passive` with
    OMP_WAIT_POLICY=PASSIVE."""
    import resource

    from fmtune.training import threads

    if recipe == "fmtune_passive":
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    if recipe.startswith("fmtune"):
        threads.configure()

    import numpy as np
    import torch
    from transformers.utils import logging as hf_logging

    from fmtune.evidence.evaluate import classification_metrics, predict_logits
    from fmtune.models import loading

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    split = load_split(cfg)
    model_path = loading.resolve_model_path(cfg["model"])
    tokenizer = loading.load_tokenizer(model_path)
    run = run_trainer if recipe in TRAINER_RECIPES else run_fmtune
    res = run(recipe, cfg, split, model_path, tokenizer)
    model = res.pop("model")
    start = time.perf_counter()
    logits = predict_logits(model, tokenizer, split["test"][0], cfg["max_length"], batch_size=64, bf16=False)
    eval_seconds = time.perf_counter() - start
    y_true = np.array(split["test"][1])
    metrics = classification_metrics(y_true, logits.argmax(1), ["rotten", "fresh"], np.zeros((1, len(y_true)), dtype=np.int64))["metrics"]
    n = len(split["train"][0]) * cfg["epochs"]
    return {
        "recipe": recipe, "train_seconds": round(res["seconds"], 3), "examples_per_s": round(n / res["seconds"], 2),
        "real_tokens_per_s": round(res["real_tokens"] / res["seconds"], 1), "real_tokens": res["real_tokens"],
        "non_embedding_parameters": non_embedding_parameters(model), "bf16": res["bf16"], "threads": torch.get_num_threads(),
        "tokenise_seconds": round(res["tokenise_seconds"], 3), "test_eval_seconds": round(eval_seconds, 3),
        "test_accuracy": round(metrics["accuracy"], 4), "test_macro_f1": round(metrics["macro_f1"], 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), "omp_wait": threads.choice(),
        **{k: v for k, v in res.items() if k not in ("seconds", "tokenise_seconds", "bf16", "real_tokens")},
    }


def spawn(args: list[str], env: dict, fatal: bool = True) -> dict:
    """One child process; a failed ablation (fatal=False) is recorded with its error instead of ending the benchmark."""
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env={**os.environ, **{k: str(v) for k, v in env.items()}})
    if proc.returncode != 0:
        if fatal:
            raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-4000:]}")
        return {"recipe": args[1], "error": proc.stderr.strip().splitlines()[-1][-500:] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> dict:
    from fmtune.models.loading import cpu_flags, hardware_description

    return {"description": hardware_description(), "platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "bf16_flags": sorted(f for f in cpu_flags() if "bf16" in f or "amx" in f)}


def median_row(rows: list[dict], ceilings: dict) -> dict:
    med = lambda key: statistics.median(r[key] for r in rows)  # noqa: E731
    first = rows[0]
    flops = 6 * first["non_embedding_parameters"] * first["real_tokens"]
    seconds = med("train_seconds")
    own = ceilings["bf16" if first["bf16"] else "fp32"]
    return {
        "recipe": first["recipe"], "runs": len(rows), "bf16": first["bf16"], "train_seconds": round(seconds, 2),
        "train_seconds_all": [r["train_seconds"] for r in rows], "examples_per_s": round(med("examples_per_s"), 2),
        "real_tokens_per_s": round(med("real_tokens_per_s"), 1), "model_tflops": round(flops / seconds / 1e12, 4),
        "mfu_vs_own_precision_ceiling": round(flops / seconds / 1e12 / own, 4), "mfu_vs_bf16_ceiling": round(flops / seconds / 1e12 / ceilings["bf16"], 4),
        "peak_rss_mb": round(med("peak_rss_mb"), 1), "test_accuracy": round(med("test_accuracy"), 4), "test_macro_f1": round(med("test_macro_f1"), 4),
        "tokenise_seconds": round(med("tokenise_seconds"), 3),
        **{k: first[k] for k in ("levers", "best_epoch", "bf16_speedup_measured", "bf16_decision_seconds") if k in first},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "train_speed.yaml")
    parser.add_argument("--repeats", type=int, help="override the config's repeats")
    parser.add_argument("--quick", action="store_true", help="smoke run: 400 train / 100 validation / 200 test examples, no ablations")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "train_speed.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--ceilings", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cfg = yaml.safe_load(args.config.read_text())
    if args.quick:
        cfg.update(train_examples=400, validation_examples=100, test_examples=200, ablations=[])
    if args.child:
        print(json.dumps(child(args.child, cfg)))
        return
    if args.ceilings:
        print(json.dumps(matmul_ceilings()))
        return
    passed = ["--config", str(args.config)] + (["--quick"] if args.quick else [])
    repeats = args.repeats or cfg["repeats"]
    from fmtune.models.loading import cpu_flags

    has_bf16 = bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
    recipes = [r for r in cfg["recipes"] if r != "trainer_bf16" or has_bf16]
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    wall = time.perf_counter()
    ceilings = spawn(["--ceilings"], cfg["env"])
    print(f"matmul ceilings (TFLOP/s): {ceilings}", flush=True)
    rows: dict[str, list[dict]] = {r: [] for r in recipes + cfg["ablations"]}
    loads = []
    failed: dict[str, str] = {}
    for rep in range(repeats):
        order = recipes[rep % len(recipes) :] + recipes[: rep % len(recipes)]
        for recipe in order + (cfg["ablations"] if rep == 0 else []):
            row = spawn(["--child", recipe, *passed], cfg["env"], fatal=recipe in recipes)
            row["load_after"] = round(os.getloadavg()[0], 2)
            loads.append(row["load_after"])
            if "error" in row:
                failed[recipe] = row["error"]
                print(f"  repeat {rep + 1}: {recipe:18s} FAILED: {row['error']}", flush=True)
                continue
            rows[recipe].append(row)
            print(f"  repeat {rep + 1}: {recipe:18s} {row['train_seconds']:7.2f} s  {row['examples_per_s']:7.2f} ex/s  acc {row['test_accuracy']:.4f}  "
                  f"peak RSS {row['peak_rss_mb']:.0f} MB  load {row['load_after']}", flush=True)
    table = {r: median_row(rs, ceilings) for r, rs in rows.items() if rs}
    ours = table["fmtune"]
    plain, best = table.get("trainer_plain"), max((table[r] for r in recipes if r.startswith("trainer")), key=lambda t: t["examples_per_s"], default=None)
    ratios = {
        "vs_trainer_plain": round(ours["examples_per_s"] / plain["examples_per_s"], 3) if plain else None,
        "vs_trainer_best": round(ours["examples_per_s"] / best["examples_per_s"], 3) if best else None,
        "trainer_best_recipe": best["recipe"] if best else None,
        "accuracy_points_vs_trainer_best": round(100 * (ours["test_accuracy"] - best["test_accuracy"]), 2) if best else None,
        "peak_rss_mb_vs_trainer_best": round(ours["peak_rss_mb"] - best["peak_rss_mb"], 1) if best else None,
    }
    result = {
        "benchmark": "train_speed", "date": started.isoformat(timespec="seconds"), "machine": machine(),
        "load_average": {"before": [round(x, 2) for x in load_before], "after_each_run": loads, "after": [round(x, 2) for x in os.getloadavg()]},
        "config": {**cfg, "repeats": repeats, "quick": args.quick}, "matmul_ceiling_tflops": ceilings,
        "mfu": {"fmtune_vs_bf16_ceiling": ours["mfu_vs_bf16_ceiling"], "fmtune_vs_own_precision_ceiling": ours["mfu_vs_own_precision_ceiling"],
                **{f"{r}_vs_bf16_ceiling": t["mfu_vs_bf16_ceiling"] for r, t in table.items() if r != "fmtune"}},
        "recipes": table, "runs": rows, "failed": failed, "ratios": ratios, "wall_seconds": round(time.perf_counter() - wall, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'recipe':18s} {'bf16':>5s} {'seconds':>8s} {'ex/s':>7s} {'tok/s':>8s} {'MFU(bf16)':>9s} {'RSS MB':>7s} {'acc':>6s} {'F1':>6s}")
    for r, t in table.items():
        print(f"{r:18s} {str(t['bf16']):>5s} {t['train_seconds']:8.2f} {t['examples_per_s']:7.2f} {t['real_tokens_per_s']:8.0f} {t['mfu_vs_bf16_ceiling']:9.3f} "
              f"{t['peak_rss_mb']:7.0f} {t['test_accuracy']:6.4f} {t['test_macro_f1']:6.4f}")
    print(f"\nwrote {args.out}\nratios: {json.dumps(ratios)}")


if __name__ == "__main__":
    main()
