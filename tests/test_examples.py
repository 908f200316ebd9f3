"""The configs in examples/ stay valid: every key known, every value of the right type."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from safealign.merge.config import _check_parameters, _check_structure, parse_config
from safealign.retrain.cli import load_config
from safealign.retrain.regularizers import create
from safealign.retrain.settings import RetrainSettings

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("retrain_*.yaml")), ids=lambda p: p.name)
def test_retrain_examples_load_and_name_a_regularizer_with_valid_options(path):
    _, data, old = load_config(str(path))
    assert old == {}  # no former spellings
    settings = RetrainSettings.from_dict(data, where=str(path))
    assert create(settings.regularizer).name == settings.regularizer.split(":")[0]


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("merge_*.yaml")), ids=lambda p: p.name)
def test_merge_examples_parse_with_their_method_parameters(path):
    config = parse_config(yaml.safe_load(path.read_text()), str(path))
    assert _check_structure(config, config.method) + _check_parameters(config, config.method) == []
