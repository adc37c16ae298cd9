"""The GDN layer and the surgery: exact equalities that must hold for every supported family."""
import copy
import os

import pytest
import torch

import gdn
import gdn_kernel
from conftest import FAMILIES, tiny_model
from convert import convert
from gdn import GatedDeltaNet, gdn_modules, hybridize, load_hybrid, save_hybrid, stack_projections
from gdn_kernel import chunk_gated_delta_rule_torch, gated_delta_rule_step, recurrent_gated_delta_rule


def random_inputs(B, T, H, Dk, Dv, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)
    q, k = r(B, T, H, Dk), torch.nn.functional.normalize(r(B, T, H, Dk), dim=-1)
    v = r(B, T, H, Dv)
    g = -torch.rand(B, T, H, generator=gen, dtype=dtype)            # log decay in (-1, 0]
    beta = torch.rand(B, T, H, generator=gen, dtype=dtype)
    return q, k, v, g, beta, r(B, H, Dk, Dv)


@pytest.mark.parametrize("T", [1, 37, 64, 130])
@pytest.mark.parametrize("chunk", [16, 32, 64])
def test_chunked_equals_recurrence(T, chunk):
    q, k, v, g, beta, s0 = random_inputs(2, T, 3, 8, 6)
    o1, s1 = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    o2, s2 = chunk_gated_delta_rule_torch(q, k, v, g, beta, initial_state=s0, output_final_state=True, chunk_size=chunk)
    torch.testing.assert_close(o2, o1, rtol=1e-10, atol=1e-10)     # fp64: equal up to rounding
    torch.testing.assert_close(s2, s1, rtol=1e-10, atol=1e-10)
    # and in fp32, at fp32 tolerance
    o3, _ = chunk_gated_delta_rule_torch(*(x.float() for x in (q, k, v, g, beta)), chunk_size=chunk)
    o4, _ = recurrent_gated_delta_rule(q, k, v, g, beta)
    torch.testing.assert_close(o3, o4.float(), rtol=1e-4, atol=1e-4)


def test_step_equals_recurrence():
    q, k, v, g, beta, s0 = random_inputs(2, 5, 3, 8, 6)
    o_ref, s_ref = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    s = s0.float()                                   # the decoding state is kept in fp32
    for t in range(5):
        o, s = gated_delta_rule_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], s)
        torch.testing.assert_close(o.double(), o_ref[:, t], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.double(), s_ref, rtol=1e-5, atol=1e-5)


def test_step_keeps_an_fp64_state_in_fp64():
    """After an fp64 prompt the cached state is fp64 (the recurrence and the chunk form keep fp64):
    the step continues in fp64 rather than failing on mixed dtypes or rounding to fp32."""
    q, k, v, g, beta, s0 = random_inputs(2, 5, 3, 8, 6)
    o_ref, s_ref = recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True)
    s = s0.clone()
    for t in range(5):
        o, s = gated_delta_rule_step(q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], s)
        assert o.dtype == s.dtype == torch.float64
        torch.testing.assert_close(o, o_ref[:, t], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s, s_ref, rtol=1e-12, atol=1e-12)


def test_bad_shapes_are_named():
    q, k, v, g, beta, s0 = random_inputs(1, 4, 2, 8, 8)
    with pytest.raises(ValueError, match="beta must be"):
        chunk_gated_delta_rule_torch(q, k, v, g, beta[:, :3])
    with pytest.raises(ValueError, match="initial_state"):
        chunk_gated_delta_rule_torch(q, k, v, g, beta, initial_state=s0[:, :1])


def test_layer_by_hand():
    """The layer's forward (full, and a cached prefill then one step) against METHOD section 1 written out
    for one sequence: a causal 2-tap conv then SiLU on q, k, v; q, k L2-normalised per head;
    g = -exp(A_log) softplus(W_a x + dt_bias); beta = sigmoid(W_b x + b_b); the state update as matrices
    with scale head_dim^-0.5; per-head RMSNorm * w_norm * SiLU(W_g x); W_o. The other layer tests compare
    its paths with each other or with gdn_layer_step, written from the same lines: a shared mistake passes."""
    from transformers import DynamicCache, LlamaConfig
    F = torch.nn.functional
    torch.manual_seed(0)
    H, D, d, T, eps = 2, 4, 6, 4, 1e-3
    layer = GatedDeltaNet(d, H, D, 0, conv_size=2, norm_eps=eps, beta_bias=True).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=0.5)
    x = torch.randn(1, T, d)
    W = {n: lin.weight.detach() for n, lin in layer.inputs().items()}
    xs, cw = x[0], layer.conv.weight.detach()[:, 0]
    pre = xs @ torch.cat([W["q"], W["k"], W["v"]]).T
    prev = torch.cat([torch.zeros(1, 3 * H * D), pre[:-1]])
    act = F.silu(cw[:, 0] * prev + cw[:, 1] * pre).view(T, 3, H, D)
    q, k, v = F.normalize(act[:, 0], dim=-1), F.normalize(act[:, 1], dim=-1), act[:, 2]
    g = -layer.A_log.detach().exp() * F.softplus(xs @ W["a"].T + layer.dt_bias.detach())
    beta = torch.sigmoid(xs @ W["b"].T + layer.b_proj.bias.detach())
    gate = F.silu(xs @ W["g"].T).view(T, H, D)
    S, want = torch.zeros(H, D, D), []
    for t in range(T):
        o = []
        for h in range(H):
            kt = k[t, h][:, None]
            S[h] = g[t, h].exp() * (torch.eye(D) - beta[t, h] * kt @ kt.T) @ S[h] + beta[t, h] * kt @ v[t, h][None, :]
            o.append(S[h].T @ q[t, h] / D ** 0.5)
        o = torch.stack(o)
        o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + eps) * layer.o_norm.detach()
        want.append(layer.o_proj.weight.detach() @ (o * gate[t]).reshape(-1))
    want = torch.stack(want)[None]
    cache = DynamicCache(config=LlamaConfig(num_hidden_layers=1, hidden_size=d, num_attention_heads=2,
                                            num_key_value_heads=2))
    with torch.no_grad():
        full = layer(x)[0]
        cached = torch.cat([layer(x[:, :T - 1], past_key_values=cache)[0],
                            layer(x[:, T - 1:], past_key_values=cache)[0]], 1)
    torch.testing.assert_close(full, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached, want, rtol=1e-5, atol=1e-5)


