import pytest

from prism.config import PRESETS, ConfigError, PrismConfig, load_config


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_loads(name):
    cfg = load_config(name)
    assert isinstance(cfg, PrismConfig)
    assert cfg.to_dict()["model"] == "embedded"


def test_paper_preset_has_paper_settings():
    cfg = load_config("paper")
    assert cfg.queries.n_per_persona == 50
    assert cfg.answers.max_new_tokens == 512
    assert (cfg.distill.rank, cfg.distill.alpha, cfg.distill.top_k, cfg.distill.temperature) == (16, 32, 64, 2.0)
    assert cfg.distill.batch_size * cfg.distill.grad_accum == 16


def test_yaml_overrides_preset_and_flags_override_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("preset: paper\nqueries:\n  n_per_persona: 7\nplacement: user\n")
    cfg = load_config(config_file=f, overrides={"queries.n_per_persona": 3, "seed": None})
    assert cfg.queries.n_per_persona == 3  # flag wins
    assert cfg.placement == "user"  # from the file
    assert cfg.answers.max_new_tokens == 512  # from the file's preset


def test_unknown_key_is_rejected_with_its_name(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("queries:\n  n_per_persna: 7\n")
    with pytest.raises(ConfigError, match=r"queries\.n_per_persna"):
        load_config(config_file=f)


@pytest.mark.parametrize("text,match", [
    ("placement: middle\n", "placement"),
    ("dtype: float8\n", "dtype"),
    ("device: tpu\n", "device"),
    ("queries:\n  n_per_persona: 0\n", "n_per_persona"),
    ("judge:\n  kind: program\n", "judge.program"),
    ("- a\n- b\n", "mapping"),
    ("a: [1, 2\n", "not valid YAML"),
])
def test_bad_config_files_get_clear_errors(tmp_path, text, match):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        load_config(config_file=f)
    assert str(f) in str(info.value)


def test_unknown_preset_and_missing_file():
    with pytest.raises(ConfigError, match="unknown run preset 'fast'"):
        load_config("fast")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(config_file="/nonexistent/x.yaml")


def test_prefix_cache_is_a_speed_setting_and_infer_dtype_is_not(tmp_path):
    from prism.errors import RunError
    from prism.run import RunDir

    cfg = load_config("micro")
    assert cfg.prefix_cache is True and cfg.infer_dtype == "model"  # defaults: same results as before
    run = RunDir(tmp_path / "r")
    run.open(cfg, {})
    RunDir(tmp_path / "r").open(load_config("micro", overrides={"prefix_cache": False}), {})  # resumable
    with pytest.raises(RunError, match="infer_dtype"):
        RunDir(tmp_path / "r").open(load_config("micro", overrides={"infer_dtype": "bfloat16"}), {})
