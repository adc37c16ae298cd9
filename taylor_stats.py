"""
taylor_stats.py -- what the teacher's attention heads do, measured on held-out calibration text.

One teacher forward over calibration tokens ids [N, L] (reference: 4 x 256; never the text that
perplexity is measured on). For every layer asked for, a pre-hook on its attention module captures
the module's input x (the decoder layer's normalised hidden state: exactly what a GDN layer in that
place will see, "teacher forcing"), and a forward hook captures its output y (after W_o). Inside the
hook, the layer's attention probabilities are recomputed from the module's own weights,

    q = RoPE(qnorm(W_q x)),  k = RoPE(knorm(W_k x)),  v = W_v x       (q/k norms: Qwen3, Gemma3; the
                                                                       module's biases too: Qwen2's q,
                                                                       k, v have them, a GDN layer not)
    a_ij = softmax_j( s_ij + mask_ij ),  s_ij = scaling * q_i . k_j   (mask: causal, and for sliding-
                                                                       window layers j > i - window;
                                                                       no score softcap: Gemma 3's
                                                                       config has one, its attention
                                                                       does not apply it)

one block of query rows at a time, so memory is O(heads x block x L) per sequence, never the whole
[N, H, L, L] map of every layer at once. Grouped-query teachers: k and v heads are repeated up to the
query heads, as the GDN layer will do. From a_ij, per head h (means over sequences and query
positions i, all of them, including i = 0):

    distance       d_h = mean_i sum_{j<=i} a_ij * max(i - j, floor)   (floor 0.5: the diagonal counts
                                                                       half a token, so d_h > 0)
    entropy        H_h = mean_i ( -sum_j a_ij log a_ij )              (nats; 0 = one key, log(i+1) =
                                                                       uniform over the prefix, or
                                                                       log(window) under a sliding window)
    concentration  c_h = 1 - (H_h - min_h' H) / max(max_h' H - min_h' H, eps)   (within the layer:
                                                                       1 = its sharpest head, 0 = its
                                                                       most diffuse)
    context        T_h = sum_j a_ij v_j   [N, L, H, D]                (per-head output before W_o)

What they feed (calibrate.py's Phase 1): distance -> the memory timescale (dt_bias), concentration ->
the write gate beta, the context -> the value scale sigma and the output gate's size kappa; the
captured x and y are Phase 2's teacher-forced input and target. Beyond METHOD, for our own init: the
sink mass mean_i a_i0 (many heads park most of their attention on the first token, an "attention
sink", and read little from it) and the distance with that token left out (distance_nosink).

The recomputation is checked against the module itself: concat_h(T_h) W_o^T (+ bias) must equal
the captured y, to a relative error of CHECK_TOL (CHECK_TOL_LOW for a bf16/fp16 teacher). A mismatch
(an architecture whose attention this file does not reproduce) is an error, not a silent wrong
statistic; so is a teacher whose own attention input or output is not finite (an overflow in its
dtype, float16's at Gemma's scales), said as such.

A statistic that still comes out NaN or infinite is replaced by DEFAULTS with a warning, so nothing
downstream ever sees NaN (overflowing scores make the context NaN too, which the check above turns
into an error first). Under a sliding window (Gemma 3's local layers, Mistral) a query past the
window cannot see token 0, so its sink mass is 0 by construction: sink statistics of windowed and
global layers are not comparable.

    python taylor_stats.py --teacher default            # prints the per-layer, per-head table (and --out, results/taylor_stats.json)

(The library functions need torch and tqdm only; the command line loads its teacher and text with
convert.py and distill.py, so it runs inside the project.)
"""

import numbers
import sys
import warnings

import torch

# Fallbacks for a head whose statistics come out NaN or infinite (documented in the module docstring):
# a mid-range memory (8 tokens) and a middling entropy; concentration then follows from the others.
DEFAULTS = {"distance": 8.0, "entropy": 1.0, "sink": 0.0, "distance_nosink": 8.0}
DIST_FLOOR = 0.5          # max(i - j, DIST_FLOOR): the diagonal counts as half a token
CONC_EPS = 1e-3           # floor of the entropy spread concentration divides by (heads spread less stay
                          # in order, squeezed towards c = 1)
QUERY_BLOCK = 256         # query rows per softmax block (bounds memory for long calibration sequences)
# The families whose attention this file reproduces (gdn.SUPPORTED, repeated so that the file stands
# alone); others are refused, not measured: their attention can differ in ways the check misses.
FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma3_text")
CHECK_TOL = 2e-2          # max relative error of the recomputed attention output vs the module's;
CHECK_TOL_LOW = 5e-2      # ... for a bf16/fp16 teacher, whose own output is rounded (SmolLM2 in bf16:
                          # at most 0.003 in every run under results/)


