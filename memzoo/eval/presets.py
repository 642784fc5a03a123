"""Benchmark presets: plain functions returning a ``BenchConfig``, keyed by task and name.

``ci`` presets are tiny and run on a laptop CPU in seconds to minutes.  The others reproduce a
published protocol (GPU scale):

- ``mqar/zoology-fig2``: "Zoology" (arXiv 2312.04927) Fig. 2 - four (T, kv) pairs, d_model
  64-512, 2 layers, no MLP, 100k/3k examples, LR logspace(-4, -2, 4), 64 epochs.
- ``mqar/based-tradeoff``: "Simple linear attention language models balance the recall-throughput
  tradeoff" (Based, arXiv 2402.18668) Fig. 2 - one model trained on a mix of lengths, tested on
  seven maximally dense slices; plotted as accuracy vs state bytes.
- ``niah/titans-sniah``: the lengths of "Titans: Learning to Memorize at Test Time" (arXiv
  2501.00663) Table 2 S-NIAH (2K-16K) in our token-level task: train at 2K, test 2K-16K.
- ``seq_digits/s4d-inits``: the S4D initialisation ablation ("On the Parameterization and Initialization of
  Diagonal State Space Models", arXiv 2206.11893, on sCIFAR) on sequential 8x8 digits: Lin, Inv, LegS, Real.
- ``pydoc_lm/hmt``: HMT (arXiv 2405.06067) vs its backbone by held-out loss, as byte-level language models on Python's
  help text: the stage-1 comparison of docs/hmt.md at 3 seeds (CPU-sized; the report's ``hmt`` study).
- ``set_disjointness/jrt``, ``regbench/akyurek``, ``selective_copy/mad``: the protocols of JRT
  (arXiv 2407.05483), "In-Context Language Learning" (arXiv 2401.12973) and MAD (arXiv 2403.17844).

The one departure everywhere: memzoo's LM has rotary attention and RMSNorm where zoology has
learned positions and LayerNorm.  The MQAR protocols train in fp32 as published; the others use
bf16 autocast on CUDA (``--precision`` overrides).
"""

from __future__ import annotations

from collections.abc import Callable

from .._deprecation import renamed_attributes
from ..models.registry import unknown_name
from .config import BenchConfig, BenchTrainConfig, DataSpec, ModelSpec, log_lrs
from .tasks.mqar import MQARConfig
from .tasks.niah import NIAHConfig
from .tasks.pydoc_lm import PydocLMConfig
from .tasks.regbench import RegBenchConfig
from .tasks.selective_copy import SelectiveCopyConfig
from .tasks.seq_digits import SeqDigitsConfig
from .tasks.set_disjoint import SetDisjointConfig

__all__ = ["PRESETS", "DEFAULT_PRESET", "get_bench_preset", "zoology_batch_size", "hmt_lm_models", "pydoc_data",
           "pydoc_train"]

# zoology runs attention with one head; other mixers keep their own defaults.
_ONE_HEAD = {"attention": {"n_heads": 1}}


