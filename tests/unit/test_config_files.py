from pathlib import Path

import pytest

from gptforge.config import PRESETS, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_yaml_config_equals_preset(name):
    assert load_config(path=CONFIGS / f"{name}.yaml") == load_config(preset=name)
