"""Another model's outputs on the same test inputs (`--compare NAME=FILE`), read and matched to the test split by input.

The file holds one row per input the other model answered (the test inputs at least; outputs on other rows, e.g. the
whole data file, are ignored): an input column (`text` for classification, `prompt` for generation, or chat `messages`
whose last assistant message is the other model's answer) and an output column (`prediction`, or `label` /
`completion` / `output`). Matching is on the input text with its surrounding whitespace removed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fmtune.config import DataConfig
from fmtune.data import labeled
from fmtune.errors import DataError

OUTPUT_COLUMNS = ("prediction", "label", "completion", "output")


@dataclass(frozen=True)
class Outputs:
    """The other model's output for every test input, in test order, and where they came from."""

    name: str
    path: Path
    sha256: str
    outputs: list[str]
    rows: int  # rows in the file
    ignored: int  # rows whose input is not a test input


def read_outputs(name: str, path: Path, test_inputs: list[str], generation: bool, cfg: DataConfig) -> Outputs:
    """Every test input's output from the file; raises one DataError naming the file, the row and the fix."""
    where = f"--compare {name}={path}"
    table = labeled.read_table(path, [], [], {}, {}, cfg.encoding)
    columns = [str(c).strip() for c in (table.columns or [])] if table is not None else []
    input_column = _input_column(columns, generation, cfg)
    output_column = next((c for c in OUTPUT_COLUMNS if c in columns), None)
    chat = input_column == cfg.messages_column
    if input_column is None or (output_column is None and not chat):
        wanted_in = f"'{cfg.prompt_column}' or '{cfg.messages_column}'" if generation else f"'{cfg.text_column}'"
        raise DataError(f"{where}: the file needs an input column ({wanted_in}, the same inputs as the test split) and an output column "
                        f"({', '.join(repr(c) for c in OUTPUT_COLUMNS)}) with the other model's answer; it has {columns or 'no columns'}.")
    problems: list[str] = []
    wanted = {input_column: "the input column"} | ({output_column: "the output column"} if output_column and not chat else {})
    files: dict[str, str] = {}
    found = labeled.read_columns(path, wanted, problems, {}, files, cfg.encoding)
    labeled._raise_if(problems)
    unit, rows, values = found
    answers: dict[str, str] = {}
    for i, row in enumerate(rows):
        key, answer = _row(values, i, input_column, output_column, chat, (str(path), unit, row), problems)
        if key is None:
            continue
        if key in answers and answers[key] != answer:
            problems.append(f"{path} {unit} {row}: the input {_short(key)} appears earlier with another output ({_short(answers[key])}); keep one output per input.")
        answers.setdefault(key, answer)
    labeled._raise_if(problems)
    missing = [t for t in test_inputs if t.strip() not in answers]
    if missing:
        raise DataError(f"{where}: no output for {len(missing)} of the {len(test_inputs)} test inputs, e.g. {_short(missing[0])}. Fix: run the other model "
                        "on every input of the data file (or of --test) and write one row per input; rows for other inputs are ignored.")
    wanted_keys = {t.strip() for t in test_inputs}
    return Outputs(name, path, next(iter(files.values()), ""), [answers[t.strip()] for t in test_inputs], len(rows), sum(k not in wanted_keys for k in answers))


def _input_column(columns: list[str], generation: bool, cfg: DataConfig) -> str | None:
    if not generation:
        return cfg.text_column if cfg.text_column in columns else None
    return next((c for c in (cfg.prompt_column, cfg.messages_column) if c in columns), None)


def _row(values: dict, i: int, input_column: str, output_column: str | None, chat: bool, at: tuple[str, str, int], problems: list[str]) -> tuple[str | None, str]:
    """(matching key, output) of one row, or (None, '') after appending its problem."""
    source, unit, row = at
    where = f"{source} {unit} {row}"
    if chat:  # the conversation up to its last assistant message is the input, that message the other model's answer
        from fmtune.data.pairs import Pair, _chat_pair

        tally = {"after_target": 0, "earlier_assistant": 0, "preference_rows": 0}
        pair = _chat_pair(source, unit, row, values[input_column][i], DataConfig(messages_column=input_column), problems, {}, tally)
        return (None, "") if pair is None else (Pair(pair.messages, "", source, row).prompt.strip(), pair.completion)
    raw_in, raw_out = values[input_column][i], values[output_column][i]
    text, problem = labeled._text_value(raw_in)
    if problem or text is None:
        problems.append(f"{where}, column '{input_column}': {problem or 'empty'}; every row needs the input the other model answered.")
        return None, ""
    if raw_out is None or raw_out is labeled.MISSING:
        problems.append(f"{where}, column '{output_column}': empty; write the other model's output (an empty answer as \"\").")
        return None, ""
    out = raw_out if isinstance(raw_out, str) else json.dumps(raw_out) if isinstance(raw_out, dict | list) else str(raw_out)
    return text.strip(), out


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(str(text).split())
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")