def _lag(p, q_pos, floor):
    """lag[i, j] = max(i - j, floor) for p [H, Tq, Tk]'s query rows at positions q_pos (default:
    the last Tq of the Tk positions); keys after the query get the floor too, but a_ij = 0 there."""
    Tq, Tk = p.shape[-2:]
    if q_pos is None:
        q_pos = torch.arange(Tk - Tq, Tk, device=p.device)
    return (q_pos[:, None] - torch.arange(Tk, device=p.device)[None, :]).to(p.dtype).clamp(min=floor)


def _head_statistics(p, q_pos=None, floor=DIST_FLOOR):
    """Sums (not yet means) over query rows of distance and entropy for attention probabilities
    p [H, Tq, Tk] whose rows are queries at absolute positions q_pos [Tq] (default: the last Tq of
    the Tk positions). Returns (dist_sum [H], ent_sum [H]) in float64."""
    lag = _lag(p, q_pos, floor)
    dist = (p * lag).sum(-1)                                   # [H, Tq]: sum_j a_ij max(i-j, floor)
    ent = -torch.special.xlogy(p, p).sum(-1)                   # [H, Tq]: 0 log 0 = 0
    return dist.double().sum(-1), ent.double().sum(-1)


def _sink_statistics(p, q_pos=None, floor=DIST_FLOOR):
    """Beyond METHOD (used by our own init, calibrate.py 'taylor-plus'): many heads park most of their
    mass on the first token (an "attention sink") and read little from it; that mass inflates d_h
    (it sits i tokens back). Returns sums over query rows of the sink mass a_i0 [H] and of the
    distance with key 0 removed and the rest renormalised, sum_{0<j<=i} a_ij max(i-j, floor) /
    sum_{0<j<=i} a_ij (rows with less than 1e-6 of their mass past key 0, e.g. i = 0, count the floor)."""
    lag = _lag(p, q_pos, floor)
    rest = p[..., 1:]
    mass = rest.sum(-1)
    dist = torch.where(mass > 1e-6, (rest * lag[:, 1:]).sum(-1) / mass.clamp_min(1e-6),
                       torch.full_like(mass, floor))
    return p[..., 0].double().sum(-1), dist.double().sum(-1)


def concentration(entropy, eps=CONC_EPS):
    """c_h = 1 - (H_h - min H) / max(max H - min H, eps): the layer's sharpest head 1, its most diffuse 0."""
    lo, hi = entropy.min(), entropy.max()
    return 1.0 - (entropy - lo) / max(float(hi - lo), eps)


def sanitize(name, layer, x, default):
    """x with every NaN or infinite entry (a head whose statistic is undefined) replaced by default,
    and a warning naming the layer and heads; calibrate.py applies it again to statistics handed in."""
    bad = ~torch.isfinite(x)
    if bad.any():
        heads = bad.nonzero().flatten().tolist()
        warnings.warn(f"layer {layer}: {name} undefined (NaN/inf) for heads {heads}; using the default {default}")
        x = torch.where(bad, torch.full_like(x, default), x)
    return x


def _rotary_fn(attn):
    """The apply_rotary_pos_emb of the module's own modeling file (each family ships one)."""
    fn = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
    if fn is None:
        raise ValueError(f"{type(attn).__name__}: no apply_rotary_pos_emb in {type(attn).__module__}")
    return fn


@torch.no_grad()
def _attention_pieces(attn, x, position_embeddings):
    """q [B, H, T, D] (RoPE'd, q-normed), k and v [B, H, T, D] (GQA-repeated) of an HF attention
    module `attn` for its input x [B, T, d], recomputed exactly as its forward does."""
    B, T, _ = x.shape
    D = attn.head_dim
    q = attn.q_proj(x).view(B, T, -1, D)
    k = attn.k_proj(x).view(B, T, -1, D)
    v = attn.v_proj(x).view(B, T, -1, D)
    if getattr(attn, "q_norm", None) is not None:            # Qwen3, Gemma3: RMSNorm per head
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))           # [B, heads, T, D]
    cos, sin = position_embeddings
    q, k = _rotary_fn(attn)(q, k, cos, sin)
    rep = q.shape[1] // k.shape[1]                              # GQA: kv head j serves query heads j*rep..
    return q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)


