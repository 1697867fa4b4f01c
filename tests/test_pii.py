"""--redact-pii: generated personal data in many written forms is masked, and a real run writes none of it anywhere.

The property tests build PII values from their parts (random digits, valid checksums) in the forms people write them,
embed each in ordinary text, and check that `redact_text` replaces the whole value by one mask and leaves nothing of it.
The end-to-end test runs the real CLI with --redact-pii on data that carries PII and searches every file the run
wrote (run folder, registry, token cache) for the raw values and for their token ids.
"""

from __future__ import annotations

import ipaddress
import string
import sys
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fmtune.data.audit import find_pii, luhn_valid, redact_text

sys.path.insert(0, str(Path(__file__).parent))
from conftest import WORDS, make_reviews, write_csv  # noqa: E402

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- generators -------------------------------------------------------------------------------------------------


def _digits(draw, n: int, first: str = string.digits) -> str:
    """n >= 1 random digits, the first one from `first`."""
    return draw(st.sampled_from(first)) + "".join(draw(st.lists(st.sampled_from(string.digits), min_size=n - 1, max_size=n - 1)))


EXTENSIONS = ["", "x{e}", " x{e}", " x {e}", " ext. {e}", " ext {e}", " ext.{e}", " extension {e}", " Ext. {e}", " EXT {e}", ", ext. {e}"]


@st.composite
def extension(draw) -> str:
    return draw(st.sampled_from(EXTENSIONS)).format(e=_digits(draw, draw(st.integers(1, 5))))


US_FORMS = [
    "{a}-{b}-{c}", "{a}.{b}.{c}", "{a} {b} {c}", "({a}) {b}-{c}", "({a}){b}-{c}", "({a}) {b} {c}", "({a}) {b}.{c}",
    "{a}{b}{c}", "{a}-{b}{c}", "1-{a}-{b}-{c}", "1 {a} {b} {c}", "1.{a}.{b}.{c}", "1 ({a}) {b}-{c}", "1{a}{b}{c}",
    "+1 {a} {b} {c}", "+1-{a}-{b}-{c}", "+1 ({a}) {b}-{c}", "+1{a}{b}{c}", "+1.{a}.{b}.{c}", "+1 {a}-{b}-{c}", "001 {a} {b} {c}",
]


@st.composite
def us_phone(draw) -> tuple[str, str]:
    """North American numbers: area code 2-9xx, any exchange, every common separator, country code 1 / +1 / 001."""
    a, b, c = _digits(draw, 3, "23456789"), _digits(draw, 3), _digits(draw, 4)
    return "", draw(st.sampled_from(US_FORMS)).format(a=a, b=b, c=c) + draw(extension())


@st.composite
def national_phone(draw) -> tuple[str, str]:
    """UK, French, German and Indian numbers in their national (trunk 0) and international (+cc, 00cc) forms."""
    country = draw(st.sampled_from(["uk", "fr", "de", "in"]))
    if country == "uk":
        n = _digits(draw, 10, "123456789")  # after the trunk 0
        a, b, c = n[0:2], n[2:6], n[6:]
        forms = [f"0{a} {b} {c}", f"0{n[:4]} {n[4:]}", f"0{n[:3]} {n[3:6]} {n[6:]}", f"0{n}", f"(0{a}) {b} {c}",
                 f"+44 {a} {b} {c}", f"+44 (0){a} {b} {c}", f"+44{n}", f"0044 {a} {b} {c}", f"+44-{n[:4]}-{n[4:]}"]
    elif country == "fr":
        n = _digits(draw, 9, "123456789")
        pairs = [n[1:3], n[3:5], n[5:7], n[7:9]]
        forms = [f"0{n[0]} " + " ".join(pairs), f"0{n[0]}." + ".".join(pairs), f"0{n[0]}-" + "-".join(pairs), f"0{n}",
                 f"+33 {n[0]} " + " ".join(pairs), f"+33 (0){n[0]} " + " ".join(pairs), f"+33{n}", f"0033 {n[0]} " + " ".join(pairs)]
    elif country == "de":
        area_len = draw(st.integers(2, 4))
        n = _digits(draw, area_len, "123456789") + _digits(draw, draw(st.integers(7, 11 - area_len)))
        area, sub = n[:area_len], n[area_len:]
        forms = [f"0{area} {sub}", f"0{area}-{sub}", f"0{area}/{sub}", f"(0{area}) {sub}", f"+49 {area} {sub}", f"+49 (0){area} {sub}", f"+49{n}", f"0049 {area} {sub}"]
    else:
        n = _digits(draw, 10, "6789")
        forms = [f"+91 {n[:5]} {n[5:]}", f"+91-{n[:5]}-{n[5:]}", f"+91{n}", f"0{n[:5]} {n[5:]}", f"0{n}", f"0091 {n[:5]} {n[5:]}"]
    return "", draw(st.sampled_from(forms)) + draw(extension())


