"""Data in: read CSV/JSONL/Parquet, validate every row, split stratified and seeded.

Every problem names the file, the line (CSV/JSONL, 1-based, as an editor shows it) or row (Parquet, 0-based),
the column and the fix. Nothing is dropped silently: whatever is dropped is counted in `Splits.dropped`.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fmtune.config import DataConfig
from fmtune.errors import ConfigError, DataError


@dataclass(frozen=True)
class Example:
    text: str
    label: str
    source: str  # file path as given
    row: int  # CSV/JSONL: 1-based line number in the file; Parquet: 0-based row index
    raw_label: str | None = None  # the label as written in the file, when normalising changed it (' food ' -> 'food', '1.0' -> '1')


@dataclass
class Splits:
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    labels: list[str]  # sorted; integers sorted numerically, as strings
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count
    files: dict[str, str] = field(default_factory=dict)  # input path -> sha256 of its bytes
    sha256: str = ""  # content hash of the data as used (after cleaning/redaction): see data_hash()


FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".pq": "parquet"}
COMPRESSIONS = (".gz", ".bz2", ".xz")
MAX_LISTED = 20  # problems listed in one error; the rest are counted
MIN_PER_CLASS_AUTO = 3  # one example each for train, validation and test
_MISSING = object()  # a JSON object without the column's key
MISSING = _MISSING  # public name, for readers of read_columns()
_INT_FLOAT = re.compile(r"(-?\d+)\.0+")
_INT = re.compile(r"-?\d+")


def load_splits(cfg: DataConfig, seed: int) -> Splits:
    """Read, validate and split the data named by `cfg`; raise one DataError listing every problem."""
    if cfg.data is None and (cfg.train is None or cfg.test is None):
        raise ConfigError("no data given: pass --data FILE (split automatically) or --train FILE --test FILE.")
    problems: list[str] = []
    dropped: dict[str, int] = {}
    files: dict[str, str] = {}
    named = {"data": cfg.data} if cfg.data is not None else {"train": cfg.train, "validation": cfg.validation, "test": cfg.test}
    loaded: dict[str, list[Example]] = {}
    for role, path in named.items():
        if path is not None:
            loaded[role] = _load_file(path, cfg, problems, dropped, files)
    _raise_if(problems)

    if cfg.data is not None:
        examples = _sample(loaded["data"], cfg.max_examples, seed, dropped)
        problems += _class_problems(examples, str(cfg.data), cfg, MIN_PER_CLASS_AUTO, sampled=len(examples) < len(loaded["data"]))
        relative_val = cfg.validation_fraction / (1 - cfg.test_fraction)
        problems += _size_problems(len(examples), examples, cfg.test_fraction, "test", "--test-fraction", str(cfg.data))
        n_trainval = len(examples) - math.ceil(cfg.test_fraction * len(examples))
        problems += _size_problems(n_trainval, examples, relative_val, "validation", "--validation-fraction", str(cfg.data))
        _raise_if(problems)
        trainval, test = _split(examples, cfg.test_fraction, seed, str(cfg.data))
        train, validation = _split(trainval, relative_val, seed, str(cfg.data))
    else:
        train = _sample(loaded["train"], cfg.max_examples, seed, dropped)
        sampled = len(train) < len(loaded["train"])
        if "validation" in loaded:
            problems += _class_problems(train, str(cfg.train), cfg, 1, sampled)
            validation = loaded["validation"]
        else:
            problems += _class_problems(train, str(cfg.train), cfg, 2, sampled)
            problems += _size_problems(len(train), train, cfg.validation_fraction, "validation", "--validation-fraction", str(cfg.train))
        test = loaded["test"]
        problems += _unseen_label_problems(train, [loaded.get("validation", []), test], str(cfg.train))
        _raise_if(problems)
        if "validation" not in loaded:
            train, validation = _split(train, cfg.validation_fraction, seed, str(cfg.train))

    labels = _sorted_labels({ex.label for part in (train, validation, test) for ex in part})
    splits = Splits(train=train, validation=validation, test=test, labels=labels, dropped=dropped, files=files)
    splits.sha256 = data_hash(splits)
    return splits


def data_hash(splits: Splits) -> str:
    """sha256 over (split, label, text) of every example, in order; depends on nothing else."""
    digest = hashlib.sha256()
    encode = json.JSONEncoder(ensure_ascii=False).encode
    for name in ("train", "validation", "test"):
        for ex in getattr(splits, name):
            digest.update(encode([name, ex.label, ex.text]).encode("utf-8") + b"\n")
    return digest.hexdigest()


# ---------------------------------------------------------------- reading


def _load_file(path: Path, cfg: DataConfig, problems: list[str], dropped: dict[str, int], files: dict[str, str]) -> list[Example]:
    """Read one file into cleaned Examples; append every problem found to `problems`."""
    found = read_columns(path, {cfg.text_column: "--text-column", cfg.label_column: "--label-column"}, problems, dropped, files, cfg.encoding)
    if found is None:
        return []  # already reported
    unit, rows, values = found
    return _clean(str(path), unit, rows, values[cfg.text_column], values[cfg.label_column], cfg, problems, dropped)


def read_columns(
    path: Path, wanted: dict[str, str], problems: list[str], dropped: dict[str, int], files: dict[str, str], encoding: str = "utf-8"
) -> tuple[str, list[int], dict[str, list[object]]] | None:
    """Read one CSV/TSV/JSONL/JSON/Parquet file and pick the `wanted` columns ({column name: its flag, e.g. '--text-column'}).

    Returns (unit, row numbers, {column: raw values}) with unit 'line' (1-based, as an editor shows it) or 'row' (Parquet,
    0-based); a JSON object without the key holds MISSING. Every problem (file, line, column, fix) is appended to `problems`
    and None is returned when the file cannot be used; blank lines are counted in `dropped`, the file's sha256 in `files`.
    """
    source = str(path)
    known = len(problems)
    table = read_table(path, list(wanted), problems, dropped, files, encoding)
    if table is None:
        return None
    resolved: list[str] = []
    if table.columns is not None:  # None: JSON without objects, nothing to check the columns against
        resolved = _find_columns(source, table.columns, wanted, problems, flat_flag_hint=table.delimiter)
        if resolved is None:
            return None
    if not table.rows:
        if len(problems) == known:
            problems.append(f"{source}: no data rows (only a header, or nothing usable); add labeled rows.")
        return None
    return table.unit, table.rows, {want: table.column(got) for want, got in zip(wanted, resolved)}



@dataclass
class RawTable:
    """One file's rows before any column is interpreted."""

    unit: str  # 'line' (CSV/JSON, 1-based) or 'row' (Parquet, 0-based)
    columns: list[str] | None  # header / keys in first-seen order; None when there is nothing to learn them from
    rows: list[int]
    column: Callable[[str], list[object]]  # column name -> one raw value per row
    delimiter: str | None = None  # CSV/TSV only


