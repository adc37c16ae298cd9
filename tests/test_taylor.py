"""Tests of taylor_stats.py, calibrate.py and the layer policies: tiny random models, CPU, fast."""
import copy
import json
import math
import os
import time
import warnings

import pytest
import torch
import torch.nn.functional as F

from conftest import FAMILIES, tiny_config, tiny_model

import calibrate
import convert
import distill
import taylor_stats
from gdn import gdn_modules, hybridize


def calib(vocab=128, n=2, length=48, seed=1):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def sharp_llama(scales=(1.0, 10.0, 30.0, 100.0), layer=1):
    """A tiny Llama whose query heads of `layer` are scaled by `scales`: a random tiny model attends
    almost uniformly everywhere, these heads range from that (1) to sharp (100)."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[layer].self_attn.q_proj.weight.view(4, 16, 64).mul_(torch.tensor(scales)[:, None, None])
    return model


def gdn_readout(x, Wq, Wk, Wv, g, beta, D):
    """The GDN recurrence one token at a time, as gdn.py's docstring writes it: q, k = L2norm(SiLU(W x))
    per head, v = SiLU(W_v x), S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,
    o_t = S_t^T q_t / sqrt(D). x [N, L, d]; g, beta [N, L, H]; returns o [N, L, H, D] in float64."""
    N, L, _ = x.shape
    q, k, v = (F.silu(x.double() @ W.double().T).view(N, L, -1, D) for W in (Wq, Wk, Wv))
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    S = torch.zeros(N, q.shape[2], D, D, dtype=torch.float64)
    out = []
    for t in range(L):
        kt, a, b = k[:, t, :, :, None], g[:, t, :, None, None].double().exp(), beta[:, t, :, None, None].double()
        S = a * (S - b * kt * (kt.transpose(-1, -2) @ S)) + b * kt * v[:, t, :, None, :]
        out.append((S.transpose(-1, -2) @ q[:, t, :, :, None])[..., 0] / math.sqrt(D))
    return torch.stack(out, 1)


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------

def test_statistics_match_a_hand_computation():
    """Two heads, two query rows. Head 0 spreads its second row evenly, head 1 attends to itself.
      head 0: row 0 = [1, 0]      distance 0.5 (the floor), entropy 0
              row 1 = [.5, .5]    distance .5*1 + .5*0.5 = 0.75, entropy ln 2
              means: d = 0.625, H = ln2 / 2
      head 1: identity            d = 0.5, H = 0
      concentration: head 1 is the sharper one -> c = (0, 1)."""
    p = torch.tensor([[[1.0, 0.0], [0.5, 0.5]],
                      [[1.0, 0.0], [0.0, 1.0]]])
    dist, ent = taylor_stats._head_statistics(p)
    assert torch.allclose(dist / 2, torch.tensor([0.625, 0.5], dtype=torch.float64))
    assert torch.allclose(ent / 2, torch.tensor([math.log(2) / 2, 0.0], dtype=torch.float64))
    assert torch.allclose(taylor_stats.concentration((ent / 2).float()), torch.tensor([0.0, 1.0]))
    sink, dns = taylor_stats._sink_statistics(p)
    assert torch.allclose(sink / 2, torch.tensor([0.75, 0.5], dtype=torch.float64))
    # without key 0: head 0 row 1 keeps only the diagonal (0.5), rows with nothing left count the floor
    assert torch.allclose(dns / 2, torch.tensor([0.5, 0.5], dtype=torch.float64))


@pytest.mark.parametrize("family", FAMILIES)
def test_collect_stats_matches_eager_attention(family):
    """The hooked recomputation equals HF's own eager attention probabilities (GQA, q/k norms,
    Gemma3's query_pre_attn_scalar and sliding window), and the output check holds. Gemma 3's config
    has a score softcap its attention does not apply (HF passes it no softcap): a small one set here
    must change nothing."""
    model = tiny_model(family)
    model.config._attn_implementation = "eager"
    for layer in model.model.layers:
        if hasattr(layer.self_attn, "attn_logit_softcapping"):
            layer.self_attn.attn_logit_softcapping = model.config.attn_logit_softcapping = 2.0
    ids = calib(length=24)
    stats = taylor_stats.collect_stats(model, ids, progress=False, block=7)   # odd block: tests the tiling
    with torch.no_grad():
        out = model(ids, output_attentions=True, output_hidden_states=True)
        att, hidden = out.attentions, out.hidden_states
    for i, a in enumerate(att):                       # a [N, H, T, T]
        a = a.double()
        T = a.shape[-1]
        lag = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).double().clamp(min=0.5)
        d = (a * lag).sum(-1).mean((0, 2))
        e = -torch.special.xlogy(a, a).sum(-1).mean((0, 2))
        assert torch.allclose(stats[i]["distance"].double(), d, rtol=1e-4), (family, i)
        assert torch.allclose(stats[i]["entropy"].double(), e, rtol=1e-4, atol=1e-5), (family, i)
        assert stats[i]["check"] < 1e-4
        assert stats[i]["x"].shape == (2, 24, 64) and stats[i]["y"].shape == (2, 24, 64)
        # x is the layer's normed input, h the residual stream entering it
        assert torch.allclose(stats[i]["h"], hidden[i].float(), atol=1e-5)
        assert torch.allclose(stats[i]["x"], model.model.layers[i].input_layernorm(hidden[i]).float(), atol=1e-5)
        assert stats[i]["ctx"].shape[:3] == (2, 24, 4)


def test_distance_floor_reaches_both_distances():
    """collect_stats(floor=F) counts max(i - j, F) in the distance and in the distance without the sink,
    and records F (calibrate trusts that record when handed the statistics). Against HF's eager
    attention with F = 3, which raises every row's last three keys above the default floor's weight."""
    model = tiny_model("llama")
    model.config._attn_implementation = "eager"
    ids = calib(length=24)
    st = taylor_stats.collect_stats(model, ids, layers=[1], progress=False, floor=3.0)[1]
    with torch.no_grad():
        a = model(ids, output_attentions=True).attentions[1].double()      # [N, H, T, T]
    T = a.shape[-1]
    lag = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).double().clamp(min=3.0)
    rest = a[..., 1:].sum(-1)
    nosink = torch.where(rest > 1e-6, (a[..., 1:] * lag[:, 1:]).sum(-1) / rest.clamp_min(1e-12),
                         torch.full_like(rest, 3.0))
    assert st["floor"] == 3.0
    assert torch.allclose(st["distance"].double(), (a * lag).sum(-1).mean((0, 2)), rtol=1e-4)
    assert torch.allclose(st["distance_nosink"].double(), nosink.mean((0, 2)), rtol=1e-4)


@pytest.mark.parametrize("wrong, dtype", [("v 5% off", torch.float32), ("q one token late", torch.float32),
                                          ("v 10% off", torch.bfloat16)])
def test_collect_stats_refuses_attention_it_does_not_reproduce(wrong, dtype, monkeypatch):
    """collect_stats' promise: a recomputation of the attention whose concat(ctx) W_o misses the
    module's own output is an error, not wrong statistics. Here its v is 5% too large, or its q is
    the previous token's (on sharpened queries, so that attention depends on q); in a bf16 teacher,
    whose right recomputation is off by its rounding, v 10% too large."""
    model = sharp_llama((10.0,) * 4).to(dtype)
    ids = calib()
    right = taylor_stats.collect_stats(model, ids, layers=[1], progress=False)[1]["check"]
    assert right < (1e-4 if dtype == torch.float32 else 1e-2)
    real = taylor_stats._attention_pieces
    def off(*args):
        q, k, v = real(*args)
        return (q, k, v * (1.05 if "5%" in wrong else 1.1)) if wrong.startswith("v") else (q.roll(1, dims=2), k, v)
    monkeypatch.setattr(taylor_stats, "_attention_pieces", off)
    with pytest.raises(ValueError, match="layer 1: recomputed attention output differs from the module's by"):
        taylor_stats.collect_stats(model, ids, layers=[1], progress=False)


def test_a_teacher_overflowing_in_its_dtype_is_said_as_such():
    """A float16 teacher whose residual stream overflows (here layer 0's W_o made huge) gives layer 1
    a non-finite input: that is said, not blamed on the recomputation of its attention."""
    model = tiny_model("llama").to(torch.float16)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.fill_(6e4)
    with pytest.raises(ValueError, match="layer 1: the teacher's own attention input or output is not finite"):
        taylor_stats.collect_stats(model, calib(), layers=[1], progress=False)


def test_undefined_statistics_fall_back_with_a_warning():
    with pytest.warns(UserWarning, match="undefined"):
        x = taylor_stats.sanitize("distance", 3, torch.tensor([2.0, float("nan"), float("inf")]), 8.0)
    assert x.tolist() == [2.0, 8.0, 8.0]


def test_nan_statistics_never_give_nan_weights():
    model = tiny_model("llama")
    ids = calib()
    stats = taylor_stats.collect_stats(model, ids, progress=False)
    stats[1]["distance"][0] = float("nan")            # as if a head's statistic were undefined
    stats[1]["ctx"][..., 1, :] = 0                    # and its context empty (sigma 0/0)
    student = hybridize(tiny_model("llama"), [1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calibrate.INITS["taylor-phase1"](student, model, ids, {"_stats": stats})
    for p in student.parameters():
        assert torch.isfinite(p).all()


def test_phase1_clips_the_time_step_and_the_value_scale():
    """Statistics past the clips: a mean distance of 0.12 tokens (ln2/d = 5.8) and of 1e5 tokens give
    gamma_max = 5 and gamma_min = 1e-3, while 3 and 30 give ln2/d; a teacher context 10^4 times
    larger puts sigma at sigma_max = 10 (in heads whose fit is positive). A real 64-token calibration
    reaches none of these. And a head whose statistic is undefined takes the documented default
    distance (taylor_stats.DEFAULTS)."""
    teacher = tiny_model("llama")
    ids = calib()
    stats = taylor_stats.collect_stats(teacher, ids, layers=[1], progress=False)
    st = stats[1]
    st["distance"] = torch.tensor([0.12, 3.0, 30.0, 1e5], dtype=st["distance"].dtype)
    st["ctx"] *= 1e4
    student = hybridize(copy.deepcopy(teacher), [1])
    p1 = calibrate.INITS["taylor-phase1"](student, teacher, ids, {"_stats": stats})["layers"][1]["phase1"]
    gamma = [5.0, math.log(2) / 3, math.log(2) / 30, 1e-3]
    assert p1["gamma"] == pytest.approx(gamma, rel=1e-5)
    assert F.softplus(gdn_modules(student)[1].dt_bias).tolist() == pytest.approx(gamma, rel=1e-4)
    assert max(p1["sigma"]) == pytest.approx(10.0)
    st["distance"][1] = float("nan")
    student = hybridize(copy.deepcopy(teacher), [1])
    with pytest.warns(UserWarning, match="undefined"):
        p1 = calibrate.INITS["taylor-phase1"](student, teacher, ids, {"_stats": stats})["layers"][1]["phase1"]
    default = taylor_stats.DEFAULTS["distance"]
    assert p1["gamma"][1] == pytest.approx(min(max(math.log(2) / default, 1e-3), 5.0), rel=1e-5)


def test_a_head_without_readout_keeps_value_scale_one():
    """A head whose value rows are all zero reads out G = 0: there is no scale to fit, and sigma stays
    1 (the docstring's promise), not 0/0 clipped to sigma_min."""
    teacher = tiny_model("llama")
    with torch.no_grad():                               # KV head 0 -> its query heads read nothing
        attn = teacher.model.layers[1].self_attn
        attn.v_proj.weight[:attn.head_dim].zero_()
    ids = calib()
    student = hybridize(copy.deepcopy(teacher), [1])
    p1 = calibrate.INITS["taylor-phase1"](student, teacher, ids, {})["layers"][1]["phase1"]
    groups = teacher.config.num_attention_heads // teacher.config.num_key_value_heads
    assert p1["sigma"][:groups] == [1.0] * groups
    assert all(s != 1.0 for s in p1["sigma"][groups:])


def test_statistics_refuse_other_architectures():
    """collect_stats measures only the families whose attention it reproduces, the same as gdn.py
    converts; another is refused by name before any forward."""
    import gdn
    assert taylor_stats.FAMILIES == gdn.SUPPORTED
    model = tiny_model("llama")
    model.config.model_type = "phi3"
    with pytest.raises(ValueError, match="unsupported architecture 'phi3'"):
        taylor_stats.collect_stats(model, calib(), progress=False)


COPIED_ALONE = {
    # the files copied, and what must run with only them: each file's library functions need only
    # what sits below it (README, "Files"); only the scripts' command lines borrow from convert.py
    "taylor_stats.py": "import taylor_stats; s = taylor_stats.collect_stats(m, ids, layers=[1], progress=False); "
                       "assert s[1]['check'] < 1e-4 and s[1]['entropy'].shape == (4,)",
    "gdn_kernel.py,gdn.py": "import gdn; h = gdn.hybridize(m, [1]); h(ids); assert len(gdn.gdn_modules(h)) == 1",
    "gdn_kernel.py,gdn.py,taylor_stats.py,calibrate.py":
        "import copy, gdn, calibrate; h = gdn.hybridize(copy.deepcopy(m), [1]); "
        "r = calibrate.INITS['taylor'](h, m, ids, {'steps': 2}); assert len(gdn.gdn_modules(h)) == 1",
    "gdn_kernel.py,gdn.py,distill.py": "import distill; r = distill.perplexity(m, ids.flatten(), window=8); "
                                        "assert 1 < r['ppl'] < 1000, r",
}


@pytest.mark.parametrize("files", list(COPIED_ALONE))
def test_a_file_copied_alone_works(files, tmp_path):
    """Someone copying one file into their own project gets a working module: run in a fresh
    interpreter from a folder holding only those files (the repository not on its path)."""
    import shutil
    import subprocess
    import sys
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for f in files.split(","):
        shutil.copy(os.path.join(here, f), tmp_path)
    code = ("import torch; from transformers import LlamaConfig, AutoModelForCausalLM; torch.manual_seed(0); "
            "m = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, "
            "num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval(); "
            "ids = torch.randint(0, 64, (2, 12)); " + COPIED_ALONE[files] + "; print('ok')")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# Inits
# ---------------------------------------------------------------------------------------------

FAST = ["steps=15"]


@pytest.mark.parametrize("init", list(calibrate.INITS))
def test_every_init_shapes_and_determinism(init):
    teacher = tiny_model("llama")
    ids = calib()
    opts = calibrate.parse_opts(FAST)
    outs = []
    for _ in range(2):
        student, info = convert.convert(teacher, [0], init, ids, seed=3, init_opts=opts)
        with torch.no_grad():
            logits = student(ids).logits
        assert logits.shape == (2, 48, 128) and torch.isfinite(logits).all()
        assert sorted(gdn_modules(student)) == [1, 2, 3]
        outs.append({k: v.clone() for k, v in student.state_dict().items()})
    for k in outs[0]:
        assert torch.equal(outs[0][k], outs[1][k]), (init, k)
    # another seed gives other random gates (naive and its descendants)
    other, _ = convert.convert(teacher, [0], init, ids, seed=4, init_opts=opts)
    if init not in ("zero-gate", "taylor-plus"):         # zero-gate has no W_g, taylor-plus zeroes W_a
        assert not torch.equal(other.model.layers[1].self_attn.a_proj.weight, outs[0]["model.layers.1.self_attn.a_proj.weight"])


@pytest.mark.parametrize("init", ["align-only", "taylor", "taylor-plus", "align-plus"])
def test_phase2_loss_decreases(init):
    teacher = tiny_model("qwen3")
    ids = calib()
    _, info = convert.convert(teacher, [0], init, ids, init_opts=calibrate.parse_opts(["steps=30"]))
    for i, rec in info["init_info"]["layers"].items():
        p2 = rec["phase2"]
        assert p2["loss_after"] < p2["loss_before"], (init, i, p2)


def test_out_gate_fit_keeps_the_best_of_its_line_search():
    """out_gate=fit tries the least-squares gate scales times each of gate_shrinks and keeps the one
    with the lowest layer MSE, the damped start (reported as shrink 0) included: what it reports is
    what the layer does, never worse than out_gate=damped."""
    teacher = tiny_model("llama")
    ids = calib()
    st = taylor_stats.collect_stats(teacher, ids, layers=[1], progress=False)[1]
    mse = {}
    for opts in ({}, {"out_gate": "fit", "gate_shrinks": "0.5"}, {"out_gate": "fit", "gate_shrinks": "0.5,0.25"}):
        student = hybridize(copy.deepcopy(teacher), [1])
        rec = calibrate.INITS["taylor-phase1"](student, teacher, ids, dict(opts))["layers"][1]["phase1"]
        mse[opts.get("gate_shrinks")] = got = calibrate._layer_mse(gdn_modules(student)[1], st["x"], st["y"])
        if opts:
            assert rec["kappa_shrink"] in [0.0] + [float(s) for s in opts["gate_shrinks"].split(",")]
            assert rec["gate_fit_mse"] == pytest.approx(got, rel=1e-5)
    assert mse["0.5"] <= mse[None] * (1 + 1e-6) and mse["0.5,0.25"] <= mse["0.5"] * (1 + 1e-6)


def test_gate_search_and_heldout_keep_best_run():
    """Two of our options that taylor-plus does not use by default, kept reachable: val_rows (held
    out here, and recorded; what it keeps is checked by test_phase2_keep_best_puts_the_best_parameters_back)
    and gate_search, checked here: each head's (gamma, beta) is the grid point whose readout (constant gates, the
    recurrence written out here, the naive W_q, W_k, W_v) has the highest mean cosine with the
    teacher context, and the layer then runs those gates: A_log = 0 and a_proj=zero make the time step
    softplus(dt_bias) exactly gamma, write_gate=fit centres beta on the chosen one."""
    teacher = tiny_model("llama")
    ids = calib(n=3)
    gammas, betas = [0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0], [0.1, 0.3, 0.5, 0.7, 0.9]
    search = ["gate_search=1", "write_gate=fit", "a_proj=zero", "out_gate=fit",
              "gamma_grid=" + ",".join(map(str, gammas)), "beta_grid=" + ",".join(map(str, betas))]
    _, info = convert.convert(teacher, [0], "taylor", ids, init_opts=calibrate.parse_opts(["steps=10", "val_rows=1"] + search))
    rec = info["init_info"]["layers"][1]
    assert len(rec["phase1"]["gate_search"]["gamma"]) == 4 and rec["phase2"]["val_rows"] == 1
    student, info = convert.convert(teacher, [0], "taylor-phase1", ids, init_opts=calibrate.parse_opts(search))
    found = info["init_info"]["layers"][1]["phase1"]["gate_search"]
    gdn = gdn_modules(student)[1]
    naive = gdn_modules(hybridize(copy.deepcopy(teacher), [1]))[1]
    st = taylor_stats.collect_stats(teacher, ids, layers=[1], progress=False)[1]
    x, T = st["x"], st["ctx"].double()
    ones = torch.ones(*x.shape[:2], 4)
    with torch.no_grad():
        score = torch.stack([torch.stack([F.cosine_similarity(gdn_readout(
            x, naive.q_proj.weight, naive.k_proj.weight, naive.v_proj.weight, -gm * ones, bt * ones, 16), T, dim=-1)
            .mean((0, 1)) for bt in betas]) for gm in gammas])                                   # [gamma, beta, head]
        step = F.softplus(gdn.dt_bias)
        beta_seen = torch.sigmoid(x @ gdn.b_proj.weight.T).mean((0, 1))
    assert torch.all(gdn.A_log == 0) and torch.all(gdn.a_proj.weight == 0)
    for h in range(4):
        a, b = (min(range(len(grid)), key=lambda j: abs(grid[j] - v)) for grid, v in
                ((gammas, found["gamma"][h]), (betas, found["beta"][h])))
        assert found["gamma"][h] == pytest.approx(gammas[a], rel=1e-6) and found["beta"][h] == pytest.approx(betas[b]), h
        assert step[h].item() == pytest.approx(gammas[a], rel=1e-4), h
        assert abs(beta_seen[h].item() - betas[b]) < 0.05, h
        assert score[a, b, h] >= score[..., h].max() - 1e-5, (h, score[a, b, h], score[..., h].max())
        assert score[..., h].max() - score[..., h].min() > 0.01                              # the choice matters
    # a grid point above gamma_max: the layer runs gamma_max, and so says the record
    cap = min(found["gamma"]) / 2
    student, info = convert.convert(teacher, [0], "taylor-phase1", ids,
                                    init_opts=calibrate.parse_opts(search + [f"gamma_max={cap}", "gamma_min=1e-3"]))
    capped = info["init_info"]["layers"][1]["phase1"]["gate_search"]["gamma"]
    assert capped == pytest.approx([cap] * 4) and F.softplus(gdn_modules(student)[1].dt_bias).tolist() == pytest.approx(capped, rel=1e-4)


def test_phase2_result_is_in_the_student():
    """The loss Phase 2 reports is the student layer's own loss afterwards (its weights were copied
    back, the best ones kept), and it is below the naive layer's."""
    teacher = tiny_model("llama")
    ids = calib()
    stats = taylor_stats.collect_stats(teacher, ids, progress=False)
    naive, _ = convert.convert(teacher, [0], "naive", ids)
    student, info = convert.convert(teacher, [0], "align-only", ids, init_opts=calibrate.parse_opts(["steps=30"]))
    x, y = stats[1]["x"], stats[1]["y"]
    p2 = info["init_info"]["layers"][1]["phase2"]
    got = calibrate._layer_mse(gdn_modules(student)[1], x, y)
    assert got == pytest.approx(p2["loss_after"], rel=1e-3)
    assert got < calibrate._layer_mse(gdn_modules(naive)[1], x, y)


def test_phase2_keep_best_puts_the_best_parameters_back():
    """keep_best with held-out rows (early stopping, as taylor-plus runs it): the held-out loss is
    lowest a few steps in, so the best parameters are neither the first nor the last, and they must
    be what the layer holds afterwards: its held-out and fit losses are the reported best ones, and
    keep_best=0 leaves the last parameters, worse on the held-out row. (At the default learning
    rates without held-out rows the fit loss falls to the last step, where keeping the best changes
    nothing: test_phase2_result_is_in_the_student cannot see a skipped restore.)"""
    teacher = tiny_model("llama")
    stats = taylor_stats.collect_stats(teacher, calib(n=3), progress=False)
    x, y = stats[1]["x"], stats[1]["y"]
    naive = gdn_modules(hybridize(tiny_model("llama"), [1]))[1]
    opts = {"steps": 30, "val_rows": 1, "lr_qkv": 1e-3, "lr_gates": 1e-2}
    best, last = copy.deepcopy(naive), copy.deepcopy(naive)
    out = calibrate.phase2(best, x, y, calibrate.resolve(opts))
    calibrate.phase2(last, x, y, calibrate.resolve({**opts, "keep_best": 0}))
    assert 0 < out["best_step"] < 30                           # the best is not the last: the test bites
    assert calibrate._layer_mse(best, x[-1:], y[-1:]) == pytest.approx(out["val_loss_best"], rel=1e-4)
    assert calibrate._layer_mse(best, x[:-1], y[:-1]) == pytest.approx(out["loss_after"], rel=1e-4)
    assert calibrate._layer_mse(last, x[-1:], y[-1:]) > out["val_loss_best"] * 1.01


def test_align_plus_trains_the_output_projection_and_align_only_does_not():
    teacher = tiny_model("llama")
    ids = calib()
    wo = teacher.model.layers[1].self_attn.o_proj.weight
    opts = calibrate.parse_opts(["steps=10"])
    only, _ = convert.convert(teacher, [0], "align-only", ids, init_opts=opts)
    plus, _ = convert.convert(teacher, [0], "align-plus", ids, init_opts=opts)
    assert torch.equal(only.model.layers[1].self_attn.o_proj.weight, wo)
    assert not torch.equal(plus.model.layers[1].self_attn.o_proj.weight, wo)
    assert not torch.equal(plus.model.layers[1].self_attn.o_norm, only.model.layers[1].self_attn.o_norm)


@pytest.mark.parametrize("init", ["align-only", "taylor", "taylor-plus", "align-plus"])
def test_phase2_trains_exactly_the_method_parameters_at_their_rates(init, monkeypatch):
    """METHOD section 3 names what Phase 2 trains and how: AdamW, weight decay 0.01; W_q, W_k, W_v at
    lr_qkv = 1e-4; W_a, W_b, W_g, A_log, dt_bias at lr_gates = 1e-3; W_o and the readout norm frozen
    (align-plus, train_out=1: both at lr_qkv); every step clipped at grad norm 1.0. Read off the
    optimizer Phase 2 really builds and the clip it really calls (the loss falling, which the other
    tests check, holds with gates missing, rates swapped or the norm trained too), and the
    parameters that changed in the student are exactly those the optimizer holds (keep_best=0: the
    student keeps the last step's parameters, whichever step had the lowest loss)."""
    runs = []
    real_phase2, real_deepcopy, real_clip = calibrate.phase2, copy.deepcopy, torch.nn.utils.clip_grad_norm_

    def phase2(gdn, x, y, o, desc="phase 2"):
        runs.append({"clips": [], "before": {n: p.detach().clone() for n, p in gdn.named_parameters()}})
        out = real_phase2(gdn, x, y, o, desc)
        runs[-1]["after"] = {n: p.detach().clone() for n, p in gdn.named_parameters()}
        return out

    def deepcopy(x, *a):                                 # the float32 layer Phase 2 trains
        runs[-1]["layer"] = y = real_deepcopy(x, *a)
        return y

    class AdamW(torch.optim.AdamW):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            runs[-1]["groups"] = self.param_groups

    def clip(parameters, max_norm, *a, **k):
        parameters = list(parameters)
        runs[-1]["clips"].append(({id(p) for p in parameters}, max_norm))
        return real_clip(parameters, max_norm, *a, **k)

    monkeypatch.setattr(calibrate, "phase2", phase2)
    monkeypatch.setattr(calibrate, "copy", type("copy", (), {"deepcopy": staticmethod(deepcopy)}))
    monkeypatch.setattr(torch.optim, "AdamW", AdamW)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    convert.convert(tiny_model("llama"), [0], init, calib(), init_opts=calibrate.parse_opts(["steps=3", "keep_best=0"]))
    qkv = {"q_proj.weight", "k_proj.weight", "v_proj.weight"}
    qkv |= {"o_proj.weight", "o_norm"} if init == "align-plus" else set()
    gates = {"a_proj.weight", "b_proj.weight", "g_proj.weight", "A_log", "dt_bias"}
    want = {**{n: (1e-4, 0.01) for n in qkv}, **{n: (1e-3, 0.01) for n in gates}}
    assert len(runs) == 3                                               # layers 1, 2, 3
    for run in runs:
        name = {id(p): n for n, p in run["layer"].named_parameters()}
        got = [(name[id(p)], (g["lr"], g["weight_decay"])) for g in run["groups"] for p in g["params"]]
        assert len(got) == len(dict(got)) and dict(got) == want, (init, sorted(got))
        assert run["clips"] == [({id(p) for g in run["groups"] for p in g["params"]}, 1.0)] * 3
        moved = {n for n in run["before"] if not torch.equal(run["before"][n], run["after"][n])}
        assert moved == set(want), (init, sorted(moved ^ set(want)))


def test_phase2_clips_the_gradient_norm():
    """Each step's gradient is clipped to norm `clip` before AdamW sees it. Adam divides by the
    gradient's own size, so a clip of 1e-12 shows only where the gradient falls below Adam's epsilon
    (1e-8): the steps shrink ~1e4-fold. Weight decay 0, so that nothing else moves the weights. The
    clip left out, both runs would be the same."""
    teacher = tiny_model("llama")
    stats = taylor_stats.collect_stats(teacher, calib(), layers=[1], progress=False)
    x, y = stats[1]["x"], stats[1]["y"]
    naive = gdn_modules(hybridize(tiny_model("llama"), [1]))[1]
    moves = {}
    for clip in (1.0, 1e-12):
        layer = copy.deepcopy(naive)
        calibrate.phase2(layer, x, y, calibrate.resolve({"steps": 3, "keep_best": 0, "weight_decay": 0.0, "clip": clip}))
        moves[clip] = {n: (p - dict(naive.named_parameters())[n]).abs().max().item() for n, p in layer.named_parameters()}
    trained = [n for n in moves[1.0] if moves[1.0][n] > 0]
    assert len(trained) == 8                                    # W_q, W_k, W_v, W_a, W_b, W_g, A_log, dt_bias
    for n in trained:
        assert moves[1e-12][n] < 1e-2 * moves[1.0][n], (n, moves[1e-12][n], moves[1.0][n])


def test_phase1_sets_what_the_statistics_say():
    """Each Phase-1 setting against calibrate.py's formula, computed here from collect_stats' distance,
    entropy, x and ctx, on a layer whose heads range from diffuse to sharp: A_log = 0 and
    softplus(dt_bias) = clip(ln2/d_h, 1e-3, 5) (half-life = distance); beta_h = 0.3 + 0.4 c_h with c_h
    from the entropies (the sharpest head writes with 0.7, the most diffuse 0.3), W_b's rows rescaled
    to logit(beta_h)/sqrt(d) * W_b[h]/mean|W_b[h]|; W_v's head rows times sigma_h = <T_h, G_h>/||G_h||^2
    clipped to [0.1, 10], G the readout of these gates with the unscaled W_v (the recurrence written
    out here); W_g = kappa W_v, kappa = 0.01 RMS(T)/RMS(SiLU(W_v x)). What Phase 1 reports is what it
    set. write_gate=fit really centres beta on its target, the reference's rescaling does not have to."""
    teacher = sharp_llama()
    ids = calib(length=64)
    stats = taylor_stats.collect_stats(teacher, ids, progress=False)
    st = stats[1]
    student = hybridize(copy.deepcopy(teacher), [1])
    p1 = calibrate.INITS["taylor-phase1"](student, teacher, ids, {"_stats": stats})["layers"][1]["phase1"]
    gdn = gdn_modules(student)[1]
    naive = gdn_modules(hybridize(copy.deepcopy(teacher), [1]))[1]
    with torch.no_grad():
        calibrate._standard_gates(naive, calibrate.resolve({}))
    gamma = (math.log(2) / st["distance"]).clamp(1e-3, 5)
    ent = st["entropy"]
    beta = 0.3 + 0.4 * (1 - (ent - ent.min()) / max(float(ent.max() - ent.min()), 1e-3))
    assert beta[ent.argmin()] == pytest.approx(0.7) and beta[ent.argmax()] == pytest.approx(0.3)
    assert torch.all(gdn.A_log == 0)
    assert torch.allclose(F.softplus(gdn.dt_bias), gamma, rtol=1e-4)
    Wb = naive.b_proj.weight
    Wb = torch.logit(beta)[:, None] / math.sqrt(64) * Wb / Wb.abs().mean(1, keepdim=True)
    assert torch.allclose(gdn.b_proj.weight, Wb, rtol=1e-4, atol=1e-7)
    x, T = st["x"], st["ctx"].double()
    with torch.no_grad():
        g = -F.softplus(x @ naive.a_proj.weight.T + torch.log(torch.expm1(gamma)))
        G = gdn_readout(x, naive.q_proj.weight, naive.k_proj.weight, naive.v_proj.weight, g, torch.sigmoid(x @ Wb.T), 16)
        sigma = ((T * G).sum((0, 1, 3)) / G.pow(2).sum((0, 1, 3))).clamp(0.1, 10).float()
        Wv = (naive.v_proj.weight.view(4, 16, 64) * sigma[:, None, None]).view(64, 64)
        kappa = 0.01 * T.pow(2).mean().sqrt() / F.silu(x.double() @ Wv.double().T).pow(2).mean().sqrt()
    assert sigma.min() == pytest.approx(0.1) and 0.2 < sigma.max() < 9.9         # clipped and free heads alike
    assert torch.allclose(gdn.v_proj.weight, Wv, rtol=1e-3, atol=1e-8)
    assert torch.allclose(gdn.g_proj.weight, kappa.float() * Wv, rtol=1e-3, atol=1e-9)
    assert torch.allclose(torch.tensor(p1["gamma"]), gamma) and torch.allclose(torch.tensor(p1["beta_target"]), beta)
    assert torch.allclose(torch.tensor(p1["sigma"]), sigma, rtol=1e-3) and p1["kappa"] == pytest.approx(kappa.item(), rel=1e-3)
    # write_gate=fit: W_b x sits at logit(beta_h) on the calibration tokens
    student = hybridize(copy.deepcopy(teacher), [1])
    calibrate.INITS["taylor-phase1"](student, teacher, ids, {"_stats": stats, "write_gate": "fit"})
    with torch.no_grad():
        seen = torch.sigmoid(x @ gdn_modules(student)[1].b_proj.weight.T).mean((0, 1))
    assert (seen - beta).abs().max() < 0.05


def test_write_gate_bias_centres_beta_and_keeps_its_tokens(tmp_path):
    """write_gate=bias (METHOD's alternative): convert builds the GDN layers with a bias on W_b, which
    becomes logit(beta_h); W_b keeps its standard random init, so beta is centred on its target and
    still varies with the token. The bias is saved and loaded with the hybrid and trained by Phase 2;
    without a bias on W_b the option refuses."""
    from gdn import load_hybrid, save_hybrid
    teacher = tiny_model("llama")
    ids = calib(length=64)
    student, info = convert.convert(teacher, [0], "taylor-phase1", ids, init_opts={"write_gate": "bias"})
    gdn = gdn_modules(student)[1]
    p1 = info["init_info"]["layers"][1]["phase1"]
    target = torch.tensor(p1["beta_target"])
    assert torch.allclose(gdn.b_proj.bias, calibrate._logit(target), atol=1e-6)
    fresh = gdn_modules(hybridize(tiny_model("llama"), [1]))[1]
    with torch.no_grad():
        calibrate._standard_gates(fresh, calibrate.resolve({}))
    assert torch.equal(gdn.b_proj.weight, fresh.b_proj.weight)             # W_b as the standard init drew it
    assert max(abs(a - b) for a, b in zip(p1["beta_mean"], p1["beta_target"])) < 0.02
    with torch.no_grad():
        beta = gdn.gates(gdn.project(teacher.model.embed_tokens(ids)))[1]
    assert beta.std((0, 1)).min() > 0                                       # token-dependent
    save_hybrid(student, None, tmp_path / "h")
    back = load_hybrid(tmp_path / "h")
    assert torch.equal(gdn_modules(back)[1].b_proj.bias, gdn.b_proj.bias)
    trained, _ = convert.convert(teacher, [0], "taylor", ids, init_opts={"write_gate": "bias", "steps": 5})
    assert not torch.equal(gdn_modules(trained)[1].b_proj.bias, gdn.b_proj.bias)
    with pytest.raises(ValueError, match="needs GDN layers with a bias on W_b"):
        calibrate.INITS["taylor-phase1"](hybridize(tiny_model("llama"), [1]), teacher, ids, {"write_gate": "bias"})


def test_init_record_holds_the_concentration_phase1_used():
    """The init's record of the teacher statistics gives the concentration under the init's own
    conc_eps (the one Phase 1's write gate targets were computed from), not taylor_stats' default."""
    teacher = sharp_llama()
    ids = calib(length=64)
    stats = taylor_stats.collect_stats(teacher, ids, progress=False)
    student = hybridize(copy.deepcopy(teacher), [1])
    info = calibrate.INITS["taylor-phase1"](student, teacher, ids, {"_stats": stats, "conc_eps": 5.0})
    want = taylor_stats.concentration(stats[1]["entropy"], 5.0)
    assert not torch.allclose(want, stats[1]["concentration"], atol=1e-3)
    assert info["stats"][1]["concentration"] == pytest.approx(want.tolist(), abs=1e-5)


def test_init_options_are_checked():
    with pytest.raises(ValueError, match="unknown init option 'bogus'; valid: seed"):
        calibrate.parse_opts(["bogus=1"])
    assert calibrate.parse_opts(["steps=7", "damping=0.5", "write_gate=fit"]) == \
        {"steps": 7, "damping": 0.5, "write_gate": "fit"}
    with pytest.raises(ValueError, match="--init-opt steps is given twice"):       # (the last would win)
        calibrate.parse_opts(["steps=7", "damping=0.5", "steps=8"])
    for bad, message in (["dt_from=sink", "choose from distance, distance_nosink"], ["a_proj=zeros", "choose from"],
                         ["train_out=2", "choose from 0, 1"], ["steps=0.9", "whole number"], ["steps=x", "a number"]):
        with pytest.raises(ValueError, match=message):
            calibrate.parse_opts([bad])
    with pytest.raises(ValueError, match="write_gate=fits: choose from rescale, bias, fit"):   # (options built
        calibrate.resolve({"write_gate": "fits"})                                              # by hand too)
    # ranges that would only fail inside Phase 1, after the teacher pass, fail here
    for bad, message in ((["beta_span=0.7"], "lie in \\(0, 1\\)"), (["beta_min=0"], "lie in"),
                         (["beta_grid=0.5,1"], "lie in"), (["beta_grid=0.5;x"], "comma-separated list"),
                         (["gamma_min=6"], "gamma_min <= gamma_max"), (["sigma_min=-1"], "0 < sigma_min"),
                         (["dt_min=0.5"], "dt_min <= dt_max"), (["gamma_grid=0,1"], "must be > 0"),
                         (["steps=inf"], "finite"), (["seed=nan"], "finite"), (["a_max=0"], "a_max must be > 0"),
                         (["dt_floor=-1"], "dt_floor must be > 0"), (["lr_qkv=-1"], "lr_qkv must be >= 0"),
                         (["gamma_grid=nan,1"], "finite"), (["conc_eps=0"], "conc_eps must be > 0"),
                         (["clip=-1"], "clip must be > 0"), (["gate_std=-1"], "gate_std must be >= 0"),
                         (["ridge=0"], "ridge must be > 0"), (["gate_ridge=0"], "gate_ridge must be > 0"),
                         (["gate_shrinks=1,-0.5"], "factors must be >= 0"), (["gate_shrinks=1,x"], "comma-separated"),
                         (["gate_search=1", "gates_from=naive"], "use one or the other"),
                         (["gates_from=naive", "a_proj=zero"], "keeps the standard random gates"),
                         (["gates_from=naive", "write_gate=fit"], "keeps the standard random gates")):
        with pytest.raises(ValueError, match=message):
            calibrate.parse_opts(bad)
    with pytest.raises(ValueError, match="taylor-plus sets both"):
        calibrate.resolve({"gates_from": "naive"}, calibrate.PLUS)
    calibrate.parse_opts(["gates_from=naive", "out_gate=fit", "val_rows=1"])       # (results/zeroshot_plus_layers)
    with pytest.raises(ValueError, match="gate_std=0 with write_gate=rescale"):      # before the teacher pass
        calibrate.INITS["taylor"](hybridize(tiny_model("llama"), [1]), None, None, {"gate_std": 0})


# A value other than the default for every option, each valid alone (resolve checks it).
OTHER_VALUE = {"seed": 5, "gate_std": 0.05, "a_max": 8.0, "dt_min": 2e-3, "dt_max": 0.05, "dt_floor": 0.01,
               "dist_floor": 2.0, "conc_eps": 0.5, "gamma_min": 1e-2, "gamma_max": 2.0, "beta_min": 0.2,
               "beta_span": 0.6, "write_gate": "bias", "ridge": 0.5, "sigma_min": 0.5, "sigma_max": 2.0,
               "damping": 0.5, "out_gate": "fit", "gate_ridge": 1e-2, "gate_shrinks": "0.5", "dt_from": "distance_nosink",
               "gates_from": "naive", "gate_search": 1, "gamma_grid": "0.1,1", "beta_grid": "0.2,0.8", "a_proj": "zero",
               "steps": 2, "lr_qkv": 1e-2, "lr_gates": 1e-2, "weight_decay": 0.5, "clip": 0.01, "train_out": 1,
               "keep_best": 0, "val_rows": 1, "phase2_input": "student", "correction": 0.5}


@pytest.mark.parametrize("init", list(calibrate.INITS))
def test_an_option_an_init_does_not_read_changes_nothing(init):
    """calibrate.reads, which convert.py refuses options by: each option outside an init's set, set
    to another value, leaves the hybrid bitwise as it was (a wrong set would refuse an option that
    does something). Phase 2 runs 2 steps, so its options can show."""
    assert set(OTHER_VALUE) == set(calibrate.OPTIONS)
    teacher, ids = tiny_model("llama"), calib(n=3)
    base = {"steps": 2} if "steps" in calibrate.reads(init) else {}
    want = convert.convert(teacher, [0], init, ids, init_opts=base)[0].state_dict()
    unread = [k for k in calibrate.OPTIONS if k not in calibrate.reads(init)]
    assert bool(unread) == (calibrate.INIT_PHASES.get(init) != (True, True))       # (both phases read all)
    assert set(calibrate.STANDARD_OPTIONS) <= calibrate.reads(init)
    for k in unread:
        got = convert.convert(teacher, [0], init, ids, init_opts={**base, k: OTHER_VALUE[k]})[0].state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want), (init, k)
        with pytest.raises(ValueError, match=f"--init-opt {k} "):
            calibrate.check_read([init], {k: OTHER_VALUE[k]})
    for k in calibrate.reads(init):
        calibrate.check_read([init], {k: OTHER_VALUE[k]})
        if init not in calibrate.INIT_PHASES:         # (the values above are ones that show)
            got = convert.convert(teacher, [0], init, ids, init_opts={k: OTHER_VALUE[k]})[0].state_dict()
            assert got.keys() != want.keys() or not all(torch.equal(got[n], want[n]) for n in want), (init, k)


def test_phase1_edge_cases(monkeypatch):
    """A uniform draw of exactly 0 for A = exp(A_log) gives a finite A_log (not log 0 = -inf, which
    Phase 2's finiteness check would then blame on its learning rates); with gates_from=naive the record
    holds no targets (none was applied); one calibration token gives a zero spread of beta, not NaN;
    a Phase 1 that fails leaves the layer as it came in."""
    teacher = tiny_model("llama")
    gdn = gdn_modules(hybridize(copy.deepcopy(teacher), [1]))[1]
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "uniform_", lambda self, *a, **k: self.zero_())
        gdn.reset_parameters()
        assert torch.isfinite(gdn.A_log).all()
        with torch.no_grad():
            calibrate._standard_gates(gdn, calibrate.resolve({}))
        assert torch.isfinite(gdn.A_log).all()
    ids = calib(n=1, length=2)          # (collect_stats needs two positions: its statistics cut to one)
    stats = taylor_stats.collect_stats(teacher, ids, layers=[1], progress=False)
    stats[1] = {k: v[:, :1] if k in ("x", "y", "ctx", "h") else v for k, v in stats[1].items()}
    student = hybridize(copy.deepcopy(teacher), [1])
    info = calibrate.INITS["taylor-phase1"](student, teacher, ids, {"_stats": stats, "gates_from": "naive"})
    p1 = info["layers"][1]["phase1"]
    assert p1["gamma"] is None and p1["beta_target"] is None and p1["beta_token_std"] == [0.0] * 4
    gdn = gdn_modules(student)[1]
    before = {k: v.clone() for k, v in gdn.state_dict().items()}
    monkeypatch.setattr(calibrate, "_softplus_inv", lambda y: y * float("nan"))
    with pytest.raises(ValueError, match="Phase 1 produced non-finite"), torch.no_grad():
        calibrate.phase1(gdn, stats[1], calibrate.resolve({}))
    assert all(torch.equal(v, gdn.state_dict()[k]) for k, v in before.items())
    monkeypatch.undo()
    with pytest.raises(ValueError, match="write_gate=bias needs GDN layers with a bias"), torch.no_grad():
        calibrate.phase1(gdn, stats[1], calibrate.resolve({"write_gate": "bias"}))
    assert all(torch.equal(v, gdn.state_dict()[k]) for k, v in before.items())


