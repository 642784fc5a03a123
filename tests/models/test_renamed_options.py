"""Options renamed for one vocabulary still work for one release, with a DeprecationWarning naming the new name."""

import pytest

from memzoo.models import ModelConfig, build_mixer, build_model
from memzoo.models.layers.mom import MixtureOfMemories
from memzoo.models.layers.titans import TitansMemory


@pytest.mark.parametrize("name,old,new", [
    ("titans_mac", {"segment": 8}, {"segment_len": 8}),
    ("titans", {"p": 2.5, "error_map": "lp"}, {"error_p": 2.5, "error_map": "lp"}),
    ("titans", {"q": 3.0, "retention": "lq"}, {"retention_q": 3.0, "retention": "lq"}),
    ("titans", {"out_norm_gate": False}, {"use_gate": False}),
    ("mom", {"backend": "gla"}, {"update_rule": "gla"}),
])
def test_old_option_names_build_the_same_config(name, old, new):
    key = next(iter(k for k in old if k not in new))
    with pytest.warns(DeprecationWarning, match=f"'{key}' is now '{next(k for k in new if k not in old)}'"):
        before = build_mixer(name, 32, {"n_heads": 2, **old}).config
    assert before == build_mixer(name, 32, {"n_heads": 2, **new}).config
    # The same through a model config (a config.json written before the rename) and as keywords.
    with pytest.warns(DeprecationWarning):
        model = build_model(ModelConfig(vocab_size=16, d_model=32, n_layers=1, pattern=(name,),
                                        mixers={name: {"n_heads": 2, **old}}))
    assert model.blocks[0].mixer.config == before


def test_old_names_in_keywords_and_nested_memory_options():
    with pytest.warns(DeprecationWarning, match="'p' is now 'error_p'"):
        assert TitansMemory(d_model=32, n_heads=2, p=2.0).config.error_p == 2.0
    with pytest.warns(DeprecationWarning, match="'out_norm_gate' is now 'use_gate'"):
        layer = build_mixer("titans_mag", 32, {"n_heads": 2, "window": 4, "memory": {"out_norm_gate": False}})
    assert layer.memory.config.use_gate is False
    with pytest.raises(TypeError, match="'segment' is the old name of 'segment_len'"):
        build_mixer("titans_mac", 32, {"segment": 4, "segment_len": 4})


def test_the_old_mom_rule_value_is_the_gated_delta_mixer_name():
    with pytest.warns(DeprecationWarning, match="'gated_deltanet' is now 'gated_delta'"):
        layer = MixtureOfMemories(d_model=32, n_heads=2, update_rule="gated_deltanet")
    assert layer.config.update_rule == "gated_delta"
    with pytest.raises(ValueError, match="update_rule must be one of"):
        MixtureOfMemories(d_model=32, n_heads=2, update_rule="mamba")


def test_old_benchmark_names_warn_and_resolve_to_the_new_ones():
    import memzoo.eval as bench
    import memzoo.eval.config as bench_config

    with pytest.warns(DeprecationWarning, match="TrainConfig is now BenchTrainConfig"):
        assert bench.TrainConfig is bench.BenchTrainConfig
    with pytest.warns(DeprecationWarning, match="TrainConfig is now BenchTrainConfig"):
        assert bench_config.TrainConfig is bench.BenchTrainConfig
    with pytest.warns(DeprecationWarning, match="get_preset is now get_bench_preset"):
        assert bench.get_preset("mqar", "ci") == bench.get_bench_preset("mqar", "ci")
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        bench.Nope  # noqa: B018
