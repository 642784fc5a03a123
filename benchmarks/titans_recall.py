"""The Titans memories in isolation: how well does one pass of writes store key-value pairs for a later read?

No outer model and no training: random unit keys k_i and Gaussian values v_i (head dim 32, the MQAR zoo's width 64
with 2 heads) are written into a fresh memory, each with the same inner learning rate theta, momentum eta and no
decay; ``filler`` extra random pairs are written after them (MQAR writes every token, not only the pairs it asks
about); then each k_i is read with theta 0, so the reads write nothing.  The linear memory starts at zero, the MLP
memory x + LN(gelu(x A2) A1) at the layer's random init (E = 4 x 32).  A read is scored by nearest-neighbour
retrieval among the stored pairs' values (cosine; chance 1 / pairs) and by its mean cosine to its own value; for the
MLP memory the read minus the query (its residual path) is scored, which is what the memory adds.

    python benchmarks/titans_recall.py          # a few seconds on one CPU thread
Results go to ``benchmarks/results/titans-recall-<device>-<date>.json``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_result  # noqa: E402

from memzoo.kernels.titans import titans_linear, titans_mlp  # noqa: E402

D, E, BATCH, CHUNK = 32, 128, 64, 16
# theta ~ 0.12 and eta ~ 0.73 are the layer's gates at initialisation (TitansMemory's gate biases).
SETTINGS = [(pairs, 0, theta, eta) for eta in (0.0, 0.73) for pairs in (4, 8, 16) for theta in (0.05, 0.12, 0.5, 2.0)]
SETTINGS += [(4, filler, theta, 0.73) for filler in (24, 56) for theta in (0.05, 0.12)]


def recall(kind: str, pairs: int, filler: int, theta: float, eta: float, seed: int = 0) -> dict:
    """Write ``pairs + filler`` random pairs into a fresh ``kind`` memory, read the first ``pairs`` keys back."""
    gen = torch.Generator().manual_seed(seed)
    n = pairs + filler
    k = F.normalize(torch.randn(BATCH, n, 1, D, generator=gen), dim=-1)
    v = torch.randn(BATCH, n, 1, D, generator=gen)
    zeros = torch.zeros(BATCH, pairs, 1, D)
    q, keys, values = torch.cat([k, k[:, :pairs]], 1), torch.cat([k, zeros], 1), torch.cat([v, zeros], 1)
    T = n + pairs
    lr = torch.cat([torch.full((BATCH, n, 1), theta), torch.zeros(BATCH, pairs, 1)], 1)
    log_eta = torch.full((BATCH, T, 1), math.log(eta) if eta > 0 else -1e3)
    log_gamma = torch.zeros(BATCH, T, 1)
    pos = torch.zeros(BATCH, dtype=torch.int64)
    if kind == "linear":
        w = torch.zeros(BATCH, 1, D, D)
        y, _ = titans_linear(q, keys, values, lr, log_eta, log_gamma, (w, w, torch.zeros_like(w)), pos, CHUNK)
        read = y[:, n:]
    else:
        a1 = (torch.randn(1, E, D, generator=gen) * E ** -0.5).expand(BATCH, 1, E, D).contiguous()
        a2 = (torch.randn(1, D, E, generator=gen) * D ** -0.5).expand(BATCH, 1, D, E).contiguous()
        state = (a1, a1, torch.zeros_like(a1), a2, a2, torch.zeros_like(a2))
        y, _ = titans_mlp(q, keys, values, lr, lr, log_eta, log_gamma, state, pos, CHUNK)
        read = y[:, n:] - k[:, :pairs]
    sims = torch.einsum("bihd,bjhd->bij", F.normalize(read, dim=-1), F.normalize(v[:, :pairs], dim=-1))
    return {"retrieval": float((sims.argmax(-1) == torch.arange(pairs)).float().mean()),
            "cosine": float(sims.diagonal(dim1=1, dim2=2).mean())}


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    for pairs, filler, theta, eta in SETTINGS:
        lin, mlp = recall("linear", pairs, filler, theta, eta), recall("mlp", pairs, filler, theta, eta)
        rows.append({"pairs": pairs, "filler": filler, "theta": theta, "eta": eta,
                     "linear_retrieval": lin["retrieval"], "mlp_retrieval": mlp["retrieval"],
                     "linear_cosine": lin["cosine"], "mlp_cosine": mlp["cosine"]})
    print_table(rows, list(rows[0]))
    path = write_result("titans-recall", {"setting": {"head_dim": D, "mlp_hidden": E, "batch": BATCH,
                                                      "chunk_size": CHUNK, "decay": 0.0, "seed": 0}, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
