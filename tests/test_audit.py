"""Data audit: PII detection and redaction, duplicates, leakage, class balance, warnings."""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections import Counter

import pytest

import fmtune.data.labeled
from fmtune.data.audit import PII_KINDS, audit, find_pii, iban_valid, luhn_valid, normalise, redact_splits, redact_text
from fmtune.data.labeled import Example, Splits


def kinds(text: str) -> list[str]:
    return [kind for kind, _, _ in find_pii(text)]


def ex(text: str, label: str, row: int, source: str = "data/train.csv") -> Example:
    return Example(text=text, label=label, source=source, row=row)


def make_splits(train, validation=(), test=(), labels=None, dropped=None) -> Splits:
    train, validation, test = list(train), list(validation), list(test)
    if labels is None:
        labels = sorted({e.label for e in train + validation + test})
    return Splits(train=train, validation=validation, test=test, labels=labels, dropped=dict(dropped or {}))


def balanced_train(n_per_class: int, labels=("neg", "pos")) -> list[Example]:
    return [ex(f"{label} review number {i}", label, i + 2) for label in labels for i in range(n_per_class)]


# --- checksums ----------------------------------------------------------------------------------------------------


def test_luhn():
    assert luhn_valid("4111111111111111")
    assert luhn_valid("378282246310005")
    assert luhn_valid("79927398713")
    assert not luhn_valid("4111111111111112")
    assert not luhn_valid("79927398710")


def test_iban_checksum_and_country_length():
    assert iban_valid("GB82 WEST 1234 5698 7654 32")
    assert iban_valid("DE89370400440532013000")
    assert iban_valid("NO9386011117947")
    assert not iban_valid("GB82 WEST 1234 5698 7654 33")  # checksum off by one
    assert not iban_valid("DE8937040044053201300")  # one character short for DE
    assert not iban_valid("ZZ82WEST12345698765432")  # not a country


# --- PII: positives -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, kind, found",
    [
        ("mail me at a.b@example.com", "email", "a.b@example.com"),
        ("Contact: Jane.Doe+films@mail.co.uk.", "email", "Jane.Doe+films@mail.co.uk"),
        ("call +44 20 7946 0958 now", "phone", "+44 20 7946 0958"),
        ("ring +1 (555) 123-4567", "phone", "+1 (555) 123-4567"),
        ("whatsapp +14155552671", "phone", "+14155552671"),
        ("mobile +91-98765-43210", "phone", "+91-98765-43210"),
        ("office (555) 123-4567.", "phone", "(555) 123-4567"),
        ("text 555-123-4567 today", "phone", "555-123-4567"),
        ("toll free 1-800-555-0199", "phone", "1-800-555-0199"),
        ("london 020 7946 0958", "phone", "020 7946 0958"),
        ("paris 01 23 45 67 89", "phone", "01 23 45 67 89"),
        ("visa 4111 1111 1111 1111.", "credit_card", "4111 1111 1111 1111"),
        ("card 4111-1111-1111-1111", "credit_card", "4111-1111-1111-1111"),
        ("amex 378282246310005", "credit_card", "378282246310005"),
        ("amex 3782 822463 10005", "credit_card", "3782 822463 10005"),
        ("server 192.168.0.1.", "ip_address", "192.168.0.1"),
        ("from 255.255.255.0 to", "ip_address", "255.255.255.0"),
        ("v6 2001:db8::8a2e:370:7334 here", "ip_address", "2001:db8::8a2e:370:7334"),
        ("pay to GB82 WEST 1234 5698 7654 32 THANKS", "iban", "GB82 WEST 1234 5698 7654 32"),
        ("iban DE89370400440532013000", "iban", "DE89370400440532013000"),
        ("ssn 123-45-6789", "us_ssn", "123-45-6789"),
        ("repo https://bob:s3cret@git.example.com/x.git, ok", "url_credentials", "https://bob:s3cret@git.example.com/x.git"),
    ],
)
def test_pii_positives(text, kind, found):
    spans = find_pii(text)
    assert [(k, text[s:e]) for k, s, e in spans] == [(kind, found)]


