"""Names a user types: every mixer and wrapper by class name from ``memzoo``, both preset sets listed by
``python -m memzoo``, and every unknown name answered with the nearest known ones."""

import pytest

import memzoo
from memzoo.__main__ import main as memzoo_main
from memzoo.eval.presets import get_bench_preset as bench_preset
from memzoo.models.registry import build_mixer
from memzoo.models.wrappers.base import WRAPPERS
from memzoo.train import ConfigError, resolve_config, train_presets


def test_every_mixer_and_wrapper_importable_by_class_name():
    for name, cls in memzoo.MIXERS.items():
        assert getattr(memzoo, cls.__name__) is cls, name
        assert getattr(memzoo, cls.config_class.__name__) is cls.config_class, name
        assert cls.__name__ in memzoo.__all__
    for cls in (*WRAPPERS.values(), memzoo.DiscreteKVBottleneck):
        assert getattr(memzoo, cls.__name__) is cls and cls.__name__ in memzoo.__all__


@pytest.mark.parametrize("call, match", [
    (lambda: build_mixer("gatd_delta", 32), r"unknown mixer 'gatd_delta' \(did you mean 'gated_delta'\?\)"),
    (lambda: memzoo.build_model("attention-tiy"), r"model preset 'attention-tiy' \(did you mean 'attention-tiny'"),
    (lambda: memzoo.build_model("titans-tiny"), r"memzoo-train presets with a similar name: 'tiny-titans'"),
    (lambda: memzoo.build_model("tiny-attention"), r"'tiny-attention' is a memzoo-train preset .*resolve_config"),
    (lambda: resolve_config("tiny-titan"), r"unknown training preset 'tiny-titan' \(did you mean 'tiny-titans'"),
    (lambda: resolve_config("attention-tiny"), r"'attention-tiny' is a model preset .*--model\.preset attention-tiny"),
    (lambda: resolve_config("tiny", overrides={"model.preset": "attention-tin"}),
     r"model\.preset: unknown model preset 'attention-tin' \(did you mean 'attention-tiny'"),
    (lambda: bench_preset("mqar", "cj"), r"unknown mqar preset 'cj' \(did you mean 'ci'\?\)"),
], ids=["mixer", "model-preset", "model-preset-swapped", "recipe-as-model", "train-preset", "model-as-recipe",
        "model-preset-option", "bench-preset"])
def test_unknown_names_suggest_the_nearest(call, match):
    with pytest.raises((ValueError, ConfigError), match=match):
        call()


def test_python_m_memzoo_lists_both_preset_sets(capsys):
    memzoo_main()
    out = capsys.readouterr().out
    shapes, recipes = out.split("model presets:", 1)[1].split("training presets:", 1)
    assert all(f"  {name} " in shapes for name in memzoo.PRESETS)
    assert all(f"  {name} " in recipes for name in train_presets())
    assert "tiny-attention" not in shapes and "attention-tiny" not in recipes
