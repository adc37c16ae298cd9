"""
gdn_kernel.py -- the gated delta rule as math on tensors.

A Gated DeltaNet (GDN) head keeps a matrix memory S (key dim x value dim) instead of a KV cache.
For every token t it forgets a little, erases what its key k_t currently recalls, and writes v_t:

    S_t = alpha_t * (I - beta_t k_t k_t^T) S_{t-1}  +  beta_t k_t v_t^T          (1)
    o_t = scale * S_t^T q_t

alpha_t = exp(g_t) in (0, 1] is the decay (g_t <= 0 is the *log* decay, kept in fp32), beta_t in
[0, 1] the write strength. (1) is one step of gradient descent on the online regression loss
0.5 * ||S^T k_t - v_t||^2 with step size beta_t, after decaying the memory: the "delta rule".
Expanding (1) gives the form every function below uses:

    S' = alpha_t S_{t-1}                  (forget)
    u_t = beta_t (v_t - S'^T k_t)         (the error of what k_t recalls, scaled: the "delta")
    S_t = S' + k_t u_t^T                  (write the correction)

This file holds three ways to compute (1) over a sequence, all with the same signature:
  * `recurrent_gated_delta_rule`: token by token, exactly as written above. Slow, obviously right:
    the reference everything else is tested against.
  * `chunk_gated_delta_rule_torch`: the chunked (WY) form in plain PyTorch. Exact (up to rounding),
    differentiable, and made of matrix products, so it is fast enough on a CPU.
  * `chunk_gated_delta_rule`: the public entry point the model calls; it picks the fastest exact
    implementation available for the tensors' device.
  * `gated_delta_rule_step`: one token with a carried state, for cached decoding.

Shapes (the project's convention): q, k [B, T, H, Dk]; v [B, T, H, Dv]; g, beta [B, T, H];
state [B, H, Dk, Dv]. Outputs o [B, T, H, Dv] and, on request, the final state.
"""

import torch


def _check(q, k, v, g, beta, initial_state):
    """Fail early, naming the tensors, rather than deep inside an einsum."""
    if q.dim() != 4 or q.shape != k.shape:
        raise ValueError(f"q and k must both be [B, T, H, Dk]; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    B, T, H, Dk = q.shape
    if v.dim() != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(f"v must be [B, T, H, Dv] = [{B}, {T}, {H}, Dv]; got {tuple(v.shape)}")
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != (B, T, H):
            raise ValueError(f"{name} must be [B, T, H] = [{B}, {T}, {H}]; got {tuple(x.shape)}")
    if initial_state is not None and initial_state.shape != (B, H, Dk, v.shape[-1]):
        raise ValueError(f"initial_state must be [B, H, Dk, Dv] = [{B}, {H}, {Dk}, {v.shape[-1]}]; "
                         f"got {tuple(initial_state.shape)}")


def recurrent_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False):
    """The reference: equation (1) one token at a time, in fp32 (or fp64 if given fp64)."""
    _check(q, k, v, g, beta, initial_state)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    scale = Dk ** -0.5 if scale is None else scale
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v, g, beta = (x.to(dt) for x in (q, k, v, g, beta))
    S = q.new_zeros(B, H, Dk, Dv) if initial_state is None else initial_state.to(dt)
    o = []
    for t in range(T):
        S = S * g[:, t, :, None, None].exp()                                       # forget
        kt = k[:, t]                                                               # [B, H, Dk]
        u = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhkv,bhk->bhv", S, kt))  # delta
        S = S + kt[..., :, None] * u[..., None, :]                                 # write
        o.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t] * scale))                # read
    o = torch.stack(o, dim=1) if T > 0 else v.new_zeros(B, 0, H, Dv, dtype=dt)
    return o, (S if output_final_state else None)