def test_identity_conv_is_no_conv():
    """reset_conv's identity filters (weight on the current token only) make a layer with a short conv
    compute what the same layer without one computes: adding the conv changes nothing at the start."""
    torch.manual_seed(0)
    with_conv, without = GatedDeltaNet(40, 3, 16, 0, conv_size=4).eval(), GatedDeltaNet(40, 3, 16, 0).eval()
    without.load_state_dict({k: v for k, v in with_conv.state_dict().items() if not k.startswith("conv.")})
    x = torch.randn(2, 9, 40)
    with torch.no_grad():
        torch.testing.assert_close(with_conv(x)[0], without(x)[0], rtol=1e-6, atol=1e-7)


def test_standard_random_init_ranges():
    """reset_parameters draws METHOD section 2's gates: A ~ U(0, 16) with A_log = log A, and
    softplus(dt_bias) = dt log-uniform on [1e-3, 0.1]. With 4096 heads the draws fill both ranges and a
    log-uniform dt has its median near sqrt(1e-3 * 0.1) = 1e-2."""
    torch.manual_seed(0)
    layer = GatedDeltaNet(8, 4096, 1, 0)
    A, dt = layer.A_log.detach().exp(), torch.nn.functional.softplus(layer.dt_bias.detach())
    assert 0 < A.min() < 0.05 and 15.9 < A.max() <= 16 and 7 < A.median() < 9
    assert 0.999e-3 <= dt.min() < 1.01e-3 and 0.099 < dt.max() <= 0.1001 and 0.008 < dt.median() < 0.0125


@pytest.mark.parametrize("family", FAMILIES)
def test_convert_keeps_the_kept_layers_bitwise_and_converts_exactly_the_others(family):
    """convert(teacher, kept): exactly the layers not kept become GatedDeltaNet; a kept layer (its
    attention included) and everything outside the converted attention modules (embeddings, MLPs,
    norms, LM head) are bitwise the teacher's; the teacher itself is left as it was. With every layer
    kept the student's logits are exactly the teacher's. (Logits alone would not see a kept layer
    re-initialised or one extra layer converted, once some layers are GDN.)"""
    teacher = tiny_model(family)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student, info = convert(teacher, kept=[1, 3])
    assert sorted(gdn_modules(student)) == info["gdn_layers"] == [0, 2]
    for i in (1, 3):
        t, s = teacher.model.layers[i], student.model.layers[i]
        assert type(s.self_attn) is type(t.self_attn)
        t_sd, s_sd = t.state_dict(), s.state_dict()
        assert t_sd.keys() == s_sd.keys() and all(torch.equal(s_sd[k], t_sd[k]) for k in t_sd), (family, i)
    sd = student.state_dict()
    converted = tuple(f"model.layers.{i}.self_attn." for i in (0, 2))
    for k, v in before.items():
        if not k.startswith(converted):
            assert torch.equal(sd[k], v), (family, k)
    assert not gdn_modules(teacher)                          # convert works on a copy
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())

    every, _ = convert(teacher, kept=list(range(4)))
    assert not gdn_modules(every)
    ids = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        assert torch.equal(every(ids).logits, teacher(ids).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_identical_logits(family, tmp_path):
    """Every GDN weight survives save and load: each is moved off its init first (an open output gate,
    a conv that is not the identity), so a weight lost or left at its init would change the logits."""
    teacher = tiny_model(family)
    student, _ = convert(teacher, kept=[1], init="naive", conv_size=4)
    assert sorted(gdn_modules(student)) == [0, 2, 3]
    with torch.no_grad():
        for g in gdn_modules(student).values():
            for p in g.parameters():
                p.add_(0.1 * torch.randn_like(p))
    save_hybrid(student, None, tmp_path / "h")
    again = load_hybrid(tmp_path / "h")
    assert sorted(gdn_modules(again)) == [0, 2, 3]
    ids = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, student(ids).logits)
    for i, g in gdn_modules(again).items():
        assert all(torch.equal(v, gdn_modules(student)[i].state_dict()[k]) for k, v in g.state_dict().items())


def test_save_load_in_bfloat16_keeps_the_rotary_frequencies(tmp_path):
    """load_hybrid(dtype=bf16) of a bf16 hybrid gives its logits exactly: the model is built in bf16,
    as transformers builds one (rotary frequencies in fp32), not cast to it (which rounds them)."""
    from transformers import AutoModelForCausalLM
    from conftest import tiny_config
    model = hybridize(AutoModelForCausalLM.from_config(tiny_config("llama"), dtype=torch.bfloat16).eval(), [0, 2])
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    save_hybrid(model, None, tmp_path / "h")
    again = load_hybrid(tmp_path / "h", dtype=torch.bfloat16)
    assert again.model.rotary_emb.inv_freq.dtype == torch.float32 and again.lm_head.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 128, (2, 40))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


def test_hybridize_refuses_a_hybrid():
    """A second hybridize would record only its own layers in config.hybrid (a saved model would not
    load) and rebuild a GDN layer from a GDN layer: refused, naming the layers already GDN."""
    model = hybridize(tiny_model("llama"), [0])
    with pytest.raises(ValueError, match=r"a hybrid already \(layers \[0\] are GDN\)"):
        hybridize(model, [2])
    assert model.config.hybrid["gdn_layers"] == [0] and sorted(gdn_modules(model)) == [0]


def test_hybridize_refuses_a_string_of_layers_and_a_norm_eps_of_zero():
    """hybridize(m, "12") would convert layers 1 and 2; norm_eps 0 divides 0 by 0 at an all-zero head."""
    with pytest.raises(ValueError, match="must be a list of layer indices; got the string '12'"):
        hybridize(tiny_model("llama"), "12")
    with pytest.raises(ValueError, match="norm_eps must be > 0; got 0"):
        hybridize(tiny_model("llama"), [1], norm_eps=0)