def read_table(path: Path, wanted: list[str], problems: list[str], dropped: dict[str, int], files: dict[str, str], encoding: str = "utf-8") -> RawTable | None:
    """Read one file into a RawTable (format from the extension, optional compression, text in `encoding`); `wanted` helps
    sniff CSV delimiters and phrase the fixes. Problems are appended to `problems`; None when nothing can be read."""
    source = str(path)
    suffixes = [s.lower() for s in Path(path).suffixes]
    compression = suffixes.pop() if suffixes and suffixes[-1] in COMPRESSIONS else None
    kind = FORMATS.get(suffixes[-1]) if suffixes else None
    if kind is None or (compression and kind == "parquet"):
        supported = ", ".join(FORMATS) + " (CSV/TSV/JSON Lines may also end in " + ", ".join(COMPRESSIONS) + ")"
        problems.append(f"{source}: unsupported file type {''.join(Path(path).suffixes) or '(no extension)'!r}; supported: {supported}.")
        return None
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        problems.append(f"{source}: cannot read the file ({exc.strerror}).")
        return None
    files[source] = hashlib.sha256(raw).hexdigest()
    if kind == "parquet":
        return _read_parquet(source, raw, problems)
    content = _decompress(source, raw, compression, problems)
    text = None if content is None else _decode(source, content, problems, encoding)
    if text is None:
        return None
    if not text.strip():
        needs = " and ".join(f"a '{c}'" for c in wanted) + " column" if wanted else "a header"
        problems.append(f"{source}: the file is empty; it needs {needs} and at least one row.")
        return None
    if kind in ("csv", "tsv"):
        return _read_csv(source, text, "\t" if kind == "tsv" else None, wanted, problems, dropped)
    if kind == "json" and text.lstrip().startswith("["):
        return _read_json_array(source, text, wanted, problems)
    return _read_jsonl(source, text, wanted, problems, dropped, is_json=kind == "json")