# --- PII: false-positive guard ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "rated 8/10",
        "1999",
        "released in 1999, remade in 2021",
        "$25,000,000 budget, $100,000,000 gross",
        "2h 15m",
        "runtime 135 min",
        "2021-03-04",
        "on 03-04-2021 10:30 at the cinema",
        "12/25/2019 7:30pm",
        "IMDb 7.8/10 from 250,000 votes",
        "Top 250 #42, 4.5 out of 5 stars",
        "call 911",
        "room 101",
        "+10 points for style",
        "the 1990-1999 decade",
        "James Bond 007 1995 2006",
        "pi is 3.14159265358979",
        "ratio 0.1234567891",
        "1080p 4K 60fps",
        "version v1.2.3.4",
        "at 12:30:45 sharp",
        "ISBN 978-0-306-40615-7",
        "4111111111111112",  # 16 digits, Luhn fails
        "card 4111 1111 1111 1112",
        "0000000000000000",  # passes Luhn but is no card
        "256.1.1.1 and 1.2.3",
        "666-12-3456 000-12-3456 912-12-3456 123-00-4567 123-45-0000",  # invalid SSN ranges
        "GB82 WEST 1234 5698 7654 33",  # IBAN checksum fails
        "someone @ home, email me later",
        "http://example.com/page",
    ],
)
def test_pii_false_positive_guard(text):
    assert find_pii(text) == []


def test_random_non_luhn_16_digit_numbers_are_not_cards():
    rng = random.Random(0)
    checked = 0
    while checked < 200:
        number = str(rng.randrange(10**15, 10**16))
        if luhn_valid(number):
            continue
        assert "credit_card" not in kinds(f"order {number} shipped")
        assert "credit_card" not in kinds(f"order {number[:4]} {number[4:8]} {number[8:12]} {number[12:]} shipped")
        checked += 1


def test_spans_sorted_and_non_overlapping():
    text = "a@b.com then 4111 1111 1111 1111 then https://u:p@h.io and 10.0.0.1 and 555-123-4567"
    spans = find_pii(text)
    assert [k for k, _, _ in spans] == ["email", "credit_card", "url_credentials", "ip_address", "phone"]
    assert all(e1 <= s2 for (_, _, e1), (_, s2, _) in zip(spans, spans[1:]))


# --- redaction ----------------------------------------------------------------------------------------------------


def test_redact_text_exact():
    assert redact_text("mail me at a.b@example.com") == ("mail me at [EMAIL]", Counter(email=1))
    text, counts = redact_text(
        "Call (555) 123-4567 or +44 20 7946 0958, card 4111 1111 1111 1111, ip 10.0.0.1, "
        "iban GB82WEST12345698765432, ssn 123-45-6789."
    )
    assert text == "Call [PHONE] or [PHONE], card [CARD], ip [IP], iban [IBAN], ssn [SSN]."
    assert counts == Counter(phone=2, credit_card=1, ip_address=1, iban=1, us_ssn=1)
    assert redact_text("rated 8/10 in 1999") == ("rated 8/10 in 1999", Counter())


