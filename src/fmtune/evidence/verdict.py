"""Cost accounting and the verdict: was fine-tuning worth it, in plain words, taking the noise into account."""

from __future__ import annotations

import numpy as np

# Stated defaults, not measurements: typical on-demand cloud prices. Users pass --price-per-hour for their own.
PRICE_PER_VCPU_HOUR = 0.048
PRICE_GPU_HOUR = 2.50


def default_price(hardware: str, cpu_count: int) -> tuple[float, str]:
    if hardware.startswith("GPU"):
        return PRICE_GPU_HOUR, f"default ${PRICE_GPU_HOUR:.2f}/h, a typical on-demand price for one data-centre GPU (stated, not measured); pass --price-per-hour"
    price = round(PRICE_PER_VCPU_HOUR * cpu_count, 4)
    return price, f"default ${PRICE_PER_VCPU_HOUR}/vCPU-hour x {cpu_count} cores, a typical on-demand general-purpose cloud VM price (stated, not measured); pass --price-per-hour"


def cost(ladder: list[dict], hardware: str, cpu_count: int, price_per_hour: float | None, curve_seconds: float, task_type: str) -> dict:
    per_rung = {r["name"]: round(r["train_seconds"], 3) for r in ladder}
    ft = per_rung.get("fine_tuned", 0.0)
    if price_per_hour is None:
        price, source = default_price(hardware, cpu_count)
    else:
        price, source = price_per_hour, "given with --price-per-hour"
    out = {
        "train_seconds": ft,
        "all_rungs_seconds": round(sum(per_rung.values()) + curve_seconds, 3),
        "learning_curve_seconds": round(curve_seconds, 3),
        "hardware": hardware,
        "price_per_hour": price,
        "price_source": source,
        "train_cost": round(ft / 3600 * price, 6),
        "per_rung_seconds": per_rung,
    }
    if task_type == "classification":
        out["break_even_requests"] = None
        out["break_even_reason"] = (
            "not applicable: for an encoder classifier the few-shot rung (a head on frozen embeddings) runs the same forward pass "
            "per request as the tuned model, so fine-tuning saves no inference cost to pay the training back; its value is the "
            "accuracy gain"
        )
    return out


