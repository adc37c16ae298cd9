"""
gdn_kernel.py -- the gated delta rule as math on tensors.

A Gated DeltaNet (GDN) head keeps a matrix memory S (key dim x value dim) instead of a KV cache.
For every token t it forgets a little, erases what its key k_t currently recalls, and writes v_t:

    S_t = alpha_t * (I - beta_t k_t k_t^T) S_{t-1}  +  beta_t k_t v_t^T          (1)
    o_t = scale * S_t^T q_t

(S is [Dk, Dv] here, so o = S^T q; METHOD.md and the GDN paper write its transpose, [Dv, Dk], with
S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T and o_t = S_t q_t: the same rule.)
alpha_t = exp(g_t) in (0, 1] is the decay (g_t <= 0 is the *log* decay, kept in fp32, and finite:
the chunked forms below take differences of its running sums, and -inf - -inf is NaN), beta_t in
[0, 1] the write strength. (1) is one step of gradient descent on the online regression loss
0.5 * ||S^T k_t - v_t||^2 with step size beta_t, after decaying the memory: the "delta rule".
Expanding (1) gives the form every function below uses:

    S' = alpha_t S_{t-1}                  (forget)
    u_t = beta_t (v_t - S'^T k_t)         (the error of what k_t recalls, scaled: the "delta")
    S_t = S' + k_t u_t^T                  (write the correction)

This file holds several ways to compute (1): over a sequence (the first four, one signature), and
one token at a time (the last two):
  * `recurrent_gated_delta_rule`: token by token, exactly as written above. Slow, obviously right:
    the reference everything else is tested against.
  * `chunk_gated_delta_rule_torch`: the chunked (WY) form in plain PyTorch (derived above it). Exact (up to rounding),
    differentiable, and made of matrix products, so it is fast enough on a CPU.
  * `chunk_gated_delta_rule_triton`: the same chunked form as Triton kernels, forward and backward
    (a torch.autograd.Function), for CUDA tensors (or the CPU under TRITON_INTERPRET=1, for tests).
  * `chunk_gated_delta_rule`: the public entry point the model calls; it picks the Triton kernels
    for CUDA tensors and the PyTorch form otherwise (same signature, same results up to rounding).
  * `gated_delta_rule_step`: one token with a carried state, for cached decoding: one small Triton
    kernel on CUDA (`gated_delta_rule_step_triton`), the three lines of (1) in PyTorch
    (`gated_delta_rule_step_torch`) elsewhere.
  * `gdn_layer_step`: a GDN layer's whole decoding step between its two projections (gdn.py's short
    conv, SiLU, L2 norms, gates, then (1), then the gated RMSNorm of the output) as one Triton
    kernel; gdn.py uses it on CUDA and its own PyTorch lines elsewhere.

Shapes (the project's convention): q, k [B, T, H, Dk]; v [B, T, H, Dv]; g, beta [B, T, H];
state [B, H, Dk, Dv]. Outputs o [B, T, H, Dv] and, on request, the final state.
Values, which no function checks (a check would cost a device sync per call): g is the LOG of the
decay alpha, finite and <= 0 (a hard reset as g = -inf gives NaN in the chunked forms: use a large
finite value such as -80); beta lies in [0, 1]; each k_t has unit L2 norm (gdn.py normalises it).
Outside these the delta rule is no longer a bounded overwrite and the state can grow without limit.
"""

import numbers
import os
import warnings
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:                      # CPU-only installs: the PyTorch form serves everything
    triton = None


def _same_kind(**tensors):
    """Floating tensors on one device (None: absent)."""
    given = {n: x for n, x in tensors.items() if x is not None}
    bad = [n for n, x in given.items() if not x.is_floating_point()]
    if bad:
        raise ValueError(f"{', '.join(bad)} must be floating point; got "
                         + ", ".join(f"{n} {given[n].dtype}" for n in bad))
    if len({x.device for x in given.values()}) > 1:
        raise ValueError("all tensors must be on one device; got " + ", ".join(f"{n} on {x.device}"
                                                                            for n, x in given.items()))


def _check(q, k, v, g, beta, initial_state):
    """Fail early, naming the tensors, rather than deep inside an einsum."""
    if q.dim() != 4 or q.shape != k.shape:
        raise ValueError(f"q and k must both be [B, T, H, Dk]; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    B, T, H, Dk = q.shape
    if v.dim() != 4 or v.shape[:3] != (B, T, H) or Dk == 0 or v.shape[-1] == 0:
        raise ValueError(f"v must be [B, T, H, Dv] = [{B}, {T}, {H}, Dv], head dims >= 1; got q {tuple(q.shape)}, "
                         f"v {tuple(v.shape)}")
    _same_kind(q=q, k=k, v=v, g=g, beta=beta, initial_state=initial_state)
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != (B, T, H):
            raise ValueError(f"{name} must be [B, T, H] = [{B}, {T}, {H}]; got {tuple(x.shape)}")
    if initial_state is not None and initial_state.shape != (B, H, Dk, v.shape[-1]):
        raise ValueError(f"initial_state must be [B, H, Dk, Dv] = [{B}, {H}, {Dk}, {v.shape[-1]}]; "
                         f"got {tuple(initial_state.shape)}")


def _work_dtype(q, k, v):
    """The PyTorch forms compute in fp32, or in fp64 where an operand is fp64 (the tests' reference)."""
    return torch.float64 if torch.float64 in (q.dtype, k.dtype, v.dtype) else torch.float32


def recurrent_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False):
    """The reference: equation (1) one token at a time, in fp32 (or fp64 if any of q, k, v is fp64)."""
    _check(q, k, v, g, beta, initial_state)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    scale = Dk ** -0.5 if scale is None else scale
    dt = _work_dtype(q, k, v)
    q, k, v, g, beta = (x.to(dt) for x in (q, k, v, g, beta))
    S = q.new_zeros(B, H, Dk, Dv) if initial_state is None else initial_state.to(dt, copy=True)
    o = []
    for t in range(T):
        S = S * g[:, t, :, None, None].exp()                                       # forget
        kt = k[:, t]                                                               # [B, H, Dk]
        u = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhkv,bhk->bhv", S, kt))  # delta
        S = S + kt[..., :, None] * u[..., None, :]                                 # write
        o.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t] * scale))                # read
    o = torch.stack(o, dim=1) if T > 0 else v.new_zeros(B, 0, H, Dv, dtype=dt)
    return o, (S if output_final_state else None)


def gated_delta_rule_step_torch(q, k, v, g, beta, state, scale=None, inplace=False):
    """One token of (1) for decoding: q, k [B, H, Dk], v [B, H, Dv], g, beta [B, H], state
    [B, H, Dk, Dv] (fp32, or fp64 after an fp64 prompt). Returns (o [B, H, Dv] in fp32, fp64 for
    an fp64 state; new state). Memory and time per token are constant: that is the whole point of
    replacing the KV cache. inplace=True writes the new state into `state` and returns it (a captured CUDA
    graph keeps replaying against the same address)."""
    _check_step(q, k, v, g, beta, state)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dt = torch.float64 if state.dtype == torch.float64 else torch.float32
    q, k, v, g, beta = (x.to(dt) for x in (q, k, v, g, beta))
    S = state.to(dt) * g[..., None, None].exp()
    u = beta[..., None] * (v - torch.einsum("bhkv,bhk->bhv", S, k))
    S = S + k[..., :, None] * u[..., None, :]
    o = torch.einsum("bhkv,bhk->bhv", S, q * scale)
    return (o, state.copy_(S)) if inplace else (o, S)


def _check_step(q, k, v, g, beta, state):
    if q.dim() != 3 or k.shape != q.shape or v.dim() != 3 or v.shape[:2] != q.shape[:2] \
            or g.shape != q.shape[:2] or beta.shape != q.shape[:2] or state.shape != (*q.shape, v.shape[-1]):
        raise ValueError(f"step shapes: q, k [B, H, Dk], v [B, H, Dv], g, beta [B, H], state [B, H, Dk, Dv]; got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, g {tuple(g.shape)}, "
                         f"beta {tuple(beta.shape)}, state {tuple(state.shape)}")
    _same_kind(q=q, k=k, v=v, g=g, beta=beta, state=state)


def gated_delta_rule_step(q, k, v, g, beta, state, scale=None, inplace=False):
    """The entry point gdn.py calls for one decoding step (signature of gated_delta_rule_step_torch):
    one Triton kernel (`_step_kernel`) for CUDA tensors without autograd, the PyTorch lines otherwise."""
    step = gated_delta_rule_step_triton if _step_triton_usable(q, state) else gated_delta_rule_step_torch
    return step(q, k, v, g, beta, state, scale, inplace)


# ----------------------------------------------------------------------------------------------
# The chunked (WY) form.
#
# Notation: K, V, Q, U are C x D matrices whose row j is k_j^T (v_j^T, ...); "A B" is a matrix
# product, "x * A" scales rows (or multiplies elementwise, for two C x C matrices), diag(x) A the same.
#
# Split the sequence into chunks of C tokens. Inside one chunk, number the tokens i = 1..C, let S_0
# be the state entering the chunk and gamma_i = g_1 + ... + g_i the cumulative log decay, so the
# memory written at token j has decayed by exp(gamma_i - gamma_j) <= 1 at token i. Unrolling the
# three-line form of (1) from S_0:
#
#     S_i = exp(gamma_i) S_0 + sum_{j<=i} exp(gamma_i - gamma_j) k_j u_j^T                   (2)
#
# The deltas u_j depend on each other (each reads the memory the earlier ones wrote): put (2) at
# i = j - 1, decayed by e^{g_j}, into u_j = beta_j (v_j - S'^T k_j):
#
#     u_j = beta_j v_j - beta_j exp(gamma_j) S_0^T k_j
#           - sum_{m<j} beta_j exp(gamma_j - gamma_m) (k_j . k_m) u_m
#
# In matrix form, with L the strictly lower-triangular C x C matrix
# L_jm = beta_j exp(gamma_j - gamma_m) (k_j . k_m), this is a unit lower-triangular system
#
#     (I + L) U = diag(beta) V - diag(beta exp(gamma)) K S_0
#     U = Tm (beta V) - Tm (beta exp(gamma) K) S_0 =: U0 - W S_0,    Tm = (I + L)^{-1}        (3)
#
# L is strictly lower (m < j) while D below includes its diagonal (j <= i): u_j is the error of what
# the memory recalls *before* token j writes, o_i reads the memory *after* token i has written.
# W and U0 depend only on the chunk's own k, v, g, beta. With U in hand, (2) gives the outputs and
# the next state as plain matrix products:
#
#     O     = scale * [ exp(gamma) * (Q S_0)  +  (Q K^T * D) U ],   D_ij = exp(gamma_i - gamma_j), j<=i
#     S_C   = exp(gamma_C) S_0 + Kdec^T U,                          Kdec = exp(gamma_C - gamma) * K   (4)
#
# Putting (3) into (4):  S_C = (exp(gamma_C) I - Kdec^T W) S_0 + Kdec^T U0. The chunk's C products
# of "decay, then erase along k_j" collapse into one identity-minus-low-rank matrix, built from the
# two thin factors Kdec and W: the WY representation (named after the same trick for products of
# Householder reflections). Only S is carried from chunk to chunk: T/C sequential steps of matrix
# products instead of T rank-one updates. Every exp() is of a difference gamma_i - gamma_j with
# j <= i (gamma_0 = 0 for exp(gamma_i)), so it is <= 1 and cannot overflow; the upper triangle is
# masked *before* the exp for that reason. The price of differences of running sums: inside a chunk
# an output's error is about the rounding of the largest |gamma| there (fp32: 1.7e-4 relative after
# one token with g = -1e4, where the recurrence is exact), negligible for gates of GDN's size.
# ----------------------------------------------------------------------------------------------