def test_every_constant_is_an_option():
    """METHOD: every constant of the reference is a named option. The standard init's and the
    statistics' constants reach what they set; statistics collected with another distance floor are
    refused rather than silently used."""
    teacher, ids = tiny_model("llama"), calib(length=64)
    student = hybridize(tiny_model("llama"), [1])
    calibrate.INITS["naive"](student, teacher, ids, calibrate.parse_opts(["gate_std=0", "a_max=1", "dt_floor=0.5"]))
    gdn = gdn_modules(student)[1]
    assert torch.all(gdn.a_proj.weight == 0) and torch.all(gdn.A_log <= 0)
    assert torch.allclose(torch.nn.functional.softplus(gdn.dt_bias), torch.tensor(0.5))
    stats = taylor_stats.collect_stats(teacher, ids, progress=False, floor=2.0)
    assert stats[1]["floor"] == 2.0 and torch.all(stats[1]["distance"] >= 2.0)
    with pytest.raises(ValueError, match="distance floor \\[2.0\\], not dist_floor=0.5"):
        calibrate.INITS["taylor-phase1"](student, teacher, ids, {"_stats": stats})
    one = calibrate.INITS["taylor-phase1"](student, teacher, ids, {"_stats": stats, "dist_floor": 2.0})
    wide = calibrate.INITS["taylor-phase1"](student, teacher, ids, {"_stats": stats, "dist_floor": 2.0,
                                                                    "conc_eps": 1e6})
    # a huge conc_eps makes every head "equally concentrated": one write strength for the whole layer
    spread = [max(r["layers"][1]["phase1"]["beta_target"]) - min(r["layers"][1]["phase1"]["beta_target"])
              for r in (one, wide)]
    assert spread[0] > 1e-2 and spread[1] < 1e-5, spread


