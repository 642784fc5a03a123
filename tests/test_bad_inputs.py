"""Bad inputs to every public model entry point: one table, each case a clear error naming the argument.

Each row is ``(id, call, exception type, pattern)``: ``call(env)`` must raise exactly that type (or a subclass)
and the message must match ``pattern``, which always contains the argument's name and what was expected.
The per-mixer edges (state=None in step, B=0, T=1, dtype, states of other mixers and sizes) run for every
registered mixer and variant in tests/models/test_contract.py; this table covers the models around them
(LanguageModel, HMT, LongMem), the mixers' entry points with the arguments not shared by that suite, and both
command lines (memzoo-train's options, memzoo-bench's usage errors, exit status 2, turned into a ``ValueError``).
The Hugging Face classes are tested in tests/integrations.
"""

import contextlib
import io
from types import SimpleNamespace

import pytest
import torch

from memzoo.eval.cli import main as bench_main
from memzoo.models import MIXERS as MIXER_CLASSES
from memzoo.models import LanguageModel, ModelConfig, build_mixer, index_state
from memzoo.models.wrappers import HMT, HMTConfig, LongMem, LongMemConfig
from memzoo.train.cli import parse_train_args
from memzoo.train.config import ConfigError

V, D = 50, 16


@pytest.fixture(scope="module")
def env():
    torch.manual_seed(0)
    lm_cfg = ModelConfig(vocab_size=V, d_model=D, n_layers=2, pattern=("attention", "gated_delta"),
                         mixers={"attention": {"n_heads": 2}, "gated_delta": {"n_heads": 2}}, d_ff=32)
    lm = LanguageModel(lm_cfg).eval()
    other = LanguageModel(ModelConfig(vocab_size=V, d_model=D, n_layers=2, pattern=("s4d",), d_ff=32)).eval()
    hmt = HMT(LanguageModel(lm_cfg), HMTConfig(segment_len=6, n_sensory=2, cache_size=3, recall_dim=8)).eval()
    hmt_other = HMT(LanguageModel(lm_cfg), HMTConfig(segment_len=6, n_sensory=2, cache_size=4, recall_dim=8))
    lm_mem = LongMem(LanguageModel(ModelConfig(vocab_size=V, d_model=D, n_layers=2, pattern=("attention",),
                                               mixers={"attention": {"n_heads": 2}}, d_ff=32)),
                     LongMemConfig(segment_len=8, capacity=16, chunk_size=4, n_chunks=2)).eval()
    lm_mem_other = LongMem(LanguageModel(ModelConfig(vocab_size=V, d_model=D, n_layers=2, pattern=("attention",),
                                                     mixers={"attention": {"n_heads": 2}}, d_ff=32)),
                           LongMemConfig(segment_len=8, capacity=32, chunk_size=4, n_chunks=2)).eval()
    ids = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(1))
    mixers = {name: build_mixer(name, D).eval() for name in ("attention", "gated_delta", "s4d", "titans_mac")}
    return SimpleNamespace(lm=lm, other=other, hmt=hmt, hmt_other=hmt_other, longmem=lm_mem,
                           longmem_other=lm_mem_other, ids=ids,
                           x=torch.randn(2, 5, D), mixers=mixers)


