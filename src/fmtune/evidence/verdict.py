"""Cost accounting and the verdict: was fine-tuning worth it, in plain words, taking the noise into account."""

from __future__ import annotations

from dataclasses import dataclass

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


# the smallest difference a test set can detect: a paired difference of (Z_CONFIDENCE + Z_POWER) standard errors is
# found beyond the noise at 95% confidence (two-sided) in 80% of test sets of the same size
Z_CONFIDENCE, Z_POWER = 1.96, 0.84
PROMPTING = ("zero_shot", "few_shot")  # the rungs that prompt the base FM (the contract's `gain` is over the best of them)
CHEAPER = ("zero_shot", "few_shot", "head_only")  # every rung that needs no fine-tuning of the FM


@dataclass(frozen=True)
class Comparison:
    """fine_tuned minus another rung on the same test resamples: the difference, its 95% CI, where the CI lies."""

    other: str
    difference: float
    ci: tuple[float, float]
    se: float  # standard deviation of the paired bootstrap differences
    n_test: int

    @property
    def outcome(self) -> str:
        """'above' or 'below': the CI excludes 0 on that side; 'inside': it includes 0."""
        return "above" if self.ci[0] > 0 else "below" if self.ci[1] < 0 else "inside"

    @property
    def detectable(self) -> float:
        """The smallest difference this test set detects at 95% confidence with 80% power."""
        return (Z_CONFIDENCE + Z_POWER) * self.se

    @property
    def examples_needed(self) -> int | None:
        """Test examples that would make the observed difference detectable (the standard error falls as 1/sqrt(n))."""
        if abs(self.difference) < 1e-9:
            return None
        return int(np.ceil(self.n_test * (self.detectable / abs(self.difference)) ** 2))

    def ci_words(self) -> str:
        return f"{self.difference:+.3f}, paired 95% CI {self.ci[0]:+.3f} to {self.ci[1]:+.3f}"

    def to_json(self) -> dict:
        return {"rung": self.other, "difference": self.difference, "ci95": list(self.ci), "outcome": self.outcome,
                "smallest_detectable": round(self.detectable, 4), "test_examples_needed": self.examples_needed}


def compare(rungs: dict, boots: dict, primary: str, other: str, n_test: int) -> Comparison:
    draws = np.asarray(boots["fine_tuned"]) - np.asarray(boots[other])
    ci = (float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5)))
    return Comparison(other, rungs["fine_tuned"]["metrics"][primary] - rungs[other]["metrics"][primary], ci, float(draws.std()), n_test)


def verdict(ladder: list[dict], boots: dict, primary: str, retention: dict | None, audit: dict, curve: dict | None, cost_: dict, n_test: int | None = None) -> dict:
    """Recommend fine-tuning only when it beats the strongest cheaper rung (prompting the FM, or a linear head on its
    frozen features) beyond the noise (paired bootstrap). Every sentence is one rule over the paired CIs."""
    rungs = {r["name"]: r for r in ladder}
    cheaper = [n for n in CHEAPER if n in rungs]
    if not cheaper:
        raise ValueError("verdict: the ladder has no rung to compare fine_tuned with (zero_shot, few_shot or head_only); config.validate requires one")
    strongest = max(cheaper, key=lambda n: rungs[n]["metrics"][primary])
    external = [r["name"] for r in ladder if r.get("external")]  # other models' outputs (--compare)
    vs = {n: compare(rungs, boots, primary, n, n_test or 0) for n in (*cheaper, "from_scratch", *external) if n in rungs}
    baseline = max([n for n in PROMPTING if n in rungs] or cheaper, key=lambda n: rungs[n]["metrics"][primary])  # the contract's `gain`
    headline, recommend = _headline(rungs, vs, primary, strongest, baseline)
    reasons = [_headline_reason(rungs, vs[strongest], primary, "the strongest rung that needs no fine-tuning")]
    if baseline != strongest:
        reasons.append(_headline_reason(rungs, vs[baseline], primary, "the best rung that prompts the base FM"))
    reasons += _head_only_sentence(rungs, vs, primary, strongest)
    reasons += _learning_sentences(rungs)
    reasons += _scratch_sentence(rungs, vs, primary)
    reasons += [_compared_sentence(rungs, vs[n], primary) for n in external]
    reasons += _detectability_sentences(vs, strongest)
    reasons += _context_sentences(rungs, retention, audit, curve, cost_)
    return {"recommend_fine_tuning": bool(recommend), "gain": vs[baseline].difference, "gain_ci95": list(vs[baseline].ci), "baseline": baseline,
            "strongest_alternative": strongest, "gain_over_strongest": vs[strongest].difference, "gain_over_strongest_ci95": list(vs[strongest].ci),
            "headline": headline, "reasons": reasons, "comparisons": {n: c.to_json() for n, c in vs.items()},
            "detectable": {"confidence": 0.95, "power": 0.8, "test_examples": n_test, "method": "paired bootstrap over the test examples: "
                           f"({Z_CONFIDENCE} + {Z_POWER}) x the standard deviation of the resampled differences"}}