def _decompress(source: str, raw: bytes, compression: str | None, problems: list[str]) -> bytes | None:
    if compression is None:
        return raw
    import bz2
    import gzip
    import lzma
    import zlib

    opener = {".gz": gzip.decompress, ".bz2": bz2.decompress, ".xz": lzma.decompress}[compression]
    try:
        return opener(raw)
    except (OSError, EOFError, ValueError, lzma.LZMAError, zlib.error) as exc:
        problems.append(f"{source}: cannot decompress as {compression} ({exc}); check the file is complete, or pass it uncompressed.")
        return None


def _decode(source: str, content: bytes, problems: list[str], encoding: str = "utf-8") -> str | None:
    """Text in `encoding` (UTF-8: a BOM is allowed and removed); bytes that do not decode stop with the lines to fix.
    NUL bytes are errors."""
    utf16 = encoding.startswith(("utf-16", "utf-32"))
    if content.startswith((b"\xff\xfe", b"\xfe\xff")) and not utf16:
        problems.append(f"{source}: the file is UTF-16 (it starts with a UTF-16 byte order mark); pass --encoding utf-16, or re-save it as UTF-8 (e.g. 'CSV UTF-8' in Excel).")
        return None
    name = "UTF-8" if encoding == "utf-8" else encoding
    try:
        text = content.decode("utf-8-sig" if encoding == "utf-8" else encoding).removeprefix("\ufeff")  # utf-16-le/-be keep their BOM
    except UnicodeDecodeError as whole:
        if utf16:  # lines cannot be split on b"\n" in UTF-16/32: name the byte offset
            problems.append(f"{source}: byte offset {whole.start} is not valid {name} ({whole.reason}); check --encoding or re-save the file as UTF-8.")
            return None
        fix = (" (the file may be Latin-1/Windows-1252 or another encoding); pass its encoding, e.g. --encoding cp1252, or re-save the file as UTF-8."
               if encoding == "utf-8" else "; pass the file's real encoding with --encoding (utf-8 is the default), or re-save the file as UTF-8.")
        found = 0
        offset = 0
        for number, line in enumerate(content.split(b"\n"), start=1):
            try:
                line.decode(encoding)
            except UnicodeDecodeError as exc:
                found += 1
                if found < MAX_LISTED:  # the last listed place is the count of the rest, so _raise_if cuts nothing
                    bad = line[exc.start]
                    problems.append(f"{source} line {number}: byte 0x{bad:02x} at byte offset {offset + exc.start} is not valid {name}{fix}")
            offset += len(line) + 1
        if found >= MAX_LISTED:
            problems.append(f"{source}: ... and {found - MAX_LISTED + 1} more line(s) that are not valid {name} ({found} in all).")
        return None
    if "\x00" in text:
        nul_lines = [n for n, line in enumerate(text.split("\n"), start=1) if "\x00" in line]
        hint = " (the file may be UTF-16 without a byte order mark)" if text.count("\x00") > len(text) // 4 else ""
        shown = ", ".join(map(str, nul_lines[:MAX_LISTED])) + (f" and {len(nul_lines) - MAX_LISTED} more" if len(nul_lines) > MAX_LISTED else "")
        problems.append(f"{source} line{'s' if len(nul_lines) > 1 else ''} {shown}: NUL byte(s) (\\x00) in the text{hint}; remove them or re-save the file as UTF-8 text.")
        return None
    return text


