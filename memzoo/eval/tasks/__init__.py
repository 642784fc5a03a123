"""The synthetic tasks: ``TASKS`` maps a name to its config class and generator.

Every generator is a pure function ``make(cfg, seed) -> TaskData(inputs, labels, slices[, accept])``.
``text_niah`` (RULER's text prompts for pretrained checkpoints) is not trained on, so it lives in
``memzoo.eval.text_niah`` and is listed here only so the CLI can name it; so is ``cil`` (class-incremental
classification on frozen features, ``memzoo.eval.cil``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import mqar, niah, pydoc_lm, regbench, selective_copy, seq_digits, set_disjoint
from .base import IGNORE, TaskData

__all__ = ["IGNORE", "TASKS", "Task", "TaskData", "make_task", "higher_is_better", "sweep_score"]

# Metrics where a smaller value is better: the learning-rate sweep minimizes them and early stopping (a threshold
# on accuracy) never applies to them.
LOWER_IS_BETTER = frozenset({"loss"})


@dataclass(frozen=True)
class Task:
    name: str
    config_class: type | None
    make: Callable[[Any, int], TaskData] | None
    # The metric the LR sweep optimizes and the plots show: "accuracy" (mean per-example token
    # accuracy, zoology's), "exact_match" (every scored token right) or "loss" (mean cross-entropy, lower is better).
    primary: str = "accuracy"
    trainable: bool = True


TASKS: dict[str, Task] = {
    "mqar": Task("mqar", mqar.MQARConfig, mqar.make),
    "niah": Task("niah", niah.NIAHConfig, niah.make, primary="exact_match"),
    "set_disjointness": Task("set_disjointness", set_disjoint.SetDisjointConfig, set_disjoint.make),
    "selective_copy": Task("selective_copy", selective_copy.SelectiveCopyConfig, selective_copy.make),
    "regbench": Task("regbench", regbench.RegBenchConfig, regbench.make),
    "seq_digits": Task("seq_digits", seq_digits.SeqDigitsConfig, seq_digits.make),
    "pydoc_lm": Task("pydoc_lm", pydoc_lm.PydocLMConfig, pydoc_lm.make, primary="loss"),
    "text_niah": Task("text_niah", None, None, primary="string_match", trainable=False),
    # Class-incremental learning on frozen features (memzoo.eval.cil): classifiers, not language models.
    "cil": Task("cil", None, None, trainable=False),
}


def higher_is_better(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER


def sweep_score(metric: str, value: float) -> float:
    """What a learning-rate sweep maximizes: ``value`` of ``metric``, negated where lower is better."""
    return value if higher_is_better(metric) else -value


def make_task(cfg: Any, seed: int) -> TaskData:
    """Generate the data of any task config (the task is found from the config's class)."""
    for task in TASKS.values():
        if task.config_class is not None and isinstance(cfg, task.config_class):
            return task.make(cfg, seed)
    raise TypeError(f"cfg must be one of the task configs, got {type(cfg).__name__}")