def test_student_input_alignment_refuses_sandwich_norms():
    """phase2_input=student corrects the target by the residual stream's error, which only means
    something where the layer adds its attention output to the stream as it is (not Gemma's)."""
    with pytest.raises(ValueError, match="Gemma-style post-attention norm"):
        convert.convert(tiny_model("gemma3_text"), [0], "align-only", calib(),
                        init_opts=calibrate.parse_opts(["phase2_input=student", "steps=2"]))
    convert.convert(tiny_model("llama"), [0], "align-only", calib(),
                    init_opts=calibrate.parse_opts(["phase2_input=student", "steps=2"]))


@pytest.mark.parametrize("o_bias", [False, True])
def test_zero_gate_is_the_teacher_without_those_attention_layers(o_bias):
    """zero-gate (calibrate.py): W_g = 0 closes every output gate, so the hybrid computes what the
    teacher computes with the converted layers' attention output replaced by 0 -- or by W_o's bias,
    where o_proj has one (a Llama with attention_bias and random biases, so that they show). The
    teacher side is run with forward hooks on its attention modules that do just that."""
    from transformers import AutoModelForCausalLM
    config = tiny_config("llama")
    config.attention_bias = o_bias
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(config).eval()
    if o_bias:
        with torch.no_grad():
            for layer in teacher.model.layers:
                layer.self_attn.o_proj.bias.normal_(0, 0.5)
    ids = calib()
    student, _ = convert.convert(teacher, [0, 2], "zero-gate")
    naive, _ = convert.convert(teacher, [0, 2], "naive")
    with torch.no_grad():
        got, full, other = student(ids).logits, teacher(ids).logits, naive(ids).logits
    def removed(module, args, out):
        bias = module.o_proj.bias
        return (torch.zeros_like(out[0]) + (0 if bias is None else bias),) + tuple(out[1:])
    hooks = [teacher.model.layers[i].self_attn.register_forward_hook(removed) for i in (1, 3)]
    try:
        with torch.no_grad():
            want = teacher(ids).logits
    finally:
        for h in hooks:
            h.remove()
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(want, full, atol=1e-3) and not torch.allclose(want, other, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Policies
# ---------------------------------------------------------------------------------------------

def probe_ppl(model, probe):
    """exp(mean next-token NLL) over the probe rows, each row one window."""
    with torch.no_grad():
        logits = model(probe).logits[:, :-1].double()
    return math.exp(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), probe[:, 1:].reshape(-1)).item())