@torch.no_grad()
def _layer_statistics(attn, x, position_embeddings, block=QUERY_BLOCK, floor=DIST_FLOOR):
    """Sums over query rows [H] of distance, entropy (and the sink statistics), and the per-head
    context T [B, L, H, D] of one attention layer, softmax computed one block of query rows at a time."""
    q, k, v = _attention_pieces(attn, x, position_embeddings)              # in the module's own dtype
    q, k, v = q.float(), k.float(), v.float()
    B, H, T, D = q.shape
    scaling = float(attn.scaling)
    window = getattr(attn, "sliding_window", None)
    config = getattr(attn, "config", None)
    if window is None and getattr(config, "model_type", None) == "mistral":
        window = config.sliding_window    # Mistral windows every layer from its config, not the module
    dist_sum = torch.zeros(H, dtype=torch.float64)
    ent_sum = torch.zeros(H, dtype=torch.float64)
    sink_sum = torch.zeros(H, dtype=torch.float64)
    dns_sum = torch.zeros(H, dtype=torch.float64)
    ctx = torch.empty(B, T, H, D, dtype=torch.float32, device=x.device)
    keys = torch.arange(T, device=x.device)
    for b in range(B):
        for i0 in range(0, T, block):
            i1 = min(T, i0 + block)
            s = (q[b, :, i0:i1] @ k[b, :, :i1].transpose(-1, -2)) * scaling      # [H, Tq, i1]
            qpos = keys[i0:i1]
            allowed = keys[None, :i1] <= qpos[:, None]                          # causal
            if window:
                allowed &= keys[None, :i1] > qpos[:, None] - window             # sliding window
            p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
            d, e = _head_statistics(p, qpos, floor)
            dist_sum += d.cpu()
            ent_sum += e.cpu()
            sk, dn = _sink_statistics(p, qpos, floor)
            sink_sum += sk.cpu()
            dns_sum += dn.cpu()
            ctx[b, i0:i1] = (p @ v[b, :, :i1]).transpose(0, 1)                  # [Tq, H, D]
    return {"distance": dist_sum, "entropy": ent_sum, "sink": sink_sum, "distance_nosink": dns_sum}, ctx


def _hidden_from(args, kwargs):
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


