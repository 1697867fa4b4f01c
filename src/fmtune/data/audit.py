"""Data audit: duplicates, leakage between splits, class balance, PII by kind, plain-words warnings.

`audit()` builds the `data.audit` block of report.json. The PII scanner favours precision on ordinary numbers while
covering the forms people write personal data in: every number-shaped kind is checked (Luhn for cards, mod-97 for
IBANs, octet ranges for IPs, invalid SSN ranges, digit counts for phones), so years, prices, dates, counts and ratings
in ordinary text are not flagged. Detected: emails; URLs with a password; IBANs (compact or in groups); cards of 13-19
digits, bare or grouped by spaces, dashes or dots; US SSNs with spaces, dashes or dots (bare nine digits only after
'SSN' / 'social security number'); IPv4 and IPv6 (also '::'-compressed and IPv4-mapped); phones: North American
(555-123-4567, 555.123.4567, 555 123 4567, (555) 123-4567, 5551234567, 1-800-..., +1 ...), international (+44 20 7946
0958, +44 (0)20 ..., 0044 20 ...), national numbers with a trunk 0 (020 7946 0958, 01 23 45 67 89, 01.23.45.67.89,
030/12345678, 02079460958), any 7-15 digit number right after a phone word (tel., phone, call (me at), mobile, fax,
...), each with an optional extension (x123, ext. 123, ext 123, extension 123). Not detected: names, street addresses,
dates of birth, national numbers other than the US SSN, phones of fewer than 10 digits without a +, a trunk 0 or a
phone word, lower-case IBANs, IPv4 with zero-padded octets. The report holds counts of personal data, never the
values: the excerpts shown next to file:line locations are masked.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import statistics
import unicodedata
from collections import Counter
from collections.abc import Iterator

from fmtune.data.labeled import Example, Splits

# Kinds in priority order: when two detectors claim overlapping text, the earlier kind wins.
PII_KINDS = ("url_credentials", "email", "iban", "credit_card", "us_ssn", "ip_address", "phone")
PII_MASKS = {
    "url_credentials": "[URL]",
    "email": "[EMAIL]",
    "iban": "[IBAN]",
    "credit_card": "[CARD]",
    "us_ssn": "[SSN]",
    "ip_address": "[IP]",
    "phone": "[PHONE]",
}
_PRIORITY = {kind: i for i, kind in enumerate(PII_KINDS)}
SPLIT_NAMES = ("train", "validation", "test")
_DROP_REASONS = {  # Splits.dropped keys (see fmtune.data.labeled) in plain words
    "empty_text": "with an empty text (--drop-unlabeled)",
    "empty_label": "with an empty label (--drop-unlabeled)",
    "blank_lines": "blank lines",
    "max_examples_sample": "left out of the --max-examples sample",
}
MAX_EXAMPLES = 5  # locations listed per finding in the report

# --- PII patterns -----------------------------------------------------------------------------------------------

_MAYBE_PII = re.compile(r"[\d@]")  # every kind needs a digit or an '@'
_NUMBERISH = re.compile(r"[\d(+][\d ().+-]{5,}\d")  # the shortest number-shaped kind is an IP like 1.2.3.4
_IBAN_HINT = re.compile(r"[A-Z]{2}\d\d")

_URL_CREDENTIALS = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s/?#@:]+:[^\s/?#@]+@[^\s]*[^\s.,;:!?)\]'\"]")
_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9](?:[A-Za-z0-9._%+-]*[A-Za-z0-9_%+-])?"
    r"@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,24}\b"
)
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b")
_CARD = re.compile(  # 4111111111111111, 4111 1111 1111 1111, 4111-1111-..., 4111.1111...., 3782 822463 10005 (one separator)
    r"(?<![\w.,+-])(?:\d{13,19}|\d{4}(?P<sep>[ .-])\d{4,6}(?:(?P=sep)\d{1,5}){1,3})(?![\w-]|[.,]\d)"
)
_SSN = re.compile(  # 123-45-6789, 123 45 6789, 123.45.6789 (one separator), outside the ranges never issued
    r"(?<![\w.-])(?!000|666|9\d\d)\d{3}(?P<sep>[ .-])(?!00)\d{2}(?P=sep)(?!0000)\d{4}(?![\w-]|[.,]\d)"
)
_SSN_KEYWORD = re.compile(  # a bare 123456789 only right after 'SSN' / 'social security number'
    r"(?i:\b(?:ssn|social\s+security(?:\s+(?:number|no))?)\b[\s.:#-]{0,4})"
    r"(?P<number>(?!000|666|9\d\d)\d{3}(?!00)\d{2}(?!0000)\d{4})(?![\w-]|[.,]\d)"
)
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4_TEXT = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
_IPV4 = re.compile(rf"(?<![\w.]){_IPV4_TEXT}(?![\w]|\.\d)")
_IPV6 = re.compile(rf"(?<![\w:])(?:[0-9A-Fa-f]{{0,4}}:){{2,7}}(?:{_IPV4_TEXT}|[0-9A-Fa-f]{{0,4}})(?![\w:]|\.\d)")
# A phone extension: 555-0199x123, ' x 123', ' ext. 123', ' ext 123', ', extension 123'.
_EXT = r"(?:,? ?(?i:x|ext\.?|extn\.?|extension) ?\d{1,6})?"
_PHONE_INTERNATIONAL = re.compile(  # +44 20 7946 0958, +1 (555) 123-4567, +14155552671, 0044 20 7946 0958
    r"(?<![\w+.])(?P<prefix>\+|00)[1-9]\d{0,2}(?:[ .-]?(?:\(\d{1,4}\)|\d{1,5})){2,7}" + _EXT + r"(?![\w-]|[.,]\d)"
)
_PHONE_NANP = re.compile(  # (555) 123-4567, (555)123-4567, 555-123-4567, 555.123.4567, 555 123 4567, 5551234567, 1-800-555-0199
    r"(?<![\w+.-])(?:1[ .-]?)?(?:\([2-9]\d{2}\)[ .-]?|[2-9]\d{2}[ .-]?)\d{3}[ .-]?\d{4}" + _EXT + r"(?![\w-]|[.,]\d)"
)
_PHONE_TRUNK = re.compile(  # national numbers with a trunk 0: 020 7946 0958, 01 23 45 67 89, 01.23.45.67.89, 030/12345678, 02079460958
    r"(?<![\w+.:/-])(?:(?:\(0[1-9]\d{0,4}\)|0[1-9]\d{0,4})(?P<sep>[ ./-])\d{2,10}(?:(?P=sep)\d{2,10}){0,3}|0[1-9]\d{8,10})"
    + _EXT + r"(?![\w:/-]|[.,]\d)"
)
_PHONE_KEYWORD = re.compile(  # any 7-15 digit number right after a phone word: 'tel. 912 345 678', 'call me at 555-0199'
    r"(?i:\b(?:phone|telephone|tel|call|mobile|mob|cell|fax|whatsapp|sms)\b\.?(?: (?:me|us))?(?: (?:at|on))?:? ?)"
    r"(?P<number>\+?(?:\(\d{1,5}\)[ .-]?)?\d{1,15}(?:[ .-]\d{1,15}){0,5})" + _EXT + r"(?![\w-]|[.,]\d)"
)
_PHONE_WORDS = ("phone", "tel", "call", "mob", "cell", "fax", "whatsapp", "sms")  # cheap test before _PHONE_KEYWORD
_EXTENSION = re.compile(r",? ?(?i:x|ext\.?|extn\.?|extension) ?\d{1,6}$")
_ISBN_BEFORE = re.compile(r"(?i:isbn)(?:-1[03])?:?\s*$")
_YEAR = re.compile(r"(?:19|20)\d\d")

# Lengths of IBANs by country (SWIFT registry); other country codes are not flagged.
_IBAN_LENGTHS = dict(
    (entry[:2], int(entry[2:]))
    for entry in (
        "AD24 AE23 AL28 AT20 AZ28 BA20 BE16 BG22 BH22 BI27 BR29 BY28 CH21 CR22 CY28 CZ24 DE22 DJ27 DK18 DO28 EE20 "
        "EG29 ES24 FI18 FK18 FO18 FR27 GB22 GE22 GI23 GL18 GR27 GT28 HR21 HU28 IE22 IL23 IQ23 IS26 IT27 JO30 KW30 "
        "KZ20 LB28 LC32 LI21 LT20 LU20 LV21 LY25 MC27 MD24 ME22 MK19 MN20 MR27 MT31 MU30 NI28 NL18 NO15 OM23 PK24 "
        "PL28 PS29 PT25 QA29 RO24 RS22 RU33 SA24 SC31 SD18 SE24 SI19 SK24 SM27 SO23 ST25 SV28 TL23 TN24 TR26 UA29 "
        "VA22 VG24 XK20"
    ).split()
)


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum used by payment card numbers."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_valid(iban: str) -> bool:
    """Country length and the ISO 13616 mod-97 check (spaces ignored)."""
    iban = iban.replace(" ", "")
    if _IBAN_LENGTHS.get(iban[:2]) != len(iban) or not iban[2:4].isdigit():
        return False
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def _digits(s: str) -> str:
    return "".join(ch for ch in s if ch.isdigit())


def _phone_digits(number: str) -> int:
    """Digits of a phone number without its extension."""
    return len(_digits(_EXTENSION.sub("", number)))


def _trim(m: re.Match, low: int, high: int) -> int | None:
    """The end of match `m` cut back at separators until the number has at most `high` digits (a phone followed by
    another number: '+44 20 7946 0958 1999'); None when fewer than `low` are left."""
    number = m.group()
    while (n := _phone_digits(number)) > high:
        cut = max(number.rfind(sep) for sep in " ./-")
        if cut <= 0:
            return None
        number = number[:cut].rstrip(" ,")
    return m.start() + len(number) if n >= low else None


def _years(number: str) -> int:
    return sum(1 for group in re.split(r"\D+", _EXTENSION.sub("", number)) if _YEAR.fullmatch(group))


def _candidates(text: str) -> Iterator[tuple[str, int, int]]:
    """Every validated match of every kind; may overlap (find_pii resolves that).

    Cheap tests skip the patterns that cannot match: every number-shaped kind needs a run of at least 7 digits
    and separators, an IBAN two capitals then two digits.
    """
    if "@" in text:
        if "://" in text:
            for m in _URL_CREDENTIALS.finditer(text):
                yield "url_credentials", m.start(), m.end()
        for m in _EMAIL.finditer(text):
            yield "email", m.start(), m.end()
    numberish = _NUMBERISH.search(text) is not None
    if numberish and "." in text:
        for m in _IPV4.finditer(text):
            yield "ip_address", m.start(), m.end()
    if "::" in text or text.count(":") >= 6:
        for m in _IPV6.finditer(text):
            groups = [g for g in m.group().split(":") if g]
            try:
                ipaddress.IPv6Address(m.group())
            except ValueError:
                continue
            if len(groups) >= 3 or "." in m.group():  # not '::1' or 'fe80::1'; '::ffff:1.2.3.4' holds an IPv4 address
                yield "ip_address", m.start(), m.end()
    if _IBAN_HINT.search(text):
        for m in _IBAN.finditer(text):
            # The pattern may run into a following upper-case word: drop trailing groups until the checksum holds.
            groups = m.group().split(" ")
            while groups and len("".join(groups)) >= 15:
                candidate = " ".join(groups)
                if iban_valid(candidate):
                    yield "iban", m.start(), m.start() + len(candidate)
                    break
                groups.pop()
    if not numberish:
        return

    def isbn(start: int) -> bool:  # 'ISBN 0306406152' is a book, not a phone or a card
        return _ISBN_BEFORE.search(text, max(0, start - 12), start) is not None

    for m in _CARD.finditer(text):
        digits = _digits(m.group())
        if 13 <= len(digits) <= 19 and len(set(digits)) > 1 and luhn_valid(digits) and not isbn(m.start()):
            yield "credit_card", m.start(), m.end()
    for m in _SSN.finditer(text):
        yield "us_ssn", m.start(), m.end()
    lowered = text.lower()
    if "ssn" in lowered or "social" in lowered:
        for m in _SSN_KEYWORD.finditer(text):
            yield "us_ssn", m.start("number"), m.end()
    if "+" in text or "00" in text:
        for m in _PHONE_INTERNATIONAL.finditer(text):
            if m.group("prefix") == "+":
                end = _trim(m, 8, 15)
            else:  # '00' + country code + number, and not '007 1995 2006 2012'
                end = _trim(m, 12, 17)
                end = end if end is not None and _years(text[m.start() : end]) < 2 else None
            if end is not None:
                yield "phone", m.start(), end
    for m in _PHONE_NANP.finditer(text):
        if not isbn(m.start()):
            yield "phone", m.start(), m.end()
    if "0" in text:
        for m in _PHONE_TRUNK.finditer(text):
            end = _trim(m, 10, 12)
            if end is not None and _years(text[m.start() : end]) < 2 and not isbn(m.start()):
                yield "phone", m.start(), end
    for m in _PHONE_KEYWORD.finditer(text) if any(word in lowered for word in _PHONE_WORDS) else ():
        end = _trim(m, 0, 15)
        if end is not None and 7 <= _phone_digits(text[m.start("number") : end]):
            yield "phone", m.start("number"), end


def find_pii(text: str) -> list[tuple[str, int, int]]:
    """Personal data in `text` as (kind, start, end) spans: non-overlapping, sorted by start.

    A candidate inside a longer one is part of it (the card-shaped digits of '+1 0000004599999', the email-shaped
    tail of a URL with credentials); partial overlaps go to the kind earlier in PII_KINDS.
    """
    if not _MAYBE_PII.search(text):
        return []
    candidates = set(_candidates(text))
    if len(candidates) <= 1:
        return sorted(candidates)
    outer = [c for c in candidates if not any(s <= c[1] and c[2] <= e and (s, e) != (c[1], c[2]) for _, s, e in candidates)]
    chosen: list[tuple[str, int, int]] = []
    for kind, start, end in sorted(outer, key=lambda c: (_PRIORITY[c[0]], c[1], -c[2])):
        if all(end <= s or start >= e for _, s, e in chosen):
            chosen.append((kind, start, end))
    return sorted(chosen, key=lambda c: c[1])


def redact_text(text: str) -> tuple[str, Counter]:
    """Mask every span find_pii reports ("[EMAIL]", "[PHONE]", "[CARD]", ...); counts by kind."""
    spans = find_pii(text)
    if not spans:
        return text, Counter()
    parts, last = [], 0
    for kind, start, end in spans:
        parts.append(text[last:start])
        parts.append(PII_MASKS[kind])
        last = end
    parts.append(text[last:])
    return "".join(parts), Counter(kind for kind, _, _ in spans)


def redact_splits(splits: Splits) -> tuple[Splits, dict[str, int]]:
    """The same splits (same order, sources and rows) with personal data masked; counts by kind."""
    from fmtune.data.labeled import data_hash

    counts: Counter = Counter()

    def redact(examples: list[Example]) -> list[Example]:
        out = []
        for ex in examples:
            text, found = redact_text(ex.text)
            counts.update(found)
            out.append(dataclasses.replace(ex, text=text) if found else ex)
        return out

    redacted = dataclasses.replace(
        splits,
        train=redact(splits.train),
        validation=redact(splits.validation),
        test=redact(splits.test),
        dropped=dict(splits.dropped),
        files=dict(splits.files),
    )
    redacted.sha256 = data_hash(redacted)
    return redacted, {kind: counts[kind] for kind in PII_KINDS}


# --- Duplicates and leakage ---------------------------------------------------------------------------------------


class _PunctuationTable(dict):
    """str.translate table deleting Unicode punctuation (categories P*); filled lazily, one entry per character."""

    def __missing__(self, codepoint: int) -> int | None:
        value = None if unicodedata.category(chr(codepoint)).startswith("P") else codepoint
        self[codepoint] = value
        return value


_PUNCTUATION = _PunctuationTable()


def normalise(text: str) -> str:
    """The text duplicates are compared on: NFKC, case-folded, punctuation removed, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().translate(_PUNCTUATION).split())


