"""The Accelerate pretraining loop: ``train(cfg)`` runs unchanged on a laptop CPU and under ``accelerate launch``.

One optimizer step reads ``grad_accum`` micro-batches (a pure function of the data position),
all-reduces their target count once, and runs each under ``accelerator.accumulate``.  The loss
is token-weighted over the micro-batches and ranks: every micro-step back-propagates
``sum(ce) * grad_accum * world / global_targets``, which Accelerate divides by ``grad_accum`` and
DDP averages over ranks.  A micro-batch runs in segments (``run_segments``) when
``data.segment_len`` is set or packing is ``stream``: the state is carried from segment to
segment, reset per row at document starts, and cut (detached, after a backward of the window)
every ``data.detach_every`` segments.  Then comes clipping, a skip of non-finite steps,
AdamW and the LR schedule; metrics, evaluation and atomic checkpoints follow on their schedule.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import build_model
from ..models.state import detach_state, state_leaves
from ..models.wrappers.base import Wrapper
from .checkpoint import (
    MANIFEST,
    CheckpointError,
    CheckpointWarning,
    TrainState,
    clean_stale,
    export_model,
    latest_checkpoint,
    load_carried_state,
    restore_torch_rng,
    resumable_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from .config import ConfigError, SchedConfig, TrainConfig, apply_wrapper_backbone, check_paths, validate_config
from .data import (
    IGNORE_INDEX,
    Batch,
    BPETokenizer,
    Tokens,
    iter_documents,
    load_prepared,
    make_packer,
    make_tokenizer,
    split_tokens,
    tokenize_documents,
)

__all__ = ["train", "run_segments", "reset_model_state", "lr_factor", "param_groups"]


def reset_model_state(model: nn.Module, state: tuple[Any, ...], mask: Tensor) -> tuple[Any, ...]:
    """Fresh state for the rows where ``mask`` ``[B]`` is true, in every layer (each mixer's ``reset_state``).

    A model-level wrapper (``memzoo.models.wrappers``) resets its own state.
    """
    if not bool(mask.any()):
        return state
    if hasattr(model, "reset_state"):
        return model.reset_state(state, mask)
    return tuple(m.reset_state(s, mask) for m, s in zip(model.mixers, state))


def run_segments(model: nn.Module, batch: Batch, *, segment_len: int | None = None, detach_every: int = 1,
                 state: Any = None, ce_scale: float | Tensor = 1.0, aux_scale: float = 1.0,
                 backward: Callable[[Tensor], None] | None = None,
                 no_sync: Callable[[], Any] = contextlib.nullcontext,
                 lm: nn.Module | None = None) -> tuple[Tensor, Tensor, Any]:
    """Forward (and, with ``backward``, backward) one micro-batch segment by segment, carrying the state.

    Args:
        model: the (possibly wrapped) language model to call.
        batch: rows ``[B, T]``; ``batch.resets`` ``[B, T // segment_len]`` resets rows before a segment.
        segment_len: tokens per forward call (``None``: the whole row in one call).
        detach_every: back-propagate and cut the state every k segments (truncated BPTT).
        state: the state carried in from the previous micro-batch (stream packing), else ``None``.
        ce_scale, aux_scale: the back-propagated loss is ``ce_sum * ce_scale + aux * aux_scale / n_segments``.
        backward: called with each window's loss; ``None`` runs forward only.
        no_sync: context for every window but the last, so DDP all-reduces once per micro-batch.
        lm: the unwrapped model whose ``mixers`` reset the state (default: ``model``).

    Returns:
        ``(ce_sum, aux_sum, state)``: the summed cross-entropy over all targets (detached), the
        summed auxiliary losses, and the detached final state.
    """
    B, T = batch.input_ids.shape
    S = segment_len or T
    n = T // S
    lm = lm or model
    ce_total = torch.zeros((), device=batch.input_ids.device)
    aux_total = torch.zeros((), device=batch.input_ids.device)
    window: Tensor | None = None
    for j in range(n):
        cols = slice(j * S, (j + 1) * S)
        if batch.resets is not None and state is not None:
            state = reset_model_state(lm, state, batch.resets[:, j])
        out = model(batch.input_ids[:, cols], state=state, cu_seqlens=batch.cu_seqlens)
        # The targets are pre-shifted, so a segment's last position predicts the next segment's first token.
        ce = F.cross_entropy(out.logits.flatten(0, 1).float(), batch.targets[:, cols].flatten(),
                             ignore_index=IGNORE_INDEX, reduction="sum")
        aux = sum(out.aux_losses.values()) if out.aux_losses else torch.zeros((), device=ce.device)
        loss = ce * ce_scale + aux * (aux_scale / n)
        window = loss if window is None else window + loss
        ce_total += ce.detach()
        aux_total += aux.detach() / n
        state = out.state
        if (j + 1) % detach_every == 0 or j == n - 1:
            if backward is not None:
                with no_sync() if j < n - 1 else contextlib.nullcontext():
                    backward(window)
            window = None
            state = detach_state(state)
    return ce_total, aux_total, state


def lr_factor(step: int, *, sched: SchedConfig, max_steps: int) -> float:
    """LR multiplier for optimizer step ``step`` (0-based): linear warmup, then the decay to ``min_lr_ratio``."""
    warmup, lo = sched.warmup_steps, sched.min_lr_ratio
    if step < warmup:
        return (step + 1) / warmup
    if sched.decay == "constant":
        return 1.0
    if sched.decay == "wsd":
        start = max(warmup, int(max_steps * (1 - sched.decay_fraction)))
        if step < start:
            return 1.0
        return 1.0 - (1.0 - lo) * min(1.0, (step - start + 1) / max(1, max_steps - start))
    progress = min(1.0, (step - warmup + 1) / max(1, max_steps - warmup))
    if sched.decay == "linear":
        return lo + (1.0 - lo) * (1.0 - progress)
    return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float, lr: float) -> list[dict[str, Any]]:
    """AdamW groups keyed by (decay, lr scale).

    Matrices (linear weights, the tied embedding/head) decay; vectors (norm gains, biases) and
    parameters flagged ``p._no_weight_decay`` (SSM A / dt, decays) do not.  ``p._lr_scale`` multiplies
    the learning rate of its parameter.  A model with ``trainable_parameters()`` (LongMem: the SideNet)
    gives the optimizer exactly those.
    """
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    params = model.trainable_parameters() if hasattr(model, "trainable_parameters") else model.parameters()
    for p in params:
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and not getattr(p, "_no_weight_decay", False)
        scale = float(getattr(p, "_lr_scale", 1.0))
        groups.setdefault((decay, scale), []).append(p)
    return [{"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr": lr * scale, "lr_scale": scale}
            for (decay, scale), ps in groups.items()]


def _load_data(cfg: TrainConfig, acc: Any, out: Path, resuming: bool) -> tuple[Any, Tokens, Tokens]:
    d = cfg.data
    if d.source.startswith("prepared:"):
        if d.tokenizer != "byte":
            raise ConfigError("data.tokenizer comes from the prepared directory's meta.json; leave it at 'byte'")
        return load_prepared(d.source[len("prepared:"):])
    saved = out / "tokenizer.json"
    with acc.main_process_first():
        if d.tokenizer.startswith("train:") and saved.is_file() and (resuming or not acc.is_main_process):
            tok = BPETokenizer.load(saved)
        else:
            docs = iter_documents(d.source, d.text_field, d.decode_errors) if d.tokenizer.startswith("train:") else None
            tok = make_tokenizer(d.tokenizer, docs)
            if acc.is_main_process and d.tokenizer.startswith("train:"):
                tok.save(out)
    tokens = tokenize_documents(tok, iter_documents(d.source, d.text_field, d.decode_errors))
    train, val = split_tokens(tokens, d.val_fraction, tok.eos_id)
    return tok, Tokens(train), Tokens(val)


def _check_model(cfg: TrainConfig, model: Any, tok: Any) -> None:
    if cfg.model.vocab_size < tok.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the {tok.kind} tokenizer's "
                          f"vocabulary {tok.vocab_size}; set --model.vocab_size {tok.vocab_size}")
    if cfg.data.seq_len % model.split_multiple:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} must be a multiple of the model's "
                          f"split_multiple={model.split_multiple}")
    if cfg.data.pack == "stream" and isinstance(model, Wrapper):
        try:
            model.state_size(None)
        except ValueError:
            raise ConfigError(f"data.pack='stream' carries the state across batches, but the {model.name} wrapper's "
                              "state grows without bound") from None
    elif cfg.data.pack == "stream":
        for name, m in zip(cfg.model.layer_types, model.mixers):
            try:
                m.state_size(None)
            except ValueError:
                raise ConfigError(f"data.pack='stream' carries the state across batches, but mixer {name!r} has a "
                                  f"state that grows without bound (e.g. set model.mixers.{name}.window)") from None


def _resume_from(cfg: TrainConfig, out: Path, acc: Any = None) -> Path | None:
    """The checkpoint to resume from (``ckpt.resume``), or None.  Under several processes the main one decides and
    sends its choice (or its error) to the others: only one process reads and hashes the checkpoint files, every
    rank resumes from the same folder, and a warning about a skipped checkpoint is printed once.  ``acc``: the
    run's Accelerator (None: one process)."""
    from accelerate.utils import broadcast_object_list

    if acc is None or acc.num_processes == 1:
        return _choose_resume(cfg, out)
    box: list[Any] = [None]
    if acc.is_main_process:
        try:
            path = _choose_resume(cfg, out)
            box = [("path", None if path is None else str(path))]
        except ConfigError as e:
            box = [("error", str(e))]
    broadcast_object_list(box, from_process=0)
    kind, value = box[0]
    if kind == "error":
        raise ConfigError(value)
    return None if value is None else Path(value)


def _choose_resume(cfg: TrainConfig, out: Path) -> Path | None:
    resume = cfg.ckpt.resume
    if resume == "none":
        if latest_checkpoint(out) is not None:
            raise ConfigError(f"out_dir {str(out)!r} already holds checkpoints; pass --resume auto to continue "
                              "that run, or choose another --out_dir")
        return None
    try:
        if resume == "auto":
            return resumable_checkpoint(out)
        path = Path(resume)
        if not (path.is_dir() and (path / "trainer_state.json").is_file()):
            raise ConfigError(f"ckpt.resume {resume!r} is not a complete memzoo checkpoint folder")
        if not (path / MANIFEST).is_file():
            warnings.warn(f"ckpt.resume {resume!r} has no {MANIFEST} (an older memzoo wrote it): resuming from it "
                          "unverified", CheckpointWarning, stacklevel=2)
            return path
        verify_checkpoint(path)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    return path


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train as ``cfg`` says; returns a summary (final step, losses, where the outputs went)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration, TorchDynamoPlugin, set_seed
    from tqdm.auto import tqdm

    from .tracking import JSONLTracker, flat_config, peak_flops, resolve_trackers, trim_metrics

    # A wrapper with a backbone of its own (LongMem): the model section is that backbone's config; a missing
    # backbone folder fails here.
    cfg = apply_wrapper_backbone(cfg, required=True)
    validate_config(cfg)
    check_paths(cfg)
    # Accelerate keeps its settings in process-wide singletons; a second train() in one process (tests,
    # notebooks) must not inherit the first one's precision or accumulation.  The process group
    # (PartialState) is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    out = Path(cfg.out_dir)
    run_name = cfg.log.run_name or out.name
    t = cfg.train
    acc = Accelerator(
        gradient_accumulation_steps=t.grad_accum, mixed_precision=t.precision,
        log_with=[JSONLTracker(run_name, out), *resolve_trackers(cfg.log.report_to)],
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out)),
        step_scheduler_with_optimizer=False,
        dynamo_plugin=TorchDynamoPlugin(backend="inductor") if t.compile else None,
    )
    say = acc.print
    world, rank = acc.num_processes, acc.process_index
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != world:
        raise ConfigError(f"launched as {launched} processes, but Accelerate formed a group of {world} on "
                          f"{acc.device}: every process would train alone and write {str(out)!r}; check the launch "
                          "config against this machine's devices")
    resume = _resume_from(cfg, out, acc)
    set_seed(t.seed)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        clean_stale(out)
    acc.wait_for_everyone()

    tok, train_tokens, val_tokens = _load_data(cfg, acc, out, resume is not None)
    wrapper = cfg.resolved_wrapper()
    if wrapper is not None:
        cls, wrapper_config = wrapper
        model = cls.build(cfg.model, wrapper_config, resume=resume is not None, say=say)
        say(model.describe())
    else:
        model = build_model(cfg.model)
    _check_model(cfg, model, tok)
    tokens_per_step = cfg.tokens_per_step * world
    max_steps = t.max_steps if t.max_tokens is None else -(-t.max_tokens // tokens_per_step)
    pack = dict(seq_len=cfg.data.seq_len, micro_bs=t.micro_bs, eos_id=tok.eos_id, pad_id=tok.pad_id,
                seed=t.seed, rank=rank, world=world, segment_len=cfg.data.segment_len)
    train_packer = make_packer(cfg.data.pack, train_tokens, **pack)
    val_packer = make_packer(cfg.data.pack, val_tokens, **pack)
    segment_len = cfg.data.segment_len
    carry = cfg.data.pack == "stream"
    fpt = model.flops_per_token(cfg.data.seq_len)
    n_params = model.num_parameters()

    fused = cfg.optim.fused if cfg.optim.fused is not None else acc.device.type == "cuda"
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay, cfg.optim.lr), lr=cfg.optim.lr,
                                  betas=cfg.optim.betas, eps=cfg.optim.eps, fused=fused or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, sched=cfg.sched, max_steps=max_steps))
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    lm = acc.unwrap_model(model, keep_torch_compile=False)
    state = TrainState()
    acc.register_for_checkpointing(state)

    if acc.is_main_process:
        (out / "config.json").write_text(cfg.to_json())
        trim_metrics(out / "metrics.jsonl", state.step if resume is None else _saved_step(resume))
    carried = None
    if resume is not None:
        acc.load_state(str(resume))
        if restore_torch_rng(resume, rank):
            warnings.warn(f"Accelerate did not restore the random generators of {resume} (numpy < 1.25 with "
                          "torch >= 2.6 is one cause); memzoo set torch's from its own copy, so the run continues "
                          "exactly", CheckpointWarning, stacklevel=2)
        if carry:
            template = lm.init_state(t.micro_bs, device=acc.device)
            carried = load_carried_state(resume, rank, template)
        say(f"resumed from {resume} at step {state.step}")
    acc.init_trackers(run_name, config=flat_config(cfg.to_dict()))
    say(f"memzoo-train: {n_params / 1e6:.2f}M parameters, {tok.kind} tokenizer (vocab {tok.vocab_size}), "
        f"{len(train_tokens):,} train / {len(val_tokens):,} val tokens, {tokens_per_step:,} tokens per step, "
        f"{max_steps} steps, {world} process(es) on {acc.device}; outputs in {out}")

    peak = peak_flops(acc.device)
    grad_params = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(total=max_steps, initial=state.step, disable=not (acc.is_main_process and cfg.log.progress),
               dynamic_ncols=True, desc="train")
    window_start, window_tokens, window_steps = time.perf_counter(), 0, 0
    last_val: float | None = None

    def note(line: str) -> None:
        # Under the progress bar when it shows, else a plain line.
        if bar.disable:
            say(line)
        else:
            bar.write(line)

    train_loss: float | None = None
    saved_at = state.step if resume is not None else -1
    if state.step < max_steps:
        model.train()
    while state.step < max_steps:
        batches = [train_packer.batch(state.micro_index + i).to(acc.device) for i in range(t.grad_accum)]
        local = torch.stack([(b.targets != IGNORE_INDEX).sum() for b in batches]).sum().float()
        global_targets = acc.reduce(local.clone(), "sum").clamp(min=1)
        ce_scale = t.grad_accum * world / global_targets
        ce_sum, aux_sum = torch.zeros((), device=acc.device), torch.zeros((), device=acc.device)
        for b in batches:
            with acc.accumulate(model):
                ce, aux, new_state = run_segments(
                    model, b, segment_len=segment_len, detach_every=cfg.data.detach_every,
                    state=carried, ce_scale=ce_scale, backward=acc.backward,
                    no_sync=partial(acc.no_sync, model), lm=lm)
                carried = new_state if carry else None
                ce_sum += ce
                aux_sum += aux / t.grad_accum
        grad_norm = acc.clip_grad_norm_(grad_params, t.max_norm if t.max_norm > 0 else float("inf"))
        if grad_norm is not None and not isinstance(grad_norm, Tensor):
            grad_norm = torch.tensor(float(grad_norm))
        # DeepSpeed clips (and skips overflowing fp16 steps) inside its engine and may report no norm.
        finite = grad_norm is None or bool(torch.isfinite(grad_norm))
        if finite or not t.skip_nan_inf or t.precision == "fp16":
            # fp16: the grad scaler sees the inf itself, skips the update and lowers its scale.
            optimizer.step()
        skipped = (not finite and t.skip_nan_inf) or acc.optimizer_step_was_skipped
        state.skipped_steps += int(skipped)
        if skipped:
            why = (f"non-finite gradient norm {grad_norm.item()}" if not finite and t.precision != "fp16"
                   else "the fp16 grad scaler found an overflow")
            say(f"step {state.step + 1}: {why}; optimizer update skipped ({state.skipped_steps} skipped so far)")
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.micro_index += t.grad_accum
        state.tokens_seen += tokens_per_step
        window_tokens += tokens_per_step
        window_steps += 1
        local_loss = (ce_sum / local.clamp(min=1)).item()
        bar.update(1)

        last = state.step == max_steps
        if state.step % cfg.log.every == 0 or last:
            totals = acc.reduce(torch.stack([ce_sum, local, aux_sum / world]), "sum")
            train_loss = (totals[0] / totals[1].clamp(min=1)).item()
            elapsed = time.perf_counter() - window_start
            tps = window_tokens / max(elapsed, 1e-9)
            on_cuda = acc.device.type == "cuda"
            metrics = {
                "loss/train": train_loss,
                # Groups carry lr * lr_scale; report the base learning rate.
                "optim/lr": scheduler.get_last_lr()[0] / optimizer.param_groups[0].get("lr_scale", 1.0),
                "optim/grad_norm": None if grad_norm is None else grad_norm.item(),
                "optim/skipped_steps": state.skipped_steps,
                "perf/tokens_per_s": tps,
                "perf/tflops": fpt * tps / world / 1e12,
                "perf/mfu": fpt * tps / world / peak if peak else None,
                "perf/step_time": elapsed / window_steps,
                "mem/max_alloc_gib": torch.cuda.max_memory_allocated(acc.device) / 2**30 if on_cuda else None,
                "tokens_seen": state.tokens_seen,
            }
            if aux_sum.item() != 0.0:
                metrics["moe/aux_loss"] = totals[2].item()
            if carried is not None:
                metrics["mem/state_bytes"] = sum(x.numel() * x.element_size() for x in state_leaves(carried))
            acc.log(metrics, step=state.step)
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
            if not cfg.log.progress:
                say(f"step {state.step}/{max_steps}  loss {train_loss:.4f}  lr {metrics['optim/lr']:.2e}  "
                    f"{tps:,.0f} tok/s")
            window_start, window_tokens, window_steps = time.perf_counter(), 0, 0
        elif not math.isfinite(local_loss):
            say(f"step {state.step}: non-finite loss {local_loss}")

        if (cfg.log.eval_every and state.step % cfg.log.eval_every == 0) or last:
            if last:
                note(f"step {state.step}: final evaluation ({cfg.log.eval_iters} val batches)")
            last_val = evaluate(model, val_packer, cfg, acc, lm)
            acc.log({"loss/val": last_val, "ppl/val": math.exp(min(last_val, 50.0))}, step=state.step)
            note(f"step {state.step}: val loss {last_val:.4f}, ppl {math.exp(min(last_val, 50.0)):.2f}")
            model.train()
        if (cfg.ckpt.every and state.step % cfg.ckpt.every == 0) or last:
            if last:
                note(f"step {state.step}: saving the checkpoint")
            save_checkpoint(acc, out, state, cfg.ckpt.keep, carried, lm)
            saved_at = state.step
    bar.close()

    if saved_at != state.step:
        say(f"step {state.step}: saving the checkpoint")
        save_checkpoint(acc, out, state, cfg.ckpt.keep, carried, lm)
    final = None
    if cfg.ckpt.export_safetensors:
        say(f"exporting the model to {out / 'final'}")
        final = export_model(acc, model, out / "final", tok)
    acc.end_training()
    ckpt = latest_checkpoint(out)
    say(f"done: step {state.step}, train loss {_rounded(train_loss)}, val loss {_rounded(last_val)}\n"
        f"  checkpoint: {ckpt}\n  metrics:    {out / 'metrics.jsonl'}\n  model:      {final}  "
        f"(memzoo.from_pretrained)")
    return {"step": state.step, "train_loss": train_loss, "val_loss": last_val, "out_dir": str(out),
            "checkpoint": str(ckpt) if ckpt else None, "final": str(final) if final else None,
            "skipped_steps": state.skipped_steps, "tokens_seen": state.tokens_seen}


def _rounded(loss: float | None) -> str:
    return "n/a" if loss is None else f"{loss:.4f}"


def _saved_step(checkpoint: Path) -> int:
    import json

    return int(json.loads((checkpoint / "trainer_state.json").read_text())["step"])


@torch.no_grad()
def evaluate(model: nn.Module, packer: Any, cfg: TrainConfig, acc: Any, lm: nn.Module) -> float:
    """Token-weighted mean validation loss over the first ``log.eval_iters`` batches of the val split."""
    model.eval()
    ce_total = torch.zeros((), device=acc.device)
    count = torch.zeros((), device=acc.device)
    state = None
    for i in range(cfg.log.eval_iters):
        b = packer.batch(i).to(acc.device)
        ce, _, state = run_segments(model, b, segment_len=cfg.data.segment_len, state=state, lm=lm)
        state = state if cfg.data.pack == "stream" else None
        ce_total += ce
        count += (b.targets != IGNORE_INDEX).sum()
    totals = acc.reduce(torch.stack([ce_total, count]), "sum")
    return (totals[0] / totals[1].clamp(min=1)).item()
