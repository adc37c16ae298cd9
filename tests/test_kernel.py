"""Tests of gdn_kernel.py: every implementation of the gated delta rule against the sequential
recurrence, forward and all gradients, plus bad input.

The Triton tests need CUDA or the Triton interpreter on the CPU; the interpreter is chosen when the
kernels are defined, so run them as   TRITON_INTERPRET=1 python -m pytest -q tests
"""
import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import gdn_kernel as gk  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
needs_triton = pytest.mark.skipif(
    gk.triton is None or not (torch.cuda.is_available() or INTERPRET),
    reason="Triton path needs triton plus CUDA or TRITON_INTERPRET=1 (set before Python starts)")

# fp32 in, fp32 out: the kernels use exact fp32 products for fp32 inputs, so only summation order
# differs from the recurrence. Relative Frobenius error bound:
TOL_FP32 = 2e-5
TOL_FP64 = 1e-10


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def inputs(B, T, H, DK, DV, dtype=torch.float32, device=DEVICE, seed=0):
    return gk._inputs(B, T, H, DK, DV, dtype, device, seed)


def all_outputs(fn, xs, with_h0=True, final=True, seed=0):
    """o, final state (if asked), and grads of q, k, v, g, beta (and h0) for a random loss."""
    xs = [x.detach().clone().requires_grad_() for x in xs]
    h0 = xs[5] if with_h0 else None
    o, S = fn(*xs[:5], initial_state=h0, output_final_state=final)
    gen = torch.Generator().manual_seed(seed + 7)
    loss = (o * torch.randn(o.shape, generator=gen).to(o)).sum()
    if final:
        loss = loss + (S * torch.randn(S.shape, generator=gen).to(S)).sum()
    wrt = xs if with_h0 else xs[:5]
    return [o] + ([S] if final else []) + list(torch.autograd.grad(loss, wrt))


def assert_close_all(got, ref, tol):
    assert len(got) == len(ref)
    for idx, (a, b) in enumerate(zip(got, ref)):
        assert a.shape == b.shape, (idx, a.shape, b.shape)
        assert torch.isfinite(a).all(), idx
        e = rel(a, b)
        assert e < tol, f"output #{idx}: relative error {e:.2e} >= {tol:.0e}"


# --- Triton path (interpreter on CPU, compiled on CUDA) ---------------------------------------

@needs_triton
@pytest.mark.parametrize("T", [1, 5, 63, 64, 65, 150])
def test_triton_matches_recurrence(T):
    xs = inputs(2, T, 2, 32, 16, seed=T)
    got = all_outputs(gk.chunk_gated_delta_rule_triton, xs)
    ref = all_outputs(gk.recurrent_gated_delta_rule, [x.double() for x in xs])
    assert_close_all(got, ref, TOL_FP32)


@needs_triton
@pytest.mark.parametrize("DK,DV", [(16, 16), (24, 40), (64, 32)])
def test_triton_head_dims(DK, DV):
    """Non-power-of-two and unequal key/value dims (padded tiles, masked loads)."""
    xs = inputs(1, 70, 3, DK, DV, seed=DK + DV)
    got = all_outputs(gk.chunk_gated_delta_rule_triton, xs)
    ref = all_outputs(gk.recurrent_gated_delta_rule, [x.double() for x in xs])
    assert_close_all(got, ref, TOL_FP32)


@needs_triton
@pytest.mark.parametrize("bv", [16, 64])
def test_triton_smaller_scan_blocks(bv, monkeypatch):
    """The scans split the value columns into blocks of SCAN_BV: any block size gives the same result."""
    monkeypatch.setattr(gk, "SCAN_BV", bv)
    xs = inputs(1, 130, 2, 32, 64, seed=bv)
    got = all_outputs(gk.chunk_gated_delta_rule_triton, xs)
    ref = all_outputs(gk.recurrent_gated_delta_rule, [x.double() for x in xs])
    assert_close_all(got, ref, TOL_FP32)


