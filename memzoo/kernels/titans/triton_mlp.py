"""Triton forward of the 2-layer MLP Titans memory: the chunk walk and the dual-form reads of ``mlp_chunk.py``.

Paper: "Titans: Learning to Memorize at Test Time" (arXiv 2501.00663), eqs 13-18, with TTT's dual form (arXiv
2407.04620) for the reads; the derivation is in README.md ("MLP memory").  Per chunk of b tokens with start weights
X = [W | S] (both matrices as ``[E, D]``: A1 and A2^T, momentum beside the weights) and gradient base B:

    (a) H = K B2,  A = gelu(H),  Z = A B1,  G_z = LN_bwd(Z, psi(K + LN(Z) - V)),  G_h = (G_z B1^T) gelu'(H)
    (b) H_q = beta Q A2 + f Q S2 - (G^(2) * QK^T) G_h,  A_q = gelu(H_q),
        p = A_q [A1 | S1],  corr = (G^(1) * A_q A^T) G_z   (Z_q = beta p_W + f p_S - corr)
    (c) A1' = beta_b A1 + f_b S1 - A^T diag(G^(1)_b) G_z,  S1' = m_b S1 - A^T diag(N^(1)_b) G_z   (A2: K, G_h)

One program per (sequence, head) walks its chunks.  The four ``[E, D]`` matrices do not fit on chip at D = 64,
E = 256 (256 KB fp32), so the states live in an fp32 workspace in global memory (L2-resident on a GPU): chunk c
reads slot c and writes slot c + 1, E streamed in tiles of BE rows.  When the backward will run every chunk's start
state is kept (slots ``[2, NC + 1, N, H, E, 2D]``, what the backward,
``mlp_chunk``'s or ``triton_mlp_bwd``'s reverse walk, reads); otherwise two
slots alternate.  Per chunk four E loops: (a) H per tile into a per-program scratch ``[3, b, E]`` and Z (a ``[b, D]``
tile: the LayerNorm needs all of it), then G_z; G_h into the scratch; (b) the hidden reads (A_q into the scratch)
and the update of A2; (c) the output reads (accumulating p and the ``[b, b]`` product A_q A^T over E) and the update
of A1.  Split so, no loop keeps more than two ``[b, D]`` operands with a reduction over D live (each is replicated
in every warp).  The in-chunk coefficients (beta, f, G^(m), N^(m), the QK^T mask) come in from ``mlp_chunk``'s
PyTorch front end, on the grid of chunks where padded rows are exact identities, so varlen, start_pos and partial
chunks need no care here.  Dots take input-dtype operands with fp32 accumulation (TF32 for fp32 inputs unless
``precision="ieee"``); the states stay fp32 (float64 inputs, run by the interpreter for exactness tests, keep
float64 throughout).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .reference import LN_EPS, Miras

__all__ = ["titans_mlp_walk_triton"]

_ERROR_MAPS = {"l2": 0, "lp": 1, "huber": 2}
_EPS = tl.constexpr(LN_EPS)
_DOT_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
               torch.float64: tl.float64}


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))


@triton.jit
def _gelu_grad(x):
    return 0.5 * (1.0 + tl.erf(x * 0.7071067811865476)) + x * tl.exp(-0.5 * x * x) * 0.3989422804014327


@triton.jit
def _psi(r, ERROR_MAP: tl.constexpr, lp_p, lp_eps, huber_delta):
    """The Miras error map, coordinate-wise: 0 l2 (r), 1 lp (p r (r^2 + eps)^((p-2)/2)), 2 huber (clamp)."""
    if ERROR_MAP == 1:
        out = lp_p * r * tl.exp((lp_p - 2.0) * 0.5 * tl.log(r * r + lp_eps))
    elif ERROR_MAP == 2:
        out = tl.minimum(tl.maximum(r, -huber_delta), huber_delta)
    else:
        out = r
    return out


@triton.jit
def _chunk_offsets(D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr):
    """A chunk's int32 tile offsets: rows o_t ``[BT]``, columns o_d ``[D]`` and o_e ``[BE]``; o_td ``[BT, D]`` in a
    ``[BT, D]`` block, o_tq ``[BT, D]`` the first half of a ``[BT, 2D]`` block, o_te ``[BT, BE]`` a tile of a
    ``[BT, E]`` block."""
    o_t = tl.arange(0, BT)
    o_d = tl.arange(0, D)
    o_e = tl.arange(0, BE)
    return (o_t, o_d, o_e, o_t[:, None] * D + o_d[None, :], o_t[:, None] * (2 * D) + o_d[None, :],
            o_t[:, None] * E + o_e[None, :])


@triton.jit
def _copy_rows(src, dst, src_stride, dst_stride, E: tl.constexpr, W: tl.constexpr, BE: tl.constexpr):
    """dst[:E, :W] = src[:E, :W], rows ``src_stride`` / ``dst_stride`` apart."""
    o_e = tl.arange(0, BE)
    o_w = tl.arange(0, W)
    for i_e in range(0, E // BE):
        o_r = i_e * BE + o_e
        b_x = tl.load(src + o_r[:, None] * src_stride + o_w[None, :])  # [BE, W]
        tl.store(dst + o_r[:, None] * dst_stride + o_w[None, :], b_x)


@triton.jit
def _chunk_base(p_in, p_b0, sz_b0, sz_mat, first, D: tl.constexpr):
    """The gradient base of a chunk, matrix 1 and 2 pointers and their row stride: the initial base (rows D apart) in
    the first chunk, else the weight columns of the chunk's start state (rows 2D apart)."""
    return tl.where(first, p_b0, p_in), tl.where(first, p_b0 + sz_b0, p_in + sz_mat), tl.where(first, D, 2 * D)