def test_policies_on_a_tiny_model():
    """AR's score of layer i is the probe perplexity of the teacher without layer i's attention (here:
    its W_o zeroed, so the attention adds nothing to the residual stream) minus the teacher's; AR keeps
    the largest. GA-S2's score of layer i is the probe perplexity of the student keeping layer i alone
    as softmax, that init run directly (the scores differ layer to layer, so a score of the wrong layer
    shows); GA-S2 keeps the lowest, and its bank builds the same student as the init run directly."""
    teacher = tiny_model("llama", layers=6)
    ids, probe = calib(), calib(seed=2)
    ar = convert._ar_scores(teacher, probe)
    assert len(ar["scores"]) == 6
    base = probe_ppl(teacher, probe)
    assert ar["base_ppl"] == pytest.approx(base, rel=1e-5)
    for i in range(6):
        cut = copy.deepcopy(teacher)
        with torch.no_grad():
            cut.model.layers[i].self_attn.o_proj.weight.zero_()
        assert ar["scores"][i] == pytest.approx(probe_ppl(cut, probe) - base, abs=1e-3), i
    assert min(abs(s) for s in ar["scores"]) > 0.1                        # every layer matters: the test bites
    kept = convert.choose_layers(6, ("fraction", 1 / 3), "ar", ar["scores"])
    assert len(kept) == 2 and set(kept) == set(sorted(range(6), key=lambda i: -ar["scores"][i])[:2])
    bank, per_layer, _ = convert._layer_bank(teacher, "taylor-phase1", ids)
    ga = convert._ga_scores(teacher, probe, bank)
    assert len(ga["scores"]) == 6 and all(math.isfinite(s) for s in ga["scores"])
    stats = taylor_stats.collect_stats(teacher, ids, progress=False)      # one teacher pass for the six
    for i in range(6):
        alone, _ = convert.convert(teacher, [i], "taylor-phase1", ids, init_opts={"_stats": stats})
        assert ga["scores"][i] == pytest.approx(probe_ppl(alone, probe), rel=1e-5), i
    assert min(abs(a - b) for j, a in enumerate(ga["scores"]) for b in ga["scores"][:j]) > 1e-3   # the test bites
    kept = convert.choose_layers(6, ("fraction", 1 / 3), "ga-s2", ga["scores"])
    assert kept == sorted(sorted(range(6), key=lambda i: ga["scores"][i])[:2])
    # a bank-built student equals the same init run directly (layer-wise inits)
    direct, _ = convert.convert(teacher, kept, "taylor-phase1", ids)
    banked = convert._from_bank(teacher, kept, bank)
    with torch.no_grad():
        assert torch.allclose(direct(probe).logits, banked(probe).logits, atol=1e-5)