def zoology_batch_size(seq_len: int) -> int:
    """Fig. 2's batch sizes: 512 up to T=128, then halved per doubling of T (64 at T=1024)."""
    if seq_len <= 128:
        return 512
    return max(64 * 1024 // seq_len, 1)


def mqar_ci() -> BenchConfig:
    """Vocab 64, T 32, 4 pairs: 1-head attention at d 128 passes 0.99 in ~250 steps (~5 s on 2 idle CPU cores)."""
    train = MQARConfig(vocab_size=64, num_examples=4000, input_seq_len=32, num_kv_pairs=4)
    test = MQARConfig(vocab_size=64, num_examples=500, input_seq_len=32, num_kv_pairs=4)
    return BenchConfig(
        task="mqar", name="ci", models=(ModelSpec(("attention",), _ONE_HEAD),), d_models=(128,),
        data=(DataSpec((train,), (test,)),), lrs=(1e-3,), seeds=(0,),
        train=BenchTrainConfig(epochs=6, batch_size=32, eval_batch_size=500),
    )


def mqar_zoology_fig2() -> BenchConfig:
    """Zoology Fig. 2: (64,4), (128,8), (256,16), (512,64); d 64-512; LR logspace(-4,-2,4); 64 epochs."""
    pairs = ((64, 4), (128, 8), (256, 16), (512, 64))
    data = tuple(
        DataSpec((MQARConfig(num_examples=100_000, input_seq_len=T, num_kv_pairs=kv, random_non_queries=False),),
                 (MQARConfig(num_examples=3_000, input_seq_len=T, num_kv_pairs=kv, random_non_queries=False),),
                 batch_size=zoology_batch_size(T))
        for T, kv in pairs
    )
    return BenchConfig(
        task="mqar", name="zoology-fig2", models=(ModelSpec(("attention",), _ONE_HEAD),), d_models=(64, 128, 256, 512),
        data=data, lrs=log_lrs(1e-4, 1e-2, 4), seeds=(123,),
        train=BenchTrainConfig(epochs=64, batch_size=512, eval_batch_size=512),
    )


def mqar_based_tradeoff() -> BenchConfig:
    """Based Fig. 2: train on a length mix, test the 7 maximally dense slices; LR logspace(-3,-1.5,4); 32 epochs."""
    train = ((64, 4, 100_000), (128, 8, 20_000), (256, 16, 20_000), (256, 32, 20_000), (256, 64, 20_000))
    test = ((64, 4), (64, 8), (64, 16), (128, 32), (256, 64), (512, 128), (1024, 256))
    data = DataSpec(
        tuple(MQARConfig(num_examples=n, input_seq_len=T, num_kv_pairs=kv) for T, kv, n in train),
        tuple(MQARConfig(num_examples=1_000, input_seq_len=T, num_kv_pairs=kv) for T, kv in test),
    )
    return BenchConfig(
        task="mqar", name="based-tradeoff", models=(ModelSpec(("attention",), _ONE_HEAD),), d_models=(32, 64, 128),
        data=(data,), lrs=log_lrs(1e-3, 10**-1.5, 4), seeds=(123,),
        train=BenchTrainConfig(epochs=32, batch_size=256, eval_batch_size=32),
    )


def niah_ci() -> BenchConfig:
    """Train at T=128 (random depths), test at 128/256 x 5 depths: a smoke grid (far from solved in 4 epochs)."""
    train = NIAHConfig(vocab_size=64, num_examples=3000, seq_len=128, depths=None)
    test = tuple(NIAHConfig(vocab_size=64, num_examples=100, seq_len=T) for T in (128, 256))
    return BenchConfig(
        task="niah", name="ci", models=(ModelSpec(("attention",), _ONE_HEAD),), d_models=(128,),
        data=(DataSpec((train,), test),), lrs=(1e-3,), seeds=(0,),
        train=BenchTrainConfig(epochs=4, batch_size=32, eval_batch_size=100),
    )


def niah_titans_sniah() -> BenchConfig:
    """Train at 2K, test at 2K/4K/8K/16K x 5 depths, for the passkey, number and uuid variants."""
    data = tuple(
        DataSpec((NIAHConfig(vocab_size=256, num_examples=20_000, seq_len=2048, variant=v, depths=None),),
                 tuple(NIAHConfig(vocab_size=256, num_examples=500, seq_len=T, variant=v)
                       for T in (2048, 4096, 8192, 16384)))
        for v in ("passkey", "number", "uuid")
    )
    return BenchConfig(
        task="niah", name="titans-sniah", models=(ModelSpec(("attention",), {"attention": {"n_heads": 4}}),),
        d_models=(256,), data=data, lrs=log_lrs(1e-4, 1e-3, 3), seeds=(0,),
        train=BenchTrainConfig(epochs=8, batch_size=32, eval_batch_size=8, precision="bf16"),
    )


def set_disjointness_ci() -> BenchConfig:
    """One short smoke configuration (lists of 4 and 8, both orders)."""
    sizes = ((4, 8), (8, 4))
    data = DataSpec(tuple(SetDisjointConfig(vocab_size=128, num_examples=1000, first_len=a, second_len=b)
                          for a, b in sizes),
                    tuple(SetDisjointConfig(vocab_size=128, num_examples=200, first_len=a, second_len=b)
                          for a, b in sizes))
    return BenchConfig(task="set_disjointness", name="ci", models=(ModelSpec(("attention",)),), d_models=(64,),
                       data=(data,), lrs=(3e-3,), seeds=(0,), train=BenchTrainConfig(epochs=1, batch_size=32))


def set_disjointness_jrt() -> BenchConfig:
    """JRT's sweep: vocab 2048, 4 layers, 2 heads; 12 train list-size pairs x 20k; tests up to 768."""
    train = ((4, 16), (16, 4), (8, 32), (32, 8), (64, 16), (16, 64), (4, 128), (128, 4), (16, 256), (256, 16),
             (4, 256), (256, 4))
    test = train + ((768, 16), (16, 768))
    data = DataSpec(tuple(SetDisjointConfig(num_examples=20_000, first_len=a, second_len=b) for a, b in train),
                    tuple(SetDisjointConfig(num_examples=1_000, first_len=a, second_len=b) for a, b in test))
    return BenchConfig(
        task="set_disjointness", name="jrt",
        models=(ModelSpec(("attention",), {"attention": {"n_heads": 2}}, n_layers=4),), d_models=(128, 256),
        data=(data,), lrs=log_lrs(1e-4, 1e-2, 4), seeds=(0,),
        train=BenchTrainConfig(epochs=32, batch_size=64, precision="bf16"),
    )


def regbench_ci() -> BenchConfig:
    """The spec's smoke configuration: 500 DFAs, one epoch, sequences cut to 256 tokens."""
    data = DataSpec((RegBenchConfig(num_examples=500, seq_len=256),),
                    (RegBenchConfig(num_examples=100, seq_len=256, split="test"),))
    return BenchConfig(task="regbench", name="ci", models=(ModelSpec(("attention",)),), d_models=(64,),
                       data=(data,), lrs=(3e-3,), seeds=(0,), train=BenchTrainConfig(epochs=1, batch_size=32))


def regbench_akyurek() -> BenchConfig:
    """RegBench: 5000 train / 500 test DFAs, 200 epochs, batch 32, lr 5e-4, wd 0.1, cosine with warmup."""
    data = DataSpec((RegBenchConfig(num_examples=5_000),), (RegBenchConfig(num_examples=500, split="test"),))
    return BenchConfig(
        task="regbench", name="akyurek", models=(ModelSpec(("attention",), {"attention": {"n_heads": 4}},
                                                            n_layers=4, d_ff=None),),
        d_models=(256,), data=(data,), lrs=(5e-4,), seeds=(0,),
        train=BenchTrainConfig(epochs=200, batch_size=32, warmup_steps=1000, early_stop=None, precision="bf16"),
    )


def _digits_data(n_train: int | None = None, n_test: int | None = None) -> DataSpec:
    return DataSpec((SeqDigitsConfig(num_examples=n_train),), (SeqDigitsConfig(split="test", num_examples=n_test),))


def seq_digits_ci() -> BenchConfig:
    """A smoke configuration: S4D-Lin, 2 epochs on 400 images (about 0.6 test accuracy; chance 0.1)."""
    return BenchConfig(task="seq_digits", name="ci", models=(ModelSpec(("s4d",)),), d_models=(32,),
                       data=(_digits_data(400),), lrs=(1e-2,), seeds=(0,),
                       train=BenchTrainConfig(epochs=2, batch_size=50, eval_batch_size=400, early_stop=None))


def seq_digits_s4d_inits() -> BenchConfig:
    """S4D's four initialisations, 2 layers at width 64, 20 epochs, AdamW 1e-2 (measured on one CPU core: Lin
    0.96, Real 0.82, about 30 s each)."""
    models = tuple(ModelSpec(("s4d",), {"s4d": {"init": i}}, name=f"s4d-{i}") for i in ("lin", "inv", "legs", "real"))
    return BenchConfig(task="seq_digits", name="s4d-inits", models=models, d_models=(64,), data=(_digits_data(),),
                       lrs=(1e-2,), seeds=(0, 1, 2),
                       train=BenchTrainConfig(epochs=20, batch_size=50, eval_batch_size=400, early_stop=None))


def selective_copy_ci() -> BenchConfig:
    """A smoke configuration: T=64 with 8 tokens to copy."""
    data = DataSpec((SelectiveCopyConfig(num_examples=2000, seq_len=64, n_copy=8),),
                    (SelectiveCopyConfig(num_examples=200, seq_len=64, n_copy=8),))
    return BenchConfig(task="selective_copy", name="ci", models=(ModelSpec(("attention",)),), d_models=(64,),
                       data=(data,), lrs=(3e-3,), seeds=(0,), train=BenchTrainConfig(epochs=1, batch_size=32))


def selective_copy_mad() -> BenchConfig:
    """MAD's selective copy: vocab 16, T 256, 16 tokens, 12,800/1,280 examples, width 128, 200 epochs."""
    data = DataSpec((SelectiveCopyConfig(num_examples=12_800, seq_len=256, n_copy=16),),
                    (SelectiveCopyConfig(num_examples=1_280, seq_len=256, n_copy=16),))
    return BenchConfig(
        task="selective_copy", name="mad", models=(ModelSpec(("attention",), d_ff=None),), d_models=(128,),
        data=(data,), lrs=(1e-4, 5e-4, 1e-3), seeds=(0,),
        train=BenchTrainConfig(epochs=200, batch_size=128, precision="bf16"),
    )


def hmt_lm_models(window: int) -> dict[str, ModelSpec]:
    """HMT vs its backbone: a windowed attention LM (2 layers, SwiGLU MLP) and HMT over the same backbone, one
    segment per window.  HMT is its training stage 1 (memory token and sensory tokens, no memory search): the search
    reads the first half of the current segment, a path by which later bytes can reach earlier predictions
    (docs/hmt.md), which a next-byte loss would reward."""
    backbone = {"attention": {"window": window}}
    hmt = {"name": "hmt", "segment_len": window, "n_sensory": window // 4, "cache_size": 32, "use_recall": False}
    return {"swa": ModelSpec(("attention",), backbone, d_ff=None, name="swa"),
            "hmt_swa": ModelSpec(("attention",), backbone, d_ff=None, name="hmt_swa", wrapper=hmt)}


def pydoc_data(seq_len: int = 256, n_train: int | None = None, n_test: int | None = None) -> DataSpec:
    return DataSpec((PydocLMConfig(seq_len=seq_len, num_examples=n_train),),
                    (PydocLMConfig(split="test", seq_len=seq_len, num_examples=n_test),))


def pydoc_train(epochs: int, max_steps: int | None = None) -> BenchTrainConfig:
    """Batches of 16 rows, gradients clipped at 1, no early stop (the primary metric is the loss)."""
    return BenchTrainConfig(epochs=epochs, batch_size=16, eval_batch_size=64, early_stop=None, grad_clip=1.0,
                            max_steps=max_steps)


def pydoc_lm_ci() -> BenchConfig:
    """A smoke configuration: both models at width 32 on 64 rows of 64 bytes, window 16, one epoch."""
    return BenchConfig(task="pydoc_lm", name="ci", models=tuple(hmt_lm_models(16).values()), d_models=(32,),
                       data=(pydoc_data(64, 64, 16),), lrs=(3e-3,), seeds=(0,), train=pydoc_train(1))


def pydoc_lm_hmt() -> BenchConfig:
    """docs/hmt.md's demonstration at 3 seeds: window 32, width 64, 256-byte rows, 3 epochs at lr 3e-3 (about a
    CPU-minute per run)."""
    return BenchConfig(task="pydoc_lm", name="hmt", models=tuple(hmt_lm_models(32).values()), d_models=(64,),
                       data=(pydoc_data(),), lrs=(3e-3,), seeds=(0, 1, 2), train=pydoc_train(3))


PRESETS: dict[str, dict[str, Callable[[], BenchConfig]]] = {
    "mqar": {"ci": mqar_ci, "zoology-fig2": mqar_zoology_fig2, "based-tradeoff": mqar_based_tradeoff},
    "niah": {"ci": niah_ci, "titans-sniah": niah_titans_sniah},
    "set_disjointness": {"ci": set_disjointness_ci, "jrt": set_disjointness_jrt},
    "regbench": {"ci": regbench_ci, "akyurek": regbench_akyurek},
    "selective_copy": {"ci": selective_copy_ci, "mad": selective_copy_mad},
    "seq_digits": {"ci": seq_digits_ci, "s4d-inits": seq_digits_s4d_inits},
    "pydoc_lm": {"ci": pydoc_lm_ci, "hmt": pydoc_lm_hmt},
}

# What a task runs without --preset: its published protocol (narrow it with --d-model, --seq-len, ...).
DEFAULT_PRESET = {"mqar": "zoology-fig2", "niah": "titans-sniah", "set_disjointness": "jrt", "regbench": "akyurek",
                  "selective_copy": "mad", "seq_digits": "s4d-inits", "pydoc_lm": "hmt"}


def get_bench_preset(task: str, name: str) -> BenchConfig:
    if task not in PRESETS:
        raise ValueError(f"no presets for task {task!r}; tasks: {sorted(PRESETS)}")
    if name not in PRESETS[task]:
        raise ValueError(unknown_name(f"{task} preset", name, PRESETS[task]))
    return PRESETS[task][name]()


# Old names, accepted for one release with a DeprecationWarning.
__getattr__ = renamed_attributes(__name__, globals(), {"get_preset": "get_bench_preset"})
