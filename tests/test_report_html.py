"""report.html and the model card, rendered from tests/fixtures/report_example.json and variants of it."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from fmtune.runner.report_html import render_html, render_model_card, write_html

FIXTURE = Path(__file__).parent / "fixtures" / "report_example.json"
SECTION_IDS = ["verdict", "ladder", "training", "learning-curve", "confusion", "retention", "domain-shift", "cost",
               "inference", "data", "choices", "provenance"]
XSS = "<script>alert(1)</script>"


@pytest.fixture
def report() -> dict:
    return json.loads(FIXTURE.read_text())


def section(html: str, section_id: str) -> str:
    match = re.search(rf'<section id="{section_id}">(.*?)</section>', html, re.S)
    assert match, f"no section {section_id}"
    return match.group(1)


def generation_report(report: dict) -> dict:
    report = copy.deepcopy(report)
    report["task"] = {"type": "generation", "primary_metric": "rouge_l"}
    for i, rung in enumerate(report["ladder"]):
        rung["metrics"] = {"exact_match": 0.1 + i / 100, "token_f1": 0.3, "rouge_l": 0.41 + i / 100, "loss": 2.5}
        rung["ci95"] = {"rouge_l": [0.38 + i / 100, 0.44 + i / 100]}
        del rung["confusion_matrix"], rung["per_class_f1"]
    del report["data"]["audit"]["class_counts"]
    return report


def test_fixture_has_every_section_in_order_with_the_numbers(report):
    html = render_html(report)
    positions = [html.index(f'<section id="{sid}">') for sid in SECTION_IDS]
    assert positions == sorted(positions)
    assert all(f'<section id="{sid}">\n<h2>' in html for sid in SECTION_IDS)
    verdict = section(html, "verdict")
    assert "Fine-tuning: recommended" in verdict
    assert "+0.150" in verdict and "+0.110 to +0.190" in verdict
    assert "beyond noise" in verdict
    ladder = section(html, "ladder")
    assert "0.79" in ladder and "0.760 – 0.820" in ladder and "2,240" in ladder
    assert re.search(r'<tr class="highlight">\s*<td><code>fine_tuned</code>', ladder)
    assert "best epoch 2 of 4" in section(html, "training")
    assert "0.815" in section(html, "learning-curve") and "12,000" in section(html, "learning-curve")
    assert "-11.3%" in section(html, "retention") and "within threshold" in section(html, "retention")
    assert "0.970" in section(html, "domain-shift")
    cost = section(html, "cost")
    assert "0.0017" in cost and "nothing to pay back" in cost and "--price-per-hour" in cost
    assert "22,714,370" in section(html, "inference") and "+1.6%" in section(html, "inference")
    data = section(html, "data")
    assert '<ul class="warnings"><li>1 test texts also appear in train' in data
    assert "1,300" in data and "9,608" in data
    assert "avx512_bf16" in section(html, "choices")
    assert "3f2a9c0d5e..." in section(html, "provenance") and "c9d8..." in section(html, "provenance")


def test_fixture_is_self_contained_and_small(report):
    html = render_html(report)
    srcs = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert srcs, "expected charts and links"
    assert all(s.startswith(("data:image/png;base64,", "#")) for s in srcs), srcs
    assert "http://" not in html and "https://" not in html
    assert "<script" not in html and "<link" not in html
    # ladder, training, learning curve and one confusion matrix per rung
    assert html.count('src="data:image/png;base64,') == 3 + len(report["ladder"])
    assert len(html.encode()) < 1_000_000


def test_user_strings_are_escaped(report):
    report["task"]["labels"] = ["fresh", XSS]
    for split in report["data"]["audit"]["class_counts"].values():
        split[XSS] = split.pop("rotten")
    for rung in report["ladder"]:
        rung["per_class_f1"][XSS] = rung["per_class_f1"].pop("rotten")
    report["run"]["name"] = XSS
    report["verdict"]["reasons"].append(XSS)
    html = render_html(report)
    assert XSS not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in section(html, "confusion")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in section(html, "verdict")
    card = render_model_card(report)
    assert XSS not in card


def test_dollar_signs_in_labels_are_drawn_as_text(report):
    report["task"]["labels"] = ["$5 off", "x$^$y"]  # "x$^$y" is a TeX error if parsed
    html = render_html(report)
    assert section(html, "confusion").count('src="data:image/png;base64,') == len(report["ladder"])


def test_generation_report_without_confusion(report):
    html = render_html(generation_report(report))
    ladder = section(html, "ladder")
    for metric in ("rouge_l", "exact_match", "token_f1", "loss"):
        assert f'<th class="n">{metric}</th>' in ladder
    assert "0.440" in ladder and "0.410 – 0.470" in ladder
    assert "skipped: not applicable to generation tasks" in section(html, "confusion")
    assert "<img" not in section(html, "confusion")


def test_skipped_and_missing_parts(report):
    report["learning_curve"] = {"points": [], "skipped": "--no-curve"}
    report["retention"] = {"skipped": "no general-domain corpus installed"}
    report["domain_shift"] = {"skipped": "--no-domain-shift"}
    report["ladder"] = [r for r in report["ladder"] if r["name"] != "head_only"]
    for rung in report["ladder"]:
        rung.pop("history", None)
        rung.pop("best_epoch", None)
    del report["inference"]
    html = render_html(report)
    assert "skipped: --no-curve" in section(html, "learning-curve")
    assert "skipped: no general-domain corpus installed" in section(html, "retention")
    assert "skipped: --no-domain-shift" in section(html, "domain-shift")
    assert "skipped: no per-epoch training history recorded" in section(html, "training")
    assert "skipped: not in this report" in section(html, "inference")
    assert "head_only" not in section(html, "ladder")
    assert "<img" not in section(html, "learning-curve") + section(html, "training")


def test_history_on_one_rung_only(report):
    del report["ladder"][4]["history"]
    training = section(render_html(report), "training")
    assert "best epoch 2 of 4" in training
    assert "<code>from_scratch</code>: skipped: no per-epoch history recorded" in training


def test_empty_and_malformed_reports_do_not_crash(report):
    html = render_html({})
    assert all(f'<section id="{sid}">' in html for sid in SECTION_IDS)
    assert html.count("skipped:") >= 8
    report["ladder"][0]["confusion_matrix"] = [[1, 2], [3]]  # ragged: the chart is left out, the page still renders
    report["ladder"][1]["metrics"] = {}
    report["ladder"][2] = {"name": "head_only", "skipped": "--no-head-only"}
    html = render_html(report)
    assert "skipped: --no-head-only" in section(html, "ladder")
    assert 'alt="confusion matrix of zero_shot"' not in html
    assert render_model_card({}).startswith("---\n")


def test_write_html_is_atomic(report, tmp_path):
    path = tmp_path / "report.html"
    path.write_text("old")
    write_html(report, path)
    assert path.read_text().startswith("<!DOCTYPE html>")
    assert [p.name for p in tmp_path.iterdir()] == ["report.html"]


def test_model_card(report):
    card = render_model_card(report)
    front = yaml.safe_load(card.split("---\n")[1])
    assert {k: front[k] for k in ("library_name", "base_model", "license", "pipeline_tag", "tags", "metrics")} == {
        "library_name": "transformers", "base_model": "sentence-transformers/all-MiniLM-L6-v2", "license": "apache-2.0",
        "pipeline_tag": "text-classification", "tags": ["fmtune", "text-classification"], "metrics": ["macro_f1", "accuracy"]}
    assert front["fmtune"]["data_sha256"] == report["data"]["sha256"] and front["fmtune"]["verdict"] == report["verdict"]["headline"]
    assert "| rung | description | macro_f1 | 95% CI | accuracy | train examples | train seconds |" in card
    assert "| fine_tuned | full fine-tuning, best validation epoch | 0.790 | 0.760 – 0.820 | 0.800 | 2,240 | 61 |" in card
    assert "`3f2a9c0d5e...`" in card
    assert 'AutoModelForSequenceClassification.from_pretrained(folder)' in card
    assert "- 1 test texts also appear in train: the test score is slightly optimistic." in card
    assert "personal data that was not redacted" in card
    headings = re.findall(r"^## (.+)$", card, re.M)
    assert headings == ["Model description", "Intended use and out of scope", "Training data", "Evaluation",
                        "Limitations and risks", "How to load it", "Provenance"]


def test_model_card_metadata_parses_with_huggingface_hub(report):
    """The Hub's own parser reads the card's model-index back: the fine-tuned model's test metrics with their CIs."""
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import eval_results_to_model_index

    card = ModelCard(render_model_card(report))
    data = card.data
    assert data.base_model == "sentence-transformers/all-MiniLM-L6-v2" and data.license == "apache-2.0"
    ft = next(r for r in report["ladder"] if r["name"] == "fine_tuned")
    results = {(r.metric_type, r.metric_config): r for r in data.eval_results}
    f1 = results[("f1", "macro")]
    assert f1.metric_value == ft["metrics"]["macro_f1"] and f1.metric_args == {"ci95": ft["ci95"]["macro_f1"]}
    assert f1.task_type == "text-classification" and f1.dataset_split == "test" and f1.dataset_revision == report["data"]["sha256"]
    assert results[("accuracy", None)].metric_value == ft["metrics"]["accuracy"]
    assert eval_results_to_model_index(data.model_name, data.eval_results)[0]["results"], "a model-index the Hub would show"