def test_redact_splits_keeps_order_and_locations_and_rehashes(monkeypatch):
    def fake_hash(splits: Splits) -> str:
        body = "\n".join(e.text for e in splits.train + splits.validation + splits.test)
        return hashlib.sha256(body.encode()).hexdigest()

    monkeypatch.setattr(fmtune.data.labeled, "data_hash", fake_hash)
    splits = make_splits(
        [ex("write a@b.com", "pos", 2), ex("plain text", "neg", 3)],
        [ex("call 555-123-4567", "neg", 4, "data/val.csv")],
        [ex("x@y.org and z@w.net", "pos", 5, "data/test.csv")],
        dropped={"empty text": 1},
    )
    splits.files = {"data/train.csv": "abc"}
    splits.sha256 = fake_hash(splits)
    redacted, counts = redact_splits(splits)

    assert [e.text for e in redacted.train] == ["write [EMAIL]", "plain text"]
    assert [(e.source, e.row, e.label) for e in redacted.train] == [("data/train.csv", 2, "pos"), ("data/train.csv", 3, "neg")]
    assert [e.text for e in redacted.validation] == ["call [PHONE]"]
    assert [(e.text, e.source, e.row) for e in redacted.test] == [("[EMAIL] and [EMAIL]", "data/test.csv", 5)]
    assert counts == {kind: 0 for kind in PII_KINDS} | {"email": 3, "phone": 1}
    assert redacted.sha256 == fake_hash(redacted) != splits.sha256
    assert redacted.labels == splits.labels and redacted.dropped == {"empty text": 1}
    assert redacted.files == {"data/train.csv": "abc"}
    assert splits.train[0].text == "write a@b.com"  # the input is untouched


# --- duplicates, overlap, class counts ----------------------------------------------------------------------------


def small_splits() -> Splits:
    train = [
        ex("Great movie!", "pos", 2),
        ex("Great movie!", "pos", 3),  # exact duplicate of line 2
        ex("great   MOVIE", "pos", 4),  # normalised duplicate of line 2
        ex("Awful film.", "neg", 5),
        ex("awful film", "pos", 6),  # normalised duplicate of line 5 with another label: conflict
        ex("Boring.", "neg", 7),
    ]
    validation = [ex("Boring", "neg", 2, "data/val.csv"), ex("Fine.", "pos", 3, "data/val.csv")]
    test = [
        ex("Great movie!", "pos", 2, "data/test.csv"),  # exact duplicate, leaks from train
        ex("AWFUL FILM!!", "neg", 3, "data/test.csv"),  # normalised duplicate, leaks from train
        ex("Unseen text", "neg", 4, "data/test.csv"),
    ]
    return make_splits(train, validation, test)


def test_normalise():
    assert normalise("  Ｇreat\tMOVIE!!  It’s “fine”. ") == "great movie its fine"
    assert normalise("great 👍") != normalise("great 👎")  # symbols are kept, only punctuation goes


def test_duplicates_overlap_conflicts_exact_counts():
    report = audit(small_splits())
    assert report["duplicates"] == 2  # train:3 and test:2 repeat "Great movie!"
    assert report["duplicates_normalised"] == 6  # train 3,4,6; validation 2; test 2,3
    assert report["conflicting_labels"] == 1  # "awful film": neg and pos
    assert report["train_test_overlap"] == 2
    assert report["train_validation_overlap"] == 1
    assert report["n_examples"] == {"train": 6, "validation": 2, "test": 3}
    examples = report["examples"]
    assert examples["duplicates"] == [
        {"at": "data/train.csv:3", "first": "data/train.csv:2", "text": "Great movie!"},
        {"at": "data/test.csv:2", "first": "data/train.csv:2", "text": "Great movie!"},
    ]
    assert examples["conflicting_labels"] == [
        {"labels": ["neg", "pos"], "at": ["data/train.csv:5", "data/train.csv:6"], "text": "Awful film."}
    ]
    assert [e["at"] for e in examples["train_test_overlap"]] == ["data/test.csv:2", "data/test.csv:3"]


def test_examples_are_capped_at_five():
    train = [ex("same text", "pos", i) for i in range(2, 22)]
    report = audit(make_splits(train, test=[ex("other", "pos", 2, "t.csv")]))
    assert report["duplicates"] == 19
    assert len(report["examples"]["duplicates"]) == 5
    assert len(report["examples"]["duplicates_normalised"]) == 5


