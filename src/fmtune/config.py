"""Grouped, typed run configuration.

Each field's description is the single source of `fmtune run --help` and of the documented YAML.
A YAML file is grouped (`data:`, `model:`, `train:`, `eval:`, `evidence:`, plus top-level `name`, `out`, `seed`);
command-line flags override it. Unknown keys are errors that name the key.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fmtune.errors import ConfigError


def _accepts_bool(annotation: Any) -> bool:
    return annotation is bool or any(_accepts_bool(a) for a in get_args(annotation) if a is not Literal)


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _yaml_booleans(source: str, group: str, values: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """YAML reads yes/no/on/off as booleans, and pydantic would take True as the number 1 (`epochs: yes` ran one epoch):
    a boolean is kept only where the option is a switch; `bf16: on` means the choice "on"; anything else is a problem."""
    out = dict(values)
    for key, value in values.items():
        field = GROUPS[group].model_fields[key]
        if not isinstance(value, bool) or _accepts_bool(field.annotation):
            continue
        choices = [c for a in (field.annotation, *get_args(field.annotation)) if get_origin(a) is Literal for c in get_args(a)]
        word = "on" if value else "off"
        if word in choices:
            out[key] = word
            continue
        expected = f"one of {choices}" if choices else f"a {'number' if field.annotation in (int, float) or int in get_args(field.annotation) or float in get_args(field.annotation) else 'value'}"
        problems.append(f"{source}: '{group}.{key}' is the boolean {str(value).lower()} (YAML reads yes/no/on/off as true/false), but it takes {expected}"
                        + (f", e.g. {key}: {field.default}." if field.default is not None and not isinstance(field.default, (dict, list)) else "."))
    return out


class DataConfig(_Group):
    data: Path | None = Field(None, description="One labeled file (CSV, JSONL or Parquet), split automatically (stratified, seeded) into train/validation/test.")
    train: Path | None = Field(None, description="Explicit training file (instead of --data).")
    validation: Path | None = Field(None, description="Explicit validation file (optional with --train; split from train when absent).")
    test: Path | None = Field(None, description="Explicit test file (required with --train).")
    task: Literal["auto", "classification", "generation"] = Field("auto", description="Task kind: auto (prompt/completion or messages columns -> generation, text/label -> classification), classification, generation.")
    text_column: str = Field("text", description="Column holding the input text.")
    label_column: str = Field("label", description="Column holding the label (strings or integers).")
    prompt_column: str = Field("prompt", description="Generation data: column holding the prompt (instruction/question).")
    completion_column: str = Field("completion", description="Generation data: column holding the reference completion (answer).")
    messages_column: str = Field("messages", description="Generation data: column holding OpenAI-style chat messages [{role, content}, ...].")
    validation_fraction: float = Field(0.1, gt=0, lt=0.5, description="Share of the data held out for validation when splitting automatically.")
    test_fraction: float = Field(0.2, gt=0, lt=0.5, description="Share of the data held out for testing when splitting automatically.")
    max_examples: int | None = Field(None, ge=10, description="Use a stratified sample of at most this many rows (for quick trials).")
    drop_unlabeled: bool = Field(False, description="Drop rows with an empty text or label instead of stopping (the count is reported).")
    redact_pii: bool = Field(False, description="Mask personal data (emails, phones, card numbers, IPs, ...) before training and before anything is written.")
    label_descriptions: dict[str, str] = Field(default_factory=dict, description="Natural-language description per label for the zero-shot rung, e.g. {fresh: 'a positive review'}. On the command line: --label-descriptions 'fresh=a positive review;rotten=a negative review'.")
    encoding: str = Field("utf-8", description="Text encoding of CSV/TSV/JSON data files, e.g. utf-8 (a BOM is allowed), cp1252 (Windows/Excel in Western Europe), latin-1, shift_jis, gb18030.")

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        import codecs

        try:
            codec = codecs.lookup(value)
        except LookupError:
            codec = None
        if codec is None or not getattr(codec, "_is_text_encoding", True):  # rot13, hex, base64: codecs, not text encodings
            raise ValueError(f"unknown text encoding {value!r}; use a Python codec name such as utf-8, cp1252, latin-1, utf-16, shift_jis or gb18030")
        return codec.name


class ModelConfig(_Group):
    model: str | None = Field(None, description="Base model: 'minilm' (packaged all-MiniLM-L6-v2 encoder), 'smollm2' (packaged SmolLM2-135M-Instruct causal LM) a local Hugging Face folder, or a Hub id (org/name, optionally @revision) already in the local Hugging Face cache (HF_HOME; never downloaded); safetensors only. Default: minilm for classification, smollm2 for generation; a causal LM (smollm2 or a *ForCausalLM folder) also classifies, answering with the label word.")
    max_length: int | None = Field(None, ge=8, description="Max tokens per text; default: derived from the training texts' token lengths (99th percentile, capped by the model).")


class TrainConfig(_Group):
    method: Literal["auto", "full", "lora"] = Field("auto", description="Fine-tuning method: full (all weights) or lora (low-rank adapters through peft, merged for serving); auto = full for encoders, lora for causal LMs.")
    epochs: int = Field(8, ge=1, description="Maximum epochs; early stopping on validation usually ends sooner.")
    patience: int = Field(2, ge=1, description="Early stopping: epochs without validation improvement before stopping.")
    min_delta: float = Field(0.005, ge=0, description="Early stopping: validation macro-F1 must rise by more than this to count as better (within it, a lower validation loss counts).")
    batch_size: int = Field(32, ge=1, description="Training batch size.")
    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate for fine-tuning (LoRA uses 10x this unless --lora-learning-rate is set).")
    search: str | int = Field(default_factory=lambda: os.environ.get("FMTUNE_SEARCH", "auto"), description="Search of the learning rate of the fine_tuned and from_scratch rungs on the validation split (never test), trials pruned when they fall behind: auto (fine_tuned: 4 rates for an encoder, 3 for a causal LM; from_scratch: 3 and 2), off (the default rate only), or N trials; default auto, or $FMTUNE_SEARCH. A rate you set (--learning-rate, --lora-learning-rate, --scratch-learning-rate) is not searched.")

    @field_validator("search", mode="before")
    @classmethod
    def _search_value(cls, value: object) -> str:
        text = str(value).strip().lower()
        if text in ("off", "auto", "false") or (text.isdigit() and int(text) >= 1):
            return "off" if text == "false" else text  # YAML reads `search: off` as False
        raise ValueError("expected off, auto or a number of trials (1 or more)")

    lora_learning_rate: float | None = Field(None, gt=0, description="Peak learning rate for LoRA (default: 10x --learning-rate).")
    head_learning_rate: float | None = Field(None, gt=0, description="Full fine-tuning: peak learning rate for the parameters the base model does not have (the new classifier head); default: 30x --learning-rate, because a randomly initialised head at the encoder's rate learns too slowly, above all with many classes (benchmarks/head_lr_sets.py).")
    scratch_learning_rate: float = Field(3e-4, gt=0, description="Peak learning rate for the from_scratch rung (random init trains best with a higher rate).")
    scratch_budget: float = Field(1.0, gt=0, le=10, description="The from_scratch rung's epoch limit as a multiple of the epochs the fine-tune ran: 1 (default) gives it the same optimizer steps, the budget the comparison claims; more is a separate choice, and the report shows what it cost.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="Share of steps spent warming up the learning rate.")
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha.")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    class_weights: Literal["auto", "balanced", "none"] = Field("auto", description="Loss class weights: auto (balanced when the largest class is over 1.5x the smallest), balanced, none.")
    bf16: Literal["auto", "on", "off"] = Field("auto", description="bf16 autocast: auto (on where the CPU has AVX512-BF16/AMX or on a bf16 GPU), on, off.")
    bf16_weights: bool = Field(True, description="With bf16 on (one process): run forward and backward on a bf16 copy of the weights and keep fp32 master weights for the optimizer, instead of autocast casting weights and activations at every op; off = autocast.")
    fused_step: bool = Field(True, description="On CPU with the bf16 copy: the AdamW step in one compiled pass (bf16 gradients in, fp32 weights and moments updated, bf16 copy written) instead of torch's four passes (cast, norm, AdamW, cast back); built once with the machine's C compiler, torch's passes where there is none.")
    sparse_embedding_grad: bool = Field(True, description="One process: compute the input embedding's gradient for the batch's tokens only and add it into one persistent dense buffer (same AdamW update; no per-step allocation and fill of a dense vocabulary-sized gradient).")
    embedding_rows: bool = Field(True, description="Train only the input-embedding rows of tokens that occur in the training or validation data; every other row gets the weight decay AdamW would have given it, in one multiply at the end (the same update, on a fraction of the rows).")
    length_bucketing: bool = Field(True, description="Group texts of similar length into batches (dynamic padding, less compute on pad tokens).")
    dynamic_padding: bool = Field(True, description="Pad each batch only to its longest text (off: pad to the longest training text).")
    packing: bool = Field(False, description="Causal LMs: pack each batch's examples into rows of 128 tokens (or its longest example), position ids restarting per example and attention kept within each example. Off by default: with length bucketing there is little padding left to remove (the report's levers give the padding share).")
    compile: bool = Field(False, description="torch.compile the training forward pass (off by default: on CPU its compile time outweighs the gain at these data sizes).")
    token_cache: bool = Field(True, description="Tokenise each text once and keep the ids in the fmtune cache (FMTUNE_CACHE), keyed by the sha256 of the tokenizer and the texts; a re-run on the same data reads them back.")
    fast_dropout: bool = Field(True, description="On CPU, draw dropout masks from a fast counter-free generator (numpy SFC64 seeded from torch's RNG) instead of torch's serial Bernoulli sampler; same probabilities, ~10x cheaper masks.")
    dropout: float | None = Field(None, ge=0, lt=1, description="Override the model's dropout (hidden and attention) during fine-tuning; default keeps the model's own.")
    threads: int | None = Field(None, ge=1, description="CPU threads for torch (default: torch's choice).")
    distributed: Literal["ddp", "fsdp"] = Field("ddp", description="Multi-process strategy under torchrun / accelerate launch / --nproc: ddp (a full model copy per process, gradients averaged) or fsdp (parameters, gradients and optimizer state sharded across processes, for models that do not fit one device).")
    checkpoint_every: int = Field(0, ge=0, description="Checkpoint every N optimizer steps and at every epoch end. 0 (default): checkpoint by time instead, see --checkpoint-seconds. Checkpoints let --resume continue mid-epoch; Ctrl-C always writes one.")
    checkpoint_seconds: float = Field(600, ge=0, description="With --checkpoint-every 0: write a checkpoint when this many seconds of training have passed since the last one (so a kill loses at most that much; Ctrl-C always checkpoints), not after every cheap epoch: a checkpoint holds the weights and twice their size of optimizer state. 0 = at every epoch end.")


class EvalConfig(_Group):
    few_shot_k: int = Field(8, ge=1, description="Labeled examples per class for the few_shot rung.")
    bootstrap: int = Field(1000, ge=100, description="Bootstrap resamples for 95% confidence intervals.")
    eval_batch_size: int = Field(64, ge=1, description="Batch size for evaluation and embedding.")
    metric: str | None = Field(None, description="Primary metric the verdict is decided on (default: macro_f1 for classification; rouge_l for generation; also exact_match, token_f1).")
    max_new_tokens: int | None = Field(None, ge=1, description="Generation: greedy decoding stops after this many new tokens (or at the chat template's end of turn). Default: derived from the training and validation completions' token lengths (1.25 x the longest, plus 2).")
    rungs: list[str] = Field(default_factory=lambda: ["zero_shot", "few_shot", "head_only", "fine_tuned", "from_scratch"], description="Ladder rungs to run (zero_shot, few_shot, from_scratch and fine_tuned are required by the report).")
    compare: dict[str, Path] = Field(default_factory=dict, description="Other models' outputs on the same test inputs, each a rung of the ladder scored and paired like the others (e.g. the vendor model you are leaving): --compare 'vendor=outputs.jsonl'. A file has the input column (text; prompt or messages for generation) and a prediction column, one row per input; rows for inputs outside the test split are ignored.")


class EvidenceConfig(_Group):
    general_text: Path | None = Field(None, description="General-domain text file (one document per line) for retention and domain shift; default: the Lee news corpus shipped in gensim.")
    max_forgetting: float | None = Field(None, gt=0, lt=1, description="Fail the run (exit 3) when retention drops by more than this fraction, e.g. 0.2.")
    curve: bool = Field(True, description="Run the learning curve (fine-tune on 12.5/25/50% of train); --no-curve skips it.")
    curve_fractions: list[float] = Field(default_factory=lambda: [0.125, 0.25, 0.5], description="Training-set fractions for the learning curve (100% is the fine_tuned rung).")
    target_metric: float | None = Field(None, gt=0, le=1, description="Primary-metric target: the report says how many examples the learning curve forecasts for it.")
    price_per_hour: float | None = Field(None, ge=0, description="Price of the training hardware per hour; default: a stated typical on-demand price for the device kind.")
    latency_repeats: int = Field(20, ge=3, description="Timed repeats for latency measurements.")


class RunConfig(_Group):
    name: str | None = Field(None, description="Run name (default: derived from the data file and a timestamp).")
    out: Path | None = Field(None, description="Run folder (default: runs/<name>).")
    seed: int = Field(0, description="Random seed for splitting, sampling and training.")
    overwrite: bool = Field(False, description="Replace an existing run folder (or an unfinished one with another config).")
    resume: bool = Field(False, description="Continue the newest unfinished run with this config from its last checkpoint (re-running the same command with the same --name/--out resumes too).")
    track: list[str] = Field(default_factory=list, description="Experiment trackers to send the finished run to: mlflow (MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_NAME as MLflow reads them; the URI is never written into the run) and/or tensorboard (event files in the run folder's tensorboard/). Optional extras: pip install 'fmtune[mlflow]' / 'fmtune[tensorboard]'.")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    evidence: EvidenceConfig = Field(default_factory=EvidenceConfig)


GROUPS: dict[str, type[_Group]] = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "evidence": EvidenceConfig,
}
TOP_LEVEL = ("name", "out", "seed", "overwrite", "resume", "track")


def flag_index() -> dict[str, tuple[str | None, str]]:
    """Map every flat option name (e.g. 'text_column') to (group or None, field). Names are unique."""
    index: dict[str, tuple[str | None, str]] = {name: (None, name) for name in TOP_LEVEL}
    for group, cls in GROUPS.items():
        for field in cls.model_fields:
            if field in index:
                raise AssertionError(f"duplicate option name {field!r}")
            index[field] = (group, field)
    return index


def _suggest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def load_yaml(path: Path) -> dict[str, Any]:
    """Read a grouped YAML config file; syntax errors name the line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror}).") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)}).") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of groups (data:, model:, train:, ...), got {type(raw).__name__}.")
    return raw


