"""fmtune.data.labeled: reading, validation messages, splitting, hashing, and a fuzz corpus of malformed files."""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fmtune.config import DataConfig
from fmtune.data.labeled import Example, Splits, data_hash, load_splits
from fmtune.errors import DataError

FUZZ = Path(__file__).parent / "fuzz"


# ---------------------------------------------------------------- helpers


def rows(n: int = 30, labels: tuple[str, ...] = ("pos", "neg")) -> list[tuple[str, str]]:
    return [(f"review {i}, it was {labels[i % len(labels)]}", labels[i % len(labels)]) for i in range(n)]


def write_csv(path: Path, data: list[tuple[object, object]], header: tuple[str, str] = ("text", "label"), delimiter: str = ",", eol: str = "\n", quoting: int = csv.QUOTE_MINIMAL) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, delimiter=delimiter, lineterminator=eol, quoting=quoting)
        writer.writerow(header)
        writer.writerows(data)
    return path


def write_jsonl(path: Path, data: list[tuple[object, object]]) -> Path:
    path.write_text("".join(json.dumps({"text": t, "label": label}, ensure_ascii=False) + "\n" for t, label in data), encoding="utf-8")
    return path


def all_examples(splits: Splits) -> list[Example]:
    return splits.train + splits.validation + splits.test


def error_of(cfg: DataConfig, seed: int = 0) -> str:
    with pytest.raises(DataError) as info:
        load_splits(cfg, seed)
    return str(info.value)


# ---------------------------------------------------------------- happy paths


def test_csv_loads_and_splits_stratified(tmp_path):
    path = write_csv(tmp_path / "reviews.csv", rows(100))
    splits = load_splits(DataConfig(data=path), seed=0)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (70, 10, 20)
    assert Counter(ex.label for ex in splits.test) == {"pos": 10, "neg": 10}
    assert Counter(ex.label for ex in splits.validation) == {"pos": 5, "neg": 5}
    assert Counter(ex.label for ex in splits.train) == {"pos": 35, "neg": 35}
    assert splits.labels == ["neg", "pos"]
    assert splits.dropped == {}
    # every example points back at its line: header is line 1, row i is line i + 2
    by_text = {t: i for i, (t, _) in enumerate(rows(100))}
    for ex in all_examples(splits):
        assert ex.source == str(path)
        assert ex.row == by_text[ex.text] + 2
    assert splits.files == {str(path): hashlib.sha256(path.read_bytes()).hexdigest()}
    assert splits.sha256 == data_hash(splits) and len(splits.sha256) == 64


@pytest.mark.parametrize("seed", range(6))
def test_every_class_of_three_or_more_rows_reaches_train_validation_and_test(tmp_path, seed):
    """sklearn's stratified split can leave a class of 3-4 rows out of a held-out side; the split moves a row over."""
    data = [(f"text {label} {i}", label) for label, n in (("big", 120), ("mid", 40), ("three", 3), ("four", 4), ("five", 5)) for i in range(n)]
    splits = load_splits(DataConfig(data=write_csv(tmp_path / "small.csv", data)), seed=seed)
    for part in (splits.train, splits.validation, splits.test):
        assert set(ex.label for ex in part) == {"big", "mid", "three", "four", "five"}
    assert sorted(ex.text for ex in all_examples(splits)) == sorted(t for t, _ in data)  # nothing lost or doubled


def test_same_seed_same_splits_other_seed_differs(tmp_path):
    path = write_csv(tmp_path / "d.csv", rows(60))
    a, b, c = (load_splits(DataConfig(data=path), seed=s) for s in (7, 7, 8))
    assert (a.train, a.validation, a.test) == (b.train, b.validation, b.test)
    assert a.sha256 == b.sha256
    assert [ex.text for ex in a.test] != [ex.text for ex in c.test]