@needs_triton
def test_triton_repeated_keys():
    """The worst case for the chunk inverse: one key written over and over at full strength and no
    decay, so L is all ones below the diagonal and (I + L)^-1 has +1 / -1 entries that the doubling
    must produce from products of much larger intermediate sums if it were a power series."""
    q, k, v, g, beta, h0 = inputs(1, 130, 2, 32, 32, seed=5)
    k = k[:, :1].expand_as(k).contiguous()
    g, beta = torch.zeros_like(g), torch.ones_like(beta)
    xs = [q, k, v, g, beta, h0]
    got = all_outputs(gk.chunk_gated_delta_rule_triton, xs)
    ref = all_outputs(gk.recurrent_gated_delta_rule, [x.double() for x in xs])
    assert_close_all(got, ref, TOL_FP32)


@needs_triton
def test_triton_without_state():
    """No initial state, no final state: o and grads of q, k, v, g, beta only."""
    xs = inputs(1, 100, 2, 32, 32, seed=3)
    got = all_outputs(gk.chunk_gated_delta_rule_triton, xs, with_h0=False, final=False)
    ref = all_outputs(gk.recurrent_gated_delta_rule, [x.double() for x in xs], with_h0=False, final=False)
    assert_close_all(got, ref, TOL_FP32)
    o, S = gk.chunk_gated_delta_rule_triton(*xs[:5])
    assert S is None and o.dtype == torch.float32


@needs_triton
def test_triton_scale_and_strong_decay():
    """A custom scale and decays strong enough that exp(gamma) underflows inside a chunk."""
    xs = inputs(1, 90, 2, 16, 16, seed=5)
    xs[3] = xs[3] * 40.0                                   # g down to about -40 per token
    f = lambda *a, **kw: gk.chunk_gated_delta_rule_triton(*a, scale=0.3, **kw)
    r = lambda *a, **kw: gk.recurrent_gated_delta_rule(*a, scale=0.3, **kw)
    assert_close_all(all_outputs(f, xs), all_outputs(r, [x.double() for x in xs]), TOL_FP32)


@needs_triton
def test_triton_noncontiguous_inputs():
    """Views with odd strides are made contiguous, not misread."""
    xs = inputs(2, 40, 3, 16, 16, seed=9)
    q, k, v, g, beta, h0 = xs
    qt = q.transpose(0, 2).contiguous().transpose(0, 2)           # same values, permuted strides
    vt = v.transpose(1, 2).contiguous().transpose(1, 2)
    gt = g.transpose(0, 1).contiguous().transpose(0, 1)
    assert not qt.is_contiguous() and not vt.is_contiguous() and not gt.is_contiguous()
    o1, S1 = gk.chunk_gated_delta_rule_triton(qt, k, vt, gt, beta, initial_state=h0, output_final_state=True)
    o2, S2 = gk.recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    assert rel(o1, o2) < TOL_FP32 and rel(S1, S2) < TOL_FP32


@needs_triton
@pytest.mark.skipif(not INTERPRET, reason="the interpreter's refusal")
def test_triton_bf16_under_the_interpreter_is_refused():
    """The Triton interpreter (3.9) returns garbage for a bf16 tl.dot (also for CUDA tensors, which it
    copies to the host): bf16 is refused there, not computed (it is checked compiled on the GPU,
    below and by `python gdn_kernel.py`)."""
    xs = inputs(1, 8, 1, 16, 16, dtype=torch.bfloat16, device="cpu")
    with pytest.raises(ValueError, match="bf16 under TRITON_INTERPRET=1"):
        gk.chunk_gated_delta_rule_triton(*xs[:5])


@pytest.mark.skipif(gk.triton is None or not torch.cuda.is_available() or INTERPRET,
                    reason="compiled Triton on CUDA only: the interpreter's bf16 tl.dot is wrong (see above)")
def test_triton_bf16_forward_close():
    """bf16 operands on the tensor cores: a loose check (the tight ones run on the GPU)."""
    xs = inputs(1, 80, 2, 32, 32, dtype=torch.bfloat16, device="cuda", seed=11)
    o, S = gk.chunk_gated_delta_rule_triton(*xs[:5], initial_state=xs[5], output_final_state=True)
    o2, S2 = gk.recurrent_gated_delta_rule(*[x.double() for x in xs[:5]], initial_state=xs[5].double(),
                                            output_final_state=True)
    assert rel(o, o2) < 2e-2 and rel(S, S2) < 2e-2


