"""Discrete Key-Value Bottleneck: a frozen encoder's output snapped to frozen keys whose paired values are learned.

Paper: "Discrete Key-Value Bottleneck" (Träuble, Goyal, Rahaman, Mozer, Kawaguchi, Bengio, Schölkopf; ICML 2023,
arXiv 2207.11240).  Per input x, with C codebooks of N (key, value) pairs:

    (1) z = enc(x) (frozen, no gradient);   z_c = z P_c,  P_c [d_in, d_key] a fixed random projection, c = 1..C
    (2) I_c = the top_k keys nearest to z_c: argmin_i ||z_c - key_{c,i}||^2   (keys frozen after their init)
    (3) h_c = mean_{i in I_c} value_{c,i}                  (the values: the only trained parameters of the memory)
    (4) y = mean_c h_c, read as logits of a softmax over the d_value dims  (non-parametric decoder, "mean")
        y = [h_1, ..., h_C] A + b                                         (linear decoder, "linear")

Step (2) is an exact top-k by inner product (``memzoo.kernels.retrieval.chunk_topk``: tiled, the [rows, N] score
matrix never exists for large codebooks) on augmented vectors, [z, 1] . [key, -||key||^2 / 2] = z.key - ||key||^2/2,
whose order is that of -||z - key||^2.  Selection is discrete, so no gradient reaches the keys, the projections or
the encoder; an input moves only the k values it selected in each codebook, which is why learning new classes barely
disturbs old ones.  Keys are initialised on unlabelled inputs, by k-means (``fit_keys``) or by the exponential moving
average of the paper's code (``ema_update_keys``, or ``ema_steps`` training-mode forwards), and then stay fixed.

``DKVBFeedForward`` puts the bottleneck (linear decoder back to d_model) in the channel-mixing slot of a ``Block``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ...kernels.retrieval import chunk_topk
from ..contract import config_from_args

__all__ = ["DKVBConfig", "DiscreteKVBottleneck", "DKVBFeedForward", "DECODERS"]

DECODERS = ("mean", "linear")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


@dataclass(frozen=True)
class DKVBConfig:
    # Width of the encoder output, the bottleneck's input.
    d_in: int
    # C: codebooks (heads), each searched with its own fixed random projection of the input.
    n_codebooks: int = 8
    # N: (key, value) pairs per codebook.
    n_keys: int = 256
    d_key: int = 8
    # Value width; with the non-parametric decoder the number of classes.
    d_value: int = 10
    # Keys fetched per codebook; their values are averaged with equal weights.
    top_k: int = 1
    # "mean": non-parametric (mean over codebooks = logits); "linear": concatenated codebooks -> d_out.
    decoder: str = "mean"
    # Output width of the linear decoder (None with the non-parametric one, whose output is d_value wide).
    d_out: int | None = None
    # Std of the normal init of the values (1.0 as in the paper's code; 0.0 = zeros).
    value_std: float = 1.0
    # Training-mode forwards that update the keys by EMA before they freeze (0: keys come from fit_keys).
    ema_steps: int = 0
    # gamma of the EMA key update (the paper's code: 0.95) and its Laplace smoothing epsilon.
    ema_decay: float = 0.95
    ema_eps: float = 1e-5
    # Keys per search tile, a power of two >= 16 (None: the retrieval op's default / autotuned on CUDA).
    block_n: int | None = None

    def __post_init__(self) -> None:
        for name in ("d_in", "n_codebooks", "n_keys", "d_key", "d_value", "top_k"):
            _positive_int(name, getattr(self, name))
        if self.top_k > self.n_keys:
            raise ValueError(f"top_k={self.top_k} must be <= n_keys={self.n_keys}")
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {self.decoder!r}")
        if self.decoder == "linear":
            _positive_int("d_out (required by the linear decoder)", self.d_out)
        elif self.d_out is not None:
            raise ValueError(f"d_out applies to the linear decoder only; the mean decoder outputs d_value, "
                             f"got d_out={self.d_out!r}")
        if isinstance(self.value_std, bool) or not isinstance(self.value_std, (int, float)) or self.value_std < 0:
            raise ValueError(f"value_std must be a number >= 0, got {self.value_std!r}")
        if isinstance(self.ema_steps, bool) or not isinstance(self.ema_steps, int) or self.ema_steps < 0:
            raise ValueError(f"ema_steps must be an int >= 0, got {self.ema_steps!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if not self.ema_eps > 0:
            raise ValueError(f"ema_eps must be > 0, got {self.ema_eps!r}")
        if self.block_n is not None:
            _positive_int("block_n", self.block_n)
            if self.block_n < 16 or self.block_n & (self.block_n - 1):
                raise ValueError(f"block_n must be a power of two >= 16 (the Triton search's tile), got {self.block_n}")

    @property
    def d_output(self) -> int:
        return self.d_value if self.decoder == "mean" else self.d_out


class DiscreteKVBottleneck(nn.Module):
    """C codebooks of frozen keys and learned values between a frozen encoder and a decoder.

    Args:
        config: a ``DKVBConfig`` (or its fields as keywords).
        encoder: optional frozen module mapping inputs to ``[..., d_in]``; it runs in eval mode without gradient
            and its parameters are frozen. None: the inputs are the encoder outputs.

    Buffers: ``proj`` fp32 ``[C, d_in, d_key]``, ``keys`` fp32 ``[C, N, d_key]``, the EMA statistics ``ema_count``
    ``[C, N]`` and ``ema_sum`` ``[C, N, d_key]``, ``ema_done`` (int64 scalar: EMA updates made) and ``keys_ready``
    (bool scalar).  Parameters: ``values`` ``[C, N, d_value]`` and, for the linear decoder, ``decoder``.
    """

    def __init__(self, config: DKVBConfig | None = None, *, encoder: nn.Module | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.config = c = config_from_args("DiscreteKVBottleneck", DKVBConfig, config, kwargs)
        self.encoder = encoder
        if encoder is not None:
            encoder.requires_grad_(False)
            encoder.eval()
        # A Gaussian projection per codebook, scaled so that ||z_c|| is about ||z|| sqrt(d_key / d_in).
        self.register_buffer("proj", torch.randn(c.n_codebooks, c.d_in, c.d_key) / c.d_in ** 0.5)
        self.register_buffer("keys", torch.randn(c.n_codebooks, c.n_keys, c.d_key))
        self.register_buffer("ema_count", torch.zeros(c.n_codebooks, c.n_keys))
        self.register_buffer("ema_sum", torch.zeros(c.n_codebooks, c.n_keys, c.d_key))
        self.register_buffer("ema_done", torch.zeros((), dtype=torch.int64))
        # Host-side mirror of "ema_done >= ema_steps", so a finished warm-up costs no device sync per forward.
        self._ema_finished = self.config.ema_steps == 0
        self.register_buffer("keys_ready", torch.zeros((), dtype=torch.bool))
        self.values = nn.Parameter(torch.randn(c.n_codebooks, c.n_keys, c.d_value) * c.value_std)
        self.decoder = nn.Linear(c.n_codebooks * c.d_value, c.d_out) if c.decoder == "linear" else None

    def train(self, mode: bool = True) -> DiscreteKVBottleneck:
        super().train(mode)
        if self.encoder is not None:
            self.encoder.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The values and the linear decoder: everything the optimizer should see."""
        return [self.values] + ([] if self.decoder is None else list(self.decoder.parameters()))

    def project(self, x: Tensor) -> Tensor:
        """(1): ``x`` ``[..., d_in]`` (or the encoder's inputs) -> ``z`` fp32 ``[C, M, d_key]``, M = the rows of the
        encoder output (its leading dims flattened); no gradient."""
        return self._project(self._features(x))

    def select(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(2): the ``top_k`` nearest keys of every codebook.

        Args:
            x: ``[..., d_in]`` encoder outputs (or the encoder's inputs), fp32/fp16/bf16.

        Returns:
            ``(idx, dist)``: int64 key indices and fp32 squared distances ``[..., C, top_k]``, nearest first.
        """
        e = self._features(x)
        idx, dist = self._search(self._project(e), self.config.top_k)  # [C, M, k]
        shape = (*e.shape[:-1], *idx.shape[::2])
        return idx.transpose(0, 1).reshape(shape), dist.transpose(0, 1).reshape(shape)

    def forward(self, x: Tensor) -> Tensor:
        """(1)-(4). ``x`` ``[..., d_in]`` (or the encoder's inputs) -> ``y`` ``[..., d_output]`` in the values' dtype
        (the autocast dtype under autocast); the mean decoder's ``y`` are logits (softmax over the last dim)."""
        c = self.config
        e = self._features(x)
        z = self._project(e)  # [C, M, d_key]
        if self.training and not self._ema_finished:
            if int(self.ema_done) < c.ema_steps:
                self._ema_step(z)
            else:
                self._ema_finished = True
        idx, _ = self._search(z, c.top_k)  # [C, M, k]
        books = torch.arange(c.n_codebooks, device=idx.device)[:, None, None]
        h = self.values[books, idx].mean(2)  # [C, M, d_value]
        if self.decoder is None:
            y = h.mean(0)  # [M, d_value]
        else:
            y = self.decoder(h.transpose(0, 1).reshape(h.shape[1], -1))  # [M, d_out]
        return y.reshape(*e.shape[:-1], y.shape[-1])

    @torch.no_grad()
    def fit_keys(self, x: Tensor, *, iters: int = 10, generator: torch.Generator | None = None,
                 batch_rows: int = 65536) -> DiscreteKVBottleneck:
        """Initialise the keys by k-means (Lloyd) on unlabelled inputs and freeze them.

        Each codebook starts from N distinct projected inputs (a random draw), then alternates exact nearest-key
        assignment and centroid updates; a key that no input chose keeps its place.

        Args:
            x: ``[n, d_in]`` (or the encoder's inputs) with n >= n_keys rows.
            iters: Lloyd iterations (>= 0).
            generator: for the initial draw (CPU generator); None uses the global RNG.
            batch_rows: rows projected and assigned at a time.
        """
        c = self.config
        _positive_int("batch_rows", batch_rows)
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
            raise ValueError(f"iters must be an int >= 0, got {iters!r}")
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[0] < c.n_keys:
            got = getattr(x, "shape", type(x).__name__)
            raise ValueError(f"x must hold at least n_keys={c.n_keys} rows, got {got}")
        z = torch.cat([self.project(part) for part in x.split(batch_rows)], 1)
        n = z.shape[1]
        start = torch.stack([torch.randperm(n, generator=generator)[:c.n_keys] for _ in range(c.n_codebooks)])
        keys = torch.gather(z, 1, start.to(z.device)[..., None].expand(-1, -1, c.d_key))  # [C, N, d_key]
        for _ in range(iters):
            self.keys.copy_(keys)
            sums, counts = torch.zeros_like(keys), torch.zeros(keys.shape[:2], device=z.device)
            for part in z.split(batch_rows, 1):
                idx, _ = self._search(part, 1)
                sums.scatter_add_(1, idx.expand(-1, -1, c.d_key), part)
                counts.scatter_add_(1, idx[..., 0], torch.ones_like(idx[..., 0], dtype=counts.dtype))
            keys = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], keys)
        self.keys.copy_(keys)
        # A later ema_update_keys continues from these keys.
        self.ema_sum.copy_(keys)
        self.ema_count.fill_(1.0)
        self.freeze_keys()
        return self

    @torch.no_grad()
    def ema_update_keys(self, x: Tensor) -> None:
        """One EMA key update from a batch of unlabelled inputs ``[..., d_in]`` (the paper's key initialisation;
        call it over a stream, then ``freeze_keys``).  The first call places the keys on random rows of the batch."""
        self._ema_step(self.project(x))

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        # A loaded ema_done may be mid warm-up: read it again at the next training forward.
        self._ema_finished = self.config.ema_steps == 0

    def freeze_keys(self) -> None:
        """Stop all key updates (also the ``ema_steps`` ones)."""
        self.keys_ready.fill_(True)
        self.ema_done.fill_(max(self.config.ema_steps, int(self.ema_done)))

    def _ema_step(self, z: Tensor) -> None:
        """VQ-VAE EMA update with Laplace-smoothed counts: n_i, s_i from top-1 assignment, N_i <- g N_i + (1-g) n_i,
        S_i <- g S_i + (1-g) s_i, key_i = S_i / ((N_i + eps) / (sum N + N eps) sum N)."""
        c = self.config
        C, M, _ = z.shape
        if not bool(self.keys_ready):
            # Start from data: keys on random rows (with replacement when the batch is smaller than the codebook).
            pick = torch.randint(0, M, (C, c.n_keys), device=z.device) if M < c.n_keys else \
                torch.stack([torch.randperm(M, device=z.device)[:c.n_keys] for _ in range(C)])
            self.keys.copy_(torch.gather(z, 1, pick[..., None].expand(-1, -1, c.d_key)))
            self.ema_sum.copy_(self.keys)
            self.ema_count.fill_(1.0)
            self.keys_ready.fill_(True)
        idx, _ = self._search(z, 1)
        counts = torch.zeros_like(self.ema_count).scatter_add_(1, idx[..., 0], torch.ones_like(z[..., 0]))
        sums = torch.zeros_like(self.ema_sum).scatter_add_(1, idx.expand(-1, -1, c.d_key), z)
        g = c.ema_decay
        self.ema_count.mul_(g).add_(counts, alpha=1 - g)
        self.ema_sum.mul_(g).add_(sums, alpha=1 - g)
        total = self.ema_count.sum(1, keepdim=True)
        smoothed = (self.ema_count + c.ema_eps) / (total + c.n_keys * c.ema_eps) * total
        self.keys.copy_(self.ema_sum / smoothed[..., None])
        self.ema_done.add_(1)

    def _search(self, z: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Exact top-k nearest keys: z fp32 ``[C, M, d_key]`` -> (idx int64, squared distances fp32) ``[C, M, k]``."""
        keys = self.keys.float()
        q = torch.cat([z, z.new_ones(*z.shape[:2], 1)], -1)[None]  # [1, C, M, d_key + 1]
        kk = torch.cat([keys, -0.5 * keys.pow(2).sum(-1, keepdim=True)], -1)[None]  # [1, C, N, d_key + 1]
        # The search runs in fp32 also under autocast (the tiled path's matmul would otherwise return bf16 scores).
        with torch.autocast(z.device.type, enabled=False):
            scores, idx = chunk_topk(q, kk, k, block_n=self.config.block_n)
        dist = (z.pow(2).sum(-1, keepdim=True) - 2 * scores[0]).clamp_min(0)
        return idx[0], dist

    def _features(self, x: Any) -> Tensor:
        """The encoder output for ``x`` (``x`` itself without an encoder), validated: floating ``[..., d_in]``."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        what = "x"
        if self.encoder is not None:
            with torch.no_grad():
                self.encoder.eval()
                x = self.encoder(x)
            what = "the encoder output"
            if not isinstance(x, Tensor):
                raise TypeError(f"{what} must be a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{what} must be a floating-point tensor, got {x.dtype}")
        if x.dim() < 1 or x.shape[-1] != self.config.d_in:
            raise ValueError(f"{what} must have shape [..., d_in={self.config.d_in}], got {tuple(x.shape)}")
        if x.numel() == 0:
            raise ValueError(f"{what} must hold at least one row, got shape {tuple(x.shape)}")
        return x

    def _project(self, e: Tensor) -> Tensor:
        with torch.no_grad(), torch.autocast(e.device.type, enabled=False):
            return torch.matmul(e.detach().reshape(1, -1, self.config.d_in).float(), self.proj.float())


class DKVBFeedForward(nn.Module):
    """The bottleneck in a ``Block``'s channel-mixing slot: per token, d_model -> C codebooks -> linear -> d_model.

    ``Block(mixer, d_ff, ffn="dkvb", ffn_opts={...})`` builds it; ``ffn_opts`` are ``DKVBConfig`` fields (``d_in``,
    ``decoder`` and ``d_out`` are fixed by the slot).  The residual stream is the frozen encoder: no gradient flows
    from this slot into its input (the residual path still carries it), and keys warm up by EMA over the first
    ``ema_steps`` training forwards (the ``tiny-dkvb`` preset: 50), then freeze.  Stateless per token, so any split of
    a sequence and ``step`` give the same outputs as one pass (in eval mode, or once the keys are frozen).
    """

    DEFAULTS: dict[str, Any] = {"n_codebooks": 8, "n_keys": 512, "d_key": 16, "d_value": 32, "value_std": 1.0}

    def __init__(self, d_model: int, **opts: Any) -> None:
        super().__init__()
        fixed = {"d_in", "decoder", "d_out"} & set(opts)
        if fixed:
            raise ValueError(f"ffn_opts may not set {sorted(fixed)}: the FFN slot fixes d_in = d_out = d_model "
                             "and the linear decoder")
        self.bottleneck = DiscreteKVBottleneck(
            DKVBConfig(d_in=d_model, decoder="linear", d_out=d_model, **{**self.DEFAULTS, **opts}))

    def forward(self, x: Tensor) -> Tensor:
        return self.bottleneck(x).to(x.dtype)
