"""RULER S-NIAH text templates, length fitting, the string_match_all scorer, checkpoint loading."""

import json
import random
import re

import pytest
import torch

import memzoo
from memzoo.eval import cli
from memzoo.eval.text_niah import (
    NOISE_LINE,
    ByteTokenizer,
    TextNIAHConfig,
    evaluate_text_niah,
    load_checkpoint,
    load_checkpoint_and_tokenizer,
    make_sample,
    model_generate_fn,
    string_match_all,
)

TOK = ByteTokenizer()


def count(s):
    return len(TOK.encode(s))


@pytest.mark.parametrize("haystack", ["noise", "needle"])
@pytest.mark.parametrize("value_type", ["numbers", "uuids"])
def test_sample_template_and_length(haystack, value_type):
    cfg = TextNIAHConfig(lengths=(1024,), samples=1, haystack=haystack, value_type=value_type)
    s = make_sample(cfg, 1024, random.Random(0), count)
    key, (value,) = s["key"], s["outputs"]
    assert re.fullmatch(r"[a-z]+-[a-z]+", key)
    if value_type == "numbers":
        assert re.fullmatch(r"\d{7}", value)
    else:
        assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", value)
    t = s["input"]
    single = value_type[:-1]
    assert t.startswith(f"A special magic {single} is hidden within the following text. Make sure to memorize it. "
                        f"I will quiz you about the {single} afterwards.\n")
    assert t.endswith(f"\nWhat is the special magic {single} for {key} mentioned in the provided text?"
                      f" The special magic {single} for {key} mentioned in the provided text is")
    needle = f"One of the special magic {value_type} for {key} is: {value}."
    assert t.count(needle) == 1 and t.count(f" for {key} is:") == 1
    lines = t.split("\n")
    if haystack == "noise":
        assert set(lines[1:-1]) == {NOISE_LINE, needle}
    # The largest haystack that leaves room for the 128 generated tokens.
    assert s["tokens"] == count(t) <= 1024 - 128
    assert s["tokens"] > 1024 - 128 - count(NOISE_LINE + "\n") - 60


def test_requested_depths_place_the_needle():
    cfg = TextNIAHConfig(lengths=(2048,), samples=1, depths=(0.0, 0.5, 1.0))
    for depth in cfg.depths:
        s = make_sample(cfg, 2048, random.Random(1), count, depth)
        lines = s["input"].split("\n")[1:-1]
        at = next(i for i, line in enumerate(lines) if line.startswith("One of the special magic"))
        assert at == round(depth * s["n_lines"])


def test_string_match_all():
    assert string_match_all(["the number is 1234567."], [["1234567"]]) == 100.0
    assert string_match_all(["ABC-def", "nothing"], [["abc-DEF"], ["x"]]) == 50.0
    assert string_match_all(["a b"], [["a", "c"]]) == 50.0
    with pytest.raises(ValueError, match="predictions"):
        string_match_all(["a"], [])


def test_oracle_scores_100_and_random_model_runs(tmp_path):
    cfg = TextNIAHConfig(lengths=(400, 512), samples=3, max_new_tokens=16)

    def oracle(prompt, n):
        key = prompt.rsplit(" for ", 1)[1].split(" mentioned")[0]
        return " " + re.search(rf"for {key} is: (\d+)\.", prompt).group(1) + "."

    res = evaluate_text_niah(oracle, cfg, count)
    assert res["scores"] == {"length=400": 100.0, "length=512": 100.0}
    assert len(res["samples"]) == 6

    torch.manual_seed(0)
    model = memzoo.build_model("attention-tiny")
    res = evaluate_text_niah(model_generate_fn(model, TOK), cfg, count)
    assert all(0.0 <= v <= 100.0 for v in res["scores"].values())
    assert all(isinstance(r["prediction"], str) for r in res["samples"])


def _save_checkpoint(path, model):
    from safetensors.torch import save_file

    (path / "final").mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(path / "final" / "model.safetensors"))
    (path / "final" / "config.json").write_text(model.config.to_json())