def _read_csv(source: str, text: str, delimiter: str | None, wanted: list[str], problems: list[str], dropped: dict[str, int]) -> RawTable | None:
    old_limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)  # huge text fields are legitimate
    try:
        delimiter = delimiter or _sniff_delimiter(text, wanted)
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
        header: list[str] | None = None
        rows: list[int] = []
        records: list[list[str]] = []
        blank = 0
        while True:
            start = reader.line_num + 1
            try:
                record = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                problems.append(
                    f"{source} line {start}: cannot parse the CSV ({exc}); a field holding {delimiter!r}, a quote or a line break "
                    f"must be wrapped in double quotes, with quotes inside it doubled (\"\")."
                )
                continue
            if header is None:
                if record:
                    header = record
                else:
                    blank += 1
                continue
            if not record or (len(header) > 1 and len(record) == 1 and not record[0].strip()):
                blank += 1
                continue
            if len(record) != len(header):
                spans = reader.line_num - start
                hint = f" (this record runs over {spans + 1} lines: an unclosed double quote may have swallowed the lines after it)" if spans else ""
                problems.append(
                    f"{source} line {start}: expected {len(header)} fields ({', '.join(map(repr, header))}), got {len(record)}{hint}; "
                    f"wrap fields that contain {delimiter!r} in double quotes, or fix the row."
                )
                continue
            rows.append(start)
            records.append(record)
    finally:
        csv.field_size_limit(old_limit)
    if header is None:
        return None  # already reported (a parse error on the header line)
    if blank:
        dropped["blank_lines"] = dropped.get("blank_lines", 0) + blank
    found = header
    return RawTable("line", header, rows, lambda name: [r[found.index(name)] for r in records], delimiter)


def _sniff_delimiter(text: str, wanted: list[str]) -> str:
    """',' unless another common delimiter is the one that yields the wanted columns (or more columns)."""
    first = text[:65536].lstrip("\r\n").split("\n", 1)[0].rstrip("\r")
    best, best_fields = ",", 0
    for candidate in (",", ";", "\t", "|"):
        try:
            fields = [f.strip() for f in next(csv.reader([first], delimiter=candidate), [])]
        except csv.Error:
            continue
        if wanted and all(c in fields for c in wanted):
            return candidate
        if len(fields) > best_fields:
            best, best_fields = candidate, len(fields)
    return best


def _read_jsonl(source: str, text: str, wanted: list[str], problems: list[str], dropped: dict[str, int], is_json: bool) -> RawTable | None:
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last line; it does not start a new one
    hint = " A .json file must hold JSON Lines (one object per line) or one array of objects." if is_json else ""
    records: list[tuple[int, dict]] = []
    blank = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            blank += 1
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{source} line {number}: not valid JSON ({exc.msg} at column {exc.colno}); each line must be one object like {_example_object(wanted)}.{hint}")
            continue
        if not isinstance(obj, dict):
            problems.append(f"{source} line {number}: expected a JSON object like {_example_object(wanted)}, got {_json_type(obj)}.{hint}")
            continue
        records.append((number, obj))
    if blank:
        dropped["blank_lines"] = dropped.get("blank_lines", 0) + blank
    return _table_from_objects(records)


