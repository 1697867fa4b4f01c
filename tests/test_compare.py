"""--compare NAME=FILE: another model's outputs on the same test inputs become a rung of the ladder, scored on the same
examples and bootstrap resamples as the others, paired with fine_tuned in the verdict."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from fmtune.config import DataConfig, build_config, validate
from fmtune.data import external
from fmtune.errors import ConfigError, DataError
from fmtune.evidence import verdict

SCHEMA = json.loads((Path(__file__).parents[1] / "src" / "fmtune" / "schema" / "report.schema.json").read_text())


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_outputs_are_matched_to_the_test_inputs_by_text(tmp_path):
    f = write_jsonl(tmp_path / "vendor.jsonl", [{"text": " good film ", "prediction": "pos"}, {"text": "bad film", "prediction": "neg"},
                                                {"text": "a training text", "prediction": "pos"}])
    got = external.read_outputs("vendor", f, ["bad film", "good film"], False, DataConfig())
    assert got.outputs == ["neg", "pos"] and got.rows == 3 and got.ignored == 1 and len(got.sha256) == 64
    with pytest.raises(DataError, match=r"--compare vendor=.*no output for 1 of the 3 test inputs, e.g. 'unseen'"):
        external.read_outputs("vendor", f, ["bad film", "good film", "unseen"], False, DataConfig())
    clash = write_jsonl(tmp_path / "clash.jsonl", [{"text": "x", "label": "pos"}, {"text": "x", "label": "neg"}])
    with pytest.raises(DataError, match=r"clash.jsonl line 2: the input 'x' appears earlier with another output"):
        external.read_outputs("v", clash, ["x"], False, DataConfig())
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"review": "x", "prediction": "pos"}])
    with pytest.raises(DataError, match=r"needs an input column \('text'"):
        external.read_outputs("v", wrong, ["x"], False, DataConfig())


def test_generation_outputs_from_prompts_or_chat_files(tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "capital of France?", "completion": "Paris"}])
    assert external.read_outputs("gpt", prompts, ["capital of France?"], True, DataConfig()).outputs == ["Paris"]
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "capital of Peru?"},
                                                            {"role": "assistant", "content": "Lima"}]}])
    from fmtune.data.pairs import Pair

    key = Pair((("system", "be brief"), ("user", "capital of Peru?")), "", "", 0).prompt
    assert external.read_outputs("gpt", chat, [key], True, DataConfig()).outputs == ["Lima"]


def test_compare_names_and_files_are_validated(tmp_path, reviews_csv):
    f = write_jsonl(tmp_path / "v.jsonl", [{"text": "x", "prediction": "pos"}])
    assert not validate(build_config(None, {"data": reviews_csv, "compare": {"vendor": f}}))
    with pytest.raises(ConfigError) as err:
        build_config(None, {"data": reviews_csv, "compare": {"fine_tuned": f, "ok": tmp_path / "missing.jsonl", "bad name": f}})
    problems = str(err.value) + " ".join(getattr(err.value, "problems", []) or [])
    assert "--compare fine_tuned=" in problems and "--compare bad name=" in problems and "missing.jsonl: file not found" in problems


def test_the_verdict_pairs_fine_tuned_with_the_compared_model():
    rng = np.random.default_rng(0)
    base = rng.normal(0.7, 0.02, 500)

    def ladder(vendor_shift: float):
        common = {"train_examples": 400, "train_seconds": 1.0}
        rows = [{"name": "zero_shot", "metrics": {"macro_f1": 0.5}, **common}, {"name": "fine_tuned", "metrics": {"macro_f1": 0.7}, **common},
                {"name": "vendor", "metrics": {"macro_f1": 0.7 + vendor_shift}, "external": {"file": "v.jsonl"}, **common}]
        boots = {"zero_shot": base - 0.2, "fine_tuned": base, "vendor": base + vendor_shift + rng.normal(0, 0.005, 500)}
        return rows, boots

    cost = {"break_even_requests": None, "train_seconds": 1.0, "hardware": "CPU", "train_cost": 0.0, "price_per_hour": 0.1}
    for shift, must in ((-0.1, "beats vendor"), (0.1, "falls short of vendor"), (0.0, "within the noise of vendor")):
        rows, boots = ladder(shift)
        v = verdict.verdict(rows, boots, "macro_f1", None, {}, None, cost, 500)
        assert v["strongest_alternative"] == "zero_shot", "another model is not a cheaper alternative: it does not pick the headline"
        assert any(must in reason for reason in v["reasons"]), (shift, v["reasons"])
        assert v["comparisons"]["vendor"]["outcome"] == {-0.1: "above", 0.1: "below", 0.0: "inside"}[shift]


def test_a_run_scores_the_compared_model_as_a_rung(tmp_path, tiny_bert, monkeypatch):
    import fmtune
    from conftest import make_reviews, write_csv

    monkeypatch.chdir(tmp_path)
    rows = make_reviews(120)
    data = write_csv(tmp_path / "reviews.csv", rows)
    # a vendor that answered every row of the data file: right on most, wrong on every 5th, once outside the label set
    answers = [{"text": t, "prediction": (lab if i % 5 else ("neg" if lab == "pos" else "pos")) if i != 3 else "maybe"} for i, (t, lab) in enumerate(rows)]
    vendor = write_jsonl(tmp_path / "vendor.jsonl", answers)
    result = fmtune.run(data=data, model=str(tiny_bert), out="runs/cmp", epochs=1, curve=False, bootstrap=100, latency_repeats=3, quiet=True,
                        compare={"vendor": str(vendor)})
    report = result.report
    jsonschema.validate(report, SCHEMA)
    row = next(r for r in report["ladder"] if r["name"] == "vendor")
    assert row["train_examples"] == 0 and row["external"]["rows"] == 120 and row["external"]["rows_not_in_test"] == 120 - report["data"]["test"]
    truth = {t: lab for t, lab in rows}
    test_texts = [t for t in truth if t in {a["text"] for a in answers}]
    assert 0 <= row["ci95"]["macro_f1"][0] <= row["metrics"]["macro_f1"] <= row["ci95"]["macro_f1"][1] <= 1
    assert row["outputs_outside_label_set"] in (0, 1) and len(test_texts) == 120
    assert "vendor" in report["verdict"]["comparisons"]
    assert any("vendor" in reason for reason in report["verdict"]["reasons"])
    with pytest.raises(DataError, match="no output for"):  # a file that misses test inputs stops the run before any folder exists
        fmtune.run(data=data, model=str(tiny_bert), out="runs/cmp2", epochs=1, curve=False, bootstrap=100, quiet=True,
                   compare={"vendor": str(write_jsonl(tmp_path / "few.jsonl", answers[:10]))})
    assert not Path("runs/cmp2").exists()