def test_tsv_jsonl_parquet_json_gzip_give_the_same_examples(tmp_path):
    import gzip

    import pandas as pd

    data = rows(40)
    paths = [
        write_csv(tmp_path / "d.tsv", data, delimiter="\t"),
        write_jsonl(tmp_path / "d.jsonl", data),
        tmp_path / "d.parquet",
        tmp_path / "d.json",
        tmp_path / "d.csv.gz",
    ]
    pd.DataFrame(data, columns=["text", "label"]).to_parquet(paths[2])
    paths[3].write_text(json.dumps([{"text": t, "label": label} for t, label in data], indent=2))
    paths[4].write_bytes(gzip.compress(write_csv(tmp_path / "plain.csv", data).read_bytes()))
    hashes = set()
    for path in paths:
        splits = load_splits(DataConfig(data=path), seed=3)
        assert sorted((ex.text, ex.label) for ex in all_examples(splits)) == sorted(data), path
        hashes.add(splits.sha256)
    assert len(hashes) == 1  # the hash depends on the content only, not on the format or file
    parquet = load_splits(DataConfig(data=paths[2]), seed=3)
    assert sorted(ex.row for ex in all_examples(parquet)) == list(range(40))  # Parquet rows are 0-based
    array = load_splits(DataConfig(data=paths[3]), seed=3)
    assert sorted(ex.row for ex in all_examples(array)) == [2 + 4 * i for i in range(40)]  # where each object starts


def test_integer_and_mixed_labels_normalise_and_sort_numerically(tmp_path):
    values = [1, "1", 1.0, "1.0", 10, "10", 10.0, " 10 ", 2, "2", 2.0, "2.0"] * 3
    path = write_jsonl(tmp_path / "mixed.jsonl", [(f"text {i}", v) for i, v in enumerate(values)])
    splits = load_splits(DataConfig(data=path), seed=0)
    assert splits.labels == ["1", "2", "10"]
    assert Counter(ex.label for ex in all_examples(splits)) == {"1": 12, "10": 12, "2": 12}


def test_string_labels_sort_lexicographically_and_numbers_in_text_become_str(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [(i * 1000, ["b", "a", "10"][i % 3]) for i in range(30)])
    splits = load_splits(DataConfig(data=path), seed=0)
    assert splits.labels == ["10", "a", "b"]
    assert sorted(int(ex.text) for ex in all_examples(splits)) == [i * 1000 for i in range(30)]


def test_bom_and_crlf(tmp_path):
    path = tmp_path / "excel.csv"
    body = write_csv(tmp_path / "x.csv", rows(30), eol="\r\n").read_bytes()
    path.write_bytes(b"\xef\xbb\xbf" + body)
    splits = load_splits(DataConfig(data=path), seed=0)
    texts = {ex.text for ex in all_examples(splits)}
    assert texts == {t for t, _ in rows(30)}  # no '\r' left on any text, BOM not in the 'text' column name
    assert {ex.label for ex in all_examples(splits)} == {"pos", "neg"}


def test_quoted_multiline_fields_keep_newlines_and_starting_line(tmp_path):
    data = [(f"first line {i}\nsecond, line\r\n  third  ", "pos" if i % 2 else "neg") for i in range(20)]
    path = write_csv(tmp_path / "multi.csv", data)
    splits = load_splits(DataConfig(data=path), seed=0)
    for ex in all_examples(splits):
        i = int(ex.text.split()[2])
        assert ex.text == data[i][0]  # internal and surrounding whitespace kept as given
        assert ex.row == 2 + 3 * i  # each record spans 3 physical lines; the row is the line it starts on


def test_texts_that_look_like_missing_values_stay_text(tmp_path):
    data = [(t, "pos" if i % 2 else "neg") for i, t in enumerate(["NA", "null", "None", "nan", "N/A", "  spaced  "] * 4)]
    splits = load_splits(DataConfig(data=write_csv(tmp_path / "na.csv", data)), seed=0)
    assert Counter(ex.text for ex in all_examples(splits)) == Counter(t for t, _ in data)