def _lm_cases():
    return [
        ("lm-ids-float", lambda e: e.lm(e.ids.float()), TypeError, r"input_ids must hold integer token ids"),
        ("lm-ids-bool", lambda e: e.lm(e.ids > 3), TypeError, r"input_ids must hold integer token ids"),
        ("lm-ids-list", lambda e: e.lm(e.ids.tolist()), TypeError, r"input_ids must be a torch.Tensor"),
        ("lm-ids-1d", lambda e: e.lm(e.ids[0]), ValueError, r"input_ids must have shape \[B, T\]"),
        ("lm-ids-T0", lambda e: e.lm(e.ids[:, :0]), ValueError, r"input_ids must have shape \[B, T\] with B, T >= 1"),
        ("lm-ids-B0", lambda e: e.lm(e.ids[:0]), ValueError, r"input_ids must have shape \[B, T\] with B, T >= 1"),
        ("lm-ids-too-large", lambda e: e.lm(e.ids + V), ValueError, r"input_ids must be in \[0, vocab_size=50\)"),
        ("lm-ids-negative", lambda e: e.lm(e.ids - V), ValueError, r"input_ids must be in \[0, vocab_size=50\)"),
        ("lm-ids-and-embeds", lambda e: e.lm(e.ids, inputs_embeds=torch.randn(2, 7, D)), ValueError,
         r"exactly one of input_ids and inputs_embeds"),
        ("lm-embeds-int", lambda e: e.lm(inputs_embeds=torch.ones(2, 7, D, dtype=torch.long)), TypeError,
         r"inputs_embeds must be a floating-point tensor"),
        ("lm-embeds-width", lambda e: e.lm(inputs_embeds=torch.randn(2, 7, D + 1)), ValueError,
         r"inputs_embeds must have shape \[B, T, D=16\]"),
        ("lm-embeds-bf16", lambda e: e.lm(inputs_embeds=torch.randn(2, 7, D, dtype=torch.bfloat16)), TypeError,
         r"x must have the dtype of Attention's weights \(torch.float32\), got torch.bfloat16"),
        ("lm-labels-shape", lambda e: e.lm(e.ids, labels=e.ids[:, 1:]), ValueError,
         r"labels must be an integer tensor shaped like the input \[B, T\] = \[2, 7\]"),
        ("lm-labels-float", lambda e: e.lm(e.ids, labels=e.ids.float()), ValueError, r"labels must be an integer"),
        ("lm-labels-bool", lambda e: e.lm(e.ids, labels=e.ids > 3), ValueError,
         r"labels must be an integer tensor .* got \(2, 7\) torch.bool"),
        ("lm-labels-range", lambda e: e.lm(e.ids, labels=e.ids + V), ValueError,
         r"labels must be in \[0, vocab_size=50\) or -100"),
        ("lm-labels-negative", lambda e: e.lm(e.ids, labels=e.ids.masked_fill(e.ids > 0, -1)), ValueError,
         r"labels must be in \[0, vocab_size=50\) or -100"),
        ("lm-logits-to-keep-negative", lambda e: e.lm(e.ids, logits_to_keep=-1), ValueError,
         r"logits_to_keep must be an int >= 0"),
        ("lm-logits-to-keep-float", lambda e: e.lm(e.ids, logits_to_keep=1.5), ValueError,
         r"logits_to_keep must be an int >= 0"),
        ("lm-logits-to-keep-with-labels", lambda e: e.lm(e.ids, labels=e.ids, logits_to_keep=1), ValueError,
         r"labels and logits_to_keep"),
        ("lm-state-not-tuple", lambda e: e.lm(e.ids, state=torch.zeros(2)), ValueError,
         r"state must be a tuple of 2 layer states"),
        ("lm-state-too-few", lambda e: e.lm(e.ids, state=e.lm.init_state(2)[:1]), ValueError,
         r"state must be a tuple of 2 layer states"),
        ("lm-state-batch", lambda e: e.lm(e.ids, state=e.lm.init_state(3)), ValueError,
         r"state has batch size 3, but the input has 2"),
        ("lm-state-other-model", lambda e: e.lm(e.ids, state=e.other.init_state(2)), ValueError,
         r"state\[0\] must be an AttentionState for this Attention.*got S4DState"),
        ("lm-state-swapped-layers", lambda e: e.lm(e.ids, state=e.lm.init_state(2)[::-1]), ValueError,
         r"state\[0\] must be an AttentionState .*got GatedDeltaState"),
        ("lm-cu-seqlens-batch", lambda e: e.lm(e.ids, cu_seqlens=torch.tensor([0, 7])), ValueError,
         r"with cu_seqlens the batch must be packed into B=1"),
        ("lm-cu-seqlens-float", lambda e: e.lm(e.ids[:1], cu_seqlens=torch.tensor([0.0, 7.0])), TypeError,
         r"cu_seqlens must be a 1-D int32/int64 tensor"),
        ("lm-cu-seqlens-end", lambda e: e.lm(e.ids[:1], cu_seqlens=torch.tensor([0, 3, 6])), ValueError,
         r"cu_seqlens must start at 0 and end at the sequence length 7"),
        ("lm-cu-seqlens-decreasing", lambda e: e.lm(e.ids[:1], cu_seqlens=torch.tensor([0, 5, 3, 7])), ValueError,
         r"cu_seqlens must be non-decreasing"),
        ("lm-step-token-2d", lambda e: e.lm.step(e.ids, None), ValueError, r"token must have shape \[B\]"),
        ("lm-step-token-range", lambda e: e.lm.step(e.ids[:, 0] + V, None), ValueError,
         r"token must be in \[0, vocab_size=50\)"),
        ("lm-step-state-other-model", lambda e: e.lm.step(e.ids[:, 0], e.other.init_state(2)), ValueError,
         r"state\[0\] must be an AttentionState"),
        ("lm-generate-prompt-range", lambda e: e.lm.generate(e.ids + V, 2), ValueError,
         r"input_ids must be in \[0, vocab_size=50\)"),
        ("lm-generate-prompt-range-zero-new", lambda e: e.lm.generate(e.ids + V, 0), ValueError,
         r"input_ids must be in \[0, vocab_size=50\)"),
        ("lm-generate-prompt-float", lambda e: e.lm.generate(e.ids.float(), 0), TypeError,
         r"input_ids must hold integer token ids"),
        ("lm-generate-negative-new", lambda e: e.lm.generate(e.ids, -1), ValueError,
         r"max_new_tokens must be an int >= 0"),
        ("lm-generate-float-new", lambda e: e.lm.generate(e.ids, 2.5), ValueError,
         r"max_new_tokens must be an int >= 0"),
        ("lm-generate-temperature", lambda e: e.lm.generate(e.ids, 2, temperature=-1.0), ValueError,
         r"temperature must be >= 0"),
        ("lm-generate-top-k", lambda e: e.lm.generate(e.ids, 2, temperature=1.0, top_k=0), ValueError,
         r"top_k must be >= 1"),
        ("lm-generate-top-p", lambda e: e.lm.generate(e.ids, 2, temperature=1.0, top_p=1.5), ValueError,
         r"top_p must be in \(0, 1\]"),
        ("lm-ids-uint8", lambda e: e.lm(e.ids.to(torch.uint8)), TypeError,
         r"input_ids must hold integer token ids \(int64 or int32\), got torch.uint8"),
        ("lm-generate-temperature-str", lambda e: e.lm.generate(e.ids, 2, temperature="1"), ValueError,
         r"temperature must be >= 0 \(a number\), got '1'"),
        ("lm-generate-eos-out-of-vocab", lambda e: e.lm.generate(e.ids, 2, eos_token_id=V), ValueError,
         r"eos_token_id must be a token id in \[0, vocab_size=50\), got 50"),
        ("lm-config-d-model-str", lambda e: ModelConfig(vocab_size=V, d_model="16"), TypeError,
         r"ModelConfig: d_model must be an int, got '16'"),
        ("lm-config-tie-int", lambda e: ModelConfig(vocab_size=V, tie_embeddings=1), TypeError,
         r"ModelConfig: tie_embeddings must be a bool, got 1"),
        ("lm-config-vocab-bool", lambda e: ModelConfig(vocab_size=True), TypeError,
         r"ModelConfig: vocab_size must be an int, got True"),
        ("mixer-keyword-type", lambda e: MIXER_CLASSES["attention"](d_model=D, n_heads=2.0), TypeError,
         r"Attention: n_heads must be an int, got 2.0"),
        ("lm-config-not-modelconfig", lambda e: LanguageModel({"vocab_size": V}), TypeError,
         r"config must be a ModelConfig"),
    ]