def _headline(rungs: dict, vs: dict, primary: str, strongest: str, baseline: str) -> tuple[str, bool]:
    """The answer, against the strongest cheaper alternative (not only the best prompting rung)."""
    top = vs[strongest]
    words = f"{top.difference:+.3f} {primary} over {strongest} (95% CI {top.ci[0]:+.3f} to {top.ci[1]:+.3f})"
    if rungs["fine_tuned"].get("learned") is False:
        return f"Fine-tuning did not learn (its training loss stayed near chance), so this run cannot say whether fine-tuning helps: {words}.", False
    if top.outcome == "above":
        return f"Fine-tuning helped: {words}.", True
    if top.outcome == "below":
        use = "a linear head on the frozen FM (head_only)" if strongest == "head_only" else f"the base FM as it is ({strongest})"
        return f"Fine-tuning did worse than {strongest}: {words}; use {use}.", False
    if strongest == "head_only" and baseline != "head_only" and vs[baseline].outcome == "above":
        b = vs[baseline]
        return (f"Fine-tuning beat prompting the base FM ({b.difference:+.3f} over {baseline}, 95% CI {b.ci[0]:+.3f} to {b.ci[1]:+.3f}), but a linear head "
                f"on the frozen FM is as good and cheaper ({words}): use head_only."), False
    return f"Fine-tuning is not recommended on this evidence: {words}, inside the noise.", False


def _headline_reason(rungs: dict, c: Comparison, primary: str, which: str) -> str:
    ft, other = rungs["fine_tuned"]["metrics"][primary], rungs[c.other]["metrics"][primary]
    where = {"above": "beyond the noise", "below": "below it beyond the noise", "inside": "the CI includes 0, so the difference is inside the noise"}[c.outcome]
    return (f"against {which}, {c.other} ({other:.3f}): fine_tuned {primary} {ft:.3f}, "
            f"{c.ci_words()}; {where} (paired bootstrap over the same test examples)")


def _head_only_sentence(rungs: dict, vs: dict, primary: str, strongest: str) -> list[str]:
    """fine_tuned against a linear head on the frozen FM, always said when head_only ran."""
    if "head_only" not in vs:
        return []
    c, h, ft = vs["head_only"], rungs["head_only"]["metrics"][primary], rungs["fine_tuned"]["metrics"][primary]
    if c.outcome == "above":
        return [f"fine-tuning the whole FM beats a linear head on the frozen FM ({h:.3f}) ({c.ci_words()}): updating the FM's weights is what bought the gain"]
    advice = "use head_only, or try a larger base model or more labeled data"
    if c.outcome == "below":
        return [f"fine_tuned ({ft:.3f}) is below a linear head on the frozen FM ({h:.3f}) beyond the noise ({c.ci_words()}): the fine-tune fell short of "
                f"what the FM's frozen features already give; {advice} (see the epochs and learning-rate choices)"]
    if c.difference < 0:
        return [f"fine_tuned ({ft:.3f}) scored {-c.difference:.3f} below a linear head on the frozen FM ({h:.3f}), within the noise ({c.ci_words()}): "
                f"fine-tuning bought nothing measurable over the FM's frozen features; {advice}"]
    return [f"a linear head on the frozen FM ({h:.3f}) is within the noise of fine-tuning ({c.ci_words()}): the cheaper head_only model is as good on this test set"]


def _learning_sentences(rungs: dict) -> list[str]:
    ft, out = rungs["fine_tuned"], []
    if ft.get("learned") is False:
        out.append("the fine-tune did not learn: the training loss of its chosen epoch stayed near chance (see the epochs choice), so its score is no "
                   "evidence about fine-tuning; more epochs or a higher learning rate may change this verdict")
    if ft.get("still_improving"):
        out.append(f"fine-tuning was still improving on validation at its last epoch ({ft['best_epoch']}): it is probably undertrained, "
                   "and more epochs or a higher learning rate may change this verdict")
    return out