def test_semicolon_delimiter_is_sniffed(tmp_path):
    path = write_csv(tmp_path / "eu.csv", rows(30), delimiter=";")
    splits = load_splits(DataConfig(data=path), seed=0)
    assert sorted(ex.text for ex in all_examples(splits)) == sorted(t for t, _ in rows(30))


def test_drop_unlabeled_counts_what_it_drops(tmp_path):
    data = rows(30) + [("", "pos"), ("   ", "neg"), ("has text", "")]
    path = write_csv(tmp_path / "d.csv", data)
    splits = load_splits(DataConfig(data=path, drop_unlabeled=True), seed=0)
    assert splits.dropped == {"empty_text": 2, "empty_label": 1}
    assert len(all_examples(splits)) == 30


def test_explicit_files_split_validation_off_train(tmp_path):
    train = write_csv(tmp_path / "train.csv", rows(50))
    test = write_jsonl(tmp_path / "test.jsonl", rows(10))
    splits = load_splits(DataConfig(train=train, test=test), seed=0)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (45, 5, 10)
    assert {ex.source for ex in splits.train + splits.validation} == {str(train)}
    assert [ex.row for ex in splits.test] == list(range(1, 11))  # JSONL: line numbers, in file order
    assert set(splits.files) == {str(train), str(test)}


def test_explicit_validation_file_is_used_as_given(tmp_path):
    paths = [write_csv(tmp_path / f"{name}.csv", rows(n)) for name, n in (("train", 40), ("val", 6), ("test", 8))]
    splits = load_splits(DataConfig(train=paths[0], validation=paths[1], test=paths[2]), seed=0)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (40, 6, 8)
    assert [ex.row for ex in splits.validation] == list(range(2, 8))


def test_max_examples_samples_stratified_before_splitting_and_counts_the_rest(tmp_path):
    data = rows(90, labels=("a", "a", "b"))  # 60 a, 30 b
    path = write_csv(tmp_path / "d.csv", data)
    splits = load_splits(DataConfig(data=path, max_examples=30), seed=1)
    used = all_examples(splits)
    assert len(used) == 30
    assert Counter(ex.label for ex in used) == {"a": 20, "b": 10}
    assert splits.dropped == {"max_examples_sample": 60}
    assert load_splits(DataConfig(data=path, max_examples=30), seed=1).sha256 == splits.sha256


def test_max_examples_with_explicit_files_samples_train_only(tmp_path):
    train = write_csv(tmp_path / "train.csv", rows(80))
    test = write_csv(tmp_path / "test.csv", rows(30))
    splits = load_splits(DataConfig(train=train, test=test, max_examples=20), seed=0)
    assert len(splits.train) + len(splits.validation) == 20
    assert len(splits.test) == 30
    assert splits.dropped == {"max_examples_sample": 60}


def test_data_hash_depends_only_on_split_label_and_text():
    a = Example("hello", "pos", "a.csv", 2)
    b = Example("world", "neg", "a.csv", 3)
    base = Splits(train=[a], validation=[], test=[b], labels=["neg", "pos"])
    moved = Splits(train=[Example("hello", "pos", "elsewhere.jsonl", 99)], validation=[], test=[b], labels=[], dropped={"x": 1})
    assert data_hash(base) == data_hash(moved)
    assert data_hash(base) != data_hash(Splits(train=[], validation=[a], test=[b], labels=[]))  # split membership counts
    assert data_hash(base) != data_hash(Splits(train=[Example("hello ", "pos", "a.csv", 2)], validation=[], test=[b], labels=[]))
    # separators cannot be confused: moving text across the label boundary changes the hash
    assert data_hash(Splits([Example("a,b", "c", "", 0)], [], [], [])) != data_hash(Splits([Example("a", "b,c", "", 0)], [], [], []))
    line = json.dumps(["train", "pos", "hello"], ensure_ascii=False) + "\n" + json.dumps(["test", "neg", "world"], ensure_ascii=False) + "\n"
    assert data_hash(base) == hashlib.sha256(line.encode()).hexdigest()