@pytest.mark.skipif(gk.triton is None or not torch.cuda.is_available() or INTERPRET,
                    reason="compiled Triton on CUDA only: the interpreter's bf16 tl.dot is wrong (see above)")
@pytest.mark.parametrize("with_h0", [True, False], ids=["h0", "no_h0"])
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float32, TOL_FP32)], ids=["bf16", "fp32"])
def test_triton_cuda_backward_realistic(dtype, tol, with_h0):
    """Forward and every gradient (q, k, v, g, beta, h0) of the compiled kernel at a model's shape,
    against the fp64 recurrence on the same (rounded) inputs. Stage 1 distillation runs exactly this
    bf16 backward (gdn.py casts q, k, v to bf16 under autocast), and no other test checks it; T = 300
    is not a multiple of the chunk, so the last chunk is partial. Tolerances are on the relative error
    of each whole tensor: 2e-2 for bf16 operands (8 mantissa bits; an H200 gave <= 4e-3), TOL_FP32 for fp32."""
    xs = inputs(2, 300, 4, 64, 64, dtype=dtype, device="cuda", seed=21)
    got = all_outputs(gk.chunk_gated_delta_rule_triton, xs, with_h0=with_h0, final=with_h0)
    ref = all_outputs(gk.recurrent_gated_delta_rule, [x.double() for x in xs], with_h0=with_h0, final=with_h0)
    n = 2 if with_h0 else 1                                   # grads of q, k, v, g, beta follow o (and S)
    assert got[0].dtype == torch.float32 and [a.dtype for a in got[n:n + 5]] == [x.dtype for x in xs[:5]]
    assert_close_all(got, ref, tol)


@needs_triton
@pytest.mark.parametrize("dtypes", [(torch.float32,) * 3, (torch.float64,) * 3,
                                    (torch.bfloat16, torch.float32, torch.bfloat16)])
def test_triton_rejects_big_head_dim(dtypes):
    """fp32 operands hold up to MAX_HEAD_DIM_FP32; fp64 and mixed inputs are computed in fp32 too,
    so they meet the same limit rather than a shared-memory failure inside the kernel."""
    xs = inputs(1, 4, 1, gk.MAX_HEAD_DIM_FP32 + 16, 16, device="cpu")
    xs[:3] = [x.to(dt) for x, dt in zip(xs[:3], dtypes)]
    with pytest.raises(ValueError, match=f"holds head dims up to .*; got Dk={gk.MAX_HEAD_DIM_FP32 + 16}"):
        gk.chunk_gated_delta_rule_triton(*xs[:5])


# --- PyTorch forms ---------------------------------------------------------------------------

@pytest.mark.parametrize("C", [16, 32, 64])
@pytest.mark.parametrize("T", [1, 31, 64, 100])
def test_torch_chunk_matches_recurrence_fp64(C, T):
    xs = inputs(2, T, 2, 16, 8, dtype=torch.float64, device="cpu", seed=T + C)
    f = lambda *a, **kw: gk.chunk_gated_delta_rule_torch(*a, chunk_size=C, **kw)
    assert_close_all(all_outputs(f, xs), all_outputs(gk.recurrent_gated_delta_rule, xs), TOL_FP64)


@pytest.mark.parametrize("fn", [gk.recurrent_gated_delta_rule, gk.chunk_gated_delta_rule_torch,
                                gk.chunk_gated_delta_rule])
def test_empty_sequence_returns_the_initial_state(fn):
    """T = 0 (an empty chunk of a prompt): no output rows, and the final state is the initial one."""
    q, k, v, g, beta, h0 = inputs(2, 0, 3, 8, 4, device="cpu")
    o, S = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    assert o.shape == (2, 0, 3, 4) and torch.equal(S, h0.to(S.dtype))