def test_class_counts_and_imbalance():
    train = [ex(f"p{i}", "pos", i) for i in range(12)] + [ex(f"n{i}", "neg", i) for i in range(4)]
    test = [ex("t1", "pos", 1, "t.csv"), ex("t2", "neg", 2, "t.csv"), ex("t3", "neg", 3, "t.csv")]
    report = audit(make_splits(train, [ex("v", "pos", 1, "v.csv")], test, labels=["neg", "pos", "neutral"]))
    assert report["class_counts"] == {
        "train": {"neg": 4, "pos": 12, "neutral": 0},
        "validation": {"neg": 0, "pos": 1, "neutral": 0},
        "test": {"neg": 2, "pos": 1, "neutral": 0},
        "all": {"neg": 6, "pos": 14, "neutral": 0},
    }
    assert report["imbalance_ratio"] is None  # a declared class has no training example
    stray = audit(make_splits(train, test=test + [ex("t4", "other", 4, "t.csv")], labels=["neg", "pos"]))
    assert stray["class_counts"]["test"] == {"neg": 2, "pos": 1, "other": 1}
    assert stray["class_counts"]["all"] == {"neg": 6, "pos": 13, "other": 1}
    two = audit(make_splits(train, test=test))
    assert two["imbalance_ratio"] == 3.0


def test_length_stats():
    lengths = {"train": list(range(1, 101)), "validation": [5, 200], "test": [300, 301, 2]}
    report = audit(make_splits(balanced_train(50), test=[ex("t", "pos", 1, "t.csv")]), lengths, max_length=90)
    assert report["length"] == {
        "max_length": 90,
        "p50": 50.5,
        "p95": 95.05,
        "p99": 99.01,
        "max": 100,
        "truncated": {"train": 10, "validation": 1, "test": 2},
    }
    assert audit(make_splits(balanced_train(50), test=[ex("t", "pos", 1, "t.csv")]))["length"] is None


# --- warnings -----------------------------------------------------------------------------------------------------


def clean_splits(n_per_class: int = 60) -> Splits:
    return make_splits(balanced_train(n_per_class), test=[ex("unseen test text", "pos", 2, "data/test.csv")])


def warnings_with(report: dict, fragment: str) -> list[str]:
    return [w for w in report["warnings"] if fragment in w]


def test_clean_data_has_no_warnings():
    report = audit(clean_splits(), {"train": [10] * 120}, max_length=64)
    assert report["warnings"] == []
    assert report["pii"] == {kind: 0 for kind in PII_KINDS}
    assert report["pii_note"].startswith("No personal data found")


def test_warning_few_training_examples():
    report = audit(clean_splits(20))
    assert report["warnings"][0] == (
        "Only 40 labeled training examples: fine-tuning usually needs hundreds to thousands of labeled examples; "
        "expect a noisy result and compare with few_shot/head_only."
    )
    assert not warnings_with(audit(clean_splits(50)), "labeled training examples")


def test_warning_small_class_names_it_and_its_count():
    train = balanced_train(60) + [ex(f"rare {i}", "rare", 200 + i) for i in range(3)]
    (warning,) = warnings_with(audit(make_splits(train, test=[ex("t", "pos", 1, "t.csv")])), "fewer than 10")
    assert "'rare' (3)" in warning and "'pos'" not in warning


def test_warning_imbalance_states_ratio_and_macro_f1():
    train = [ex(f"p{i}", "pos", i) for i in range(80)] + [ex(f"n{i}", "neg", i) for i in range(20)]
    (warning,) = warnings_with(audit(make_splits(train, test=[ex("t", "pos", 1, "t.csv")])), "imbalanced")
    assert "4x" in warning and "macro-F1" in warning
    train = [ex(f"p{i}", "pos", i) for i in range(60)] + [ex(f"n{i}", "neg", i) for i in range(20)]
    assert not warnings_with(audit(make_splits(train, test=[ex("t", "pos", 1, "t.csv")])), "imbalanced")  # exactly 3