def test_save_hybrid_writes_only_into_a_new_or_empty_folder(tmp_path):
    """Saving over a folder would replace a teacher's weights (or leave an older hybrid's
    conversion.json describing the new weights); over a file transformers only logs and writes
    nothing. Both refused, the folder left as it was; an empty folder is fine."""
    model = hybridize(tiny_model("llama"), [1])
    teacher = tmp_path / "teacher"
    tiny_model("llama").save_pretrained(teacher)
    before = {p.name: p.read_bytes() for p in teacher.iterdir()}
    with pytest.raises(ValueError, match="exists and is not an empty folder"):
        save_hybrid(model, None, str(teacher))
    assert {p.name: p.read_bytes() for p in teacher.iterdir()} == before
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not an empty folder"):
        save_hybrid(model, None, str(tmp_path / "file"))
    (tmp_path / "empty").mkdir()
    save_hybrid(model, None, str(tmp_path / "empty"))
    assert load_hybrid(str(tmp_path / "empty")).config.hybrid["gdn_layers"] == [1]


def test_load_hybrid_says_what_is_missing(tmp_path):
    with pytest.raises(ValueError, match="is not a folder"):
        load_hybrid(str(tmp_path / "nowhere"))
    model = hybridize(tiny_model("llama"), [1])
    model.config.save_pretrained(tmp_path / "h")                 # the config alone, no weights
    with pytest.raises(ValueError, match="no .safetensors weights"):
        load_hybrid(str(tmp_path / "h"))


def test_save_load_keeps_every_hybrid_option(tmp_path):
    """load_hybrid rebuilds the GDN layers from the saved config.hybrid: every option comes back, a
    non-default norm_eps included, which strict weight loading and equal logits would not notice; so
    do the entries convert.py adds (kept layers, init), which a loaded hybrid saved again (distill.py's
    checkpoints) would otherwise lose."""
    model = hybridize(tiny_model("llama"), [0, 2], conv_size=3, norm_eps=1e-2, beta_bias=True)
    model.config.hybrid.update({"kept_layers": [1, 3], "init": "taylor"})
    save_hybrid(model, None, tmp_path / "h")
    again = load_hybrid(tmp_path / "h")
    assert again.config.hybrid == model.config.hybrid == {"gdn_layers": [0, 2], "conv_size": 3, "norm_eps": 1e-2,
                                                          "beta_bias": True, "kept_layers": [1, 3], "init": "taylor"}
    save_hybrid(again, None, tmp_path / "h2")
    assert load_hybrid(tmp_path / "h2").config.hybrid == model.config.hybrid
    for i, m in gdn_modules(again).items():
        assert (m.conv_size, m.norm_eps, m.b_proj.bias is not None) == (3, 1e-2, True), i


@torch.no_grad()
def decode_paths(model, ids, prompt, new_tokens):
    """(logits decoded through the cache after a `prompt`-token prefill, logits of one full forward,
    greedy generate() from the first `prompt // 2` tokens, the same greedy by full recomputation). No
    end-of-sequence token: generate() would stop at one and pad, where the recomputation runs on."""
    model.generation_config.eos_token_id = None
    full = model(ids, use_cache=False).logits
    out = model(ids[:, :prompt], use_cache=True)
    steps, cache = [out.logits], out.past_key_values
    for t in range(prompt, ids.shape[1]):
        out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        steps.append(out.logits)
    start = ids[:, :prompt // 2]
    gen = model.generate(start, attention_mask=torch.ones_like(start), max_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=0)
    seq = start
    for _ in range(new_tokens):
        seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return torch.cat(steps, 1), full, gen, seq


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decode_equals_full_forward(family):
    """Layer 0 is GDN (the hardest case for HF's position bookkeeping), convs are random (not the
    identity), prompts longer than Gemma3's sliding window."""
    torch.manual_seed(0)
    model = hybridize(tiny_model(family), [0, 2, 3], conv_size=4)
    for m in gdn_modules(model).values():
        torch.nn.init.normal_(m.conv.weight, std=0.5)
    inc, full, gen, seq = decode_paths(model, torch.randint(0, 128, (2, 20)), prompt=12, new_tokens=10)
    torch.testing.assert_close(inc, full, rtol=1e-4, atol=1e-4)
    assert torch.equal(gen, seq)


def test_conv_state_after_a_prompt_is_its_own_small_tensor():
    """The cache keeps conv_size - 1 inputs a layer, not a view that holds the whole prompt alive."""
    model = hybridize(tiny_model("llama"), [0, 2, 3], conv_size=4)
    with torch.no_grad():
        cache = model(torch.randint(0, 128, (2, 300)), use_cache=True).past_key_values
    for S, conv in gdn._gdn_states(cache).values():
        assert conv.shape == (2, 3 * 64, 3)
        assert conv.untyped_storage().nbytes() == conv.numel() * conv.element_size()


@pytest.mark.parametrize("beta_bias", [False, True])
def test_stacked_projections_share_the_weights(beta_bias, tmp_path):
    """stack_projections: same logits; the six weights (and W_b's bias, where it has one) are views
    into one matrix (one vector), so an in-place edit (what an optimizer does) reaches the stacked
    product; a copy of the model stops using the stack rather than a stale one; saving and loading
    still work."""
    torch.manual_seed(0)
    model = hybridize(tiny_model("llama"), [0, 2, 3], conv_size=4, beta_bias=beta_bias)
    ids = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        for m in gdn_modules(model).values():
            if beta_bias:
                m.b_proj.bias.normal_()
        before = model(ids).logits
    stack_projections(model)                                          # (with autograd on, as a user would)
    with torch.no_grad():
        gdn = gdn_modules(model)[2]
        assert gdn.stacked.shape[0] % 64 == 0
        assert gdn.k_proj.weight.data_ptr() == gdn.stacked[gdn.q_proj.out_features:].data_ptr()
        assert (gdn.stacked_bias is None) != beta_bias
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)
        gdn.b_proj.weight.mul_(3.0)                                   # in place: the stack sees it
        if beta_bias:
            gdn.b_proj.bias.add_(2.0)
            assert gdn.b_proj.bias.untyped_storage().data_ptr() == gdn.stacked_bias.untyped_storage().data_ptr()
        edited = model(ids).logits
        assert not torch.allclose(edited, before, atol=1e-3)
        other = copy.deepcopy(model)                                  # new storage: the stack is dropped
        other.model.layers[2].self_attn.b_proj.weight.mul_(0.5)
        torch.testing.assert_close(other(ids).logits, hybridize_reference(other, ids), rtol=1e-5, atol=1e-5)
        assert other.model.layers[2].self_attn.stacked is None
        inc, full, gen, seq = decode_paths(model, ids, prompt=12, new_tokens=6)
        torch.testing.assert_close(inc, full, rtol=1e-4, atol=1e-4)
        assert torch.equal(gen, seq)
    save_hybrid(model, None, tmp_path / "h")
    with torch.no_grad():
        torch.testing.assert_close(load_hybrid(tmp_path / "h")(ids).logits, edited, rtol=1e-5, atol=1e-5)
    model(ids).logits.sum().backward()                                # training still reaches the weights
    assert all(lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0 for lin in gdn.inputs().values())
    assert (gdn.b_proj.bias is None) or gdn.b_proj.bias.grad.abs().sum() > 0