def _read_json_array(source: str, text: str, wanted: list[str], problems: list[str]) -> RawTable | None:
    """A top-level JSON array of objects; each element's line is where it starts."""
    decoder = json.JSONDecoder()
    records: list[tuple[int, dict]] = []
    pos = text.index("[") + 1
    line, counted_to = 1, 0
    try:
        while True:
            pos = _skip_space(text, pos)
            if pos < len(text) and text[pos] == "]":
                break
            obj, end = decoder.raw_decode(text, pos)
            line += text.count("\n", counted_to, pos)
            counted_to = pos
            if isinstance(obj, dict):
                records.append((line, obj))
            else:
                problems.append(f"{source} line {line}: expected a JSON object like {_example_object(wanted)} in the array, got {_json_type(obj)}.")
            pos = _skip_space(text, end)
            if pos < len(text) and text[pos] == ",":
                pos += 1
            elif pos < len(text) and text[pos] == "]":
                break
            else:
                raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
        if text[pos + 1 :].strip():
            raise json.JSONDecodeError("Extra data after the array", text, _skip_space(text, pos + 1))
    except json.JSONDecodeError as exc:
        problems.append(f"{source} line {exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno}); the file must be one array of objects, or JSON Lines.")
        return None
    return _table_from_objects(records)


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _json_type(value: object) -> str:
    return {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number", bool: "true/false", type(None): "null"}.get(type(value), type(value).__name__)


def _example_object(wanted: list[str]) -> str:
    return "{" + ", ".join(f'"{c}": "..."' for c in wanted) + "}"


def _table_from_objects(records: list[tuple[int, dict]]) -> RawTable:
    keys: dict[str, None] = {}
    for _, obj in records:
        keys.update(dict.fromkeys(obj))
    return RawTable("line", list(keys) if records else None, [number for number, _ in records], lambda name: [obj.get(name, _MISSING) for _, obj in records])


def _read_parquet(source: str, raw: bytes, problems: list[str]) -> RawTable | None:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(raw))
    except (pyarrow.ArrowException, OSError, ValueError) as exc:
        problems.append(f"{source}: cannot read as Parquet ({exc}); check the file is a complete Parquet file, or export it as CSV.")
        return None
    return RawTable("row", table.column_names, list(range(table.num_rows)), lambda name: table.column(name).to_pylist())


def _find_columns(source: str, found: list[str], columns: dict[str, str], problems: list[str], flat_flag_hint: str | None = None) -> list[str] | None:
    """Resolve the wanted column names ({name: flag}; exact, else ignoring surrounding spaces); report missing/duplicate ones."""
    resolved: list[str] = []
    for wanted, flag in columns.items():
        matches = [c for c in found if c == wanted] or [c for c in found if str(c).strip() == wanted]
        if len(matches) == 1:
            resolved.append(matches[0])
            continue
        if len(matches) > 1:
            problems.append(f"{source}: column '{wanted}' appears {len(matches)} times in the header; rename the duplicates so each column name is unique.")
            continue
        listed = ", ".join(repr(c) for c in found) or "none"
        lower = {str(c).strip().lower(): c for c in found}
        close = [lower[wanted.lower()]] if wanted.lower() in lower else difflib.get_close_matches(wanted, [str(c) for c in found], n=1, cutoff=0.6)
        guess = f" Did you mean {close[0]!r}? Pass {flag} {close[0]}." if close else f" Pass {flag} NAME with the column that holds the {flag[2:-7]}."
        delim = ""
        if flat_flag_hint is not None and len(found) == 1:
            delim = f" The header has a single column: is the file separated by something other than {flat_flag_hint!r}?"
        problems.append(f"{source}: no column '{wanted}' ({flag}); columns found: {listed}.{guess}{delim}")
    return resolved if len(resolved) == len(columns) else None


# ---------------------------------------------------------------- cleaning


def _clean(source: str, unit: str, rows: list[int], texts: list[object], labels: list[object], cfg: DataConfig, problems: list[str], dropped: dict[str, int]) -> list[Example]:
    """Turn raw values into Examples: texts as given (non-strings to str), labels normalised; empties reported or counted."""
    examples: list[Example] = []
    empty_text = empty_label = 0
    tcol, lcol = cfg.text_column, cfg.label_column
    for row, raw_text, raw_label in zip(rows, texts, labels):
        text, text_problem = _text_value(raw_text)
        label, label_problem = _label_value(raw_label)
        where = f"{source} {unit} {row}"
        for col, value, problem in ((tcol, raw_text, text_problem), (lcol, raw_label, label_problem)):
            if problem:
                problems.append(f"{where}, column '{col}': {problem} (got {_describe(value, col)}); fix the value.")
        if text_problem or label_problem:
            continue
        if text is None or label is None:
            if cfg.drop_unlabeled:
                if text is None:
                    empty_text += 1
                else:
                    empty_label += 1
                continue
            for col, value, missing in ((tcol, raw_text, text is None), (lcol, raw_label, label is None)):
                if missing:
                    what = "text" if col == tcol else "label"
                    problems.append(f"{where}, column '{col}': empty {what} (got {_describe(value, col)}); fill it in or pass --drop-unlabeled.")
            continue
        written = raw_label if isinstance(raw_label, str) else repr(raw_label)  # a JSON 1.0 next to 1 is a second form too
        changed = written if written != label else None
        examples.append(Example(text=text, label=label, source=source, row=row, raw_label=changed))
    for reason, count in (("empty_text", empty_text), ("empty_label", empty_label)):
        if count:
            dropped[reason] = dropped.get(reason, 0) + count
    if rows and empty_text + empty_label == len(rows):
        problems.append(f"{source}: no usable rows: all {len(rows)} rows have an empty text or label.")
    return examples