def _where(ex: Example) -> str:
    return f"{ex.source}:{ex.row}"


def _preview(text: str, limit: int = 80) -> str:
    """A short, PII-masked excerpt for the report."""
    masked = redact_text(text)[0]
    return masked if len(masked) <= limit else masked[: limit - 3] + "..."


def _percentile(sorted_values: list[int], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not sorted_values:
        return 0.0
    pos = (len(sorted_values) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo))


def _count_phrase(counts: dict[str, int]) -> str:
    return ", ".join(f"{kind}: {n}" for kind, n in counts.items() if n)


@dataclasses.dataclass
class _Repeats:
    """Findings of the one pass over all examples in file order: duplicates, conflicting labels, PII by kind."""

    duplicates: int
    duplicates_normalised: int
    duplicate_examples: list[dict]
    normalised_examples: list[dict]
    conflicts: int
    conflict_examples: list[dict]
    pii_found: Counter


def _in_file_order(splits: Splits, by_split: dict[str, list[Example]], norms_of: dict[str, list[str]]) -> list[tuple[Example, str]]:
    """(example, normalised text) over all splits in file order (files as given, then line): splits are shuffled, and
    the "first" of a duplicate is the earliest line."""
    source_rank = {source: i for i, source in enumerate(splits.files)}
    for name in SPLIT_NAMES:
        for ex in by_split[name]:
            source_rank.setdefault(ex.source, len(source_rank))
    return sorted(
        ((ex, norm) for name in SPLIT_NAMES for ex, norm in zip(by_split[name], norms_of[name])),
        key=lambda pair: (source_rank[pair[0].source], pair[0].row),
    )