def test_warning_train_test_overlap():
    splits = clean_splits()
    splits.test.append(ex("POS review number 3!", "pos", 3, "data/test.csv"))
    (warning,) = warnings_with(audit(splits), "test texts also appear in train")
    assert warning.startswith("1 test texts also appear in train: the test score is optimistic; deduplicate")


def test_warning_duplicates_over_one_percent():
    splits = clean_splits()  # 121 rows: one duplicate is 0.8%, two are 1.6%
    splits.train.append(ex("neg review number 0", "neg", 500))
    assert not warnings_with(audit(splits), "repeat an earlier text")
    splits.train.append(ex("Neg review number 1.", "neg", 501))
    (warning,) = warnings_with(audit(splits), "repeat an earlier text")
    assert warning.startswith("2 of 123 rows (1.6%) repeat an earlier text (1 exactly")


def test_warning_conflicting_labels():
    splits = clean_splits()
    splits.train.append(ex("neg review number 0", "pos", 500))
    (warning,) = warnings_with(audit(splits), "more than one label")
    assert warning.startswith("1 texts appear with more than one label (e.g. data/train.csv:2 and data/train.csv:500")


def test_warning_truncation_over_five_percent():
    splits = clean_splits()
    lengths = {"train": [10] * 113 + [100] * 7}
    (warning,) = warnings_with(audit(splits, lengths, max_length=64), "are cut off")
    assert warning.startswith("7 of 120 training texts (5.8%) are longer than max_length=64")
    lengths = {"train": [10] * 114 + [100] * 6}  # exactly 5%
    assert not warnings_with(audit(splits, lengths, max_length=64), "are cut off")


def test_pii_found_not_redacted_warns_and_counts():
    splits = clean_splits()
    splits.train.append(ex("mail a@b.com or call 555-123-4567", "pos", 500))
    splits.test.append(ex("me: c@d.org", "neg", 9, "data/test.csv"))
    report = audit(splits)
    assert report["pii"] == {kind: 0 for kind in PII_KINDS} | {"email": 2, "phone": 1}
    assert report["pii_redacted"] == {}
    assert "pass --redact-pii" in report["pii_note"] and "3 items" in report["pii_note"]
    (warning,) = warnings_with(report, "personal data")
    assert "Found 3 items" in warning and "--redact-pii" in warning
    assert "a@b.com" not in json.dumps(report)  # counts and locations only, never the values


def test_pii_redacted_no_warning(monkeypatch):
    monkeypatch.setattr(fmtune.data.labeled, "data_hash", lambda splits: "h")
    splits = clean_splits()
    splits.train.append(ex("mail a@b.com or call 555-123-4567", "pos", 500))
    redacted_splits, counts = redact_splits(splits)
    report = audit(redacted_splits, redacted=counts)
    assert report["pii"]["email"] == 1 and report["pii"]["phone"] == 1  # what the data held before masking
    assert report["pii_redacted"] == counts
    assert report["pii_note"].startswith("2 items of personal data found and masked before training (--redact-pii")
    assert "counts only, never the values" in report["pii_note"]
    assert not warnings_with(report, "personal data")


def test_warning_dropped_rows_say_how_many_and_why():
    splits = clean_splits()
    splits.dropped = {"empty_text": 3, "empty_label": 2, "odd_reason": 1}
    report = audit(splits)
    assert report["dropped"] == {"empty_text": 3, "empty_label": 2, "odd_reason": 1}
    assert warnings_with(report, "dropped") == [
        "6 rows were dropped while loading the data: 3 with an empty text (--drop-unlabeled), "
        "2 with an empty label (--drop-unlabeled), 1 odd reason."
    ]


def test_report_is_json_serialisable_and_has_required_keys():
    splits = small_splits()
    splits.train.append(ex("pii 4111 1111 1111 1111", "neg", 9))
    report = audit(splits, {"train": [3, 5, 8], "validation": [2], "test": [1]}, max_length=4)
    assert json.loads(json.dumps(report, allow_nan=False)) == report
    for key in ("duplicates", "train_test_overlap", "pii", "warnings", "class_counts"):
        assert key in report


