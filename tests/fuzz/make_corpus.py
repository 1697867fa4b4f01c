"""Regenerate the committed fuzz corpus: malformed and awkward data files plus expected.json.

Run from the repository root: `python tests/fuzz/make_corpus.py`. Each file is loaded by tests/test_data.py with
DataConfig(data=FILE, drop_unlabeled=True); expected.json says either how many data rows the file has (every one must
come back as an example or as a dropped count) or which words the DataError must contain.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
from pathlib import Path

HERE = Path(__file__).parent / "corpus"


def rows(n: int = 12) -> list[tuple[str, str]]:
    return [(f"review number {i}, quite {'good' if i % 2 else 'bad'}", "pos" if i % 2 else "neg") for i in range(n)]


def csv_text(data: list[tuple[str, str]], sep: str = ",", eol: str = "\n") -> str:
    return eol.join([f"text{sep}label"] + [f'"{t}"{sep}{label}' for t, label in data]) + eol


def jsonl_text(data: list[tuple[object, object]]) -> str:
    return "".join(json.dumps({"text": t, "label": label}, ensure_ascii=False) + "\n" for t, label in data)


def build() -> dict[str, dict]:
    cases: dict[str, tuple[bytes, dict]] = {}
    base = rows()

    def ok(name: str, content: bytes, n: int, **extra) -> None:
        cases[name] = (content, {"rows": n, **extra})

    def bad(name: str, content: bytes, *words: str) -> None:
        cases[name] = (content, {"error": list(words)})

    # encodings
    latin = csv_text(base[:5] + [("café crème, très bon", "pos")] + base[5:])
    bad("latin1.csv", latin.encode("latin-1"), "line 7", "0xe9", "UTF-8")
    bad("cp1252_quotes.jsonl", jsonl_text(base[:3]).encode() + '{"text": "\u201csmart\u201d", "label": "pos"}\n'.encode("cp1252"), "line 4", "UTF-8")
    bad("utf16_bom.csv", csv_text(base).encode("utf-16"), "UTF-16")
    bad("utf16le_nobom.csv", csv_text(base).encode("utf-16-le"), "NUL", "UTF-16")
    ok("bom_crlf.csv", b"\xef\xbb\xbf" + csv_text(base, eol="\r\n").encode(), 12)
    ok("bom.jsonl", b"\xef\xbb\xbf" + jsonl_text(base).encode(), 12)
    ok("crlf.tsv", csv_text([(t.replace(",", ""), label) for t, label in base], sep="\t", eol="\r\n").encode(), 12)
    ok("unicode.jsonl", jsonl_text([(f"{t} \u2028 \U0001f600 \u00e9\u0301 \u202e", label) for t, label in base]).encode(), 12)

    # structure
    ragged = csv_text(base).splitlines()
    ragged[3] = "just one field"
    ragged[8] = "a,b,c,d"
    bad("ragged.csv", ("\n".join(ragged) + "\n").encode(), "line 4", "expected 2 fields", "got 1", "line 9", "got 4")
    bad("unclosed_quote.csv", (csv_text(base[:4]) + '"never closed,pos\n' + csv_text(base[4:]).split("\n", 1)[1]).encode(), "line 6", "cannot parse the CSV")
    bad("quote_after_field.csv", (csv_text(base[:2]) + '"quoted"tail,pos\n' + csv_text(base[2:]).split("\n", 1)[1]).encode(), "line 4", "double quotes")
    bad("nul_byte.csv", csv_text(base).replace("review number 5", "review\x00number 5").encode(), "line 7", "NUL")
    bad("empty.csv", b"", "empty")
    bad("whitespace_only.jsonl", b"  \n\n \r\n", "empty")
    bad("header_only.csv", b"text,label\n", "no data rows")
    bad("header_only_crlf.tsv", b"text\tlabel\r\n", "no data rows")
    bad("wrong_columns.csv", csv_text(base).replace("text,label", "Text,sentiment", 1).encode(), "did you mean 'Text'", "--text-column", "--label-column")
    ok("semicolon.csv", csv_text(base, sep=";").encode(), 12)
    ok("multiline_quoted.csv", ("text,label\n" + "".join(f'"line one {i}\nline two, {i}\r\nline three",{"pos" if i % 2 else "neg"}\n' for i in range(12))).encode(), 12)
    ok("blank_lines.csv", ("\n" + csv_text(base[:6]) + "\n\n" + csv_text(base[6:]).split("\n", 1)[1] + "\n").encode(), 16)  # 12 rows + 4 blank lines
    ok("blank_lines.jsonl", (jsonl_text(base[:6]) + "\n   \n" + jsonl_text(base[6:])).encode(), 14)
    ok("empty_fields.csv", (csv_text(base) + '"",pos\n"   ",neg\nsome text,\n"",""\n').encode(), 16, dropped={"empty_text": 3, "empty_label": 1})
    ok("na_texts.csv", csv_text([("NA" if i < 3 else "null" if i < 5 else t, label) for i, (t, label) in enumerate(base)]).encode(), 12)
    bad("bad_json.jsonl", (jsonl_text(base[:5]) + '{"text": "oops", "label": pos}\n' + jsonl_text(base[5:])).encode(), "line 6", "not valid JSON")
    bad("not_object.jsonl", (jsonl_text(base[:2]) + '["a list", "pos"]\n"a string"\n' + jsonl_text(base[2:])).encode(), "line 3", "got an array", "line 4", "got a string")
    bad("nested_text.jsonl", (jsonl_text(base) + '{"text": {"a": 1}, "label": "pos"}\n').encode(), "line 13", "expected text, got an object")
    bad("pretty_object.json", json.dumps({"data": [{"text": t, "label": label} for t, label in base]}, indent=2).encode(), "line 1", "array of objects")
    ok("array.json", json.dumps([{"text": t, "label": label} for t, label in base], indent=2).encode(), 12)
    bad("array_bad_element.json", ("[\n" + ",\n".join([json.dumps({"text": t, "label": label}) for t, label in base] + ["42"]) + "\n]").encode(), "line 14", "got a number")
    bad("truncated_array.json", json.dumps([{"text": t, "label": label} for t, label in base], indent=1)[:-40].encode(), "not valid JSON")

    # labels
    mixed = [(f"text {i}", value) for i, value in enumerate([1, "1", 1.0, "1.0", " 1 ", 1, 2, "2", 2.0, "2.0", 2, "2"])]
    ok("mixed_labels.jsonl", jsonl_text(mixed).encode(), 12, labels=["1", "2"])
    ok("int_labels.csv", csv_text([(t, "10" if label == "pos" else "2") for t, label in base]).encode(), 12, labels=["2", "10"])
    bad("one_class.csv", csv_text([(t, "pos") for t, _ in base]).encode(), "at least 2 classes", "'pos'")
    bad("tiny_class.csv", csv_text(base + [("lonely", "meh")]).encode(), "'meh'", "only 1 example", "explicit")

    # compressed and binary formats
    ok("gzipped.csv.gz", gzip.compress(csv_text(base).encode(), mtime=0), 12)
    ok("bzipped.jsonl.bz2", bz2.compress(jsonl_text(base).encode()), 12)
    bad("not_really.csv.gz", b"this is not gzip data\n", "cannot decompress")
    bad("garbage.parquet", b"PAR1 this is not a parquet file at all", "cannot read as Parquet")
    bad("unknown.xlsx", b"PK\x03\x04 pretend spreadsheet", "unsupported file type", ".csv", ".parquet")
    ok("table.parquet", parquet_bytes(base), 12)
    ok("int_labels_nulls.parquet", parquet_bytes([(t, i % 2) for i, (t, _) in enumerate(base)] + [(None, 1), ("x", None)]), 14, labels=["0", "1"], dropped={"empty_text": 1, "empty_label": 1})

    HERE.mkdir(exist_ok=True)
    expected = {}
    for name, (content, want) in sorted(cases.items()):
        (HERE / name).write_bytes(content)
        expected[name] = want
    (Path(__file__).parent / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    return expected


def parquet_bytes(data: list[tuple[object, object]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"text": [t for t, _ in data], "label": [label for _, label in data]})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


if __name__ == "__main__":
    print(f"{len(build())} files written to {HERE}")
