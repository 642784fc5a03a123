"""The lm-eval adapter's methods against the model's own logits (no lm-eval task downloads)."""

import json

import pytest
import torch
import torch.nn.functional as F

import memzoo

lm_eval = pytest.importorskip("lm_eval", reason="the optional lm-eval extra is not installed")

from lm_eval.api.instance import Instance  # noqa: E402

from memzoo.integrations.lm_eval import MemzooLM  # noqa: E402


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return MemzooLM(model=memzoo.build_model("attention-tiny"), batch_size=3, max_length=64)


def _direct_logprob(model, context, continuation):
    ids = list((context + continuation).encode())
    n = len(continuation.encode())
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].float(), -1)
    return float(sum(logp[len(ids) - 1 - n + i, ids[len(ids) - n + i]] for i in range(n)))


def test_loglikelihood_matches_the_model(lm):
    pairs = [("The sky is", " blue"), ("ab", "c"), ("a much longer context here", " and more text")]
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    out = lm.loglikelihood(reqs, disable_tqdm=True)
    for (ctx, cont), (lp, greedy) in zip(pairs, out):
        assert lp == pytest.approx(_direct_logprob(lm.model, ctx, cont), abs=1e-4)
        assert isinstance(greedy, bool)


def test_loglikelihood_rolling_sums_every_token(lm):
    text = "hello memzoo, " * 12  # longer than max_length: several windows
    (total,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    ids = list(text.encode())
    # Window by window with the model itself: each token is scored once, the first from the EOT prefix.
    expect, pos = 0.0, 0
    full = [lm.eot_token_id] + ids
    while pos < len(ids):
        end = min(pos + 64, len(ids))
        ctx_start = max(0, end + 1 - 65)
        window = full[ctx_start : end + 1]
        with torch.no_grad():
            logp = F.log_softmax(lm.model(torch.tensor([window[:-1]])).logits[0].float(), -1)
        for j in range(pos, end):
            i = j + 1 - ctx_start
            expect += float(logp[i - 1, full[j + 1]])
        pos = end
    assert total == pytest.approx(expect, abs=1e-3)


def test_generate_until_is_greedy_and_stops(lm):
    ctx = "Once upon a time"
    (free,) = lm.generate_until([Instance("generate_until", {}, (ctx, {"max_gen_toks": 12}), 0)], True)
    ids = torch.tensor([list(ctx.encode())])
    ref = lm.model.generate(ids, max_new_tokens=12)[0, ids.shape[1] :].tolist()
    assert free == bytes(ref).decode("utf-8", errors="replace")
    stop = free[3:5] if len(free) >= 5 else free[-1:]
    (cut,) = lm.generate_until([Instance("generate_until", {}, (ctx, {"until": [stop], "max_gen_toks": 12}), 0)],
                               True)
    assert stop not in cut and free.startswith(cut)
    with pytest.raises(ValueError, match="greedy"):
        lm.generate_until([Instance("generate_until", {}, (ctx, {"do_sample": True, "temperature": 1.0}), 0)])


def test_registered_and_checked():
    from lm_eval.api.registry import get_model

    assert get_model("memzoo") is MemzooLM
    with pytest.raises(ValueError, match="exactly one"):
        MemzooLM()


# The documents as a local JSON-lines file read by datasets' packaged "json" builder: no hub, and the same YAML
# works across the lm-eval range (``custom_dataset`` would need a newer lm-eval than the extra's floor).
_TASK_ROWS = [{"context": "The sky is", "target": " blue", "choices": [" blue", " green"], "label": 0},
              {"context": "One two", "target": " three", "choices": [" four", " three"], "label": 1}]

_TASK_YAML = '''task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
output_type: {kind}
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_target: "{target}"
{extra}
metric_list:
  - metric: {metric}
    aggregation: mean
    higher_is_better: true
'''


def test_simple_evaluate_runs_locally_defined_tasks_offline(tmp_path, lm, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    data = tmp_path / "memzoo_tiny.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in _TASK_ROWS))
    where = {"data": json.dumps(str(data)), "cache": json.dumps(str(tmp_path / "hf-cache"))}
    (tmp_path / "mc.yaml").write_text(_TASK_YAML.format(**where, name="memzoo_tiny_mc", kind="multiple_choice",
                                                        target="{{label}}", extra='doc_to_choice: "{{choices}}"',
                                                        metric="acc"))
    gen = 'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 8\n  do_sample: false'
    (tmp_path / "gen.yaml").write_text(_TASK_YAML.format(**where, name="memzoo_tiny_gen", kind="generate_until",
                                                         target="{{target}}", extra=gen, metric="exact_match"))
    res = lm_eval.simple_evaluate(model=lm, tasks=["memzoo_tiny_mc", "memzoo_tiny_gen"],
                                  task_manager=TaskManager(include_path=str(tmp_path)))["results"]
    # The harness's multiple-choice accuracy is the adapter's own log-likelihood comparison.
    docs = [(r["context"], r["choices"], r["label"]) for r in _TASK_ROWS]
    expect = sum(max(range(2), key=lambda i, c=c, ch=ch: _direct_logprob(lm.model, c, ch[i])) == y
                 for c, ch, y in docs) / 2
    assert res["memzoo_tiny_mc"]["acc,none"] == pytest.approx(expect)
    assert 0.0 <= float(res["memzoo_tiny_gen"]["exact_match,none"]) <= 1.0