def _hmt_cases():
    return [
        ("hmt-ids-too-large", lambda e: e.hmt(e.ids + V), ValueError, r"input_ids must be in \[0, vocab_size=50\)"),
        ("hmt-ids-negative", lambda e: e.hmt(e.ids - 1 - e.ids), ValueError,
         r"input_ids must be in \[0, vocab_size=50\)"),
        ("hmt-ids-float", lambda e: e.hmt(e.ids.float()), TypeError, r"input_ids must hold integer token ids"),
        ("hmt-ids-B0", lambda e: e.hmt(e.ids[:0]), ValueError, r"input_ids must have shape \[B, T\] with B, T >= 1"),
        ("hmt-labels-bool", lambda e: e.hmt(e.ids, labels=e.ids > 3), ValueError, r"labels must be an integer"),
        ("hmt-labels-range", lambda e: e.hmt(e.ids, labels=e.ids + V), ValueError,
         r"labels must be in \[0, vocab_size=50\)"),
        ("hmt-labels-shape", lambda e: e.hmt(e.ids, labels=e.ids[:1]), ValueError, r"labels must be an integer"),
        ("hmt-cu-seqlens", lambda e: e.hmt(e.ids[:1], cu_seqlens=torch.tensor([0, 7])), ValueError,
         r"HMT does not take cu_seqlens"),
        ("hmt-state-lm", lambda e: e.hmt(e.ids, state=e.lm.init_state(2)), TypeError, r"state must be an HMTState"),
        ("hmt-state-other-cache", lambda e: e.hmt(e.ids, state=e.hmt_other.init_state(2)), ValueError,
         r"state does not fit this HMT: cache .* expected \[B, 3, 16\]"),
        ("hmt-state-batch", lambda e: e.hmt(e.ids, state=e.hmt.init_state(3)), ValueError,
         r"state has batch size 3, but the input has 2"),
        ("hmt-generate-prompt-range", lambda e: e.hmt.generate(e.ids + V, 2), ValueError,
         r"input_ids must be in \[0, vocab_size=50\)"),
        ("hmt-generate-prompt-range-zero-new", lambda e: e.hmt.generate(e.ids + V, 0), ValueError,
         r"input_ids must be in \[0, vocab_size=50\)"),
        ("hmt-generate-negative-new", lambda e: e.hmt.generate(e.ids, -2), ValueError,
         r"max_new_tokens must be an int >= 0"),
        ("hmt-reset-mask-int", lambda e: e.hmt.reset_state(e.hmt.init_state(2), torch.tensor([1, 0])), ValueError,
         r"mask must be a bool tensor \[B=2\]"),
    ]