@st.composite
def e164_phone(draw) -> tuple[str, str]:
    """Any country: '+', a 1-3 digit country code, then 7-12 digits, bare or in groups of 2-4."""
    cc = _digits(draw, draw(st.integers(1, 3)), "123456789")
    rest = _digits(draw, draw(st.integers(max(7, 8 - len(cc)), 15 - len(cc))))
    sep = draw(st.sampled_from(["", " ", "-", "."]))
    groups, i = [], 0
    while i < len(rest):
        size = draw(st.integers(2, 4)) if sep else len(rest)
        groups.append(rest[i : i + size])
        i += size
    if len(groups) > 1 and len(groups[-1]) < 2:  # a lone last digit reads as a count, not part of the number
        last = groups.pop()
        groups[-1] += last
    return "", f"+{cc}{sep or draw(st.sampled_from(['', ' ']))}{sep.join(groups)}"


@st.composite
def keyword_phone(draw) -> tuple[str, str]:
    """Numbers without a trunk 0 or country code (local 7-digit, Spanish 9-digit) after a phone keyword."""
    word = draw(st.sampled_from(["tel. ", "Tel: ", "phone ", "Phone: ", "call me at ", "call ", "mobile: ", "cell ", "fax ", "whatsapp "]))
    a, b, s = _digits(draw, 3, "23456789"), _digits(draw, 4), _digits(draw, 9, "6789")
    return word, draw(st.sampled_from([f"{a}-{b}", f"{a}.{b}", f"{a} {b}", f"{s[:3]} {s[3:6]} {s[6:]}", s]))


def _luhn_complete(body: str) -> str:
    return next(body + d for d in string.digits if luhn_valid(body + d))


ISSUERS = {  # prefix choices, lengths, grouping
    "visa": (["4"], [13, 16, 19]),
    "mastercard": (["51", "52", "53", "54", "55", "2221", "2720"], [16]),
    "amex": (["34", "37"], [15]),
    "discover": (["6011", "644", "65"], [16]),
    "diners": (["36", "38"], [14]),
    "jcb": (["3528", "3589"], [16]),
    "unionpay": (["62"], [16, 17, 18, 19]),
}