def _text_value(value: object) -> tuple[str | None, str]:
    """(text or None when empty, problem). Text is kept as given; only-whitespace counts as empty."""
    if value is _MISSING or value is None or (isinstance(value, float) and math.isnan(value)):
        return None, ""
    if isinstance(value, bool):
        value = "true" if value else "false"
    elif isinstance(value, (int, float)):
        value = str(value)
    elif isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None, "bytes that are not valid UTF-8 text"
    if not isinstance(value, str):
        return None, f"expected text, got {_json_type(value)}"
    return (value if value.strip() else None), ""


def _label_value(value: object) -> tuple[str | None, str]:
    """(label or None when empty, problem). Labels are strings: 1, '1', 1.0 and '1.0' are all '1'."""
    if value is _MISSING or value is None or (isinstance(value, float) and math.isnan(value)):
        return None, ""
    if isinstance(value, bool):
        return ("true" if value else "false"), ""
    if isinstance(value, int):
        return str(value), ""
    if isinstance(value, float):
        return (str(int(value)) if value.is_integer() else repr(value)), ""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None, "bytes that are not valid UTF-8 text"
    if not isinstance(value, str):
        return None, f"expected a string or an integer label, got {_json_type(value)}"
    label = value.strip()
    match = _INT_FLOAT.fullmatch(label)
    return (match.group(1) if match else label) or None, ""


def _describe(value: object, col: str) -> str:
    if value is _MISSING:
        return f"no '{col}' key"
    if value is None:
        return "null"
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


# ---------------------------------------------------------------- labels, sampling, splitting