def test_recurrence_by_hand():
    """The PyTorch forms against equation (1) written out as matrices, S_t = alpha_t (I - beta_t k_t k_t^T)
    S_{t-1} + beta_t k_t v_t^T and o_t = S_t^T q_t / sqrt(Dk), for three tokens with the default scale.
    Every other test compares the forms with each other, and would not see a mistake they share."""
    B, T, H, DK, DV = 2, 3, 2, 4, 3
    q, k, v, g, beta, h0 = inputs(B, T, H, DK, DV, dtype=torch.float64, device="cpu", seed=12)
    want_o, want_S = torch.zeros(B, T, H, DV, dtype=torch.float64), h0.clone()
    for b in range(B):
        for h in range(H):
            S = h0[b, h]
            for t in range(T):
                kt, a, bt = k[b, t, h][:, None], g[b, t, h].exp(), beta[b, t, h]
                S = a * (torch.eye(DK, dtype=torch.float64) - bt * kt @ kt.T) @ S + bt * kt @ v[b, t, h][None, :]
                want_o[b, t, h] = S.T @ q[b, t, h] / DK ** 0.5
            want_S[b, h] = S
    got = [gk.recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True),
           gk.chunk_gated_delta_rule_torch(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                           chunk_size=2)]
    S, outs = h0.clone(), []
    for t in range(T):
        o, S = gk.gated_delta_rule_step_torch(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], S)
        outs.append(o)
    got.append((torch.stack(outs, 1), S))
    for o, S in got:
        torch.testing.assert_close(o, want_o, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(S, want_S, rtol=1e-12, atol=1e-12)


def test_torch_chunk_gradcheck():
    xs = [x.requires_grad_() for x in inputs(1, 7, 1, 4, 3, dtype=torch.float64, device="cpu", seed=1)]
    f = lambda q, k, v, g, b, h0: gk.chunk_gated_delta_rule_torch(q, k, v, g, b, initial_state=h0,
                                                                   output_final_state=True, chunk_size=4)
    assert torch.autograd.gradcheck(f, xs)


def test_step_matches_recurrence():
    q, k, v, g, beta, h0 = inputs(2, 6, 3, 8, 4, dtype=torch.float64, device="cpu", seed=2)
    S, outs = h0.float(), []
    for t in range(6):
        o, S = gk.gated_delta_rule_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], S)
        outs.append(o)
    o_ref, S_ref = gk.recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    assert rel(torch.stack(outs, 1), o_ref) < 1e-5 and rel(S, S_ref) < 1e-5


@needs_triton
@pytest.mark.parametrize("DK,DV", [(16, 16), (48, 20), (64, 64)])
def test_step_kernel_matches_torch(DK, DV):
    """The Triton step against the PyTorch step over several tokens, with q, k, v as strided views
    of one projection (as gdn.py passes them) and the state updated in place."""
    B, H, T = 3, 2, 5
    gen = torch.Generator().manual_seed(5)
    proj = torch.randn(B, T, H, 2 * DK + DV + 3, generator=gen).to(DEVICE)   # padding: not contiguous per head
    q, k, v = proj[..., :DK], proj[..., DK:2 * DK], proj[..., 2 * DK:2 * DK + DV]
    q, k = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(k, dim=-1)
    g = -torch.rand(B, T, H, generator=gen).to(DEVICE)
    beta = torch.rand(B, T, H, generator=gen).to(DEVICE)
    S = torch.randn(B, H, DK, DV, generator=gen).to(DEVICE)
    S_ref, S_tri = S.clone(), S.clone()
    address = S_tri.data_ptr()
    with torch.no_grad():
        for t in range(T):
            o_ref, S_ref = gk.gated_delta_rule_step_torch(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], S_ref)
            o, S_tri = gk.gated_delta_rule_step_triton(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], S_tri,
                                                       inplace=True)
            assert rel(o, o_ref) < TOL_FP32
    assert rel(S_tri, S_ref) < TOL_FP32 and S_tri.data_ptr() == address
    o2, S2 = gk.gated_delta_rule_step_triton(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], S_tri)
    assert S2.data_ptr() != address and not torch.equal(S2, S_tri)       # not in place unless asked


