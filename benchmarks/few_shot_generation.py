"""The few_shot rung's generation with and without the shared-prefix cache, on SmolLM2-135M-Instruct (packaged).

    .venv/bin/python benchmarks/few_shot_generation.py [--prompts 48] [--shots 8] [--repeats 3]

The prompts are the generation rung's own: benchmarks/sets.py's reviews_verdict_gen (a ~110-token film review and a
one-word question per prompt), each preceded by the same `--shots` training pairs as earlier chat turns (what
fmtune's few_shot rung sends, system turn included). Both sides decode greedily with the same stop tokens, batch size
and max_new_tokens (fmtune's own choice for this data: the reference answers' token lengths):

  - generate: transformers' generate() over the whole left-padded prompts (fmtune before the prefix cache);
  - prefix_cache: fmtune's causal_lm.generate, which runs the shared prefix once and continues every batch from a
    copy of its key/value cache.

Interleaved repeats, fp32 and bf16 (where the CPU has it); the answers of the two sides are compared token for token.
Writes benchmarks/results/few_shot_generation.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)  # fmtune's eval_batch_size default
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "few_shot_generation.json")
    args = parser.parse_args()

    import torch

    from fmtune.data.pairs import Pair
    from fmtune.models import causal_lm
    from fmtune.models.loading import cpu_flags, hardware_description
    from fmtune.tasks.generation import choose_max_new_tokens, few_shot_conversation
    from sets import reviews_verdict_gen

    with tempfile.TemporaryDirectory() as tmp:
        rows = [json.loads(line) for line in reviews_verdict_gen(Path(tmp)).read_text().splitlines()]
    folder = causal_lm.smollm2_folder()
    tokenizer = causal_lm.load_tokenizer(folder)
    model = causal_lm.load_model(folder)
    shots = [Pair((("user", r["prompt"]),), r["completion"], "reviews_verdict_gen", i) for i, r in enumerate(rows[: args.shots])]
    tests = rows[args.shots : args.shots + args.prompts]
    conversations = [few_shot_conversation(shots, [{"role": "user", "content": r["prompt"]}]) for r in tests]
    new_tokens, why = choose_max_new_tokens(tokenizer, [r["completion"] for r in rows[args.shots + args.prompts :]], None, 8192)
    prompts = [causal_lm.prompt_ids(tokenizer, c) for c in conversations]
    shared = min(causal_lm.common_prefix(prompts), min(map(len, prompts)) - 1)
    stops, pad = causal_lm.stop_token_ids(tokenizer), tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def whole(m):
        with torch.inference_mode():
            answers = causal_lm._generate_batches(causal_lm.for_inference(m, False), prompts, new_tokens, stops, pad, args.batch_size, None)
        return [tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers]

    def cached(m):
        return causal_lm.generate(m, tokenizer, conversations, new_tokens, args.batch_size)

    precisions = {"fp32": model}
    if {"avx512_bf16", "amx_bf16"} & set(cpu_flags()):
        precisions["bf16"] = causal_lm.for_inference(model, True)
    result = {"benchmark": "few_shot_generation", "hardware": hardware_description(), "cpus": os.cpu_count(), "model": "SmolLM2-135M-Instruct",
              "prompts": len(prompts), "shots": args.shots, "shared_prefix_tokens": shared, "mean_prompt_tokens": round(sum(map(len, prompts)) / len(prompts), 1),
              "max_new_tokens": new_tokens, "max_new_tokens_why": why, "batch_size": args.batch_size, "repeats": args.repeats,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "precisions": {}}
    for name, m in precisions.items():
        seconds = {"generate": [], "prefix_cache": []}
        answers = {}
        for _ in range(args.repeats):  # interleaved
            for side, fn in (("generate", whole), ("prefix_cache", cached)):
                t = time.perf_counter()
                answers[side] = fn(m)
                seconds[side].append(round(time.perf_counter() - t, 2))
        agree = sum(a == b for a, b in zip(answers["generate"], answers["prefix_cache"])) / len(prompts)
        best = {k: min(v) for k, v in seconds.items()}
        result["precisions"][name] = {"seconds": seconds, "best_seconds": best, "speedup": round(best["generate"] / best["prefix_cache"], 2),
                                      "answers_identical": round(agree, 4), "example_answers": answers["prefix_cache"][:5]}
        print(f"{name}: generate {best['generate']:.1f} s, prefix cache {best['prefix_cache']:.1f} s ({result['precisions'][name]['speedup']}x), "
              f"answers identical {agree:.0%}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