def _repeats(in_file_order: list[tuple[Example, str]]) -> _Repeats:
    """One pass over all examples: exact and normalised duplicates, labels per text, PII."""
    seen_exact: dict[str, Example] = {}
    seen_norm: dict[str, Example] = {}
    labels_of: dict[str, dict[str, Example]] = {}  # normalised text -> label -> first example with it
    duplicates = duplicates_normalised = 0
    dup_examples: list[dict] = []
    dup_norm_examples: list[dict] = []
    pii_found: Counter = Counter()
    for ex, norm in in_file_order:
        if ex.text in seen_exact:
            duplicates += 1
            if len(dup_examples) < MAX_EXAMPLES:
                dup_examples.append({"at": _where(ex), "first": _where(seen_exact[ex.text]), "text": _preview(ex.text)})
        else:
            seen_exact[ex.text] = ex
        if norm in seen_norm:
            duplicates_normalised += 1
            if len(dup_norm_examples) < MAX_EXAMPLES:
                dup_norm_examples.append({"at": _where(ex), "first": _where(seen_norm[norm]), "text": _preview(ex.text)})
        else:
            seen_norm[norm] = ex
        labels_of.setdefault(norm, {}).setdefault(ex.label, ex)
        for kind, _, _ in find_pii(ex.text):
            pii_found[kind] += 1

    conflicts = [by_label for by_label in labels_of.values() if len(by_label) > 1]
    conflict_examples = [
        {
            "labels": sorted(by_label),
            "at": [_where(ex) for ex in by_label.values()],
            "text": _preview(by_label[next(iter(by_label))].text),
        }
        for by_label in conflicts[:MAX_EXAMPLES]
    ]
    return _Repeats(duplicates, duplicates_normalised, dup_examples, dup_norm_examples, len(conflicts), conflict_examples, pii_found)