def test_model_card_base_model_is_a_hub_id_only_when_one_is_known(report, tmp_path):
    from huggingface_hub import ModelCard

    report["base_model"] = {"name": "acme/encoder@" + "b" * 40, "path": str(tmp_path)}
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# acme encoder\n")
    data = ModelCard(render_model_card(report)).data
    assert data.base_model == "acme/encoder" and data.license == "mit", "a cached Hub model: its id, its card's license"
    folder = tmp_path / "my-encoder"
    folder.mkdir()
    report["base_model"] = {"name": str(folder), "path": str(folder)}
    data = ModelCard(render_model_card(report)).data
    assert data.base_model is None and data.license == "unknown", "a local folder is not a Hub id"
    assert ModelCard(render_model_card({})).data.eval_results is None, "an empty report still gives a valid card"


def test_model_card_generation_and_flags(report):
    report = generation_report(report)
    report["retention"]["flag"] = True
    report["retention"]["relative_change"] = -0.31
    report["ladder"][0]["description"] = "prompt | with pipe"
    card = render_model_card(report)
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["tags"] == ["fmtune", "text-generation"]
    assert front["metrics"] == ["rouge_l", "exact_match", "token_f1", "loss"]
    assert "AutoModelForCausalLM.from_pretrained(folder)" in card
    assert "prompt \\| with pipe" in card
    assert "lost general knowledge beyond the threshold on the retention probe (-31.0%)" in card


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (apt-get install chromium)")
def test_chromium_renders_the_page(report, tmp_path):
    path = tmp_path / "report.html"
    write_html(report, path)
    base = ["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*base, "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=60, check=True)
    for sid in SECTION_IDS:
        assert f'id="{sid}"' in dom.stdout
    shot = tmp_path / "shot.png"
    subprocess.run([*base, f"--screenshot={shot}", "--window-size=1200,4000", path.as_uri()],
                   capture_output=True, timeout=60, check=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 10_000