def chunk_gated_delta_rule_torch(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                                 chunk_size=64):
    """Equations (3)-(4) in PyTorch, differentiable. Any T: the tail is padded with k = v = 0 and
    g = 0 (no write, no decay), which leaves the state and the real outputs unchanged."""
    _check(q, k, v, g, beta, initial_state)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a whole number >= 1; got {chunk_size!r}")
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    C = chunk_size
    scale = Dk ** -0.5 if scale is None else scale
    dt = _work_dtype(q, k, v)
    pad = (-T) % C
    N = (T + pad) // C
    # [B, T, H, D] -> [B, H, N, C, D]: heads outermost, chunks in order, tokens within a chunk.
    def chunks(x):
        x = x.to(dt)
        if pad:
            x = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))      # pad along T
        x = x.transpose(1, 2)
        return x.reshape(B, H, N, C, *x.shape[3:])                   # (N, not -1: B or H may be 0)
    q, k, v, g, beta = (chunks(x) for x in (q, k, v, g, beta))
    gamma = g.cumsum(-1)                                                     # [B, H, N, C]
    lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    strict = lower.clone().fill_diagonal_(False)
    # D_ij = exp(gamma_i - gamma_j) on and below the diagonal, 0 above (masked before exp).
    diff = gamma[..., :, None] - gamma[..., None, :]
    D = torch.where(lower, diff, torch.full_like(diff, -float("inf"))).exp()  # [B, H, N, C, C]
    # Equation (3): the unit lower-triangular solve.
    L = torch.where(strict, beta[..., :, None] * D * (k @ k.transpose(-1, -2)), torch.zeros_like(D))
    eye = torch.eye(C, dtype=dt, device=q.device)
    U0 = torch.linalg.solve_triangular(eye + L, beta[..., None] * v, upper=False, unitriangular=True)
    W = torch.linalg.solve_triangular(eye + L, (beta * gamma.exp())[..., None] * k, upper=False,
                                      unitriangular=True)
    QK = (q @ k.transpose(-1, -2)) * D                                       # intra-chunk scores
    S = q.new_zeros(B, H, Dk, Dv) if initial_state is None else initial_state.to(dt, copy=True)
    o = []
    for n in range(N):                                                       # only S crosses chunks
        U = U0[:, :, n] - W[:, :, n] @ S                                     # (3)
        gam = gamma[:, :, n]
        o.append(scale * (gam.exp()[..., None] * (q[:, :, n] @ S) + QK[:, :, n] @ U))
        decay_to_end = (gam[..., -1:] - gam).exp()[..., None]                # exp(gamma_C - gamma_j)
        S = gam[..., -1, None, None].exp() * S + (decay_to_end * k[:, :, n]).transpose(-1, -2) @ U
    o = torch.stack(o, dim=2).reshape(B, H, N * C, Dv)[:, :, :T] if N else v.new_zeros(B, H, 0, Dv, dtype=dt)
    return o.transpose(1, 2), (S if output_final_state else None)


# ==============================================================================================
# The chunked form in Triton.
#
# Equations (3)-(4) split naturally into work that is parallel over chunks and a short sequential
# scan that only carries the state. The forward is three kernels:
#
#   1. _prepare_kernel   one program per (chunk, batch*head).  From the chunk's own k, v, g, beta:
#                        gamma (cumulative log decay), Tm = (I + L)^{-1} by recursive doubling,
#                        W = Tm (beta e^gamma K) and U0 = Tm (beta V).  No state involved, so all
#                        T/C chunks of all heads run at once.
#   2. _state_kernel     one program per (value block, batch*head), looping over the chunks in
#                        order: U = U0 - W S (the true deltas), then S <- e^{gamma_C} S + Kdec^T U.
#                        It writes the state entering every chunk (h) and U.  This is the only
#                        sequential part: T/C steps, each a [C, Dk] x [Dk, BV] and a
#                        [Dk, C] x [C, BV] product, and at long T the part that sets the
#                        forward's time.
#   3. _output_kernel    one program per (chunk, batch*head), all value columns at once:
#                        O = scale [e^gamma * (Q S_n) + (Q K^T * D) U], parallel over chunks again.
#
# The backward mirrors it (derivation above _bwd_state_kernel): the forward's scan is re-run to
# rebuild h and U (a second run of the scan, traded for not keeping [B, H, T/C, Dk, Dv] of states
# alive between forward and backward), a reverse scan carries dS from the last chunk to the first, and one parallel kernel
# per chunk turns dS, dU and dO into dq, dk, dv, dg, dbeta.
#
# Saved for backward (in ctx): q, k, v, g, beta, the initial state, and from kernel 1 gamma [B,T,H]
# fp32, Tm [B,T,H,C] fp32, W [B,T,H,Dk] and U0 [B,T,H,Dv] (inputs' dtype). Nothing of size T*D^2.
#
# Tensor cores: every tl.dot below takes operands in the inputs' dtype (bf16/fp16 -> the mma /
# wgmma tensor-core path, fp32 accumulators) or, for fp32 inputs, exact fp32 ("ieee", no TF32) so
# that fp32 runs can be checked tightly against the recurrence.  The one exception is the chunk
# inverse Tm, whose products take fp32 operands: TF32 tensor cores for bf16/fp16 inputs (10 mantissa
# bits: as many as the fp16, more than the bf16 that Tm is rounded to before it is used), exact fp32
# for fp32 inputs.
# Kept in fp32 throughout: g, gamma and every exp() of it, beta, the carried states S and dS, every
# accumulator, and the output o (returned in fp32, like the PyTorch form). Tm is computed and stored
# in fp32 and rounded to the inputs' dtype only where it is a tensor-core operand.
# ==============================================================================================

CHUNK = 64          # tokens per chunk: the tensor-core tile size along time (M, N, K all >= 16);
                    # a power of two, which the chunk inverse's doubling needs
MAX_HEAD_DIM = 128  # largest Dk, Dv the kernels hold in one tile; beyond it we fall back (warning)
# Value columns per program in the two scans. The scans are sequential over the chunks, so their
# only parallelism is (batch, head, value block): smaller blocks mean more programs when B x H is
# small (32 programs on a 132-SM H100 at B = 4, H = 8, Dv = 64 with 64 columns), at the price of
# re-reading K and W once per block. Measured on an H100 (forward, B = 4, H = 8, T = 32k, bf16): 32
# columns, 4 warps and 3 pipeline stages take 1.67 ms at D = 64 (64 columns: 1.94) and 2.99 ms at
# D = 128 (64 columns: 3.72). 16 columns are 6% faster at D = 64 and no faster at D = 128: one
# setting for both. `python gdn_kernel.py --sweep` measures every setting (results/kernel_sweep_h100.md
# holds one such sweep); `--scan-bv` runs the checks and benchmark with another block.
SCAN_BV = 32