# Report key -> (split whose texts are counted, split they also appear in).
_OVERLAPS = {
    "train_test_overlap": ("test", "train"),
    "train_validation_overlap": ("validation", "train"),
    "validation_test_overlap": ("test", "validation"),
}


def _overlaps(by_split: dict[str, list[Example]], norms_of: dict[str, list[str]]) -> dict[str, tuple[int, list[dict]]]:
    """For each pair in _OVERLAPS: how many texts of the one split have their normalised text in the other, and the
    first few of them."""
    norm_sets = {name: set(norms) for name, norms in norms_of.items()}
    found = {}
    for key, (name, other) in _OVERLAPS.items():
        count, examples = 0, []
        for ex, norm in zip(by_split[name], norms_of[name]):
            if norm in norm_sets[other]:
                count += 1
                if len(examples) < MAX_EXAMPLES:
                    examples.append({"at": _where(ex), "text": _preview(ex.text)})
        found[key] = (count, examples)
    return found


def _class_balance(labels: list[str], by_split: dict[str, list[Example]]) -> tuple[dict[str, dict[str, int]], float | None]:
    """Examples per class in each split and in all, over the declared labels so that a class missing from a split shows
    as 0; and the largest training class over the smallest (None when a class has no training example)."""
    labels = list(labels) or sorted({ex.label for examples in by_split.values() for ex in examples})
    class_counts: dict[str, dict[str, int]] = {}
    for name in SPLIT_NAMES:
        counter = Counter(ex.label for ex in by_split[name])
        class_counts[name] = {label: counter[label] for label in labels} | {
            label: n for label, n in counter.items() if label not in labels
        }
    all_labels = dict.fromkeys(label for name in SPLIT_NAMES for label in class_counts[name])
    class_counts["all"] = {label: sum(class_counts[name].get(label, 0) for name in SPLIT_NAMES) for label in all_labels}
    train_counts = class_counts["train"]
    smallest = min(train_counts.values(), default=0)
    imbalance_ratio = round(max(train_counts.values()) / smallest, 3) if smallest > 0 else None
    return class_counts, imbalance_ratio


