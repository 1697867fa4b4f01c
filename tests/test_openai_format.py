"""OpenAI's fine-tuning files train as they are: chat JSONL (system/developer messages, content parts, `weight` on
assistant messages) and preference JSONL (input.messages + preferred_output); tool calls are refused row by row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fmtune.config import DataConfig
from fmtune.data import pairs
from fmtune.errors import DataError

SYSTEM = {"role": "system", "content": "Marv is a factual chatbot that is also sarcastic."}
# the examples of OpenAI's fine-tuning guide (chat format, multi-turn with weights) and of its preference guide
CHAT = {"messages": [SYSTEM, {"role": "user", "content": "What's the capital of France?"},
                     {"role": "assistant", "content": "Paris, as if everyone doesn't know that already."}]}
WEIGHTED = {"messages": [SYSTEM, {"role": "user", "content": "What's the capital of France?"}, {"role": "assistant", "content": "Paris", "weight": 0},
                         {"role": "user", "content": "Can you be more sarcastic?"},
                         {"role": "assistant", "content": "Paris, as if everyone doesn't know that already.", "weight": 1}]}
LAST_WEIGHT_0 = {"messages": [{"role": "developer", "content": "Answer in one word."}, {"role": "user", "content": "Capital of Italy?"},
                              {"role": "assistant", "content": "Rome"}, {"role": "user", "content": "And Spain?"},
                              {"role": "assistant", "content": "Madrid, obviously.", "weight": 0}]}
PARTS = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Capital of "}, {"type": "text", "text": "Peru?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "Lima"}]}]}
PREFERENCE = {"input": {"messages": [{"role": "user", "content": "Hello, can you tell me how cold San Francisco is today?"}], "tools": [], "parallel_tool_calls": True},
              "preferred_output": [{"role": "assistant", "content": "Today in San Francisco, it is not quite cold as expected."}],
              "non_preferred_output": [{"role": "assistant", "content": "It is not particularly cold in San Francisco today."}]}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def every_pair(splits) -> list:
    return splits.train + splits.validation + splits.test


def test_chat_file_with_weights_developer_role_and_content_parts(tmp_path):
    data = write_jsonl(tmp_path / "openai.jsonl", [CHAT, WEIGHTED, LAST_WEIGHT_0, PARTS] * 5)
    assert pairs.detect_task(DataConfig(data=data)) == "generation"
    splits = pairs.load_pairs(DataConfig(data=data), 0)
    by_row = {p.row: p for p in every_pair(splits)}
    assert by_row[1].completion == CHAT["messages"][2]["content"] and by_row[1].messages[0] == ("system", SYSTEM["content"])
    weighted = by_row[2]
    assert weighted.completion == "Paris, as if everyone doesn't know that already." and weighted.messages[2] == ("assistant", "Paris")
    last0 = by_row[3]
    assert last0.completion == "Rome", "the last assistant message of weight 1 is the target; the weight-0 answer after it is not trained"
    assert last0.messages == (("system", "Answer in one word."), ("user", "Capital of Italy?")), "developer is OpenAI's system role"
    assert by_row[4].messages == (("user", "Capital of Peru?"),) and by_row[4].completion == "Lima"
    assert splits.after_target == 5 and splits.earlier_assistant == 0
    two_trained = {"messages": [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "A"}, {"role": "user", "content": "b?"},
                                {"role": "assistant", "content": "B"}]}
    s = pairs.load_pairs(DataConfig(data=write_jsonl(tmp_path / "multi.jsonl", [two_trained] * 10)), 0)
    assert s.earlier_assistant == 10, "earlier weight-1 answers (OpenAI trains them) are counted, so the audit can say so"


def test_preference_file_trains_on_the_preferred_output(tmp_path):
    data = write_jsonl(tmp_path / "dpo.jsonl", [PREFERENCE] * 10)
    assert pairs.detect_task(DataConfig(data=data)) == "generation"
    splits = pairs.load_pairs(DataConfig(data=data), 0)
    assert splits.preference_rows == 10
    p = every_pair(splits)[0]
    assert p.messages == (("user", PREFERENCE["input"]["messages"][0]["content"]),)
    assert p.completion == PREFERENCE["preferred_output"][0]["content"]


def test_tool_calls_and_bad_weights_name_the_line_and_the_fix(tmp_path):
    tool = {"messages": [{"role": "user", "content": "Weather in Paris?"},
                         {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
                         {"role": "tool", "tool_call_id": "c1", "content": "20C"}, {"role": "assistant", "content": "It is 20C."}]}
    bad_weight = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0.5}]}
    all_zero = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0}]}
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]},
                          {"role": "assistant", "content": "a cat"}]}
    no_input = {"input": {"text": "x"}, "preferred_output": [{"role": "assistant", "content": "y"}]}
    data = write_jsonl(tmp_path / "bad.jsonl", [CHAT, tool, bad_weight, all_zero, image])
    with pytest.raises(DataError) as err:
        pairs.load_pairs(DataConfig(data=data), 0)
    text = str(err.value)
    assert "bad.jsonl line 2, column 'messages': message 2 is a tool call" in text and "remove the tool turns" in text
    assert "bad.jsonl line 3, column 'messages': message 2 has weight 0.5; a weight is 0 or 1" in text
    assert "bad.jsonl line 4, column 'messages': every assistant message has weight 0" in text
    assert "bad.jsonl line 5, column 'messages': message 1 has content parts of type image_url" in text
    assert "line 1" not in text, "the good row is not blamed"
    with pytest.raises(DataError, match=r"dpo\.jsonl line 2, column 'input': no 'messages' list"):
        pairs.load_pairs(DataConfig(data=write_jsonl(tmp_path / "dpo.jsonl", [PREFERENCE, no_input] * 3)), 0)


def test_an_openai_chat_file_trains_as_it_is(tmp_path, monkeypatch):
    """A whole run on an OpenAI chat file with a tiny Llama: the audit says what the weights and preference rows meant."""
    import fmtune
    from test_generation import make_tiny_llama

    monkeypatch.chdir(tmp_path)
    llama = make_tiny_llama(tmp_path / "llama")
    rows = [{"messages": [SYSTEM, {"role": "user", "content": f"what colour is the {thing}"}, {"role": "assistant", "content": colour}]}
            for thing, colour in [("fox", "orange"), ("sky", "blue"), ("grass", "green"), ("snow", "white")] * 8]
    rows += [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "colour of coal"},
                           {"role": "assistant", "content": "black"}]}] * 4
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    result = fmtune.run(data=data, model=str(llama), out="runs/openai", epochs=1, curve=False, rungs=["zero_shot", "fine_tuned"], bootstrap=100,
                        latency_repeats=3, batch_size=8, quiet=True)
    report = result.report
    assert report["task"]["type"] == "generation" and report["data"]["train"] + report["data"]["validation"] + report["data"]["test"] == 36
    assert report["data"]["audit"]["earlier_assistant_turns"] == 4
    assert any("OpenAI's fine-tuning trains on too" in w for w in report["data"]["audit"]["warnings"])
    budget = next(c for c in report["choices"] if c["setting"] == "max_new_tokens")
    assert budget["value"] == report["task"]["max_new_tokens"] == 4 and "derived from the" in budget["why"], "one-word answers: a budget of 4 tokens, not 64"
