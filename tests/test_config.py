"""Config: every experiment composes and validates; bad keys, types and values fail clearly."""

from importlib import resources

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from moe_lm.config import register_configs, to_train_config
from moe_lm.errors import ConfigError

register_configs()
EXPERIMENTS = sorted(p.name[:-5] for p in (resources.files("moe_lm.conf") / "experiment").iterdir()
                     if p.name.endswith(".yaml"))


def compose_cfg(overrides):
    with initialize_config_module(config_module="moe_lm.conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_default_config_is_the_tiny_cpu_moe():
    cfg = to_train_config(compose_cfg([]))
    assert cfg.model.d_model == 256 and cfg.expert.num_experts == 8 and cfg.expert.top_k == 2
    assert cfg.data.path is None and cfg.data.tokenizer == "cl100k_base"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_file_composes_and_validates(name):
    cfg = compose_cfg([f"+experiment={name}"])
    to_train_config(cfg)


def test_unknown_key_fails_at_compose_time_naming_the_key():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as err:
        compose_cfg(["model.d_modle=128"])
    assert "d_modle" in str(err.value) + str(err.value.__cause__)


def test_wrong_type_fails_at_compose_time_naming_the_key():
    with pytest.raises((ConfigCompositionException, ValidationError)) as err:
        compose_cfg(["expert.top_k=two"])
    assert "top_k" in str(err.value) + str(err.value.__cause__)


@pytest.mark.parametrize("override, words", [
    ("expert.top_k=0", "expert.top_k"),
    ("expert.top_k=9", "expert.top_k"),
    ("model.n_heads=3", "n_heads"),
    ("trainer.stop_at=500", "stop_at"),
    ("expert.backend=cuda", "backend"),
    ("parallel.ep=3", "parallel.ep"),
])
def test_impossible_values_raise_config_error_saying_what_to_change(override, words):
    with pytest.raises(ConfigError) as err:
        to_train_config(compose_cfg([override]))
    assert words in str(err.value)
