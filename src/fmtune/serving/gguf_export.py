"""GGUF files of Llama causal LMs: written as llama.cpp's converter writes them, read back through transformers' GGUF loader."""

from __future__ import annotations

import json
from pathlib import Path

from fmtune.errors import FmtuneError

# What each quantisation offered stores, and what it costs. The numbers an export measured (agreement with the run's
# model on its test prompts, file size) are in its export/export-gguf-<quantization>.json.
QUANTIZATIONS = {
    "f32": "every tensor as 32-bit floats (4 bytes a weight): the run's fp32 weights exactly, so logits agree to rounding and no "
           "answer changes",
    "f16": "2-D weights as 16-bit floats (2 bytes a weight, half of f32), norms as f32: each weight keeps about 3 significant "
           "digits, logits move a little and a greedy answer rarely changes",
    "q8_0": "2-D weights as 8-bit integers in blocks of 32 that share one f16 scale (8.5 bits a weight, 0.27 of f32), norms as f32, "
            "a row that is not whole blocks stays f16: each weight is off by up to 1/254 of its block's largest, logits move "
            "more than with f16 and a greedy answer changes where two tokens are nearly tied",
}
# llama.cpp's general.file_type (gguf.LlamaFileType) and the tensor type of its 2-D weights (gguf.GGMLQuantizationType).
FILE_TYPES = {"f32": ("ALL_F32", "F32"), "f16": ("MOSTLY_F16", "F16"), "q8_0": ("MOSTLY_Q8_0", "Q8_0")}
ARCHITECTURES = ("LlamaForCausalLM",)  # SmolLM2 is one; llama.cpp's LlamaModel converts it to general.architecture "llama"
# llama.cpp's tokenizer.ggml.pre names the pre-tokenizer (its split regex) of a byte-level BPE vocabulary.
PRE_TOKENIZERS = {
    "gpt-2": "GPT-2's split regex (a ByteLevel pre-tokenizer with use_regex)",
    "smollm": "every digit alone, then GPT-2's split regex (SmolLM's Digits + ByteLevel)",
}


def permute(weights, n_head: int, n_head_kv: int | None):
    """llama.cpp's LlamaModel.permute: Hugging Face's q_proj/k_proj rows (rotary halves) into GGML's interleaved
    rotary pairs; transformers' GGUF loader (LlamaTensorProcessor) undoes it."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def check_model(model_dir: Path) -> dict:
    """tokenizer.json of a model folder this export writes faithfully; every reason it cannot, at once."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise FmtuneError(f"{model_dir}: cannot read config.json as a Hugging Face model config ({exc}).") from None
    problems = []
    architectures = list(getattr(config, "architectures", None) or [])
    if config.model_type != "llama" or architectures[:1] != list(ARCHITECTURES):
        problems.append(f"architecture {', '.join(architectures) or config.model_type}: GGUF export supports {', '.join(ARCHITECTURES)} "
                        "(Llama-architecture causal LMs such as SmolLM2) only")
    else:
        rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            problems.append(f"rope scaling {rope.get('rope_type', rope.get('type'))!r}: only plain RoPE is exported (transformers' GGUF "
                            "loader, the check, reads no rope scaling back for llama)")
        for flag in ("attention_bias", "mlp_bias"):
            if getattr(config, flag, False):
                problems.append(f"{flag}: true; the GGUF loader of transformers does not read Llama biases back")
        if getattr(config, "hidden_act", "silu") != "silu":
            problems.append(f"hidden_act {config.hidden_act!r}: llama.cpp's llama architecture computes SiLU")
    tokenizer_file = model_dir / "tokenizer.json"
    tokenizer_json: dict = {}
    if not tokenizer_file.is_file():
        problems.append("no tokenizer.json: the vocabulary is written from a fast (tokenizers) byte-level BPE tokenizer")
    else:
        tokenizer_json = json.loads(tokenizer_file.read_text(encoding="utf-8"))
        kind = (tokenizer_json.get("model") or {}).get("type")
        if kind != "BPE" or not _has_byte_level(tokenizer_json):
            problems.append(f"tokenizer {kind or 'of unknown type'}{'' if kind != 'BPE' else ' without byte-level pre-tokenizer'}: GGUF export "
                            "writes llama.cpp's 'gpt2' tokenizer (byte-level BPE, as SmolLM2's); SentencePiece and word-level "
                            "vocabularies are not written")
    if problems:
        raise FmtuneError(f"{model_dir}: cannot be exported to GGUF:", problems=problems)
    return tokenizer_json


