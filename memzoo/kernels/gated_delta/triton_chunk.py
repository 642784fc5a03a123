"""Chunked gated delta rule on GPU: the op, its backward (a Triton reverse state pass plus one batched
vector-Jacobian product for the chunk-parallel part) and the autograd wiring; the forward kernels (blockwise WY
solve, w/u, state pass, outputs; tensor-core dots) live in ``triton_chunk_fwd.py``.

Paper: "Gated Delta Networks: Improving Mamba2 with Delta Rule" (arXiv 2412.06464); chunking after
"Parallelizing Linear Transformers with the Delta Rule over Sequence Length" (arXiv 2406.06484).
Recurrence, state S [K, V]:  S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T,
o_t = scale * S_t^T q_t.  Derivation, steps 1-5 and the saved / recomputed tensors: README.md next to this file.

Everything runs in varlen form: B > 1 is flattened into one packed sequence ``[T, H, D]``. Chunk-parallel kernels
run over the (sequence, chunk) rows of ``chunk_table`` (a static bound of ceil(T / BT) + N rows, no host sync;
surplus rows exit at once); the sequential state passes run one program per (V tile, sequence, head) with the fp32
state tile in registers and address chunk c of sequence n as row ``chunk_offsets[n] + c``.  The backward gathers
tokens into a chunk-major layout ``[R, H, BT, D]`` padded with g = beta = q = k = v = 0 (an exact identity update)
and differentiates steps 1-3 and 5 there with ``torch.func.vjp``, in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..triton_utils import autotune_or_fixed
from ..utils import chunk_table, flatten_batch, resolve_dot_precision, seq_boundaries
from .reference import l2norm, wy_transform
from .triton_chunk_fwd import MAX_CHUNK, STATE_CONFIGS, STATE_DEFAULT, forward_output, state_block
from .triton_chunk_fwd import forward_states as _forward_states

__all__ = ["chunk_gated_delta_rule_triton"]



@triton.jit
def _dstate_tile_store(p, b_dh, o_t, o_kv, i_kt: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr):
    # One K tile of a state gradient (columns past V carry an out-of-range offset in o_kv).
    o_k = i_kt * BK + tl.arange(0, BK)
    tl.store(p + i_kt * BK * V + o_kv, b_dh, mask=(o_k < K)[:, None] & (o_kv < 1 << 30))


@triton.jit
def _dstate_tile_dd(k_tail, p_k, b_dh, b_dd, o_t, i_kt: tl.constexpr, K: tl.constexpr, BK: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    # dD += k_tail[:, tile] dS[tile]
    o_k = i_kt * BK + tl.arange(0, BK)
    b_kt = tl.load(k_tail + p_k + o_t[:, None] * K + o_k[None, :], mask=(o_k < K)[None, :], other=0.0)  # [BT, BK]
    return tl.dot(b_kt, b_dh, b_dd, input_precision=DOT_PRECISION)


@triton.jit
def _dstate_tile_update(w, q_gate, p_k, b_dh, b_do, b_dd, b_decay, o_t, i_kt: tl.constexpr, K: tl.constexpr,
                        BK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # dS[tile] <- exp(G_last) dS[tile] + q_gate[:, tile]^T dO - w[:, tile]^T dD
    o_k = i_kt * BK + tl.arange(0, BK)
    # Loaded transposed ([BK, BT]) so the tiles enter the dots as they are.
    o_kt = p_k + o_k[:, None] + o_t[None, :] * K
    m_k = (o_k < K)[:, None]
    b_qg = tl.load(q_gate + o_kt, mask=m_k, other=0.0)  # [BK, BT]
    b_dh = tl.dot(b_qg, b_do, b_dh * b_decay, input_precision=DOT_PRECISION)
    b_w = tl.load(w + o_kt, mask=m_k, other=0.0)  # [BK, BT]
    return tl.dot(-b_w, b_dd, b_dh, input_precision=DOT_PRECISION)


@autotune_or_fixed(STATE_CONFIGS, key=["H", "K", "V", "BT", "DOT_PRECISION"], default=STATE_DEFAULT)
@triton.jit
def _state_bwd_kernel(
    w, k_tail, q_gate, g_last, do, dv_local, dht, dh_end, dh0, cu_seqlens, chunk_offsets,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    USE_FINAL_STATE_GRADIENT: tl.constexpr, USE_INITIAL_STATE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Reverse pass: dS (the gradient of the state at a chunk's end) walks the chunks backwards,
    #   dD = dv_local + k_tail dS,    dS <- exp(G_last) dS + q_gate^T dO - w^T dD;
    # dh_end gets dS at the end of every chunk, dh0 the gradient of the initial state. The inputs are chunk-major
    # fp32 [R, H, BT, D]; dS is split into up to four [BK, BV] tiles (K <= 4 BK).
    i_v, i_n, i_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n64 = tl.cast(i_n, tl.int64)
    bos = tl.load(cu_seqlens + i_n64).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n64 + 1).to(tl.int64)
    n_chunks = tl.cdiv(eos - bos, BT)
    row0 = tl.load(chunk_offsets + i_n64).to(tl.int64)
    o_t = tl.arange(0, BT)
    o_b = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    # int64 only in scalar bases; tile offsets are int32 (masked-out V columns get an out-of-range offset).
    o_kv = tl.where(m_v[None, :], o_b[:, None] * V + o_v[None, :], 1 << 30)  # [BK, BV]
    o_tv = o_t[:, None] * V + o_v[None, :]  # [BT, BV]
    p_state = (i_n64 * H + i_h) * K * V
    b_dh1 = tl.zeros([BK, BV], dtype=tl.float32)
    b_dh2 = tl.zeros([BK, BV], dtype=tl.float32)
    b_dh3 = tl.zeros([BK, BV], dtype=tl.float32)
    b_dh4 = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_FINAL_STATE_GRADIENT:
        b_dh1 = tl.load(dht + p_state + o_kv, mask=(o_b < K)[:, None] & m_v[None, :], other=0.0)
        if K > BK:
            b_dh2 = tl.load(dht + p_state + BK * V + o_kv, mask=(o_b + BK < K)[:, None] & m_v[None, :], other=0.0)
        if K > 2 * BK:
            b_dh3 = tl.load(dht + p_state + 2 * BK * V + o_kv, mask=(o_b + 2 * BK < K)[:, None] & m_v[None, :],
                            other=0.0)
        if K > 3 * BK:
            b_dh4 = tl.load(dht + p_state + 3 * BK * V + o_kv, mask=(o_b + 3 * BK < K)[:, None] & m_v[None, :],
                            other=0.0)
    for i_c in range(0, n_chunks):
        i_r = row0 + n_chunks - 1 - tl.cast(i_c, tl.int64)
        i_rh = i_r * H + i_h
        p_end = dh_end + i_rh * K * V
        p_k = i_rh * BT * K
        _dstate_tile_store(p_end, b_dh1, o_t, o_kv, 0, K, V, BK)
        b_do = tl.load(do + i_rh * BT * V + o_tv, mask=m_v[None, :], other=0.0)  # [BT, BV]
        b_dd = tl.load(dv_local + i_rh * BT * V + o_tv, mask=m_v[None, :], other=0.0)  # [BT, BV]
        b_dd = _dstate_tile_dd(k_tail, p_k, b_dh1, b_dd, o_t, 0, K, BK, DOT_PRECISION)
        if K > BK:
            _dstate_tile_store(p_end, b_dh2, o_t, o_kv, 1, K, V, BK)
            b_dd = _dstate_tile_dd(k_tail, p_k, b_dh2, b_dd, o_t, 1, K, BK, DOT_PRECISION)
        if K > 2 * BK:
            _dstate_tile_store(p_end, b_dh3, o_t, o_kv, 2, K, V, BK)
            b_dd = _dstate_tile_dd(k_tail, p_k, b_dh3, b_dd, o_t, 2, K, BK, DOT_PRECISION)
        if K > 3 * BK:
            _dstate_tile_store(p_end, b_dh4, o_t, o_kv, 3, K, V, BK)
            b_dd = _dstate_tile_dd(k_tail, p_k, b_dh4, b_dd, o_t, 3, K, BK, DOT_PRECISION)
        b_decay = tl.exp(tl.load(g_last + i_rh))
        b_dh1 = _dstate_tile_update(w, q_gate, p_k, b_dh1, b_do, b_dd, b_decay, o_t, 0, K, BK, DOT_PRECISION)
        if K > BK:
            b_dh2 = _dstate_tile_update(w, q_gate, p_k, b_dh2, b_do, b_dd, b_decay, o_t, 1, K, BK, DOT_PRECISION)
        if K > 2 * BK:
            b_dh3 = _dstate_tile_update(w, q_gate, p_k, b_dh3, b_do, b_dd, b_decay, o_t, 2, K, BK, DOT_PRECISION)
        if K > 3 * BK:
            b_dh4 = _dstate_tile_update(w, q_gate, p_k, b_dh4, b_do, b_dd, b_decay, o_t, 3, K, BK, DOT_PRECISION)
    if USE_INITIAL_STATE:
        _dstate_tile_store(dh0 + p_state, b_dh1, o_t, o_kv, 0, K, V, BK)
        if K > BK:
            _dstate_tile_store(dh0 + p_state, b_dh2, o_t, o_kv, 1, K, V, BK)
        if K > 2 * BK:
            _dstate_tile_store(dh0 + p_state, b_dh3, o_t, o_kv, 2, K, V, BK)
        if K > 3 * BK:
            _dstate_tile_store(dh0 + p_state, b_dh4, o_t, o_kv, 3, K, V, BK)


def _state_backward(w, k_tail, q_gate, g_last, do, dv_local, dht, want_dh0, cu, chunk_offsets, n_seq, precision):
    """Launch the reverse state pass; returns (dh_end ``[R, H, K, V]``, dh0 ``[N, H, K, V]`` or None), fp32."""
    w, k_tail, q_gate, g_last, do, dv_local = (x.contiguous() for x in (w, k_tail, q_gate, g_last, do, dv_local))
    R, H, BT, K = w.shape
    V = do.shape[-1]
    dh_end = w.new_empty(R, H, K, V)
    dh0 = w.new_empty(n_seq, H, K, V) if want_dh0 else None
    grid = lambda meta: (triton.cdiv(V, meta["BV"]), n_seq, H)
    _state_bwd_kernel[grid](
        w, k_tail, q_gate, g_last, do, dv_local, dht, dh_end, dh0, cu, chunk_offsets,
        H=H, K=K, V=V, BT=BT, BK=state_block(K),
        USE_FINAL_STATE_GRADIENT=dht is not None, USE_INITIAL_STATE=want_dh0, DOT_PRECISION=precision,
    )
    return dh_end, dh0


class _ChunkLayout:
    """Where every token sits in the chunk-major layout ``[R, H, BT, ...]``, built on the device (no host sync).

    ``gather`` maps token-major ``[T, H, ...]`` to chunk-major (padding rows and slots read zeros); ``scatter``
    maps back (each token has exactly one slot, so this is a gather too).
    """

    def __init__(self, cu: Tensor, total: int, chunk_size: int):
        n_seq = cu.numel() - 1
        lengths = cu[1:] - cu[:-1]  # [N]
        n_chunks = (lengths + chunk_size - 1) // chunk_size  # [N]
        self.chunk_offsets = n_chunks.cumsum(0) - n_chunks  # [N]
        self.table = chunk_table(cu, total, chunk_size).contiguous()  # [R, 2] int32
        seq, chunk = self.table[:, 0].to(torch.int64), self.table[:, 1].to(torch.int64)
        self.row_valid = seq >= 0  # [R]
        seq_c = seq.clamp(min=0)
        tok = (cu[seq_c] + chunk * chunk_size)[:, None] + torch.arange(chunk_size, device=cu.device)  # [R, BT]
        valid = self.row_valid[:, None] & (tok < cu[seq_c + 1][:, None])
        self.tok = torch.where(valid, tok, total)  # [R, BT], ``total`` names the zero padding slot
        tseq, tpos = seq_boundaries(cu, total)
        self.slot = (self.chunk_offsets[tseq] + tpos // chunk_size) * chunk_size + tpos % chunk_size  # [T]
        self.rows, self.n_seq, self.total = self.table.shape[0], n_seq, total

    def gather(self, x: Tensor) -> Tensor:
        x = torch.cat((x, x.new_zeros(1, *x.shape[1:])))  # [T + 1, H, ...]
        x = x[self.tok]  # [R, BT, H, ...]
        return x.transpose(1, 2).contiguous()  # [R, H, BT, ...]

    def scatter(self, x: Tensor) -> Tensor:
        x = x.transpose(1, 2).reshape(self.rows * x.shape[2], *x.shape[1:2], *x.shape[3:])  # [R * BT, H, ...]
        return x[self.slot]  # [T, H, ...]


def _prep(k, v, g, beta):
    """Steps 1-2 (gate cumsum, WY transform) for every chunk row; also the decayed keys of the state update."""
    G = g.cumsum(-1)  # [R, H, BT]
    decay, w, u = wy_transform(k, v, G, beta)
    g_last = G[..., -1]  # [R, H]
    k_tail = k * (g_last[..., None] - G).exp()[..., None]  # [R, H, BT, K]
    return G, decay, w, u, g_last, k_tail


def _chunk_tail(q, k, G, decay, w, u, g_last, k_tail, h_start, scale):
    """Steps 3-5 for every chunk row from its start state: (o, end state), plus what the reverse pass needs."""
    d = u - w @ h_start  # [R, H, BT, V]
    q_gate = scale * q * G.exp()[..., None]  # [R, H, BT, K]
    attn = scale * (q @ k.transpose(-1, -2)) * decay  # [R, H, BT, BT]
    o = q_gate @ h_start + attn @ d
    h_end = g_last.exp()[..., None, None] * h_start + k_tail.transpose(-1, -2) @ d
    return (o, h_end), (q_gate, attn)


def _chunk_forward(q, k, v, g, beta, h0, cu, scale, chunk_size, precision):
    """Packed inputs ``[T, H, ...]`` -> (o ``[T, H, V]`` in q's dtype, ht fp32 ``[N, H, K, V]``)."""
    layout = _ChunkLayout(cu, q.shape[0], chunk_size)
    g_cum, _, _, _, v_new, h, ht = _forward_states(k, v, g, beta, h0, cu, layout.table, layout.chunk_offsets,
                                                   chunk_size, precision)
    o = forward_output(q, k, v_new, h, g_cum, cu, layout.table, scale, chunk_size, precision, q.dtype)
    return o, ht


def _chunk_backward(q, k, v, g, beta, h0, cu, do, dht, scale, chunk_size, precision):
    """Gradients of every input: recompute the start states, run the reverse state pass for the gradients of the
    end states, then chain the batched vector-Jacobian products of steps 3-5 and of steps 1-2."""
    layout = _ChunkLayout(cu, q.shape[0], chunk_size)
    qc, kc, vc, gc, bc = (layout.gather(x.float()) for x in (q, k, v, g, beta))
    h_start = _forward_states(k, v, g, beta, h0, cu, layout.table, layout.chunk_offsets, chunk_size, precision)[5]
    # Rows past the last chunk are never written by the kernel: zero them so they cannot leak.
    h_start = torch.where(layout.row_valid[:, None, None, None], h_start.float(), 0.0)
    prep, prep_vjp = torch.func.vjp(_prep, kc, vc, gc, bc)
    G, decay, w, u, g_last, k_tail = prep
    tail_fn = lambda q_, k_, *p: _chunk_tail(q_, k_, *p, h_start, scale)
    _, tail_vjp, (q_gate, attn) = torch.func.vjp(tail_fn, qc, kc, *prep, has_aux=True)
    do_c = layout.gather(do.float())  # [R, H, BT, V]
    dv_local = attn.transpose(-1, -2) @ do_c
    dh_end, dh0 = _state_backward(
        w, k_tail, q_gate, g_last, do_c, dv_local, dht.contiguous(), h0 is not None, cu, layout.chunk_offsets,
        layout.n_seq, precision,
    )
    dh_end = torch.where(layout.row_valid[:, None, None, None], dh_end, 0.0)
    dqc, dkc_tail, *dprep = tail_vjp((do_c, dh_end))
    dkc, dvc, dgc, dbc = prep_vjp(tuple(dprep))
    grads = (dqc, dkc + dkc_tail, dvc, dgc, dbc)
    dq, dk, dv, dg, dbeta = (layout.scatter(gr).to(x.dtype) for gr, x in zip(grads, (q, k, v, g, beta)))
    return dq, dk, dv, dg, dbeta, (dh0 if dh0 is not None else h_start.new_zeros(0))


@torch.library.custom_op("memzoo::gated_delta_chunk_fwd", mutates_args=())
def _chunk_fwd_op(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, h0: Tensor | None, cu: Tensor, scale: float,
    chunk_size: int, precision: str,
) -> tuple[Tensor, Tensor]:
    return _chunk_forward(q, k, v, g, beta, h0, cu, scale, chunk_size, precision)


@_chunk_fwd_op.register_fake
def _(q, k, v, g, beta, h0, cu, scale, chunk_size, precision):
    T, H, K = q.shape
    return v.new_empty(T, H, v.shape[-1], dtype=q.dtype), q.new_empty(cu.shape[0] - 1, H, K, v.shape[-1],
                                                                       dtype=torch.float32)


@torch.library.custom_op("memzoo::gated_delta_chunk_bwd", mutates_args=())
def _chunk_bwd_op(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, h0: Tensor | None, cu: Tensor, do: Tensor,
    dht: Tensor, scale: float, chunk_size: int, precision: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _chunk_backward(q, k, v, g, beta, h0, cu, do, dht, scale, chunk_size, precision)


@_chunk_bwd_op.register_fake
def _(q, k, v, g, beta, h0, cu, do, dht, scale, chunk_size, precision):
    dh0 = h0.new_empty(h0.shape) if h0 is not None else q.new_empty(0, dtype=torch.float32)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(g),
            torch.empty_like(beta), dh0)


def _setup_context(ctx, inputs, output):
    q, k, v, g, beta, h0, cu, scale, chunk_size, precision = inputs
    ctx.save_for_backward(q, k, v, g, beta, h0, cu)
    ctx.scale, ctx.chunk_size, ctx.precision = scale, chunk_size, precision


def _backward(ctx, do, dht):
    q, k, v, g, beta, h0, cu = ctx.saved_tensors
    if do is None:
        do = torch.zeros(q.shape[:2] + v.shape[-1:], dtype=q.dtype, device=q.device)
    if dht is None:
        dht = torch.zeros(cu.shape[0] - 1, q.shape[1], q.shape[2], v.shape[-1], device=q.device)
    dq, dk, dv, dg, dbeta, dh0 = _chunk_bwd_op(q, k, v, g, beta, h0, cu, do, dht, ctx.scale, ctx.chunk_size,
                                               ctx.precision)
    return dq, dk, dv, dg, dbeta, (dh0 if h0 is not None else None), None, None, None, None


_chunk_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def chunk_gated_delta_rule_triton(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, scale: float | None = None,
    initial_state: Tensor | None = None, output_final_state: bool = False, cu_seqlens: Tensor | None = None,
    use_qk_l2norm: bool = False, chunk_size: int = 64, precision: str | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The Triton path of ``chunk_gated_delta_rule`` (inputs already validated by the dispatcher)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    if chunk_size < 16 or chunk_size & (chunk_size - 1) or chunk_size > MAX_CHUNK:
        raise ValueError(f"chunk_size must be a power of two >= 16 and <= {MAX_CHUNK} on the Triton path (the "
                         f"blockwise solve merges up to four 16x16 blocks), got {chunk_size}")
    precision = resolve_dot_precision(precision)
    if K > 256:
        raise ValueError(f"the Triton path keeps a [K, BV] state tile in registers: K must be <= 256, got {K}")
    if scale is None:
        scale = K ** -0.5
    out_dtype = q.dtype
    if use_qk_l2norm:
        # Normalised in fp32 (autograd carries the l2norm backward), then back to the input dtype so every
        # kernel sees one dtype.
        q, k = l2norm(q.float()).to(out_dtype), l2norm(k.float()).to(out_dtype)
    (q, cu), (k, _), (v, _), (g, _), (beta, _) = (flatten_batch(x, cu_seqlens) for x in (q, k, v, g, beta))
    h0 = None if initial_state is None else initial_state.contiguous()
    q, k, v, g, beta = (x[0].contiguous() for x in (q, k, v, g, beta))
    o, ht = _chunk_fwd_op(q, k, v, g, beta, h0, cu, float(scale), chunk_size, precision)
    return o.reshape(B, T, H, V).to(out_dtype), (ht if output_final_state else None)