def test_load_checkpoint_round_trip_and_cli(tmp_path):
    pytest.importorskip("safetensors")
    torch.manual_seed(0)
    model = memzoo.build_model("attention-tiny")
    _save_checkpoint(tmp_path / "run", model)
    loaded = load_checkpoint(tmp_path / "run")
    x = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(loaded(x).logits, model.eval()(x).logits)
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        load_checkpoint(tmp_path / "missing")

    out = tmp_path / "bench"
    rc = cli.main(["text_niah", "--checkpoint", str(tmp_path / "run"), "--lengths", "400", "--samples", "2",
                   "--max-new-tokens", "8", "--out", str(out), "--no-progress"])
    assert rc == 0
    (result,) = (out / "results").glob("text_niah-*.json")
    payload = json.loads(result.read_text())
    assert set(payload["scores"]) == {"length=400"} and payload["config"]["samples"] == 2
    assert len((out / "samples" / f"{payload['run_id']}.jsonl").read_text().splitlines()) == 2
    assert "text_niah" in (out / "results.csv").read_text()


def test_config_errors():
    with pytest.raises(ValueError, match="lengths"):
        TextNIAHConfig(lengths=(100,), max_new_tokens=128)
    with pytest.raises(ValueError, match="haystack"):
        TextNIAHConfig(haystack="essay")
    with pytest.raises(ValueError, match="too short"):
        make_sample(TextNIAHConfig(lengths=(200,), max_new_tokens=100), 200, random.Random(0), count)


@pytest.fixture(scope="module")
def trained_export(tmp_path_factory):
    """A real memzoo-train run (byte tokenizer, vocab padded to 320) trained for two steps through the CLI."""
    from memzoo.train.cli import main as train_main

    run = tmp_path_factory.mktemp("export") / "run"
    rc = train_main(["--preset", "tiny", "--model.d_model", "32", "--model.n_layers", "1", "--data.seq_len", "32",
                     "--train.micro_bs", "2", "--train.max_steps", "2", "--sched.warmup_steps", "1",
                     "--log.eval_every", "0", "--log.eval_iters", "1", "--log.progress", "false",
                     "--out_dir", str(run)])
    assert rc == 0
    return run


def test_text_niah_and_lm_eval_run_on_a_real_memzoo_train_export(trained_export, tmp_path):
    model, tok = load_checkpoint_and_tokenizer(trained_export)
    # The export's own tokenizer: memzoo-train's byte tokenizer, whose padded vocabulary (320) the model has.
    assert model.config.vocab_size == tok.vocab_size == 320 and tok.kind == "byte"
    out = tmp_path / "bench"
    rc = cli.main(["text_niah", "--checkpoint", str(trained_export), "--lengths", "400", "--samples", "1",
                   "--max-new-tokens", "4", "--out", str(out), "--no-progress"])
    assert rc == 0
    (result,) = (out / "results").glob("text_niah-*.json")
    assert set(json.loads(result.read_text())["scores"]) == {"length=400"}

    lm_eval = pytest.importorskip("lm_eval", reason="the optional lm-eval extra is not installed")
    del lm_eval
    from memzoo.integrations.lm_eval import MemzooLM

    lm = MemzooLM(checkpoint=str(trained_export), max_length=64)
    # memzoo-train separates documents with the tokenizer's EOS: that is the end-of-text token lm-eval sees.
    assert lm.eot_token_id == tok.eos_id == 257
    assert lm.tok_encode("hi") == [104, 105]


def test_a_model_too_small_for_the_tokenizer_is_refused(tmp_path):
    torch.manual_seed(0)
    model = memzoo.build_model(memzoo.ModelConfig(vocab_size=200, d_model=32, n_layers=1, pattern=("attention",)))
    _save_checkpoint(tmp_path / "run", model)
    with pytest.raises(ValueError, match="vocab_size=200 is smaller than the byte tokenizer's 256 ids"):
        load_checkpoint_and_tokenizer(tmp_path / "run")
