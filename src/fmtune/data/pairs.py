"""Generation data: prompt/completion pairs or chat `messages`, validated row by row and split (seeded, not stratified).

Files are read by fmtune.data.labeled.read_columns (CSV/TSV/JSONL/JSON/Parquet), so problems name the file, the line, the column
and the fix exactly as for classification data. For chat data the LAST assistant message is the target; the messages
before it are the prompt (earlier assistant turns are context, not trained on).

OpenAI's fine-tuning files are read as they are: chat JSONL (`messages`, system/developer/user/assistant roles, content
as a string or a list of text parts, `weight` 0/1 on assistant messages: the target is the last assistant message whose
weight is not 0) and preference JSONL (`input.messages` + `preferred_output`: trained supervised on the preferred answer;
`non_preferred_output` is counted, not used). Tool calls are refused row by row with the fix.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from fmtune.config import DataConfig
from fmtune.data import labeled as data_mod
from fmtune.data.labeled import Example, Splits
from fmtune.errors import ConfigError

ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system message
PREFERENCE_COLUMNS = ("input", "preferred_output")  # OpenAI's preference (DPO) fine-tuning JSONL


@dataclass(frozen=True)
class Pair:
    """One generation example: the conversation before the target, and the target completion."""

    messages: tuple[tuple[str, str], ...]  # (role, content)
    completion: str
    source: str
    row: int

    @property
    def prompt(self) -> str:
        """The prompt as plain text: the user's message alone, or 'role: content' lines for a conversation."""
        if len(self.messages) == 1 and self.messages[0][0] == "user":
            return self.messages[0][1]
        return "\n".join(f"{role}: {content}" for role, content in self.messages)

    def chat(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]


@dataclass
class GenSplits:
    train: list[Pair]
    validation: list[Pair]
    test: list[Pair]
    dropped: dict[str, int] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    sha256: str = ""
    after_target: int = 0  # chat rows with messages after the last assistant message (ignored, reported)
    earlier_assistant: int = 0  # chat rows with earlier assistant messages of weight 1 (context here; OpenAI trains on them)
    preference_rows: int = 0  # preference rows: trained on preferred_output, non_preferred_output unused

    def for_audit(self) -> Splits:
        """The pairs as fmtune.data.labeled Examples for fmtune.data.audit: text = prompt and completion (duplicates, leakage and PII
        are checked on both), one constant label (no classes)."""
        def conv(pairs: list[Pair]) -> list[Example]:
            return [Example(text=f"{p.prompt}\n{p.completion}", label="pair", source=p.source, row=p.row) for p in pairs]

        return Splits(conv(self.train), conv(self.validation), conv(self.test), ["pair"], dict(self.dropped), dict(self.files), self.sha256)


def detect_task(cfg: DataConfig) -> str:
    """'classification' or 'generation': --task when given, else from the first file's columns (prompt/completion or
    messages -> generation; text/label, or anything unreadable, -> classification, whose loader reports the problems)."""
    if cfg.task != "auto":
        return cfg.task
    path = cfg.data or cfg.train
    if path is None or not Path(path).is_file():
        return "classification"
    table = data_mod.read_table(Path(path), [], [], {}, {}, cfg.encoding)
    if table is None or table.columns is None:
        return "classification"
    columns = {str(c).strip() for c in table.columns}
    if cfg.text_column in columns and cfg.label_column in columns:
        return "classification"
    if cfg.messages_column in columns or (cfg.prompt_column in columns and cfg.completion_column in columns) or set(PREFERENCE_COLUMNS) <= columns:
        return "generation"
    return "classification"


