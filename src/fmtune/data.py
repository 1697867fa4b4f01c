"""Data in: read CSV/JSONL/Parquet, validate every row, split stratified and seeded.

Every problem names the file, the line (CSV/JSONL, 1-based, as an editor shows it) or row (Parquet, 0-based),
the column and the fix. Nothing is dropped silently: whatever is dropped is counted in `Splits.dropped`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fmtune.config import DataConfig


@dataclass(frozen=True)
class Example:
    text: str
    label: str
    source: str  # file path as given
    row: int  # CSV/JSONL: 1-based line number in the file; Parquet: 0-based row index


@dataclass
class Splits:
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    labels: list[str]  # sorted; integers sorted numerically, as strings
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> count
    files: dict[str, str] = field(default_factory=dict)  # input path -> sha256 of its bytes
    sha256: str = ""  # content hash of the data as used (after cleaning/redaction): see data_hash()


def load_splits(cfg: DataConfig, seed: int) -> Splits:
    raise NotImplementedError


def data_hash(splits: Splits) -> str:
    raise NotImplementedError
