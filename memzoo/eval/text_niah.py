"""RULER's single-needle NIAH at the text level, for pretrained memzoo checkpoints (zero-shot).

"RULER: What's the Real Context Size of Your Long-Context Language Models?" (Hsieh et al., arXiv
2404.06654), ``niah_single_1`` (noise haystack, word keys -> 7-digit numbers, close to passkey
retrieval) and the needle haystack of ``niah_multikey_2`` (the haystack is other needles).  One
needle ``One of the special magic numbers for {key} is: {value}.`` is hidden among haystack lines;
the prompt asks for it, the model continues the answer prefix greedily, and the score is RULER's
``string_match_all``: the share of reference values found (case-insensitive substring) x 100.

Lengths count tokens of the evaluated model's tokenizer, the generation budget included (RULER's
"4K" = 4096 tokens with 128 of them for the answer); the haystack is the largest that fits.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..train.data import ByteTokenizer
from .words import ADJECTIVES, NOUNS

__all__ = ["TextNIAHConfig", "ByteTokenizer", "make_sample", "string_match_all", "evaluate_text_niah",
           "checkpoint_dir", "load_checkpoint", "load_checkpoint_and_tokenizer", "model_generate_fn", "NOISE_LINE"]

NOISE_LINE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
_NEEDLE = "One of the special magic {type_v} for {key} is: {value}."
_TEMPLATE = ("A special magic {type_v1} is hidden within the following text. Make sure to memorize it. "
             "I will quiz you about the {type_v1} afterwards.\n{context}\n"
             "What is the special magic {type_v1} for {query} mentioned in the provided text?")
_PREFIX = " The special magic {type_v1} for {query} mentioned in the provided text is"


@dataclass(frozen=True)
class TextNIAHConfig:
    lengths: tuple[int, ...] = (1024, 2048, 4096)
    # RULER uses 500 samples per length.
    samples: int = 500
    # "noise" (S-NIAH-1) or "needle" (the haystack is other needles, as in MK-2).
    haystack: str = "noise"
    # "numbers" (7 digits) or "uuids".
    value_type: str = "numbers"
    max_new_tokens: int = 128
    # Needle depths (fraction of haystack lines); None = a random line per sample, as RULER.
    depths: tuple[float, ...] | None = None
    seed: int = 42

    def __post_init__(self) -> None:
        object.__setattr__(self, "lengths", tuple(int(n) for n in self.lengths))
        if not self.lengths or any(n <= self.max_new_tokens for n in self.lengths):
            raise ValueError(f"lengths must be non-empty and exceed max_new_tokens={self.max_new_tokens}, "
                             f"got {self.lengths}")
        if self.samples < 1 or self.max_new_tokens < 1:
            raise ValueError("samples and max_new_tokens must be >= 1")
        if self.haystack not in ("noise", "needle"):
            raise ValueError(f"haystack must be 'noise' or 'needle', got {self.haystack!r}")
        if self.value_type not in ("numbers", "uuids"):
            raise ValueError(f"value_type must be 'numbers' or 'uuids', got {self.value_type!r}")
        if self.depths is not None:
            object.__setattr__(self, "depths", tuple(float(d) for d in self.depths))
            if not self.depths or any(not 0 <= d <= 1 for d in self.depths):
                raise ValueError(f"depths must be fractions in [0, 1], got {self.depths}")


def _key(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def _value(rng: random.Random, value_type: str) -> str:
    if value_type == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def make_sample(cfg: TextNIAHConfig, length: int, rng: random.Random, count: Callable[[str], int],
                depth: float | None = None) -> dict[str, Any]:
    """One prompt of at most ``length - max_new_tokens`` tokens (per ``count``) with one needle.

    Returns:
        ``{"input": prompt + answer prefix, "outputs": [value], "key", "depth", "n_lines", "tokens"}``.
    """
    key = _key(rng)
    value = _value(rng, cfg.value_type)
    type_v1 = cfg.value_type[:-1]
    needle = _NEEDLE.format(type_v=cfg.value_type, key=key, value=value)
    distractors: list[str] = []
    if cfg.haystack == "needle":
        # Each line is many tokens, so `length` lines always overflow the budget.
        for _ in range(length):
            k = _key(rng)
            while k == key:
                k = _key(rng)
            distractors.append(_NEEDLE.format(type_v=cfg.value_type, key=k, value=_value(rng, cfg.value_type)))
    draw = rng.random() if depth is None else depth

    def prompt(n: int) -> tuple[str, int]:
        lines = distractors[:n] if cfg.haystack == "needle" else [NOISE_LINE] * n
        at = min(n, int(draw * (n + 1))) if depth is None else int(round(depth * n))
        lines = lines[:at] + [needle] + lines[at:]
        text = _TEMPLATE.format(type_v1=type_v1, context="\n".join(lines), query=key)
        return text + _PREFIX.format(type_v1=type_v1, query=key), at

    budget = length - cfg.max_new_tokens
    lo, hi = 0, len(distractors) if cfg.haystack == "needle" else length
    if count(prompt(0)[0]) > budget:
        raise ValueError(f"length {length} is too short for the prompt and {cfg.max_new_tokens} generated tokens")
    # The largest haystack that fits: prompt tokens grow with the number of lines.
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(prompt(mid)[0]) <= budget:
            lo = mid
        else:
            hi = mid - 1
    text, at = prompt(lo)
    return {"input": text, "outputs": [value], "key": key, "depth": at / max(lo, 1), "n_lines": lo,
            "tokens": count(text)}


def string_match_all(predictions: list[str], references: list[list[str]]) -> float:
    """RULER's score: mean over samples of the share of reference strings found in the prediction, x 100."""
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("predictions must not be empty")
    per = [sum(r.lower() in p.lower() for r in refs) / len(refs) for p, refs in zip(predictions, references)]
    return 100.0 * sum(per) / len(per)