def _longmem_cases():
    return [
        ("longmem-ids-too-large", lambda e: e.longmem(e.ids + V), ValueError,
         r"input_ids must be in \[0, vocab_size=50\)"),
        ("longmem-ids-float", lambda e: e.longmem(e.ids.float()), TypeError, r"input_ids must hold integer token ids"),
        ("longmem-labels-bool", lambda e: e.longmem(e.ids, labels=e.ids > 3), ValueError,
         r"labels must be an integer"),
        ("longmem-labels-range", lambda e: e.longmem(e.ids, labels=e.ids + V), ValueError,
         r"labels must be in \[0, vocab_size=50\)"),
        ("longmem-cu-seqlens", lambda e: e.longmem(e.ids[:1], cu_seqlens=torch.tensor([0, 7])), ValueError,
         r"LongMem does not take cu_seqlens"),
        ("longmem-state-lm", lambda e: e.longmem(e.ids, state=e.lm.init_state(2)), TypeError,
         r"state must be a LongMemState"),
        ("longmem-state-other-capacity", lambda e: e.longmem(e.ids, state=e.longmem_other.init_state(2)),
         ValueError, r"state.bank does not fit this LongMem: keys \(2, \d+, 32, \d+\), expected \(2, \d+, 16"),
        ("longmem-state-batch", lambda e: e.longmem(e.ids, state=e.longmem.init_state(3)), ValueError,
         r"state has batch size 3, but the input has 2"),
        ("longmem-generate-prompt-range-zero-new", lambda e: e.longmem.generate(e.ids + V, 0), ValueError,
         r"input_ids must be in \[0, vocab_size=50\)"),
        ("longmem-generate-negative-new", lambda e: e.longmem.generate(e.ids, -1), ValueError,
         r"max_new_tokens must be an int >= 0"),
    ]