if triton is not None:

    @triton.jit
    def _decay(gamma, i, STRICT: tl.constexpr):
        """D_ij = exp(gamma_i - gamma_j) for j <= i (j < i if STRICT), else 0.  The upper triangle
        is masked *before* exp: there gamma_i - gamma_j > 0 and exp could overflow."""
        if STRICT:
            keep = i[:, None] > i[None, :]
        else:
            keep = i[:, None] >= i[None, :]
        return tl.where(keep, tl.exp(tl.where(keep, gamma[:, None] - gamma[None, :], 0.0)), 0.0)

    @triton.jit
    def _load_gamma(gamma_ptr, row, live, i, n, T, C: tl.constexpr):
        """gamma of chunk n, and gamma_C at its last real token.  Rows past the end of the sequence
        get gamma_C too (no decay after the end), as if the tail were padded with g = 0: a zero
        there would put exp(0 - gamma_j), which can overflow, into the decay matrix."""
        gamma = tl.load(gamma_ptr + row, mask=live, other=0.0)
        g_last = tl.sum(tl.where(i == tl.minimum(T - n * C, C) - 1, gamma, 0.0), 0)
        return tl.where(live, gamma, g_last), g_last

    @triton.jit
    def _prepare_kernel(k_ptr, v_ptr, g_ptr, beta_ptr, gamma_ptr, tm_ptr, w_ptr, u0_ptr,
                        T, H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr,
                        LOG2_C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
        # One chunk of one head.  Everything here depends on that chunk alone (equation 3).
        n = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        i = tl.arange(0, C)
        t = n * C + i
        live = t < T                                   # the tail chunk may be short
        row = (b * T + t).to(tl.int64) * H + h         # row of token t, head h in [B*T*H, D]
        dk = tl.arange(0, BK)
        dv = tl.arange(0, BV)
        # Absent tokens load as k = v = 0, g = beta = 0: no write, no decay (as in the torch form).
        k = tl.load(k_ptr + row[:, None] * DK + dk[None, :], mask=live[:, None] & (dk[None, :] < DK), other=0.0)
        v = tl.load(v_ptr + row[:, None] * DV + dv[None, :], mask=live[:, None] & (dv[None, :] < DV), other=0.0)
        g = tl.load(g_ptr + row, mask=live, other=0.0).to(tl.float32)
        beta = tl.load(beta_ptr + row, mask=live, other=0.0).to(tl.float32)
        gamma = tl.cumsum(g, 0)                        # fp32: decays multiply, log decays add
        tl.store(gamma_ptr + row, gamma, mask=live)

        # L_ij = beta_i exp(gamma_i - gamma_j) (k_i . k_j), strictly lower.  k k^T on tensor cores.
        kk = tl.dot(k, tl.trans(k), input_precision=PREC)
        L = beta[:, None] * _decay(gamma, i, True) * kk

        # Tm = (I + L)^{-1} by recursive doubling, in fp32.  Write M = I + L and let R_b be the
        # inverse of M's block-diagonal part with blocks of b tokens (R_1 = I: M's diagonal is 1).
        # Two neighbouring b-blocks form a 2b-block  [[A, 0], [X, Z]]  whose inverse is
        #     [[A^-1, 0], [-Z^-1 X A^-1, Z^-1]],
        # and with O_b = M restricted to those X positions (row block odd, column block the one
        # before it; off the diagonal M is L) that is, for all 2b-blocks at once,
        #     R_2b = R_b - R_b O_b R_b        (R_b is block diagonal: the product lands on X only).
        # log2(C) = 6 doublings of two [C, C] products each: tensor-core work (TF32 for bf16/fp16
        # inputs, exact fp32 for fp32 inputs), where a row-by-row forward substitution would be
        # C - 1 dependent steps, each a reduction across the whole tile (measured on an H100 at
        # T = 32k, results/kernel_profile_substitution_h100.md: 3/4 of the forward's time at D = 64,
        # 2/3 at D = 128, the scan counted once though the profile's _state_kernel includes the
        # backward's re-run).  The inverse itself (not just a solve) is kept because the backward
        # needs Tm^T too.
        Tm = tl.where(i[:, None] == i[None, :], 1.0, 0.0)
        for s in tl.static_range(LOG2_C):
            rb = i[:, None] // (1 << s)                       # row and column block of size 2^s
            cb = i[None, :] // (1 << s)
            O = tl.where((rb == cb + 1) & (cb % 2 == 0), L, 0.0)
            Tm = Tm - tl.dot(tl.dot(Tm, O, input_precision=PREC), Tm, input_precision=PREC)
        tl.store(tm_ptr + row[:, None] * C + i[None, :], Tm, mask=live[:, None])

        # The WY factors: W = Tm diag(beta e^gamma) K,  U0 = Tm diag(beta) V  (tensor cores).
        DT = k_ptr.dtype.element_ty
        kb = (k * (beta * tl.exp(gamma))[:, None]).to(DT)
        vb = (v * beta[:, None]).to(DT)
        w = tl.dot(Tm.to(DT), kb, input_precision=PREC)
        u0 = tl.dot(Tm.to(DT), vb, input_precision=PREC)
        tl.store(w_ptr + row[:, None] * DK + dk[None, :], w.to(DT), mask=live[:, None] & (dk[None, :] < DK))
        tl.store(u0_ptr + row[:, None] * DV + dv[None, :], u0.to(DT), mask=live[:, None] & (dv[None, :] < DV))

    @triton.jit
    def _state_kernel(k_ptr, w_ptr, u0_ptr, gamma_ptr, h0_ptr, h_ptr, u_ptr, ht_ptr, T, NT,
                      H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr,
                      BK: tl.constexpr, BV: tl.constexpr, HAS_H0: tl.constexpr,
                      STORE_HT: tl.constexpr, PREC: tl.constexpr):
        # The sequential scan, for one head and one block of BV value columns.  Columns of S are
        # independent in (3)-(4) (every product mixes rows of S, never columns), so splitting Dv
        # across programs is exact and gives the scan more parallelism.
        iv = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        i = tl.arange(0, C)
        dk = tl.arange(0, BK)
        dv = iv * BV + tl.arange(0, BV)
        kmask = dk < DK
        vmask = dv < DV
        smask = kmask[:, None] & vmask[None, :]
        s_off = dk[:, None] * DV + dv[None, :]
        DT = k_ptr.dtype.element_ty
        if HAS_H0:
            S = tl.load(h0_ptr + bh.to(tl.int64) * DK * DV + s_off, mask=smask, other=0.0)
        else:
            S = tl.zeros([BK, BV], dtype=tl.float32)
        for n in range(NT):
            # h[b, h, n] = the state entering chunk n, kept in fp32.
            tl.store(h_ptr + (bh.to(tl.int64) * NT + n) * DK * DV + s_off, S, mask=smask)
            t = n * C + i
            live = t < T
            row = (b * T + t).to(tl.int64) * H + h
            w = tl.load(w_ptr + row[:, None] * DK + dk[None, :], mask=live[:, None] & kmask[None, :], other=0.0)
            k = tl.load(k_ptr + row[:, None] * DK + dk[None, :], mask=live[:, None] & kmask[None, :], other=0.0)
            u0 = tl.load(u0_ptr + row[:, None] * DV + dv[None, :], mask=live[:, None] & vmask[None, :], other=0.0)
            gamma, g_last = _load_gamma(gamma_ptr, row, live, i, n, T, C)
            # (3): the true deltas of this chunk, given the state that entered it.
            u = u0.to(tl.float32) - tl.dot(w, S.to(DT), input_precision=PREC)
            tl.store(u_ptr + row[:, None] * DV + dv[None, :], u.to(DT), mask=live[:, None] & vmask[None, :])
            # (4): decay the old state to the chunk's end and add every write, each decayed from
            # its own token to the end: exp(gamma_C - gamma_j) <= 1.
            kdec = k * tl.exp(g_last - gamma)[:, None]
            S = S * tl.exp(g_last) + tl.dot(tl.trans(kdec.to(DT)), u.to(DT), input_precision=PREC)
        if STORE_HT:
            tl.store(ht_ptr + bh.to(tl.int64) * DK * DV + s_off, S, mask=smask)

    @triton.jit
    def _output_kernel(q_ptr, k_ptr, u_ptr, gamma_ptr, h_ptr, o_ptr, scale, T, NT,
                       H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr,
                       BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
        # O = scale [ e^gamma * (Q S_n)  +  (Q K^T * D) U ]: the inter-chunk term reads the state
        # that entered the chunk, the intra-chunk term is causal "attention" with decay inside it.
        # Parallel over chunks already, so one program takes every value column (BV >= DV): no
        # need to split them as the scans do, and Q K^T is computed once per chunk, not per block.
        n = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        i = tl.arange(0, C)
        t = n * C + i
        live = t < T
        row = (b * T + t).to(tl.int64) * H + h
        dk = tl.arange(0, BK)
        dv = tl.arange(0, BV)
        kmask = dk < DK
        vmask = dv < DV
        DT = k_ptr.dtype.element_ty
        q = tl.load(q_ptr + row[:, None] * DK + dk[None, :], mask=live[:, None] & kmask[None, :], other=0.0)
        k = tl.load(k_ptr + row[:, None] * DK + dk[None, :], mask=live[:, None] & kmask[None, :], other=0.0)
        u = tl.load(u_ptr + row[:, None] * DV + dv[None, :], mask=live[:, None] & vmask[None, :], other=0.0)
        gamma, _ = _load_gamma(gamma_ptr, row, live, i, n, T, C)
        S = tl.load(h_ptr + (bh.to(tl.int64) * NT + n) * DK * DV + dk[:, None] * DV + dv[None, :],
                    mask=kmask[:, None] & vmask[None, :], other=0.0)
        A = tl.dot(q, tl.trans(k), input_precision=PREC) * _decay(gamma, i, False)
        o = tl.exp(gamma)[:, None] * tl.dot(q, S.to(DT), input_precision=PREC)
        o += tl.dot(A.to(DT), u, input_precision=PREC)
        tl.store(o_ptr + row[:, None] * DV + dv[None, :], o * scale, mask=live[:, None] & vmask[None, :])

    # ------------------------------------------------------------------------------------------
    # Backward.  Per chunk, with S the state entering it, S' the state leaving it, and dS' the
    # gradient arriving at S' (from the next chunk, or from the caller for the final state);
    # gamma_C is the chunk's last real token's (in a short last chunk, not position C's):
    #
    #   dU  = scale (Q K^T * D)^T dO  +  Kdec dS'                      Kdec = e^{gamma_C - gamma} K
    #   dS  = e^{gamma_C} dS'  +  scale (e^gamma Q)^T dO  -  W^T dU     (U = U0 - W S feeds back)
    #
    # That is again a sequential scan, now from the last chunk to the first (_bwd_state_kernel);
    # it stores dS' for every chunk (dh) and dU.  The rest is local to a chunk (_bwd_chunk_kernel):
    #
    #   output:     dA = scale (dO U^T) * D (lower), the gradient w.r.t. Q K^T (before the decay mask),
    #               dQ = dA K + scale e^gamma (dO S^T),
    #               dK = dA^T Q,     dgamma_i += sum_j G_ij - sum_j G_ji with G = dA * (Q K^T),
    #               dgamma_i += scale e^gamma_i q_i . (S dO_i)
    #   state out:  dK += e^{gamma_C-gamma} (U dS'^T),  dgamma_C += e^{gamma_C} <S, dS'> + sum_j r_j,
    #               dgamma_j -= r_j,  r_j = e^{gamma_C-gamma_j} k_j . (dS' u_j)
    #   U = U0-W S: dU0 = dU,  dW = -dU S^T
    #   WY factors: with Kb = diag(beta e^gamma) K, Vb = diag(beta) V:  dKb = Tm^T dW, dVb = Tm^T dU0,
    #               and d(M^{-1}) = -M^{-1} dM M^{-1} (M = I + L, Tm = M^{-1}; W = Tm Kb, U0 = Tm Vb)
    #               gives dL = -(dKb W^T + dVb U0^T), kept strictly lower (only those entries of
    #               L are free);
    #               then dK += diag(beta e^gamma) dKb,  dV = diag(beta) dVb,
    #               dbeta_i += e^gamma_i k_i . dKb_i + v_i . dVb_i,  dgamma_i += beta_i e^gamma_i k_i . dKb_i.
    #   L = diag(beta) (Ds * K K^T), Ds the strictly lower part of D:
    #               dbeta_i += sum_j dL_ij Ds_ij (k_i.k_j),  dK += (M + M^T) K  with M = dL * Ds * beta_i,
    #               dgamma from L as from the output's G.
    #   finally dg = reverse cumulative sum of dgamma within the chunk (gamma_i = g_1 + .. + g_i).
    # ------------------------------------------------------------------------------------------

    @triton.jit
    def _bwd_state_kernel(q_ptr, k_ptr, w_ptr, gamma_ptr, do_ptr, dht_ptr, dh_ptr, du_ptr, dh0_ptr,
                          scale, T, NT, H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                          C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                          HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, PREC: tl.constexpr):
        # Reverse scan for one head and one block of value columns (again exact: dS columns are
        # independent, as S's were).
        iv = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        i = tl.arange(0, C)
        dk = tl.arange(0, BK)
        dv = iv * BV + tl.arange(0, BV)
        kmask = dk < DK
        vmask = dv < DV
        smask = kmask[:, None] & vmask[None, :]
        s_off = dk[:, None] * DV + dv[None, :]
        DT = k_ptr.dtype.element_ty
        if HAS_DHT:
            dS = tl.load(dht_ptr + bh.to(tl.int64) * DK * DV + s_off, mask=smask, other=0.0)
        else:
            dS = tl.zeros([BK, BV], dtype=tl.float32)
        for nn in range(NT):
            n = NT - 1 - nn
            tl.store(dh_ptr + (bh.to(tl.int64) * NT + n) * DK * DV + s_off, dS, mask=smask)
            t = n * C + i
            live = t < T
            row = (b * T + t).to(tl.int64) * H + h
            q = tl.load(q_ptr + row[:, None] * DK + dk[None, :], mask=live[:, None] & kmask[None, :], other=0.0)
            k = tl.load(k_ptr + row[:, None] * DK + dk[None, :], mask=live[:, None] & kmask[None, :], other=0.0)
            w = tl.load(w_ptr + row[:, None] * DK + dk[None, :], mask=live[:, None] & kmask[None, :], other=0.0)
            do = tl.load(do_ptr + row[:, None] * DV + dv[None, :], mask=live[:, None] & vmask[None, :], other=0.0)
            gamma, g_last = _load_gamma(gamma_ptr, row, live, i, n, T, C)
            do = do.to(DT)
            A = tl.dot(q, tl.trans(k), input_precision=PREC) * _decay(gamma, i, False)
            kdec = k * tl.exp(g_last - gamma)[:, None]
            du = scale * tl.dot(tl.trans(A.to(DT)), do, input_precision=PREC)
            du += tl.dot(kdec.to(DT), dS.to(DT), input_precision=PREC)
            tl.store(du_ptr + row[:, None] * DV + dv[None, :], du, mask=live[:, None] & vmask[None, :])
            qs = q * (scale * tl.exp(gamma))[:, None]
            dS = dS * tl.exp(g_last) + tl.dot(tl.trans(qs.to(DT)), do, input_precision=PREC)
            dS -= tl.dot(tl.trans(w), du.to(DT), input_precision=PREC)
        if STORE_DH0:
            tl.store(dh0_ptr + bh.to(tl.int64) * DK * DV + s_off, dS, mask=smask)

    @triton.jit
    def _bwd_chunk_kernel(q_ptr, k_ptr, v_ptr, beta_ptr, gamma_ptr, tm_ptr, w_ptr, u0_ptr, u_ptr,
                          h_ptr, dh_ptr, du_ptr, do_ptr, dq_ptr, dk_ptr, dv_ptr, dg_ptr, dbeta_ptr,
                          scale, T, NT, H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                          C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
        # Everything local to one chunk of one head (all of Dk and Dv in one program, since dK
        # sums over value columns).  Follows the list above, top to bottom.
        n = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        i = tl.arange(0, C)
        t = n * C + i
        live = t < T
        row = (b * T + t).to(tl.int64) * H + h
        dk = tl.arange(0, BK)
        dv = tl.arange(0, BV)
        km = live[:, None] & (dk[None, :] < DK)
        vm = live[:, None] & (dv[None, :] < DV)
        sm = (dk[:, None] < DK) & (dv[None, :] < DV)
        DT = k_ptr.dtype.element_ty
        kofs = row[:, None] * DK + dk[None, :]
        vofs = row[:, None] * DV + dv[None, :]
        sofs = (bh.to(tl.int64) * NT + n) * DK * DV + dk[:, None] * DV + dv[None, :]
        q = tl.load(q_ptr + kofs, mask=km, other=0.0)
        k = tl.load(k_ptr + kofs, mask=km, other=0.0)
        v = tl.load(v_ptr + vofs, mask=vm, other=0.0)
        w = tl.load(w_ptr + kofs, mask=km, other=0.0)
        u0 = tl.load(u0_ptr + vofs, mask=vm, other=0.0)
        u = tl.load(u_ptr + vofs, mask=vm, other=0.0)
        du = tl.load(du_ptr + vofs, mask=vm, other=0.0)
        do = tl.load(do_ptr + vofs, mask=vm, other=0.0).to(DT)
        S = tl.load(h_ptr + sofs, mask=sm, other=0.0)
        dS = tl.load(dh_ptr + sofs, mask=sm, other=0.0)
        Tm = tl.load(tm_ptr + row[:, None] * C + i[None, :], mask=live[:, None], other=0.0)
        gamma, g_last = _load_gamma(gamma_ptr, row, live, i, n, T, C)
        beta = tl.load(beta_ptr + row, mask=live, other=0.0).to(tl.float32)
        last = tl.minimum(T - n * C, C) - 1
        eg = tl.exp(gamma)

        # Output, intra-chunk part.
        D = _decay(gamma, i, False)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC)
        dA = scale * tl.dot(do, tl.trans(u), input_precision=PREC) * D      # d/d(QK^T), D applied
        G = dA * qk
        dgamma = tl.sum(G, 1) - tl.sum(G, 0)
        dq = tl.dot(dA.to(DT), k, input_precision=PREC)
        dkk = tl.dot(tl.trans(dA.to(DT)), q, input_precision=PREC)
        # Output, inter-chunk part: o_i += scale e^gamma_i S^T q_i.
        dq_inter = (scale * eg)[:, None] * tl.dot(do, tl.trans(S.to(DT)), input_precision=PREC)
        dgamma += tl.sum(dq_inter * q.to(tl.float32), 1)
        dq += dq_inter
        # The state leaving the chunk: S' = e^{gamma_C} S + Kdec^T U.
        kd = tl.where(live, tl.exp(g_last - gamma), 0.0)
        udS = tl.dot(u, tl.trans(dS.to(DT)), input_precision=PREC)                    # [C, Dk]
        r = kd * tl.sum(udS * k.to(tl.float32), 1)
        dkk += kd[:, None] * udS
        dgamma -= r
        dgamma += tl.where(i == last, tl.sum(r, 0) + tl.exp(g_last) * tl.sum(tl.sum(S * dS, 1), 0), 0.0)
        # U = U0 - W S, then through the WY factors W = Tm Kb, U0 = Tm Vb.
        dw = -tl.dot(du.to(DT), tl.trans(S.to(DT)), input_precision=PREC)              # [C, Dk]
        TmT = tl.trans(Tm.to(DT))
        dkb = tl.dot(TmT, dw.to(DT), input_precision=PREC)
        dvb = tl.dot(TmT, du.to(DT), input_precision=PREC)
        dL = -(tl.dot(dkb.to(DT), tl.trans(w), input_precision=PREC)
               + tl.dot(dvb.to(DT), tl.trans(u0), input_precision=PREC))
        kf = k.to(tl.float32)
        t1 = tl.sum(kf * dkb, 1)
        dkk += (beta * eg)[:, None] * dkb
        dbeta = eg * t1 + tl.sum(v.to(tl.float32) * dvb, 1)
        dgamma += beta * eg * t1
        dvv = beta[:, None] * dvb
        # L = diag(beta) (D_strict * K K^T).
        Ds = _decay(gamma, i, True)
        kk = tl.dot(k, tl.trans(k), input_precision=PREC)
        G2 = dL * Ds * kk
        dbeta += tl.sum(G2, 1)
        G2 = beta[:, None] * G2
        dgamma += tl.sum(G2, 1) - tl.sum(G2, 0)
        M = (dL * Ds * beta[:, None]).to(DT)
        dkk += tl.dot(M, k, input_precision=PREC) + tl.dot(tl.trans(M), k, input_precision=PREC)
        # gamma_i = g_1 + ... + g_i, so dg_m = sum_{i >= m} dgamma_i.
        dg = tl.sum(dgamma, 0) - tl.cumsum(dgamma, 0) + dgamma
        tl.store(dq_ptr + kofs, dq, mask=km)
        tl.store(dk_ptr + kofs, dkk, mask=km)
        tl.store(dv_ptr + vofs, dvv, mask=vm)
        tl.store(dg_ptr + row, dg, mask=live)
        tl.store(dbeta_ptr + row, dbeta, mask=live)


def _p2(x):
    """Tile size for a head dim: a power of two, at least 32. 16 would do for tl.dot, but Triton 3.6
    on an H100 miscompiled the bf16 [64, 64] x [64, 16] products of _prepare_kernel (compute-sanitizer:
    out-of-range shared-memory addresses; an illegal memory access later), so head dims below 32 are
    padded (masked) to 32."""
    return max(32, 1 << (int(x) - 1).bit_length())


def _launch_meta(q, v):
    B, T, H, DK = q.shape
    DV = v.shape[-1]
    BK, BVF = _p2(DK), _p2(DV)
    return dict(B=B, T=T, H=H, DK=DK, DV=DV, NT=triton.cdiv(T, CHUNK), BK=BK, BVF=BVF,
                BV=min(SCAN_BV, BVF), PREC="ieee" if q.dtype == torch.float32 else "tf32",
                # Software pipelining of the scans (prefetching the next chunk's tiles into shared
                # memory) needs a copy per stage; fp32 runs (the tight checks, not speed) keep one,
                # their tiles being twice the bytes.  The forward scan gains from a third stage
                # (measured), the reverse scan keeps two.
                SCAN_STAGES=1 if q.dtype == torch.float32 else 3, BWD_SCAN_STAGES=1 if q.dtype == torch.float32 else 2,
                SCAN_WARPS=4)


def _run_states(k, w, u0, gamma, h0, want_ht, m):
    """Kernel 2: the forward scan.  Returns h [B,H,NT,Dk,Dv] fp32, U, and the final state."""
    B, T, H, DK, DV, NT = m["B"], m["T"], m["H"], m["DK"], m["DV"], m["NT"]
    h = k.new_empty(B, H, NT, DK, DV, dtype=torch.float32)
    u = torch.empty_like(u0)
    ht = k.new_empty(B, H, DK, DV, dtype=torch.float32) if want_ht else None
    grid = (triton.cdiv(DV, m["BV"]), B * H)
    _state_kernel[grid](k, w, u0, gamma, h0 if h0 is not None else h, h, u, ht if want_ht else h, T, NT,
                        H, DK, DV, CHUNK, m["BK"], m["BV"], h0 is not None, want_ht, m["PREC"],
                        num_warps=m["SCAN_WARPS"], num_stages=m["SCAN_STAGES"])
    return h, u, ht


class _ChunkGatedDeltaRule(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, h0, output_final_state):
        m = _launch_meta(q, v)
        B, T, H, DK, DV, NT = m["B"], m["T"], m["H"], m["DK"], m["DV"], m["NT"]
        gamma = q.new_empty(B, T, H, dtype=torch.float32)
        tm = q.new_empty(B, T, H, CHUNK, dtype=torch.float32)
        w, u0 = torch.empty_like(k), torch.empty_like(v)
        _prepare_kernel[(NT, B * H)](k, v, g, beta, gamma, tm, w, u0, T, H, DK, DV, CHUNK, CHUNK.bit_length() - 1,
                                     m["BK"], m["BVF"], m["PREC"], num_warps=4)
        h, u, ht = _run_states(k, w, u0, gamma, h0, output_final_state, m)
        o = q.new_empty(B, T, H, DV, dtype=torch.float32)
        _output_kernel[(NT, B * H)](q, k, u, gamma, h, o, scale, T, NT, H, DK, DV, CHUNK, m["BK"], m["BVF"],
                                    m["PREC"], num_warps=4 if m["BK"] * m["BVF"] <= 64 * 64 else 8)
        ctx.save_for_backward(q, k, v, g, beta, h0, gamma, tm, w, u0)
        ctx.scale, ctx.m = scale, m
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, h0, gamma, tm, w, u0 = ctx.saved_tensors
        m, scale = ctx.m, ctx.scale
        B, T, H, DK, DV, NT = m["B"], m["T"], m["H"], m["DK"], m["DV"], m["NT"]
        do = do.contiguous()
        h, u, _ = _run_states(k, w, u0, gamma, h0, False, m)       # recompute, don't store
        dh = torch.empty_like(h)
        du = torch.empty(B, T, H, DV, dtype=torch.float32, device=q.device)
        dh0 = torch.empty_like(h0, dtype=torch.float32) if h0 is not None else None
        if dht is not None:
            dht = dht.float().contiguous()
        _bwd_state_kernel[(triton.cdiv(DV, m["BV"]), B * H)](
            q, k, w, gamma, do, dht if dht is not None else dh, dh, du, dh0 if dh0 is not None else dh,
            scale, T, NT, H, DK, DV, CHUNK, m["BK"], m["BV"], dht is not None, dh0 is not None, m["PREC"],
            num_warps=4, num_stages=m["BWD_SCAN_STAGES"])
        dq = torch.empty(B, T, H, DK, dtype=torch.float32, device=q.device)
        dk = torch.empty_like(dq)
        dv = torch.empty(B, T, H, DV, dtype=torch.float32, device=q.device)
        dg = torch.empty(B, T, H, dtype=torch.float32, device=q.device)
        dbeta = torch.empty_like(dg)
        _bwd_chunk_kernel[(NT, B * H)](q, k, v, beta, gamma, tm, w, u0, u, h, dh, du, do, dq, dk, dv, dg, dbeta,
                                       scale, T, NT, H, DK, DV, CHUNK, m["BK"], m["BVF"], m["PREC"], num_warps=8)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(g.dtype), dbeta.to(beta.dtype), None,
                None if h0 is None else dh0.to(h0.dtype), None)


MAX_HEAD_DIM_FP32 = 64   # fp32 operands are twice as big: at 128 the backward's per-chunk kernel
                         # needs ~260-390 KB of shared memory on an H100 (limit 227 KB), measured


def _operand_dtype(q, k, v):
    """One dtype for q, k, v (the tensor-core operands); fp64 is computed in fp32."""
    dt = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    return torch.float32 if dt == torch.float64 else dt


def _triton_usable(q, k, v):
    limit = MAX_HEAD_DIM_FP32 if _operand_dtype(q, k, v) == torch.float32 else MAX_HEAD_DIM
    return q.shape[-1] <= limit and v.shape[-1] <= limit


def chunk_gated_delta_rule_triton(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False):
    """The Triton kernels behind an autograd Function.  Works on CUDA tensors, and on CPU tensors
    under TRITON_INTERPRET=1 (the tests).  Returns o [B, T, H, Dv] in fp32 and, on request, the final
    state [B, H, Dk, Dv] in fp32, like chunk_gated_delta_rule_torch (which keeps fp64 inputs in fp64)."""
    if triton is None:
        raise RuntimeError("chunk_gated_delta_rule_triton needs triton; use chunk_gated_delta_rule_torch")
    _check(q, k, v, g, beta, initial_state)
    if not _triton_usable(q, k, v):
        raise ValueError(f"the Triton kernel holds head dims up to {MAX_HEAD_DIM} (bf16/fp16; "
                         f"{MAX_HEAD_DIM_FP32} for fp32); got Dk={q.shape[-1]}, "
                         f"Dv={v.shape[-1]} (chunk_gated_delta_rule falls back to the PyTorch form)")
    dt = _operand_dtype(q, k, v)
    if dt == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise ValueError("bf16 under TRITON_INTERPRET=1: Triton's interpreter multiplies bf16 tiles wrongly (tl.dot, "
                         "Triton 3.9); pass fp32 or fp16 there, or use chunk_gated_delta_rule_torch")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k, v = (x.to(dt).contiguous() for x in (q, k, v))
    g, beta = g.contiguous(), beta.contiguous()
    h0 = None if initial_state is None else initial_state.contiguous()
    if h0 is not None and h0.dtype != torch.float32:
        h0 = h0.float()
    if q.shape[1] == 0:                                  # nothing to scan
        o = q.new_zeros(*v.shape, dtype=torch.float32)
        B, _, H, DK = q.shape
        S = h0.clone() if h0 is not None else q.new_zeros(B, H, DK, v.shape[-1], dtype=torch.float32)
        return o, (S if output_final_state else None)
    return _ChunkGatedDeltaRule.apply(q, k, v, g, beta, scale, h0, bool(output_final_state))


def _compiled_triton_for(x):
    """True where the dispatchers send x to a Triton kernel: Triton installed, x on CUDA, and not
    the interpreter (the tests call the Triton paths directly)."""
    return triton is not None and x.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1"


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False):
    """The entry point gdn.py calls: same math and signature on every device.  CUDA tensors with
    Triton installed go to the Triton kernels; anything else (CPU, no Triton, fp64, head dims the
    kernel does not hold) to the PyTorch chunked form."""
    if _compiled_triton_for(q) and torch.float64 not in (q.dtype, k.dtype, v.dtype):   # fp64: the PyTorch form
        if _triton_usable(q, k, v):
            return chunk_gated_delta_rule_triton(q, k, v, g, beta, scale, initial_state, output_final_state)
        warnings.warn(f"head dims Dk={q.shape[-1]}, Dv={v.shape[-1]} ({q.dtype}) exceed what the Triton "
                      f"kernel holds: using the (slower) PyTorch chunked form", stacklevel=2)
    return chunk_gated_delta_rule_torch(q, k, v, g, beta, scale, initial_state, output_final_state)