def _has_byte_level(tokenizer_json: dict) -> bool:
    parts = [tokenizer_json.get("pre_tokenizer") or {}, tokenizer_json.get("decoder") or {}]
    parts += [p for part in list(parts) for p in part.get("pretokenizers", part.get("decoders", []))]
    return any(p.get("type") == "ByteLevel" for p in parts)


def tokenizer_pre(tokenizer_json: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer ("default" when it is none of those in PRE_TOKENIZERS)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    byte_level = steps[-1].get("type") == "ByteLevel" and steps[-1].get("use_regex", True) and not steps[-1].get("add_prefix_space")
    if byte_level and len(steps) == 1:
        return "gpt-2"
    if byte_level and len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits"):
        return "smollm"
    return "default"


def write(model, tokenizer, model_dir: Path, tokenizer_json: dict, path: Path, quantization: str, name: str,
          base_model: str | None = None) -> dict:
    """Write `model` (a LlamaForCausalLM, fp32) and its tokenizer to the GGUF file `path` the way llama.cpp's
    convert_hf_to_gguf.py (LlamaModel) does; returns what it wrote (tensors and tokenizer), read back from the file.

    Metadata: llama.* hyperparameters (context, embedding and feed-forward lengths, block count, head counts, kv
    heads, key/value length, rope base and dimension count, RMS epsilon, vocab size), general.file_type and the
    quantisation version. Tokenizer: ggml.model "gpt2" with tokens, token types (special added tokens CONTROL) and
    merges, bos/eos/unk/pad ids, the chat template the run used, and no BOS or EOS added to a prompt (fmtune renders
    prompts with the chat template and adds none). Tensors: gguf's tensor name map for llama; q_proj and k_proj
    permuted as LlamaModel.permute does; output.weight only when the embeddings are not tied (llama.cpp and
    transformers' GGUF loader both read its absence as tied); 1-D tensors and norms in f32."""
    import gguf
    import torch

    config = model.config
    file_type, weight_type = FILE_TYPES[quantization]
    arch = gguf.MODEL_ARCH.LLAMA
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    if base_model:
        writer.add_base_model_count(1)
        writer.add_base_model_name(0, base_model)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = dict(getattr(config, "rope_parameters", None) or {})
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_file_type(getattr(gguf.LlamaFileType, file_type))
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab = _write_vocab(writer, tokenizer, model_dir, tokenizer_json, config.vocab_size)

    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    unmapped, fell_back = [], []
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue
        new_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            unmapped.append(hf_name)
            continue
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = permute(data, n_head, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = permute(data, n_head, n_kv)
        qtype = gguf.GGMLQuantizationType.F32 if data.ndim <= 1 or new_name.endswith("_norm.weight") else getattr(gguf.GGMLQuantizationType, weight_type)
        try:
            data = gguf.quants.quantize(data, qtype)
        except gguf.QuantError:  # as llama.cpp: a row that is not whole blocks stays f16
            qtype = gguf.GGMLQuantizationType.F16
            data = gguf.quants.quantize(data, qtype)
            fell_back.append(new_name)
        writer.add_tensor(new_name, data, raw_dtype=qtype)
    if unmapped:
        writer.close()
        raise FmtuneError(f"{model_dir}: tensors that gguf's llama tensor name map does not know ({', '.join(unmapped[:5])}"
                          f"{' ...' if len(unmapped) > 5 else ''}); the export writes a model only whole.")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    reader = gguf.GGUFReader(path)
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    tensors = {"count": len(reader.tensors), "types": dict(sorted(types.items())), "fell_back_to_f16": fell_back,
               "output_weight": "not written: the embeddings are tied (read back as tied)" if tied else "written (embeddings not tied)",
               "q_k_permuted": "as llama.cpp's LlamaModel.permute"}
    return {"tensors": tensors, "tokenizer": vocab}


def folder_chat_template(model_dir: Path) -> str | None:
    """The chat template a model folder carries: chat_template.jinja (how transformers saves it now), else
    tokenizer_config.json's chat_template (older saves; the only one gguf 0.17's SpecialVocab reads)."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = model_dir / "tokenizer_config.json"
    value = json.loads(config.read_text(encoding="utf-8")).get("chat_template") if config.is_file() else None
    return value if isinstance(value, str) else None


def _write_vocab(writer, tokenizer, model_dir: Path, tokenizer_json: dict, vocab_size: int) -> dict:
    """tokenizer.ggml.* as llama.cpp's _set_vocab_gpt2 writes them (get_vocab_base, then gguf.SpecialVocab)."""
    import gguf

    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise FmtuneError(f"{model_dir}: the tokenizer has ids up to {max(vocab.values())}, the model's vocab_size is {vocab_size}.")
    reverse = {i: token for token, i in vocab.items()}
    added, decoder = tokenizer.get_added_vocab(), tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:  # rows of the embedding no token uses
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if not decoder[i].normalized:  # llama.cpp matches added tokens pre-normalized
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[i].special or (token.startswith("<|") and token.endswith("|>")):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    pre = tokenizer_pre(tokenizer_json)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    config_file = model_dir / "tokenizer_config.json"
    prefix_space = json.loads(config_file.read_text(encoding="utf-8")).get("add_prefix_space") if config_file.is_file() else None
    if prefix_space is not None:
        writer.add_add_space_prefix(bool(prefix_space))
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    special.add_special_token = {"bos": False, "eos": False}  # fmtune never adds them to a rendered prompt
    template = "the model folder's" if folder_chat_template(model_dir) == tokenizer.chat_template else "fmtune's ChatML, which the run used (the model folder has none)"
    special.chat_template = tokenizer.chat_template  # the template the run rendered its prompts with
    special.add_to_gguf(writer, quiet=True)
    return {"model": "gpt2", "pre": pre, "pre_means": PRE_TOKENIZERS.get(pre, "llama.cpp's default split regex: the tokenizer's own pre-tokenizer is none llama.cpp names"),
            "tokens": len(tokens), "merges": len(special.merges), "special_token_ids": dict(special.special_token_ids),
            "add_bos_token": False, "add_eos_token": False, "chat_template": template}


def load(folder: Path, file_name: str):
    """(model in fp32, tokenizer) read from the GGUF file by transformers' GGUF loader."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fmtune.models import causal_lm

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file_name, local_files_only=True, trust_remote_code=False, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name, local_files_only=True, trust_remote_code=False)
    except (ValueError, OSError, KeyError, NotImplementedError) as exc:
        raise FmtuneError(f"{file_name}: transformers' GGUF loader cannot read the file back ({type(exc).__name__}: {exc}).") from exc
    causal_lm.ensure_chat_template(tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return model.eval(), tokenizer


def compare(model, tokenizer, exported, exported_tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16) -> dict:
    """The GGUF model (with the tokenizer read from the file) against the run's model on the test prompts, each the
    user message of a chat (as `fmtune predict` and `fmtune serve` send it): next-token logits at the prompt's end
    (both fed the run tokenizer's ids), then greedy answers with each side's own tokenizer, `max_new_tokens` long."""
    import numpy as np
    import torch

    from fmtune.models import causal_lm
    from fmtune.models.loading import model_token_limit

    budget = max(1, model_token_limit(model.config, tokenizer) - max_new_tokens)
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    ids = [causal_lm.prompt_ids(tokenizer, c, budget) for c in conversations]
    same_ids = [causal_lm.prompt_ids(exported_tokenizer, c, budget) == i for c, i in zip(conversations, ids)]
    agree, diff = [], 0.0
    with torch.inference_mode():
        for row in ids:
            x = torch.tensor([row])
            ref, got = model(input_ids=x).logits[0, -1].float(), exported(input_ids=x).logits[0, -1].float()
            agree.append(int(ref.argmax()) == int(got.argmax()))
            d = float((ref - got).abs().max())
            diff = max(diff, d if np.isfinite(d) else float("inf"))  # NaN logits never pass
    reference = causal_lm.generate(model, tokenizer, conversations, max_new_tokens, batch_size, False, budget)
    answers = causal_lm.generate(exported, exported_tokenizer, conversations, max_new_tokens, batch_size, False, budget)
    differ = [{"prompt": p, "run_model": a, "gguf": b} for p, a, b in zip(prompts, reference, answers) if a != b]
    return {"test_prompts": len(prompts), "tokenizer_agreement": float(np.mean(same_ids)), "next_token_agreement": float(np.mean(agree)),
            "max_next_token_logit_diff": diff, "answer_agreement": float(np.mean([a == b for a, b in zip(reference, answers)])),
            "chat_template_round_trip": exported_tokenizer.chat_template == tokenizer.chat_template, "answers_that_differ": differ[:5]}