def _mixer_cases():
    cases = []
    for name in ("attention", "gated_delta", "s4d", "titans_mac"):
        cases += [
            (f"{name}-x-list", lambda e, n=name: e.mixers[n](e.x.tolist()), TypeError, r"x must be a torch.Tensor"),
            (f"{name}-x-complex", lambda e, n=name: e.mixers[n](e.x.to(torch.complex64)), TypeError,
             r"x must be a floating-point tensor"),
            (f"{name}-x-bf16", lambda e, n=name: e.mixers[n](e.x.bfloat16()), TypeError,
             r"x must have the dtype of \w+'s weights \(torch.float32\), got torch.bfloat16"),
            (f"{name}-x-fp64", lambda e, n=name: e.mixers[n](e.x.double()), TypeError,
             r"x must have the dtype of \w+'s weights \(torch.float32\), got torch.float64"),
            (f"{name}-step-x-3d", lambda e, n=name: e.mixers[n].step(e.x, None), ValueError,
             r"x_t must have shape \[B, D\] with D=16"),
            (f"{name}-step-B0", lambda e, n=name: e.mixers[n].step(e.x[:0, 0], None), ValueError,
             r"x_t must hold at least one sequence \(B >= 1\)"),
            (f"{name}-state-tensor", lambda e, n=name: e.mixers[n](e.x, torch.zeros(2, 3)), ValueError,
             r"state must be an? \w+State for this"),
            (f"{name}-state-truncated", lambda e, n=name: e.mixers[n](e.x, tuple(e.mixers[n].init_state(2))[:-1]),
             ValueError, r"state must be an? \w+State for this"),
            (f"{name}-state-leaf-int",
             lambda e, n=name: e.mixers[n](e.x, _retype_first_float(e.mixers[n].init_state(2))), ValueError,
             r"state\.[\w.\[\]]+ must be a float tensor"),
            (f"{name}-x-other-device", lambda e, n=name: e.mixers[n](torch.randn(2, 5, D, device="meta")), ValueError,
             r"x is on meta, but \w+'s weights are on cpu"),
            (f"{name}-state-other-device",
             lambda e, n=name: e.mixers[n](e.x, e.mixers[n].init_state(2, device="meta")), ValueError,
             r"state is on meta, but the input is on cpu"),
            (f"{name}-init-state-zero", lambda e, n=name: e.mixers[n].init_state(0), ValueError,
             r"batch_size must be an int >= 1, got 0"),
            (f"{name}-init-state-float", lambda e, n=name: e.mixers[n].init_state(1.5), ValueError,
             r"batch_size must be an int >= 1, got 1.5"),
            (f"{name}-reset-mask-list", lambda e, n=name: e.mixers[n].reset_state(e.mixers[n].init_state(2),
                                                                                  [True, False]),
             ValueError, r"mask must be a bool tensor \[B=2\], got list"),
            (f"{name}-reset-state-none", lambda e, n=name: e.mixers[n].reset_state(None, torch.tensor([True])),
             ValueError, r"state must be a state of this \w+ .* got None"),
            (f"{name}-reset-foreign-state", lambda e, n=name: e.mixers[n].reset_state(
                build_mixer("lssl", D).init_state(2), torch.tensor([True, False])), ValueError,
             r"state must be an? \w+State for this"),
            (f"{name}-index-state-out-of-range", lambda e, n=name: index_state(e.mixers[n].init_state(2),
                                                                                torch.tensor([0, 2])),
             ValueError, r"index must select rows of the state's batch of 2, got values in \[0, 2\]"),
            (f"{name}-index-state-float", lambda e, n=name: index_state(e.mixers[n].init_state(2), torch.tensor([0.0])),
             TypeError, r"index must be a 1-D int32/int64 tensor"),
            (f"{name}-config-d-model-str", lambda e, n=name: build_mixer(n, "32"), ValueError,
             r"bad options for mixer '\w+': mixer '\w+': d_model must be an int, got '32'"),
            (f"{name}-reset-mask-shape", lambda e, n=name: e.mixers[n].reset_state(e.mixers[n].init_state(2),
                                                                                   torch.tensor([True])),
             ValueError, r"mask must be a bool tensor \[B=2\]"),
        ]
    cases += [
        ("registry-unknown", lambda e: build_mixer("transformer", D), ValueError, r"unknown mixer 'transformer'"),
        ("registry-bad-option", lambda e: build_mixer("attention", D, {"heads": 2}), ValueError,
         r"bad options for mixer 'attention'"),
        ("registry-d-model-override", lambda e: build_mixer("attention", D, {"d_model": 8}), ValueError,
         r"mixer 'attention': d_model is set by the model"),
        ("titans-mag-gets-mal-state", lambda e: build_mixer("titans_mag", D)(e.x, build_mixer("titans_mal", D)
                                                                              .init_state(2)), ValueError,
         r"state must be a TitansMAGState for this TitansMAG.*got TitansMALState"),
    ]
    return cases