def evaluate_text_niah(generate: Callable[[str, int], str], cfg: TextNIAHConfig,
                       count: Callable[[str], int], progress: bool = False) -> dict[str, Any]:
    """Score ``generate(prompt, max_new_tokens) -> text`` on ``cfg``.

    Returns:
        ``{"scores": {"length=<L>": score, ...}, "counts": {same keys: samples}, "samples": [rows]}``
        (scores are x 100; with ``cfg.depths`` also ``"length=<L>/depth=<d>"``).
    """
    from tqdm.auto import tqdm

    rows = []
    for length in cfg.lengths:
        rng = random.Random(cfg.seed * 1_000_003 + length)
        for i in tqdm(range(cfg.samples), desc=f"text_niah {length}", disable=not progress, leave=False):
            depth = None if cfg.depths is None else cfg.depths[i % len(cfg.depths)]
            s = make_sample(cfg, length, rng, count, depth)
            pred = generate(s["input"], cfg.max_new_tokens)
            rows.append({"length": length, "index": i, "requested_depth": depth, **s, "prediction": pred,
                         "score": string_match_all([pred], [s["outputs"]])})
    scores: dict[str, float] = {}
    groups: dict[str, list[float]] = {}
    for r in rows:
        groups.setdefault(f"length={r['length']}", []).append(r["score"])
        if r["requested_depth"] is not None:
            groups.setdefault(f"length={r['length']}/depth={round(100 * r['requested_depth'])}", []).append(r["score"])
    for name, vals in groups.items():
        scores[name] = sum(vals) / len(vals)
    return {"scores": scores, "counts": {k: len(v) for k, v in groups.items()}, "samples": rows}


def checkpoint_dir(path: str | Path) -> Path:
    """The export folder of a memzoo-train run (``<run>/final``) or of a checkpoint / export directory."""
    path = Path(path)
    for d in (path, path / "final"):
        if (d / "model.safetensors").is_file():
            return d
    raise FileNotFoundError(f"checkpoint: no model.safetensors in {str(path)!r} or {str(path / 'final')!r}")


