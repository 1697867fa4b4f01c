"""Verified exports of a run into export/: ONNX of an encoder classifier (model.onnx, checked against PyTorch on its test split)
and GGUF of a generation run's causal LM (model-<quantization>.gguf, checked on its test prompts); both covered by the manifest."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from fmtune.errors import FmtuneError

EXPORT_FOLDER = "export"
ONNX_FILE = "model.onnx"
RECORD_FILE = "export.json"
TEMP_PREFIX = ".onnx-"  # fmtune's own unfinished exports inside export/ (a crashed export leaves one; the next removes it)
INSTALL = "pip install onnx onnxruntime"
MAX_PROTOBUF_BYTES = 2 * 1024**3 - 64 * 1024**2  # one ONNX file holds at most 2 GiB; bigger weights need external data
EXPORTER = "torch.onnx.export, TorchScript exporter (dynamo=False)"
GGUF_FILE = "model-{quantization}.gguf"  # the GGUF export of a causal LM, one file per quantisation
GGUF_RECORD_FILE = "export-gguf-{quantization}.json"
GGUF_TEMP_PREFIX = ".gguf-"
GGUF_SUMMARY = ("file", "sha256", "quantization", "gguf_version", "test_prompts", "next_token_agreement", "max_next_token_logit_diff",
                "answer_agreement", "thresholds", "passed", "created_at")  # what manifest.json's exports.gguf.<quantization> holds


def _require_onnx(modules: tuple[str, ...] = ("onnx", "onnxruntime")) -> None:
    """onnx (to export) and onnxruntime (to check and to serve) are optional: say how to install them."""
    import importlib.util

    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise FmtuneError(f"ONNX {'export' if 'onnx' in missing else 'serving'} needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed. Fix: {INSTALL}")


def _session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


@dataclass
class OnnxPredictor:
    """A run's exported classifier (export/model.onnx) in ONNX Runtime on the CPU: `.predict` answers like
    `Predictor.predict` (one {"label", "probabilities"} per text), tokenised, cut and batched the same way."""

    run_dir: Path
    session: Any
    tokenizer: Any
    labels: list[str]
    max_length: int
    report: dict = field(default_factory=dict)
    export: dict = field(default_factory=dict)  # export/export.json

    @classmethod
    def from_run(cls, run_dir: Path | str, threads: int | None = None) -> "OnnxPredictor":
        """Load export/model.onnx of a run; only an export that passed its check and whose file is unchanged since."""
        from transformers import AutoTokenizer

        from fmtune.store.lineage import sha256_file

        _require_onnx(("onnxruntime",))
        run_dir = Path(run_dir)
        path, record_path = run_dir / EXPORT_FOLDER / ONNX_FILE, run_dir / EXPORT_FOLDER / RECORD_FILE
        record = _read_record(record_path) if record_path.is_file() else None
        if record is not None and not record.get("passed"):
            raise FmtuneError(f"{record_path}: the last ONNX export failed its check (agreement {record.get('agreement')}, max logit "
                              f"difference {record.get('max_logit_diff')}), so there is no file to serve. Re-export with "
                              f"`fmtune export {run_dir} --format onnx` (looser thresholds or another opset), or serve the PyTorch model.")
        if record is None or not path.is_file():
            raise FmtuneError(f"{run_dir}: no ONNX export here ({path} with {record_path.name}); make one with `fmtune export {run_dir} --format onnx`.")
        found = sha256_file(path)
        if found != record.get("sha256"):
            raise FmtuneError(f"{path}: sha256 {found[:12]}… differs from the {str(record.get('sha256'))[:12]}… that {record_path.name} records: "
                              f"the file changed after it was checked. Re-export with `fmtune export {run_dir} --format onnx`.")
        tokenizer = AutoTokenizer.from_pretrained(run_dir / "model", local_files_only=True, trust_remote_code=False)
        report_path = run_dir / "report.json"
        report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.is_file() else {}
        return cls(run_dir, _session(path, threads), tokenizer, list(record["labels"]), int(record["max_length"]), report, record)

    def logits(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Logits, shape (len(texts), len(labels)), in the input order; batches are length-sorted, each cut to its longest."""
        from fmtune.evidence.evaluate import pad_table

        out = np.zeros((len(texts), len(self.labels)), dtype=np.float32)
        if not texts:
            return out
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length, add_special_tokens=True)["input_ids"]
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        table, lengths = pad_table(ids, pad_id)
        names = {i.name for i in self.session.get_inputs()}
        order = np.argsort(-lengths, kind="stable")
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = int(lengths[idx].max())
            feed = {"input_ids": table[idx, :width], "attention_mask": (np.arange(width)[None, :] < lengths[idx, None]).astype(np.int64)}
            if "token_type_ids" in names:  # one text per input: segment 0 throughout, as the PyTorch model defaults to
                feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
            out[idx] = self.session.run(["logits"], feed)[0]
        return out

    def predict_proba(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Class probabilities, shape (len(texts), len(labels)), in the input order."""
        return _softmax(self.logits(texts, batch_size))

    def predict(self, texts: list[str], batch_size: int = 64) -> list[dict]:
        """One {"label", "probabilities"} per text, in the input order (as `Predictor.predict`)."""
        return [{"label": self.labels[int(row.argmax())], "probabilities": {lab: float(p) for lab, p in zip(self.labels, row)}}
                for row in self.predict_proba(texts, batch_size)]


def export_onnx(run_dir: Path, opset: int | None = None, min_agreement: float = 0.999, max_logit_diff: float = 1e-3,
                key: bytes | None = None) -> dict:
    """Export a finished encoder classification run to run_dir/export/model.onnx, verify it on the test split, record
    the result in export/export.json and the run's manifest; returns what export.json holds.

    torch.onnx's TorchScript exporter writes the run's fine-tuned classifier (model/) with dynamic batch and sequence
    axes (inputs input_ids, attention_mask and token_type_ids where the model takes them; output logits) into a temp
    folder inside export/. ONNX Runtime (CPU) and the PyTorch model (fp32, eval) then score the run's test split, read
    again from the data config.yaml names (`held_out_texts`). The export passes when they agree on the predicted label
    for at least `min_agreement` of the test examples and no logit differs by more than `max_logit_diff`: only then is
    the file moved to export/model.onnx. Otherwise it is deleted (an earlier export with it, which export.json no
    longer describes), export.json says passed: false and an FmtuneError gives the numbers.

    manifest.json then covers export/ (its files' hashes, a summary under "exports"), so `fmtune verify` keeps passing.
    A signed manifest is re-signed with `key` (default $FMTUNE_MANIFEST_KEY), or left as it is when there is no key
    (export/ is then not covered, which verify notes). `opset`: the ONNX opset (default: the exporter's).
    """
    from fmtune.serving.predict import Predictor
    from fmtune.store import lineage

    start = time.perf_counter()
    run_dir = Path(run_dir)
    if not 0 <= min_agreement <= 1 or max_logit_diff < 0:
        raise FmtuneError(f"thresholds: min_agreement must be within 0..1 and max_logit_diff at least 0 (got {min_agreement}, {max_logit_diff}).")
    report = _check_encoder_classifier(run_dir)
    _require_onnx()
    export_dir = run_dir / EXPORT_FOLDER
    _check_export_folder(export_dir)
    key = key if key is not None else lineage.manifest_key()
    record_in_manifest = _check_manifest(run_dir, key)

    predictor = Predictor.from_run(run_dir, bf16=False)
    model = predictor.model.float().eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if weight_bytes > MAX_PROTOBUF_BYTES:
        raise FmtuneError(f"{run_dir}: the model's weights are {weight_bytes / 1024**3:.1f} GiB in fp32; one ONNX file holds at most 2 GiB "
                          "and this export does not write ONNX external data.")
    texts = held_out_texts(run_dir, report)
    names = _input_names(model, predictor.tokenizer)

    export_dir.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=export_dir, prefix=TEMP_PREFIX))
    try:
        tmp_file = tmp / ONNX_FILE
        used_opset = _export(model, predictor.tokenizer, texts, predictor.max_length, names, tmp_file, opset)
        onnx_predictor = OnnxPredictor(run_dir, _session(tmp_file), predictor.tokenizer, predictor.labels, predictor.max_length, report)
        agreement, diff = _compare(predictor, onnx_predictor, texts)
        passed = agreement >= min_agreement and diff <= max_logit_diff
        import onnxruntime

        record: dict[str, Any] = {
            "format": "onnx",
            "file": f"{EXPORT_FOLDER}/{ONNX_FILE}" if passed else None,
            "opset": used_opset,
            "exporter": f"{EXPORTER}, torch {_version('torch')}",
            "onnx_version": _version("onnx"),
            "onnxruntime_version": onnxruntime.__version__,
            "execution_provider": "CPUExecutionProvider",
            "sha256": lineage.sha256_file(tmp_file),
            "bytes": tmp_file.stat().st_size,
            "inputs": names,
            "outputs": ["logits"],
            "dynamic_axes": {"batch": 0, "sequence": 1},
            "labels": list(predictor.labels),
            "max_length": predictor.max_length,
            "model_sha256": _weights_hash(run_dir / "model"),
            "data_sha256": report.get("data", {}).get("sha256"),
            "test_examples": len(texts),
            "agreement": agreement,
            "max_logit_diff": diff if np.isfinite(diff) else None,  # None: ONNX Runtime gave NaN or infinite logits
            "thresholds": {"min_agreement": min_agreement, "max_logit_diff": max_logit_diff},
            "passed": passed,
            **_bookkeeping(record_in_manifest),
        }
        _keep_or_drop(tmp_file, export_dir / ONNX_FILE, passed)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    record["seconds"] = round(time.perf_counter() - start, 2)
    lineage.write_json_atomic(export_dir / RECORD_FILE, record)
    if record_in_manifest:
        _record_in_manifest(run_dir, record, key)
    if not passed:
        raise FmtuneError(
            f"{run_dir}: the ONNX export failed its check on {len(texts)} test examples: prediction agreement {agreement:.4f} "
            f"(at least {min_agreement} needed), max logit difference {diff:.3g} (at most {max_logit_diff} allowed). No ONNX file "
            f"was kept; {export_dir / RECORD_FILE} records the result. An opset other than {used_opset} or looser thresholds may help."
        )
    return record


def _bookkeeping(record_in_manifest: bool) -> dict:
    """The fields every export record ends with (seconds filled in once the check is done)."""
    return {"manifest": "recorded in manifest.json" if record_in_manifest else
            "not recorded: manifest.json is signed and no key was given (export/ is not covered by it)",
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "seconds": 0.0}


def _keep_or_drop(tmp_file: Path, final: Path, passed: bool) -> None:
    """A passed export replaces its final file; a failed one (fmtune's own temp file, removed with its temp folder)
    also removes an earlier export at that name, which its record no longer describes."""
    if passed:
        os.replace(tmp_file, final)
    else:
        final.unlink(missing_ok=True)


def _finished_report(run_dir: Path, export: str, needs: str) -> dict:
    """A finished run folder's report.json (it has model/); an FmtuneError that says what is missing otherwise."""
    if not (run_dir / "model").is_dir():
        raise FmtuneError(f"{run_dir}: no model/ folder here. Is this a finished fmtune run folder? (see `fmtune runs list`)")
    report_path = run_dir / "report.json"
    if not report_path.is_file():
        raise FmtuneError(f"{report_path}: not found; {export} needs a finished run folder (its report names {needs}).")
    try:
        return json.loads(report_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FmtuneError(f"{report_path}: not a JSON report ({exc}); `fmtune verify {run_dir}` checks the run's files.") from None


def _check_encoder_classifier(run_dir: Path) -> dict:
    """The run's report; refuse folders that are not finished encoder classification runs."""
    from fmtune.models.lm_classify import PROMPT_FILE

    report = _finished_report(run_dir, "ONNX export", "the task and data")
    task = report.get("task", {})
    if task.get("type") == "generation":
        raise FmtuneError(f"{run_dir}: ONNX export is for encoder classifiers; this is a generation run (a causal LM that writes "
                          "answers). Serve it with `fmtune serve` as it is.")
    if task.get("model_kind") == "causal_lm" or (run_dir / "model" / PROMPT_FILE).is_file():
        raise FmtuneError(f"{run_dir}: ONNX export is for encoder classifiers; this run classifies with a causal LM (labels are "
                          "scored as answers), which the export does not cover. Serve it with `fmtune serve` as it is.")
    if task.get("type", "classification") != "classification":
        raise FmtuneError(f"{run_dir}: ONNX export is for encoder classifiers; this is a {task.get('type')} run.")
    return report


def _read_record(path: Path) -> dict | None:
    """export.json as fmtune writes it (a JSON object with format "onnx"), else None."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and record.get("format") == "onnx" else None


def _check_export_folder(export_dir: Path) -> None:
    """export/ may hold only what earlier fmtune exports wrote (the ONNX export and a GGUF export per quantisation, each
    file next to the record that describes it); a crashed export's temp folder is removed."""
    if not export_dir.exists():
        return
    if export_dir.is_symlink() or not export_dir.is_dir():
        raise FmtuneError(f"{export_dir}: not a folder fmtune made; move it away to export this run.")
    records = _export_files()
    for name, (record_name, read) in records.items():
        ours = (export_dir / record_name).is_file() and read(export_dir / record_name) is not None
        if (export_dir / name).exists() and not ours:
            raise FmtuneError(f"{export_dir / name}: exists and was not written by fmtune (no {record_name} of an fmtune export next to it); "
                              "fmtune never overwrites a file it did not create. Move it away, then export again.")
    known = set(records) | {record_name for record_name, _ in records.values()}
    foreign = []
    for entry in sorted(export_dir.iterdir()):
        if entry.name.startswith((TEMP_PREFIX, GGUF_TEMP_PREFIX)) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        elif entry.name.endswith(".tmp") and entry.is_file() and any(entry.name.startswith(f".{r}.") for r in known if r.endswith(".json")):
            entry.unlink()  # a temp file of write_json_atomic, left by a crash
        elif not (entry.name in known and entry.is_file() and not entry.is_symlink()):
            foreign.append(entry.name)
    if foreign:
        raise FmtuneError(f"{export_dir}: holds files fmtune did not write ({', '.join(foreign)}); the manifest would have to cover them. "
                          "Move them out of the run folder, then export again.")


def _check_manifest(run_dir: Path, key: bytes | None) -> bool:
    """Whether the export can be recorded in manifest.json (False: signed, and no key to re-sign it). Refuses a run
    whose files no longer match its manifest (the export would be of another model than the run's) or whose signature
    does not check out (re-signing would vouch for a changed manifest)."""
    from fmtune.store import lineage

    manifest = lineage.load_manifest(run_dir)
    result = lineage.check_run(run_dir, check_inputs=False, key=key)
    # export/ is rewritten below; a signature that is missing while a key is set is not the export's to judge (the
    # manifest stays unsigned). Every problem of check_run starts with the path it is about.
    blocking = [p for p in result.problems if not p.startswith((f"{EXPORT_FOLDER}/", f"{lineage.MANIFEST_NAME}:"))]
    if result.signature == "invalid":
        blocking.append(f"{lineage.MANIFEST_NAME}: its signature does not match (or the key is not the one it was signed with)")
    if blocking:
        raise FmtuneError(f"{run_dir}: does not match its manifest, so it is not exported (`fmtune verify {run_dir}` says the same):", problems=blocking)
    if "signature" in manifest and key is None:
        if EXPORT_FOLDER in manifest.get("covers", {}).get("folders", []):
            raise FmtuneError(f"{run_dir}: manifest.json is signed and covers an earlier export; a new export must re-sign it. Set "
                              f"${lineage.KEY_ENV_VAR} (or pass the key) to the key the run was signed with.")
        return False
    return True


def _record_in_manifest(run_dir: Path, record: dict, key: bytes | None) -> None:
    """Cover export/ in manifest.json: its files' hashes and a summary under "exports" ("onnx", or "gguf" by quantisation);
    re-signed if it was signed."""
    from fmtune.store import lineage

    manifest = lineage.load_manifest(run_dir)
    if "covers" in manifest:  # a version 1 manifest (no "covers") checks the listed outputs only: it stays so
        manifest["covers"]["folders"] = sorted({*manifest["covers"]["folders"], EXPORT_FOLDER})
    outputs = {rel: sha for rel, sha in manifest["outputs"].items() if not rel.startswith(f"{EXPORT_FOLDER}/")}
    outputs.update({f"{EXPORT_FOLDER}/{rel}": sha for rel, sha in lineage.hash_tree(run_dir / EXPORT_FOLDER).items()})
    manifest["outputs"] = dict(sorted(outputs.items()))
    if record.get("format") == "gguf":  # one summary per quantisation: exports.gguf.<quantization>
        summary = {k: record[k] for k in GGUF_SUMMARY}
        manifest.setdefault("exports", {}).setdefault("gguf", {})[record["quantization"]] = summary
    else:
        summary = {k: record[k] for k in ("file", "sha256", "opset", "exporter", "onnxruntime_version", "test_examples", "agreement",
                                          "max_logit_diff", "thresholds", "passed", "created_at")}
        manifest.setdefault("exports", {})["onnx"] = summary
    if "signature" in manifest and key is not None:
        lineage.sign_manifest(manifest, key)
    lineage.write_json_atomic(run_dir / lineage.MANIFEST_NAME, manifest)


def held_out_texts(run_dir: Path, report: dict | None = None) -> list[str]:
    """The run's test split as it was evaluated: the data files its config.yaml names, read and split again with its seed
    (and redacted if it was), checked against the data sha256 its report.json records."""
    import yaml

    from fmtune.config import DataConfig
    from fmtune.data import audit, labeled

    run_dir = Path(run_dir)
    report = report if report is not None else json.loads((run_dir / "report.json").read_text(encoding="utf-8"))
    raw = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    data_cfg = DataConfig.model_validate(raw.get("data") or {})
    named = [p for p in (data_cfg.data, data_cfg.train, data_cfg.validation, data_cfg.test) if p is not None]
    missing = [str(p) for p in named if not Path(p).is_file()]
    if missing:
        raise FmtuneError(f"{run_dir}: the test split is read again from the data the run used, and {', '.join(missing)} "
                          f"{'is' if len(missing) == 1 else 'are'} not found (paths in config.yaml are relative to the folder the run "
                          "was started in). Run the export from that folder, or put the file back at that path.")
    splits = labeled.load_splits(data_cfg, int(raw.get("seed", 0)))
    if data_cfg.redact_pii:
        splits, _ = audit.redact_splits(splits)
    expected = report.get("data", {}).get("sha256")
    if expected and splits.sha256 != expected:
        raise FmtuneError(f"{run_dir}: the data files config.yaml names ({', '.join(map(str, named))}) no longer give the run's splits "
                          f"(data sha256 {splits.sha256[:12]}…, the run recorded {expected[:12]}…): they changed since the run, so "
                          "its test split cannot be checked against.")
    return [ex.text for ex in splits.test]


def _input_names(model, tokenizer) -> list[str]:
    import inspect

    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in tokenizer.model_input_names and "token_type_ids" in inspect.signature(model.forward).parameters:
        names.append("token_type_ids")
    return names


def _export(model, tokenizer, texts: list[str], max_length: int, names: list[str], path: Path, opset: int | None) -> int:
    """Trace the model to ONNX at path; returns the opset the file declares. The example batch holds two texts, both
    padded, so that neither the batch size nor a mask without padding is baked into the trace."""
    import onnx
    import torch

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *inputs):
            return self.inner(**dict(zip(names, inputs))).logits

    from fmtune.evidence.evaluate import pad_table

    ids = tokenizer((texts + texts)[:2], truncation=True, max_length=max(2, max_length - 2), add_special_tokens=True)["input_ids"]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    table, lengths = pad_table(ids, pad_id)
    table = np.pad(table, ((0, 0), (0, 2)), constant_values=pad_id)
    example = {"input_ids": torch.from_numpy(table),
               "attention_mask": torch.from_numpy((np.arange(table.shape[1])[None, :] < lengths[:, None]).astype(np.int64)),
               "token_type_ids": torch.zeros(table.shape, dtype=torch.int64)}
    wrapper = Logits(model).eval()  # export restores the wrapper's mode afterwards, recursively: it must be eval too
    axes = {name: {0: "batch", 1: "sequence"} for name in names} | {"logits": {0: "batch"}}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes; the test split checks the result
            torch.onnx.export(wrapper, tuple(example[n] for n in names), str(path), dynamo=False, input_names=names,
                              output_names=["logits"], dynamic_axes=axes, opset_version=opset, do_constant_folding=True)
        onnx.checker.check_model(str(path))
    except Exception as exc:  # the exporter raises many types; say which model and opset failed
        raise FmtuneError(f"ONNX export of {type(model).__name__} failed{f' at opset {opset}' if opset else ''}: {type(exc).__name__}: {exc}") from exc
    finally:
        model.eval()
    proto = onnx.load(str(path), load_external_data=False)
    return next(int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _compare(predictor, onnx_predictor: OnnxPredictor, texts: list[str], batch_size: int = 64) -> tuple[float, float]:
    """(share of texts with the same predicted label, max |logit difference|): PyTorch fp32 against ONNX Runtime."""
    from fmtune.evidence.evaluate import predict_logits

    reference = predict_logits(predictor.model, predictor.tokenizer, texts, predictor.max_length, batch_size=batch_size, bf16=False)
    exported = onnx_predictor.logits(texts, batch_size)
    agreement = float(np.mean(reference.argmax(-1) == exported.argmax(-1)))
    diff = float(np.abs(reference - exported).max())
    return agreement, diff if np.isfinite(diff) else float("inf")  # NaN logits never pass


def _weights_hash(model_dir: Path) -> str:
    from fmtune.models.loading import weights_hash

    return weights_hash(model_dir)


def _version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


def export_gguf(run_dir: Path, quantization: str = "f16", min_agreement: float = 0.95, key: bytes | None = None) -> dict:
    """Export a finished generation run's causal LM (model/, LoRA merged) to run_dir/export/model-<quantization>.gguf,
    verify it on the run's test prompts, record the result in export/export-gguf-<quantization>.json and the run's
    manifest; returns what that record holds.

    The file is written with the `gguf` package as llama.cpp's convert_hf_to_gguf.py writes a Llama model
    (`fmtune.serving.gguf_export.write`; `quantization` is one of gguf_export.QUANTIZATIONS: f32, f16, q8_0) into a
    temp folder inside export/. transformers' GGUF loader then reads the model and its tokenizer back from the file,
    and the pair answers the run's test prompts (logs/generations.jsonl, each the user message of a chat, as `fmtune
    predict` sends it) next to the run's own model in fp32: next-token agreement and the largest next-token logit
    difference at the end of the prompts, and exact agreement of the greedy answers within the run's decoding budget
    (report.json task.max_new_tokens). The export passes when at least `min_agreement` of the answers agree (and no
    logit is NaN): only then is the file moved to export/model-<quantization>.gguf. Otherwise it is deleted (an earlier
    export of that quantisation with it), the record says passed: false and an FmtuneError gives the numbers.

    The manifest then covers export/ as after an ONNX export (summary under exports.gguf.<quantization>); a signed
    manifest is re-signed with `key` (default $FMTUNE_MANIFEST_KEY), or left as it is when there is no key.
    """
    from fmtune.models import causal_lm
    from fmtune.serving import gguf_export
    from fmtune.store import lineage

    start = time.perf_counter()
    run_dir = Path(run_dir)
    if quantization not in gguf_export.QUANTIZATIONS:
        raise FmtuneError(f"quantization {quantization!r}: expected one of {', '.join(gguf_export.QUANTIZATIONS)} "
                          f"({'; '.join(f'{q}: {what}' for q, what in gguf_export.QUANTIZATIONS.items())}).")
    if not 0 <= min_agreement <= 1:
        raise FmtuneError(f"min_agreement must be within 0..1 (got {min_agreement}): the share of test prompts whose greedy answer must agree.")
    report = _check_generation_run(run_dir)
    model_dir = run_dir / "model"
    tokenizer_json = gguf_export.check_model(model_dir)
    export_dir = run_dir / EXPORT_FOLDER
    _check_export_folder(export_dir)
    key = key if key is not None else lineage.manifest_key()
    record_in_manifest = _check_manifest(run_dir, key)
    prompts = _test_prompts(run_dir, report)
    max_new_tokens = int((report.get("task") or {}).get("max_new_tokens") or 64)  # 64: runs from before the budget was recorded

    model, tokenizer = causal_lm.load_model(model_dir).eval(), causal_lm.load_tokenizer(model_dir)
    name = GGUF_FILE.format(quantization=quantization)
    export_dir.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=export_dir, prefix=GGUF_TEMP_PREFIX))
    try:
        tmp_file = tmp / name
        written = gguf_export.write(model, tokenizer, model_dir, tokenizer_json, tmp_file, quantization, run_dir.name,
                                    (report.get("base_model") or {}).get("name"))
        exported, exported_tokenizer = gguf_export.load(tmp, name)
        found = gguf_export.compare(model, tokenizer, exported, exported_tokenizer, prompts, max_new_tokens)
        del exported
        finite = np.isfinite(found["max_next_token_logit_diff"])
        passed = bool(found["answer_agreement"] >= min_agreement and finite)
        import transformers

        record: dict[str, Any] = {
            "format": "gguf",
            "quantization": quantization,
            "quantization_means": gguf_export.QUANTIZATIONS[quantization],
            "file": f"{EXPORT_FOLDER}/{name}" if passed else None,
            "sha256": lineage.sha256_file(tmp_file),
            "bytes": tmp_file.stat().st_size,
            "gguf_version": _version("gguf"),
            "writer": f"gguf.GGUFWriter {_version('gguf')}, as llama.cpp's convert_hf_to_gguf.py (LlamaModel) writes a Llama model",
            "architecture": "llama",
            "tensors": written["tensors"],
            "tokenizer": written["tokenizer"],
            "checked_with": f"transformers {transformers.__version__} GGUF loader (model and tokenizer read back from the file), fp32, "
                            "against the run's model/ in fp32",
            "model_sha256": _weights_hash(model_dir),
            "max_new_tokens": max_new_tokens,
            **{k: v for k, v in found.items() if k != "max_next_token_logit_diff"},
            "max_next_token_logit_diff": found["max_next_token_logit_diff"] if finite else None,  # None: NaN or infinite logits
            "thresholds": {"min_agreement": min_agreement},
            "passed": passed,
            **_bookkeeping(record_in_manifest),
        }
        _keep_or_drop(tmp_file, export_dir / name, passed)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    record["seconds"] = round(time.perf_counter() - start, 2)
    lineage.write_json_atomic(export_dir / GGUF_RECORD_FILE.format(quantization=quantization), record)
    if record_in_manifest:
        _record_in_manifest(run_dir, record, key)
    if not passed:
        differ = "; ".join(f"{d['prompt']!r}: run {d['run_model']!r}, GGUF {d['gguf']!r}" for d in found["answers_that_differ"][:3])
        raise FmtuneError(
            f"{run_dir}: the GGUF {quantization} export failed its check on {len(prompts)} test prompts: greedy answer agreement "
            f"{found['answer_agreement']:.4f} (at least {min_agreement} needed), next-token agreement {found['next_token_agreement']:.4f}, "
            f"max next-token logit difference {found['max_next_token_logit_diff']:.3g}, tokenizer agreement {found['tokenizer_agreement']:.4f}"
            f"{f' (for example {differ})' if differ else ''}. No GGUF file was kept; "
            f"{export_dir / GGUF_RECORD_FILE.format(quantization=quantization)} records the result. A wider quantisation "
            f"({', '.join(q for q in gguf_export.QUANTIZATIONS if q != quantization)}) or a lower --min-agreement may pass."
        )
    return record


def _check_generation_run(run_dir: Path) -> dict:
    """The run's report; refuse folders that are not finished generation runs."""
    report = _finished_report(run_dir, "GGUF export", "the task and the decoding budget")
    task = report.get("task") or {}
    kind = task.get("type", "classification")
    if kind != "generation" and task.get("model_kind") == "causal_lm":
        raise FmtuneError(f"{run_dir}: GGUF export is for generation runs (a causal LM that writes answers); this run classifies with a "
                          "causal LM (labels are scored as answers), which the export does not cover. Serve it with `fmtune serve` as it is.")
    if kind != "generation":
        raise FmtuneError(f"{run_dir}: GGUF export is for generation runs (a causal LM that writes answers); this is a {kind} run. "
                          f"Encoder classifiers export with `fmtune export {run_dir} --format onnx`.")
    return report


def _test_prompts(run_dir: Path, report: dict) -> list[str]:
    """The run's test prompts, as logs/generations.jsonl lists them (one row per test example)."""
    path = run_dir / "logs" / "generations.jsonl"
    if not path.is_file():
        raise FmtuneError(f"{path}: not found; the GGUF export is checked on the run's test prompts, which a generation run writes there.")
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FmtuneError(f"{path} line {n}: not JSON ({exc}).") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise FmtuneError(f"{path} line {n}: no 'prompt' text; every line is a test example with its prompt.")
        prompts.append(row["prompt"])
    expected = (report.get("data") or {}).get("test")
    if not prompts or (expected is not None and len(prompts) != expected):
        raise FmtuneError(f"{path}: {len(prompts)} test prompts, the run's report counts {expected}; the export is checked on all of them.")
    return prompts


def _read_gguf_record(path: Path, quantization: str) -> dict | None:
    """export/export-gguf-<quantization>.json as fmtune writes it, else None."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and record.get("format") == "gguf" and record.get("quantization") == quantization else None


def _export_files() -> dict[str, tuple[str, Any]]:
    """{file an fmtune export writes into export/: (the record next to it, the reader that says the record is fmtune's)}."""
    from functools import partial

    from fmtune.serving.gguf_export import QUANTIZATIONS

    files: dict[str, tuple[str, Any]] = {ONNX_FILE: (RECORD_FILE, _read_record)}
    for q in QUANTIZATIONS:
        files[GGUF_FILE.format(quantization=q)] = (GGUF_RECORD_FILE.format(quantization=q), partial(_read_gguf_record, quantization=q))
    return files
