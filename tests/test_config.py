from pathlib import Path

import pytest
import yaml

from fmtune.config import RunConfig, build_config, load_yaml, to_yaml
from fmtune.errors import ConfigError


def test_yaml_and_overrides_merge(tmp_path, reviews_csv):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"seed": 3, "data": {"data": str(reviews_csv), "text_column": "text"}, "train": {"epochs": 2, "method": "lora"}}))
    cfg = build_config(load_yaml(cfg_file), {"epochs": 5, "few_shot_k": 4})
    assert cfg.seed == 3 and cfg.train.epochs == 5 and cfg.train.method == "lora" and cfg.eval.few_shot_k == 4
    assert cfg.data.data == reviews_csv


def test_unknown_keys_are_named_with_suggestion(tmp_path, reviews_csv):
    with pytest.raises(ConfigError) as err:
        build_config({"data": {"data": str(reviews_csv), "text_colum": "x"}, "trian": {}}, {}, source="c.yaml")
    msg = str(err.value)
    assert "unknown key 'data.text_colum'" in msg and "Did you mean 'text_column'?" in msg
    assert "unknown key 'trian'" in msg and "Did you mean 'train'?" in msg


def test_every_problem_collected_once(tmp_path):
    with pytest.raises(ConfigError) as err:
        build_config(None, {"train": tmp_path / "missing.csv", "epochs": 0})
    msg = str(err.value)
    assert "'train.epochs' (--epochs)" in msg
    with pytest.raises(ConfigError) as err:
        build_config(None, {"train": tmp_path / "missing.csv"})
    msg = str(err.value)
    assert "--train needs --test" in msg and "missing.csv: file not found" in msg


def test_no_data_is_an_error():
    with pytest.raises(ConfigError, match="no data given"):
        build_config(None, {})


def test_yaml_syntax_error_names_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  data: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+"):
        load_yaml(bad)


def test_resolved_yaml_round_trips(reviews_csv):
    cfg = build_config(None, {"data": reviews_csv, "label_descriptions": {"pos": "good"}})
    again = RunConfig.model_validate(yaml.safe_load(to_yaml(cfg)))
    assert again == cfg


def test_shipped_example_configs_validate():
    examples = sorted(Path(__file__).parents[1].joinpath("examples").glob("*.yaml"))
    assert examples, "examples/*.yaml should exist"
    for path in examples:
        raw = load_yaml(path)
        data = raw.get("data", {})
        for key in ("data", "train", "validation", "test"):
            data.pop(key, None)  # example paths point at the user's files
        cfg = RunConfig.model_validate({**raw, "data": data})
        assert cfg.train.method in ("full", "lora")