def _labels_normalised(by_split: dict[str, list[Example]]) -> tuple[dict, dict[str, Counter]]:
    """The labels that normalising changed while loading (count and first few), and for each label used how often
    each written form gave it."""
    rewritten: list[Example] = []
    written: dict[str, Counter] = {}
    for name in SPLIT_NAMES:
        for ex in by_split[name]:
            if ex.raw_label is not None:
                rewritten.append(ex)
            written.setdefault(ex.label, Counter())[ex.raw_label if ex.raw_label is not None else ex.label] += 1
    labels_normalised = {"count": len(rewritten), "examples": [{"at": _where(ex), "as_written": ex.raw_label, "used": ex.label} for ex in rewritten[:MAX_EXAMPLES]]}
    return labels_normalised, written


def _pii_counts(pii_found: Counter, redacted: dict[str, int] | None) -> tuple[dict[str, int], dict[str, int], str]:
    """PII by kind as the data held it, whether the audit runs before or after redaction (masked text is not found
    again); the counts masked by --redact-pii; and the plain-words note."""
    redacted_counts = {kind: int(n) for kind, n in (redacted or {}).items()}
    pii = {kind: max(pii_found[kind], redacted_counts.get(kind, 0)) for kind in PII_KINDS}
    pii_total = sum(pii.values())
    n_redacted = sum(redacted_counts.values())
    if redacted is not None and n_redacted:
        pii_note = (
            f"{n_redacted} items of personal data found and masked before training (--redact-pii: "
            f"{_count_phrase(redacted_counts)}); counts only, never the values."
        )
    elif pii_total:
        pii_note = (
            f"Found {pii_total} items of personal data ({_count_phrase(pii)}) in the data as used for training; "
            "pass --redact-pii to mask them before training. Counts only, never the values."
        )
    else:
        pii_note = f"No personal data found (checked: {', '.join(PII_KINDS)})."
    return pii, redacted_counts, pii_note