def load_pairs(cfg: DataConfig, seed: int) -> GenSplits:
    """Read, validate and split generation data; raise one DataError listing every problem."""
    if cfg.data is None and (cfg.train is None or cfg.test is None):
        raise ConfigError("no data given: pass --data FILE (split automatically) or --train FILE --test FILE.")
    problems: list[str] = []
    dropped: dict[str, int] = {}
    files: dict[str, str] = {}
    tally = {"after_target": 0, "earlier_assistant": 0, "preference_rows": 0}
    named = {"data": cfg.data} if cfg.data is not None else {"train": cfg.train, "validation": cfg.validation, "test": cfg.test}
    loaded = {role: _load_file(Path(path), cfg, problems, dropped, files, tally) for role, path in named.items() if path is not None}
    data_mod._raise_if(problems)
    rng = random.Random(seed)
    if cfg.data is not None:
        pairs = _sample(loaded["data"], cfg.max_examples, rng, dropped)
        n_test = math.ceil(cfg.test_fraction * len(pairs))
        n_val = math.ceil(cfg.validation_fraction * len(pairs))
        if len(pairs) - n_test - n_val < 1:
            data_mod._raise_if([f"{cfg.data}: {len(pairs)} usable rows are too few to hold out {n_test} for test and {n_val} for validation and train on the rest; add rows."])
        order = list(range(len(pairs)))
        rng.shuffle(order)
        test = [pairs[i] for i in sorted(order[:n_test])]
        validation = [pairs[i] for i in sorted(order[n_test : n_test + n_val])]
        train = [pairs[i] for i in sorted(order[n_test + n_val :])]
    else:
        train = _sample(loaded["train"], cfg.max_examples, rng, dropped)
        test = loaded["test"]
        if "validation" in loaded:
            validation = loaded["validation"]
        else:
            n_val = math.ceil(cfg.validation_fraction * len(train))
            if len(train) - n_val < 1:
                data_mod._raise_if([f"{cfg.train}: {len(train)} rows are too few to hold out {n_val} for validation; add rows or pass --validation FILE."])
            order = list(range(len(train)))
            rng.shuffle(order)
            validation = [train[i] for i in sorted(order[:n_val])]
            train = [train[i] for i in sorted(order[n_val:])]
    splits = GenSplits(train, validation, test, dropped, files, **tally)
    splits.sha256 = pairs_hash(splits)
    return splits


def pairs_hash(splits: GenSplits) -> str:
    """sha256 over (split, messages, completion) of every pair, in order."""
    digest = hashlib.sha256()
    encode = json.JSONEncoder(ensure_ascii=False).encode
    for name in ("train", "validation", "test"):
        for p in getattr(splits, name):
            digest.update(encode([name, [list(m) for m in p.messages], p.completion]).encode("utf-8") + b"\n")
    return digest.hexdigest()


def redact(splits: GenSplits) -> tuple[GenSplits, dict[str, int]]:
    """Mask personal data in every message and completion (fmtune.data.audit's scanner); counts by kind."""
    from collections import Counter

    from fmtune.data.audit import redact_text

    counts: Counter = Counter()

    def mask(text: str) -> str:
        out, found = redact_text(text)
        counts.update(found)
        return out

    def pairs(ps: list[Pair]) -> list[Pair]:
        return [Pair(tuple((role, mask(content)) for role, content in p.messages), mask(p.completion), p.source, p.row) for p in ps]

    out = GenSplits(pairs(splits.train), pairs(splits.validation), pairs(splits.test), splits.dropped, splits.files,
                    after_target=splits.after_target, earlier_assistant=splits.earlier_assistant, preference_rows=splits.preference_rows)
    out.sha256 = pairs_hash(out)
    return out, {k: int(v) for k, v in counts.items()}


def prompt_overlap(splits: GenSplits) -> int:
    """Test prompts that also occur (normalised) as a training prompt, whatever their completion."""
    from fmtune.data.audit import normalise

    seen = {normalise(p.prompt) for p in splits.train}
    return sum(1 for p in splits.test if normalise(p.prompt) in seen)


# ---------------------------------------------------------------- reading and validating rows


def _load_file(path: Path, cfg: DataConfig, problems: list[str], dropped: dict[str, int], files: dict[str, str], tally: dict[str, int]) -> list[Pair]:
    source = str(path)
    table = data_mod.read_table(path, [], [], {}, {}, cfg.encoding)  # which layout: chat messages, preference or prompt/completion
    columns = {str(c).strip() for c in (table.columns or [])} if table is not None else set()
    prompt_completion = cfg.prompt_column in columns and cfg.completion_column in columns
    chat = cfg.messages_column in columns and not prompt_completion
    preference = not chat and not prompt_completion and set(PREFERENCE_COLUMNS) <= columns
    if preference:
        wanted = {"input": "the preference file's 'input'", "preferred_output": "the preference file's 'preferred_output'"}
    elif chat:
        wanted = {cfg.messages_column: "--messages-column"}
    else:
        wanted = {cfg.prompt_column: "--prompt-column", cfg.completion_column: "--completion-column"}
    found = data_mod.read_columns(path, wanted, problems, dropped, files, cfg.encoding)
    if found is None:
        return []
    unit, rows, values = found
    if preference:
        conversations = [_preference_messages(f"{source} {unit} {row}", i, o, problems) for row, i, o in zip(rows, values["input"], values["preferred_output"])]
        tally["preference_rows"] += sum(c is not None for c in conversations)
        return [p for p in (_chat_pair(source, unit, row, c, cfg, problems, dropped, tally, "preferred_output") for row, c in zip(rows, conversations) if c is not None) if p]
    if chat:
        return [p for p in (_chat_pair(source, unit, row, value, cfg, problems, dropped, tally) for row, value in zip(rows, values[cfg.messages_column])) if p]
    pairs: list[Pair] = []
    for row, raw_prompt, raw_completion in zip(rows, values[cfg.prompt_column], values[cfg.completion_column]):
        where = f"{source} {unit} {row}"
        prompt, completion = _text(raw_prompt, where, cfg.prompt_column, cfg, problems, dropped), _text(raw_completion, where, cfg.completion_column, cfg, problems, dropped)
        if prompt is not None and completion is not None:
            pairs.append(Pair((("user", prompt),), completion, source, row))
    return pairs