def test_policy_bad_input():
    with pytest.raises(ValueError, match="valid: uniform, ar, ga-s2"):
        convert.choose_layers(6, ("fraction", 0.5), "random")
    with pytest.raises(ValueError, match=r"\[6\], out of range"):          # named, not just counted
        convert.choose_layers(6, ("list", list(range(7))), "uniform")
    with pytest.raises(ValueError, match="needs one score per layer"):
        convert.choose_layers(6, ("fraction", 0.5), "ar", None)


def test_policies_keep_the_uniform_count_and_never_prefer_nan():
    """A fraction keeps as many layers under AR and GA-S2 as the uniform rule does, so that policies
    compare at equal K (1/4 of 10: layers 0, 4, 8, so 3, where round(10/4) would be 2); a NaN or
    missing score (a probe that diverged) is chosen by neither policy."""
    scores = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0, 4.0, 6.0, 0.5]
    assert convert.choose_layers(10, ("fraction", 0.25), "ar", scores) == [2, 4, 6]
    assert convert.choose_layers(10, ("fraction", 0.25), "ga-s2", scores) == [1, 5, 9]
    odd = [float("nan"), 1.0, 2.0, None]
    assert convert.choose_layers(4, ("fraction", 0.5), "ar", odd) == [1, 2]
    assert convert.choose_layers(4, ("fraction", 0.5), "ga-s2", odd) == [1, 2]


