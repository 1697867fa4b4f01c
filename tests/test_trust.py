"""Trust: fmtune never deletes what it did not create, never trains on a broken model folder, shows its audit findings,
and does not flood the disk with checkpoints. Each test failed on the code before its fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fmtune.errors import ConfigError, ModelError

FAST = ["--epochs", "3", "--learning-rate", "3e-3", "--scratch-learning-rate", "3e-3", "--bootstrap", "100", "--latency-repeats", "3", "--batch-size", "16"]


def fmtune(*args, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fmtune.cli", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- --overwrite never deletes a user's files


def test_overwrite_on_the_current_folder_is_refused_and_deletes_nothing(tmp_path, tiny_bert):
    """The reported case: `fmtune run --data data.csv --out . --overwrite` in a project folder emptied it."""
    from conftest import make_reviews, write_csv

    write_csv(tmp_path / "data.csv", make_reviews(60))
    (tmp_path / "notes.md").write_text("my notes")
    before = _snapshot(tmp_path)
    proc = fmtune("run", "--data", "data.csv", "--model", tiny_bert, "--out", ".", "--overwrite", "--no-curve", *FAST, cwd=tmp_path)
    assert proc.returncode != 0
    stderr = " ".join(proc.stderr.split())
    assert "current folder" in stderr and "Traceback" not in stderr
    assert _snapshot(tmp_path) == before
    assert not list(tmp_path.parent.glob("*.partial")), "no '..partial' folder beside it"


@pytest.mark.parametrize("where", ["root", "home", "parent"])
def test_root_home_and_parents_of_the_current_folder_are_refused(tmp_path, monkeypatch, where):
    from fmtune.runner.folder import check_run_target

    project = tmp_path / "home" / "me" / "project"
    project.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(tmp_path / "home" / "me"))
    monkeypatch.chdir(project)
    target = {"root": Path("/"), "home": Path("~"), "parent": Path("..")}[where]
    with pytest.raises(ConfigError, match="cannot be a run folder"):
        check_run_target(target)
    check_run_target(Path("runs/new"))  # an ordinary new folder is fine


def test_overwrite_of_a_folder_with_user_files_is_refused(tmp_path, monkeypatch):
    """`--out precious --overwrite` replaced a thesis with the run."""
    from fmtune.config import build_config
    from fmtune.runner.folder import open_run_dir

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.csv").write_text("text,label\na,b\n")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("five years of work")
    cfg = build_config(None, {"data": tmp_path / "data.csv", "out": precious, "overwrite": True})
    with pytest.raises(ConfigError, match="only an fmtune run folder .* or an empty folder") as err:
        open_run_dir(cfg, "precious")
    assert "thesis.tex" in str(err.value) and "Nothing was deleted" in str(err.value)
    assert (precious / "thesis.tex").read_text() == "five years of work"


def test_overwrite_replaces_an_empty_folder_or_an_fmtune_run_only(tmp_path, monkeypatch):
    from fmtune.config import build_config
    from fmtune.runner.folder import check_replaceable, replace_folder

    monkeypatch.chdir(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    check_replaceable(empty)
    run = tmp_path / "old-run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"manifest_version": 1, "fmtune_version": "0.1.0"}))
    (run / "report.json").write_text("{}")
    check_replaceable(run)
    new = tmp_path / ".old-run.partial"
    new.mkdir()
    (new / "report.json").write_text('{"new": true}')
    replace_folder(new, run)
    assert json.loads((run / "report.json").read_text()) == {"new": True} and not new.exists()
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "manifest.json").write_text('{"something": "else"}')  # a manifest that fmtune did not write
    with pytest.raises(ConfigError):
        check_replaceable(fake)
    link = tmp_path / "link"
    link.symlink_to(run)
    with pytest.raises(ConfigError, match="symbolic link"):
        check_replaceable(link)
    assert build_config(None, {"data": tmp_path / "old-run" / "report.json", "out": run, "overwrite": True})


def test_a_stranger_in_the_partial_folders_place_is_not_deleted(tmp_path, monkeypatch):
    from fmtune.config import build_config
    from fmtune.runner.folder import open_run_dir, partial_dir

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.csv").write_text("text,label\na,b\n")
    out = tmp_path / "exp"
    partial = partial_dir(out)
    partial.mkdir()
    (partial / "keep.txt").write_text("mine")
    cfg = build_config(None, {"data": tmp_path / "data.csv", "out": out, "overwrite": True})
    with pytest.raises(ConfigError, match="deletes only what it created"):
        open_run_dir(cfg, "exp")
    assert (partial / "keep.txt").read_text() == "mine"


# ---- a broken model folder stops before training


def test_model_folder_without_tokenizer_files_is_refused_before_any_folder(tmp_path, tiny_bert):
    import shutil

    from conftest import make_reviews, write_csv

    broken = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_bert, broken)
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (broken / name).unlink(missing_ok=True)
    write_csv(tmp_path / "data.csv", make_reviews(60))
    proc = fmtune("run", "--data", "data.csv", "--model", broken, "--out", "runs/x", "--no-curve", *FAST, cwd=tmp_path)
    assert proc.returncode != 0
    stderr = " ".join(proc.stderr.split())
    assert "no tokenizer files" in stderr and "tokenizer.json" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_tokenizer_that_does_not_fit_the_model_is_refused(tmp_path, tiny_bert):
    import shutil

    from transformers import BertTokenizerFast

    from fmtune.models.loading import load_tokenizer

    folder = tmp_path / "mismatch"
    shutil.copytree(tiny_bert, folder)
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = 1000  # the tokenizer has ~80 tokens: files of another model
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="does not belong to this model|do not belong to this model"):
        load_tokenizer(folder)
    small = tmp_path / "small"
    shutil.copytree(tiny_bert, small)
    BertTokenizerFast(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(200)])}).save_pretrained(small)
    with pytest.raises(ModelError, match="past the model's embedding table"):
        load_tokenizer(small)
    assert len(load_tokenizer(tiny_bert)) > 5


def test_unknown_model_error_names_every_packaged_model(tmp_path):
    from fmtune.models.loading import resolve_model_path

    with pytest.raises(ModelError) as err:
        resolve_model_path(str(tmp_path / "missing"))
    assert "minilm" in str(err.value) and "smollm2" in str(err.value)


# ---- configuration


def test_yaml_booleans_are_not_numbers(tmp_path):
    from fmtune.config import build_config, load_yaml

    (tmp_path / "d.csv").write_text("text,label\na,b\n")
    (tmp_path / "c.yaml").write_text(f"data:\n  data: {tmp_path / 'd.csv'}\ntrain:\n  epochs: yes\n")
    with pytest.raises(ConfigError) as err:
        build_config(load_yaml(tmp_path / "c.yaml"), {})
    assert "'train.epochs' is the boolean true" in str(err.value)
    (tmp_path / "c.yaml").write_text(f"data:\n  data: {tmp_path / 'd.csv'}\n  redact_pii: yes\ntrain:\n  bf16: off\n")
    cfg = build_config(load_yaml(tmp_path / "c.yaml"), {})
    assert cfg.train.bf16 == "off" and cfg.data.redact_pii is True


def test_data_folder_is_named_as_a_folder(tmp_path):
    from fmtune.config import build_config

    with pytest.raises(ConfigError) as err:
        build_config(None, {"data": tmp_path})
    assert "is a folder" in str(err.value) and "file not found" not in str(err.value)


# ---- what a run shows and writes


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory, tiny_bert):
    """One in-process run with the learning curve on and a data set with findings; every safetensors write recorded."""
    from conftest import make_reviews, write_csv

    from fmtune.config import build_config
    from fmtune.runner.pipeline import run
    from fmtune.training import checkpoint

    work = tmp_path_factory.mktemp("trust")
    rows = make_reviews(200)
    rows += [rows[0], rows[1], rows[1]]  # duplicates, some of which land in train and test
    data = write_csv(work / "data.csv", rows)
    written: list[str] = []
    real = checkpoint.write_safetensors
    checkpoint.write_safetensors = lambda tensors, path: (written.append(str(path)), real(tensors, path))[1]
    try:
        cfg = build_config(None, {"data": data, "model": str(tiny_bert), "out": work / "runs" / "t", "epochs": 3, "learning_rate": 3e-3,
                                  "scratch_learning_rate": 3e-3, "bootstrap": 100, "latency_repeats": 3, "batch_size": 16, "curve_fractions": [0.25, 0.5]})
        out = run(cfg)
    finally:
        checkpoint.write_safetensors = real
    return out, written


def test_cheap_epochs_write_no_checkpoints_and_finished_rungs_keep_only_what_is_used(recorded_run):
    """A checkpoint at every epoch of every rung and curve point (plus the best weights at each improvement) wrote 14 GB
    for an 88 MB run: now a short run writes no training checkpoint, and only fine_tuned keeps final weights."""
    out, written = recorded_run
    assert not [p for p in written if "/step-" in p or ".tmp-step-" in p], written
    assert not [p for p in written if "best" in Path(p).name], "small best weights stay in memory"
    finals = [p for p in written if "final.safetensors" in p]
    assert len(finals) == 1 and "/fine_tuned/" in finals[0], finals
    log = (out / "logs" / "run.log").read_text()
    assert "disk:" in log and "MB written to storage by this run" in log


def test_time_policy_checkpoints_by_elapsed_training_time():
    from fmtune.training.checkpoint import Policy

    now = [0.0]
    policy = Policy(every=0, seconds=300)
    policy._clock = lambda: now[0]
    policy.saved()
    now[0] = 100
    assert not policy.within_epoch(10) and not policy.at_epoch_end()
    now[0] = 301
    assert policy.within_epoch(11) and policy.at_epoch_end()
    policy.saved()
    assert not policy.within_epoch(12)
    assert Policy(every=3, seconds=300).within_epoch(6) and Policy(every=3, seconds=300).at_epoch_end()
    assert Policy(every=0, seconds=0).at_epoch_end() and not Policy(every=0, seconds=0).within_epoch(5)
    fsdp = Policy(every=0, seconds=300, deterministic=True)
    assert fsdp.at_epoch_end() and not fsdp.within_epoch(1), "FSDP ranks must all save at the same points"


def test_resumed_rung_without_weights_reuses_its_predictions(tmp_path):
    import torch

    from fmtune.training import checkpoint

    checkpoint.mark_done(tmp_path / "curve", None, {"best_epoch": 1, "test_predictions": [0, 1, 1]})
    info, weights = checkpoint.load_done(tmp_path / "curve")
    assert weights is None and info["test_predictions"] == [0, 1, 1]
    assert not (tmp_path / "curve" / "final.safetensors").exists()
    model = torch.nn.Linear(2, 2)
    checkpoint.mark_done(tmp_path / "ft", model, {"best_epoch": 2})
    info, weights = checkpoint.load_done(tmp_path / "ft")
    assert torch.equal(weights["weight"], model.weight)


def test_audit_warnings_reach_the_console(tmp_path, tiny_bert):
    from conftest import make_reviews, write_csv

    rows = make_reviews(120)
    rows += rows[:30]  # duplicates: most of them cross train and test
    write_csv(tmp_path / "data.csv", rows)
    proc = fmtune("run", "--data", "data.csv", "--model", tiny_bert, "--out", "runs/a", "--no-curve", "--rungs", "zero_shot,few_shot,fine_tuned,from_scratch", *FAST, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "runs" / "a" / "report.json").read_text())
    warnings = report["data"]["audit"]["warnings"]
    assert warnings and any("test" in w.lower() for w in warnings)
    console = " ".join(proc.stdout.split())
    assert f"Data audit: {len(warnings)} warning(s)" in console
    for w in warnings:
        assert " ".join(w.split())[:60] in console


def test_lora_adapter_is_the_fine_tunes_not_the_last_curve_points(tmp_path, tiny_bert, monkeypatch):
    """With --method lora and the curve on, adapter/ held the last curve point's adapter."""
    import torch
    from conftest import make_reviews, write_csv
    from safetensors.torch import load_file

    from fmtune.config import build_config
    from fmtune.runner.pipeline import run
    from fmtune.training import train

    adapters = []
    real_fit = train.fit

    def fit(*args, **kwargs):
        result = real_fit(*args, **kwargs)
        if result.adapter is not None:
            adapters.append({k: v.clone() for k, v in result.adapter["state"].items()})
        return result

    monkeypatch.setattr(train, "fit", fit)
    monkeypatch.chdir(tmp_path)
    data = write_csv(tmp_path / "data.csv", make_reviews(120))
    cfg = build_config(None, {"data": data, "model": str(tiny_bert), "out": tmp_path / "runs" / "l", "method": "lora", "epochs": 2,
                              "bootstrap": 100, "latency_repeats": 3, "batch_size": 16, "curve_fractions": [0.5], "rungs": ["zero_shot", "few_shot", "fine_tuned", "from_scratch"]})
    out = run(cfg)
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert len(adapters) == 2  # fine_tuned, then the curve point
    assert all(torch.equal(saved[k], adapters[0][k]) for k in saved)
    assert not all(torch.equal(saved[k], adapters[1][k]) for k in saved)
