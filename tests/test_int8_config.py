"""``Int8Config``: its validation, the settings "auto" resolves to on each kind of CPU, and why."""
import pytest

from lrlightning import Int8Config
from lrlightning.deploy.int8_config import AUTO_CHOICES


@pytest.mark.parametrize(("path", "weights"), [("avx2", "reduced"), ("none", "reduced"), ("vnni", "full"),
                                               ("amx", "full")])
def test_auto_resolves_by_how_the_cpu_runs_int8(path, weights):
    resolved = Int8Config().resolved(path)
    assert (resolved.weight_range, resolved.activations) == (weights, "uint8")
    assert Int8Config().why(path) == f"int8 path {path}: {AUTO_CHOICES[path][2]}"
    assert resolved.layers == "measured" and resolved.per_channel is True  # the rest is kept


def test_an_explicit_setting_overrides_the_cpu_choice_and_says_so():
    asked = Int8Config(weight_range="full", activations="int8")
    assert asked.resolved("avx2") == Int8Config("full", "int8")
    assert asked.why("avx2").endswith("; asked for weight_range='full', activations='int8'")
    assert Int8Config(weight_range="reduced").resolved("amx").weight_range == "reduced"


def test_a_mapping_builds_the_config_as_a_config_node_does(tmp_path):
    config = Int8Config.of({"layers": "all", "float_layers": ["fc", "layer1.0.conv1"], "cache": tmp_path,
                            "remeasure": None})
    assert config == Int8Config(layers="all", float_layers=("fc", "layer1.0.conv1"), cache=str(tmp_path))
    assert Int8Config.of(None) == Int8Config() and Int8Config.of(config) is config
    assert Int8Config(float_layers="fc").float_layers == ("fc",)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"weight_range": "7bit"}, r"`Int8Config.weight_range` must be one of \('auto', 'full', 'reduced'\), got '7bit'"),
    ({"activations": "fp8"}, r"`Int8Config.activations` must be one of \('auto', 'uint8', 'int8'\), got 'fp8'"),
    ({"layers": "thin"}, r"`Int8Config.layers` must be one of \('measured', 'all'\), got 'thin'"),
    ({"per_channel": 1}, r"`Int8Config.per_channel` must be a bool, got 1"),
    ({"remeasure": "yes"}, r"`Int8Config.remeasure` must be a bool, got 'yes'"),
    ({"float_layers": ["fc", ""]}, r"`Int8Config.float_layers` must be a list of module names, got \['fc', ''\]"),
    ({"cache": 3}, r"`Int8Config.cache` must be a directory path, got 3"),
])
def test_bad_settings_are_named_with_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Int8Config(**kwargs)


def test_a_mapping_with_an_unknown_key_or_another_type_is_refused():
    with pytest.raises(ValueError, match=r"`deploy.int8` has unknown keys \['bits'\]; allowed: weight_range, "
                                         r"activations, per_channel, layers, float_layers, cache, remeasure"):
        Int8Config.of({"bits": 4}, "deploy.int8")
    with pytest.raises(ValueError, match=r"`config` must be an Int8Config or a mapping of its fields, got 'all'"):
        Int8Config.of("all", "config")