def test_step_inplace_torch():
    q, k, v, g, beta, h0 = inputs(2, 1, 3, 8, 4, device="cpu", seed=3)
    S = h0.clone()
    o, S_new = gk.gated_delta_rule_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], S, inplace=True)
    o_ref, S_ref = gk.gated_delta_rule_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], h0)
    assert S_new is S and torch.equal(S, S_ref) and torch.equal(o, o_ref)


@needs_triton
def test_step_kernel_bad_shapes():
    q, k, v, g, beta, h0 = inputs(2, 1, 3, 8, 4, device="cpu")
    with pytest.raises(ValueError, match="step shapes"):
        gk.gated_delta_rule_step_triton(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], h0[:, :2])
    with pytest.raises(ValueError, match="step shapes"):
        gk.gated_delta_rule_step_triton(q, k, v, g, beta, h0)


@needs_triton
def test_step_kernel_refuses_autograd():
    """The step kernel has no backward: called directly under autograd it says so, rather than
    returning outputs that silently carry no gradient."""
    q, k, v, g, beta, h0 = inputs(2, 1, 3, 8, 4, device=DEVICE)
    q, k, v, g, beta = (x[:, 0] for x in (q, k, v, g, beta))
    with pytest.raises(ValueError, match="no backward"):
        gk.gated_delta_rule_step_triton(q.requires_grad_(), k, v, g, beta, h0)


@pytest.mark.parametrize("shape", [(0, 5, 2), (2, 5, 0), (2, 0, 3)])
def test_empty_batch_heads_or_sequence(shape):
    """B = 0, H = 0 or T = 0: empty outputs and the initial state back, not a crash (a reshape
    with -1 cannot infer a size from zero elements); the final state is the caller's values in a
    tensor of its own."""
    B, T, H = shape
    q, k, v, g, beta, h0 = inputs(B, T, H, 8, 4, device="cpu")
    for fn in (gk.recurrent_gated_delta_rule, gk.chunk_gated_delta_rule_torch):
        o, S = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True)
        assert o.shape == (B, T, H, 4) and S.shape == h0.shape
        if T == 0:
            assert torch.equal(S, h0) and S.data_ptr() != h0.data_ptr()


def test_any_fp64_operand_makes_the_torch_forms_fp64():
    """The reference is computed in fp64 where any of q, k, v is fp64, not only where q is."""
    q, k, v, g, beta, h0 = inputs(1, 9, 2, 8, 4, device="cpu")
    for fn in (gk.recurrent_gated_delta_rule, gk.chunk_gated_delta_rule_torch):
        o, S = fn(q, k, v.double(), g, beta, initial_state=h0, output_final_state=True)
        assert o.dtype == S.dtype == torch.float64


def test_step_torch_refuses_what_it_would_broadcast():
    q, k, v, g, beta, h0 = inputs(2, 1, 3, 8, 4, device="cpu")
    q, k, v, g, beta = q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0]
    for bad in ((q, k, v[..., :1, :], g, beta, h0), (q, k, v, g[:, :1], beta, h0), (q, k, v, g, beta[:1], h0)):
        with pytest.raises(ValueError, match="step shapes"):
            gk.gated_delta_rule_step_torch(*bad)


def test_dispatcher_cpu_is_torch_form():
    xs = inputs(1, 70, 2, 16, 16, device="cpu", seed=4)
    o1, S1 = gk.chunk_gated_delta_rule(*xs[:5], initial_state=xs[5], output_final_state=True)
    o2, S2 = gk.chunk_gated_delta_rule_torch(*xs[:5], initial_state=xs[5], output_final_state=True)
    assert torch.equal(o1, o2) and torch.equal(S1, S2)