def test_scores_cache_key_names_what_the_scores_depend_on():
    """Cached policy scores are reused only for the same probe tokens (another text of the same shape,
    even the same tokens in another order, is scored afresh) and, for GA-S2, the same probe init
    options and seed (_ga_key)."""
    teacher, calls, cache = tiny_model("llama"), [], {}

    def compute():
        calls.append(1)
        return {"scores": [float(len(calls))] * 4}
    a, b = calib(seed=2), calib(seed=3)
    shuffled = a.flatten()[torch.randperm(a.numel(), generator=torch.Generator().manual_seed(0))].view_as(a)
    ga = convert._ga_key
    for probe, extra in ((a, ""), (a, ""), (b, ""), (shuffled, ""), (a, ga("taylor", {}, 0)), (a, ga("taylor", {}, 1)),
                         (a, ga("taylor", {"steps": 5}, 0)), (a, ga("taylor", {}, 0))):
        convert._policy_scores("ga-s2", teacher, "t", probe, cache, extra, compute)
    assert len(calls) == len(cache) == 6
    # ... and the teacher's weights, not only its name: a folder's weights can change under its path
    other = tiny_model("llama", seed=1)
    convert._policy_scores("ga-s2", other, "t", a, cache, "", compute)
    convert._policy_scores("ga-s2", other, "t", a, cache, "", compute)
    assert len(calls) == len(cache) == 7
    assert distill.weights_digest(tiny_model("llama")) == distill.weights_digest(teacher) != distill.weights_digest(other)


def test_inits_without_phase2_are_layerwise_whatever_phase2_input_says():
    """A layer-wise init sets each layer from teacher-forced data alone. phase2_input=student makes a
    Phase 2 depend on the layers before it, but naive, zero-gate and taylor-phase1 run no Phase 2: they
    stay layer-wise, so GA-S2 can probe with them (the cheap --probe-init the help suggests)."""
    student_fed = {"phase2_input": "student"}
    assert all(calibrate.layerwise(i) for i in calibrate.INITS)
    assert [i for i in calibrate.INITS if calibrate.layerwise(i, student_fed)] == ["naive", "zero-gate", "taylor-phase1"]


def test_policy_probe_is_the_block_after_the_calibration_tokens(tokenizer, tmp_path):
    """calib_ids: the calibration tokens are the text's first calib_seqs x calib_len tokens, and the
    policies' probe (part=1) the same number right after them, never the tokens an init is fitted on."""
    from types import SimpleNamespace
    import distill
    path = tmp_path / "c.txt"
    path.write_text(" ".join(f"word{i}" for i in range(200)))
    args = SimpleNamespace(calib_data=str(path), calib_seqs=2, calib_len=16)
    ids = tokenizer(distill.read_text(str(path), "auto"), add_special_tokens=False)["input_ids"]
    assert convert.calib_ids(args, tokenizer).tolist() == [ids[:16], ids[16:32]]
    assert convert.calib_ids(args, tokenizer, part=1).tolist() == [ids[32:48], ids[48:64]]


def texts(tmp_path):
    """A calibration text and a held-out one, for the command-line tests."""
    text, held = tmp_path / "calib.txt", tmp_path / "eval.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 400)
    held.write_text("A slow red hen walks under the busy cat. " * 400)
    return text, held


def an_hour_long(monkeypatch, module, name):
    """module.name made to take an hour on convert.py's clock, so a record tells the time it took
    apart from the rest however loaded the machine is. Returns the clock's jump so far [seconds]."""
    import types
    jump, real = [0.0], getattr(module, name)
    monkeypatch.setattr(convert, "time", types.SimpleNamespace(time=lambda: time.time() + jump[0],
                                                               perf_counter=time.perf_counter))

    def slow(*a, **k):
        jump[0] += 3600.0
        return real(*a, **k)
    monkeypatch.setattr(module, name, slow)
    return jump


def test_ga_s2_init_seconds_leave_out_the_probes(teacher_dir, tmp_path, monkeypatch):
    """A GA-S2 hybrid assembled from the probes' layer bank records what its own init cost (as a
    --table cell does), not the probes, which are made to take an hour."""
    text, held = texts(tmp_path)
    jump = an_hour_long(monkeypatch, convert, "_ga_scores")
    assert convert.main(["--teacher", teacher_dir, "--keep", "1/2", "--calib-data", str(text), "--eval-data", str(held),
                         "--calib-seqs", "2", "--calib-len", "32", "--window", "64", "--max-windows", "1", "--no-sample",
                         "--policy", "ga-s2", "--init", "taylor-phase1", "--out", str(tmp_path / "o")]) == 0
    rec = json.loads((tmp_path / "o" / "conversion.json").read_text())
    assert jump[0] == 3600.0 and rec["total_seconds"] > 3600 and 0 < rec["init_seconds"] < 3600


def test_init_seconds_count_the_statistics_pass_where_the_init_uses_it(teacher_dir, tmp_path, monkeypatch):
    """One teacher statistics pass serves GA-S2's probes and the init, or every --table cell: it is
    counted in an init's time where that init reads the statistics (taylor's, align-only's), not
    where it does not (naive's). The pass is made to take an hour."""
    text, held = texts(tmp_path)
    an_hour_long(monkeypatch, taylor_stats, "collect_stats")
    common = ["--teacher", teacher_dir, "--calib-data", str(text), "--eval-data", str(held), "--calib-seqs", "2",
              "--calib-len", "32", "--window", "64", "--max-windows", "1"]
    for init, uses in (("align-only", True), ("naive", False)):      # GA-S2 probes with another init
        out = tmp_path / init
        steps = ["--init-opt", "steps=2"] if uses else []              # (Phase 2's: naive refuses it)
        assert convert.main([*common, *steps, "--keep", "1/2", "--no-sample", "--policy", "ga-s2", "--init", init,
                             "--probe-init", "taylor-phase1", "--out", str(out)]) == 0
        rec = json.loads((out / "conversion.json").read_text())
        assert (rec["init_seconds"] > 3600) == uses, (init, rec["init_seconds"])
    stem = str(tmp_path / "table")
    assert convert.main([*common, "--table", "--keeps", "1/2", "--policies", "uniform", "--inits",
                         "naive,taylor-phase1", "--results", stem]) == 0
    cells = {c["init"]: c["init_seconds"] for c in json.loads(open(stem + ".json").read())["cells"]}
    assert cells["taylor-phase1"] > 3600 and cells["naive"] < 3600, cells


def test_cli_policy_and_scores_reuse(teacher_dir, tmp_path, capsys):
    text, held = texts(tmp_path)
    scores = tmp_path / "scores.json"
    base = ["--teacher", teacher_dir, "--keep", "1/2", "--calib-data", str(text), "--eval-data", str(held),
            "--calib-seqs", "2", "--calib-len", "32", "--window", "64", "--max-windows", "2", "--no-sample",
            "--scores", str(scores)]
    for policy in ("ar", "ga-s2"):
        assert convert.main(base + ["--policy", policy, "--init", "taylor-phase1", "--out", str(tmp_path / policy)]) == 0
    import json
    cached = json.loads(scores.read_text())
    assert {v["policy"] for v in cached.values()} == {"ar", "ga-s2"}
    rec = json.loads((tmp_path / "ga-s2" / "conversion.json").read_text())
    assert rec["policy"]["name"] == "ga-s2" and len(rec["policy"]["scores"]) == 4
    assert "stats" in rec["init_info"] and "layers" in rec["init_info"]
    gdn_layers = [str(i) for i in rec["gdn_layers"]]                # the bank's record, of these layers only
    assert sorted(rec["init_info"]["layers"]) == sorted(rec["init_info"]["stats"]) == gdn_layers
    hybrid = json.loads((tmp_path / "ga-s2" / "config.json").read_text())["hybrid"]
    assert len(rec["kept_layers"]) == 2 and sorted(rec["kept_layers"] + rec["gdn_layers"]) == [0, 1, 2, 3]
    assert hybrid["kept_layers"] == rec["kept_layers"] and hybrid["gdn_layers"] == rec["gdn_layers"]
    assert convert.main(base + ["--policy", "ar", "--init", "naive", "--out", str(tmp_path / "again")]) == 0
    assert json.loads(scores.read_text()) == cached       # reused, nothing new computed