def verdict(ladder: list[dict], boots: dict, primary: str, retention: dict | None, audit: dict, curve: dict | None, cost_: dict) -> dict:
    """Recommend fine-tuning only when its gain over the best no-training rung is beyond the noise (paired bootstrap)."""
    from fmtune.evidence.evaluate import paired_gain_ci

    rungs = {r["name"]: r for r in ladder}
    ft = rungs["fine_tuned"]["metrics"][primary]
    # the best rung that does not train the FM: prompting it (zero_shot, few_shot), else a head on its frozen features
    no_training = [n for n in ("zero_shot", "few_shot") if n in rungs] or [n for n in ("head_only",) if n in rungs]
    if not no_training:
        raise ValueError("verdict: the ladder has no rung to compare fine_tuned with (zero_shot, few_shot or head_only); config.validate requires one")
    baseline = max(no_training, key=lambda n: rungs[n]["metrics"][primary])
    base_value = rungs[baseline]["metrics"][primary]
    gain = ft - base_value
    ci = paired_gain_ci(boots["fine_tuned"], boots[baseline])
    reasons: list[str] = []
    beyond_noise = ci[0] > 0
    if beyond_noise:
        reasons.append(f"fine_tuned {primary} {ft:.3f} vs {baseline} {base_value:.3f}: {gain:+.3f} (paired 95% CI {ci[0]:+.3f} to {ci[1]:+.3f}), beyond the noise (paired bootstrap over the same test examples)")
    elif ci[1] < 0:
        reasons.append(f"fine_tuned {primary} {ft:.3f} is worse than {baseline} {base_value:.3f} (paired 95% CI {ci[0]:+.3f} to {ci[1]:+.3f}): use the base FM as it is")
    else:
        reasons.append(f"fine_tuned {primary} {ft:.3f} vs {baseline} {base_value:.3f}: {gain:+.3f}, but the paired 95% CI {ci[0]:+.3f} to {ci[1]:+.3f} includes 0, so the gain is inside the noise; no recommendation to fine-tune")
    recommend = beyond_noise
    if "head_only" in rungs and baseline != "head_only":
        h = rungs["head_only"]["metrics"][primary]
        hci = paired_gain_ci(boots["fine_tuned"], boots["head_only"])
        if recommend and hci[0] > 0:
            reasons.append(f"fine-tuning the whole FM beats a linear head on the frozen FM ({h:.3f}) by {ft - h:+.3f} (95% CI {hci[0]:+.3f} to {hci[1]:+.3f}): updating the FM's weights is what bought the gain")
        elif recommend:
            recommend = False
            reasons.append(f"a linear head on the frozen FM ({h:.3f}) is within the noise of full fine-tuning ({ft - h:+.3f}, 95% CI {hci[0]:+.3f} to {hci[1]:+.3f}): the cheaper head_only model is enough; fine-tuning the FM is not worth it here")
        elif hci[1] < 0:
            reasons.append(f"fine_tuned ({ft:.3f}) is below a linear head on the frozen FM ({h:.3f}; 95% CI of the difference {hci[0]:+.3f} to {hci[1]:+.3f}): "
                           "the fine-tune fell short of what the FM's features already give; see the epochs and learning-rate choices")
    if rungs["fine_tuned"].get("still_improving"):
        reasons.append(f"fine-tuning was still improving on validation at its last epoch ({rungs['fine_tuned']['best_epoch']}): it is probably undertrained, "
                       "and more epochs or a higher learning rate may change this verdict")
    if "from_scratch" in rungs:
        s = rungs["from_scratch"]["metrics"][primary]
        reasons.append(f"pre-training matters: the same architecture trained from scratch on the same data and budget reaches {s:.3f} ({ft - s:+.3f} for fine-tuning)")
    if retention and "skipped" not in retention:
        change = retention["relative_change"]
        if retention.get("flag"):
            reasons.append(f"general knowledge dropped: retention probe {retention['base']:.3f} -> {retention['fine_tuned']:.3f} ({change:+.1%}), past the {retention['threshold']:.0%} threshold; check that the model is used only for this task")
        else:
            reasons.append(f"general knowledge kept: retention probe {retention['base']:.3f} -> {retention['fine_tuned']:.3f} ({change:+.1%})")
    n_train = rungs["fine_tuned"]["train_examples"]
    if n_train < 100:
        reasons.append(f"only {n_train} training examples: fine-tuning usually needs hundreds to thousands of labeled examples")
    if curve and "forecast" in curve and "at_2x" in curve.get("forecast", {}):
        f = curve["forecast"]
        lo, hi = f["at_2x"]["interval"]
        reasons.append(f"data: {n_train} training examples; the learning curve forecasts {f['at_2x']['metric']:.3f} (90% interval {lo:.3f}-{hi:.3f}) with {f['at_2x']['train_examples']} examples, {f['expected_gain_at_2x']:+.3f}")
    reasons.append(f"cost: {cost_['train_seconds']:.0f} s of training on {cost_['hardware']}, about ${cost_['train_cost']:.4f} at ${cost_['price_per_hour']}/h")
    if audit.get("train_test_overlap"):
        reasons.append(f"caution: {audit['train_test_overlap']} test texts also occur in train, so test scores are optimistic")
    gain_words = f"{gain:+.3f} {primary} over {baseline} (95% CI {ci[0]:+.3f} to {ci[1]:+.3f})"
    if recommend:
        headline = f"Fine-tuning helped: {gain_words}."
    elif beyond_noise:
        headline = f"Fine-tuning beat the no-training rungs ({gain_words}), but a linear head on the frozen FM is as good and cheaper: use head_only."
    else:
        headline = f"Fine-tuning is not recommended on this evidence: {gain_words}."
    return {"recommend_fine_tuning": bool(recommend), "gain": gain, "gain_ci95": ci, "baseline": baseline, "headline": headline, "reasons": reasons}


def break_even(cost_: dict, per_request: dict) -> dict:
    """Requests after which training paid for itself: train_cost / (cost per few-shot request - cost per tuned request)."""
    price_s = cost_["price_per_hour"] / 3600
    few, tuned = per_request["few_shot"]["mean_s"] * price_s, per_request["fine_tuned"]["mean_s"] * price_s
    out = {"cost_per_request_few_shot": few, "cost_per_request_fine_tuned": tuned}
    saving = few - tuned
    if saving <= 0:
        out["break_even_requests"] = None
        out["break_even_reason"] = (
            f"no saving per request: a few-shot request took {per_request['few_shot']['mean_s']:.3f} s and a fine-tuned one "
            f"{per_request['fine_tuned']['mean_s']:.3f} s (batch 1, mean of {per_request['fine_tuned']['requests']}), so the shorter "
            "prompts do not pay the training back; its value is the quality gain"
        )
    else:
        out["break_even_requests"] = float(np.ceil(cost_["train_cost"] / saving))
        out["break_even_reason"] = (
            f"few-shot prompts average {per_request['few_shot']['mean_prompt_tokens']:.0f} tokens against {per_request['fine_tuned']['mean_prompt_tokens']:.0f} "
            f"for the tuned model: {per_request['few_shot']['mean_s']:.3f} s vs {per_request['fine_tuned']['mean_s']:.3f} s per request (batch 1), "
            f"so training cost ${cost_['train_cost']:.4f} is recovered after about {int(out['break_even_requests'])} requests"
        )
    return out
