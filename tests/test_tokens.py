"""fmtune.data.tokens: tokenise once, cached by content hash; truncation derived from the untruncated ids."""

from __future__ import annotations

import pytest

from fmtune.data import tokens
from fmtune.models import loading


@pytest.fixture(scope="module")
def tok(tiny_bert):
    return loading.load_tokenizer(tiny_bert)


TEXTS = ["good film", "the plot was very dull and the actor was weak but the scene was moving", "", "a b c d e f g h i j k l m n o p", "superb"]


def test_ids_equal_the_tokenizer_and_truncation_equals_its_own(tok, tmp_path):
    got = tokens.tokenise(tok, TEXTS, cache=tmp_path)
    assert got.ids == tok(TEXTS, add_special_tokens=True)["input_ids"] and got.lengths == [len(r) for r in got.ids]
    for max_length in (3, 6, 9, 64):
        assert tokens.truncate(tok, TEXTS, got.ids, max_length) == tok(TEXTS, truncation=True, max_length=max_length)["input_ids"]


def test_second_call_reads_the_cache_and_changes_make_new_keys(tok, tmp_path):
    first = tokens.tokenise(tok, TEXTS, cache=tmp_path)
    assert first.source == "tokenised" and (tmp_path / f"{first.key}.safetensors").is_file()
    again = tokens.tokenise(tok, TEXTS, cache=tmp_path)
    assert again.source == "cache" and again.ids == first.ids and again.key == first.key
    changed = tokens.tokenise(tok, TEXTS[:-1] + ["superb!"], cache=tmp_path)
    assert changed.source == "tokenised" and changed.key != first.key
    assert tokens.cache_key(tok, ["ab", "c"]) != tokens.cache_key(tok, ["a", "bc"])  # text boundaries are part of the key
    off = tokens.tokenise(tok, TEXTS, cache=tmp_path, use_cache=False)
    assert off.source == "tokenised, not cached" and off.ids == first.ids


def test_another_tokenizer_is_another_key(tok, tmp_path):
    from transformers import BertTokenizerFast

    vocab = tok.get_vocab()
    cased = BertTokenizerFast(vocab=vocab, do_lower_case=False, model_max_length=64)  # same vocabulary, other normaliser
    assert tokens.fingerprint(cased) != tokens.fingerprint(tok)
    assert tokens.tokenise(cased, TEXTS, cache=tmp_path).key != tokens.tokenise(tok, TEXTS, cache=tmp_path).key


def test_a_damaged_cache_file_is_a_miss_and_is_rewritten(tok, tmp_path):
    first = tokens.tokenise(tok, TEXTS, cache=tmp_path)
    path = tmp_path / f"{first.key}.safetensors"
    path.write_bytes(b"not safetensors")
    again = tokens.tokenise(tok, TEXTS, cache=tmp_path)
    assert again.source == "tokenised" and again.ids == first.ids
    assert tokens.tokenise(tok, TEXTS, cache=tmp_path).source == "cache"


def test_an_unwritable_cache_never_stops_tokenising(tok, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would go")
    got = tokens.tokenise(tok, TEXTS, cache=blocker / "tokens")
    assert got.source == "tokenised, not cached" and got.ids == tok(TEXTS)["input_ids"]


def test_empty_split(tok, tmp_path):
    got = tokens.tokenise(tok, [], cache=tmp_path)
    assert got.ids == [] and tokens.truncate(tok, [], got.ids, 8) == []