@pytest.mark.parametrize("argv, message", [
    (["--init", "bogus"], "valid: naive, zero-gate, taylor-phase1, align-only, taylor, taylor-plus, align-plus"),
    (["--policy", "bogus"], "valid: uniform, ar, ga-s2"),
    (["--keep", "0/4"], "not a fraction"),
    (["--keep", ",".join(map(str, range(5)))], "[4], out of range"),
    (["--init", "taylor", "--calib-len", "100000"], "calibration text has"),
    (["--init-opt", "nope=1"], "unknown init option"),
    (["--init-opt", "seed=3"], "pass --seed instead"),
    (["--table", "--init-opt", "seed=3"], "pass --seed instead"),
    (["--table", "--keeps", "1/4,2"], "the table takes fractions"),
    (["--table", "--policies", "ga-s2", "--inits", "taylor", "--init-opt", "phase2_input=student"], "must be layer-wise"),
    (["--policy", "ga-s2", "--init-opt", "phase2_input=student"], "must be a layer-wise init"),
    (["--calib-data", "EVAL"], "hold the same text"),
    (["--calib-data", "COPY"], "hold the same text"),             # a copy of the evaluation text
    (["--probe-init", "naive"], "--probe-init is GA-S2's"),
    (["--policy", "ga-s2", "--probe-init", "nope"], "unknown --probe-init 'nope'; valid: same, naive"),
    (["--seed", str(2**64)], "--seed must fit in 64 bits"),
    (["--table", "--probe-init", "naive"], "--table does not read --probe-init"),
    (["--scores", "s.json"], "--policy uniform measures none"),
    (["--keep", "0,2", "--policy", "ar"], "names the kept layers itself: --policy ar would choose none"),
    (["--table", "--keeps", "1/2,0.5"], "names 0.5 twice"),
    (["--table", "--inits", "naive,taylor,naive"], "names naive twice"),
    (["--table", "--append", "--overwrite"], "give one"),
    (["--init", "naive", "--init-opt", "steps=3"], "--init-opt steps (Phase 2's): naive never reads it"),
    (["--init", "zero-gate", "--init-opt", "damping=1", "--init-opt", "dist_floor=1", "--init-opt", "write_gate=bias"],
     "--init-opt damping (Phase 1's), dist_floor (the statistics'): zero-gate never reads them"),
    (["--init", "taylor-phase1", "--init-opt", "val_rows=1"], "taylor-phase1 never reads it"),
    (["--init", "align-plus", "--init-opt", "out_gate=fit"], "out_gate (Phase 1's): align-plus never reads"),
    (["--policy", "ga-s2", "--init", "naive", "--probe-init", "taylor-phase1", "--init-opt", "lr_qkv=1e-3"],
     "naive and taylor-phase1 never read it"),
    (["--table", "--policies", "uniform", "--scores", "s.json"], "--policies uniform measures none"),
])
def test_cli_bad_input(argv, message, teacher_dir, tmp_path, capsys):
    text, calib = tmp_path / "t.txt", tmp_path / "c.txt"
    text.write_text("Some text for the test. " * 300)
    calib.write_text("Other words to fit the init. " * 300)
    out = tmp_path / "out"
    (tmp_path / "copy.txt").write_text(text.read_text())
    argv = [str(text) if a == "EVAL" else str(tmp_path / "copy.txt") if a == "COPY" else a for a in argv]
    mode = (["--results", str(tmp_path / "table")] if "--table" in argv else
            ["--no-sample", "--out", str(out)])                  # each mode's own flags only
    try:
        code = convert.main(["--teacher", teacher_dir, "--eval-data", str(text), "--calib-data", str(calib),
                             "--window", "64"] + mode + argv)
    except SystemExit as e:                                         # refused while parsing the arguments
        code = e.code
    assert code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_table_mode_with_append(teacher_dir, tmp_path, capsys):
    """--table's cells, and --append's rules for what may join a table. Each cell's perplexity is its
    own hybrid's, not the teacher's: the naive cells' hybrids (seeded per layer) are rebuilt here."""
    text, calib = tmp_path / "t.txt", tmp_path / "c.txt"
    text.write_text("Another sentence, for the table test. " * 400)
    calib.write_text("A different sentence, to fit the inits. " * 400)
    stem = str(tmp_path / "zs")
    base = ["--teacher", teacher_dir, "--table", "--keeps", "1/2", "--eval-data", str(text), "--calib-data", str(calib),
            "--calib-seqs", "2", "--calib-len", "32", "--window", "64", "--max-windows", "1", "--results", stem,
            "--init-opt", "steps=5"]
    assert convert.main(base + ["--policies", "uniform,ar", "--inits", "naive,taylor"]) == 0
    assert convert.main(base + ["--policies", "ga-s2", "--inits", "taylor", "--append"]) == 0
    import json
    rec = json.loads(open(stem + ".json").read())
    assert {(c["policy"], c["init"]) for c in rec["cells"]} == {("uniform", "naive"), ("uniform", "taylor"),
                                                                ("ar", "naive"), ("ar", "taylor"), ("ga-s2", "taylor")}
    md = open(stem + ".md").read()
    assert "| taylor |" in md and "keep 1/2 ga-s2" in md
    teacher, tok, _ = convert.load_teacher(teacher_dir)
    ids = distill.tokenize(tok, distill.read_text(str(text)))
    for c in rec["cells"]:
        # a random tiny teacher and its hybrids all sit near the uniform perplexity: 0.1 % apart
        assert c["ppl"]["ppl"] != pytest.approx(rec["teacher_ppl"]["ppl"], rel=2e-4), c
        if c["init"] == "naive":
            student, _ = convert.convert(teacher, c["kept_layers"], "naive")
            want = distill.perplexity(student, ids, window=64, max_windows=1)["ppl"]
            tol = 2e-2 if torch.cuda.is_available() else 1e-5  # (on a GPU the table measured in bf16)
            assert c["ppl"]["ppl"] == pytest.approx(want, rel=tol), c
    # Cells measured with another window would not compare: --append refuses, and the table stays.
    other = [a if a != "64" else "48" for a in base]
    assert convert.main(other + ["--policies", "uniform", "--inits", "naive", "--append"]) == 2
    assert "another window" in capsys.readouterr().err and json.loads(open(stem + ".json").read()) == rec
    # Nor the same file read as another text (--eval-format: WikiText's row convention or not).
    assert rec["eval_format"] == "plain"
    assert convert.main(base + ["--policies", "uniform", "--inits", "naive", "--eval-format", "wikitext",
                                "--append"]) == 2
    assert "another eval_format" in capsys.readouterr().err and json.loads(open(stem + ".json").read()) == rec
    # Nor would cells of the same init under other options: they would pass for the same init.
    assert convert.main(base + ["--policies", "uniform", "--inits", "taylor", "--init-opt", "write_gate=bias",
                                "--append"]) == 2
    assert "another init_opts" in capsys.readouterr().err and json.loads(open(stem + ".json").read()) == rec
    # Nor cells of GDN layers with a short conv.
    assert convert.main(base + ["--policies", "uniform", "--inits", "naive", "--conv-size", "4", "--append"]) == 2
    assert "another conv_size" in capsys.readouterr().err and json.loads(open(stem + ".json").read()) == rec
    # Nor a teacher whose weights changed under the same path (its name is all the other checks see).
    import shutil
    from transformers import AutoModelForCausalLM
    moved = tmp_path / "moved"
    shutil.copytree(teacher_dir, moved)
    cells = [str(moved) if a == teacher_dir else stem + "_moved" if a == stem else a for a in base]
    cells += ["--policies", "uniform", "--inits", "naive"]
    assert convert.main(cells) == 0
    model = AutoModelForCausalLM.from_pretrained(moved)
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    model.save_pretrained(moved)
    before = open(stem + "_moved.json").read()
    assert convert.main(cells + ["--append"]) == 2
    assert "another teacher_weights" in capsys.readouterr().err and open(stem + "_moved.json").read() == before
    # An option spelled out at its default changes nothing, so it may join; but not where it undoes a
    # preset: taylor-plus with the reference's write gate would pass for taylor-plus. (Once joined, the
    # table records the option: true of every cell, so taylor-plus cells under it may join then.)
    before = open(stem + ".json").read()
    assert convert.main(base + ["--policies", "uniform", "--inits", "naive,taylor-plus", "--init-opt",
                                "write_gate=rescale", "--append"]) == 2
    assert "another init_opts" in capsys.readouterr().err and open(stem + ".json").read() == before
    assert convert.main(base + ["--policies", "uniform", "--inits", "naive", "--init-opt", "write_gate=rescale",
                                "--append"]) == 0
    # The texts are matched by their tokens: the same text under another path joins; another text
    # under the same path does not (the table would mix two texts' perplexities).
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(text, tmp_path / "elsewhere" / "t.txt")
    shutil.copy(calib, tmp_path / "elsewhere" / "c.txt")
    moved_text = [str(tmp_path / "elsewhere" / "t.txt") if a == str(text) else
                  str(tmp_path / "elsewhere" / "c.txt") if a == str(calib) else a for a in base]
    assert convert.main(moved_text + ["--policies", "uniform", "--inits", "naive", "--append"]) == 0
    text.write_text("A third sentence, which no cell was measured on. " * 400)
    assert convert.main(base + ["--policies", "uniform", "--inits", "naive", "--append"]) == 2
    assert "another --eval-data text" in capsys.readouterr().err
    # In a table of their own they are fine, and say so (write_gate=bias: GDN layers with a bias on W_b).
    own = [a if a != stem else stem + "_bias" for a in base]
    assert convert.main(own + ["--policies", "uniform", "--inits", "taylor", "--init-opt", "write_gate=bias"]) == 0
    assert "Init options (--init-opt) in every cell: steps=5, write_gate=bias." in open(stem + "_bias.md").read()
    assert not os.path.exists(stem + "_bias_scores.json")                  # uniform alone: no scores to keep
    # The table's one teacher pass measures distances with the cells' dist_floor (calibrate checks it).
    floor = [a if a != stem else stem + "_floor" for a in base]
    assert convert.main(floor + ["--policies", "uniform", "--inits", "taylor-phase1", "--init-opt", "dist_floor=2"]) == 0
    assert min(min(s["distance"]) for s in json.loads(open(stem + "_floor.json").read())["stats"].values()) >= 2


def test_layer_ablation_records_each_variants_seed(teacher_dir, tmp_path):
    """calibrate.py's per-layer ablation: a row per (variant, layer), each with the seed its variant
    ran with, and the record's seed the set of them (not the option's default). Its held-out MSEs are
    measured on the held-out block (the calibration block's next 32 tokens): here recomputed from the
    same init run by convert.convert and the teacher's layer-1 attention hooked on those tokens (Phase 1
    only, so start and end are the same layer), and they differ from the MSE on the fitted block."""
    import json
    text = tmp_path / "calib.txt"
    text.write_text("the cat sat on the mat and the dog sat on the log. " * 60)
    out = tmp_path / "ablation"
    assert calibrate.main(["--teacher", teacher_dir, "--layers", "1", "--calib-data", str(text), "--calib-seqs", "1",
                           "--calib-len", "32", "--variants", "taylor-phase1", "taylor-phase1:seed=3",
                           "--out", str(out)]) == 0
    r = json.loads((tmp_path / "ablation.json").read_text())
    assert [(row["variant"], row["seed"]) for row in r["rows"]] == [("taylor-phase1", 0), ("taylor-phase1:seed=3", 3)]
    assert r["seed"] == [0, 3] and r["complete"] is True and not (tmp_path / "ablation.md").read_text().startswith("**")
    assert all(row["beta_off"] >= 0 and row["beta_token_std"] > 0 for row in r["rows"])     # Phase 1's write gate
    assert "off target, token std" in (tmp_path / "ablation.md").read_text()
    teacher, tok, _ = convert.load_teacher(teacher_dir)
    blocks = distill.tokenize(tok, text.read_text())[:64].view(2, 1, 32)           # fitted on, held out
    io = {}
    hook = teacher.model.layers[1].self_attn.register_forward_hook(
        lambda m, args, kwargs, out: io.update(x=kwargs["hidden_states"], y=out[0]), with_kwargs=True)
    for row in r["rows"]:
        student, _ = convert.convert(teacher, [0, 2, 3], "taylor-phase1", blocks[0],
                                     init_opts=calibrate.parse_opts([f"seed={row['seed']}"]))
        mse = []
        for block in blocks:
            with torch.no_grad():
                teacher(block)
                mse.append(F.mse_loss(gdn_modules(student)[1](io["x"])[0], io["y"]).item())
        assert row["held_mse_start"] == pytest.approx(mse[1], rel=1e-4), (row, mse)
        assert row["held_mse_end"] == pytest.approx(mse[1], rel=1e-4), (row, mse)
        assert mse[0] != pytest.approx(mse[1], rel=1e-2)                                  # the test bites
    hook.remove()
    # Fitting on the student's own inputs needs the layers before converted: not this ablation's.
    other = tmp_path / "other"
    assert calibrate.main(["--teacher", teacher_dir, "--layers", "1", "--calib-data", str(text), "--variants",
                           "taylor:phase2_input=student", "--out", str(other)]) == 2
    assert not (tmp_path / "other.json").exists()