@st.composite
def card(draw) -> tuple[str, str]:
    """Payment cards of seven issuers (valid Luhn), bare or grouped 4-4-4-4(-3) / 4-6-5 / 4-6-4 with spaces, dashes, dots."""
    prefixes, lengths = ISSUERS[draw(st.sampled_from(sorted(ISSUERS)))]
    prefix, length = draw(st.sampled_from(prefixes)), draw(st.sampled_from(lengths))
    number = _luhn_complete(prefix + _digits(draw, length - len(prefix) - 1))
    sep = draw(st.sampled_from(["", " ", "-", "."]))
    if not sep:
        return "", number
    sizes = [4, 6, length - 10] if length in (14, 15) else [4] * (length // 4) + ([length % 4] if length % 4 else [])
    parts, i = [], 0
    for size in sizes:
        parts.append(number[i : i + size])
        i += size
    return "", sep.join(parts)


@st.composite
def ssn(draw) -> tuple[str, str]:
    """US SSNs in valid ranges, with spaces, dashes or dots, or bare after 'SSN' / 'social security number'."""
    area = draw(st.integers(1, 899).filter(lambda n: n != 666))
    a, g, s = f"{area:03d}", f"{draw(st.integers(1, 99)):02d}", f"{draw(st.integers(1, 9999)):04d}"
    sep = draw(st.sampled_from([" ", "-", "."]))
    if draw(st.booleans()):
        return "", f"{a}{sep}{g}{sep}{s}"
    word = draw(st.sampled_from(["SSN ", "SSN: ", "ssn #", "SSN#: ", "social security number ", "Social Security No. "]))
    return word, f"{a}{g}{s}"


@st.composite
def email(draw) -> tuple[str, str]:
    """name.surname / name_surname / name-surname / name+tag / name123 at one or more domain levels, any case."""
    name = st.text(string.ascii_lowercase, min_size=1, max_size=8)
    local = draw(name) + draw(st.sampled_from(["", ".", "_", "-", "+"])) + draw(name) + draw(st.sampled_from(["", _digits(draw, 2)]))
    labels = draw(st.lists(st.text(string.ascii_lowercase + string.digits, min_size=2, max_size=10), min_size=1, max_size=3))
    tld = draw(st.sampled_from(["com", "org", "co.uk", "io", "de", "travel"]))
    value = f"{local}@{'.'.join(labels)}.{tld}"
    return "", value.upper() if draw(st.integers(0, 5)) == 0 else value


@st.composite
def ipv4(draw) -> tuple[str, str]:
    return "", ".".join(str(draw(st.integers(0, 255))) for _ in range(4))


@st.composite
def ipv6(draw) -> tuple[str, str]:
    """Full, compressed ('::') and upper-case forms, and IPv4-mapped; at least 3 non-zero groups (not '::1')."""
    groups = [draw(st.integers(1, 0xFFFF)) for _ in range(8)]
    start = draw(st.integers(0, 7))
    for i in range(start, min(8, start + draw(st.integers(0, 5)))):
        groups[i] = 0
    if sum(1 for g in groups if g) < 3:
        groups[:3] = [0x2001, 0xDB8, 0x85A3]
    address = ipaddress.IPv6Address(b"".join(g.to_bytes(2, "big") for g in groups))
    form = draw(st.sampled_from(["compressed", "exploded", "upper", "mapped"]))
    if form == "mapped":
        return "", "::ffff:" + ".".join(str(draw(st.integers(1, 255))) for _ in range(4))
    text = address.exploded if form == "exploded" else address.compressed
    return "", text.upper() if form == "upper" else text


IBAN_LENGTHS = {"GB": 22, "DE": 22, "FR": 27, "NL": 18, "ES": 24, "IT": 27, "CH": 21, "NO": 15, "BE": 16, "PL": 28}


@st.composite
def iban(draw) -> tuple[str, str]:
    """IBANs of ten countries with a valid mod-97 check, compact or in groups of four."""
    country = draw(st.sampled_from(sorted(IBAN_LENGTHS)))
    bban = "".join(draw(st.lists(st.sampled_from(string.digits * 3 + string.ascii_uppercase), min_size=IBAN_LENGTHS[country] - 4, max_size=IBAN_LENGTHS[country] - 4)))
    check = 98 - int("".join(str(int(ch, 36)) for ch in bban + country + "00")) % 97
    value = f"{country}{check:02d}{bban}"
    if draw(st.booleans()):
        value = " ".join(value[i : i + 4] for i in range(0, len(value), 4))
    return "", value


PII = {
    "us_phone": us_phone(), "national_phone": national_phone(), "e164_phone": e164_phone(), "keyword_phone": keyword_phone(),
    "card": card(), "ssn": ssn(), "email": email(), "ipv4": ipv4(), "ipv6": ipv6(), "iban": iban(),
}
EXPECTED_MASK = {
    "us_phone": "[PHONE]", "national_phone": "[PHONE]", "e164_phone": "[PHONE]", "keyword_phone": "[PHONE]", "card": "[CARD]",
    "ssn": "[SSN]", "email": "[EMAIL]", "ipv4": "[IP]", "ipv6": "[IP]", "iban": "[IBAN]",
}
FILLER = WORDS + ["Hello", "Thanks", "Regards", "Please", "review", "ticket", "order", "extra", "next", "Anna", "to", "at", "or"]


def filler(max_size: int = 8):
    return st.lists(st.sampled_from(FILLER), max_size=max_size).map(" ".join)


# --- property tests ---------------------------------------------------------------------------------------------


@PROPERTY
@given(
    kind=st.sampled_from(sorted(PII)),
    data=st.data(),
    before=filler(),
    after=filler(),
    opening=st.sampled_from(["", "(", '"', "<"]),
    closing=st.sampled_from(["", ".", ",", ";", ")", '"', ">", "!"]),
)
def test_generated_pii_in_text_is_fully_masked(kind, data, before, after, opening, closing):
    """Formats generated (each embedded in ordinary words, optionally in brackets/quotes and before punctuation):

    - US/NANP phones: 555-123-4567, 555.123.4567, 555 123 4567, (555) 123-4567, (555)123-4567, 5551234567, 555-1234567,
      1-555-123-4567, 1 555 123 4567, 1.555.123.4567, 1 (555) 123-4567, 15551234567, +1 555 123 4567, +1-555-123-4567,
      +1 (555) 123-4567, +15551234567, +1.555.123.4567, 001 555 123 4567; each optionally with an extension:
      x123, ' x123', ' x 123', ' ext. 123', ' ext 123', ' ext.123', ' extension 123', ' Ext. 123', ' EXT 123', ', ext. 123'.
    - UK (020 7946 0958, 07700 900123, 0207 946 0958, 02079460958, (020) 7946 0958, +44 20 7946 0958,
      +44 (0)20 7946 0958, +442079460958, 0044 20 7946 0958, +44-7700-900123), French (01 23 45 67 89, 01.23.45.67.89,
      01-23-45-67-89, 0123456789, +33 1 23 45 67 89, +33 (0)1 ..., +33123456789, 0033 1 ...), German (030 12345678,
      030-12345678, 030/12345678, (030) 12345678, +49 30 12345678, +49 (0)30 ..., +493012345678, 0049 30 ...),
      Indian (+91 98765 43210, +91-98765-43210, +919876543210, 098765 43210, 09876543210, 0091 98765 43210), with extensions.
    - Any country in E.164: +<1-3 digit code><7-12 digits>, bare or grouped by spaces, dashes or dots.
    - After a phone keyword (tel./phone/call (me at)/mobile/cell/fax/whatsapp): local 555-0199, 555.0199, 555 0199, and
      Spanish-style 912 345 678 / 912345678.
    - Cards (valid Luhn): Visa 13/16/19, Mastercard 51-55 and 2221-2720, Amex 15 (4-6-5), Discover, Diners 14 (4-6-4),
      JCB, UnionPay 16-19; bare or grouped with spaces, dashes or dots.
    - SSNs (valid ranges): 123-45-6789, 123 45 6789, 123.45.6789, and bare 123456789 after 'SSN', 'SSN:', 'ssn #',
      'SSN#:', 'social security number', 'Social Security No.'.
    - Emails: name.surname / name_surname / name-surname / name+tag / with digits, 1-3 domain labels, .com .org .co.uk
      .io .de .travel, sometimes all upper case.
    - IPv4 dotted quads; IPv6 full, '::'-compressed, upper case, and IPv4-mapped (::ffff:1.2.3.4).
    - IBANs of GB, DE, FR, NL, ES, IT, CH, NO, BE, PL (valid mod-97), compact or in groups of four.
    """
    lead, value = data.draw(PII[kind], label="value")
    text = f"{before} {opening}{lead}{value}{closing} {after}"
    out, counts = redact_text(text)
    assert out == f"{before} {opening}{lead}{EXPECTED_MASK[kind]}{closing} {after}", (text, find_pii(text))
    assert value not in out and not any(ch.isdigit() for ch in out)  # filler has no digits: none of the value's digits remain
    assert sum(counts.values()) == 1


@PROPERTY
@given(values=st.lists(st.sampled_from(sorted(PII)).flatmap(lambda k: PII[k]), min_size=2, max_size=5), words=filler(4))
@example(values=[("", "340000000000009"), ("", "+1 00 00 00 00 00 00 00")], words="")  # 14 digits in 7 pairs: the 7th pair once leaked
@example(values=[("", "340000000000009"), ("", "+1-00-00-00-00-00-00-00")], words="")
def test_several_generated_values_in_one_text_are_all_masked(values, words):
    text = ". ".join(f"{words} {lead}{value}" for lead, value in values) + "."
    out, counts = redact_text(text)
    for _, value in values:
        assert value not in out
    assert not any(ch.isdigit() for ch in out), (text, out)
    assert sum(counts.values()) == len(values)


def _ordinary_number():
    """Numbers that are not personal data: years, counts 'n of m', prices, ratings, times, dates, durations, percents."""
    ints = st.integers
    return st.one_of(
        ints(1900, 2099).map(str),
        st.tuples(ints(0, 20), ints(1, 20)).map(lambda t: f"{t[0]} of {t[1]}"),
        ints(1, 10**7).map(lambda n: f"${n:,}"),
        st.tuples(ints(0, 9999), ints(0, 99)).map(lambda t: f"${t[0]}.{t[1]:02d}"),
        ints(0, 10).map(lambda n: f"{n}/10"),
        st.tuples(ints(0, 4), ints(0, 9)).map(lambda t: f"{t[0]}.{t[1]} out of 5"),
        st.tuples(ints(0, 23), ints(0, 59)).map(lambda t: f"{t[0]}:{t[1]:02d}"),
        st.tuples(ints(1900, 2099), ints(1, 12), ints(1, 28)).map(lambda t: f"{t[0]}-{t[1]:02d}-{t[2]:02d}"),
        st.tuples(ints(1, 12), ints(1, 28), ints(1900, 2099)).map(lambda t: f"{t[0]:02d}/{t[1]:02d}/{t[2]}"),
        st.tuples(ints(1, 28), ints(1, 12), ints(1900, 2099)).map(lambda t: f"{t[0]:02d}.{t[1]:02d}.{t[2]}"),
        st.tuples(ints(0, 5), ints(0, 59)).map(lambda t: f"{t[0]}h {t[1]}m"),
        ints(0, 100).map(lambda n: f"{n}%"),
        ints(0, 999_999).map(str),
        st.tuples(ints(1900, 2099), ints(1900, 2099)).map(lambda t: f"{t[0]}-{t[1]}"),
        ints(1, 999).map(lambda n: f"#{n}"),
    )


@PROPERTY
@given(st.lists(st.tuples(filler(3), _ordinary_number()), min_size=1, max_size=6))
def test_ordinary_numbers_in_text_stay_unchanged(parts):
    text = " ".join(f"{words} {number} and" for words, number in parts)
    assert redact_text(text) == (text, {}), find_pii(text)


# --- end to end: a real run with --redact-pii writes no raw value anywhere ------------------------------------------

RAW = {  # kind: a value in one of the written forms the review found missed, or one that was already caught
    "email": "jane.doe@example.com",
    "phone_spaces": "555 123 4567",
    "phone_bare": "5551234567",
    "phone_ext": "415-555-0199x123",
    "phone_intl": "+44 20 7946 0958",
    "card_dots": "4111.1111.1111.1111",
    "card_spaces": "5555 5555 5555 4444",
    "ssn_spaces": "123 45 6789",
    "ssn_dashes": "234-56-7890",
    "ipv4": "192.168.13.77",
    "ipv6": "2001:db8:85a3::8a2e:370:7334",
    "iban": "GB82 WEST 1234 5698 7654 32",
    "url_credentials": "https://bob:s3cret@git.example.com/x.git",
}


def _needles(value: str) -> set[str]:
    """The value as written and, for long numbers, its bare digits (a leak may drop the separators)."""
    digits = "".join(ch for ch in value if ch.isdigit())
    needles = {value}
    if len(digits) >= 10:
        needles.add(digits)
    if value.startswith("https://"):
        needles.add("bob:s3cret")
    return needles


def _digit_aware_bert(folder: Path) -> Path:
    """Like conftest's tiny BERT, but digits and letters also have '##' continuation pieces, so a phone number or an
    email tokenises to a distinctive id sequence instead of one [UNK] (which would hide a leak in the token cache)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + list(chars) + [f"##{c}" for c in chars] + list(".,!?'\"-@+()[]:/#_<>;")
    vocab = list(dict.fromkeys(vocab))
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True, model_max_length=128)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def _pii_rows(seed: int) -> list[tuple[str, str]]:
    rows = []
    for i, (kind, value) in enumerate(RAW.items()):
        label = "pos" if i % 2 == 0 else "neg"
        word = ("good", "great") if label == "pos" else ("bad", "dull")
        rows.append((f"the {word[0]} film {kind.split('_')[0]} {value} was {word[1]}", label))
        rows.append((f"{word[1]} story, write {value} and {word[0]}", label))
    return rows[seed:] + rows[:seed]


def _contains(row: list[int], sub: list[int]) -> bool:
    return any(row[i : i + len(sub)] == sub for i in range(len(row) - len(sub) + 1))


def test_run_with_redact_pii_leaves_no_raw_value_in_any_written_file(tmp_path, monkeypatch):
    import os

    from click.testing import CliRunner
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer

    from fmtune.cli import _main_group  # `fmtune run` is added to the typer app's click group there

    model = _digit_aware_bert(tmp_path / "models" / "tiny-bert-digits")
    data = tmp_path / "data"
    data.mkdir()
    train_rows = make_reviews(150) + _pii_rows(0)
    test_rows = make_reviews(40, seed=1) + _pii_rows(3)
    train = write_csv(data / "train.csv", train_rows)
    test = write_csv(data / "test.csv", test_rows)
    run = tmp_path / "runs" / "pii"
    monkeypatch.chdir(tmp_path)
    args = ["run", "--train", str(train), "--test", str(test), "--model", str(model), "--out", str(run), "--name", "pii", "--redact-pii",
            "--epochs", "1", "--no-curve", "--bootstrap", "100", "--latency-repeats", "3", "--batch-size", "16", "--threads", "1"]
    result = CliRunner().invoke(_main_group(), args)
    assert result.exit_code == 0, (result.output[-3000:], result.exception)
    assert all(value in train.read_text() + test.read_text() for value in RAW.values())  # the inputs really hold the raw values

    registry = Path(os.environ["FMTUNE_REGISTRY"])
    cache = Path(os.environ["FMTUNE_CACHE"])
    written = [p for p in run.rglob("*") if p.is_file()]
    written += [p for p in registry.parent.glob(registry.name + "*") if p.is_file()]  # the sqlite file and its -wal/-journal
    written += [p for p in cache.rglob("*") if p.is_file()]
    assert any(p.name == "report.json" for p in written) and any(p.name.startswith(registry.name) for p in written)
    leaks = sorted(
        f"{p.relative_to(tmp_path)}: {kind} {needle!r}"
        for p in written
        for kind, value in RAW.items()
        for needle in _needles(value)
        if needle.encode() in p.read_bytes()
    )
    leaks += [f"CLI output: {kind} {value!r}" for kind, value in RAW.items() if value in result.output]
    assert not leaks, "raw personal data written by a --redact-pii run:\n" + "\n".join(leaks)

    # The token cache holds ids, keyed by a hash of the texts: it must hold the redacted texts' ids, never a raw value's.
    tokenizer = AutoTokenizer.from_pretrained(model)
    cached = []
    for path in (cache / "tokens").glob("*.safetensors"):
        stored = load_file(str(path))
        flat, offsets = stored["ids"].tolist(), stored["offsets"].tolist()
        cached += [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
    assert cached, "the run wrote no token cache: the check below would prove nothing"
    for kind, value in RAW.items():
        ids = tokenizer(value, add_special_tokens=False)["input_ids"]
        assert len(ids) >= 5 and tokenizer.unk_token_id not in ids  # distinctive: a match could only come from the value
        assert not any(_contains(row, ids) for row in cached), f"the token cache holds the ids of the raw {kind} {value!r}"
    redacted_rows = {tuple(ids) for ids in tokenizer([redact_text(t)[0] for t, _ in train_rows + test_rows])["input_ids"]}
    assert redacted_rows & {tuple(row) for row in cached}, "the cache should hold the redacted texts' ids"
