from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from aesthetic_dask.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def test_default_yaml_lists_every_option_and_matches_the_reference_defaults():
    data = yaml.safe_load((REPO / "conf" / "default.yaml").read_text())
    assert set(data) == {f.name for f in fields(Config)}
    cfg = load_config()
    assert cfg.score_threshold == 0.5
    assert cfg.model_inference_batch_size == 32
    assert cfg.num_gpus_per_worker == 0.25
    assert cfg.verbose is False
    assert cfg.model_dir is None and cfg.resolved_model_dir.name == "aesthetic-dask"


def test_file_then_overrides_and_cli_aliases(tmp_path):
    f = tmp_path / "job.yaml"
    f.write_text("score_threshold: 4.5\nkeep_rejected: true\nmodel_dir: /models\n")
    cfg = load_config(f, threshold=6, batch_size=8, keep_rejected=None)
    assert cfg.score_threshold == 6.0 and isinstance(cfg.score_threshold, float)
    assert cfg.model_inference_batch_size == 8
    assert cfg.keep_rejected is True  # None override keeps the file's value
    assert cfg.resolved_model_dir == Path("/models")


@pytest.mark.parametrize(
    "text, message",
    [
        ("treshold: 5\n", "unknown option 'treshold'"),
        ("score_threshold: high\n", "option 'score_threshold' expects float"),
        ("- a\n- b\n", "expected a mapping"),
        ("verbose: [\n", "not valid YAML"),
        ("model_inference_batch_size: 0\n", r"model_inference_batch_size \(--batch-size\) must be >= 1"),
    ],
)
def test_bad_config_files_name_the_file_and_the_problem(tmp_path, text, message):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(f)


def test_unknown_override_and_missing_file():
    with pytest.raises(ConfigError, match="unknown option 'nope'"):
        load_config(nope=1)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config("/no/such/config.yaml")