def build_config(file_values: dict[str, Any] | None, overrides: dict[str, Any], source: str = "config") -> RunConfig:
    """Merge a grouped mapping (from YAML) with flat command-line overrides; collect every problem, raise once."""
    problems: list[str] = []
    merged: dict[str, Any] = {}
    for key, value in (file_values or {}).items():
        if key in TOP_LEVEL:
            merged[key] = value
        elif key in GROUPS:
            if not isinstance(value, dict):
                problems.append(f"{source}: '{key}' must be a mapping of options, got {value!r}.")
                continue
            fields = list(GROUPS[key].model_fields)
            for sub in value:
                if sub not in fields:
                    problems.append(f"{source}: unknown key '{key}.{sub}'.{_suggest(sub, fields)} Valid keys in '{key}': {', '.join(fields)}.")
            merged[key] = _yaml_booleans(source, key, {k: v for k, v in value.items() if k in fields}, problems)
        else:
            problems.append(f"{source}: unknown key '{key}'.{_suggest(key, list(TOP_LEVEL) + list(GROUPS))} Valid top-level keys: {', '.join(list(TOP_LEVEL) + list(GROUPS))}.")
    index = flag_index()
    for key, value in overrides.items():
        if key not in index:
            problems.append(f"unknown option '--{key.replace('_', '-')}'.{_suggest(key, list(index))}")
            continue
        group, field = index[key]
        if group is None:
            merged[field] = value
        else:
            merged.setdefault(group, {})[field] = value
    if not problems:
        try:
            cfg = RunConfig.model_validate(merged)
        except ValidationError as exc:
            for err in exc.errors():
                loc = ".".join(str(p) for p in err["loc"])
                flag = "--" + str(err["loc"][-1]).replace("_", "-")
                problems.append(f"{source}: '{loc}' ({flag}): {err['msg']} (got {err.get('input')!r}).")
        else:
            problems.extend(validate(cfg))
            if not problems:
                return cfg
    raise ConfigError(f"{len(problems)} problem(s) in the run configuration:", problems)