def _length_block(token_lengths: dict[str, list[int]] | None, max_length: int | None, model_limit: int | None) -> dict | None:
    """Token length percentiles of the training texts and the texts per split longer than max_length; None unless
    both token_lengths and max_length are given."""
    if token_lengths is None or max_length is None:
        return None
    train_lengths = sorted(token_lengths.get("train", []))
    length = {
        "max_length": max_length,
        "p50": _percentile(train_lengths, 50),
        "p95": _percentile(train_lengths, 95),
        "p99": _percentile(train_lengths, 99),
        "max": train_lengths[-1] if train_lengths else 0,
        "truncated": {name: sum(1 for n in token_lengths.get(name, []) if n > max_length) for name in SPLIT_NAMES},
    }
    if model_limit is not None:
        length["model_limit"] = model_limit
    return length


def _few_examples_warnings(n_train: int, classes: bool) -> list[str]:
    if n_train >= 100:
        return []
    return [
        f"Only {n_train} labeled training examples: fine-tuning usually needs hundreds to thousands of labeled "
        "examples; expect a noisy result and compare with few_shot/head_only." if classes else
        f"Only {n_train} training pairs: fine-tuning usually needs hundreds to thousands of examples; expect a noisy "
        "result and compare with few_shot."
    ]


def _label_warnings(labels: list[str], class_counts: dict, written: dict[str, Counter], imbalance_ratio: float | None) -> list[str]:
    """Labels that differ only in case or spacing, labels merged while loading, small classes, imbalance."""
    warnings: list[str] = []
    variants: dict[str, list[str]] = {}
    for label in labels:  # 'Food' and 'food ' are two classes to the model
        variants.setdefault(normalise(str(label)), []).append(str(label))
    for group in [g for g in variants.values() if len(g) > 1][:5]:
        listed = ", ".join(f"'{label}' ({class_counts['all'].get(label, 0)})" for label in group)
        warnings.append(
            f"Labels {listed} differ only in case, spacing or punctuation and are trained as separate classes; "
            "if they mean the same class, make them the same label in the data and run again."
        )
    merged = {label: forms for label, forms in written.items() if len(forms) > 1}
    if merged:  # a file that writes every label as ' pos' or '1.0' merges nothing: no warning
        shown = "; ".join(f"{label!r} from " + ", ".join(f"{form!r} ({n})" for form, n in forms.most_common()) for label, forms in list(merged.items())[:5])
        warnings.append(
            f"Labels written in more than one form were merged into one class while loading (spaces around a label removed, numbers like "
            f"'1.0' read as '1'): {shown}{' ...' if len(merged) > 5 else ''}. If a form meant a different class, rename it in the data."
        )
    small = [(label, n) for label, n in class_counts["train"].items() if n < 10]
    if small:
        listed = ", ".join(f"'{label}' ({n})" for label, n in small[:10])
        more = f" and {len(small) - 10} more" if len(small) > 10 else ""
        warnings.append(
            f"Classes with fewer than 10 training examples: {listed}{more}: the model sees too few of them to learn "
            "them reliably and their test scores are noisy; collect more examples or merge classes."
        )
    if imbalance_ratio is not None and imbalance_ratio > 3:
        warnings.append(
            f"Classes are imbalanced: the largest training class is {imbalance_ratio:g}x the smallest; macro-F1 "
            "(every class counts equally) is the primary metric for this reason."
        )
    return warnings