def _scratch_sentence(rungs: dict, vs: dict, primary: str) -> list[str]:
    """What pre-training bought: said only as far as the paired CI of fine_tuned against from_scratch supports it."""
    if "from_scratch" not in vs:
        return []
    c, s = vs["from_scratch"], rungs["from_scratch"]["metrics"][primary]
    if rungs["from_scratch"].get("learned") is False:
        epochs = len(rungs["from_scratch"].get("history") or [])
        budget = f" in its {epochs} epochs (its budget: the from_scratch_epochs choice; --scratch-budget offers more, at its cost)" if epochs else ""
        return [f"the from_scratch rung did not learn{budget} (its training loss stayed near chance; {s:.3f}): it says nothing about what pre-training bought"]
    if c.outcome == "above":
        return [f"pre-training matters: the same architecture trained from scratch on the same data reaches {s:.3f}; fine-tuning the pre-trained FM is "
                f"better ({c.ci_words()})"]
    if c.outcome == "below":
        return [f"training the same architecture from scratch did better than fine-tuning ({s:.3f}; fine-tuning {c.ci_words()}): the pre-trained "
                "weights did not help on this data"]
    return [f"on this data, pre-training bought no measurable gain: the same architecture trained from scratch reaches {s:.3f} (fine-tuning "
            f"{c.ci_words()}, inside the noise)"]


def _compared_sentence(rungs: dict, c: Comparison, primary: str) -> str:
    """fine_tuned against another model's outputs (--compare), as far as the paired CI supports it."""
    other, ft = rungs[c.other]["metrics"][primary], rungs["fine_tuned"]["metrics"][primary]
    if c.outcome == "above":
        return f"the model fine-tuned here beats {c.other} ({other:.3f}) on the same test examples ({c.ci_words()})"
    if c.outcome == "below":
        return f"the model fine-tuned here ({ft:.3f}) falls short of {c.other} ({other:.3f}) beyond the noise ({c.ci_words()}): it does not yet replace it"
    return (f"the model fine-tuned here ({ft:.3f}) is within the noise of {c.other} ({other:.3f}) on the same test examples ({c.ci_words()}): "
            "this test set finds no difference between them")


def _detectability_sentences(vs: dict, strongest: str) -> list[str]:
    """When a difference at stake is inside the noise and smaller than what the test set can detect: say so, with the size that would."""
    out = []
    for name in dict.fromkeys((strongest, "head_only", "from_scratch", *[n for n in vs if n not in CHEAPER and n != "from_scratch"])):
        c = vs.get(name)
        if c is None or c.outcome != "inside" or abs(c.difference) >= c.detectable or not c.n_test:
            continue
        need = c.examples_needed
        more = (f"about {need} test examples ({need - c.n_test} more) would detect a difference of this size" if need is not None
                else "no test set size detects a difference of zero")
        out.append(f"this test set ({c.n_test} examples) detects differences from {name} of about {c.detectable:.3f} or more (95% confidence, 80% power); "
                   f"the observed {c.difference:+.3f} is below that: {more}")
    return out


def _context_sentences(rungs: dict, retention: dict | None, audit: dict, curve: dict | None, cost_: dict) -> list[str]:
    out = []
    if retention and "skipped" not in retention:
        change = retention["relative_change"]
        if retention.get("flag"):
            out.append(f"general knowledge dropped: retention probe {retention['base']:.3f} -> {retention['fine_tuned']:.3f} ({change:+.1%}), past the {retention['threshold']:.0%} threshold; check that the model is used only for this task")
        else:
            out.append(f"general knowledge kept: retention probe {retention['base']:.3f} -> {retention['fine_tuned']:.3f} ({change:+.1%})")
    n_train = rungs["fine_tuned"]["train_examples"]
    if n_train < 100:
        out.append(f"only {n_train} training examples: fine-tuning usually needs hundreds to thousands of labeled examples")
    if curve and "forecast" in curve and "at_2x" in curve.get("forecast", {}):
        f = curve["forecast"]
        lo, hi = f["at_2x"]["interval"]
        out.append(f"data: {n_train} training examples; the learning curve forecasts {f['at_2x']['metric']:.3f} (90% interval {lo:.3f}-{hi:.3f}) with {f['at_2x']['train_examples']} examples, {f['expected_gain_at_2x']:+.3f}")
    out.append(f"cost: {cost_['train_seconds']:.0f} s of training on {cost_['hardware']}, about ${cost_['train_cost']:.4f} at ${cost_['price_per_hour']}/h")
    if audit.get("train_test_overlap"):
        out.append(f"caution: {audit['train_test_overlap']} test texts also occur in train, so test scores are optimistic")
    return out


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
