"""Generation training speed: fmtune's causal-LM LoRA fine-tune against Hugging Face Trainer + PEFT, same machine,
model (SmolLM2-135M-Instruct), data, LoRA settings and hyperparameters.

    .venv/bin/python benchmarks/gen_train_speed.py                       # 3 interleaved repeats (~10 minutes, 2 cores)
    .venv/bin/python benchmarks/gen_train_speed.py --repeats 1 --quick   # smoke run

Data: question -> answer pairs from chatterbot-corpus (fmtune.data.pairs.chatterbot_jsonl), rendered with the model's chat
template, loss on the answer tokens only (both recipes get the very same token ids and labels). `fmtune` calls
fmtune.training.causal.fit (length-bucketed dynamic padding, bf16 where the CPU supports it, fused AdamW, the output layer
run only on scored positions, fast CPU dropout); `trainer_peft` is Trainer on the same peft LoraConfig with
DataCollatorForSeq2Seq (dynamic padding), group_by_length and bf16 on the same CPUs. Every run is a fresh subprocess;
repeats are interleaved in a rotated order; medians are reported. "Equal loss" is checked on held-out pairs: the mean
answer-token NLL of each tuned model, computed by the same fp32 function. Tokens/s counts real (non-pad) tokens
processed in training. Writes benchmarks/results/gen_train_speed.json; the ratio is printed last.
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

ROOT = Path(__file__).resolve().parent
CONFIG = {
    "model": "smollm2",
    "examples": 360,  # chatterbot pairs: train / validation / test below
    "train_examples": 280,
    "validation_examples": 20,
    "test_examples": 60,
    "max_length": 128,
    "batch_size": 16,
    "epochs": 1,
    "learning_rate": 1e-3,
    "weight_decay": 0.01,
    "warmup_ratio": 0.06,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "seed": 0,
    "repeats": 3,
    "recipes": ["fmtune", "trainer_peft"],
    # fmtune with one lever changed, run once: random batches without length bucketing, the same with sequence packing
    "ablations": ["fmtune_no_bucketing", "fmtune_packing"],
    "env": {},  # extra environment for every recipe's subprocess (fmtune sets its own thread policy, see child())
}


def load_rows(cfg: dict) -> tuple[dict, object]:
    from fmtune.data import pairs
    from fmtune.models import causal_lm

    path, _ = causal_lm.resolve_model(cfg["model"])
    tokenizer = causal_lm.load_tokenizer(path)
    jsonl = pairs.chatterbot_jsonl(cfg["seed"], examples=cfg["examples"])
    examples = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [causal_lm.encode(tokenizer, [{"role": "user", "content": e["prompt"]}], e["completion"], cfg["max_length"]) for e in examples]
    a, b = cfg["train_examples"], cfg["train_examples"] + cfg["validation_examples"]
    c = b + cfg["test_examples"]
    return {"train": rows[:a], "validation": rows[a:b], "test": rows[b:c]}, tokenizer


def bf16_ok() -> bool:
    import torch

    from fmtune.models import loading

    return loading.bf16_supported(torch.device("cpu"))


def run_fmtune(cfg: dict, split: dict, tokenizer, bf16: bool, recipe: str = "fmtune"):
    from fmtune.config import TrainConfig
    from fmtune.models import causal_lm
    from fmtune.training import causal

    path, _ = causal_lm.resolve_model(cfg["model"])
    model = causal_lm.load_model(path)
    tc = TrainConfig(epochs=cfg["epochs"], patience=cfg["epochs"], batch_size=cfg["batch_size"], weight_decay=cfg["weight_decay"], warmup_ratio=cfg["warmup_ratio"],
                     lora_r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"], lora_dropout=cfg["lora_dropout"], class_weights="none",
                     length_bucketing=recipe == "fmtune", packing=recipe == "fmtune_packing")
    result = causal.fit(model, split["train"], split["validation"], tc, pad_id=tokenizer.pad_token_id or 0, learning_rate=cfg["learning_rate"],
                           seed=cfg["seed"], bf16=bf16, lora=True)
    return result.model, result.train_seconds, {"levers": result.levers, "train_loss": result.history[-1]["train_loss"]}


def run_trainer(cfg: dict, split: dict, tokenizer, bf16: bool):
    import torch
    from datasets import Dataset
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from fmtune.models import causal_lm

    torch.manual_seed(cfg["seed"])
    path, _ = causal_lm.resolve_model(cfg["model"])
    model = causal_lm.load_model(path)
    model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"], lora_dropout=cfg["lora_dropout"], target_modules="all-linear"))
    rows = split["train"]
    data = Dataset.from_dict({"input_ids": [r.input_ids for r in rows], "attention_mask": [[1] * len(r.input_ids) for r in rows], "labels": [r.labels for r in rows]})
    steps = cfg["epochs"] * -(-len(rows) // cfg["batch_size"])
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=cfg["batch_size"], num_train_epochs=cfg["epochs"], learning_rate=cfg["learning_rate"],
            weight_decay=cfg["weight_decay"], warmup_steps=int(cfg["warmup_ratio"] * steps), seed=cfg["seed"], bf16=bf16, use_cpu=True,
            train_sampling_strategy="group_by_length", save_strategy="no", eval_strategy="no", logging_strategy="no", report_to="none",
            disable_tqdm=True, dataloader_num_workers=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100))
        start = time.perf_counter()
        output = trainer.train()
        seconds = time.perf_counter() - start
    return model.merge_and_unload(), seconds, {"train_loss": round(float(output.training_loss), 5)}


def child(recipe: str, cfg: dict) -> dict:
    """One recipe in this fresh process. fmtune chooses the OpenMP wait policy as its CLI does (fmtune.training.threads, before
    torch starts); Trainer + PEFT runs in the environment its users have (OpenMP's defaults)."""
    import resource

    from fmtune.training import threads

    if recipe.startswith("fmtune"):
        threads.configure()

    import torch
    from transformers.utils import logging as hf_logging

    from fmtune.models import causal_lm

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    split, tokenizer = load_rows(cfg)
    bf16 = bf16_ok()
    if recipe.startswith("fmtune"):
        model, seconds, extra = run_fmtune(cfg, split, tokenizer, bf16, recipe)
    else:
        model, seconds, extra = run_trainer(cfg, split, tokenizer, bf16)
    nll = causal_lm.completion_nll(model, split["test"], tokenizer.pad_token_id or 0, 16, bf16=False)
    real_tokens = cfg["epochs"] * sum(len(r.input_ids) for r in split["train"])
    return {
        "recipe": recipe, "bf16": bf16, "threads": torch.get_num_threads(), "train_seconds": round(seconds, 3), "real_tokens": real_tokens,
        "real_tokens_per_s": round(real_tokens / seconds, 1), "examples_per_s": round(cfg["epochs"] * len(split["train"]) / seconds, 2),
        "test_answer_nll": round(float(nll.mean()), 4), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "omp_wait": threads.choice(), **extra,
    }


def spawn(args: list[str], env: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env={**os.environ, **{k: str(v) for k, v in env.items()}})
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--quick", action="store_true", help="smoke run: 48 train / 8 validation / 16 test pairs")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "gen_train_speed.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cfg = dict(CONFIG) if args.config is None else json.loads(args.config)
    if args.quick and args.config is None:
        cfg.update(examples=72, train_examples=48, validation_examples=8, test_examples=16)
    if args.child:
        print(json.dumps(child(args.child, cfg)))
        return
    from fmtune.models.loading import hardware_description

    repeats = args.repeats or cfg["repeats"]
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    wall = time.perf_counter()
    ablations = cfg.get("ablations", [])
    rows: dict[str, list[dict]] = {r: [] for r in cfg["recipes"] + ablations}
    for rep in range(repeats):
        order = cfg["recipes"][rep % 2 :] + cfg["recipes"][: rep % 2]
        for recipe in order + (ablations if rep == 0 else []):
            row = spawn(["--child", recipe, "--config", json.dumps(cfg)], cfg["env"])
            row["load_after"] = round(os.getloadavg()[0], 2)
            rows[recipe].append(row)
            print(f"  repeat {rep + 1}: {recipe:13s} {row['train_seconds']:7.2f} s  {row['real_tokens_per_s']:8.1f} tok/s  answer NLL {row['test_answer_nll']:.4f}  "
                  f"peak RSS {row['peak_rss_mb']:.0f} MB  load {row['load_after']}", flush=True)
    med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
    table = {r: {"runs": len(rs), "bf16": rs[0]["bf16"], "train_seconds": round(med(rs, "train_seconds"), 2), "train_seconds_all": [x["train_seconds"] for x in rs],
                 "real_tokens_per_s": round(med(rs, "real_tokens_per_s"), 1), "examples_per_s": round(med(rs, "examples_per_s"), 2),
                 "test_answer_nll": round(med(rs, "test_answer_nll"), 4), "train_loss": round(med(rs, "train_loss"), 4), "peak_rss_mb": round(med(rs, "peak_rss_mb"), 1),
                 **({"levers": rs[0]["levers"]} if "levers" in rs[0] else {})} for r, rs in rows.items()}
    ours, ref = table["fmtune"], table["trainer_peft"]
    ratios = {"tokens_per_s_vs_trainer_peft": round(ours["real_tokens_per_s"] / ref["real_tokens_per_s"], 3),
              "test_answer_nll_difference": round(ours["test_answer_nll"] - ref["test_answer_nll"], 4),
              "peak_rss_mb_vs_trainer_peft": round(ours["peak_rss_mb"] - ref["peak_rss_mb"], 1)}
    result = {"benchmark": "gen_train_speed", "date": started.isoformat(timespec="seconds"),
              "machine": {"description": hardware_description(), "platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count()},
              "load_average": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]},
              "config": {**cfg, "repeats": repeats, "quick": args.quick}, "recipes": table, "runs": rows, "ratios": ratios,
              "wall_seconds": round(time.perf_counter() - wall, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'recipe':13s} {'bf16':>5s} {'seconds':>8s} {'tok/s':>8s} {'answer NLL':>10s} {'RSS MB':>7s}")
    for r, t in table.items():
        print(f"{r:13s} {str(t['bf16']):>5s} {t['train_seconds']:8.2f} {t['real_tokens_per_s']:8.1f} {t['test_answer_nll']:10.4f} {t['peak_rss_mb']:7.0f}")
    print(f"\nwrote {args.out}\nratios: {json.dumps(ratios)}")


if __name__ == "__main__":
    main()