@pytest.fixture
def cuda_routing(monkeypatch):
    """The dispatcher deciding as it does for CUDA tensors (on a CPU, under the interpreter, its Triton
    predicate forced true), with both paths spied on: returns (the device to use, the list of the
    paths it called, in order)."""
    calls = []
    if not torch.cuda.is_available():
        monkeypatch.setattr(gk, "_compiled_triton_for", lambda x: True)
    for name, path in [("chunk_gated_delta_rule_triton", "triton"), ("chunk_gated_delta_rule_torch", "torch")]:
        def spy(*a, _real=getattr(gk, name), _path=path, **kw):
            calls.append(_path)
            return _real(*a, **kw)
        monkeypatch.setattr(gk, name, spy)
    return ("cuda" if torch.cuda.is_available() else "cpu"), calls


@needs_triton
def test_dispatcher_cuda_routing(cuda_routing):
    """The routing gdn.py gets on a GPU (there, or decided on the CPU): fp32 goes to Triton, silently; fp64 to the
    PyTorch form and stays fp64 (Triton would compute it in fp32 and return fp32); head dims the kernel
    does not hold (fp32 beyond MAX_HEAD_DIM_FP32, bf16 beyond MAX_HEAD_DIM) fall back with a warning.
    test_dispatcher_cpu_is_torch_form sees none of this: on the CPU every input takes the PyTorch form."""
    device, calls = cuda_routing
    xs = inputs(1, 70, 2, 16, 16, device=device, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        o, S = gk.chunk_gated_delta_rule(*xs[:5], initial_state=xs[5], output_final_state=True)
    ref = gk.recurrent_gated_delta_rule(*[x.double() for x in xs[:5]], initial_state=xs[5].double(),
                                        output_final_state=True)
    assert calls == ["triton"] and rel(o, ref[0]) < TOL_FP32 and rel(S, ref[1]) < TOL_FP32

    calls.clear()
    x64 = [x.double() for x in xs]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        o, S = gk.chunk_gated_delta_rule(*x64[:5], initial_state=x64[5], output_final_state=True)
    assert calls == ["torch"] and o.dtype == S.dtype == torch.float64
    assert rel(o, ref[0]) < TOL_FP64 and rel(S, ref[1]) < TOL_FP64

    for dtype, dim in [(torch.float32, gk.MAX_HEAD_DIM_FP32 + 16), (torch.bfloat16, gk.MAX_HEAD_DIM + 16)]:
        calls.clear()
        xs = inputs(1, 5, 1, dim, 16, dtype=dtype, device=device, seed=6)
        with pytest.warns(UserWarning, match="exceed what the Triton kernel holds"):
            o, S = gk.chunk_gated_delta_rule(*xs[:5], initial_state=xs[5], output_final_state=True)
        ref = gk.recurrent_gated_delta_rule(*[x.double() for x in xs[:5]], initial_state=xs[5].double(),
                                            output_final_state=True)
        assert calls == ["torch"] and rel(o, ref[0]) < TOL_FP32 and rel(S, ref[1]) < TOL_FP32, dtype


# --- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [gk.chunk_gated_delta_rule, gk.chunk_gated_delta_rule_torch,
                                gk.recurrent_gated_delta_rule])
@pytest.mark.parametrize("which,shape,msg", [
    ("k", (1, 5, 2, 9), "q and k"),
    ("v", (1, 4, 2, 8), "v must be"),
    ("g", (1, 5, 3), "g must be"),
    ("beta", (1, 5), "beta must be"),
    ("h0", (1, 2, 8, 7), "initial_state must be"),
])
def test_bad_shapes_are_named(fn, which, shape, msg):
    q, k, v, g, beta, h0 = inputs(1, 5, 2, 8, 8, device="cpu")
    args = dict(q=q, k=k, v=v, g=g, beta=beta, h0=h0)
    args[which] = torch.zeros(shape)
    with pytest.raises(ValueError, match=msg):
        fn(args["q"], args["k"], args["v"], args["g"], args["beta"], initial_state=args["h0"])