def _text(value: object, where: str, column: str, cfg: DataConfig, problems: list[str], dropped: dict[str, int]) -> str | None:
    text, problem = data_mod._text_value(value)
    if problem:
        problems.append(f"{where}, column '{column}': {problem} (got {data_mod._describe(value, column)}); fix the value.")
        return None
    if text is None:
        if cfg.drop_unlabeled:
            key = "empty_completion" if column == cfg.completion_column else "empty_prompt"
            dropped[key] = dropped.get(key, 0) + 1
        else:
            problems.append(f"{where}, column '{column}': empty (got {data_mod._describe(value, column)}); fill it in or pass --drop-unlabeled.")
        return None
    return text


def _preference_messages(where: str, given: object, preferred: object, problems: list[str]) -> list | None:
    """An OpenAI preference row as one conversation: input.messages, then the preferred assistant answer."""
    shape = 'expected {"input": {"messages": [...]}, "preferred_output": [{"role": "assistant", "content": "..."}], "non_preferred_output": [...]}'
    messages = given.get("messages") if isinstance(given, dict) else None
    if not isinstance(messages, list):
        problems.append(f"{where}, column 'input': no 'messages' list; {shape}.")
        return None
    if not isinstance(preferred, list) or not preferred:
        problems.append(f"{where}, column 'preferred_output': not a list of assistant messages; {shape}.")
        return None
    return [*messages, *preferred]


def _content(where: str, i: int, m: dict, problems: list[str]) -> str | None:
    """A message's text: a string, or OpenAI's list of content parts (text parts joined); None after a problem."""
    content = m.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(part, dict) for part in content):
        other = sorted({str(part.get("type")) for part in content if part.get("type") != "text"})
        if other:
            problems.append(f"{where}: message {i} has content parts of type {', '.join(other)}; fmtune trains on text only: drop those parts or the row.")
            return None
        if all(isinstance(part.get("text"), str) for part in content):
            return "".join(part["text"] for part in content)
    if m.get("tool_calls") or m.get("function_call"):
        problems.append(f"{where}: message {i} is a tool call; fmtune's generation task trains on text answers only: remove the tool turns (or the row).")
        return None
    problems.append(f"{where}: message {i} must have string 'content' (or a list of text parts), got {data_mod._describe(content, 'content')}.")
    return None


