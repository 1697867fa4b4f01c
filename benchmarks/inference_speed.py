"""Inference throughput: fmtune's batched inference path against Hugging Face pipelines on the same model and inputs.

    .venv/bin/python benchmarks/inference_speed.py                      # 3 interleaved repeats (~6 minutes, 2 cores)
    .venv/bin/python benchmarks/inference_speed.py --repeats 1 --quick  # smoke run

Classification (all-MiniLM-L6-v2 with a seeded two-label head, or a run's tuned model with --run): 1,000 Rotten
Tomatoes snippets scored by fmtune.evidence.evaluate.predict_logits (the path `fmtune predict`, `serve` and every ladder rung
use: tokenise once, length-sorted batches of 64, inference_mode, bf16 autocast where fmtune.models.loading.bf16_supported
says it pays) against transformers.pipeline("text-classification", batch_size=64) in fp32 (its default) and with the
model cast to bf16. Generation (SmolLM2-135M-Instruct): greedy answers of 48 chatterbot questions, max 24 new tokens,
by fmtune.models.causal_lm.generate (left-padded batches of 16, longest prompts first; with bf16 the model is cast once, as
`fmtune predict` and `serve` hold it) against transformers.pipeline("text-generation", batch_size=16) in fp32 and with
the model cast to bf16. `onnx_classify`: the same classifier exported by fmtune.serving.export (torch.onnx, checked
with onnx.checker) and scored by its OnnxPredictor in ONNX Runtime (fp32, CPUExecutionProvider, length-sorted batches
of 64: the path of `fmtune serve --runtime onnx`); the export itself is not timed. Every measurement runs in a fresh subprocess,
repeats are interleaved in a rotated order, medians are reported, and agreement with the reference's outputs
(same argmax label / same generated text) is recorded next to the speed. Writes benchmarks/results/inference_speed.json.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CONFIG = {"texts": 1000, "max_length": 128, "batch_size": 64, "prompts": 48, "gen_batch_size": 16, "max_new_tokens": 24, "seed": 0, "repeats": 3,
          "recipes": ["fmtune_classify", "pipeline_classify", "pipeline_classify_bf16", "onnx_classify", "fmtune_generate", "pipeline_generate", "pipeline_generate_bf16"],
          "env": {}}  # extra environment for every recipe; fmtune sets its own thread policy (child()), pipelines run with OpenMP's defaults


def classifier(run: str | None):
    import torch

    from fmtune.models import loading

    if run:
        from fmtune.serving.predict import Predictor

        p = Predictor.from_run(run)
        return p.model, p.tokenizer
    path = loading.resolve_model_path("minilm")
    torch.manual_seed(0)
    return loading.load_classifier(path, ["rotten", "fresh"]).eval(), loading.load_tokenizer(path)


def texts(cfg: dict) -> list[str]:
    import pandas as pd

    from fmtune.data.quickstart import rotten_tomatoes_csv

    return pd.read_csv(rotten_tomatoes_csv(cfg["texts"], cfg["seed"]), dtype=str, keep_default_na=False)["text"].tolist()


def questions(cfg: dict) -> list[str]:
    from fmtune.data.pairs import chatterbot_jsonl

    path = chatterbot_jsonl(cfg["seed"], examples=max(cfg["prompts"], 100))
    return [json.loads(line)["prompt"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()][: cfg["prompts"]]


def child(recipe: str, cfg: dict, run: str | None) -> dict:
    from fmtune.training import threads

    if recipe.startswith("fmtune"):
        threads.configure()  # as `fmtune predict` does, before torch starts its threads
    import torch
    from transformers import pipeline
    from transformers.utils import logging as hf_logging

    from fmtune.evidence.evaluate import predict_logits
    from fmtune.models import causal_lm, loading

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    bf16 = loading.bf16_supported(torch.device("cpu"))
    if "classify" in recipe:
        model, tokenizer = classifier(run)
        data = texts(cfg)
        if recipe == "fmtune_classify":
            predict_logits(model, tokenizer, data[:64], cfg["max_length"], cfg["batch_size"], bf16)  # warm-up, as a server would be
            start = time.perf_counter()
            labels = predict_logits(model, tokenizer, data, cfg["max_length"], cfg["batch_size"], bf16).argmax(1).tolist()
        elif recipe == "onnx_classify":
            import tempfile

            from fmtune.serving import export

            folder = Path(tempfile.mkdtemp())
            names = export._input_names(model, tokenizer)
            export._export(model.float().eval(), tokenizer, data[:2], cfg["max_length"], names, folder / "model.onnx", None)
            labels_ = [model.config.id2label[i] for i in range(model.config.num_labels)]
            onnx_model = export.OnnxPredictor(folder, export._session(folder / "model.onnx"), tokenizer, labels_, cfg["max_length"])
            onnx_model.logits(data[:64], cfg["batch_size"])  # warm-up
            start = time.perf_counter()
            labels = onnx_model.logits(data, cfg["batch_size"]).argmax(1).tolist()
        else:
            if recipe.endswith("bf16"):
                model = model.to(torch.bfloat16)
            pipe = pipeline("text-classification", model=model, tokenizer=tokenizer, device="cpu")
            kwargs = dict(batch_size=cfg["batch_size"], truncation=True, max_length=cfg["max_length"])
            pipe(data[:64], **kwargs)
            start = time.perf_counter()
            out = pipe(data, **kwargs)
            labels = [model.config.label2id[o["label"]] for o in out]
        seconds = time.perf_counter() - start
        return {"recipe": recipe, "kind": "classification", "seconds": round(seconds, 3), "items": len(data), "items_per_s": round(len(data) / seconds, 1),
                "bf16": bf16 if recipe == "fmtune_classify" else recipe.endswith("bf16"), "outputs": labels}  # onnx_classify: fp32
    path, _ = causal_lm.resolve_model("smollm2")
    tokenizer = causal_lm.load_tokenizer(path)
    model = causal_lm.load_model(path).eval()
    conversations = [[{"role": "user", "content": q}] for q in questions(cfg)]
    if recipe == "fmtune_generate":
        model = causal_lm.for_inference(model, bf16)  # as `fmtune predict` / `fmtune serve` hold it: cast once at load
        causal_lm.generate(model, tokenizer, conversations[:2], cfg["max_new_tokens"], 2, bf16)
        start = time.perf_counter()
        answers = causal_lm.generate(model, tokenizer, conversations, cfg["max_new_tokens"], cfg["gen_batch_size"], bf16)
    else:
        if recipe.endswith("bf16"):
            model = model.to(torch.bfloat16)
        tokenizer.padding_side = "left"
        pipe = pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu")
        stops = causal_lm.stop_token_ids(tokenizer)
        kwargs = dict(batch_size=cfg["gen_batch_size"], max_new_tokens=cfg["max_new_tokens"], do_sample=False, return_full_text=False, eos_token_id=stops,
                      pad_token_id=tokenizer.pad_token_id)
        pipe(conversations[:2], **kwargs)
        start = time.perf_counter()
        out = pipe(conversations, **kwargs)
        answers = [o[0]["generated_text"][-1]["content"].strip() if isinstance(o[0]["generated_text"], list) else o[0]["generated_text"].strip() for o in out]
    seconds = time.perf_counter() - start
    new_tokens = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    return {"recipe": recipe, "kind": "generation", "seconds": round(seconds, 3), "items": len(conversations), "items_per_s": round(len(conversations) / seconds, 2),
            "new_tokens_per_s": round(new_tokens / seconds, 1), "bf16": bf16 if recipe == "fmtune_generate" else recipe.endswith("bf16"), "outputs": answers}


def spawn(args: list[str], env: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env={**os.environ, **{k: str(v) for k, v in env.items()}})
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def agreement(a: list, b: list) -> float:
    return round(sum(x == y for x, y in zip(a, b)) / max(len(a), 1), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--quick", action="store_true", help="smoke run: 200 texts, 8 prompts")
    parser.add_argument("--run", help="a classification run folder whose tuned model to use (default: the base model with a seeded head)")
    parser.add_argument("--recipes", help="comma-separated subset of the recipes (default: all), e.g. fmtune_classify,pipeline_classify,pipeline_classify_bf16,onnx_classify")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "inference_speed.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cfg = dict(CONFIG) if args.config is None else json.loads(args.config)
    if args.quick and args.config is None:
        cfg.update(texts=200, prompts=8)
    if args.recipes and args.config is None:
        cfg["recipes"] = args.recipes.split(",")
    if args.child:
        print(json.dumps(child(args.child, cfg, args.run)))
        return
    from fmtune.models.loading import hardware_description

    repeats = args.repeats or cfg["repeats"]
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    wall = time.perf_counter()
    recipes = cfg["recipes"]
    rows: dict[str, list[dict]] = {r: [] for r in recipes}
    for rep in range(repeats):
        for recipe in recipes[rep % len(recipes) :] + recipes[: rep % len(recipes)]:
            row = spawn(["--child", recipe, "--config", json.dumps(cfg), *(["--run", args.run] if args.run else [])], cfg["env"])
            row["load_after"] = round(os.getloadavg()[0], 2)
            rows[recipe].append(row)
            rate = f"{row['new_tokens_per_s']:7.1f} new tok/s" if "new_tokens_per_s" in row else f"{row['items_per_s']:7.1f} texts/s"
            print(f"  repeat {rep + 1}: {recipe:24s} {row['seconds']:7.2f} s  {rate}  load {row['load_after']}", flush=True)
    reference = {kind: rows[name][0]["outputs"] for kind, name in (("classification", "pipeline_classify"), ("generation", "pipeline_generate")) if name in rows}
    table = {}
    for r, rs in rows.items():
        med = lambda k: statistics.median(x[k] for x in rs)  # noqa: E731
        table[r] = {"kind": rs[0]["kind"], "bf16": rs[0]["bf16"], "runs": len(rs), "seconds": round(med("seconds"), 3), "seconds_all": [x["seconds"] for x in rs],
                    "items_per_s": round(med("items_per_s"), 2), **({"new_tokens_per_s": round(med("new_tokens_per_s"), 1)} if "new_tokens_per_s" in rs[0] else {}),
                    "agreement_with_fp32_pipeline": agreement(rs[0]["outputs"], reference[rs[0]["kind"]]) if rs[0]["kind"] in reference else None}
    pairs = {"classify_vs_pipeline_fp32": ("fmtune_classify", "pipeline_classify"), "classify_vs_pipeline_bf16": ("fmtune_classify", "pipeline_classify_bf16"),
             "generate_vs_pipeline_fp32": ("fmtune_generate", "pipeline_generate"), "generate_vs_pipeline_bf16": ("fmtune_generate", "pipeline_generate_bf16"),
             "onnx_vs_fmtune_classify": ("onnx_classify", "fmtune_classify"), "onnx_vs_pipeline_fp32": ("onnx_classify", "pipeline_classify")}
    ratios = {name: round(table[a]["items_per_s"] / table[b]["items_per_s"], 3) for name, (a, b) in pairs.items() if a in table and b in table}
    result = {"benchmark": "inference_speed", "date": started.isoformat(timespec="seconds"),
              "machine": {"description": hardware_description(), "platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count()},
              "load_average": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in os.getloadavg()]},
              "config": {**cfg, "repeats": repeats, "quick": args.quick, "run": args.run}, "recipes": table, "ratios": ratios,
              "runs": {r: [{k: v for k, v in x.items() if k != "outputs"} for x in rs] for r, rs in rows.items()}, "wall_seconds": round(time.perf_counter() - wall, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'recipe':24s} {'bf16':>5s} {'seconds':>8s} {'items/s':>8s} {'agree':>6s}")
    for r, t in table.items():
        print(f"{r:24s} {str(t['bf16']):>5s} {t['seconds']:8.2f} {t['items_per_s']:8.1f} {t['agreement_with_fp32_pipeline'] or float('nan'):6.3f}")
    print(f"\nwrote {args.out}\nratios: {json.dumps(ratios)}")


if __name__ == "__main__":
    main()