# ==============================================================================================
# The one-token step as a Triton kernel (cached decoding).
#
# A decoding step of a GDN layer does very little arithmetic: per head, two [Dk, Dv] matrix-vector
# products and a rank-one update of a state that is 16 KB at D = 64. In PyTorch that is ~8 small
# kernels (decay, two einsums, the update, casts), each costing more to launch than to run; a
# decoding step of a small model is made of such launches (convert.py --bench --profile counts
# them). Here it is one kernel.
#
# The columns of S are independent in (1): column j of S_t depends only on column j of S_{t-1},
# on v_t[j], and on k_t, g_t, beta_t, which every column shares. So a program takes one
# (batch, head) and a block of BV value columns, holds that [Dk, BV] slice of the state in
# registers, and does forget / delta / write / read on it:
#
#     S  <- exp(g) S                      [Dk, BV]
#     u   = beta (v - S^T k)              [BV]      (a sum down the Dk rows)
#     S  <- S + k u^T                     [Dk, BV]
#     o   = scale S^T q                   [BV]
#
# The new state is written over the old one (in place: a captured CUDA graph replays against a
# fixed address). Nothing needs tensor cores: the products are matrix-vector, memory-bound on
# reading and writing S once each.
# ==============================================================================================

STEP_BV = 16     # value columns per program: B*H*Dv/16 programs (288 at B = 8, H = 9, Dv = 64), enough
                 # to spread one state read and write over the GPU's memory channels