def _chat_pair(source: str, unit: str, row: int, value: object, cfg: DataConfig, problems: list[str], dropped: dict[str, int], tally: dict[str, int],
               column: str | None = None) -> Pair | None:
    where = f"{source} {unit} {row}, column '{column or cfg.messages_column}'"
    shape = 'expected a list of messages like [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]'
    if isinstance(value, str):  # CSV cells hold the list as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            problems.append(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); {shape}.")
            return None
    if value is data_mod.MISSING or value is None:
        if cfg.drop_unlabeled:
            dropped["empty_messages"] = dropped.get("empty_messages", 0) + 1
        else:
            problems.append(f"{where}: no messages; {shape}, or pass --drop-unlabeled.")
        return None
    if not isinstance(value, list) or not value:
        problems.append(f"{where}: {shape}, got {data_mod._json_type(value) if not isinstance(value, list) else 'an empty list'}.")
        return None
    messages: list[tuple[str, str]] = []
    weights: list[int] = []
    for i, m in enumerate(value, start=1):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            problems.append(f"{where}: message {i} must be an object with string 'role' and 'content' (got {data_mod._describe(m, 'message')}); {shape}.")
            return None
        role = ROLE_ALIASES.get(m["role"], m["role"])
        if role in ("tool", "function"):
            problems.append(f"{where}: message {i} has role {m['role']!r} (a tool result); fmtune's generation task trains on text answers only: remove the tool turns (or the row).")
            return None
        if role not in ROLES:
            problems.append(f"{where}: message {i} has role {m['role']!r}; roles are {', '.join(ROLES)} (and OpenAI's developer).")
            return None
        content = _content(where, i, m, problems)
        if content is None:
            return None
        weight = m.get("weight", 1)
        if "weight" in m and (role != "assistant" or weight not in (0, 1) or isinstance(weight, bool)):
            problems.append(f"{where}: message {i} has weight {weight!r}; a weight is 0 or 1, on assistant messages only (OpenAI's format).")
            return None
        messages.append((role, content))
        weights.append(int(weight))
    last = max((i for i, (role, _) in enumerate(messages) if role == "assistant" and weights[i]), default=None)
    if last is None:
        what = "every assistant message has weight 0, so nothing is trained" if any(r == "assistant" for r, _ in messages) else "no assistant message"
        problems.append(f"{where}: {what}; the last assistant message (of weight 1) is the completion to learn. Add it, or pass --drop-unlabeled.")
        return None
    if not messages[last][1].strip() or not any(role == "user" and content.strip() for role, content in messages[:last]):
        if cfg.drop_unlabeled:
            dropped["empty_messages"] = dropped.get("empty_messages", 0) + 1
            return None
        what = "the last assistant message is empty" if not messages[last][1].strip() else "no non-empty user message before the last assistant message"
        problems.append(f"{where}: {what}; fix the row or pass --drop-unlabeled.")
        return None
    if last < len(messages) - 1:
        tally["after_target"] += 1
    if any(role == "assistant" and weights[i] for i, (role, _) in enumerate(messages[:last])):
        tally["earlier_assistant"] += 1
    return Pair(tuple(messages[:last]), messages[last][1], source, row)


def _sample(pairs: list[Pair], limit: int | None, rng: random.Random, dropped: dict[str, int]) -> list[Pair]:
    if limit is None or len(pairs) <= limit:
        return pairs
    dropped["max_examples_sample"] = dropped.get("max_examples_sample", 0) + len(pairs) - limit
    return [pairs[i] for i in sorted(rng.sample(range(len(pairs)), limit))]


# ---------------------------------------------------------------- quickstart data

# Recommended overrides for `fmtune quickstart --task generation` (SmolLM2 + LoRA, 2 CPU cores, minutes).
QUICKSTART_EXAMPLES = 100  # chatterbot pairs: 70 train, 10 validation, 20 test
QUICKSTART_OVERRIDES = {
    "task": "generation",
    "model": "smollm2",
    "method": "lora",
    "epochs": 2,
    "patience": 1,
    "batch_size": 16,
    "lora_learning_rate": 1e-3,
    "few_shot_k": 2,
    "max_new_tokens": 16,
    "eval_batch_size": 32,
    "latency_repeats": 3,
    "curve_fractions": [0.25, 0.5],
}
# The default generation quickstart: one-word answers that follow rules of English morphology and a few facts, so what
# fine-tuning teaches (the answer's form, and the rule) is visible in exact match on unseen words.
WORD_FORMS_EXAMPLES = 420  # 294 train, 42 validation, 84 test
WORD_FORMS_OVERRIDES = {**QUICKSTART_OVERRIDES, "epochs": 3, "few_shot_k": 4, "max_new_tokens": 8, "metric": "exact_match"}
WORD_FORMS_QUESTIONS = {  # questions-words.txt section -> (question for the first word of a pair; the answer is the second)
    "capital-common-countries": None,  # (capital, country) pairs: asked the other way round below
    "capital-world": None,
    "currency": "What is the currency of {}?",
    "city-in-state": "In which US state is the city of {}?",
    "family": "What is the female counterpart of the word '{}'?",
    "gram1-adjective-to-adverb": "What is the adverb formed from the adjective '{}'?",
    "gram2-opposite": "What is the opposite of '{}', formed with a prefix?",
    "gram3-comparative": "What is the comparative form of '{}'?",
    "gram4-superlative": "What is the superlative form of '{}'?",
    "gram5-present-participle": "What is the present participle (-ing form) of the verb '{}'?",
    "gram6-nationality-adjective": "What is the nationality adjective for {}?",
    "gram7-past-tense": "What is the simple past tense of '{}'?",
    "gram8-plural": "What is the plural of '{}'?",
    "gram9-plural-verbs": "What is the third-person singular present form of the verb '{}'?",
}
QUICKSTART_DATASETS = ("word-forms", "chatterbot")


