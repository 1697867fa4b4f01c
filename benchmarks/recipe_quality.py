"""Is fmtune's default fine-tune as good as a careful user's? On labeled sets of different shapes (benchmarks/sets.py),
fmtune's default fine_tuned rung (every default, its learning-rate search included) against

  - grid: Hugging Face Trainer with the usual recipe (AdamW, weight decay 0.01, 6% warm-up, batch 32, bf16 where the
    CPU has it, length-grouped dynamic padding) over learning rates {2e-5, 5e-5, 1e-4, 2e-4} x up to 10 epochs (linear
    decay over 10; a rate stops once its validation macro-F1 has not improved for GRID_PATIENCE epochs, as
    EarlyStoppingCallback would), the best (rate, epoch) picked on the same validation split's macro-F1, scored on test;
  - setfit: SetFit 1.x with the same MiniLM body, its own defaults, contrastive steps capped (SETFIT_MAX_STEPS) to fit
    the time; skipped on sets whose texts are cut at more than SETFIT_MAX_LENGTH tokens (its pairs would take hours);
  - head_only: fmtune's linear head on the frozen FM's embeddings (a rung of the same run).

Same splits for every recipe (fmtune's stratified 70/10/20 split, seed 0, written to train/validation/test files),
test macro-F1 with 95% bootstrap CIs over the same resamples, the paired difference fmtune minus the grid's best, and
the wall seconds each recipe trained (the grid: all 4 rates; fmtune: its whole fine_tuned stage, search included). Each
recipe runs in a fresh process.

    .venv/bin/python benchmarks/recipe_quality.py                          # every set (about 2 hours on 2 cores)
    .venv/bin/python benchmarks/recipe_quality.py --sets debates_party_3   # one set
    .venv/bin/python benchmarks/recipe_quality.py --quick                  # smoke: one small set, 2 rates x 2 epochs

Writes benchmarks/results/recipe_quality.json after each set, keeping the rows of sets not run this time (so sets can
be run one invocation at a time). Needs `make bench` (SetFit and datasets).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
DEFAULT_SETS = ["rotten_tomatoes_2", "debates_party_3", "convention_party_2", "chatterbot_topics_en"]
GRID_RATES = [2e-5, 5e-5, 1e-4, 2e-4]
GRID_EPOCHS = 10
GRID_PATIENCE = 3
SETFIT_MAX_STEPS = 600
SETFIT_MAX_LENGTH = 256
BOOTSTRAP = 2000


def _read(path: Path) -> tuple[list[str], list[str]]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    return [r["text"] for r in rows], [r["label"] for r in rows]


def split(data: Path, folder: Path) -> dict:
    """fmtune's own split of the set, written as three files that every recipe reads."""
    from fmtune.config import DataConfig
    from fmtune.data import labeled

    s = labeled.load_splits(DataConfig(data=data), 0)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("train", "validation", "test"):
        with open(folder / f"{name}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows((e.text, e.label) for e in getattr(s, name))
    return {"labels": s.labels, **{name: len(getattr(s, name)) for name in ("train", "validation", "test")}}


def max_length(folder: Path) -> int:
    """The max length fmtune derives from the training texts (every recipe uses the same)."""
    from fmtune.data import tokens
    from fmtune.models import loading
    from fmtune.tasks.choices import choose_max_length

    path = loading.resolve_model_path("minilm")
    tokenizer, config = loading.load_tokenizer(path), loading.load_encoder(path).config
    texts, _ = _read(folder / "train.csv")
    return choose_max_length(tokens.tokenise(tokenizer, texts, use_cache=False).lengths, loading.model_token_limit(config, tokenizer), None)[0]


# ---------------------------------------------------------------- the recipes (each in its own process)


def recipe_fmtune(folder: Path, args: dict) -> dict:
    import fmtune

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        extra = {"epochs": 2, "search": "2"} if args.get("quick") else {}
        r = fmtune.run(train=str(folder / "train.csv"), validation=str(folder / "validation.csv"), test=str(folder / "test.csv"), out=f"{tmp}/run",
                       rungs=["zero_shot", "few_shot", "head_only", "fine_tuned"], curve=False, quiet=True, latency_repeats=3, **extra)
        wall = time.perf_counter() - start
        texts, _ = _read(folder / "test.csv")
        predictions = [p["label"] for p in fmtune.load(r.run_dir).predict(texts)]
        rows = {row["name"]: row for row in r.report["ladder"]}
        stage = next(float(line.rsplit(": ", 1)[1].split()[0]) for line in r.report["run"]["stages"] if line.startswith("rung fine_tuned"))
        ft = rows["fine_tuned"]
        return {"predictions": predictions, "seconds": stage, "run_seconds": round(wall, 1), "learning_rate": ft["learning_rate"], "best_epoch": ft["best_epoch"],
                "epochs": len(ft["history"]), "search": ft.get("search"), "selection": ft.get("selection"), "learned": ft.get("learned"),
                "head_only_macro_f1": rows["head_only"]["metrics"]["macro_f1"], "head_only_ci95": rows["head_only"]["ci95"]["macro_f1"],
                "verdict": r.verdict.headline}


def recipe_grid(folder: Path, args: dict) -> dict:
    """Trainer over the rates x epochs; after each epoch the validation and test predictions are taken (the test ones
    only to report the chosen epoch's score; the choice is made on validation)."""
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments

    from fmtune.evidence.evaluate import macro_f1
    from fmtune.models import loading

    path = loading.resolve_model_path("minilm")
    tokenizer = loading.load_tokenizer(path)
    (tr_x, tr_y), (va_x, va_y), (te_x, te_y) = (_read(folder / f"{s}.csv") for s in ("train", "validation", "test"))
    labels = sorted(set(tr_y))
    index = {label: i for i, label in enumerate(labels)}
    enc = lambda xs: tokenizer(xs, truncation=True, max_length=args["max_length"])  # noqa: E731
    train = Dataset.from_dict({**enc(tr_x), "labels": [index[y] for y in tr_y]})
    bf16 = loading.bf16_supported(torch.device("cpu"))
    rates, epochs, patience = (GRID_RATES[1:3], 2, 2) if args.get("quick") else (GRID_RATES, GRID_EPOCHS, GRID_PATIENCE)
    runs, seconds = [], 0.0

    def predict(model, xs) -> np.ndarray:
        model.eval()
        out = []
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for i in range(0, len(xs), 64):
                batch = tokenizer(xs[i : i + 64], truncation=True, max_length=args["max_length"], padding=True, return_tensors="pt")
                out.append(model(**batch).logits.float().argmax(-1).numpy())
        model.train()
        return np.concatenate(out)

    class EveryEpoch(TrainerCallback):
        def __init__(self) -> None:
            self.rows, self.eval_seconds = [], 0.0

        def on_epoch_end(self, args_, state, control, model=None, **kw):
            t = time.perf_counter()
            val = predict(model, va_x)
            test = predict(model, te_x)
            self.eval_seconds += time.perf_counter() - t
            self.rows.append({"epoch": round(state.epoch), "val_macro_f1": macro_f1(np.array([index[y] for y in va_y]), val, len(labels)), "test": [labels[i] for i in test]})
            best = max(range(len(self.rows)), key=lambda i: self.rows[i]["val_macro_f1"])
            if len(self.rows) - 1 - best >= patience:
                control.should_training_stop = True

    for lr in rates:
        torch.manual_seed(0)
        model = loading.load_classifier(path, labels)
        callback = EveryEpoch()
        steps = epochs * -(-len(tr_x) // 32)
        with tempfile.TemporaryDirectory() as out:
            targs = TrainingArguments(output_dir=out, per_device_train_batch_size=32, num_train_epochs=epochs, learning_rate=lr, weight_decay=0.01,
                                      warmup_steps=int(0.06 * steps), seed=0, bf16=bf16, use_cpu=True, train_sampling_strategy="group_by_length",
                                      save_strategy="no", eval_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0)
            trainer = Trainer(model=model, args=targs, train_dataset=train, data_collator=DataCollatorWithPadding(tokenizer), callbacks=[callback])
            start = time.perf_counter()
            trainer.train()
            took = time.perf_counter() - start - callback.eval_seconds / 2  # the validation pass counts (the grid needs it), the test pass does not
        seconds += took
        best = max(callback.rows, key=lambda r: r["val_macro_f1"])  # the earliest epoch on a tie
        runs.append({"learning_rate": lr, "best_epoch": best["epoch"], "epochs_run": len(callback.rows), "val_macro_f1": round(best["val_macro_f1"], 4), "seconds": round(took, 1),
                     "val_by_epoch": [round(r["val_macro_f1"], 4) for r in callback.rows], "test": best["test"]})
    win = max(runs, key=lambda r: r["val_macro_f1"])
    return {"predictions": win["test"], "seconds": round(seconds, 1), "learning_rate": win["learning_rate"], "best_epoch": win["best_epoch"],
            "runs": [{k: v for k, v in r.items() if k != "test"} for r in runs], "bf16": bf16}


def recipe_setfit(folder: Path, args: dict) -> dict:
    if args["max_length"] > SETFIT_MAX_LENGTH:
        return {"skipped": f"texts cut at {args['max_length']} tokens (> {SETFIT_MAX_LENGTH}): SetFit's sentence pairs would not fit the time"}
    from datasets import Dataset
    from setfit import SetFitModel, Trainer, TrainingArguments

    from fmtune.models import loading

    (tr_x, tr_y), _, (te_x, _) = (_read(folder / f"{s}.csv") for s in ("train", "validation", "test"))
    model = SetFitModel.from_pretrained(str(loading.resolve_model_path("minilm")), local_files_only=True)
    steps = 20 if args.get("quick") else SETFIT_MAX_STEPS
    with tempfile.TemporaryDirectory() as out:  # SetFit writes its checkpoints under ./checkpoints unless told
        targs = TrainingArguments(output_dir=out, batch_size=16, num_epochs=1, max_steps=steps, seed=0, report_to="none", show_progress_bar=False,
                                  save_strategy="no")
        trainer = Trainer(model=model, args=targs, train_dataset=Dataset.from_dict({"text": tr_x, "label": tr_y}))
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    return {"predictions": [str(p) for p in model.predict(te_x)], "seconds": round(seconds, 1), "max_steps": steps}


RECIPES = {"fmtune": recipe_fmtune, "grid": recipe_grid, "setfit": recipe_setfit}


# ---------------------------------------------------------------- the comparison


def _scores(folder: Path, labels: list[str], results: dict) -> dict:
    import numpy as np

    from fmtune.evidence.evaluate import _macro_f1_batch, bootstrap_indices, macro_f1

    _, truth = _read(folder / "test.csv")
    index = {label: i for i, label in enumerate(labels)}
    y = np.array([index[t] for t in truth])
    boot = bootstrap_indices(len(y), BOOTSTRAP, 0)
    draws, out = {}, {}
    for name, res in results.items():
        if "predictions" not in res:
            continue
        pred = np.array([index.get(p, -1) for p in res["predictions"]])
        draws[name] = _macro_f1_batch(y[boot], pred[boot], len(labels))
        out[name] = {"macro_f1": round(macro_f1(y, pred, len(labels)), 4), "ci95": [round(float(np.percentile(draws[name], q)), 4) for q in (2.5, 97.5)]}
    if "fmtune" in draws and "grid" in draws:
        d = draws["fmtune"] - draws["grid"]
        out["fmtune_minus_grid"] = {"difference": round(out["fmtune"]["macro_f1"] - out["grid"]["macro_f1"], 4),
                                    "ci95": [round(float(np.percentile(d, q)), 4) for q in (2.5, 97.5)]}
    return out


def run_set(name: str, work: Path, recipes: list[str], quick: bool) -> dict:
    import sets

    data = sets.SETS[name](work / "data")
    folder = work / name
    info = split(data, folder)
    args = {"max_length": max_length(folder), "quick": quick}
    results = {}
    for recipe in recipes:
        out = folder / f"{recipe}.json"
        cmd = [sys.executable, __file__, "--one", recipe, "--folder", str(folder), "--args", json.dumps(args), "--out", str(out)]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if proc.returncode != 0:
            results[recipe] = {"error": proc.stderr[-2000:]}
            print(f"{name} {recipe}: FAILED\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        results[recipe] = json.loads(out.read_text())
        print(f"{name} {recipe}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    scores = _scores(folder, info["labels"], results)
    if "fmtune" in results and "head_only_macro_f1" in results["fmtune"]:
        scores["head_only"] = {"macro_f1": round(results["fmtune"]["head_only_macro_f1"], 4), "ci95": [round(c, 4) for c in results["fmtune"]["head_only_ci95"]]}
    for res in results.values():
        res.pop("predictions", None)
    return {"set": name, "classes": len(info["labels"]), "train": info["train"], "validation": info["validation"], "test": info["test"],
            "max_length": args["max_length"], "scores": scores, "recipes": results}


def table(rows: list[dict]) -> str:
    lines = ["| set | train / val / test | fmtune default | grid best (rate, epoch) | fmtune - grid (95% CI) | head_only | SetFit | seconds fmtune / grid / SetFit | fmtune verdict |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    fmt = lambda s: f"{s['macro_f1']:.3f} ({s['ci95'][0]:.3f}-{s['ci95'][1]:.3f})" if s else "-"  # noqa: E731
    for r in rows:
        sc, rec = r["scores"], r["recipes"]
        g = rec.get("grid", {})
        d = sc.get("fmtune_minus_grid")
        secs = " / ".join(f"{rec[k]['seconds']:.0f}" if "seconds" in rec.get(k, {}) else "-" for k in ("fmtune", "grid", "setfit"))
        diff = f"{d['difference']:+.3f} ({d['ci95'][0]:+.3f} to {d['ci95'][1]:+.3f})" if d else "-"
        grid = f"{fmt(sc.get('grid'))} ({g['learning_rate']:g}, {g['best_epoch']})" if "learning_rate" in g else "-"
        lines.append(f"| {r['set']} ({r['classes']} classes) | {r['train']} / {r['validation']} / {r['test']} | {fmt(sc.get('fmtune'))} | {grid} | "
                     f"{diff} | {fmt(sc.get('head_only'))} | {fmt(sc.get('setfit'))} | {secs} | {rec.get('fmtune', {}).get('verdict', '-')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default=",".join(DEFAULT_SETS))
    ap.add_argument("--recipes", default="fmtune,grid,setfit")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "results" / "recipe_quality.json"))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--args", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:  # a child: one recipe on one split
        from fmtune.training import threads

        if a.one == "fmtune":
            threads.configure()  # as the fmtune CLI does; the other recipes run with the environment their users have
        Path(a.out).write_text(json.dumps(RECIPES[a.one](Path(a.folder), json.loads(a.args))))
        return
    names = ["debates_party_3"] if a.quick and a.sets == ",".join(DEFAULT_SETS) else a.sets.split(",")
    out = Path(a.out)
    kept = [] if a.quick or not out.exists() else [row for row in json.loads(out.read_text())["sets"] if row["set"] not in names]
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            start = time.perf_counter()
            row = run_set(name, Path(tmp), a.recipes.split(","), a.quick)
            kept.append({**row, "seconds": round(time.perf_counter() - start), "date": datetime.date.today().isoformat()})
            _write_results(out, kept, a.quick)
            print(table([row]), file=sys.stderr)
    print(table(kept))


def _write_results(out: Path, rows: list[dict], quick: bool) -> None:
    from fmtune.models.loading import hardware_description

    order = {name: i for i, name in enumerate(DEFAULT_SETS)}
    rows.sort(key=lambda r: order.get(r["set"], len(order)))
    result = {"benchmark": "recipe_quality", "hardware": hardware_description(), "cpus": os.cpu_count(), "quick": quick,
              "grid": {"rates": GRID_RATES, "epochs": GRID_EPOCHS, "patience": GRID_PATIENCE}, "setfit_max_steps": SETFIT_MAX_STEPS,
              "setfit_max_length": SETFIT_MAX_LENGTH, "bootstrap": BOOTSTRAP, "sets": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