def gated_delta_rule_step(q, k, v, g, beta, state, scale=None):
    """One token of (1) for decoding: q, k [B, H, Dk], v [B, H, Dv], g, beta [B, H], state
    [B, H, Dk, Dv] (fp32). Returns (o [B, H, Dv], new state). Memory and time per token are constant:
    that is the whole point of replacing the KV cache."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    S = state * g.float()[..., None, None].exp()
    k, v, q = k.float(), v.float(), q.float()
    u = beta.float()[..., None] * (v - torch.einsum("bhkv,bhk->bhv", S, k))
    S = S + k[..., :, None] * u[..., None, :]
    return torch.einsum("bhkv,bhk->bhv", S, q * scale), S


# ----------------------------------------------------------------------------------------------
# The chunked (WY) form.
#
# Split the sequence into chunks of C tokens. Inside one chunk, number the tokens i = 1..C, let S_0
# be the state entering the chunk and gamma_i = g_1 + ... + g_i the cumulative log decay, so the
# memory written at token j has decayed by exp(gamma_i - gamma_j) <= 1 at token i. Unrolling the
# three-line form of (1) from S_0:
#
#     S_i = exp(gamma_i) S_0 + sum_{j<=i} exp(gamma_i - gamma_j) k_j u_j^T                   (2)
#
# The deltas u_j depend on each other (each reads the memory the earlier ones wrote):
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
# W and U0 depend only on the chunk's own k, v, g, beta: this is the WY representation (the chunk's
# C rank-one updates become one product W S_0 plus a constant). With U in hand, (2) gives the
# outputs and the next state as plain matrix products:
#
#     O     = scale * [ exp(gamma) * (Q S_0)  +  (Q K^T * D) U ],   D_ij = exp(gamma_i - gamma_j), j<=i
#     S_C   = exp(gamma_C) S_0 + (exp(gamma_C - gamma) * K)^T U                               (4)
#
# Only S is carried from chunk to chunk: T/C sequential steps of matrix products instead of T
# rank-one updates. Every exp() is of a difference gamma_i - gamma_j with j <= i, so it is <= 1 and
# cannot overflow; the upper triangle is masked *before* the exp for that reason.
# ----------------------------------------------------------------------------------------------

def chunk_gated_delta_rule_torch(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                                 chunk_size=64):
    """Equations (3)-(4) in PyTorch, differentiable. Any T: the tail is padded with k = v = 0 and
    g = 0 (no write, no decay), which leaves the state and the real outputs unchanged."""
    _check(q, k, v, g, beta, initial_state)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    C = chunk_size
    scale = Dk ** -0.5 if scale is None else scale
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    pad = (-T) % C
    # [B, T, H, D] -> [B, H, N, C, D]: heads outermost, chunks in order, tokens within a chunk.
    def chunks(x):
        x = x.to(dt)
        if pad:
            x = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))      # pad along T
        x = x.transpose(1, 2)
        return x.reshape(B, H, -1, C, *x.shape[3:])
    q, k, v, g, beta = (chunks(x) for x in (q, k, v, g, beta))
    N = q.shape[2]
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
    S = q.new_zeros(B, H, Dk, Dv) if initial_state is None else initial_state.to(dt)
    o = []
    for n in range(N):                                                       # only S crosses chunks
        U = U0[:, :, n] - W[:, :, n] @ S                                     # (3)
        gam = gamma[:, :, n]
        o.append(scale * (gam.exp()[..., None] * (q[:, :, n] @ S) + QK[:, :, n] @ U))
        decay_to_end = (gam[..., -1:] - gam).exp()[..., None]                # exp(gamma_C - gamma_j)
        S = gam[..., -1, None, None].exp() * S + (decay_to_end * k[:, :, n]).transpose(-1, -2) @ U
    o = torch.stack(o, dim=2).reshape(B, H, N * C, Dv)[:, :, :T].transpose(1, 2)
    return o, (S if output_final_state else None)


def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False):
    """The entry point gdn.py calls: same math and signature on every device."""
    return chunk_gated_delta_rule_torch(q, k, v, g, beta, scale, initial_state, output_final_state)