if triton is not None:

    @triton.jit
    def _delta_rule(S, q, k, v, g, beta, scale):
        """One token of (1) on a state slice S [Dk, BV] held in registers (fp32): the new slice, and
        the read-out o [BV]. Shared by both decoding kernels."""
        S = S * tl.exp(g)                                                     # forget
        u = beta * (v - tl.sum(S * k[:, None], axis=0))                       # delta
        S = S + k[:, None] * u[None, :]                                       # write
        o = (tl.sum(S * q[:, None], axis=0) * scale).to(tl.float32)          # read (scale may come as fp64)
        return S, o

    @triton.jit
    def _step_kernel(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, s_ptr, o_ptr, scale, H,
                     sq_b, sq_h, sk_b, sk_h, sv_b, sv_h,
                     DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
        bh = tl.program_id(0)
        b, h = bh // H, bh % H
        rk = tl.arange(0, BK)
        rv = tl.program_id(1) * BV + tl.arange(0, BV)
        mk, mv = rk < DK, rv < DV
        # q, k, v may be strided views of one projection (last dim contiguous); g, beta, S, o are
        # contiguous.
        q = tl.load(q_ptr + b * sq_b + h * sq_h + rk, mask=mk, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + b * sk_b + h * sk_h + rk, mask=mk, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + b * sv_b + h * sv_h + rv, mask=mv, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + bh).to(tl.float32)
        beta = tl.load(beta_ptr + bh).to(tl.float32)
        s_ptrs = s_ptr + bh * DK * DV + rk[:, None] * DV + rv[None, :]
        smask = mk[:, None] & mv[None, :]
        S, o = _delta_rule(tl.load(s_ptrs, mask=smask, other=0.0), q, k, v, g, beta, scale)
        tl.store(s_ptrs, S, mask=smask)
        tl.store(o_ptr + bh * DV + rv, o, mask=mv)


def _step_triton_usable(q, state):
    """The step kernel serves CUDA tensors without autograd, fp32 contiguous states (the cache's) and
    head dims up to 256 (Gemma 3's); anything else takes the PyTorch lines."""
    return (_compiled_triton_for(q) and not torch.is_grad_enabled() and state.dtype == torch.float32
            and state.is_contiguous() and max(state.shape[-2:]) <= 256)


def gated_delta_rule_step_triton(q, k, v, g, beta, state, scale=None, inplace=False):
    """`_step_kernel` behind the signature of gated_delta_rule_step_torch (no autograd). Works on CUDA
    tensors, and on CPU tensors under TRITON_INTERPRET=1 (the tests)."""
    if triton is None:
        raise RuntimeError("gated_delta_rule_step_triton needs triton; use gated_delta_rule_step")
    _check_step(q, k, v, g, beta, state)
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, g, beta, state)):
        raise ValueError("gated_delta_rule_step_triton has no backward; under autograd use "
                         "gated_delta_rule_step (it takes the PyTorch lines then)")
    B, H, DK = q.shape
    DV = v.shape[-1]
    if state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError("the step kernel keeps the state in fp32 and contiguous")
    scale = DK ** -0.5 if scale is None else float(scale)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    g, beta = g.float().contiguous(), beta.float().contiguous()
    out = state if inplace else state.clone()
    o = q.new_empty(B, H, DV, dtype=torch.float32)
    BV = min(STEP_BV, _p2(DV))
    _step_kernel[(B * H, triton.cdiv(DV, BV))](q, k, v, g, beta, out, o, scale, H, q.stride(0), q.stride(1),
                                               k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                                               DK, DV, _p2(DK), BV, num_warps=4)
    return o, out


# ==============================================================================================
# A whole GDN layer's decoding step, between its two projections, as one kernel.
#
# gdn.py's layer does more than (1) per token: a short causal conv and SiLU on q, k, v, an L2 norm
# of q and k, the two gates from their pre-activations, and after the step a per-head RMSNorm of o
# times SiLU of the output gate. In a decoding step each of those is a launch of its own; even
# compiled, with inductor fusing what it can, that was 3 kernels besides the step, each a launch for
# a few KB of work. As one kernel the whole of it costs 3.9 us a layer on an H100 at batch 8
# (results/inference_h100_barrier.md: 0.086 ms for the 22 GDN layers of SmolLM2 converted with 1/4
# of its layers kept, convert.py --keep 1/4; its wait for the kernel before it included, see
# pdl_launch);
# at batch 1, with all but z loaded before its wait, its share of the captured step's critical path
# is 2.8 us a layer (results/inference_h100_path.md: 0.062 ms for the 22).
# Every one of them is per (batch, head), like the step, so it all fits in one program per (batch, head):
#
#     x_c   = sum_j w_c[j] window_c[j]              window = the last W inputs of channel c (conv
#                                                   state, then this token's), shifted in place
#     q, k, v = SiLU(x) ;  q, k <- q/||q||, k/||k||
#     g     = -exp(A_log) softplus(a + dt_bias) ;  beta = sigmoid(b)
#     S, o  = the step of (1) on the whole [D, D] state
#     y     = o / rms(o) * w_norm * SiLU(z_gate)
#
# The program holds the whole state of its head (the per-head RMSNorm needs every column of o),
# so there are B*H programs instead of _step_kernel's B*H*D/16: fewer, but each one still only
# reads and writes its 16 KB (D = 64) once. Its input is the stacked projection z of
# GatedDeltaNet.project, one row per sequence, in the order q, k, v, g (H*D columns each), a, b (H
# each); its output is what the layer's output projection multiplies.
# ==============================================================================================

