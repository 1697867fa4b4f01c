"""Lineage: the manifest records hashes of a run's inputs and outputs, and verify_run finds every change."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fmtune import __version__
from fmtune.errors import FmtuneError
from fmtune.store.lineage import (
    build_manifest,
    check_run,
    hash_tree,
    library_versions,
    sha256_file,
    verify_run,
    write_json_atomic,
)


@pytest.fixture(autouse=True)
def _no_manifest_key(monkeypatch):
    monkeypatch.delenv("FMTUNE_MANIFEST_KEY", raising=False)  # tests that sign set it themselves


def _fake_run(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A run folder like `fmtune run` writes, an input data file and a base model folder."""
    data = tmp_path / "data.csv"
    data.write_text("text,label\ngreat fun,fresh\ndull,rotten\n")
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text('{"model_type": "bert"}')
    save_file({"w": torch.zeros(3)}, base / "model.safetensors")

    run = tmp_path / "runs" / "demo"
    (run / "model").mkdir(parents=True)
    (run / "logs").mkdir()
    save_file({"classifier.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4)}, run / "model" / "model.safetensors")
    (run / "model" / "config.json").write_text('{"model_type": "bert", "num_labels": 3}')
    (run / "model" / "README.md").write_text("# demo\n")
    (run / "report.json").write_text(json.dumps({"run": {"name": "demo"}}))
    (run / "config.yaml").write_text("name: demo\nseed: 7\n")
    (run / "report.html").write_text("<html></html>")
    (run / "logs" / "train.log").write_text("epoch 1\n")

    manifest = build_manifest(
        config={"name": "demo", "seed": 7, "data": {"data": str(data)}},
        input_files={str(data): sha256_file(data)},
        data_sha256="d" * 64,
        base_model={"name": "tiny", "path": str(base), "files": hash_tree(base)},
        seed=7,
        run_dir=run,
        hardware="CPU: test, 1 core",
        extra={"command": "fmtune run --data data.csv"},
    )
    write_json_atomic(run / "manifest.json", manifest)
    return run, data, base


def test_sha256_file_streams_and_matches_hashlib(tmp_path):
    path = tmp_path / "big.bin"
    payload = bytes(range(256)) * 9000  # > 2 chunks of 1 MiB
    path.write_bytes(payload)
    assert sha256_file(path) == hashlib.sha256(payload).hexdigest()


def test_hash_tree_lists_regular_files_with_posix_paths_sorted(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("z")
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "link.txt").symlink_to(tmp_path / "a.txt")
    tree = hash_tree(tmp_path)
    assert list(tree) == ["a.txt", "b/z.txt"]
    assert tree["a.txt"] == hashlib.sha256(b"a").hexdigest()


def test_library_versions_records_installed_libraries_only():
    versions = library_versions()
    assert versions["fmtune"] == __version__
    assert versions["torch"] == torch.__version__
    assert "python" in versions
    assert "definitely-not-installed" not in versions
    assert all(isinstance(v, str) for v in versions.values())


def test_manifest_records_inputs_outputs_and_environment(tmp_path):
    run, data, base = _fake_run(tmp_path)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["fmtune_version"] == __version__
    assert manifest["seed"] == 7
    assert manifest["config"]["name"] == "demo"
    assert manifest["inputs"] == {str(data): hashlib.sha256(data.read_bytes()).hexdigest()}
    assert manifest["data_sha256"] == "d" * 64
    assert manifest["base_model"]["files"].keys() == {"config.json", "model.safetensors"}
    assert manifest["hardware"] == "CPU: test, 1 core"
    assert manifest["command"] == "fmtune run --data data.csv"
    assert manifest["created_at"].endswith("+00:00")
    assert "torch" in manifest["versions"] and "machine" in manifest["platform"]
    # Outputs: model/ (with the model card), logs/, report.json, report.html and config.yaml; never the manifest itself.
    assert list(manifest["outputs"]) == [
        "config.yaml", "logs/train.log", "model/README.md", "model/config.json", "model/model.safetensors", "report.html", "report.json",
    ]
    assert manifest["outputs"]["model/model.safetensors"] == sha256_file(run / "model" / "model.safetensors")


def test_extra_may_not_replace_recorded_fields(tmp_path):
    with pytest.raises(ValueError, match="seed"):
        build_manifest(config={}, input_files={}, data_sha256="", base_model={}, seed=0, run_dir=tmp_path,
                       hardware="cpu", extra={"seed": 1})


def test_untouched_run_verifies(tmp_path):
    run, _, _ = _fake_run(tmp_path)
    assert verify_run(run) == []
    result = check_run(run)
    assert result.checked == 7 + 1 + 2  # outputs + input file + base model files
    assert result.notes == []
    assert result.signature == "unsigned"


def test_flipped_byte_in_weights_is_reported_for_that_file_only(tmp_path):
    run, _, _ = _fake_run(tmp_path)
    weights = run / "model" / "model.safetensors"
    expected = sha256_file(weights)
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0x01  # last byte of the tensor data: the file still loads, with a different value
    weights.write_bytes(bytes(raw))
    assert not torch.equal(load_file(weights)["classifier.weight"], torch.arange(12, dtype=torch.float32).reshape(3, 4))

    problems = verify_run(run)
    assert problems == [
        f"model/model.safetensors: sha256 differs from the manifest (expected {expected[:12]}…, "
        f"found {sha256_file(weights)[:12]}…): the file changed after the run"
    ]


def test_deleted_output_is_reported(tmp_path):
    run, _, _ = _fake_run(tmp_path)
    (run / "model" / "config.json").unlink()
    assert verify_run(run) == ["model/config.json: listed in the manifest but missing from the run folder"]


def test_file_added_under_model_is_reported(tmp_path):
    run, _, _ = _fake_run(tmp_path)
    (run / "model" / "extra").mkdir()
    (run / "model" / "extra" / "adapter.bin").write_bytes(b"\x80\x04")
    assert verify_run(run) == ["model/extra/adapter.bin: not in the manifest; the file was added after the run"]


def test_changed_input_file_is_reported_unless_inputs_are_skipped(tmp_path):
    run, data, _ = _fake_run(tmp_path)
    expected = sha256_file(data)
    data.write_text("text,label\ngreat fun,rotten\n")
    problems = verify_run(run)
    assert len(problems) == 1
    assert problems[0].startswith(f"input {data}: sha256 differs from the manifest (expected {expected[:12]}…")
    assert problems[0].endswith("the data file changed since the run")
    assert verify_run(run, check_inputs=False) == []


def test_missing_input_is_a_note_not_a_failure(tmp_path):
    run, data, _ = _fake_run(tmp_path)
    data.unlink()
    result = check_run(run)
    assert result.problems == []
    assert result.notes == [f"input {data}: no longer at that path, so it was not re-hashed"]


def test_changed_base_model_is_reported(tmp_path):
    run, _, base = _fake_run(tmp_path)
    (base / "config.json").write_text('{"model_type": "roberta"}')
    problems = verify_run(run)
    assert len(problems) == 1
    assert problems[0].startswith("base model tiny: config.json: sha256 differs from the manifest")


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "manifest.json: not found"), ("{not json", "not valid JSON"), ("[1, 2]", "not a valid fmtune manifest")],
)
def test_missing_or_invalid_manifest_is_an_fmtune_error(tmp_path, content, message):
    run, _, _ = _fake_run(tmp_path)
    if content is None:
        (run / "manifest.json").unlink()
    else:
        (run / "manifest.json").write_text(content)
    with pytest.raises(FmtuneError, match=message):
        verify_run(run)