def test_audit_100k_texts_in_a_few_seconds():
    rng = random.Random(0)
    words = ("the movie was great terrible plot acting loved it boring cast " * 4).split()
    words += "1999 rated 8/10 2h 15m a@b.com 555-123-4567".split()
    texts = [" ".join(rng.choices(words, k=rng.randint(5, 30))) for _ in range(100_000)]
    examples = [ex(t, rng.choice("ab"), i) for i, t in enumerate(texts)]
    splits = make_splits(examples[:80_000], examples[80_000:90_000], examples[90_000:])
    start = time.perf_counter()
    report = audit(splits)
    assert time.perf_counter() - start < 10
    assert report["n_examples"] == {"train": 80_000, "validation": 10_000, "test": 10_000}


def test_labels_that_differ_only_in_case_or_spacing_are_named():
    train = balanced_train(20, labels=("food", "Food", "FOOD!", "sports"))
    report = audit(make_splits(train, test=[ex("a meal", "food", 2, "data/test.csv")]))
    [warning] = [w for w in report["warnings"] if "differ only in case" in w]
    assert "'FOOD!' (20), 'Food' (20), 'food' (21)" in warning
    assert "sports" not in warning
    assert not [w for w in audit(make_splits(balanced_train(20)))["warnings"] if "differ only in case" in w]


def test_labels_changed_while_loading_are_counted_and_named(tmp_path):
    from fmtune.config import DataConfig
    from fmtune.data.labeled import load_splits

    path = tmp_path / "d.csv"
    rows = [f"text {i},{' food ' if i % 5 == 0 else 'food'}" for i in range(20)] + [f"other {i},{'2.0' if i % 4 == 0 else '2'}" for i in range(20)]
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    splits = load_splits(DataConfig(data=path), 0)
    assert splits.labels == ["2", "food"]
    report = audit(splits)
    assert report["labels_normalised"]["count"] == 4 + 5
    first = report["labels_normalised"]["examples"][0]
    assert first["at"].startswith(f"{path}:") and (first["as_written"], first["used"]) in {(" food ", "food"), ("2.0", "2")}
    [warning] = warnings_with(report, "merged into one class while loading")
    assert "'food' from 'food' (16), ' food ' (4)" in warning and "'2' from '2' (15), '2.0' (5)" in warning
    clean = tmp_path / "clean.csv"
    clean.write_text("text,label\n" + "\n".join(f"t {i},{i % 2}" for i in range(20)) + "\n")
    assert audit(load_splits(DataConfig(data=clean), 0))["labels_normalised"] == {"count": 0, "examples": []}
    one_form = tmp_path / "spaced.csv"  # every label written the same spaced way: normalised and counted, nothing merged
    one_form.write_text("text,label\n" + "\n".join(f"t {i}, {'pos' if i % 2 else 'neg'}" for i in range(20)) + "\n")
    report = audit(load_splits(DataConfig(data=one_form), 0))
    assert report["labels_normalised"]["count"] == 20 and not warnings_with(report, "merged into one class")
    floats = tmp_path / "d.jsonl"  # JSON: 1.0 next to 1 is a second form of the label '1'
    floats.write_text("".join(json.dumps({"text": f"t {i}", "label": [0, 1, 1.0][i % 3]}) + "\n" for i in range(30)))
    [warning] = warnings_with(audit(load_splits(DataConfig(data=floats), 0)), "merged into one class")
    assert "'1' from '1" in warning and "'1.0' (10)" in warning and "'1' (10)" in warning