def _retype_first_float(state):
    """The state with its first floating leaf cast to int64 (a state saved or rebuilt with the wrong dtype)."""
    done = []

    def visit(t):
        if t is None or not isinstance(t, (torch.Tensor, tuple)):
            return t
        if isinstance(t, torch.Tensor):
            if t.is_floating_point() and not done:
                done.append(1)
                return t.long()
            return t
        parts = [visit(c) for c in t]
        return type(t)(*parts) if hasattr(t, "_fields") else tuple(parts)

    return visit(state)


def _resume_check(path):
    from pathlib import Path

    from memzoo.train.loop import _resume_from

    cfg, _ = parse_train_args(["--ckpt.resume", path])
    _resume_from(cfg, Path("/nonexistent/out"))


def _cli_cases():
    return [
        ("train-cli-positional", lambda e: parse_train_args(["model.safetensors"]), ConfigError,
         r"unexpected argument 'model.safetensors'"),
        ("train-cli-unknown-section", lambda e: parse_train_args(["--nope.steps", "3"]), ConfigError, r"nope"),
        ("train-cli-bad-int", lambda e: parse_train_args(["--train.steps", "many"]), ConfigError, r"steps"),
        ("train-cli-unknown-preset", lambda e: parse_train_args(["--preset", "no_such_preset"]), ConfigError,
         r"no_such_preset"),
        ("train-cli-unknown-mixer", lambda e: parse_train_args(["--model.pattern", "transformer"]), ConfigError,
         r"transformer"),
        ("train-cli-decode-errors", lambda e: parse_train_args(["--data.decode_errors", "ignore"]), ConfigError,
         r"data.decode_errors must be 'replace' or 'strict', got 'ignore'"),
        ("train-cli-resume-not-a-checkpoint", lambda e: _resume_check("/nonexistent/ckpt"), ConfigError,
         r"ckpt.resume '/nonexistent/ckpt' is not a complete memzoo checkpoint folder"),
    ]