def _leakage_warnings(overlaps: dict[str, tuple[int, list[dict]]], repeats: _Repeats, n_total: int, classes: bool) -> list[str]:
    """Texts shared between splits, duplicates over 1% of the rows, texts with more than one label."""
    warnings: list[str] = []
    test_overlap = overlaps["train_test_overlap"][0]
    validation_overlap = overlaps["train_validation_overlap"][0]
    validation_test_overlap = overlaps["validation_test_overlap"][0]
    if test_overlap:
        warnings.append(
            f"{test_overlap} test texts also appear in train: the test score is optimistic; deduplicate the data "
            "across splits (same text after ignoring case, spacing and punctuation) and run again."
        )
    if validation_overlap:
        warnings.append(
            f"{validation_overlap} validation texts also appear in train: early stopping and model selection see "
            "texts they were trained on; deduplicate the data across splits."
        )
    if validation_test_overlap:
        warnings.append(
            f"{validation_test_overlap} test texts also appear in validation: the epoch and settings chosen on validation "
            "were chosen on texts the test then scores, so the test score is optimistic; deduplicate the data across "
            "splits (same text after ignoring case, spacing and punctuation) and run again."
        )
    duplicates_normalised = repeats.duplicates_normalised
    if n_total and duplicates_normalised > 0.01 * n_total:
        warnings.append(
            f"{duplicates_normalised} of {n_total} rows ({100 * duplicates_normalised / n_total:.1f}%) repeat an "
            f"earlier text ({repeats.duplicates} exactly, the rest after ignoring case, spacing and punctuation): repeated "
            "texts weigh more in training; remove the duplicates."
        )
    if classes and repeats.conflicts:
        first = repeats.conflict_examples[0]
        warnings.append(
            f"{repeats.conflicts} texts appear with more than one label (e.g. {' and '.join(first['at'])}: "
            f"{', '.join(first['labels'])}): the labels contradict each other; fix or remove those rows."
        )
    return warnings


def _truncation_warnings(length: dict | None, n_train: int) -> list[str]:
    """Over 5% of the training texts longer than max_length: raise it, or, at the model's limit, change model."""
    if length is None or not n_train or length["truncated"]["train"] <= 0.05 * n_train:
        return []
    truncated_train, max_length, model_limit = length["truncated"]["train"], length["max_length"], length.get("model_limit")
    share = f"{truncated_train} of {n_train} training texts ({100 * truncated_train / n_train:.1f}%)"
    if model_limit is not None and max_length >= model_limit:
        return [
            f"{share} are longer than the model's limit of {model_limit} tokens and are cut off: the model never "
            "sees their ends, and a larger max_length cannot help, since this model reads no more. If the end of a "
            "text matters, use a base model with a longer context (--model) or split long documents into several rows."
        ]
    most = f" (up to the model's limit of {model_limit})" if model_limit is not None else ""
    return [
        f"{share} are longer than max_length={max_length} tokens and are cut off: the model never sees their "
        f"ends; raise --max-length{most} if the end of a text matters."
    ]


def _pii_and_dropped_warnings(pii: dict[str, int], redacted_counts: dict[str, int], dropped: dict[str, int]) -> list[str]:
    """Personal data found and not masked; rows dropped while loading, by reason."""
    warnings: list[str] = []
    pii_total = sum(pii.values())
    if pii_total and not sum(redacted_counts.values()):
        warnings.append(
            f"Found {pii_total} items of personal data ({_count_phrase(pii)}); they will be in the training data "
            "and can be memorised by the model: pass --redact-pii to mask them before training."
        )
    n_dropped = sum(dropped.values())
    if n_dropped:
        reasons = ", ".join(f"{n} {_DROP_REASONS.get(reason, reason.replace('_', ' '))}" for reason, n in dropped.items() if n)
        warnings.append(f"{n_dropped} rows were dropped while loading the data: {reasons}.")
    return warnings