if triton is not None:

    @triton.jit
    def _conv_window(conv, cw_ptr, c, mask, sc_c, sc_t, W: tl.constexpr, WP: tl.constexpr):
        """What the conv of channels c needs besides this token, loaded before the PDL wait: nothing
        another kernel of the step writes (the weights; the conv state, written by this kernel a step
        ago). Returns (w_last, window, w): the weight on this token, the previous W-1 inputs [BD, WP],
        their weights. W = 0: no conv (w_last = 1)."""
        w_last = tl.full(c.shape, 1.0, tl.float32)
        prev = tl.zeros([c.shape[0], WP], tl.float32)
        w = tl.zeros([c.shape[0], WP], tl.float32)
        if W > 0:
            w_last = tl.load(cw_ptr + c * W + (W - 1), mask=mask, other=0.0).to(tl.float32)
        if W > 1:
            j = tl.arange(0, WP)
            live = mask[:, None] & (j < W - 1)[None, :]
            prev = tl.load(conv + c[:, None] * sc_c + j[None, :] * sc_t, mask=live, other=0.0).to(tl.float32)
            w = tl.load(cw_ptr + c[:, None] * W + j[None, :], mask=live, other=0.0).to(tl.float32)
        return w_last, prev, w

    @triton.jit
    def _conv_silu(z, conv, c, mask, w_last, prev, w, sc_c, sc_t, W: tl.constexpr, WP: tl.constexpr):
        """SiLU(causal conv) of channels c for this token (its input read from z after the wait); the
        conv state (the previous W-1 inputs, one column each) moves one token on, in place."""
        x = tl.load(z + c, mask=mask, other=0.0)
        out = x.to(tl.float32) * w_last + tl.sum(prev * w, axis=1)
        if W > 1:
            # Every thread holding a copy of an element must have read the old state before any
            # overwrites it: columns 1..W-2 move one to the left, this token goes last.
            j = tl.arange(0, WP)
            live = mask[:, None] & (j < W - 1)[None, :]
            tl.debug_barrier()
            tl.store(conv + c[:, None] * sc_c + (j[None, :] - 1) * sc_t, prev.to(conv.dtype.element_ty),
                     mask=live & (j >= 1)[None, :])
            tl.store(conv + c * sc_c + (W - 2) * sc_t, x, mask=mask)
        return out * tl.sigmoid(out)

    @triton.jit
    def _layer_step_kernel(z_ptr, conv_ptr, cw_ptr, alog_ptr, dtb_ptr, wn_ptr, s_ptr, y_ptr, scale, eps,
                           H, sz_b, sc_b, sc_c, sc_t,
                           D: tl.constexpr, BD: tl.constexpr, W: tl.constexpr, WP: tl.constexpr,
                           PDL: tl.constexpr):
        bh = tl.program_id(0)
        b, h = bh // H, bh % H
        rd = tl.arange(0, BD)
        md = rd < D
        s_ptrs = s_ptr + bh * D * D + rd[:, None] * D + rd[None, :]
        smask = md[:, None] & md[None, :]
        if PDL:                                        # programmatic dependent launch (pdl_launch)
            tl.extra.cuda.gdc_launch_dependents()
        # Before the wait, all that no other kernel of the step writes: the state and the conv state
        # (only this kernel writes them, a step ago) and the layer's parameters. After it, only z.
        HD = H * D
        z, conv = z_ptr + b * sz_b, conv_ptr + b * sc_b
        S = tl.load(s_ptrs, mask=smask, other=0.0)
        wq, pq, cq = _conv_window(conv, cw_ptr, h * D + rd, md, sc_c, sc_t, W, WP)
        wk, pk, ck = _conv_window(conv, cw_ptr, HD + h * D + rd, md, sc_c, sc_t, W, WP)
        wv, pv, cv = _conv_window(conv, cw_ptr, 2 * HD + h * D + rd, md, sc_c, sc_t, W, WP)
        dt_bias = tl.load(dtb_ptr + h).to(tl.float32)
        decay = -tl.exp(tl.load(alog_ptr + h).to(tl.float32))
        w_norm = tl.load(wn_ptr + rd, mask=md, other=0.0).to(tl.float32)
        if PDL:
            tl.extra.cuda.gdc_wait()
        q = _conv_silu(z, conv, h * D + rd, md, wq, pq, cq, sc_c, sc_t, W, WP)
        k = _conv_silu(z, conv, HD + h * D + rd, md, wk, pk, ck, sc_c, sc_t, W, WP)
        v = _conv_silu(z, conv, 2 * HD + h * D + rd, md, wv, pv, cv, sc_c, sc_t, W, WP)
        q = q / tl.maximum(tl.sqrt(tl.sum(q * q, axis=0)), 1e-12)
        k = k / tl.maximum(tl.sqrt(tl.sum(k * k, axis=0)), 1e-12)
        a = tl.load(z + 4 * HD + h).to(tl.float32) + dt_bias
        # softplus(a) = max(a, 0) + log(1 + e^-|a|), the log by its series where e^-|a| is small: in
        # fp32, 1 + x loses x's digits (at a = -17 it is 1, a head that should decay would not)
        x = tl.exp(-tl.abs(a))
        softplus = tl.maximum(a, 0.0) + tl.where(x < 1e-2, x * (1.0 - x * (0.5 - x / 3.0)), tl.log(1.0 + x))
        g = decay * softplus
        beta = tl.sigmoid(tl.load(z + 4 * HD + H + h).to(tl.float32))
        S, o = _delta_rule(S, q, k, v, g, beta, scale)
        tl.store(s_ptrs, S, mask=smask)
        o = o * tl.rsqrt((tl.sum(o * o, axis=0) / D + eps).to(tl.float32))             # per-head RMSNorm
        o = o * w_norm
        gate = tl.load(z + 3 * HD + h * D + rd, mask=md, other=0.0).to(tl.float32)
        tl.store(y_ptr + b * HD + h * D + rd, (o * gate * tl.sigmoid(gate)).to(y_ptr.dtype.element_ty), mask=md)


def gdn_layer_step_usable(z, state):
    """Where gdn.py calls gdn_layer_step: CUDA without autograd (the tests call it directly under the
    interpreter), fp32 contiguous state, head dim up to 128 (a program holds a head's whole state)."""
    return (_compiled_triton_for(z) and not torch.is_grad_enabled()
            and state.dtype == torch.float32 and state.is_contiguous() and state.shape[-1] == state.shape[-2]
            and state.shape[-1] <= 128)


def gdn_layer_step(z, state, conv_state, conv_weight, A_log, dt_bias, o_norm, eps, scale=None):
    """One decoding step of a GDN layer from its stacked projection z [B, >= 4*H*D + 2*H] or [B, 1, ...]
    (rows may be strided, columns contiguous; taken as it is, because under torch.compile even a
    select of the token would be a copy kernel) to the input of its output projection, y [B, H*D]
    in z's dtype.
    state [B, H, D, D] fp32 and conv_state [B, 3*H*D, W-1] (or None, with conv_weight None: no conv)
    are updated in place (W = 1: a conv with an empty state). conv_weight [3*H*D, 1, W]; A_log,
    dt_bias [H]; o_norm [D]."""
    if state.dim() != 4 or state.shape[-1] != state.shape[-2] or state.dtype != torch.float32 \
            or not state.is_contiguous() or not 1 <= state.shape[-1] <= 128:
        raise ValueError(f"state must be [B, H, D, D] fp32 and contiguous with D <= 128; got {tuple(state.shape)} "
                         f"{state.dtype}{'' if state.is_contiguous() else ' (not contiguous)'}")
    B, H, D = state.shape[0], state.shape[1], state.shape[-1]
    for name, x, shape in (("A_log", A_log, (H,)), ("dt_bias", dt_bias, (H,)), ("o_norm", o_norm, (D,))):
        if x.shape != shape:
            raise ValueError(f"{name} must be {list(shape)}; got {tuple(x.shape)}")
    if conv_weight is not None and (conv_weight.dim() != 3 or conv_weight.shape[:2] != (3 * H * D, 1)):
        raise ValueError(f"conv_weight must be [3*H*D, 1, W] = [{3 * H * D}, 1, W]; got {tuple(conv_weight.shape)}")
    _same_kind(z=z, state=state, conv_state=conv_state, conv_weight=conv_weight, A_log=A_log, dt_bias=dt_bias,
               o_norm=o_norm)
    rows = z.shape[0] if z.dim() == 2 or (z.dim() == 3 and z.shape[1] == 1) else None
    if rows != B or z.shape[-1] < 4 * H * D + 2 * H or z.stride(-1) != 1:
        raise ValueError(f"z must be [B, >= 4*H*D + 2*H] = [{B}, {4 * H * D + 2 * H}] (or [B, 1, ...]) with "
                         f"contiguous columns; got {tuple(z.shape)} strides {z.stride()}")
    W = 0 if conv_weight is None else conv_weight.shape[-1]
    if W and (conv_state is None or conv_state.shape != (B, 3 * H * D, W - 1)):
        raise ValueError(f"conv_state must be [B, 3*H*D, W-1] = [{B}, {3 * H * D}, {W - 1}]; got "
                         f"{None if conv_state is None else tuple(conv_state.shape)}")
    scale = D ** -0.5 if scale is None else float(scale)
    return _layer_step_op(z, state, conv_state if W > 1 else None, conv_weight, A_log, dt_bias, o_norm, float(eps),
                          scale)


def pdl_launch(x):
    """Whether kernels working on x launch with programmatic dependent launch (PDL): on GPUs that
    have it (Hopper and later). In a CUDA graph each kernel otherwise starts only once the one before
    has finished, then waits on DRAM for its first loads: a microsecond or more of every small
    decoding kernel. With PDL the next kernel is launched as soon as every program of this one has
    called gdc_launch_dependents, and its gdc_wait blocks until this one has finished and its writes
    are visible: what it loads before the wait (a product's weights, a state only it writes) streams
    while this one still runs. The layer step here (_layer_step_kernel) and convert.py's decoding
    kernels call gdc_launch_dependents first and gdc_wait before they read anything that another
    kernel of the step wrote; _step_kernel, the bare step of (1) that gdn.py falls back to, does not."""
    return x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= 9


# A custom op, so that torch.compile calls it as it is: traced as a user Triton kernel, its PDL
# instructions (inline assembly) defeat the analysis of which arguments it writes, and the compiled
# step would then copy every argument. The namespace carries the module's name: a script run as
# __main__ and imported as a module registers twice.
_OPS = "gdn_" + __name__.replace(".", "_")
if triton is not None:

    @torch.library.custom_op(f"{_OPS}::layer_step", mutates_args=("state", "conv_state"))
    def _layer_step_op(z: torch.Tensor, state: torch.Tensor, conv_state: Optional[torch.Tensor],
                       conv_weight: Optional[torch.Tensor], A_log: torch.Tensor, dt_bias: torch.Tensor,
                       o_norm: torch.Tensor, eps: float, scale: float) -> torch.Tensor:
        B, H, D = state.shape[0], state.shape[1], state.shape[-1]
        W = 0 if conv_weight is None else conv_weight.shape[-1]
        y = z.new_empty(B, H * D)
        cs = conv_state if conv_state is not None else z           # (unused without a conv state)
        cw = conv_weight.contiguous() if W else z
        pdl = pdl_launch(z)
        _layer_step_kernel[(B * H,)](z, cs, cw, A_log, dt_bias, o_norm, state, y, scale, eps, H, z.stride(0),
                                     cs.stride(0), cs.stride(1) if W > 1 else 0, cs.stride(2) if W > 1 else 0,
                                     D, _p2(D), W, max(2, triton.next_power_of_2(max(W - 1, 1))), pdl,
                                     num_warps=4 if D <= 64 else 8, launch_pdl=pdl)
        return y

    @_layer_step_op.register_fake
    def _(z, state, conv_state, conv_weight, A_log, dt_bias, o_norm, eps, scale):
        return z.new_empty(state.shape[0], state.shape[1] * state.shape[-1])