def bench(*argv: str) -> None:
    """Run memzoo-bench's ``main``; exit status 2 (a usage error) becomes a ``ValueError`` with its stderr line."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = bench_main(list(argv))
        except SystemExit as e:  # argparse's own errors
            rc = e.code
    if rc == 2:
        raise ValueError(err.getvalue().strip().splitlines()[-1])
    raise AssertionError(f"memzoo-bench {' '.join(argv)} exited with {rc}, not a usage error")


def _bench_cases():
    return [
        ("bench-unknown-task", lambda e: bench("nope"), ValueError, r"argument task: invalid choice: 'nope'"),
        ("bench-unknown-preset", lambda e: bench("mqar", "--preset", "nope", "--dump-config"), ValueError,
         r"unknown mqar preset 'nope'"),
        ("bench-unknown-mixer", lambda e: bench("mqar", "--model", "transformer", "--dump-config"), ValueError,
         r"pattern: unknown mixer 'transformer'"),
        ("bench-d-model-text", lambda e: bench("mqar", "--d-model", "abc", "--dump-config"), ValueError,
         r"argument --d-model: expected comma-separated integers, got 'abc'"),
        ("bench-threads-negative", lambda e: bench("mqar", "--threads", "-1", "--dump-config"), ValueError,
         r"--threads must be >= 0 \(0 = one per core\), got -1"),
        ("bench-d-model-negative", lambda e: bench("mqar", "--d-model", "-8", "--dump-config"), ValueError,
         r"d_models must be positive"),
        ("bench-mixer-opts-list", lambda e: bench("mqar", "--mixer-opts", "[1]", "--dump-config"), ValueError,
         r"--mixer-opts must be a JSON object"),
        ("bench-mixer-opts-unknown", lambda e: bench("mqar", "--model", "attention", "--mixer-opts",
                                                     '{"attention": {"heads": 3}}', "--dump-config"), ValueError,
         r"bad options for mixer 'attention'.*'heads'"),
        ("bench-seeds-text", lambda e: bench("mqar", "--seeds", "x", "--dump-config"), ValueError,
         r"--seeds must be N or a comma-separated list of integers, got 'x'"),
        ("bench-seeds-zero", lambda e: bench("mqar", "--seeds", "0", "--dump-config"), ValueError,
         r"--seeds must be >= 1, got 0"),
        ("bench-lr-negative", lambda e: bench("mqar", "--lr", "-1", "--dump-config"), ValueError,
         r"lrs must be positive"),
        ("bench-kv-zero", lambda e: bench("mqar", "--kv", "0", "--dump-config"), ValueError, r"num_kv_pairs"),
        ("bench-kv-too-long", lambda e: bench("mqar", "--seq-len", "8", "--kv", "4", "--dump-config"), ValueError,
         r"--kv 4 does not fit --seq-len 8"),
        ("bench-epochs-zero", lambda e: bench("mqar", "--epochs", "0", "--dump-config"), ValueError,
         r"--epochs must be >= 1, got 0"),
        ("bench-n-layers-zero", lambda e: bench("mqar", "--n-layers", "0", "--dump-config"), ValueError,
         r"--n-layers must be >= 1, got 0"),
        ("bench-batch-size-negative", lambda e: bench("mqar", "--batch-size", "-1", "--dump-config"), ValueError,
         r"--batch-size must be >= 1, got -1"),
        ("bench-train-len-negative", lambda e: bench("niah", "--train-len", "-5", "--dump-config"), ValueError,
         r"--train-len must be >= 1"),
        ("bench-lr-sweep-zero", lambda e: bench("mqar", "--lr-sweep", "0", "--dump-config"), ValueError,
         r"--lr-sweep must be >= 1"),
        ("bench-vocab-too-small", lambda e: bench("mqar", "--vocab", "3", "--dump-config"), ValueError,
         r"vocab_size \(3\) must exceed"),
        ("bench-config-missing", lambda e: bench("mqar", "--config", "/nonexistent/cfg.json"), ValueError,
         r"--config '/nonexistent/cfg.json': no such file"),
        ("bench-config-and-preset", lambda e: bench("mqar", "--config", __file__, "--preset", "ci"), ValueError,
         r"--config and --preset are mutually exclusive"),
        ("bench-device-unknown", lambda e: bench("mqar", "--preset", "ci", "--device", "tpu"), ValueError,
         r"--device 'tpu' is not a torch device"),
        ("bench-text-niah-no-checkpoint", lambda e: bench("text_niah", "--checkpoint", "/nonexistent"), ValueError,
         r"checkpoint: no model.safetensors in '/nonexistent'"),
    ]


CASES = _lm_cases() + _hmt_cases() + _longmem_cases() + _mixer_cases() + _cli_cases() + _bench_cases()


def test_case_ids_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("call,exc,pattern", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_bad_input(env, call, exc, pattern):
    with pytest.raises(exc, match=pattern) as info:
        call(env)
    # A clear error, not an internal one re-typed: no AttributeError/IndexError/RuntimeError underneath.
    assert not isinstance(info.value, (AttributeError, IndexError, RuntimeError, KeyError))



@pytest.mark.parametrize("wrapper", ["hmt", "longmem"])
def test_wrappers_at_the_edges(env, wrapper):
    """Accepted with a correct result: T = 1 equals the first position of a longer call, and state=None equals
    init_state (the wrappers have no step; generate feeds them one token at a time)."""
    model, ids = getattr(env, wrapper), env.ids
    with torch.no_grad():
        full = model(ids)
        one = model(ids[:, :1])
        fresh = model(ids, state=model.init_state(2))
    assert one.logits.shape == (2, 1, V)
    torch.testing.assert_close(one.logits, full.logits[:, :1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fresh.logits, full.logits, rtol=0, atol=0)