def test_100k_rows_load_in_a_few_seconds(tmp_path):
    import time

    path = write_csv(tmp_path / "big.csv", [(f"text number {i}, with some words", str(i % 5)) for i in range(100_000)])
    start = time.perf_counter()
    splits = load_splits(DataConfig(data=path), seed=0)
    assert time.perf_counter() - start < 5
    assert len(all_examples(splits)) == 100_000


def test_huge_field_loads(tmp_path):
    huge = "x, \"quoted\"\n" * 400_000  # about 5 MB in one field
    data = rows(20) + [(huge, "pos")]
    for path in (write_csv(tmp_path / "huge.csv", data), write_jsonl(tmp_path / "huge.jsonl", data)):
        splits = load_splits(DataConfig(data=path), seed=0)
        assert [ex.text for ex in all_examples(splits) if len(ex.text) > 1000] == [huge]


# ---------------------------------------------------------------- bad input: every message names file, line, column, fix


def test_missing_columns_list_what_was_found_and_suggest(tmp_path):
    path = write_csv(tmp_path / "d.csv", rows(20), header=("Text", "sentiment"))
    message = error_of(DataConfig(data=path))
    assert f"{path}: no column 'text' (--text-column); columns found: 'Text', 'sentiment'. Did you mean 'Text'? Pass --text-column Text." in message
    assert f"{path}: no column 'label' (--label-column); columns found: 'Text', 'sentiment'." in message
    assert "Pass --label-column NAME" in message
    assert message.startswith("2 problem(s)")


def test_missing_column_close_match_in_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": t, "labels": label}) + "\n" for t, label in rows(20)))
    assert "Did you mean 'labels'? Pass --label-column labels." in error_of(DataConfig(data=path))


def test_single_column_header_hints_at_the_delimiter(tmp_path):
    path = tmp_path / "pipes.csv"
    path.write_text("text^label\nhello^pos\n")
    assert "is the file separated by something other than ','?" in error_of(DataConfig(data=path))


def test_empty_text_and_label_name_line_column_and_fix(tmp_path):
    data = rows(20)
    data[3] = ("", "pos")  # line 5
    data[6] = ("   \t", "neg")  # line 8
    data[10] = ("fine text", " ")  # line 12
    path = write_csv(tmp_path / "d.csv", data)
    message = error_of(DataConfig(data=path))
    assert f"{path} line 5, column 'text': empty text (got ''); fill it in or pass --drop-unlabeled." in message
    assert f"{path} line 8, column 'text': empty text (got '   \\t'); fill it in or pass --drop-unlabeled." in message
    assert f"{path} line 12, column 'label': empty label (got ' '); fill it in or pass --drop-unlabeled." in message
    assert message.startswith("3 problem(s)")