def audit(
    splits: Splits,
    token_lengths: dict[str, list[int]] | None = None,
    max_length: int | None = None,
    redacted: dict[str, int] | None = None,
    model_limit: int | None = None,
    classes: bool = True,
) -> dict:
    """The data.audit block of report.json: JSON-serialisable; counts, file:line locations and masked excerpts.

    `classes` False audits prompt/completion pairs (generation): no class balance, label or conflict findings, and the
    warnings speak of training pairs.

    `model_limit` is the most tokens the model reads (its position embeddings / tokenizer limit); when max_length is
    already there, the truncation warning says so instead of suggesting a larger --max-length.
    """
    by_split = {"train": splits.train, "validation": splits.validation, "test": splits.test}
    n_examples = {name: len(examples) for name, examples in by_split.items()}
    norms_of = {name: [normalise(ex.text) for ex in by_split[name]] for name in SPLIT_NAMES}
    repeats = _repeats(_in_file_order(splits, by_split, norms_of))
    overlaps = _overlaps(by_split, norms_of)
    class_counts, imbalance_ratio = _class_balance(splits.labels, by_split)
    labels_normalised, written = _labels_normalised(by_split)
    pii, redacted_counts, pii_note = _pii_counts(repeats.pii_found, redacted)
    length = _length_block(token_lengths, max_length, model_limit)
    block = {
        "n_examples": n_examples,
        "duplicates": repeats.duplicates,
        "duplicates_normalised": repeats.duplicates_normalised,
        "conflicting_labels": repeats.conflicts,
        **{key: count for key, (count, _) in overlaps.items()},
        "examples": {
            "duplicates": repeats.duplicate_examples,
            "duplicates_normalised": repeats.normalised_examples,
            "conflicting_labels": repeats.conflict_examples,
            **{key: examples for key, (_, examples) in overlaps.items()},
        },
        "class_counts": class_counts,
        "imbalance_ratio": imbalance_ratio,
        "pii": pii,
        "pii_redacted": redacted_counts,
        "pii_note": pii_note,
        "length": length,
        "dropped": dict(splits.dropped),
        "labels_normalised": labels_normalised,
        "warnings": [
            *_few_examples_warnings(n_examples["train"], classes),
            *(_label_warnings(splits.labels, class_counts, written, imbalance_ratio) if classes else []),
            *_leakage_warnings(overlaps, repeats, sum(n_examples.values()), classes),
            *_truncation_warnings(length, n_examples["train"]),
            *_pii_and_dropped_warnings(pii, redacted_counts, splits.dropped),
        ],
    }
    if not classes:
        for key in ("class_counts", "imbalance_ratio", "conflicting_labels", "labels_normalised"):
            block.pop(key)
        block["examples"].pop("conflicting_labels")
    return block


# --- Vocabulary coverage --------------------------------------------------------------------------------------------

UNK_WARN_SHARE = 0.02  # more [UNK] tokens than this: the vocabulary misses part of the text
MOSTLY_UNK = 0.5  # a text with at least this share of [UNK] tokens is mostly invisible to the model
TOKENS_PER_WORD_WARN = 3.0  # English WordPiece/BPE gives ~1.3 tokens per word; character-level splitting gives 4-7


def vocabulary_coverage(texts: list[str], ids: list[list[int]], unk_id: int | None, special_ids: set[int]) -> tuple[dict, list[str]]:
    """How much of the texts the tokenizer's vocabulary can represent: the share of [UNK] tokens, the texts that are
    mostly [UNK], and tokens per space-separated word (high when the vocabulary splits a script into characters).
    Returns (the report block, warnings). A model that reads '[UNK] [UNK]' for every Thai sentence cannot learn from it,
    and no fine-tuning setting fixes that: the fix is a base model whose vocabulary covers the language."""
    content = [[t for t in row if t not in special_ids] for row in ids]
    n_tokens = sum(len(row) for row in content)
    n_unk = sum(row.count(unk_id) for row in content) if unk_id is not None else 0
    mostly = [i for i, row in enumerate(content) if row and unk_id is not None and row.count(unk_id) >= MOSTLY_UNK * len(row)]
    per_word = [len(row) / len(text.split()) for row, text in zip(content, texts) if len(text.split()) >= 3]  # texts written with spaces
    tokens_per_word = statistics.median(per_word) if per_word else None
    block = {
        "unk_share": round(n_unk / n_tokens, 4) if n_tokens else 0.0,
        "texts_mostly_unk": len(mostly),
        "examples_mostly_unk": [_preview(texts[i]) for i in mostly[:MAX_EXAMPLES]],
        "tokens_per_word": None if tokens_per_word is None else round(tokens_per_word, 2),
    }
    warnings: list[str] = []
    fix = "pass --model with a local Hugging Face folder of an encoder whose vocabulary covers the language (a multilingual one)"
    if n_tokens and (n_unk / n_tokens > UNK_WARN_SHARE or mostly):
        example = f" (e.g. {block['examples_mostly_unk'][0]!r})" if mostly else ""
        warnings.append(
            f"The base model's vocabulary does not cover these texts: {n_unk / n_tokens:.1%} of their tokens are [UNK] and "
            f"{len(mostly)} of {len(content)} texts are at least {MOSTLY_UNK:.0%} [UNK]{example}; "
            f"the model cannot tell apart what it cannot read, so every rung is capped by this; {fix}."
        )
    if tokens_per_word is not None and tokens_per_word > TOKENS_PER_WORD_WARN:
        warnings.append(
            f"The tokenizer splits these texts into {tokens_per_word:.1f} tokens per word (median; English is ~1.3): its vocabulary "
            f"barely covers the language, so words reach the model as characters and long texts are cut sooner; {fix}."
        )
    return block, warnings
