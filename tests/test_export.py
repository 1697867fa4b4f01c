"""`export_onnx`: a tiny BERT run exported to ONNX, checked against PyTorch on its test split, recorded in the manifest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import fmtune
from fmtune.errors import FmtuneError
from fmtune.serving import export
from fmtune.store import lineage

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

TEXTS = ["good great fun", "awful dull mess", "the film was quite moving", "boring"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_bert) -> Path:
    """One finished tiny run for the module; tests that change it work on a copy."""
    from conftest import make_reviews, write_csv

    root = tmp_path_factory.mktemp("export-run")
    data = write_csv(root / "reviews.csv", make_reviews(80))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        result = fmtune.run(data=data, model=str(tiny_bert), out=str(root / "runs" / "tiny"), epochs=1, curve=False,
                            rungs=["zero_shot", "fine_tuned"], bootstrap=100, latency_repeats=3, quiet=True)
    return Path(result.run_dir)


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory) -> tuple[Path, dict]:
    """A copy of the tiny run, exported once (read-only for the tests that use it)."""
    run_dir = shutil.copytree(tiny_run, tmp_path_factory.mktemp("exported") / "tiny")
    return run_dir, export.export_onnx(run_dir)


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    return shutil.copytree(run_dir, tmp_path / run_dir.name)


def test_export_writes_a_checked_onnx_file_that_the_manifest_covers(exported):
    run_dir, record = exported
    onnx_file = run_dir / "export" / "model.onnx"
    assert onnx_file.is_file() and json.loads((run_dir / "export" / "export.json").read_text()) == record
    assert sorted(p.name for p in (run_dir / "export").iterdir()) == ["export.json", "model.onnx"], "no temp file is left"
    report = json.loads((run_dir / "report.json").read_text())
    assert record["test_examples"] == report["data"]["test"] and record["data_sha256"] == report["data"]["sha256"]
    assert record["agreement"] == 1.0 and record["max_logit_diff"] < 1e-5 and record["passed"] is True
    assert record["thresholds"] == {"min_agreement": 0.999, "max_logit_diff": 1e-3}
    assert record["format"] == "onnx" and record["inputs"] == ["input_ids", "attention_mask", "token_type_ids"] and record["outputs"] == ["logits"]
    assert record["sha256"] == lineage.sha256_file(onnx_file) and record["bytes"] == onnx_file.stat().st_size
    assert isinstance(record["opset"], int) and record["exporter"].startswith("torch.onnx.export") and record["onnxruntime_version"]

    import onnx

    graph = onnx.load(str(onnx_file)).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims == {name: ["batch", "sequence"] for name in record["inputs"]}, "batch and sequence axes are dynamic"

    result = lineage.check_run(run_dir)  # what `fmtune verify` runs
    assert result.problems == [] and not any("export" in note for note in result.notes)
    manifest = lineage.load_manifest(run_dir)
    assert "export" in manifest["covers"]["folders"] and manifest["exports"]["onnx"]["sha256"] == record["sha256"]
    assert manifest["outputs"]["export/model.onnx"] == record["sha256"]


def test_the_onnx_predictor_answers_like_the_pytorch_predictor(exported):
    run_dir, _ = exported
    onnx_predictor = export.OnnxPredictor.from_run(run_dir)
    onnx_rows, torch_rows = onnx_predictor.predict(TEXTS, batch_size=3), fmtune.load(run_dir, bf16=False).predict(TEXTS)
    assert [r["label"] for r in onnx_rows] == [r["label"] for r in torch_rows]
    assert [list(r["probabilities"]) for r in onnx_rows] == [["neg", "pos"]] * len(TEXTS)
    got = np.array([list(r["probabilities"].values()) for r in onnx_rows])
    np.testing.assert_allclose(got, np.array([list(r["probabilities"].values()) for r in torch_rows]), atol=1e-5)
    assert onnx_predictor.predict([]) == []


def test_a_failing_export_keeps_no_onnx_file_and_a_passing_one_replaces_its_own(exported, tmp_path, monkeypatch):
    run_dir = copy_run(exported[0], tmp_path)
    real_logits = export.OnnxPredictor.logits
    # An export that computes something else: ONNX Runtime's logits reach the comparison negated (the comparison is real).
    monkeypatch.setattr(export.OnnxPredictor, "logits", lambda self, texts, batch_size=64: -real_logits(self, texts, batch_size))
    with pytest.raises(FmtuneError, match="failed its check on 16 test examples: prediction agreement") as err:
        export.export_onnx(run_dir)
    assert "No ONNX file was kept" in str(err.value)
    assert sorted(p.name for p in (run_dir / "export").iterdir()) == ["export.json"], "the failed file and the earlier export are gone"
    record = json.loads((run_dir / "export" / "export.json").read_text())
    assert record["passed"] is False and record["file"] is None and record["agreement"] < 0.999 and record["max_logit_diff"] > 1e-3
    assert lineage.check_run(run_dir).problems == []
    with pytest.raises(FmtuneError, match="failed its check"):
        export.OnnxPredictor.from_run(run_dir)

    monkeypatch.setattr(export.OnnxPredictor, "logits", real_logits)
    assert export.export_onnx(run_dir)["passed"] is True, "fmtune re-exports over its own export"
    assert lineage.check_run(run_dir).problems == [] and (run_dir / "export" / "model.onnx").is_file()
    with open(run_dir / "export" / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(FmtuneError, match="changed after it was checked"):
        export.OnnxPredictor.from_run(run_dir)


def test_a_model_onnx_that_fmtune_did_not_write_is_never_overwritten(tiny_run, tmp_path):
    run_dir = copy_run(tiny_run, tmp_path)
    (run_dir / "export").mkdir()
    (run_dir / "export" / "model.onnx").write_bytes(b"someone else's model")
    with pytest.raises(FmtuneError, match="was not written by fmtune"):
        export.export_onnx(run_dir)
    assert (run_dir / "export" / "model.onnx").read_bytes() == b"someone else's model"


@pytest.mark.parametrize("kind", ["generation", "causal_lm"])
def test_runs_that_are_not_encoder_classifiers_are_refused(tiny_run, tmp_path, kind):
    run_dir = copy_run(tiny_run, tmp_path)
    report = json.loads((run_dir / "report.json").read_text())
    report["task"] = {"type": "generation"} if kind == "generation" else {**report["task"], "model_kind": "causal_lm"}
    (run_dir / "report.json").write_text(json.dumps(report))
    with pytest.raises(FmtuneError, match="ONNX export is for encoder classifiers; this "):
        export.export_onnx(run_dir)
    assert not (run_dir / "export").exists()


def test_a_run_that_no_longer_matches_its_manifest_is_not_exported(tiny_run, tmp_path):
    run_dir = copy_run(tiny_run, tmp_path)
    with open(run_dir / "model" / "config.json", "a") as f:
        f.write("\n")
    with pytest.raises(FmtuneError, match="does not match its manifest") as err:
        export.export_onnx(run_dir)
    assert "model/config.json" in str(err.value) and not (run_dir / "export").exists()


def test_a_signed_manifest_is_re_signed_with_its_key_and_left_as_it_is_without(tiny_run, tmp_path, monkeypatch):
    run_dir = copy_run(tiny_run, tmp_path)
    key = b"test-key"
    lineage.write_json_atomic(run_dir / "manifest.json", lineage.sign_manifest(lineage.load_manifest(run_dir), key))
    before = (run_dir / "manifest.json").read_bytes()
    monkeypatch.delenv(lineage.KEY_ENV_VAR, raising=False)

    record = export.export_onnx(run_dir)  # no key: the export is made, the signed manifest is not touched
    assert record["passed"] and record["manifest"].startswith("not recorded") and (run_dir / "manifest.json").read_bytes() == before
    result = lineage.check_run(run_dir, key=key)
    assert result.problems == [] and result.signature == "valid" and any("export/" in note for note in result.notes)

    monkeypatch.setenv(lineage.KEY_ENV_VAR, key.decode())
    record = export.export_onnx(run_dir)
    assert record["manifest"] == "recorded in manifest.json"
    result = lineage.check_run(run_dir, key=key)
    assert result.problems == [] and result.signature == "valid" and lineage.load_manifest(run_dir)["exports"]["onnx"]["passed"]
    with pytest.raises(FmtuneError, match="signature does not match"):
        export.export_onnx(run_dir, key=b"another key")


def test_the_cli_exports_and_serve_runs_the_onnx_model(tiny_run, tmp_path, monkeypatch):
    """`fmtune export RUN --format onnx`, then the HTTP API on that export (`fmtune serve --runtime onnx` builds this app)."""
    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    from fmtune.cli import app
    from fmtune.serving.serve import ServeConfig, create_app

    run_dir = copy_run(tiny_run, tmp_path)
    monkeypatch.chdir(tiny_run.parent.parent)  # the run's data path in config.yaml is relative to where it ran
    out = CliRunner().invoke(app, ["export", str(run_dir), "--format", "onnx"])
    assert out.exit_code == 0, out.output
    assert "prediction agreement 1.0000" in out.output and (run_dir / "export" / "model.onnx").is_file()
    refused = CliRunner().invoke(app, ["export", str(run_dir), "--format", "gguf"])
    assert refused.exit_code != 0 and "generation" in str(refused.exception), "GGUF is for generation runs"
    unknown = CliRunner().invoke(app, ["export", str(run_dir), "--format", "tflite"])
    assert unknown.exit_code != 0 and "choose onnx" in str(unknown.exception)
    predictor = export.OnnxPredictor.from_run(run_dir)
    with TestClient(create_app(predictor, ServeConfig(no_auth=True, runtime="onnx"))) as client:
        r = client.post("/v1/predict", json={"texts": TEXTS})
        assert r.status_code == 200, r.text
        assert [p["label"] for p in r.json()["predictions"]] == [p["label"] for p in fmtune.load(run_dir).predict(TEXTS)]
