from pathlib import Path

import pytest

from jaxllm import config as config_lib
from jaxllm.config import ConfigError

CONFIGS = sorted((Path(__file__).parent.parent / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.parent.name == "configs" and
                                  p.stem in ("tiny", "124m", "1b", "7b")], ids=lambda p: p.name)
def test_every_model_config_parses(path):
    cfg = config_lib.load(path)
    assert cfg.model.d_model > 0


def test_benchmark_shapes_match_benchmarks_md():
    c124 = config_lib.load(Path(__file__).parent.parent / "configs/124m.yaml")
    assert (c124.model.d_model, c124.model.n_layers, c124.model.n_heads, c124.model.d_ff, c124.model.vocab_size,
            c124.data.seq_len, c124.train.batch_size) == (768, 12, 12, 2048, 50304, 1024, 32)
    c1b = config_lib.load(Path(__file__).parent.parent / "configs/1b.yaml")
    assert (c1b.model.d_model, c1b.model.n_layers, c1b.model.n_heads, c1b.model.n_kv_heads, c1b.model.d_ff,
            c1b.model.vocab_size, c1b.data.seq_len, c1b.train.batch_size) == (2048, 16, 16, 8, 5632, 32000, 2048, 8)


def test_overrides_apply_and_parse_types():
    cfg = config_lib.load(None, ["optim.lr=3e-4", "train.steps=20", "model.tie_embeddings=false"])
    assert cfg.optim.lr == 3e-4 and cfg.train.steps == 20 and cfg.model.tie_embeddings is False


def test_misspelled_override_suggests_the_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr'.*did you mean optim.lr"):
        config_lib.load(None, ["optim.lrr=1e-3"])
    with pytest.raises(ConfigError, match=r"did you mean train.steps"):
        config_lib.load(None, ["train.step=5"])


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  d_modle: 64\n")
    with pytest.raises(ConfigError, match=r"'model.d_modle' in .*bad.yaml.*did you mean model.d_model"):
        config_lib.load(path)


def test_wrong_type_and_range_errors():
    with pytest.raises(ConfigError, match=r"'train.steps'.*expects int, got 'many'"):
        config_lib.load(None, ["train.steps=many"])
    with pytest.raises(ConfigError, match=r"train.steps=0 must be > 0"):
        config_lib.load(None, ["train.steps=0"])
    with pytest.raises(ConfigError, match=r"model.remat='some'.*none, full, save_matmuls"):
        config_lib.load(None, ["model.remat=some"])
    with pytest.raises(ConfigError, match=r"multiple of model.n_kv_heads"):
        config_lib.load(None, ["model.n_heads=4", "model.n_kv_heads=3"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"config file not found: .*nope.yaml"):
        config_lib.load(tmp_path / "nope.yaml")
    bad = tmp_path / "broken.yaml"
    bad.write_text("model:\n  d_model: [1,\n")
    with pytest.raises(ConfigError, match=r"broken.yaml:\d+: invalid YAML"):
        config_lib.load(bad)
