import json
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from aesthetic_dask.config import Config, ConfigError, load_config
from conftest import assert_one_clear_line, run_cli_process
from crafted import yaml_alias_bomb

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


def test_a_yaml_alias_bomb_is_refused_in_one_line_before_it_expands(tmp_path):
    """Nine levels of aliases in 864 bytes expand to 10^9 values: aliases are refused when met."""
    bomb = yaml_alias_bomb(9)
    f = tmp_path / "bomb.yaml"
    f.write_text(bomb)
    assert len(bomb) < 1000
    with pytest.raises(ConfigError, match=r"bomb.yaml: line 3: YAML aliases \(\*a0\) are not accepted in a config"):
        load_config(f)
    proc = run_cli_process(["score", str(tmp_path), "-o", str(tmp_path / "out"), "--config", str(f)])
    assert_one_clear_line(proc, 2, "YAML aliases (*a0) are not accepted")
    assert not (tmp_path / "out").exists()


def test_secrets_are_masked_at_any_depth_under_any_name():
    from aesthetic_dask.storage import redact, without_bound

    options = {
        "key": "AKIA1", "secret": "s1", "anon": False, "endpoint_url": "https://user:hunter2@store.example:9000/x",
        "client_kwargs": {"region_name": "eu", "headers": {"Cookie": "c1", "X-Custom": "c2"}},
        "passphrase": "p1", "ssl_passphrase": ["p2", "p3"], "tokens": [{"id": "a", "value": "t1"}],
        "config_kwargs": {"retries": {"max_attempts": 2}}, "profiles": [{"name": "x", "session_token": "t2"}],
        "http_headers": [["Authorization", "Bearer t3"]],
    }
    shown = redact(options)
    text = json.dumps(shown)
    for secret in ("AKIA1", "s1", "hunter2", "c1", "c2", "p1", "p2", "p3", "t1", "t2", "t3"):
        assert secret not in text, secret
    assert shown["endpoint_url"] == "https://***@store.example:9000/x"
    assert shown["client_kwargs"] == {"region_name": "eu", "headers": {"Cookie": "***", "X-Custom": "***"}}
    assert shown["config_kwargs"] == {"retries": {"max_attempts": 2}} and shown["anon"] is False
    assert shown["profiles"] == [{"name": "x", "session_token": "***"}]
    cfg = load_config(storage_options=options)
    assert cfg.to_dict()["storage_options"] == shown and without_bound(cfg.storage_options) == options