def test_vocabulary_coverage_warns_when_the_model_cannot_read_the_texts():
    from fmtune.data.audit import vocabulary_coverage

    cls, sep, unk = 101, 102, 100
    texts = ["the food was good", "สวัสดีครับ ผมชอบอาหารไทย", "Мне нравится русская еда", "Я люблю русскую еду"]
    ids = [[cls, 5, 6, 7, 8, sep], [cls, unk, unk, sep], [cls] + list(range(200, 220)) + [sep], [cls] + list(range(300, 320)) + [sep]]
    block, warnings = vocabulary_coverage(texts, ids, unk, {cls, sep})
    assert block["unk_share"] == round(2 / 46, 4) and block["texts_mostly_unk"] == 1 and block["examples_mostly_unk"] == [texts[1]]
    assert block["tokens_per_word"] == 5.0  # median of 4/4, 20/4 and 20/4 (the Thai text has fewer than 3 words)
    assert len(warnings) == 2 and "4.3% of their tokens are [UNK]" in warnings[0] and "1 of 4 texts" in warnings[0]
    assert "5.0 tokens per word" in warnings[1] and "--model" in warnings[1]
    english = ["the food was good"] * 10
    block, warnings = vocabulary_coverage(english, [[cls, 5, 6, 7, 8, sep]] * 10, unk, {cls, sep})
    assert warnings == [] and block["unk_share"] == 0.0 and block["tokens_per_word"] == 1.0


# --- PII: the common written forms of phones, cards and SSNs (security review) ------------------------------------


@pytest.mark.parametrize(
    "text, kind, found",
    [
        ("call 555 123 4567 now", "phone", "555 123 4567"),
        ("call 5551234567 now", "phone", "5551234567"),
        ("desk 415-555-0199x123.", "phone", "415-555-0199x123"),
        ("desk 415-555-0199 ext. 123, ask for Ann", "phone", "415-555-0199 ext. 123"),
        ("desk 415-555-0199 ext 123", "phone", "415-555-0199 ext 123"),
        ("desk (415)555-0199 x 42", "phone", "(415)555-0199 x 42"),
        ("desk 415.555.0199", "phone", "415.555.0199"),
        ("us +1 415 555 0199 ext. 7 ok", "phone", "+1 415 555 0199 ext. 7"),
        ("us 1 (415) 555-0199", "phone", "1 (415) 555-0199"),
        ("uk 0044 20 7946 0958", "phone", "0044 20 7946 0958"),
        ("uk +44 (0)20 7946 0958", "phone", "+44 (0)20 7946 0958"),
        ("uk 02079460958", "phone", "02079460958"),
        ("uk mobile 07700 900123", "phone", "07700 900123"),
        ("fr 01.23.45.67.89", "phone", "01.23.45.67.89"),
        ("de 030/12345678", "phone", "030/12345678"),
        ("de +49 30 12345678", "phone", "+49 30 12345678"),
        ("es tel. 912 345 678", "phone", "912 345 678"),  # no trunk 0, no +: found after a phone keyword
        ("call me at 555-0199", "phone", "555-0199"),
        ("visa 4111.1111.1111.1111", "credit_card", "4111.1111.1111.1111"),
        ("mc 5555 5555 5555 4444", "credit_card", "5555 5555 5555 4444"),
        ("diners 3056-930902-5904", "credit_card", "3056-930902-5904"),
        ("ssn 123 45 6789", "us_ssn", "123 45 6789"),
        ("ssn 123.45.6789", "us_ssn", "123.45.6789"),
        ("SSN: 123456789", "us_ssn", "123456789"),
        ("social security number 123456789", "us_ssn", "123456789"),
        ("v6 ::ffff:192.0.2.128 here", "ip_address", "::ffff:192.0.2.128"),
    ],
)
def test_pii_common_written_forms(text, kind, found):
    spans = find_pii(text)
    assert [(k, text[s:e]) for k, s, e in spans] == [(kind, found)]


@pytest.mark.parametrize("value", ["555 123 4567", "5551234567", "415-555-0199x123", "4111.1111.1111.1111", "123 45 6789"])
def test_redact_pii_reviewed_formats_are_masked(value):
    out, counts = redact_text(f"reach me: {value} thanks")
    assert value not in out and sum(counts.values()) == 1
    assert not any(ch.isdigit() for ch in out)


