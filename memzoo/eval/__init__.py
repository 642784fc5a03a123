"""Evaluation: recall and needle-in-a-haystack benchmarks over any registered mixer (``memzoo-bench``).

    from memzoo.eval import get_bench_preset, run_and_save
    result = run_and_save(get_bench_preset("mqar", "ci"), "runs/bench")   # JSON, CSV and plots under runs/bench

Synthetic tasks (``memzoo.eval.tasks``: MQAR, token NIAH, set disjointness, selective copy,
RegBench) are pure ``make(cfg, seed)`` generators; ``harness`` trains a small LM per (model,
width, data, learning rate, seed) and scores it per slice; ``text_niah`` scores pretrained
checkpoints on RULER's text prompts.  Protocols and presets: docs/benchmarks.md.
"""

from .._deprecation import renamed_attributes
from .cli import build_config, main, run_and_save
from .config import BenchConfig, BenchTrainConfig, DataSpec, ModelSpec, log_lrs
from .harness import evaluate, run_bench, segment_seed, slice_metrics, train_one
from .presets import DEFAULT_PRESET, PRESETS, get_bench_preset
from .results import summarize
from .tasks import IGNORE, TASKS, Task, TaskData, make_task

__all__ = [
    "BenchConfig", "DEFAULT_PRESET", "DataSpec", "IGNORE", "ModelSpec", "PRESETS", "TASKS", "Task", "TaskData",
    "BenchTrainConfig", "build_config", "evaluate", "get_bench_preset", "log_lrs", "main", "make_task", "run_and_save",
    "run_bench", "segment_seed", "slice_metrics", "summarize", "train_one",
]


# Old names, accepted for one release with a DeprecationWarning.
__getattr__ = renamed_attributes(__name__, globals(),
                                 {"TrainConfig": "BenchTrainConfig", "get_preset": "get_bench_preset"})