def hybridize_reference(model, ids):
    """Logits of `model` with every GDN layer's stack dropped: the six projections stacked per call."""
    model = copy.deepcopy(model)
    for m in gdn_modules(model).values():
        m.stacked = None
    return model(ids).logits


def test_gqa_heads_are_repeated_in_order():
    teacher = tiny_model("llama")
    student, _ = convert(teacher, kept=[])
    attn, gdn = teacher.model.layers[1].self_attn, student.model.layers[1].self_attn
    assert isinstance(gdn, GatedDeltaNet)
    kv = attn.k_proj.weight.view(2, 16, 64)
    got = gdn.k_proj.weight.view(4, 16, 64)
    # query heads 0, 1 read kv head 0; heads 2, 3 read kv head 1 (HF's repeat_kv)
    assert torch.equal(got[0], kv[0]) and torch.equal(got[1], kv[0]) and torch.equal(got[3], kv[1])
    vv, gv = attn.v_proj.weight.view(2, 16, 64), gdn.v_proj.weight.view(4, 16, 64)
    assert all(torch.equal(gv[h], vv[h // 2]) for h in range(4))
    assert torch.equal(gdn.q_proj.weight, attn.q_proj.weight) and torch.equal(gdn.o_proj.weight, attn.o_proj.weight)


def test_naive_copy_takes_the_output_bias():
    """A teacher whose W_o has a bias (Llama with attention_bias) passes it to the GDN layer with W_o:
    random values, since HF initialises biases to zero and a zero bias left behind would look copied."""
    from transformers import AutoModelForCausalLM
    from conftest import tiny_config
    config = tiny_config("llama")
    config.attention_bias = True
    teacher = AutoModelForCausalLM.from_config(config).eval()
    attn = teacher.model.layers[1].self_attn
    with torch.no_grad():
        attn.o_proj.bias.normal_()
    gdn = hybridize(copy.deepcopy(teacher), [1]).model.layers[1].self_attn
    assert torch.equal(gdn.o_proj.bias, attn.o_proj.bias)


@pytest.mark.parametrize("cache", [None, "static"])
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_left_padded_batch_generates_like_single_prompts(family, cache):
    """Batch 2 with left padding: each row's greedy continuation equals that prompt alone. With a
    static cache generate hands the stack a 4-D mask (Gemma 3: a dict of them), not the 2-D one."""
    torch.manual_seed(0)
    model = hybridize(tiny_model(family), [0, 1, 3], conv_size=4)
    for m in gdn_modules(model).values():
        torch.nn.init.normal_(m.conv.weight, std=0.5)
    long, short = torch.randint(1, 128, (1, 11)), torch.randint(1, 128, (1, 6))
    batch = torch.cat([long, torch.cat([torch.full((1, 5), 7), short], 1)])     # pad id 7: not inert
    mask = torch.cat([torch.ones(1, 11), torch.cat([torch.zeros(1, 5), torch.ones(1, 6)], 1)]).long()
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, cache_implementation=cache)
    with torch.no_grad():
        last = model(batch, attention_mask=mask).logits[:, -1]
        torch.testing.assert_close(last[1], model(short).logits[0, -1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(last[0], model(long).logits[0, -1], rtol=1e-4, atol=1e-4)
        both = model.generate(batch, attention_mask=mask, **kw)[:, 11:]
        alone = [model.generate(p, attention_mask=torch.ones_like(p), **kw)[:, p.shape[1]:] for p in (long, short)]
    assert torch.equal(both[0], alone[0][0]) and torch.equal(both[1], alone[1][0])


def test_pads_after_a_prompt_leave_the_state_alone():
    """A chunk whose first positions are pads, fed after a prompt (the state already holds something):
    a pad must neither write (its input is zeroed) nor decay the state (g = 0 at a pad), so the real
    tokens' logits and the final states equal feeding the chunk without its pads. Plain left padding
    cannot see the decay (the state is still zero at the pads), hence the prompt first. Every layer
    is GDN with no conv: no RoPE shift from the pads' positions, and no conv window that would see the
    pads' zeros instead of the prompt's last inputs."""
    from transformers import DynamicCache
    torch.manual_seed(0)
    model = hybridize(tiny_model("llama"), [0, 1, 2, 3]).eval()
    prompt, chunk = torch.randint(0, 128, (2, 7)), torch.randint(0, 128, (2, 5))
    padded = torch.cat([torch.full((2, 3), 7), chunk], 1)                   # pad id 7: not inert
    mask = torch.cat([torch.ones(2, 7), torch.zeros(2, 3), torch.ones(2, 5)], 1).long()
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(prompt, past_key_values=cache, use_cache=True)
        other = copy.deepcopy(cache)
        assert all(S.abs().max() > 0 for S, _ in gdn._gdn_states(cache).values())
        got = model(padded, attention_mask=mask, past_key_values=cache, use_cache=True).logits[:, 3:]
        want = model(chunk, past_key_values=other, use_cache=True).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for i, (S, _) in gdn._gdn_states(cache).items():
        torch.testing.assert_close(S, gdn._gdn_states(other)[i][0], rtol=1e-5, atol=1e-5)


def test_pads_between_real_tokens_refused_with_a_conv():
    """With a short conv, pads between real tokens cannot be made inert (the conv window would carry
    the real inputs into the pads' k and v, and the pads' zeros into the next tokens' window): a
    padded chunk after cached tokens, and pads inside a row, are refused, naming the cause, with a
    growing cache and a static one. After the static cache's reset() (how --bench reuses one) a
    padded batch is a first forward again, accepted and equal to no cache. (Not DynamicCache.reset:
    before transformers 5.24 it kept the length.)"""
    from transformers import DynamicCache, StaticCache
    torch.manual_seed(0)
    model = hybridize(tiny_model("llama"), [0, 1, 2, 3], conv_size=4).eval()
    for m in gdn_modules(model).values():
        torch.nn.init.normal_(m.conv.weight, std=0.5)
    prompt, chunk = torch.randint(0, 128, (2, 7)), torch.randint(0, 128, (2, 5))
    padded = torch.cat([torch.full((2, 3), 7), chunk], 1)
    mask = torch.cat([torch.ones(2, 7), torch.zeros(2, 3), torch.ones(2, 5)], 1).long()
    with torch.no_grad():
        for cache in (DynamicCache(config=model.config), StaticCache(config=model.config, max_cache_len=32)):
            model(prompt, past_key_values=cache, use_cache=True)
            with pytest.raises(ValueError, match="pads between real tokens"):
                model(padded, attention_mask=mask, past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match="pads between real tokens"):
            model(torch.cat([prompt, padded], 1), attention_mask=mask)                 # pads inside a row
        cache.reset()
        first = torch.cat([torch.ones(2, 7), torch.zeros(2, 3)], 1).flip(1).long()      # pads on the left
        got = model(torch.cat([prompt, padded[:, :3]], 1), attention_mask=first, past_key_values=cache).logits
        want = model(torch.cat([prompt, padded[:, :3]], 1), attention_mask=first).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_pads_read_from_a_4d_mask_as_from_the_2d_one():
    """Pads inside a row (no conv: allowed) read from the 4-D mask generate builds for a static cache
    give the logits the 2-D mask gives: a pad is the key column no query attends, not only a row that
    attends to nothing (a pad after real tokens still attends to them)."""
    torch.manual_seed(0)
    model = hybridize(tiny_model("llama"), [0, 1, 3]).eval()
    ids = torch.cat([torch.randint(3, 128, (2, 7)), torch.full((2, 3), 7), torch.randint(3, 128, (2, 5))], 1)
    mask = torch.cat([torch.ones(2, 7), torch.zeros(2, 3), torch.ones(2, 5)], 1).long()
    four = torch.ones(15, 15).tril().bool()[None, None] & mask.bool()[:, None, None, :]      # True = attend
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        for m in (four, torch.zeros(four.shape).masked_fill(~four, torch.finfo(torch.float32).min)):  # bool, additive
            torch.testing.assert_close(model(ids, attention_mask=m).logits[:, 10:], want[:, 10:])


def test_right_padding_then_more_tokens_refused_with_a_conv(monkeypatch):
    """Pads after a row's last real token change none of that forward's real outputs, so a right-padded
    batch is accepted; real tokens fed after it into the same cache are refused (the conv would mix
    the pads in), also where convert.py's decoding layers ask for the one-kernel step without going
    through forward; a reset cache starts clean."""
    import gdn
    from transformers import StaticCache
    torch.manual_seed(0)
    model = hybridize(tiny_model("llama"), [0, 1, 2, 3], conv_size=4).eval()
    prompt, more = torch.randint(3, 128, (2, 7)), torch.randint(3, 128, (2, 2))
    right = torch.cat([torch.ones(2, 7), torch.zeros(2, 3)], 1).long()
    with torch.no_grad():
        cache = StaticCache(config=model.config, max_cache_len=16)
        got = model(torch.cat([prompt, torch.full((2, 3), 7)], 1), attention_mask=right, past_key_values=cache).logits
        torch.testing.assert_close(got[:, :7], model(prompt).logits)
        with pytest.raises(ValueError, match="pads between real tokens"):
            model(more, attention_mask=torch.cat([right, torch.ones(2, 2, dtype=torch.long)], 1), past_key_values=cache)
        monkeypatch.setattr(gdn, "gdn_layer_step_usable", lambda x, S: True)      # as on a GPU
        x = torch.randn(2, 1, model.config.hidden_size)
        assert [m.step_state(x, cache) for m in gdn_modules(model).values()] == [None] * 4
        cache.reset()
        model(prompt, past_key_values=cache)


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma3_text"])
def test_left_padding_over_a_chunked_prefill(family):
    """generate's prefill_chunk_size feeds a prompt in chunks, so a row's left pads can fill whole
    chunks and reach the next one after cached tokens that are pads too: accepted (the conv window has
    seen only zeros), and the tokens equal an unchunked prefill's. With a static cache generate sizes
    every layer's slots before the first chunk, K/V-shaped, for the GDN layers' placeholders too.
    Mistral's only mask is its sliding window's (8 keys here, fewer than the 12 pads; so is this tiny
    Gemma 3's, whose 4 layers all slide): it does not show which cached positions are pads, which the
    cache then has to remember. The same under beam search."""
    torch.manual_seed(0)
    model = hybridize(tiny_model(family), [0, 1, 3], conv_size=4).eval()
    for m in gdn_modules(model).values():
        torch.nn.init.normal_(m.conv.weight, std=0.5)
    ids = torch.randint(3, 128, (2, 18))
    mask = torch.ones(2, 18, dtype=torch.long)
    mask[0, :12] = 0
    with torch.no_grad():
        for beams in (1, 2):                # (beam search reorders the states between steps)
            kw = dict(attention_mask=mask, max_new_tokens=4, pad_token_id=0, do_sample=False, num_beams=beams)
            want = model.generate(ids, **kw)
            for size in (4, 8):
                for cache in (None, "static"):
                    got = model.generate(ids, prefill_chunk_size=size, cache_implementation=cache, **kw)
                    assert torch.equal(got, want), (beams, size, cache)


def test_caches_sized_before_the_first_write():
    """A cache whose layers were sized before any write (early_initialization): a static one holds
    K/V-shaped slots where a GDN layer puts its placeholders, a growing one empty 1-D tensors; both
    give what no cache gives."""
    from transformers import DynamicCache, StaticCache
    torch.manual_seed(0)
    model = hybridize(tiny_model("llama"), [0, 2]).eval()
    ids = torch.randint(3, 128, (2, 9))
    kv = dict(batch_size=2, num_heads=model.config.num_key_value_heads, head_dim=16, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        want = model(ids).logits
        for cache in (StaticCache(config=model.config, max_cache_len=16), DynamicCache(config=model.config)):
            cache.early_initialization(**kv)
            torch.testing.assert_close(model(ids, past_key_values=cache, use_cache=True).logits, want)


def test_flex_attention_masks_are_read():
    """flex_attention with a static cache hands the stack a BlockMask: its padding is read through
    the mask's mask_mod, so a left-padded batch generates like each prompt alone; a mask of a form
    no backend builds is refused, naming it, rather than ignored (every pad would write into the
    states)."""
    from transformers import AutoModelForCausalLM
    from conftest import tiny_config
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="flex_attention").eval()
    hybridize(model, [0, 1, 3], conv_size=4)
    for m in gdn_modules(model).values():
        torch.nn.init.normal_(m.conv.weight, std=0.5)
    long, short = torch.randint(3, 128, (1, 9)), torch.randint(3, 128, (1, 5))
    batch = torch.cat([long, torch.cat([torch.full((1, 4), 7), short], 1)])
    mask = torch.cat([torch.ones(1, 9), torch.cat([torch.zeros(1, 4), torch.ones(1, 5)], 1)]).long()
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation="static")
    with torch.no_grad():
        both = model.generate(batch, attention_mask=mask, **kw)[:, 9:]
        alone = [model.generate(p, attention_mask=torch.ones_like(p), **kw)[:, p.shape[1]:] for p in (long, short)]
    assert torch.equal(both[0], alone[0][0]) and torch.equal(both[1], alone[1][0])

    class Unknown:                                         # a mask of no form HF builds
        shape = (2, 6)

    with pytest.raises(ValueError, match="Unknown, shape \\(2, 6\\)"):
        model.model(input_ids=torch.randint(1, 128, (2, 6)), attention_mask=Unknown())
    with pytest.raises(ValueError, match="Unknown"):
        model.model(input_ids=torch.randint(1, 128, (2, 6)), attention_mask={"full_attention": Unknown()})


def test_bad_hybrid_shapes_refused():
    from gdn_kernel import chunk_gated_delta_rule_torch
    with pytest.raises(ValueError, match="conv_size must be a whole number >= 0"):
        hybridize(tiny_model("llama"), [1], conv_size=-1)
    for bad in ([1.7], [float("inf")], [True]):
        with pytest.raises(ValueError, match="whole numbers"):
            hybridize(tiny_model("llama"), bad)
    hybridize(tiny_model("llama"), [1.0, 2])                   # whole numbers as floats are fine
    model = hybridize(tiny_model("llama"), (i for i in range(4) if i != 2))    # any iterable
    assert sorted(gdn_modules(model)) == [0, 1, 3]
    q = torch.randn(1, 5, 2, 4)
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_gated_delta_rule_torch(q, q, q, torch.zeros(1, 5, 2), torch.ones(1, 5, 2), chunk_size=0)


def test_static_cache_chunked_prefill_and_decode_equal_full_forward():
    """The path --bench decodes with: HF StaticCache for softmax layers, prompt fed in chunks,
    GDN states carried and updated in place."""
    from transformers import StaticCache
    torch.manual_seed(0)
    model = hybridize(tiny_model("llama"), [0, 2, 3], conv_size=4)
    for m in gdn_modules(model).values():
        torch.nn.init.normal_(m.conv.weight, std=0.5)
    ids = torch.randint(0, 128, (2, 23))
    cache = StaticCache(config=model.config, max_cache_len=32)
    logits = []
    with torch.no_grad():
        for a, b in [(0, 8), (8, 20), (20, 21), (21, 22), (22, 23)]:
            out = model(ids[:, a:b], past_key_values=cache, cache_position=torch.arange(a, b), use_cache=True)
            logits.append(out.logits)
        full = model(ids, use_cache=False).logits
    torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-4, atol=1e-4)


needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") != "1" or gdn_kernel.triton is None,
    reason="runs gdn_kernel.gdn_layer_step on the CPU: needs triton and TRITON_INTERPRET=1 (the README's test command)")
STEP_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_step_kernel = pytest.mark.skipif(
    gdn_kernel.triton is None or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1"),
    reason="runs gdn_kernel.gdn_layer_step: needs triton and CUDA, or TRITON_INTERPRET=1 on the CPU")


@needs_step_kernel
@pytest.mark.parametrize("conv_size, head_dim, far", [(c, d, False) for c in (0, 1, 4) for d in (16, 24)]
                         + [(0, 16, True)])
def test_fused_layer_step_equals_the_layer(conv_size, head_dim, far, monkeypatch):
    """gdn_layer_step (one kernel from the stacked projection to the output projection's input) must
    give what the layer's own decoding lines give: output, state and conv state, step after step.
    Random gates and conv filters (not the identity), head dims that are and are not powers of two;
    far: time steps far out in softplus's tail (dt_bias -20 and -12, a fast rate exp(A_log)), where
    log(1 + e^a) in fp32 would give 0."""
    torch.manual_seed(0)
    layer = GatedDeltaNet(40, 3, head_dim, 0, conv_size=conv_size).eval()
    with torch.no_grad():
        layer.A_log.normal_(); layer.dt_bias.normal_(); layer.o_norm.uniform_(0.5, 1.5)
        if far:
            layer.dt_bias.copy_(torch.tensor([-20.0, -12.0, 25.0]))
            layer.A_log.copy_(torch.tensor([18.0, 9.0, 0.0]))         # exp(18) softplus(-20) ~ 0.13
        if conv_size:
            torch.nn.init.normal_(layer.conv.weight, std=0.5)
    from transformers import DynamicCache, LlamaConfig
    cfg = LlamaConfig(num_hidden_layers=1, hidden_size=40, num_attention_heads=2, num_key_value_heads=2)
    x = torch.randn(2, 9, 40)
    layer, x = layer.to(STEP_DEVICE), x.to(STEP_DEVICE)
    outs, caches = {}, {}
    for fused in (False, True):
        monkeypatch.setattr(gdn, "gdn_layer_step_usable", lambda z, s: fused)
        cache = DynamicCache(config=cfg)
        with torch.no_grad():
            ys = [layer(x[:, :5], past_key_values=cache)[0]]
            ys += [layer(x[:, t:t + 1], past_key_values=cache)[0] for t in range(5, 9)]
        outs[fused], caches[fused] = torch.cat(ys, 1), gdn._gdn_states(cache)[0]
    torch.testing.assert_close(outs[True], outs[False], rtol=1e-4, atol=1e-5)
    for a, b in zip(caches[True], caches[False]):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_interpreter
def test_fused_layer_step_in_a_model_decodes_like_a_full_forward(monkeypatch):
    """The whole hybrid with every GDN decoding step through gdn_layer_step: cached decoding equals
    the full forward, and greedy generation equals recomputation (W_b with a bias, write_gate=bias's)."""
    monkeypatch.setattr(gdn, "gdn_layer_step_usable", lambda z, s: not torch.is_grad_enabled())
    torch.manual_seed(0)
    model = hybridize(tiny_model("llama"), [0, 2, 3], conv_size=4, beta_bias=True)
    for m in gdn_modules(model).values():
        torch.nn.init.normal_(m.conv.weight, std=0.5)
        torch.nn.init.normal_(m.b_proj.bias)
    inc, full, gen, seq = decode_paths(model, torch.randint(0, 128, (2, 16)), prompt=12, new_tokens=4)
    torch.testing.assert_close(inc, full, rtol=1e-4, atol=1e-4)
    assert torch.equal(gen, seq)


def test_fused_layer_step_bad_input():
    z, S = torch.zeros(2, 100), torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match="z must be"):
        gdn_kernel.gdn_layer_step(z, S, None, None, torch.zeros(3), torch.zeros(3), torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="conv_state must be"):
        gdn_kernel.gdn_layer_step(torch.zeros(2, 120), S, torch.zeros(2, 72, 2), torch.zeros(72, 1, 4),
                                  torch.zeros(3), torch.zeros(3), torch.ones(8), 1e-6)
    # what the kernel would otherwise read or write out of bounds, or silently misread
    z, A, n = torch.zeros(2, 120), torch.zeros(3), torch.ones(8)
    for bad_args, message in (((z, S[0], None, None, A, A, n), "state must be"),
                              ((z, S.transpose(-1, -2), None, None, A, A, n), "not contiguous"),
                              ((z, S.double(), None, None, A, A, n), "state must be"),
                              ((z, S, None, None, A[:1], A, n), "A_log must be"),
                              ((z, S, None, None, A, A, n[:4]), "o_norm must be"),
                              ((z, S, torch.zeros(2, 72, 3), torch.zeros(10, 1, 4), A, A, n), "conv_weight must be"),
                              ((z.long(), S, None, None, A, A, n), "must be floating point")):
        with pytest.raises(ValueError, match=message):
            gdn_kernel.gdn_layer_step(*bad_args, 1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (CI has none): run on the device machine")
@pytest.mark.parametrize("stacked", [False, True])
def test_cuda_cached_decode_equals_full_forward(stacked):
    """On CUDA the prefill runs the Triton chunk kernel and decoding the one-token step kernel: the
    two paths must agree with a full forward, and greedy generation with recomputation. Stacked: with
    a bias on W_b (write_gate=bias's), in the stacked product."""
    torch.manual_seed(0)
    model = hybridize(tiny_model("llama", vocab_size=512), [0, 2, 3], conv_size=4, beta_bias=stacked).cuda()
    for m in gdn_modules(model).values():
        torch.nn.init.normal_(m.conv.weight, std=0.5)
        if stacked:
            torch.nn.init.normal_(m.b_proj.bias)
    if stacked:
        stack_projections(model)
    inc, full, gen, seq = decode_paths(model, torch.randint(0, 512, (2, 300), device="cuda"), prompt=250,
                                       new_tokens=16)
    rel = (inc - full).norm() / full.norm()
    assert rel < 1e-4, rel
    assert torch.equal(gen, seq)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (CI has none): run on the device machine")
def test_cuda_autocast_feeds_the_kernel_bf16(monkeypatch):
    """Under bf16 autocast (distillation) the kernel must get bf16 q, k, v: autocast computes the L2
    norm in fp32, and an fp32 q would send the whole scan down the kernel's slow fp32 path."""
    import gdn as gdn_module
    seen = []
    real = gdn_module.chunk_gated_delta_rule
    monkeypatch.setattr(gdn_module, "chunk_gated_delta_rule",
                        lambda q, k, v, *a, **kw: seen.append((q.dtype, k.dtype, v.dtype)) or real(q, k, v, *a, **kw))
    model = hybridize(tiny_model("llama", vocab_size=512), [0]).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(torch.randint(0, 512, (2, 64), device="cuda")).logits.float().sum().backward()
    assert seen and all(d == (torch.bfloat16,) * 3 for d in seen), seen


def test_cache_operations_move_the_gdn_states():
    """HF's batch operations on a cache (beam search's reorder, a static cache's reset) must move or
    clear the GDN states with the KV tensors, and a crop (assisted decoding) must refuse to continue."""
    from transformers import DynamicCache, StaticCache
    torch.manual_seed(0)
    m = hybridize(tiny_model("llama"), [0, 2]).eval()
    ids, ids2, nxt = torch.randint(0, 128, (2, 10)), torch.randint(0, 128, (2, 10)), torch.randint(0, 128, (2, 1))
    with torch.no_grad():
        c = DynamicCache(config=m.config)
        m(ids, past_key_values=c, use_cache=True)
        swapped = copy.deepcopy(c)                 # a copy (prompt reuse) acts on its own states
        swapped.reorder_cache(torch.tensor([1, 0]))
        step = m(nxt, past_key_values=swapped, use_cache=True).logits[:, -1]
        torch.testing.assert_close(step, m(torch.cat([ids[[1, 0]], nxt], 1)).logits[:, -1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m(nxt, past_key_values=c, use_cache=True).logits[:, -1],
                                   m(torch.cat([ids, nxt], 1)).logits[:, -1], atol=1e-5, rtol=1e-5)

        s = StaticCache(config=m.config, max_cache_len=32)
        m(ids, past_key_values=s, cache_position=torch.arange(10), use_cache=True)
        s.reset()
        again = m(ids2, past_key_values=s, cache_position=torch.arange(10), use_cache=True).logits
        torch.testing.assert_close(again, m(ids2).logits, atol=1e-5, rtol=1e-5)

        c = DynamicCache(config=m.config)
        m(ids, past_key_values=c, use_cache=True)
        c.crop(-3)                                 # drop the last 3 tokens (every transformers version)
        assert c.get_seq_length() == 7
        with pytest.raises(ValueError, match="cannot be rewound"):
            m(nxt, past_key_values=c, use_cache=True)

    # Beam search: with no length penalty a beam's score is the sum of its tokens' log-probabilities.
    out = m.generate(ids[:1], max_new_tokens=6, do_sample=False, num_beams=3, length_penalty=0.0,
                     output_scores=True, return_dict_in_generate=True)
    seq = out.sequences
    with torch.no_grad():
        logp = torch.log_softmax(m(seq).logits[0, 9:-1].float(), -1).gather(-1, seq[0, 10:, None]).sum()
    assert abs(out.sequences_scores.item() - logp.item()) < 1e-4


def test_dropped_teacher_weights_said_once(caplog, tmp_path):
    """Qwen2's q/k/v biases and Qwen3's q/k norms have no place in GDN: hybridize says so in a
    warning (shown without any logging set-up), once per process however many hybrids are built;
    loading a saved hybrid (no teacher involved) says nothing."""
    import logging
    save_hybrid(hybridize(tiny_model("qwen2"), [1]), None, tmp_path / "h")
    gdn._said.clear()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gdn"):
        load_hybrid(tmp_path / "h")
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="gdn"):
        hybridize(tiny_model("qwen2"), [1, 2])
        hybridize(tiny_model("qwen2"), [3])
        hybridize(tiny_model("qwen3"), [1])
        hybridize(tiny_model("llama"), [1])
    said = [r.getMessage() for r in caplog.records]
    assert said == ["teacher k_proj.bias, q_proj.bias, v_proj.bias have no place in GDN: dropped in the converted layers",
                    "teacher k_norm, q_norm have no place in GDN: dropped in the converted layers"]


def test_the_layer_alone_in_a_model_of_ones_own():
    """GatedDeltaNet used outside hybridize: a [B, T] padding mask handed to the layer is refused
    (it reads padding from layer.pad_mask, set by hybridize's pre-hook; before, the mask was dropped and
    the pads written into the state), pad_mask set by hand works; T = 0 gives T = 0; a cache that is
    not HF's is named; fp64 stays fp64 (gradcheck passes); and a backward runs through a cached
    prefill and decoding steps, with the gradients of one full forward (the state was updated in
    place under autograd, which the backward needs as it was)."""
    from transformers import DynamicCache
    torch.manual_seed(0)
    layer = GatedDeltaNet(32, 4, 8, 0, conv_size=4)
    x = torch.randn(2, 6, 32)
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="does not read attention_mask: a padding mask goes in layer.pad_mask"):
        layer(x, attention_mask=mask)
    layer(x, attention_mask=torch.ones(2, 6))                          # no pads: nothing to lose
    with torch.no_grad():
        alone = layer(x[1:, 2:])[0][0]                                 # row 1 without its two pads
        layer.pad_mask = ~mask.bool()
        torch.testing.assert_close(layer(x)[0][1, 2:], alone)
    del layer.pad_mask
    assert layer(x[:, :0])[0].shape == (2, 0, 32)
    with pytest.raises(TypeError, match="keeps its state on an HF Cache .* got dict"):
        layer(x, past_key_values={})

    tiny = GatedDeltaNet(8, 2, 4, 0, conv_size=2).double()
    xs = torch.randn(1, 3, 8, dtype=torch.float64, requires_grad=True)
    assert tiny(xs)[0].dtype == torch.float64
    assert torch.autograd.gradcheck(lambda t: tiny(t)[0], (xs,))

    full = layer(x)[0]
    grads = torch.autograd.grad(full.square().sum(), list(layer.parameters()))
    cache = DynamicCache()
    parts = [layer(x[:, :3], past_key_values=cache)[0]]
    parts += [layer(x[:, t:t + 1], past_key_values=cache)[0] for t in range(3, 6)]
    torch.testing.assert_close(torch.cat(parts, 1), full)
    for got, want in zip(torch.autograd.grad(torch.cat(parts, 1).square().sum(), list(layer.parameters())), grads):
        torch.testing.assert_close(got, want)