def test_empty_values_in_jsonl_null_nan_and_missing_key(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": t, "label": label}) for t, label in rows(20)]
    lines[1] = '{"text": null, "label": "pos"}'
    lines[2] = '{"text": "ok", "label": NaN}'
    lines[3] = '{"text": "ok"}'
    path.write_text("\n".join(lines) + "\n")
    message = error_of(DataConfig(data=path))
    assert f"{path} line 2, column 'text': empty text (got null)" in message
    assert f"{path} line 3, column 'label': empty label (got NaN)" in message
    assert f"{path} line 4, column 'label': empty label (got no 'label' key); fill it in or pass --drop-unlabeled." in message


def test_empty_values_in_parquet_name_the_zero_based_row(tmp_path):
    import pandas as pd

    path = tmp_path / "d.parquet"
    frame = pd.DataFrame(rows(20), columns=["text", "label"])
    frame.loc[4, "label"] = None
    frame.to_parquet(path)
    assert f"{path} row 4, column 'label': empty label (got null); fill it in or pass --drop-unlabeled." in error_of(DataConfig(data=path))


def test_many_problems_are_listed_up_to_20_then_counted(tmp_path):
    path = write_csv(tmp_path / "d.csv", [("", "pos")] * 25 + rows(10))
    message = error_of(DataConfig(data=path))
    assert message.startswith("25 problem(s)")
    assert f"{path} line 21, column 'text'" in message and f"{path} line 22," not in message
    assert "... and 5 more problem(s)." in message


def test_invalid_json_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": x}\n[1, 2]\n')
    message = error_of(DataConfig(data=path))
    assert f"{path} line 2: not valid JSON (Expecting value at column 24)" in message
    assert f"{path} line 3: expected a JSON object like {{\"text\": \"...\", \"label\": \"...\"}}, got an array." in message


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
def test_undecodable_bytes_name_line_and_offset(tmp_path, bom):
    path = tmp_path / "latin.csv"
    content = bom + "text,label\ngood,pos\ncaf\u00e9,neg\n".encode("latin-1")
    path.write_bytes(content)
    message = error_of(DataConfig(data=path))
    offset = content.index(b"\xe9")
    assert f"{path} line 3: byte 0xe9 at byte offset {offset} is not valid UTF-8" in message
    assert "re-save the file as UTF-8" in message


def test_many_undecodable_lines_are_counted_once(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes(("text,label\n" + "".join(f"caf\u00e9 {i},neg\n" for i in range(113))).encode("latin-1"))
    message = error_of(DataConfig(data=path))
    assert message.count("is not valid UTF-8 (the file") == 19
    assert "... and 94 more line(s) that are not valid UTF-8 (113 in all)." in message
    assert "more problem(s)" not in message


def test_utf16_is_named(tmp_path):
    path = tmp_path / "u16.csv"
    path.write_bytes("text,label\nhello,pos\n".encode("utf-16"))
    assert "UTF-16" in error_of(DataConfig(data=path)) and "--encoding utf-16" in error_of(DataConfig(data=path))


@pytest.mark.parametrize("encoding", ["cp1252", "latin-1", "utf-16", "utf-16-le", "shift_jis"])
def test_encoding_option_reads_non_utf8_files(tmp_path, encoding):
    text = "\u30ab\u30d5\u30a7 \u6771\u4eac" if encoding == "shift_jis" else "caf\u00e9 cr\u00e8me"
    path = tmp_path / "enc.csv"
    bom = "\ufeff" if encoding == "utf-16-le" else ""  # Windows' "Unicode" text: a BOM that the -le codec keeps
    path.write_bytes((bom + "text,label\n" + "".join(f"{text} {i},{'pos' if i % 2 else 'neg'}\n" for i in range(30))).encode(encoding))
    with pytest.raises(DataError):
        load_splits(DataConfig(data=path), 0)  # the default, utf-8, refuses it
    splits = load_splits(DataConfig(data=path, encoding=encoding), 0)
    assert sorted(ex.text for ex in splits.train + splits.validation + splits.test) == sorted(f"{text} {i}" for i in range(30))


def test_wrong_encoding_names_line_and_flag(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes("text,label\ngood,pos\nbad \x81 byte,neg\n".encode("latin-1"))
    message = error_of(DataConfig(data=path, encoding="cp1252"))
    assert f"{path} line 3: byte 0x81 at byte offset" in message and "not valid cp1252" in message and "--encoding" in message


def test_unknown_encoding_is_a_config_error():
    for name in ("klingon", "rot13", "base64"):
        with pytest.raises(ValueError, match=f"unknown text encoding '{name}'"):
            DataConfig(encoding=name)


def test_ragged_row_names_line_and_field_counts(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\ngood,pos\nhello, world,neg\nonly\n")
    message = error_of(DataConfig(data=path))
    assert f"{path} line 3: expected 2 fields ('text', 'label'), got 3;" in message
    assert f"{path} line 4: expected 2 fields ('text', 'label'), got 1;" in message
    assert "double quotes" in message


def test_unclosed_quote_names_the_line_it_starts_on(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,label\ngood,pos\n"oops,neg\nmore,pos\n')
    assert f"{path} line 3: cannot parse the CSV (unexpected end of data)" in error_of(DataConfig(data=path))


def test_nul_bytes_name_the_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"text,label\ngood,pos\nba\x00d,neg\n")
    message = error_of(DataConfig(data=path))
    assert f"{path} line 3: NUL byte(s)" in message and "UTF-8" in message


def test_label_unseen_in_train(tmp_path):
    train = write_csv(tmp_path / "train.csv", rows(20))
    test = write_csv(tmp_path / "test.csv", rows(4) + [("x", "meh"), ("y", "pos"), ("z", "meh")])
    message = error_of(DataConfig(train=train, test=test))
    assert f"{test} lines 6, 8: label 'meh' never occurs in {train}, which has labels 'neg', 'pos';" in message
    assert "fix the label, add training examples of 'meh', or remove these rows." in message


def test_only_one_class(tmp_path):
    path = write_csv(tmp_path / "d.csv", [(f"t{i}", "spam") for i in range(20)])
    assert f"fine-tuning a classifier needs at least 2 classes; found only 'spam' in {path}" in error_of(DataConfig(data=path))


def test_class_too_small_to_split(tmp_path):
    path = write_csv(tmp_path / "d.csv", rows(30) + [("rare one", "rare"), ("rare two", "rare")])
    message = error_of(DataConfig(data=path))
    assert f"{path}: class 'rare' has only 2 example(s); an automatic split needs at least 3 per class" in message
    assert "Add examples, merge or drop the class, or provide explicit --train/--validation/--test files." in message


def test_too_few_rows_for_a_stratified_test_split(tmp_path):
    path = write_csv(tmp_path / "d.csv", rows(9, labels=("a", "b", "c")))  # test gets ceil(0.2 * 9) = 2 rows for 3 classes
    message = error_of(DataConfig(data=path))
    assert f"{path}: 9 rows give a test split of 2 row(s) for 3 classes" in message and "--test-fraction" in message


def test_empty_and_header_only_files(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    header = tmp_path / "header.csv"
    header.write_text("text,label\n")
    assert f"{empty}: the file is empty" in error_of(DataConfig(data=empty))
    assert f"{header}: no data rows" in error_of(DataConfig(data=header))


def test_unknown_extension_names_the_supported_ones(tmp_path):
    path = tmp_path / "d.xlsx"
    path.write_bytes(b"PK")
    message = error_of(DataConfig(data=path))
    assert f"{path}: unsupported file type '.xlsx'" in message
    for ext in (".csv", ".tsv", ".jsonl", ".json", ".parquet"):
        assert ext in message


def test_no_data_is_a_config_error():
    from fmtune.errors import ConfigError

    with pytest.raises(ConfigError, match="--train FILE --test FILE"):
        load_splits(DataConfig(), seed=0)


def test_problems_from_all_files_are_raised_once(tmp_path):
    train = write_csv(tmp_path / "train.csv", [("", "pos")] + rows(20))
    test = tmp_path / "test.jsonl"
    test.write_text("not json\n")
    message = error_of(DataConfig(train=train, test=test))
    assert message.startswith("2 problem(s)")
    assert f"{train} line 2, column 'text'" in message and f"{test} line 1: not valid JSON" in message


# ---------------------------------------------------------------- fuzz corpus and properties

EXPECTED = json.loads((FUZZ / "expected.json").read_text())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fuzz_corpus_loads_or_raises_data_error_and_drops_nothing_silently(name):
    path = FUZZ / "corpus" / name
    want = EXPECTED[name]
    try:
        splits = load_splits(DataConfig(data=path, drop_unlabeled=True), seed=0)
    except DataError as exc:
        assert "error" in want, f"{name} should load, got: {exc}"
        for words in want["error"]:
            assert words.lower() in str(exc).lower(), (words, str(exc))
        return
    assert "rows" in want, f"{name} should raise a DataError"
    assert len(all_examples(splits)) + sum(splits.dropped.values()) == want["rows"]
    assert splits.dropped.get("max_examples_sample", 0) == 0
    for reason, count in want.get("dropped", {}).items():
        assert splits.dropped[reason] == count
    if "labels" in want:
        assert splits.labels == want["labels"]


def test_fuzz_corpus_is_up_to_date(tmp_path, monkeypatch):
    """The committed expected.json matches what tests/fuzz/make_corpus.py writes."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_corpus", FUZZ / "make_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "HERE", tmp_path / "corpus")
    monkeypatch.setattr(module, "__file__", str(tmp_path / "make_corpus.py"))
    assert module.build() == EXPECTED
    for name in EXPECTED:
        if not name.endswith(".parquet"):  # Parquet embeds the writer's version
            assert (tmp_path / "corpus" / name).read_bytes() == (FUZZ / "corpus" / name).read_bytes(), name


TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=40).filter(lambda s: s.strip())
LABELS = ["pos", "neg", "é ü", 'say "hi", ok', "10", "2"]


@st.composite
def tables(draw) -> list[tuple[str, str]]:
    first, second = draw(st.lists(st.sampled_from(LABELS), min_size=2, max_size=2, unique=True))
    counts = (draw(st.integers(8, 20)), draw(st.integers(8, 20)))
    labels = draw(st.permutations([first] * counts[0] + [second] * counts[1]))
    texts = draw(st.lists(TEXT, min_size=len(labels), max_size=len(labels)))
    return list(zip(texts, labels))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(table=tables(), eol=st.sampled_from(["\n", "\r\n"]), seed=st.integers(0, 3))
def test_random_tables_round_trip_through_csv_and_jsonl(tmp_path, table, eol, seed):
    # Python's csv writer quotes a lone '\r' only when it is part of the line terminator, so '\n' files quote every field
    quoting = csv.QUOTE_ALL if eol == "\n" else csv.QUOTE_MINIMAL
    for path in (write_csv(tmp_path / "t.csv", table, eol=eol, quoting=quoting), write_jsonl(tmp_path / "t.jsonl", table)):
        splits = load_splits(DataConfig(data=path), seed=seed)
        assert sorted((ex.text, ex.label) for ex in all_examples(splits)) == sorted(table)
        assert splits.dropped == {}


def valid_bytes(suffix: str) -> bytes:
    """A small valid file of each kind, for the mutation fuzz below to break."""
    import gzip
    import io

    import pandas as pd

    data = rows(15)
    if suffix == ".parquet":
        buffer = io.BytesIO()
        pd.DataFrame(data, columns=["text", "label"]).to_parquet(buffer)
        return buffer.getvalue()
    if suffix == ".json":
        return json.dumps([{"text": t, "label": label} for t, label in data], indent=1).encode()
    if suffix == ".jsonl":
        return "".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in data).encode()
    sep = "\t" if suffix == ".tsv" else ","
    content = (f"text{sep}label\n" + "".join(f'"{t}"{sep}{label}\n' for t, label in data)).encode()
    return gzip.compress(content, mtime=0) if suffix.endswith(".gz") else content


SUFFIXES = [".csv", ".tsv", ".jsonl", ".json", ".parquet", ".csv.gz"]
VALID = {suffix: valid_bytes(suffix) for suffix in SUFFIXES}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    suffix=st.sampled_from(SUFFIXES),
    edits=st.lists(st.tuples(st.integers(0, 600), st.sampled_from([b'"', b",", b";", b"\n", b"\r", b"\x00", b"\xff", b"\t", b"{", b"[", b"\xef\xbb\xbf", b" ", b""])), max_size=6),
    garbage=st.booleans(),
    noise=st.binary(max_size=200),
)
def test_mutated_files_never_raise_anything_but_data_error(tmp_path, suffix, edits, garbage, noise):
    content = noise if garbage else VALID[suffix]
    for position, insert in edits:
        position = min(position, len(content))
        content = content[:position] + insert + content[position + (0 if insert else 1) :]
    path = tmp_path / f"f{suffix}"
    path.write_bytes(content)
    try:
        splits = load_splits(DataConfig(data=path, drop_unlabeled=True), seed=0)
    except DataError:
        return
    assert all(ex.text.strip() and ex.label for ex in all_examples(splits))