def test_write_json_atomic_replaces_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "report.json"
    write_json_atomic(target, {"a": 1})
    write_json_atomic(target, {"a": 2, "path": Path("/x")})
    assert json.loads(target.read_text()) == {"a": 2, "path": "/x"}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_write_json_atomic_keeps_old_file_when_the_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    write_json_atomic(target, {"a": 1})

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("fmtune.store.lineage.os.replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_json_atomic(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


# ---------------------------------------------------------------- report.html, logs/ and the model card are covered

def test_manifest_covers_the_html_report_the_model_card_and_every_log(tmp_path):
    run, _, _ = _fake_run(tmp_path)
    manifest = json.loads((run / "manifest.json").read_text())
    for rel in ("report.html", "model/README.md", "logs/train.log", "report.json", "config.yaml"):
        assert manifest["outputs"][rel] == sha256_file(run / rel), rel
    assert manifest["covers"] == {"files": ["config.yaml", "report.html", "report.json"], "folders": ["logs", "model"]}


def test_every_folder_the_run_wrote_is_covered_such_as_a_lora_adapter(tmp_path):
    run, _, _ = _fake_run(tmp_path)
    (run / "adapter").mkdir()
    save_file({"lora_A": torch.ones(2, 4)}, run / "adapter" / "adapter_model.safetensors")
    write_json_atomic(run / "manifest.json", build_manifest(config={}, input_files={}, data_sha256="", base_model={}, seed=0,
                                                            run_dir=run, hardware="cpu"))
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["covers"]["folders"] == ["adapter", "logs", "model"]
    assert "adapter/adapter_model.safetensors" in manifest["outputs"]
    save_file({"lora_A": torch.zeros(2, 4)}, run / "adapter" / "adapter_model.safetensors")
    (run / "adapter" / "extra.bin").write_bytes(b"x")
    problems = verify_run(run)
    assert [p.split(":")[0] for p in problems] == ["adapter/adapter_model.safetensors", "adapter/extra.bin"]
    assert "sha256 differs" in problems[0] and "added after the run" in problems[1]


@pytest.mark.parametrize("rel", ["report.html", "model/README.md", "logs/train.log"])
def test_an_edited_covered_file_is_reported(tmp_path, rel):
    run, _, _ = _fake_run(tmp_path)
    expected = sha256_file(run / rel)
    (run / rel).write_text((run / rel).read_text() + "edited by hand\n")
    assert verify_run(run) == [
        f"{rel}: sha256 differs from the manifest (expected {expected[:12]}…, found {sha256_file(run / rel)[:12]}…): "
        "the file changed after the run"
    ]


def test_missing_and_extra_covered_files_are_reported(tmp_path):
    run, _, _ = _fake_run(tmp_path)
    (run / "report.html").unlink()
    (run / "logs" / "more.log").write_text("added later")
    (run / "notes.txt").write_text("my notes")  # not a covered file: a note, not a failure
    result = check_run(run)
    assert result.problems == [
        "report.html: listed in the manifest but missing from the run folder",
        "logs/more.log: not in the manifest; the file was added after the run",
    ]
    assert result.notes == ["notes.txt: not covered by the manifest (verify checks config.yaml, report.html, report.json, logs/ and model/), "
                            "so it was not checked"]


def test_a_covered_file_the_run_did_not_write_is_reported_when_added(tmp_path):
    run, _, _ = _fake_run(tmp_path)
    (run / "report.html").unlink()
    manifest = build_manifest(config={}, input_files={}, data_sha256="", base_model={}, seed=0, run_dir=run, hardware="cpu")
    write_json_atomic(run / "manifest.json", manifest)
    assert verify_run(run) == []
    (run / "report.html").write_text("<html>forged</html>")
    assert verify_run(run) == ["report.html: not in the manifest; the file was added after the run"]


def test_a_symlink_added_under_model_is_reported(tmp_path):
    run, _, base = _fake_run(tmp_path)
    (run / "model" / "adapter.safetensors").symlink_to(base / "model.safetensors")
    assert verify_run(run) == ["model/adapter.safetensors: a symbolic link, not in the manifest; it was added after the run"]
    (run / "model" / "adapter.safetensors").unlink()
    (run / "model" / "config.json").unlink()
    (run / "model" / "config.json").symlink_to(base / "config.json")
    assert verify_run(run)[-1] == "model/config.json: now a symbolic link; the run wrote a regular file there"


def test_a_version_1_manifest_still_verifies_and_says_what_it_does_not_cover(tmp_path):
    run, _, _ = _fake_run(tmp_path)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["manifest_version"] = 1
    del manifest["covers"]
    manifest["outputs"] = {k: v for k, v in manifest["outputs"].items() if k.startswith("model/") or k in ("report.json", "config.yaml")}
    write_json_atomic(run / "manifest.json", manifest)
    (run / "report.html").write_text("<html>not covered by a version 1 manifest</html>")
    result = check_run(run)
    assert result.problems == []
    assert result.notes == ["manifest_version 1 covers only config.yaml, report.json and model/: "
                            "report.html and logs/ were not checked (re-run with this fmtune to cover them)"]


# ---------------------------------------------------------------- optional HMAC over the manifest

def _forge(run: Path) -> None:
    """Edit report.json and rewrite its hash in the manifest: what a forger without the key can do."""
    (run / "report.json").write_text(json.dumps({"run": {"name": "demo"}, "verdict": "forged"}))
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["outputs"]["report.json"] = sha256_file(run / "report.json")
    write_json_atomic(run / "manifest.json", manifest)


def test_without_a_key_a_rewritten_manifest_passes_and_verify_says_it_is_unsigned(tmp_path):
    run, _, _ = _fake_run(tmp_path)
    assert "signature" not in json.loads((run / "manifest.json").read_text())
    _forge(run)
    result = check_run(run)
    assert result.problems == []  # the documented limit: hashes alone cannot stop a forger who rewrites the manifest
    assert result.signature == "unsigned"


def test_a_signed_manifest_catches_a_manifest_rewritten_with_the_report(tmp_path, monkeypatch):
    monkeypatch.setenv("FMTUNE_MANIFEST_KEY", "s3cret")
    run, _, _ = _fake_run(tmp_path)
    signature = json.loads((run / "manifest.json").read_text())["signature"]
    assert signature["algorithm"] == "HMAC-SHA256" and len(signature["hmac"]) == 64
    ok = check_run(run)
    assert (ok.problems, ok.signature) == ([], "valid")

    _forge(run)
    forged = check_run(run)
    assert forged.signature == "invalid"
    assert forged.problems == ["manifest.json: the HMAC-SHA256 signature does not match: the manifest was changed after it was "
                               "signed (or the key is not the one used when the run was written)"]
    assert check_run(run, key=b"s3cret").signature == "invalid"

    monkeypatch.delenv("FMTUNE_MANIFEST_KEY")
    unchecked = check_run(run)  # no key: the signature cannot be checked, and verify says so
    assert (unchecked.problems, unchecked.signature) == ([], "unchecked")


def test_a_stripped_signature_fails_when_a_key_is_given(tmp_path, monkeypatch):
    monkeypatch.setenv("FMTUNE_MANIFEST_KEY", "s3cret")
    run, _, _ = _fake_run(tmp_path)
    _forge(run)
    manifest = json.loads((run / "manifest.json").read_text())
    del manifest["signature"]
    write_json_atomic(run / "manifest.json", manifest)
    result = check_run(run)
    assert result.signature == "missing"
    assert result.problems == ["manifest.json: not signed, but a key was given (FMTUNE_MANIFEST_KEY or --key-file): a run written "
                               "with the key carries an HMAC-SHA256 signature, so this manifest was written without it or its "
                               "signature was removed"]


def test_manifest_key_from_a_file_or_the_environment(tmp_path, monkeypatch):
    from fmtune.store.lineage import manifest_key

    assert manifest_key() is None
    monkeypatch.setenv("FMTUNE_MANIFEST_KEY", "from-env")
    assert manifest_key() == b"from-env"
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    assert manifest_key(key_file) == b"from-file"
    key_file.write_text("\n")
    with pytest.raises(FmtuneError, match="is empty"):
        manifest_key(key_file)
    with pytest.raises(FmtuneError, match="no-such-key: not found"):
        manifest_key(tmp_path / "no-such-key")