def word_forms_pairs() -> dict[str, list[tuple[str, str]]]:
    """{section: sorted unique (question, answer)} from questions-words.txt in the gensim package (word-analogy lines
    'a b c d' hold two pairs (a, b) and (c, d) of one relation); read as a file, gensim is not imported."""
    from fmtune.errors import DataError
    from fmtune.packages import package_dir

    root = package_dir("gensim")
    path = root / "test" / "test_data" / "questions-words.txt" if root is not None else None
    if path is None or not path.is_file():
        raise DataError("the generation quickstart data (questions-words.txt) comes with the gensim package. Fix: pip install --no-deps gensim")
    sections: dict[str, set[tuple[str, str]]] = {}
    section = None
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith(":"):
            section = line[1:].strip()
            sections[section] = set()
            continue
        words = line.split()
        if section in WORD_FORMS_QUESTIONS and len(words) == 4:
            sections[section].update({(words[0], words[1]), (words[2], words[3])})
    out = {}
    for name, found in sections.items():
        if name not in WORD_FORMS_QUESTIONS:
            continue
        template = WORD_FORMS_QUESTIONS[name]
        out[name] = sorted((f"What is the capital of {b}?", a) if template is None else (template.format(a), b) for a, b in found)
    return out


def word_forms_jsonl(seed: int, examples: int = WORD_FORMS_EXAMPLES) -> Path:
    """A seeded sample of `examples` word-form questions, the same number from every section (as far as each has them),
    as prompt/completion JSONL written once, atomically, into the fmtune cache."""
    import os

    from fmtune.data.quickstart import cache_dir

    out = cache_dir() / "quickstart" / f"word_forms_{examples}_seed{seed}.jsonl"
    if out.is_file():
        return out
    rng = random.Random(seed)
    sections = word_forms_pairs()
    pools = {name: rng.sample(pairs, len(pairs)) for name, pairs in sorted(sections.items())}
    chosen: list[tuple[str, str]] = []
    seen: set[str] = set()
    while len(chosen) < examples and any(pools.values()):
        for pool in pools.values():  # round robin over the sections
            while pool and len(chosen) < examples:
                q, a = pool.pop()
                if q not in seen:  # the capital questions of both capital sections can coincide
                    seen.add(q)
                    chosen.append((q, a))
                    break
    rng.shuffle(chosen)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps({"prompt": q, "completion": a}, ensure_ascii=False) + "\n" for q, a in chosen), encoding="utf-8")
    os.replace(tmp, out)
    return out


def chatterbot_jsonl(seed: int, examples: int = QUICKSTART_EXAMPLES, max_answer_words: int = 20) -> Path:
    """Question -> answer pairs from the chatterbot-corpus package's English YAML files (first two turns of each
    conversation, one pair per question, answers of at most `max_answer_words` words), a seeded sample of `examples`,
    as prompt/completion JSONL written once, atomically, into the fmtune cache."""
    import os

    import yaml

    from fmtune.data.quickstart import cache_dir
    from fmtune.errors import DataError
    from fmtune.packages import package_dir

    root = package_dir("chatterbot_corpus")
    if root is None:
        raise DataError("the generation quickstart data comes with the chatterbot-corpus package. Fix: pip install --no-deps chatterbot-corpus")
    out = cache_dir() / "quickstart" / f"chatterbot_{examples}_seed{seed}.jsonl"
    if out.is_file():
        return out
    pairs: dict[str, str] = {}
    for path in sorted((root / "data" / "english").glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations") or []:
            if isinstance(conv, list) and len(conv) >= 2 and conv[0] is not None and conv[1] is not None:
                q, a = str(conv[0]).strip(), str(conv[1]).strip()
                if q and a and len(a.split()) <= max_answer_words:
                    pairs.setdefault(q, a)
    rng = random.Random(seed)
    chosen = sorted(rng.sample(sorted(pairs), min(examples, len(pairs))))
    rng.shuffle(chosen)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps({"prompt": q, "completion": pairs[q]}, ensure_ascii=False) + "\n" for q in chosen), encoding="utf-8")
    os.replace(tmp, out)
    return out