def test_ablation_keeps_the_variants_done_when_one_fails(teacher_dir, tmp_path, capsys):
    """A variant that fails (here Phase 2 diverging to non-finite weights: refused, never kept) ends
    calibrate.py with one line, and the report already holds every variant finished before it. A
    seed past int64 once the per-layer offset is added still seeds."""
    import json
    text = tmp_path / "calib.txt"
    text.write_text("the cat sat on the mat and the dog sat on the log. " * 60)
    out = tmp_path / "ablation"
    assert calibrate.main(["--teacher", teacher_dir, "--layers", "1", "--calib-data", str(text), "--calib-seqs", "2",
                           "--calib-len", "32", "--variants", "taylor-phase1:seed=1000000000000000",
                           "align-only:steps=20:lr_qkv=1000:lr_gates=1000:keep_best=0", "--out", str(out)]) == 2
    assert "Phase 2 diverged to non-finite" in capsys.readouterr().err
    r = json.loads((tmp_path / "ablation.json").read_text())
    assert [row["variant"] for row in r["rows"]] == ["taylor-phase1:seed=1000000000000000"]
    assert r["complete"] is False and len(r["variants"]) == 2                   # marked partial, both names
    md = (tmp_path / "ablation.md").read_text()
    assert md.startswith("**Partial**: 1 of the 2") and "| align-only" not in md


def test_statistics_script_writes_what_collect_stats_measures(teacher_dir, tmp_path, capsys):
    """taylor_stats.py's JSON: every layer's per-head statistics as collect_stats gives them on the
    same calibration tokens (the built-in text, its first calib_seqs x calib_len), with the run's
    record; and a line per layer printed."""
    from types import SimpleNamespace
    out = tmp_path / "stats.json"
    assert taylor_stats.main(["--teacher", teacher_dir, "--calib-seqs", "2", "--calib-len", "24", "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("distance") == 4
    record = json.loads(out.read_text())
    teacher, tok, _ = convert.load_teacher(teacher_dir)
    ids = convert.calib_ids(SimpleNamespace(calib_data=None, calib_seqs=2, calib_len=24), tok)
    want = taylor_stats.summary(taylor_stats.collect_stats(teacher, ids, keep_io=False, progress=False))
    assert record["calib"] == [2, 24] and record["commit"] and sorted(record["stats"]) == ["0", "1", "2", "3"]
    for i, layer in want.items():
        for k, v in layer.items():
            assert record["stats"][str(i)][k] == pytest.approx(v, rel=1e-4, abs=1e-5), (i, k)
    assert len(set(record["stats"]["1"]["distance"])) == 4                  # heads measured apart


def test_ablation_and_statistics_scripts_refuse_bad_input(teacher_dir, tmp_path, capsys):
    """calibrate.py and taylor_stats.py: one line (or argparse's exit) for bad layers, variants, sizes
    and outputs; nothing written."""
    base = ["--teacher", teacher_dir, "--out", str(tmp_path / "a")]
    for argv, message in ((["--layers", "9"], "out of range: the teacher has 4 layers"),
                          (["--layers", "abc"], "not a comma-separated list"), (["--layers", "1,1"], "twice"),
                          (["--variants", "taylor:steps"], "variant 'taylor:steps': option 'steps' is not NAME=VALUE"),
                          (["--variants", "taylor", "align-only", "taylor"], "names one variant twice"),
                          (["--variants", "align-only:val_rows=4"], "val_rows=4 must leave at least one of the "
                                                                    "--calib-seqs 4"),
                          (["--variants", "taylor-phase1:steps=3"], "variant 'taylor-phase1:steps=3': option steps "
                                                                    "(Phase 2's): taylor-phase1 never reads it")):
        assert calibrate.main(base + argv) == 2
        assert message in capsys.readouterr().err
    (tmp_path / "dir").mkdir()
    assert taylor_stats.main(["--teacher", teacher_dir, "--out", str(tmp_path / "dir")]) == 2
    assert "is a folder" in capsys.readouterr().err
    for bad in ("", str(tmp_path / "newdir") + "/"):
        assert taylor_stats.main(["--teacher", teacher_dir, "--out", bad]) == 2
        assert "names no file" in capsys.readouterr().err
        assert calibrate.main(["--teacher", teacher_dir, "--out", bad]) == 2                 # a stem: .json, .md
        assert "names no file stem" in capsys.readouterr().err
    for main in (calibrate.main, taylor_stats.main):
        with pytest.raises(SystemExit):
            main(base + ["--calib-seqs", "0"])
        assert "--calib-seqs must be >= 1" in capsys.readouterr().err
    # an output over an input, even under --overwrite: the calibration text, the teacher's config
    text = tmp_path / "dir" / "calib.md"                      # (calibrate.py writes a stem's .md and .json)
    text.write_text("Calibration text. " * 50)
    config = open(os.path.join(teacher_dir, "config.json")).read()
    link = tmp_path / "linked"                     # a hub-cache snapshot: its files are links to blobs
    link.mkdir()
    os.symlink(os.path.join(teacher_dir, "config.json"), link / "config.json")
    for main, out, message in ((taylor_stats.main, str(text), "is the calibration text"),
                               (calibrate.main, str(text)[:-3], "is the calibration text"),
                               (taylor_stats.main, os.path.join(teacher_dir, "config.json"), "a file of the teacher"),
                               (calibrate.main, os.path.join(teacher_dir, "config"), "a file of the teacher"),
                               (taylor_stats.main, str(link / "config.json"), "a file of the teacher")):
        teacher = str(link) if "linked" in out else teacher_dir
        assert main(["--teacher", teacher, "--out", out, "--overwrite", "--calib-data", str(text)]) == 2
        assert message in capsys.readouterr().err
    assert open(os.path.join(teacher_dir, "config.json")).read() == config and (link / "config.json").is_symlink()
    link.joinpath("config.json").unlink()
    link.rmdir()
    assert [p.read_text() for p in (tmp_path / "dir").iterdir()] == ["Calibration text. " * 50]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir"]
    # An earlier result (the default --out is a committed one) is kept unless --overwrite says otherwise.
    for main, name in ((calibrate.main, "a.md"), (taylor_stats.main, "a")):
        (tmp_path / name).write_text("earlier")
        assert main(base) == 2 and "already exists: pass --overwrite" in capsys.readouterr().err
        assert (tmp_path / name).read_text() == "earlier"
        (tmp_path / name).unlink()


def test_the_library_refuses_what_the_command_line_never_passes():
    """Called from Python, the inits, the phases and collect_stats say what is wrong rather than
    running on: an option's typo (which would fall back to its default), a student with no GDN layer
    (nothing would change), a teacher that hybridize turned into the student (it converts in place),
    sequences of one token (every distance 0.5), fractional layer indices, a target of another shape.
    (A hybrid with every layer kept is a hybrid: its init does nothing, rightly.)"""
    teacher, ids = tiny_model("llama"), calib()
    with pytest.raises(ValueError, match="unknown init option step; the options are seed, "):
        calibrate.INITS["align-only"](hybridize(copy.deepcopy(teacher), [1]), teacher, ids, {"step": 2})
    with pytest.raises(ValueError, match="unknown init options lr, step"):
        calibrate.resolve({"step": 2, "lr": 1.0, "_stats": None})
    with pytest.raises(ValueError, match="the student is not a hybrid"):
        calibrate.INITS["taylor"](copy.deepcopy(teacher), teacher, ids, {"steps": 2})
    with pytest.raises(ValueError, match="the student is not a hybrid"):
        calibrate.INITS["naive"](copy.deepcopy(teacher), teacher, ids, {})
    same = hybridize(teacher, [1])                    # the trap: teacher and student are one model now
    for name in ("naive", "taylor"):
        with pytest.raises(ValueError, match="the teacher has GDN layers"):
            calibrate.INITS[name](same, same, ids, {"steps": 2})
    with pytest.raises(ValueError, match=r"layers \[1\] of this model are GDN layers"):
        taylor_stats.collect_stats(same, ids, layers=[0, 1], progress=False)

    teacher = tiny_model("llama")
    for bad, said in ((ids[0][:, None], r"shape \[48, 1\]"), (ids[0], r"shape \[48\]"), (ids.float(), "shape .*float32"),
                      (ids[:0], r"shape \[0, 48\]"), (ids.tolist(), "list")):
        with pytest.raises(ValueError, match=f"input_ids must be integer token ids .*; got {said}"):
            taylor_stats.collect_stats(teacher, bad, layers=[0], progress=False)
    with pytest.raises(ValueError, match=r"whole layer indices; got \[1.5\]"):
        taylor_stats.collect_stats(teacher, ids, layers=[1.5], progress=False)
    with pytest.raises(ValueError, match="block .* got 0"):
        taylor_stats.collect_stats(teacher, ids, layers=[0], block=0, progress=False)

    st = taylor_stats.collect_stats(teacher, ids, layers=[1], progress=False)[1]
    g1 = gdn_modules(hybridize(copy.deepcopy(teacher), [1]))[1]
    with pytest.raises(ValueError, match=r"the same shape; got \[2, 48, 64\] and \[48, 64\]"):
        calibrate.phase2(g1, st["x"], st["y"][0], calibrate.resolve({"steps": 2}))
    assert calibrate.phase2(g1, st["x"], st["y"], {"steps": 2})["steps"] == 2       # a partial dict: the defaults
    assert "gamma" in calibrate.phase1(g1, st, {})