@torch.no_grad()
def collect_stats(model, input_ids, layers=None, keep_io=True, block=QUERY_BLOCK, floor=DIST_FLOOR,
                  progress=True):
    """One teacher forward over input_ids [N, L]; for each layer index in `layers` (default: all) a
    dict with
        distance, entropy, concentration  [H] float32 (NaN-free)
        sink, distance_nosink             [H] (beyond METHOD: see _sink_statistics)
        x    [N, L, d]    the attention module's input (teacher-forced GDN input)      (keep_io)
        y    [N, L, d]    the attention module's output, after W_o (Phase 2 target)   (keep_io)
        ctx  [N, L, H, D] per-head context softmax(a) V, GQA-expanded                  (keep_io)
        h    [N, L, d]    the residual stream entering the decoder layer               (keep_io)
        check             relative error of concat(ctx) W_o vs y (the recomputation check)
        floor             the distance floor used (calibrate's dist_floor option must match it)
    Everything float32 on the CPU (x, y, ctx, h for every calibration token would crowd the GPU).
    block: query rows per attention block (the maps are recomputed a block at a time, never whole);
    progress: show a tqdm bar over the layers."""
    from tqdm import tqdm
    family = getattr(getattr(model, "config", None), "model_type", None)
    if family not in FAMILIES:
        raise ValueError(f"unsupported architecture '{family}': supported are {', '.join(FAMILIES)}")
    dec = model.model.layers
    layers = list(range(len(dec))) if layers is None else list(layers)
    odd = [i for i in layers if isinstance(i, bool) or not isinstance(i, numbers.Real) or int(i) != i]
    if odd:
        raise ValueError(f"layers must be whole layer indices; got {odd}")
    layers = sorted(set(int(i) for i in layers))
    bad = [i for i in layers if not 0 <= i < len(dec)]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has {len(dec)} layers")
    gdn = sorted(set(layers) & set((getattr(model.config, "hybrid", None) or {}).get("gdn_layers", ())))
    if gdn:                                    # (gdn.hybridize converts in place: the teacher may be gone)
        raise ValueError(f"layers {gdn} of this model are GDN layers, not softmax attention: collect_stats "
                         f"reads a teacher (gdn.hybridize converts the model it is given in place: hybridize a copy)")
    if not (torch.is_tensor(input_ids) and input_ids.dim() == 2 and not input_ids.is_floating_point()
            and not input_ids.is_complex() and input_ids.shape[0] >= 1 and input_ids.shape[1] >= 2):
        what = (f"shape {list(input_ids.shape)}, {input_ids.dtype}" if torch.is_tensor(input_ids)
                else type(input_ids).__name__)
        raise ValueError(f"input_ids must be integer token ids [N, L] with N >= 1 sequences of L >= 2 tokens (a "
                         f"distance or entropy needs at least two positions); got {what}")
    if isinstance(block, bool) or not isinstance(block, numbers.Integral) or block < 1:
        raise ValueError(f"block (query rows per attention block) must be a whole number >= 1; got {block!r}")
    N, L = input_ids.shape
    out, captured, handles = {}, {}, []
    bar = tqdm(total=len(layers), desc="teacher stats", leave=False, disable=not progress)

    def pre_hook(i):
        def hook(module, args, kwargs):
            captured[i] = (_hidden_from(args, kwargs), kwargs.get("position_embeddings"))
        return hook

    def layer_hook(i):
        def hook(module, args, kwargs):
            captured[("h", i)] = _hidden_from(args, kwargs)
        return hook

    def post_hook(i):
        def hook(module, args, kwargs, output):
            x, pe = captured.pop(i)
            h = captured.pop(("h", i))
            if pe is None:
                raise ValueError(f"layer {i}: the attention module got no position_embeddings; "
                                 f"this transformers version/architecture is not supported")
            y = output[0] if isinstance(output, tuple) else output
            if not (bool(x.isfinite().all()) and bool(y.isfinite().all())):       # (not a failure to reproduce it)
                raise ValueError(f"layer {i}: the teacher's own attention input or output is not finite in "
                                 f"{x.dtype} (overflow): load it in float32 or bfloat16")
            sums, ctx = _layer_statistics(module, x, pe, block, floor)
            # The check: our softmax(a) V, through the module's own W_o, must give its output.
            y_hat = module.o_proj(ctx.reshape(N, L, -1).to(module.o_proj.weight.dtype)).float()
            check = ((y_hat - y.float()).norm() / y.float().norm().clamp_min(1e-12)).item()
            tol = CHECK_TOL if x.dtype in (torch.float32, torch.float64) else CHECK_TOL_LOW
            if not check <= tol:
                raise ValueError(f"layer {i}: recomputed attention output differs from the module's by "
                                 f"{check:.3g} (relative); {type(module).__name__} is not reproduced")
            mean = {k: sanitize(k, i, (v / (N * L)).float(), DEFAULTS[k]) for k, v in sums.items()}
            rec = {**mean, "concentration": concentration(mean["entropy"]), "check": check, "floor": floor}
            if keep_io:
                rec.update(x=x.float().cpu(), y=y.float().cpu(), ctx=ctx.cpu(), h=h.float().cpu())
            out[i] = rec
            bar.update(1)
        return hook

    for i in layers:
        attn = dec[i].self_attn
        handles.append(dec[i].register_forward_pre_hook(layer_hook(i), with_kwargs=True))
        handles.append(attn.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
        handles.append(attn.register_forward_hook(post_hook(i), with_kwargs=True))
    try:
        device = next(model.parameters()).device
        # Layers after the last one asked for are not needed; the forward still runs them (simple).
        model(input_ids.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        bar.close()
    return out


STAT_KEYS = ("distance", "entropy", "concentration", "sink", "distance_nosink")


def summary(stats):
    """{layer: {distance, entropy, concentration, sink, distance_nosink: [...], check}} as plain lists
    (JSON)."""
    return {int(i): {k: ([round(float(v), 5) for v in s[k]] if k != "check" else float(s[k]))
                     for k in STAT_KEYS + ("check",)}
            for i, s in stats.items()}


def main(argv=None):
    """The command line (--help): a teacher's statistics, layer by layer, as JSON and a table."""
    import argparse
    import convert
    import distill
    distill.code_version()                   # (the code this run started with, recorded at its end)
    p = argparse.ArgumentParser(description="Per-layer, per-head attention statistics of a teacher.")
    p.add_argument("--teacher", default="default")
    p.add_argument("--calib-data", help="calibration text (default: built-in)")
    p.add_argument("--calib-seqs", type=int, default=4)
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--out", default="results/taylor_stats.json", help="the JSON file written (whatever its name)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    if args.calib_seqs < 1 or args.calib_len < 2:
        p.error(f"--calib-seqs must be >= 1 and --calib-len >= 2 (got {args.calib_seqs}, {args.calib_len})")
    try:
        distill.check_writable(args.out, "--out", args.overwrite,
                               {"teacher": args.teacher.removeprefix("random:"), "calibration text": args.calib_data})
        if args.calib_data:
            distill.read_text(args.calib_data)
        teacher, tok, source = convert.load_teacher(args.teacher)
        distill.warn_past_trained(teacher.config, {"--calib-len": args.calib_len})
        ids = convert.calib_ids(args, tok)
        stats = collect_stats(teacher, ids, keep_io=False)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {args.out} not written", file=sys.stderr)
        return 130
    for i, s in stats.items():
        print(f"layer {i:2d}  distance " + " ".join(f"{v:6.1f}" for v in s["distance"].tolist())
              + "   entropy " + " ".join(f"{v:4.2f}" for v in s["entropy"].tolist()))
    distill.write_json(args.out, {"teacher": source, "calib": [args.calib_seqs, args.calib_len],
                                  "stats": summary(stats), **distill.run_info(device="cpu")})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