def validate(cfg: RunConfig) -> list[str]:
    """Cross-field checks; every problem names the flag."""
    problems: list[str] = []
    d = cfg.data
    if d.data is None and d.train is None:
        problems.append("no data given: pass --data FILE (split automatically) or --train FILE --test FILE.")
    if d.data is not None and (d.train or d.validation or d.test):
        problems.append("--data and --train/--validation/--test are exclusive: pass one file to split, or explicit split files.")
    if d.train is not None and d.test is None:
        problems.append("--train needs --test: fmtune measures every rung on a held-out test file.")
    if d.validation_fraction + d.test_fraction >= 0.8:
        problems.append("--validation-fraction plus --test-fraction leave under 20% for training; lower them.")
    for path_field in ("data", "train", "validation", "test"):
        p = getattr(d, path_field)
        if p is not None and Path(p).is_dir():
            problems.append(f"--{path_field} {p}: is a folder; pass one data file (CSV, TSV, JSONL/JSON or Parquet), e.g. --{path_field} {Path(p) / 'train.csv'}.")
        elif p is not None and not Path(p).is_file():
            problems.append(f"--{path_field} {p}: file not found.")
    if cfg.evidence.general_text is not None and not Path(cfg.evidence.general_text).is_file():
        problems.append(f"--general-text {cfg.evidence.general_text}: file not found.")
    required = {"zero_shot", "few_shot", "fine_tuned", "from_scratch"}
    known = required | {"head_only"}
    unknown = [r for r in cfg.eval.rungs if r not in known]
    if unknown:
        problems.append(f"--rungs: unknown rung(s) {unknown}; choose from {sorted(known)}.")
    if "fine_tuned" not in cfg.eval.rungs:
        problems.append("--rungs must include fine_tuned: it is what the run proves.")
    if not {"zero_shot", "few_shot", "head_only"} & set(cfg.eval.rungs):
        problems.append(f"--rungs {','.join(cfg.eval.rungs)}: the verdict compares fine_tuned with a rung that does not train the FM, so include zero_shot, "
                        "few_shot or head_only (e.g. --rungs zero_shot,fine_tuned); the full report contract has zero_shot, few_shot, fine_tuned and from_scratch.")
    unknown_trackers = [t for t in cfg.track if t not in ("mlflow", "tensorboard")]
    if unknown_trackers:
        problems.append(f"--track {','.join(cfg.track)}: unknown tracker(s) {unknown_trackers}; choose mlflow and/or tensorboard.")
    for name, path in cfg.eval.compare.items():
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]{0,39}", name) or name in known or name.startswith("curve"):
            problems.append(f"--compare {name}={path}: the name becomes a rung of the ladder; use letters, digits, '_', '.' or '-' (starting with a letter), "
                            f"not one of {sorted(known)}.")
        elif not Path(path).is_file():
            problems.append(f"--compare {name}={path}: file not found.")
    if any(not 0 < f < 1 for f in cfg.evidence.curve_fractions):
        problems.append("--curve-fractions: every fraction must be between 0 and 1 (100% is the fine_tuned rung).")
    return problems


def to_yaml(cfg: RunConfig) -> str:
    """The resolved config as grouped YAML (paths as strings)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
