"""--model org/name loads a Hub model that is already in the local Hugging Face cache (HF_HUB_CACHE / HF_HOME), laid out
as huggingface_hub lays it out (blobs, snapshot symlinks, refs); nothing is downloaded, pickle weights stay refused."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
from pathlib import Path

import pytest

import fmtune
from fmtune.errors import ModelError
from fmtune.models import causal_lm, loading


def put_in_hub_cache(cache: Path, repo_id: str, folder: Path, commit: str = "a" * 40, ref: str | None = "main") -> Path:
    """Copy a model folder into a Hugging Face hub cache the way huggingface_hub stores a download: each file a blob
    named by its hash, the snapshot a folder of relative symlinks to the blobs, refs/<ref> holding the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in folder.iterdir():
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, repo / "blobs" / digest)
        os.symlink(os.path.relpath(repo / "blobs" / digest, snapshot), snapshot / file.name)
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture()
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test (a download would need one)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"fmtune tried to open a network connection: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_a_cached_hub_id_resolves_to_its_snapshot_offline(hub_cache, tiny_bert, no_network):
    snapshot = put_in_hub_cache(hub_cache, "acme/tiny-bert", tiny_bert)
    assert loading.resolve_model_path("acme/tiny-bert") == snapshot
    assert loading.resolve_model_path(f"acme/tiny-bert@{'a' * 40}") == snapshot, "a pinned revision (commit) resolves too"
    loading.check_safe_folder(snapshot)  # the symlinked files count as the folder's files


def test_home_layout_hf_home(tmp_path, monkeypatch, tiny_bert, no_network):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    snapshot = put_in_hub_cache(tmp_path / "home" / "hub", "acme/tiny-bert", tiny_bert)
    assert loading.resolve_model_path("acme/tiny-bert") == snapshot


def test_an_uncached_hub_id_is_refused_with_how_to_get_it(hub_cache, no_network):
    with pytest.raises(ModelError) as err:
        loading.resolve_model_path("acme/not-here")
    message = str(err.value)
    assert "not in the local Hugging Face cache" in message and str(hub_cache) in message
    assert "huggingface-cli download acme/not-here" in message and "never downloads" in message
    with pytest.raises(ModelError, match="not a Hub id"):
        loading.resolve_model_path("no-such-folder")


def test_a_cached_model_with_pickle_weights_is_refused(hub_cache, tmp_path, tiny_bert):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_bert, folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    put_in_hub_cache(hub_cache, "acme/pickled", folder)
    with pytest.raises(ModelError, match="pickle weights"):
        loading.check_safe_folder(loading.resolve_model_path("acme/pickled"))


def test_a_cached_causal_lm_is_recognised_and_resolved(hub_cache, tmp_path):
    from test_generation import make_tiny_llama

    snapshot = put_in_hub_cache(hub_cache, "acme/tiny-llama", make_tiny_llama(tmp_path / "llama"))
    assert causal_lm.is_causal_lm("acme/tiny-llama")
    assert causal_lm.resolve_model("acme/tiny-llama") == (snapshot, "acme/tiny-llama")
    assert not causal_lm.is_causal_lm("acme/not-here")


def test_a_run_trains_on_a_cached_hub_model(hub_cache, tiny_bert, tmp_path, monkeypatch, no_network):
    from conftest import make_reviews, write_csv

    monkeypatch.chdir(tmp_path)
    snapshot = put_in_hub_cache(hub_cache, "acme/tiny-bert", tiny_bert)
    data = write_csv(tmp_path / "reviews.csv", make_reviews(100))
    result = fmtune.run(data=data, model="acme/tiny-bert", out="runs/hub", epochs=1, curve=False, rungs=["zero_shot", "fine_tuned"],
                        bootstrap=100, latency_repeats=3, quiet=True)
    base = result.report["base_model"]
    assert base["name"] == "acme/tiny-bert" and Path(base["path"]) == snapshot
    assert fmtune.load(result.run_dir).predict(["good fun"])[0]["label"] in {"pos", "neg"}
    assert not any(p.is_symlink() for p in result.run_dir.rglob("*")), "the run folder holds copies, not links into the cache"