@triton.jit
def _lq_retain(p_x, lq_q, lq_eps, E: tl.constexpr, D: tl.constexpr, BE: tl.constexpr):
    """W <- W / (||W||_q^q + eps)^((q-2)/q) on the weight columns of one ``[E, 2D]`` state."""
    o_e = tl.arange(0, BE)
    o_d = tl.arange(0, D)
    b_acc = tl.zeros([BE, D], dtype=p_x.dtype.element_ty)
    for i_e in range(0, E // BE):
        o_w = (i_e * BE + o_e)[:, None] * (2 * D) + o_d[None, :]
        b_a = tl.maximum(tl.abs(tl.load(p_x + o_w)), 1e-30)
        b_acc += tl.exp(lq_q * tl.log(b_a))
    b_c = tl.exp(-(lq_q - 2.0) / lq_q * tl.log(tl.sum(b_acc) + lq_eps))
    for i_e in range(0, E // BE):
        o_w = (i_e * BE + o_e)[:, None] * (2 * D) + o_d[None, :]
        tl.store(p_x + o_w, tl.load(p_x + o_w) * b_c)


@triton.jit(do_not_specialize=["NC", "NH", "H"])
def _titans_mlp_fwd_kernel(
    qq, m2, g1, k, v, ends, g_end, n_end, n_real, next_chunk, base0, xs, p_out, corr_out, x_end, base_end, scratch,
    NC, NH, H, lp_p, lp_eps, huber_delta, lq_q, lq_eps,
    D: tl.constexpr, E: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr, STORE_STATES: tl.constexpr,
    ERROR_MAP: tl.constexpr, RETAIN_LQ: tl.constexpr, DT: tl.constexpr, ACC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_nh = tl.program_id(0)
    i_n = i_nh // H
    n_chunks = tl.load(n_real + i_n).to(tl.int32)
    i_next = tl.load(next_chunk + i_n).to(tl.int32)
    o_t, o_d, o_e, o_td, o_tq, o_te = _chunk_offsets(D, E, BT, BE)
    o_tt = o_t[:, None] * BT + o_t[None, :]  # [BT, BT]
    # This program's scratch: H, G_h, A_q of the current chunk, [3, BT, E].
    p_sh = scratch + tl.cast(i_nh, tl.int64) * (3 * BT * E)
    # int64 only in scalar bases; tile offsets are int32.
    sz_state = E * 2 * D
    if STORE_STATES:
        n_slots = NC + 1
    else:
        n_slots = 2
    sz_slot = tl.cast(NH, tl.int64) * sz_state
    sz_mat = n_slots * sz_slot
    p_x = xs + tl.cast(i_nh, tl.int64) * sz_state  # matrix 0 (A1 | S1), slot 0; matrix 1 (A2^T | S2^T) sz_mat on
    p_b0 = base0 + tl.cast(i_nh, tl.int64) * (E * D)  # the initial base of matrix 0; matrix 1 NH * E * D on
    sz_b0 = tl.cast(NH, tl.int64) * (E * D)
    p_be = base_end + tl.cast(i_nh, tl.int64) * (E * D)
    # The returned base is the start of the chunk holding the next token: the initial base when that is the first.
    if i_next == 0:
        _copy_rows(p_b0, p_be, D, D, E, D, BE)
        _copy_rows(p_b0 + sz_b0, p_be + sz_b0, D, D, E, D, BE)
    for i_c in range(0, n_chunks):
        if STORE_STATES:
            s_in = i_c
            s_new = i_c + 1
        else:
            s_in = i_c % 2
            s_new = 1 - s_in
        p_in = p_x + s_in * sz_slot
        p_new = p_x + s_new * sz_slot
        p_g1, p_g2, rs = _chunk_base(p_in, p_b0, sz_b0, sz_mat, i_c == 0, D)
        p_tok = tl.cast(i_c, tl.int64) * NH + i_nh
        b_k = tl.load(k + p_tok * (BT * D) + o_td)  # [BT, D]
        b_v = tl.load(v + p_tok * (BT * D) + o_td)  # [BT, D]
        b_kd = b_k.to(DT)

        # (a) The base pass: H = K B2 (kept in the scratch rows), Z = gelu(H) B1 over E tiles, then the LayerNorm
        # backward of psi(r) on D.
        b_z = tl.zeros([BT, D], dtype=ACC)
        for i_e in range(0, E // BE):
            o_g = (i_e * BE + o_e)[:, None] * rs + o_d[None, :]  # [BE, D]
            b_h = tl.dot(b_kd, tl.trans(tl.load(p_g2 + o_g).to(DT)), input_precision=DOT_PRECISION)  # [BT, BE]
            tl.store(p_sh + i_e * BE + o_te, b_h)
            b_z = tl.dot(_gelu(b_h).to(DT), tl.load(p_g1 + o_g).to(DT), b_z, input_precision=DOT_PRECISION)
        b_zc = b_z - (tl.sum(b_z, axis=1) / D)[:, None]
        b_rstd = 1.0 / tl.sqrt(tl.sum(b_zc * b_zc, axis=1) / D + _EPS)  # [BT]
        b_y = b_zc * b_rstd[:, None]  # [BT, D]
        b_err = _psi(b_k + b_y - b_v, ERROR_MAP, lp_p, lp_eps, huber_delta)
        b_gz = b_rstd[:, None] * (b_err - (tl.sum(b_err, axis=1) / D)[:, None]
                                  - b_y * (tl.sum(b_err * b_y, axis=1) / D)[:, None])  # [BT, D]
        b_gzd = b_gz.to(DT)
        tl.debug_barrier()
        # G_h = (G_z B1^T) gelu'(H), per E tile into the scratch rows.
        for i_e in range(0, E // BE):
            o_g = (i_e * BE + o_e)[:, None] * rs + o_d[None, :]  # [BE, D]
            b_gh = tl.dot(b_gzd, tl.trans(tl.load(p_g1 + o_g).to(DT)), input_precision=DOT_PRECISION)  # [BT, BE]
            tl.store(p_sh + BT * E + i_e * BE + o_te, b_gh * _gelu_grad(tl.load(p_sh + i_e * BE + o_te)))
        tl.debug_barrier()

        # (b) The hidden reads and the update of matrix 2 (A2^T | S2^T: lhs G_h, rows K), A_q into the scratch rows.
        b_qb = tl.load(qq + p_tok * (BT * 2 * D) + o_tq).to(DT)  # [BT, D] beta * q
        b_qf = tl.load(qq + p_tok * (BT * 2 * D) + D + o_tq).to(DT)  # [BT, D] f * q
        b_m2 = tl.load(m2 + p_tok * (BT * BT) + o_tt).to(DT)  # [BT, BT] G^(2) * QK^T
        beta_b = tl.load(ends + p_tok * 3)
        f_b = tl.load(ends + p_tok * 3 + 1)
        m_b = tl.load(ends + p_tok * 3 + 2)
        p_ge = (tl.cast(i_c, tl.int64) * 2 * NH + i_nh) * BT
        b_ge2 = tl.load(g_end + p_ge + NH * BT + o_t)  # [BT] the chunk-end row of G^(2)
        b_ne2 = tl.load(n_end + p_ge + NH * BT + o_t)  # [BT] the chunk-end row of N^(2)
        for i_e in range(0, E // BE):
            o_w = (i_e * BE + o_e)[:, None] * (2 * D) + o_d[None, :]  # [BE, D]
            b_gh = tl.load(p_sh + BT * E + i_e * BE + o_te)  # [BT, BE]
            b_w = tl.load(p_in + sz_mat + o_w)  # [BE, D]
            b_s = tl.load(p_in + sz_mat + D + o_w)  # [BE, D]
            b_hq = tl.dot(b_qb, tl.trans(b_w.to(DT)), input_precision=DOT_PRECISION)  # [BT, BE]
            b_hq = tl.dot(b_qf, tl.trans(b_s.to(DT)), b_hq, input_precision=DOT_PRECISION)
            b_hq -= tl.dot(b_m2, b_gh.to(DT), input_precision=DOT_PRECISION)
            tl.store(p_sh + 2 * BT * E + i_e * BE + o_te, _gelu(b_hq))
            b_wn = tl.dot(tl.trans((b_gh * -b_ge2[:, None]).to(DT)), b_kd, beta_b * b_w + f_b * b_s,
                          input_precision=DOT_PRECISION)
            tl.store(p_new + sz_mat + o_w, b_wn)
            b_sn = tl.dot(tl.trans((b_gh * -b_ne2[:, None]).to(DT)), b_kd, m_b * b_s, input_precision=DOT_PRECISION)
            tl.store(p_new + sz_mat + D + o_w, b_sn)
        tl.debug_barrier()

        # (c) The output reads p = A_q [A1 | S1], A_q A^T, and the update of matrix 1 (A1 | S1: lhs A, rows G_z).
        b_ge1 = tl.load(g_end + p_ge + o_t)  # [BT] the chunk-end row of G^(1)
        b_ne1 = tl.load(n_end + p_ge + o_t)  # [BT] the chunk-end row of N^(1)
        b_pw = tl.zeros([BT, D], dtype=ACC)
        b_ps = tl.zeros([BT, D], dtype=ACC)
        b_sa = tl.zeros([BT, BT], dtype=ACC)  # A_q A^T
        for i_e in range(0, E // BE):
            o_w = (i_e * BE + o_e)[:, None] * (2 * D) + o_d[None, :]  # [BE, D]
            b_a = _gelu(tl.load(p_sh + i_e * BE + o_te))  # [BT, BE]
            b_aq = tl.load(p_sh + 2 * BT * E + i_e * BE + o_te).to(DT)  # [BT, BE]
            b_w = tl.load(p_in + o_w)  # [BE, D]
            b_s = tl.load(p_in + D + o_w)  # [BE, D]
            b_pw = tl.dot(b_aq, b_w.to(DT), b_pw, input_precision=DOT_PRECISION)
            b_ps = tl.dot(b_aq, b_s.to(DT), b_ps, input_precision=DOT_PRECISION)
            b_sa = tl.dot(b_aq, tl.trans(b_a.to(DT)), b_sa, input_precision=DOT_PRECISION)
            b_wn = tl.dot(tl.trans((b_a * -b_ge1[:, None]).to(DT)), b_gzd, beta_b * b_w + f_b * b_s,
                          input_precision=DOT_PRECISION)
            tl.store(p_new + o_w, b_wn)
            b_sn = tl.dot(tl.trans((b_a * -b_ne1[:, None]).to(DT)), b_gzd, m_b * b_s, input_precision=DOT_PRECISION)
            tl.store(p_new + D + o_w, b_sn)
        b_g1 = tl.load(g1 + p_tok * (BT * BT) + o_tt)  # [BT, BT]
        b_corr = tl.dot((b_g1 * b_sa).to(DT), b_gzd, input_precision=DOT_PRECISION)  # [BT, D]
        tl.store(p_out + p_tok * (BT * 2 * D) + o_tq, b_pw)
        tl.store(p_out + p_tok * (BT * 2 * D) + D + o_tq, b_ps)
        tl.store(corr_out + p_tok * (BT * D) + o_td, b_corr)
        # The next chunk reads what other threads of this program wrote.
        tl.debug_barrier()
        if RETAIN_LQ:
            # Retention where the chunk ended (the sequence's next token lies in a later chunk).
            if i_c < i_next:
                _lq_retain(p_new, lq_q, lq_eps, E, D, BE)
                _lq_retain(p_new + sz_mat, lq_q, lq_eps, E, D, BE)
                tl.debug_barrier()
        if i_c + 1 == i_next:
            _copy_rows(p_new, p_be, 2 * D, D, E, D, BE)
            _copy_rows(p_new + sz_mat, p_be + sz_b0, 2 * D, D, E, D, BE)
    # Chunks past the sequence's last token are identities: zero reads, and (stored) the state carried on.
    if STORE_STATES:
        s_last = n_chunks
    else:
        s_last = n_chunks % 2
    p_last = p_x + s_last * sz_slot
    o_z = tl.zeros([BT, D], dtype=ACC)
    for i_c in range(n_chunks, NC):
        p_tok = tl.cast(i_c, tl.int64) * NH + i_nh
        tl.store(p_out + p_tok * (BT * 2 * D) + o_tq, o_z)
        tl.store(p_out + p_tok * (BT * 2 * D) + D + o_tq, o_z)
        tl.store(corr_out + p_tok * (BT * D) + o_td, o_z)
        if STORE_STATES:
            _copy_rows(p_last, p_x + (i_c + 1) * sz_slot, 2 * D, 2 * D, E, 2 * D, BE)
            _copy_rows(p_last + sz_mat, p_x + (i_c + 1) * sz_slot + sz_mat, 2 * D, 2 * D, E, 2 * D, BE)
    p_xe = x_end + tl.cast(i_nh, tl.int64) * sz_state
    _copy_rows(p_last, p_xe, 2 * D, 2 * D, E, 2 * D, BE)
    # x_end is [2, N * H, E, 2D]: matrix 2 starts one slot's size on (int64).
    _copy_rows(p_last + sz_mat, p_xe + sz_slot, 2 * D, 2 * D, E, 2 * D, BE)


def _config(D: int, dot_dtype) -> tuple[int, int]:
    """(BE, num_warps): E tiles of 16 rows (the narrowest tensor-core tile: wider ones spill at D = 64 in bf16);
    8 warps for D = 128 or fp32 operands (TF32 tiles take twice the registers), else 4.  Spill-free on sm_80 and
    sm_90 at D = 64 and 128 (README, "MLP memory")."""
    return 16, 8 if D >= 128 or dot_dtype in (tl.float32, tl.float64) else 4


def _launch(qq, m2, g1, k, v, x0, base0, ends, g_end, n_end, next_chunk, n_real, miras: Miras, dot_dtype,
            precision: str, store: bool):
    NC, N, H, b, D = k.shape
    E = x0.shape[-2]
    xs = torch.empty(2, NC + 1 if store else 2, N, H, E, 2 * D, dtype=k.dtype, device=k.device)
    xs[:, 0] = x0
    p, corr = torch.empty_like(qq), torch.empty_like(k)
    x_end, base_end = torch.empty_like(x0), torch.empty_like(base0)
    scratch = k.new_empty(N * H, 3, b, E)
    BE, warps = _config(D, dot_dtype)
    _titans_mlp_fwd_kernel[(N * H,)](
        qq, m2, g1, k, v, ends, g_end, n_end, n_real, next_chunk, base0, xs, p, corr, x_end, base_end, scratch,
        NC, N * H, H, float(miras.p), float(miras.lp_eps), float(miras.huber_delta), float(miras.q),
        float(miras.lq_eps), D=D, E=E, BT=b, BE=BE, STORE_STATES=store, ERROR_MAP=_ERROR_MAPS[miras.error_map],
        RETAIN_LQ=miras.retention == "lq", DT=dot_dtype, ACC=_DOT_DTYPES[k.dtype], DOT_PRECISION=precision,
        num_warps=warps, num_stages=1,
    )
    return p, corr, x_end, base_end, xs


def titans_mlp_walk_triton(qq: Tensor, m2: Tensor, g1: Tensor, k: Tensor, v: Tensor, x0: Tensor, base0: Tensor,
                           ends: Tensor, g_end: Tensor, n_end: Tensor, next_chunk: Tensor, n_real: Tensor,
                           miras: Miras, dtype: torch.dtype, precision: str, store: bool) -> list[Tensor]:
    """The chunk walk and reads of ``mlp_chunk._chunks_forward`` (its inputs, fp32 and contiguous, plus ``n_real``
    ``[N]``, the number of chunks holding each sequence's tokens) with dots in ``dtype``.

    Returns p, corr, the final state, the returned gradient base and the state slots (every chunk's start state
    ``[2, NC + 1, N, H, E, 2D]`` when ``store``).
    """
    return list(_launch(qq, m2, g1, k, v, x0, base0, ends, g_end, n_end, next_chunk, n_real, miras,
                        _DOT_DTYPES[dtype], precision, store))