# ==============================================================================================
# `python gdn_kernel.py`: check every path against the recurrence, and on a GPU benchmark them.
# Results go to results/kernel_bench.{json,md} (--profile: kernel_profile, --sweep: kernel_sweep;
# another folder with --results; an earlier result is replaced only with --overwrite), rewritten
# atomically after every row so an interrupted run still leaves what it measured.
# ==============================================================================================

def _rel(a, b):
    """Relative Frobenius error ||a - b|| / ||b||, in fp64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _inputs(B, T, H, DK, DV, dtype, device, seed):
    """Inputs shaped like the model's: q, k L2-normalised, g <= 0 mostly slow decays with some
    fast ones, beta in (0, 1), a small random initial state."""
    gen = torch.Generator().manual_seed(seed)
    F = torch.nn.functional
    q = F.normalize(torch.randn(B, T, H, DK, generator=gen), dim=-1)
    k = F.normalize(torch.randn(B, T, H, DK, generator=gen), dim=-1)
    v = torch.randn(B, T, H, DV, generator=gen)
    g = F.logsigmoid(2 * torch.randn(B, T, H, generator=gen) + 3)
    beta = torch.rand(B, T, H, generator=gen)
    h0 = 0.1 * torch.randn(B, H, DK, DV, generator=gen)
    cast = lambda x, dt: x.to(device=device, dtype=dt)
    f = torch.float64 if dtype == torch.float64 else torch.float32     # g and the state: >= fp32
    return [cast(q, dtype), cast(k, dtype), cast(v, dtype), cast(g, f), cast(beta, dtype), cast(h0, f)]


def _run_with_grads(fn, xs, seed):
    """o, final state and the gradients of (q, k, v, g, beta, h0) for a fixed random loss."""
    xs = [x.detach().clone().requires_grad_() for x in xs]
    o, S = fn(*xs[:5], initial_state=xs[5], output_final_state=True)
    gen = torch.Generator().manual_seed(seed + 1)
    wo = torch.randn(o.shape, generator=gen).to(o.device)
    ws = torch.randn(S.shape, generator=gen).to(S.device)
    grads = torch.autograd.grad((o.float() * wo).sum() + (S.float() * ws).sum(), xs)
    return [o, S] + list(grads)


_NAMES = ["o", "S", "dq", "dk", "dv", "dg", "dbeta", "dh0"]


def _compare(fn, ref_fn, xs, seed):
    got = _run_with_grads(fn, xs, seed)
    ref = _run_with_grads(ref_fn, [x.to(torch.float64) for x in xs], seed)
    return {n: _rel(a, b) for n, a, b in zip(_NAMES, got, ref)}


def _compare_forward(fn, ref_fn, xs):
    """Forward-only errors (o, S) against ref_fn in fp64; {} if the forward fails too."""
    try:
        with torch.no_grad():
            o, S = fn(*xs[:5], initial_state=xs[5], output_final_state=True)
            ro, rS = ref_fn(*[x.double() for x in xs[:5]], initial_state=xs[5].double(), output_final_state=True)
        return {"o": _rel(o, ro), "S": _rel(S, rS)}
    except Exception:                         # noqa: BLE001
        return {}


def _fla():
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as f
        import fla
        return f, getattr(fla, "__version__", "?")
    except Exception as e:                    # noqa: BLE001  (a peer, never a dependency)
        return None, f"not importable: {type(e).__name__}: {e}"


def _write_atomic(path, text):
    """A reader never sees half of `path`: the text goes to a temporary file beside it, made readable
    as a plain open() would make it (mkstemp's is private) and flushed to disk, then renamed over it."""
    import tempfile
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except BaseException:
        os.remove(tmp)
        raise


def _print_check(r):
    worst = max(r["errors"].items(), key=lambda kv: kv[1]) if r["errors"] else ("-", float("nan"))
    print(f"check {r['path']:18s} {str(r['shape']):24s} worst {worst[0]}={worst[1]:.2e} "
          f"(tol {r['tol']:.0e}) {'ok' if r['ok'] else 'FAIL ' + r.get('error', '')}", flush=True)


def _self_check(device, bf16_dims, exact=True):
    """fp64 / fp32 paths against the sequential recurrence (`exact`), then on a GPU the bf16 kernels
    against the fp64 chunked form at realistic sizes; returns rows of (case, errors, tolerance)."""
    rows = []
    fp32_cases = [(1, 1, 1, 16, 16), (2, 100, 2, 64, 64), (1, 129, 2, 128, 64), (1, 200, 2, 128, 128)] if exact else []
    paths = [("torch_chunk fp64", chunk_gated_delta_rule_torch, torch.float64, 1e-9)]
    if device == "cuda" and triton is not None:
        paths.append(("triton fp32", chunk_gated_delta_rule_triton, torch.float32, 1e-4))
    for name, fn, dt, tol in paths:
        for i, (B, T, H, DK, DV) in enumerate(fp32_cases):
            if name.startswith("triton") and max(DK, DV) > MAX_HEAD_DIM_FP32:
                continue                      # not held in fp32 (see MAX_HEAD_DIM_FP32)
            xs = _inputs(B, T, H, DK, DV, dt, device, seed=i)
            try:
                err = _compare(fn, recurrent_gated_delta_rule, xs, seed=i)
            except Exception as e:            # noqa: BLE001  (record it, go on with the rest)
                rows.append(dict(path=name, shape=[B, T, H, DK, DV], errors={}, tol=tol, ok=False,
                                 error=f"{type(e).__name__}: {e}"[:300]))
                _print_check(rows[-1])
                continue
            rows.append(dict(path=name, shape=[B, T, H, DK, DV], errors=err, tol=tol,
                             ok=all(e < tol for e in err.values())))
            _print_check(rows[-1])
    if device == "cuda":
        # bf16 at realistic sizes; the reference is the PyTorch chunked form in fp64 on the same
        # (bf16-rounded) inputs, itself checked against the recurrence just above.
        peers = [("triton bf16", chunk_gated_delta_rule_triton)]
        fla_fn, _ = _fla()
        if fla_fn is not None:
            peers.append(("fla bf16", lambda q, k, v, g, b, initial_state=None, output_final_state=False:
                          fla_fn(q, k, v, g, b, initial_state=initial_state, output_final_state=output_final_state)))
        for DK, DV in bf16_dims:
            xs = _inputs(2, 2049, 4, DK, DV, torch.bfloat16, device, seed=DK + DV)
            for name, fn in peers:
                try:
                    err = _compare(fn, chunk_gated_delta_rule_torch, xs, seed=1)
                except Exception as e:        # noqa: BLE001  (report a peer's failure, don't die)
                    # A peer may refuse only its backward (fla does on Triton < 3.7.1 on Hopper): its
                    # forward is still checked, and the refusal is recorded with it.
                    err = _compare_forward(fn, chunk_gated_delta_rule_torch, xs)
                    rows.append(dict(path=name + " (fwd only)", shape=[2, 2049, 4, DK, DV], errors=err,
                                     tol=2e-2, ok=bool(err) and all(e < 2e-2 for e in err.values()),
                                     error=f"backward: {type(e).__name__}: {e}"[:300]))
                    _print_check(rows[-1])
                    continue
                rows.append(dict(path=name, shape=[2, 2049, 4, DK, DV], errors=err, tol=2e-2,
                                 ok=all(e < 2e-2 for e in err.values())))
                _print_check(rows[-1])
    return rows


def _bench(device, results, save, dims, lengths, methods):
    from triton.testing import do_bench
    from tqdm import tqdm
    fla_fn, fla_version = _fla()
    results["fla"] = fla_version
    F = torch.nn.functional
    B, H = 4, 8
    configs = [(D, T) for D in dims for T in lengths]
    bar = tqdm(total=len(configs) * len(methods), desc="bench", mininterval=2)
    for D, T in configs:
        xs = _inputs(B, T, H, D, D, torch.bfloat16, device, seed=0)[:5]
        do = torch.randn(B, T, H, D, device=device)
        row = dict(D=D, T=T, B=B, H=H)
        for m in methods:
            bar.set_postfix_str(f"D={D} T={T} {m}")
            bar.update(1)
            if m == "torch_chunk" and T > 4096:
                row[m] = dict(skipped="T > 4096: the Python loop over T/64 chunks and its autograd graph "
                                      "make it too slow to be worth timing")
                continue
            if m == "fla" and fla_fn is None:
                row[m] = dict(skipped=fla_version)
                continue
            if m == "sdpa":
                qs, ks, vs = (x.transpose(1, 2).contiguous() for x in xs[:3])
                args = [qs, ks, vs]
                fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
                dout = do.to(torch.bfloat16).transpose(1, 2).contiguous()
            else:
                args = list(xs)
                f = dict(triton=chunk_gated_delta_rule_triton, torch_chunk=chunk_gated_delta_rule_torch,
                         fla=fla_fn)[m]
                fn = lambda *a, f=f: f(*a)[0]
                dout = do if m != "fla" else do.to(torch.bfloat16)
            try:
                row[m] = dict(fwd_ms=round(do_bench(lambda: fn(*args), warmup=10, rep=50, return_mode="median"), 4))
                gargs = [a.detach().clone().requires_grad_() for a in args]
                def fb():
                    o = fn(*gargs)
                    torch.autograd.grad(o, gargs, dout.to(o.dtype))
                try:                        # a forward that ran is kept even if the backward refuses
                    row[m]["fwd_bwd_ms"] = round(do_bench(fb, warmup=10, rep=50, return_mode="median"), 4)
                except torch.cuda.OutOfMemoryError:
                    raise
                except Exception as e:      # noqa: BLE001
                    row[m]["bwd_skipped"] = f"{type(e).__name__}: {e}"[:300]
            except torch.cuda.OutOfMemoryError:
                row[m] = dict(skipped="out of GPU memory")
            except Exception as e:          # noqa: BLE001  (a peer failing is a result, not a crash)
                row[m] = dict(skipped=f"{type(e).__name__}: {e}"[:300])
            torch.cuda.empty_cache()
        results["bench"].append(row)
        save()
    bar.close()


def _profile(device, results, save, dims, lengths):
    """Where our forward + backward spends its time: CUDA time per kernel, from torch.profiler, per
    call of the whole autograd Function (B = 4, H = 8, bf16, as the benchmark)."""
    from torch.profiler import ProfilerActivity, profile
    B, H, reps = 4, 8, 5
    for D in dims:
        for T in lengths:
            xs = [x.detach().requires_grad_(x.is_floating_point()) for x in _inputs(B, T, H, D, D, torch.bfloat16, device, 0)[:5]]
            do = torch.randn(B, T, H, D, device=device)
            step = lambda: torch.autograd.grad(chunk_gated_delta_rule_triton(*xs)[0], xs, do)
            step()                                            # compile outside the profile
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(reps):
                    step()
                torch.cuda.synchronize()
            kernels = {}
            for e in prof.key_averages():
                ms = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
                if ms > 0:
                    kernels[e.key[:60]] = round(ms / 1e3 / reps, 4)    # us total -> ms per call
            results.setdefault("profile", []).append(dict(D=D, T=T, B=B, H=H, ms_per_call=dict(
                sorted(kernels.items(), key=lambda kv: -kv[1]))))
            save()


def _sweep(device, results, save, dims, lengths):
    """The forward's time under other launch settings of its scan (value columns per program,
    warps, pipeline stages): how SCAN_BV and _launch_meta's choices were made."""
    import itertools
    from triton.testing import do_bench
    global _launch_meta
    base = _launch_meta
    for D in dims:
        for T in lengths:
            q, k, v, g, beta, h0 = _inputs(4, T, 8, D, D, torch.bfloat16, device, 0)
            fwd = lambda: chunk_gated_delta_rule_triton(q, k, v, g, beta, initial_state=h0, output_final_state=True)[0]
            ref = fwd()
            for bv, warps, stages in itertools.product((16, 32, 64), (2, 4), (2, 3)):
                _launch_meta = lambda q_, v_: {**base(q_, v_), "BV": min(bv, _p2(D)), "SCAN_WARPS": warps,
                                               "SCAN_STAGES": stages}
                try:
                    row = dict(D=D, T=T, bv=bv, warps=warps, stages=stages,
                               fwd_ms=round(do_bench(fwd, warmup=5, rep=30, return_mode="median"), 4),
                               rel_diff=_rel(fwd(), ref))
                except Exception as e:        # noqa: BLE001  (a setting that fails is a result)
                    row = dict(D=D, T=T, bv=bv, warps=warps, stages=stages, error=f"{type(e).__name__}: {e}"[:200])
                finally:
                    _launch_meta = base
                results.setdefault("sweep", []).append(row)
                save()


def _markdown(results):
    lines = [f"# Gated delta rule kernels: {results['device']}", "",
             f"command: `{results['command']}`; git {results['git_commit']}; torch {results['torch']}, "
             f"triton {results['triton']}, fla {results['fla']}; seed {results['seed']}; "
             f"scan value block {results['scan_bv']}", ""]
    if results["checks"]:
        lines += ["## Checks (relative Frobenius error vs reference)", "",
                  "| path | B,T,H,Dk,Dv | " + " | ".join(_NAMES) + " | ok |",
                  "|---|---|" + "---|" * len(_NAMES) + "---|"]
        for r in results["checks"]:
            errs = " | ".join(f"{r['errors'].get(n, float('nan')):.1e}" for n in _NAMES)
            lines.append(f"| {r['path']} | {','.join(map(str, r['shape']))} | {errs} | "
                         f"{'yes' if r['ok'] else 'NO ' + r.get('error', '')} |")
        lines.append("")
    if results["bench"]:
        lines += ["## Milliseconds (median, triton.testing.do_bench), bf16, B=4, H=8; fwd / fwd+bwd", "",
                  "| D | T | ours (Triton) | PyTorch chunk | fla | SDPA causal | ours/fla fwd | ours/fla fwd+bwd |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in results["bench"]:
            cell = lambda m: (f"{r[m]['fwd_ms']:.3f} / " + (f"{r[m]['fwd_bwd_ms']:.3f}" if "fwd_bwd_ms" in r[m] else "refused")
                              if "fwd_ms" in r.get(m, {}) else "skipped")
            ratio = lambda key: (f"{r['triton'][key] / r['fla'][key]:.2f}x"
                                 if key in r.get("fla", {}) and key in r.get("triton", {}) else "-")
            lines.append(f"| {r['D']} | {r['T']} | {cell('triton')} | {cell('torch_chunk')} | {cell('fla')} | "
                         f"{cell('sdpa')} | {ratio('fwd_ms')} | {ratio('fwd_bwd_ms')} |")
        skipped = {s for r in results["bench"] for m in ("torch_chunk", "fla")
                   for s in [r.get(m, {}).get("skipped")] if s}
        skipped |= {f"fla backward refused: {r['fla']['bwd_skipped']}" for r in results["bench"]
                    if "bwd_skipped" in r.get("fla", {})}
        lines += [""] + [f"- skipped: {s}" for s in sorted(skipped)]
    if results.get("sweep"):
        lines += ["", "## Forward (ms) under other launch settings of the scan (B=4, H=8, bf16; --sweep)", "",
                  "| D | T | value columns | warps | stages | fwd ms | o vs default |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['D']} | {r['T']} | {r['bv']} | {r['warps']} | {r['stages']} | "
                  + (f"{r['fwd_ms']:.3f} | {r['rel_diff']:.1e} |" if "fwd_ms" in r else f"{r['error']} | |")
                  for r in results["sweep"]]
    for r in results.get("profile", []):
        total = sum(r["ms_per_call"].values())
        lines += ["", f"## Where forward + backward spends its time: D={r['D']}, T={r['T']}, B={r['B']}, "
                  f"H={r['H']}, bf16 (torch.profiler, ms per call; total {total:.3f})", "",
                  "| kernel | ms | share |", "|---|---|---|"]
        lines += [f"| {k} | {v:.3f} | {100 * v / max(total, 1e-9):.0f}% |" for k, v in r["ms_per_call"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None):
    """Check the chunked forms against the sequential reference (PyTorch; on a GPU also the Triton
    kernel, forward and gradients, in fp32 and bf16; tests/ checks every path); on a GPU, benchmark
    (or --profile, --sweep). --dims / --lengths narrow the benchmark (e.g. --dims 128 --lengths
    4096,32768 for a short run)."""
    import argparse
    import json
    import shlex
    import subprocess
    import sys
    import time
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--dims", default="64,128", help="head dims to benchmark")
    p.add_argument("--lengths", default="1024,4096,16384,32768", help="sequence lengths to benchmark")
    p.add_argument("--profile", action="store_true",
                   help="instead of the benchmark, time each kernel of our forward + backward (torch.profiler)")
    p.add_argument("--methods", default="triton,torch_chunk,fla,sdpa", help="what the benchmark times")
    p.add_argument("--no-checks", action="store_true", help="skip the checks (a benchmark-only run)")
    p.add_argument("--sweep", action="store_true",
                   help="instead of the benchmark, time the forward under other launch settings of its scan")
    p.add_argument("--scan-bv", type=int, default=SCAN_BV, choices=[16, 32, 64],
                   help="value columns per scan program")
    p.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                   help="folder of the GPU run's JSON and markdown (kernel_bench, kernel_profile or kernel_sweep)")
    p.add_argument("--overwrite", action="store_true", help="replace that folder's earlier result of this mode")
    a = p.parse_args(argv)
    unknown = set(a.methods.split(",")) - {"triton", "torch_chunk", "fla", "sdpa"}
    if unknown:
        p.error(f"--methods: unknown {', '.join(sorted(unknown))} (choose from triton, torch_chunk, fla, sdpa)")
    if a.profile and a.sweep:
        p.error("--profile and --sweep each replace the benchmark: give one")
    if (a.profile or a.sweep) and a.methods != p.get_default("methods"):
        p.error(f"--methods picks what the benchmark times; {'--profile' if a.profile else '--sweep'} replaces "
                f"the benchmark and times our kernel alone")
    if a.sweep and a.scan_bv != p.get_default("scan_bv"):
        p.error("--sweep tries every --scan-bv itself: drop --scan-bv")
    globals()["SCAN_BV"] = a.scan_bv

    def sizes(text, flag):                     # '1k,4096' -> [1024, 4096]
        try:
            out = [int(t[:-1]) * 1024 if t.strip().lower().endswith("k") else int(t) for t in text.split(",")]
        except ValueError:
            out = []
        if not out or min(out) <= 0:
            p.error(f"{flag} '{text}': a list of positive sizes (examples: 64,128; 4k,32768)")
        return out
    dims, lengths = sizes(a.dims, "--dims"), sizes(a.lengths, "--lengths")
    seed = 0
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":                         # only the PyTorch checks run here: what else is asked goes undone
        gpu_only = [f"--{k.replace('_', '-')}" for k in ("no_checks", "profile", "sweep", "methods", "dims", "lengths",
                                                        "scan_bv", "results", "overwrite") if getattr(a, k) != p.get_default(k)]
        if gpu_only:
            p.error(f"{', '.join(gpu_only)}: for the GPU run (benchmark, profile, sweep, results); this machine "
                    f"has no CUDA GPU, and here `python gdn_kernel.py` only runs the PyTorch checks")
    # A GPU run writes results (on a CPU there is nothing to benchmark): where, checked before any work.
    out_dir = a.results
    stem = "kernel_profile" if a.profile else "kernel_sweep" if a.sweep else "kernel_bench"
    if device == "cuda":
        if os.path.exists(os.path.join(out_dir, stem + ".json")) and not a.overwrite:
            p.error(f"{os.path.join(out_dir, stem)}.json already exists: pass --overwrite to replace it, or "
                    f"another --results folder")
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as e:
            p.error(f"--results '{out_dir}': {e.strerror}")
        if not os.access(out_dir, os.W_OK):
            p.error(f"--results '{out_dir}' is not a folder this process can write in")
    here = os.path.dirname(os.path.abspath(__file__))
    commit, dirty = os.environ.get("GIT_COMMIT"), None    # said explicitly (a GPU box's copy of the tree)
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                    cwd=here).stdout.strip()
            dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                        text=True, cwd=here).stdout.strip())
        except Exception:                     # noqa: BLE001  (no git, no .git)
            commit = "unknown"
    results = dict(command="python " + shlex.join(sys.argv), git_commit=commit, dirty=dirty, seed=seed,
                   device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                   torch=torch.__version__, triton=getattr(triton, "__version__", None), fla=None,
                   scan_bv=SCAN_BV, checks=[], bench=[])

    def save():
        if device != "cuda":                  # numbers in results/ come from the GPU run only
            return
        _write_atomic(os.path.join(out_dir, stem + ".json"), json.dumps(results, indent=1))
        _write_atomic(os.path.join(out_dir, stem + ".md"), _markdown(results))

    t0 = time.time()
    # On a GPU: exact checks and bf16 at D = 64, the benchmark, then bf16 at D = 128 (whatever
    # finishes is saved, so a slow compile at the end cannot cost the table).
    results["checks"] = [] if a.no_checks else _self_check(device, bf16_dims=((64, 64),))
    save()
    if device == "cuda":
        if a.profile or a.sweep:
            (_profile if a.profile else _sweep)(device, results, save, dims, lengths)
        else:
            _bench(device, results, save, dims, lengths, a.methods.split(","))
        if not a.no_checks:
            results["checks"] += _self_check(device, bf16_dims=((128, 128), (128, 64)), exact=False)
        save()
        print(_markdown(results))
    n_bad = sum(not r["ok"] for r in results["checks"])
    print(f"{len(results['checks'])} checks, {n_bad} failed; {time.time() - t0:.0f} s"
          + (f"; results in {out_dir}" if device == "cuda" else "; no GPU: benchmark skipped"))
    return 1 if n_bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