def test_bad_dtypes_and_empty_heads_are_named():
    q, k, v, g, beta, h0 = inputs(1, 5, 2, 8, 8, device="cpu")
    with pytest.raises(ValueError, match="q, k must be floating point"):
        gk.chunk_gated_delta_rule(q.long(), k.long(), v, g, beta)
    with pytest.raises(ValueError, match="head dims >= 1"):
        gk.chunk_gated_delta_rule(q[..., :0], k[..., :0], v, g, beta)


@needs_triton
def test_triton_bad_shapes_are_named():
    q, k, v, g, beta, h0 = inputs(1, 5, 2, 8, 8, device="cpu")
    with pytest.raises(ValueError, match="v must be"):
        gk.chunk_gated_delta_rule_triton(q, k, v[:, :3], g, beta)


@pytest.mark.parametrize("argv, message", [(["--lengths", "4k,32q"], "--lengths '4k,32q': a list of positive sizes"),
                                           (["--dims", "0"], "--dims '0': a list of positive sizes"),
                                           (["--profile", "--sweep"], "give one")])
def test_command_line_bad_input(argv, message, capsys):
    """A size list the benchmark cannot use, or two modes at once: one line naming it, before any work."""
    with pytest.raises(SystemExit) as e:
        gk.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_gpu_run_checks_its_results_folder_first(monkeypatch, tmp_path, capsys):
    """On a GPU the run writes results/kernel_bench.* (or --results FOLDER): an earlier result is kept
    unless --overwrite, and a folder that cannot be written is named, both before any work. (CUDA is
    only claimed here: the checks come before the first use of the GPU.)"""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    (tmp_path / "kernel_bench.json").write_text("earlier")
    (tmp_path / "file").write_text("x")
    for argv, message in ((["--results", str(tmp_path)], "kernel_bench.json already exists: pass --overwrite"),
                          (["--profile", "--results", str(tmp_path / "file" / "sub")], f"--results '{tmp_path}")):
        with pytest.raises(SystemExit) as e:
            gk.main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert (tmp_path / "kernel_bench.json").read_text() == "earlier" and sorted(os.listdir(tmp_path)) == ["file", "kernel_bench.json"]


@pytest.mark.parametrize("argv", [["--no-checks"], ["--profile"], ["--sweep"], ["--dims", "128"], ["--methods", "triton"],
                                  ["--overwrite"]])
def test_cpu_run_refuses_what_only_a_gpu_run_does(argv, monkeypatch, capsys):
    """Without a GPU `python gdn_kernel.py` runs only the PyTorch checks: a flag for the GPU run is
    refused, not left undone with exit 0 (--no-checks ran nothing at all)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        gk.main(argv)
    assert e.value.code == 2 and f"{argv[0]}: for the GPU run" in capsys.readouterr().err


def test_write_atomic_leaves_no_temporary_file(monkeypatch, tmp_path):
    """A result file is readable as a plain open() makes it (not mkstemp's owner-only mode); a write
    that fails leaves nothing beside it."""
    mask = os.umask(0o022)
    try:
        gk._write_atomic(str(tmp_path / "ok.json"), "{}")
    finally:
        os.umask(mask)
    assert os.stat(tmp_path / "ok.json").st_mode & 0o777 == 0o644
    os.remove(tmp_path / "ok.json")

    def fail(src, dst):
        raise OSError("the rename fails")
    monkeypatch.setattr(gk.os, "replace", fail)
    with pytest.raises(OSError, match="the rename fails"):
        gk._write_atomic(str(tmp_path / "r.json"), "{}")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("argv, message", [
    (["--profile", "--methods", "fla"], "--profile replaces the benchmark"),
    (["--sweep", "--methods", "triton"], "--sweep replaces the benchmark"),
    (["--sweep", "--scan-bv", "16"], "--sweep tries every --scan-bv itself"),
    (["--methods", "triton,cublas"], "--methods: unknown cublas"),
])
def test_command_line_refuses_what_it_would_ignore(argv, message, tmp_path, capsys):
    """`python gdn_kernel.py`: a flag the chosen mode would not read is refused before any check runs."""
    with pytest.raises(SystemExit) as e:
        gk.main(argv + ["--results", str(tmp_path)])
    assert e.value.code == 2 and message in capsys.readouterr().err
