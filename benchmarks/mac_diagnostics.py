"""Titans MAC at initialisation: how much of each token does the memory get to see?

For a freshly initialised 2-layer MAC LM (the base setting of docs/titans.md: d_model 64, 2 heads, N_p 4, segment
16) on passkey sequences of 32 tokens, the first MAC layer's memory input is recorded for both readings of eq 24:
the bare attention output y_t (``memory_input="attention"``) and the residual stream x_t + y_t (``"residual"``).
Reported per reading and seed: the mean cosine similarity between the memory inputs of different positions of a
sequence (1 = every token writes the same vector, so the memory cannot tell a needle from the haystack), the
same for the memory's keys after its projection and normalisation, and the gradient that a loss on the second
segment sends to the first segment's inputs (nonzero: the memory does carry gradients across segments).

    python benchmarks/mac_diagnostics.py        # a few seconds on one CPU thread
Results go to ``benchmarks/results/mac-diagnostics-<device>-<date>.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_result  # noqa: E402

from memzoo.eval.harness import load_segment  # noqa: E402
from memzoo.eval.tasks.niah import NIAHConfig  # noqa: E402
from memzoo.models import LanguageModel, ModelConfig  # noqa: E402
from memzoo.models.layers.common import apply_short_convs  # noqa: E402

SEGMENT, D, T = 16, 64, 32


def off_diagonal_cosine(v: torch.Tensor) -> float:
    """Mean cosine similarity between different positions of each sequence: ``v`` ``[B, T, ...]``."""
    v = torch.nn.functional.normalize(v.flatten(2), dim=-1)
    sim = v @ v.transpose(1, 2)  # [B, T, T]
    n = sim.shape[1]
    return float((sim.sum((1, 2)) - sim.diagonal(dim1=1, dim2=2).sum(1)).mean() / (n * (n - 1)))


def measure(memory_input: str, seed: int, ids: torch.Tensor) -> dict:
    torch.manual_seed(seed)
    opts = {"segment_len": SEGMENT, "n_persistent": 4, "n_heads": 2, "memory_input": memory_input}
    model = LanguageModel(ModelConfig(vocab_size=64, d_model=D, n_layers=2, pattern=("titans_mac",),
                                      mixers={"titans_mac": opts}, d_ff=0))
    layer = model.blocks[0].mixer
    seen = {}
    mem = layer.memory

    def hook(module, args):
        seen.setdefault("u", []).append(args[0].detach())

    handle = mem.register_forward_pre_hook(hook)
    emb = model.embed(ids).detach().requires_grad_(True)
    x = model.blocks[0].mixer_norm(emb)
    y, _ = layer(x)
    handle.remove()
    u = torch.cat(seen["u"], 1)  # [B, T, D]: what the memory was written with, both segments
    convs = (mem.q_conv, mem.k_conv, mem.v_conv)
    (_, k, _), _ = apply_short_convs(convs, (mem.q_proj(u), mem.k_proj(u), mem.v_proj(u)),
                                     mem.init_state(u.shape[0])[:3], None, step=False, silu_without_conv=True)
    # A loss on the last token of the second segment, differentiated with respect to the first segment's inputs.
    (g,) = torch.autograd.grad(y[:, -1].pow(2).sum(), emb)
    return {"memory_input": memory_input, "seed": seed, "cos_x": off_diagonal_cosine(x.detach()),
            "cos_memory_input": off_diagonal_cosine(u), "cos_memory_keys": off_diagonal_cosine(k.detach()),
            "grad_first_segment": float(g[:, :SEGMENT].norm()), "grad_second_segment": float(g[:, SEGMENT:].norm())}


def main() -> None:
    torch.set_num_threads(1)
    data = load_segment(NIAHConfig(vocab_size=64, num_examples=32, seq_len=T, variant="passkey", depths=None), 0)
    rows = [measure(mi, seed, data.inputs) for mi in ("attention", "residual") for seed in (0, 1, 2)]
    print_table(rows, list(rows[0]))
    path = write_result("mac-diagnostics", {"setting": {"segment": SEGMENT, "d_model": D, "seq_len": T,
                                                        "n_persistent": 4, "n_heads": 2, "examples": 32},
                                            "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