@pytest.mark.parametrize(
    "text",
    [
        "3 of 5",
        "scored 3 of 5 stars, 10 of 10 for the cast",
        "price $1,299.99 or 12 x $108.33",
        "call me in 2 days",
        "call 911 or 112",
        "in 1999 and 2005 and 2010",
        "released 2019, 120 min, rated 7.5",
        "ISBN 0306406152",
        "ISBN 2266111566",
        "runtime 1h 58m, 24 fps, 1920 1080",
        "pages 100-1000",
        "scores 7 8 9 10",
        "on 01.02.2023 at 10.30",
        "the 100 200 300 meter races",
        "tel aviv is 60 km away",
    ],
)
def test_pii_ordinary_numbers_stay(text):
    assert redact_text(text) == (text, Counter())


# --- audit: first occurrence, validation/test overlap, truncation at the model's limit ----------------------------


def test_duplicates_name_the_earliest_line_as_first():
    # a shuffled split lists line 50 before line 3; across splits of one file, the test row 5 comes before train row 40
    train = [ex("Same text", "pos", 50, "d.csv"), ex("same text!", "pos", 3, "d.csv"), ex("other", "neg", 40, "d.csv")]
    test = [ex("other", "neg", 5, "d.csv"), ex("Same text", "pos", 60, "d.csv")]
    report = audit(make_splits(train, test=test))
    assert report["examples"]["duplicates"] == [
        {"at": "d.csv:40", "first": "d.csv:5", "text": "other"},
        {"at": "d.csv:60", "first": "d.csv:50", "text": "Same text"},
    ]
    assert report["examples"]["duplicates_normalised"] == [
        {"at": "d.csv:40", "first": "d.csv:5", "text": "other"},
        {"at": "d.csv:50", "first": "d.csv:3", "text": "Same text"},
        {"at": "d.csv:60", "first": "d.csv:3", "text": "Same text"},
    ]
    # separate files: the train file comes first (the order the files were given), whatever the line numbers
    files = make_splits([ex("x y", "pos", 9, "train.csv")], test=[ex("x y", "pos", 2, "test.csv")])
    files.files = {"train.csv": "a", "test.csv": "b"}
    assert audit(files)["examples"]["duplicates"] == [{"at": "test.csv:2", "first": "train.csv:9", "text": "x y"}]


def test_validation_test_overlap_is_counted_and_warned():
    splits = clean_splits()
    splits.validation = [ex("Shared between val and test", "pos", 2, "data/val.csv"), ex("only val", "neg", 3, "data/val.csv")]
    splits.test += [ex("shared between VAL and test!", "pos", 7, "data/test.csv")]
    report = audit(splits)
    assert report["validation_test_overlap"] == 1
    assert report["examples"]["validation_test_overlap"] == [{"at": "data/test.csv:7", "text": "shared between VAL and test!"}]
    (warning,) = warnings_with(report, "test texts also appear in validation")
    assert warning.startswith("1 test texts also appear in validation:") and "deduplicate" in warning
    assert audit(clean_splits())["validation_test_overlap"] == 0


def test_truncation_warning_at_the_models_limit_names_the_limit_not_max_length():
    splits = clean_splits()
    lengths = {"train": [10] * 100 + [900] * 20}
    (at_cap,) = warnings_with(audit(splits, lengths, max_length=512, model_limit=512), "are cut off")
    assert "--max-length" not in at_cap
    assert "model's limit of 512 tokens" in at_cap and "longer context" in at_cap and "split" in at_cap
    (below,) = warnings_with(audit(splits, lengths, max_length=128, model_limit=512), "are cut off")
    assert "raise --max-length" in below and "up to the model's limit of 512" in below
    (unknown,) = warnings_with(audit(splits, lengths, max_length=128), "are cut off")  # old calls: no limit known
    assert "raise --max-length" in unknown