def _sorted_labels(labels: set[str]) -> list[str]:
    if all(_INT.fullmatch(label) for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def _counts(examples: list[Example]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for ex in examples:
        counts[ex.label] = counts.get(ex.label, 0) + 1
    return counts


def _class_problems(examples: list[Example], source: str, cfg: DataConfig, minimum: int, sampled: bool) -> list[str]:
    counts = _counts(examples)
    after = " (after --max-examples sampling)" if sampled else ""
    if len(counts) < 2:
        found = f"only {next(iter(counts))!r}" if counts else "no labels"
        return [f"fine-tuning a classifier needs at least 2 classes; found {found} in {source}{after} (column '{cfg.label_column}'). Check --label-column, or add examples of other classes."]
    if minimum <= 1:
        return []
    needs = "one each for train, validation and test" if minimum >= 3 else "one each for train and validation"
    alternative = "provide explicit --train/--validation/--test files" if minimum >= 3 else "pass a --validation file"
    return [
        f"{source}: class {label!r} has only {count} example(s){after}; an automatic split needs at least {minimum} per class ({needs}). "
        f"Add examples, merge or drop the class, or {alternative}."
        for label, count in sorted(counts.items())
        if count < minimum
    ]


def _size_problems(n: int, examples: list[Example], fraction: float, split: str, flag: str, source: str) -> list[str]:
    """A stratified split needs at least one row per class on each side."""
    k = len(_counts(examples))
    n_held = math.ceil(fraction * n)
    if k < 2 or (n_held >= k and n - n_held >= k):
        return []
    return [f"{source}: {n} rows give a {split} split of {n_held} row(s) for {k} classes; a stratified split needs at least one row per class on each side. Add examples or raise {flag} (now {fraction:g})."]


def _split(examples: list[Example], fraction: float, seed: int, source: str) -> tuple[list[Example], list[Example]]:
    """Stratified, seeded split: (kept, held out)."""
    from sklearn.model_selection import train_test_split

    try:
        kept, held = train_test_split(examples, test_size=fraction, random_state=seed, stratify=[ex.label for ex in examples])
    except ValueError as exc:
        counts = ", ".join(f"{label!r}: {count}" for label, count in sorted(_counts(examples).items()))
        raise DataError(f"{source}: cannot split stratified ({exc}). Class counts: {counts}. Add examples to the small classes, merge them, or provide explicit split files.") from None
    kept, held = list(kept), list(held)
    # sklearn rounds per class, so a class of 2-4 rows can land wholly on one side; every class with 2+ rows gets one
    # row on each side (the held-out part grows by a row where that moves one over)
    rng = random.Random(seed)
    sides = [(kept, _counts(kept)), (held, _counts(held))]
    for label in sorted(_counts(examples)):
        for (source_side, source_counts), (target_side, target_counts) in (sides, sides[::-1]):
            if not target_counts.get(label) and source_counts.get(label, 0) >= 2:
                rows = [i for i, ex in enumerate(source_side) if ex.label == label]
                target_side.append(source_side.pop(rng.choice(rows)))
                source_counts[label] -= 1
                target_counts[label] = 1
    return kept, held


def _sample(examples: list[Example], limit: int | None, seed: int, dropped: dict[str, int]) -> list[Example]:
    """A stratified, seeded sample of at most `limit` examples (every class keeps at least one), in file order."""
    if limit is None or len(examples) <= limit:
        return examples
    groups: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(ex.label, []).append(i)
    labels = sorted(groups)
    exact = {label: limit * len(groups[label]) / len(examples) for label in labels}
    quota = {label: min(len(groups[label]), max(1, math.floor(exact[label]))) for label in labels}
    by_remainder = sorted(labels, key=lambda label: (-(exact[label] - math.floor(exact[label])), label))
    while sum(quota.values()) < limit:
        for label in by_remainder:
            if sum(quota.values()) < limit and quota[label] < len(groups[label]):
                quota[label] += 1
    while sum(quota.values()) > limit:  # more classes than the limit allows one each: trim the largest quotas
        largest = max(labels, key=lambda label: (quota[label], label))
        quota[largest] -= 1
    rng = random.Random(seed)
    chosen = sorted(i for label in labels for i in rng.sample(groups[label], quota[label]))
    dropped["max_examples_sample"] = dropped.get("max_examples_sample", 0) + len(examples) - len(chosen)
    return [examples[i] for i in chosen]


def _unseen_label_problems(train: list[Example], others: list[list[Example]], train_source: str) -> list[str]:
    """Explicit validation/test files may only use labels that train has (grouped per file and label)."""
    known = set(_counts(train))
    listed = ", ".join(repr(label) for label in _sorted_labels(known))
    unseen: dict[tuple[str, str], list[int]] = {}
    for examples in others:
        for ex in examples:
            if ex.label not in known:
                unseen.setdefault((ex.source, ex.label), []).append(ex.row)
    problems = []
    for (source, label), rows in unseen.items():
        where = ", ".join(map(str, rows[:5])) + (f" and {len(rows) - 5} more" if len(rows) > 5 else "")
        unit = "row" if source.lower().endswith((".parquet", ".pq")) else "line"
        problems.append(
            f"{source} {unit}{'s' if len(rows) > 1 else ''} {where}: label {label!r} never occurs in {train_source}, which has labels {listed}; "
            f"fix the label, add training examples of {label!r}, or remove these rows."
        )
    return problems


def _raise_if(problems: list[str]) -> None:
    if not problems:
        return
    shown = problems[:MAX_LISTED]
    if len(problems) > MAX_LISTED:
        shown.append(f"... and {len(problems) - MAX_LISTED} more problem(s).")
    raise DataError(f"{len(problems)} problem(s) in the data; fix them and run again:", shown)