def load_checkpoint(path: str | Path, device: str = "cpu") -> Any:
    """A memzoo ``LanguageModel`` from a memzoo-train run (``<run>/final``) or an export directory."""
    from ..train.checkpoint import from_pretrained

    return from_pretrained(checkpoint_dir(path), device=device).eval()


def load_checkpoint_and_tokenizer(path: str | Path, device: str = "cpu") -> tuple[Any, Any]:
    """``load_checkpoint`` plus the tokenizer exported with the model (memzoo's byte tokenizer when there is
    none), checked against the model's vocabulary."""
    from ..train.data import check_model_vocab, tokenizer_for

    model = load_checkpoint(path, device)
    tok = tokenizer_for(checkpoint_dir(path))
    check_model_vocab(tok, model.config.vocab_size, f"checkpoint {str(path)!r}")
    return model, tok


def model_generate_fn(model: Any, tokenizer: Any, device: str = "cpu") -> Callable[[str, int], str]:
    """Greedy generation with a memzoo LM: text in, the continuation's text out."""
    import torch

    def generate(prompt: str, max_new_tokens: int) -> str:
        ids = torch.as_tensor(np.asarray(tokenizer.encode(prompt)), dtype=torch.long, device=device)[None]
        out = model.generate(ids, max_new_tokens=max_new_tokens, temperature=0.0)
        return tokenizer.decode(out[0, ids.shape[1] :].tolist())

    return generate


def main_text_niah(args: argparse.Namespace) -> int:
    """The ``text_niah`` subcommand: score a checkpoint and write JSON, per-sample JSONL and CSV rows."""
    from .cli import _device
    from .results import append_csv, environment, new_run_id, write_json, write_jsonl

    if args.checkpoint is None:
        raise ValueError("text_niah needs --checkpoint (a memzoo-train run or checkpoint directory)")
    fields = {"lengths": args.lengths, "samples": args.samples, "haystack": args.haystack,
              "value_type": args.value_type, "max_new_tokens": args.max_new_tokens}
    cfg = TextNIAHConfig(**{k: v for k, v in fields.items() if v is not None})
    device = _device(args.device)
    model, tok = load_checkpoint_and_tokenizer(args.checkpoint, device)
    t0 = time.perf_counter()
    result = evaluate_text_niah(model_generate_fn(model, tok, device), cfg, lambda s: len(tok.encode(s)),
                                progress=not args.no_progress)
    run_id = new_run_id("text_niah", args.run_name)
    created = dt.datetime.now().isoformat(timespec="seconds")
    payload = {"run_id": run_id, "created": created, "task": "text_niah", "checkpoint": str(args.checkpoint),
               "config": asdict(cfg), "model_config": model.config.to_dict(), "environment": environment(device),
               "wall_s": round(time.perf_counter() - t0, 3), "scores": result["scores"]}
    out = Path(args.out)
    write_json(out, run_id, payload)
    write_jsonl(out / "samples" / f"{run_id}.jsonl", result["samples"])
    params = model.num_parameters()
    rows = [{"run_id": run_id, "created": created, "task": "text_niah", "preset": cfg.haystack,
             "model": Path(args.checkpoint).name, "pattern": "+".join(model.config.pattern),
             "n_layers": model.config.n_layers, "d_model": model.config.d_model, "slice": name,
             "seq_len": int(name.split("/")[0].split("=")[1]), "accuracy": score / 100,
             "n": result["counts"][name],
             "params": params, "wall_s": payload["wall_s"]} for name, score in result["scores"].items()]
    append_csv(out / "results.csv", rows)
    for name, score in result["scores"].items():
        print(f"{name}: string_match_all {score:.1f}")
    print(f"wrote {out / 'results' / (run_id + '.json')}")
    return 0
