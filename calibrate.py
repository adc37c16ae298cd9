"""
calibrate.py -- how a new GDN layer is initialised: Taylor-Calibrate, its ablations, and the registry.

Every init takes a freshly hybridised student (gdn.hybridize: W_q, W_k, W_v, W_o copied from the
teacher) and sets its GDN layers in place. The names (`--init` in convert.py):

  naive          the copy plus the standard random gates (METHOD section 2).
  zero-gate      naive, then W_g = 0: SiLU(0) = 0 closes every output gate, so each GDN branch outputs
                 exactly 0 (or W_o's bias, where the teacher's o_proj has one) and the hybrid starts as
                 the teacher with those attention layers removed.
  taylor-phase1  naive, then Phase 1: the closed-form settings below, from the teacher's statistics.
  align-only     naive, then Phase 2: a short per-layer alignment to the teacher layer's output.
  taylor         Taylor-Calibrate = Phase 1 + Phase 2.
  taylor-plus    ours, first attempt (beyond the paper): Phase 1 with gates that really take the
                 values the statistics ask for and an output gate fitted instead of damped, then
                 the same Phase 2 (see "Our own init" at the end of this docstring).
  align-plus     ours, what the measurements led to: no Phase 1 (the standard random gates), and a
                 Phase 2 that aligns the whole layer -- W_o's weight and the readout norm train
                 too (a bias of W_o, where the teacher has one, and the conv stay as they are). Per
                 layer it still helps with more calibration tokens (16 x 256, see below).

Everything here works on one GDN layer at a time and needs, per layer, the teacher statistics of
taylor_stats.collect_stats: distance d_h, entropy H_h (Phase 1 turns it into the concentration c_h
with its own conc_eps option), the teacher-forced input x [N, L, d],
the teacher attention output y [N, L, d] (after W_o) and the per-head context T [N, L, H, D].

Phase 1, for a layer with heads h (closed form, no gradient):

  1. Memory timescale. A head that attends on average d_h tokens back should remember about that
     long; METHOD matches the memory's half-life to d_h (an exponential memory's mean lag is then
     d_h / ln2 ~ 1.44 d_h). With A_log = 0 the decay is alpha = exp(-softplus(W_a x + dt_bias)); at
     W_a x ~ 0 the state halves every ln2 / softplus(dt_bias) tokens (exactly so with a_proj=zero;
     under the reference's random W_a only roughly: softplus is convex, so the mean step lies above
     the gamma_h set below and the memory is shorter than aimed at; the delta rule's erasure comes on top), so

         gamma_h = clip(ln2 / d_h, gamma_min, gamma_max),   dt_bias_h = softplus^-1(gamma_h),  A_log = 0.

  2. Write gate. Sharp heads (low entropy) overwrite their memory harder:
         beta_h = beta_min + beta_span * c_h            (0.3 .. 0.7)
     The reference's b_proj has no bias; it rescales each row to mean |W_b[h]| = |logit(beta_h)|/sqrt(d)
     (d the model width: were x's entries of size 1, with signs unrelated to W_b's, W_b x would
     spread over tokens by about |logit(beta_h)|, the size of the logit it is meant to reach):
         W_b[h] <- logit(beta_h) / sqrt(d) * W_b[h] / mean|W_b[h]|                 (write_gate=rescale)
     This sets the *size* of W_b x, not its sign or centre: W_b x scales with rms(x), which the
     RMSNorm's weight sets (often well under 1), and the hidden states' large shared mean component
     (below) adds to it an offset per head whose sign the random W_b[h] decides. Both stay small, so
     beta stays near 0.5 whatever beta_h says. write_gate=fit (ours) instead
     solves a ridge least squares for a W_b[h] with W_b[h] x_t ~ logit(beta_h) on every calibration
     token: because of that shared mean component a bias-free projection can carry a constant -- and
     then carries little else (beta ~ beta_h on every token).
     write_gate=bias is METHOD's "obvious alternative": W_b keeps its random init (token-dependent,
     small) and a bias b_b[h] = logit(beta_h) centres beta at beta_h. It is the one option that adds a
     parameter: the hybrid is built with a bias on W_b (gdn.hybridize(..., beta_bias=True)).

  3. Value scale. Run the exact GDN recurrence with these gates: per-head readout G_h [N, L, D]
     (o = S^T q / sqrt(D), before the norm). The least-squares scale against the teacher context,
         sigma_h = <T_h, G_h> / ||G_h||^2   clipped to [sigma_min, sigma_max],
     multiplies the rows of W_v for head h (a head whose G is all zero gets sigma = 1, clamped like
     the rest). The readout's RMSNorm divides any common scale of o back out, and sigma is fitted
     to the readout without its SiLU but applied inside it, so the new readout is not sigma G: sigma
     acts mainly through the SiLU on v and through step 4. It often sits at its clip (41% of heads
     at sigma_max, the median 8.0, over every Phase 1 of results/zeroshot.json): G, with q scaled
     by 1/sqrt(D), is much smaller than T.

  4. Output gate. W_g <- kappa * W_v,   kappa = damping * RMS(T) / RMS(SiLU(W_v x)),   damping 0.01,
     with W_v as step 3 left it. SiLU(u) ~ u/2 for small u, so each head's gate starts at
     ~ kappa/2 * (W_v x): proportional to its values (a head opens where it has something to write)
     and small. (This damping is why Phase 1 alone barely moves zero-shot perplexity: the GDN
     branches start nearly silent.)

Phase 2, for each converted layer independently (teacher forcing: input x, target y, both fixed):

     min  MSE( GDN(x), y )   over W_q, W_k, W_v (lr_qkv = 1e-4) and W_a, W_b, W_g, A_log, dt_bias
                             (lr_gates = 1e-3; with write_gate=bias, W_b's bias too); W_o, the norm
                             weight, the conv and all else frozen.
     AdamW (weight_decay 0.01), `steps` = 300 full-batch steps, gradient-norm clip 1.0, and the
     parameters with the lowest loss seen are kept (keep_best). The loss before and after is recorded.
     The calibration tokens (METHOD: 4 x 256) are convert.py's --calib-seqs and --calib-len.

Our own init, and what the measurements said (SmolLM2-135M; results/zeroshot.md on the H100,
results/zeroshot_plus_layers.md per layer on the CPU). The zero-shot table's cells are one hybrid
each, its WikiText-2 perplexity before any distillation; its columns are the share of layers kept as
softmax and the policy that picked them (uniform, ar, ga-s2: convert.py --keep, --policy; METHOD
section 4). Per layer, "held-out MSE / start" is a layer's teacher-forced error on text the init
did not see, after the init over before it:

  The reference's Phase 1 leaves beta near 0.5 whatever its targets (see step 2) and its damping
  keeps the branches silent. taylor-plus fixes what it can in closed form: write_gate=fit (beta
  really centred on beta_h), a_proj=zero (the time step really is gamma_h), out_gate=fit (the gate's
  scale by least squares, not 0.01), dt_from=distance_nosink (the sink's mass no longer stretches
  the memory). Zero-shot after Phase 2 it is no better: 334.3 vs taylor's 334.5 at keep 1/4 uniform,
  better in 5 of 9 cells, worse in 4 (keep 1/4 ga-s2: 199.4 vs 163.3). What we found, and why
  align-only (naive gates + Phase 2: 137.7) beats taylor in every cell of our table, unlike in the
  paper:
    * Phase 2 over-fits: on 4 x 256 tokens a layer's fit MSE falls 6-9x below its MSE on the next
      4 x 256 tokens of the same text (~9x for align-only). What matters is the held-out error, and
      there the random, token-dependent, short-memory naive gates do better than any
      statistics-derived start we tried (mean-distance timescales are long: the diffuse and sink
      mass dominate d_h).
    * Options tried beyond the preset, each kept as an option: gate_search (per-head gamma, beta on
      a grid by readout/context cosine), gates_from=naive (keep the random gates, fit only the
      output gate), val_rows (keep-best on held-out rows = early stopping), phase2_input=student
      (align on the student's own inputs, target corrected by the residual error; implemented, not
      measured at scale), larger learning rates. Their per-layer held-out numbers are in
      results/zeroshot_plus_layers.md and (the learning rates) results/zeroshot_plus_layers_align.md;
      none beat align-only there.
    * More calibration tokens help every init (16 x 256 instead of 4 x 256: held-out MSE / start
      falls from ~0.45 to ~0.34 for align-only on layers 5 and 18, results/zeroshot_plus_layers_16x256.md),
      and align-only stays ahead of taylor and taylor-plus there too. On a GPU, --calib-seqs 16 is
      the cheapest improvement we found (zero-shot: below).
    * METHOD's two write gates side by side (results/write_gate_layers.md, zero-shot
      results/zeroshot_write_gate_{rescale,bias}.md): after Phase 1 the bias leaves beta 0.01-0.02 off
      its target and token-dependent (std 0.02-0.03), rescaling 0.13-0.15 off; after Phase 2 taylor is
      325.0 with the bias vs 334.5 rescaled at keep 1/4 uniform, and within a few percent either way
      in the other five cells -- another start that Phase 2 mostly erases.

  align-plus is where this leads: keep the naive gates, and spend the effort on the alignment
  itself -- train W_o and the readout norm with W_q, W_k, W_v and the gates (train_out=1). Per layer
  (results/zeroshot_plus_layers_align.md, 4 x 256 tokens) this lowers the held-out MSE from 0.170 to
  0.155 on layer 5 and from 1.042 to 0.989 on layer 18; more steps (900) or 3x the learning rates
  only over-fit more (0.206-0.216 and 1.15-1.24); at 16 x 256 tokens train_out still helps (0.131
  -> 0.123 and 0.847 -> 0.799: results/zeroshot_plus_layers_align_16x256.md). Zero-shot on the H100
  (results/zeroshot.md, the same 4 x 256 tokens as every other row): 121.0 at keep 1/4 uniform, 0.36x taylor's 334.5 and below
  align-only's 137.7; it beats taylor in 9 of 9 cells and align-only in 8 of 9 (not keep 3/4 ga-s2).
  Most of the gain over taylor is dropping Phase 1 (align-only alone is 0.41x taylor); training W_o
  takes 12% off at keep 1/4 uniform (7-12% across keep 1/4's policies). More calibration tokens
  are the next lever: with 16 x 256 align-only alone falls to 63.4 (results/zeroshot_calib16.md),
  so convert.py --calib-seqs 16 is worth its 2x time.

Every constant is a named option in OPTIONS (override with convert.py --init-opt NAME=VALUE; the
seed is --seed's, so that one seed fixes everything).
Signature of every INITS entry: fn(student, teacher, calib_ids, opts) -> dict of what it measured
(saved in the conversion JSON). calib_ids [N, L] are held-out calibration tokens.
"""

import copy
import math
import time

import torch
import torch.nn.functional as F

from gdn import check_teacher, decoder_layers, gdn_from_attention, gdn_modules
from gdn_kernel import chunk_gated_delta_rule
from taylor_stats import CONC_EPS, DEFAULTS, DIST_FLOOR, collect_stats, concentration, sanitize, summary

LN2 = math.log(2.0)

# name: (default, what it is). Every number of METHOD sections 2-3 lives here, but the calibration
# size (convert.py --calib-seqs, --calib-len).
OPTIONS = {
    "seed": (0, "seeds the standard random gates, per layer (so a layer's init does not depend on which others are converted)"),
    # the standard random init every init starts from (METHOD section 2)
    "gate_std": (0.02, "std of the standard random W_a, W_b, W_g"),
    "a_max": (16.0, "A ~ U(0, a_max), A_log = log A"),
    "dt_min": (1e-3, "dt = exp(U(log dt_min, log dt_max)), dt_bias = softplus^-1(dt)"),
    "dt_max": (0.1, "see dt_min"),
    "dt_floor": (1e-4, "dt clamped to at least this"),
    # the statistics
    "dist_floor": (DIST_FLOOR, "attention distance max(i - j, dist_floor): the diagonal counts as half a token (taylor_stats)"),
    "conc_eps": (CONC_EPS, "floor of the entropy spread that concentration divides by: a layer whose heads' entropies spread less keeps them in order, squeezed towards c = 1"),
    # Phase 1, step 1
    "gamma_min": (1e-3, "smallest time step: half-life at most ln2/1e-3 ~ 693 tokens"),
    "gamma_max": (5.0, "largest time step: half-life at least ln2/5 ~ 0.14 tokens"),
    # Phase 1, step 2
    "beta_min": (0.3, "write strength of the layer's most diffuse head"),
    "beta_span": (0.4, "beta_h = beta_min + beta_span * c_h: the sharpest head writes with 0.7"),
    "write_gate": ("rescale", "rescale (reference: row rescaling of W_b), bias (METHOD's alternative: W_b random, a bias logit(beta_h)) or fit (ours: ridge fit so W_b x ~ logit(beta_h))"),
    "ridge": (1e-2, "write_gate=fit: ridge strength, relative to the mean eigenvalue of X^T X"),
    # Phase 1, step 3
    "sigma_min": (0.1, "lower clip of the least-squares value scale"),
    "sigma_max": (10.0, "upper clip of the least-squares value scale"),
    # Phase 1, step 4
    "damping": (0.01, "kappa = damping * RMS(T) / RMS(SiLU(W_v x)): the output gate's start size"),
    "out_gate": ("damped", "damped (reference) or fit (ours: per-head least-squares gate scale, line-searched)"),
    "gate_ridge": (1e-6, "out_gate=fit: ridge of its H x H least squares, relative to the mean of the diagonal (only keeps the solve defined)"),
    "gate_shrinks": ("1,0.5,0.25,0.125,0.0625", "out_gate=fit: the line search's factors on the least-squares scales (comma-separated; the damped start is always a candidate)"),
    # our own Phase 1 choices
    "dt_from": ("distance", "statistic behind the time step: distance (reference) or distance_nosink (ours)"),
    "gates_from": ("stats", "stats (reference: steps 1-2 set decay and write gate from the statistics) or naive (ours: keep the standard random, token-dependent gates; steps 3-4 still run)"),
    "gate_search": (0, "ours: 1 = choose each head's (gamma, beta) on a grid by how well the GDN readout's direction matches the teacher context (overrides steps 1-2's targets; the layer runs exactly those gates only with a_proj=zero and write_gate=fit, as in taylor-plus: under rescale beta stays near 0.5, see step 2)"),
    "gamma_grid": ("0.003,0.01,0.03,0.1,0.3,1,3", "gate_search: candidate time steps gamma (comma-separated)"),
    "beta_grid": ("0.1,0.3,0.5,0.7,0.9", "gate_search: candidate write strengths beta (comma-separated)"),
    "a_proj": ("keep", "keep (reference: random W_a) or zero (ours: the time step is exactly gamma_h at start)"),
    # Phase 2
    "steps": (300, "Phase 2 full-batch AdamW steps per layer (0: skip)"),
    "lr_qkv": (1e-4, "Phase 2 learning rate of W_q, W_k, W_v"),
    "lr_gates": (1e-3, "Phase 2 learning rate of W_a, W_b, W_g, A_log, dt_bias"),
    "weight_decay": (0.01, "Phase 2 AdamW weight decay, on every parameter it trains (A_log and dt_bias too; with train_out=1 the readout norm weight as well)"),
    "clip": (1.0, "Phase 2 gradient-norm clip"),
    "train_out": (0, "ours: 1 = Phase 2 also trains W_o and the readout norm weight (lr_qkv): the whole layer's output is aligned, not only what feeds the frozen W_o"),
    "keep_best": (1, "Phase 2 keeps the lowest-loss parameters seen (1) or the last (0)"),
    "val_rows": (0, "ours: hold out this many calibration sequences from Phase 2's fit and keep the parameters with the lowest loss on them (0: keep-best on the fit loss, the reference)"),
    "phase2_input": ("teacher", "teacher (reference: teacher-forced x, y) or student (ours: the student's own input to the layer, target corrected by the residual-stream error)"),
    "correction": (1.0, "phase2_input=student: weight of the residual-stream error added to the target"),
}


# The values a word-valued or on/off option may take (the others are numbers or grids).
CHOICES = {"write_gate": ("rescale", "bias", "fit"), "out_gate": ("damped", "fit"), "dt_from": ("distance", "distance_nosink"),
           "gates_from": ("stats", "naive"), "a_proj": ("keep", "zero"), "phase2_input": ("teacher", "student"),
           "gate_search": (0, 1), "train_out": (0, 1), "keep_best": (0, 1)}


def parse_opts(pairs):
    """['steps=100', 'write_gate=fit'] -> {'steps': 100, 'write_gate': 'fit'}, typed like the defaults;
    a clear error for an unknown name, one given twice, a value outside CHOICES, or a fraction where a
    count is due."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"--init-opt '{pair}' is not NAME=VALUE")
        k, v = pair.split("=", 1)
        if k not in OPTIONS:
            raise ValueError(f"unknown init option '{k}'; valid: {', '.join(OPTIONS)}")
        if k in out:
            raise ValueError(f"--init-opt {k} is given twice: give it once")
        default = OPTIONS[k][0]
        try:
            out[k] = float(v) if isinstance(default, (int, float)) else v
        except ValueError:
            raise ValueError(f"init option {k} wants a number, got '{v}'") from None
        if isinstance(out[k], float) and not math.isfinite(out[k]):
            raise ValueError(f"init option {k} wants a finite number, got '{v}'")
        if isinstance(default, int):
            if out[k] != int(out[k]):
                raise ValueError(f"init option {k} wants a whole number, got '{v}'")
            out[k] = int(out[k])
    resolve(out)                        # the choices and ranges, checked now rather than after the teacher pass
    return out


def _grid(o, name):
    try:
        grid = [float(s) for s in str(o[name]).split(",")]
    except ValueError:
        grid = [math.nan]
    if not all(math.isfinite(g) for g in grid):
        raise ValueError(f"init option {name}='{o[name]}' is not a comma-separated list of (finite) numbers")
    return grid


def resolve(opts, preset=None):
    """Defaults, then the init's preset, then the user's options; the word-valued ones checked against
    CHOICES, the gates' ranges too (a write strength must stay inside (0, 1) for its logit, a time
    step and a value scale above 0)."""
    o = {k: v for k, (v, _) in OPTIONS.items()}
    o.update(preset or {})
    o.update({k: v for k, v in (opts or {}).items() if not k.startswith("_")})
    unknown = sorted(k for k in o if k not in OPTIONS)   # (a typo would otherwise fall back to the default)
    if unknown:
        raise ValueError(f"unknown init option{'s' * (len(unknown) > 1)} {', '.join(unknown)}; the options are "
                         f"{', '.join(OPTIONS)} (names starting with _ pass private data and are not options)")
    for k, allowed in CHOICES.items():
        if o[k] not in allowed:
            raise ValueError(f"init option {k}={o[k]}: choose from {', '.join(map(str, allowed))}")
    betas = [o["beta_min"], o["beta_min"] + o["beta_span"]] + _grid(o, "beta_grid")
    if o["beta_span"] < 0 or not all(0 < b < 1 for b in betas):
        raise ValueError(f"init options: write strengths must lie in (0, 1): beta_min={o['beta_min']}, "
                         f"beta_min + beta_span={o['beta_min'] + o['beta_span']}, beta_grid={o['beta_grid']}")
    for lo, hi in (("gamma_min", "gamma_max"), ("sigma_min", "sigma_max"), ("dt_min", "dt_max")):
        if not 0 < o[lo] <= o[hi]:
            raise ValueError(f"init options: need 0 < {lo} <= {hi}, got {o[lo]} and {o[hi]}")
    if o["steps"] < 0 or o["val_rows"] < 0:
        raise ValueError(f"init options steps and val_rows must be >= 0 (got {o['steps']}, {o['val_rows']})")
    # > 0: a log, a clamp, a clip, a divisor, and the ridges (with fewer calibration tokens than the
    # width, X^T X is singular without one).
    for name in ("a_max", "dt_floor", "clip", "conc_eps", "ridge", "gate_ridge"):
        if not o[name] > 0:
            raise ValueError(f"init option {name} must be > 0 (got {o[name]})")
    for name in ("gate_std", "weight_decay", "damping", "dist_floor", "lr_qkv", "lr_gates"):  # (lr 0: frozen)
        if not o[name] >= 0:
            raise ValueError(f"init option {name} must be >= 0 (got {o[name]})")
    if min(_grid(o, "gate_shrinks")) < 0:
        raise ValueError(f"init option gate_shrinks: factors must be >= 0, got {o['gate_shrinks']}")
    if min(_grid(o, "gamma_grid")) <= 0:
        raise ValueError(f"init option gamma_grid: time steps must be > 0, got {o['gamma_grid']}")
    if o["gate_search"] and o["gates_from"] == "naive":
        raise ValueError("init options gate_search=1 and gates_from=naive: the search chooses the gates that "
                         "gates_from=naive leaves random; use one or the other")
    if o["gates_from"] == "naive" and (o["a_proj"] != "keep" or o["write_gate"] != "rescale"):
        raise ValueError(f"init options gates_from=naive with a_proj={o['a_proj']}, write_gate={o['write_gate']}: "
                         f"gates_from=naive keeps the standard random gates, which a_proj=zero would change and a "
                         f"write gate other than the default would not reach (taylor-plus sets both)")
    return o


def _softplus_inv(y):
    """x with softplus(x) = y, for y > 0: x = y + log(1 - exp(-y)) (stable for small and large y)."""
    return y + torch.log(-torch.expm1(-y))


def _logit(p):
    return torch.log(p) - torch.log1p(-p)


# ----------------------------------------------------------------------------------------------
# The naive starting point, made per-layer deterministic
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def _standard_gates(gdn, o):
    """The standard GDN random init of the gates (gdn.reset_gates, METHOD section 2, at the options
    named here: gate_std, a_max, dt_min, dt_max, dt_floor), drawn from a generator seeded by (seed,
    layer index). W_q, W_k, W_v, W_o keep the teacher copy. Every init starts here, so the same layer
    starts the same in every hybrid it appears in."""
    gen = torch.Generator().manual_seed((int(o["seed"]) * 100003 + gdn.layer_idx) % 2**64)   # any seed fits
    gdn.reset_gates(o["gate_std"], o["a_max"], o["dt_min"], o["dt_max"], o["dt_floor"], generator=gen)


# ----------------------------------------------------------------------------------------------
# Pieces of a GDN layer's forward, evaluated on calibration inputs
# ----------------------------------------------------------------------------------------------

def _readout_raw(gdn, x):
    """The per-head recurrence output o = S_t^T q_t / sqrt(D) [N, L, H, D] (before norm and gate)."""
    z = gdn.project(x)
    q, k, v, _ = gdn.qkv(z)
    g, beta = gdn.gates(z)
    o, _ = chunk_gated_delta_rule(q, k, v, g, beta)
    return o.float()


def _layer_mse(gdn, x, y):
    """MSE between the GDN layer's output (after W_o) and the target y, in fp32."""
    with torch.no_grad():
        return F.mse_loss(gdn(x)[0].float(), y.float()).item()


def _ridge_fit(X, targets, ridge):
    """W [k, d] minimising ||X W^T - targets||^2 + lam ||W||^2 for X [n, d], targets [n, k];
    lam = ridge * trace(X^T X) / d (scale-free). Solved in float64."""
    X = X.double()
    A = X.T @ X
    lam = ridge * A.diagonal().mean()
    A = A + lam * torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    return torch.linalg.solve(A, X.T @ targets.double()).T.float()


def _at(t, gdn):
    return t.to(device=gdn.A_log.device, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# Phase 1: closed-form settings from the statistics
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def phase1(gdn, st, o):
    """Steps 1-4 of the module docstring on one GDN layer, in place, with options o from resolve().
    Returns what was set, and the write strengths it measured (beta_mean, beta_token_std), as lists.
    On failure (a bias it lacks, non-finite weights) the layer is left as it came in."""
    o = resolve(o)                            # (a partial dict: the defaults fill it in)
    if o["write_gate"] == "bias" and gdn.b_proj.bias is None:
        raise ValueError("write_gate=bias needs GDN layers with a bias on W_b (gdn.hybridize(..., beta_bias=True); "
                         "convert.convert builds them so when its options say write_gate=bias)")
    saved = [p.detach().clone() for p in gdn.parameters()]
    H, D = gdn.num_heads, gdn.head_dim
    d = gdn.hidden_size
    x = _at(st["x"], gdn).to(gdn.q_proj.weight.dtype)
    X = _at(st["x"], gdn).reshape(-1, d)
    T = _at(st["ctx"], gdn)                                                     # [N, L, H, D]

    # Statistics that are undefined for some head fall back to taylor_stats.DEFAULTS, with a warning.
    dist = sanitize(o["dt_from"], gdn.layer_idx, _at(st[o["dt_from"]], gdn), DEFAULTS[o["dt_from"]])
    conc = concentration(sanitize("entropy", gdn.layer_idx, _at(st["entropy"], gdn), DEFAULTS["entropy"]),
                         o["conc_eps"])

    # 1. timescale -> dt_bias, A_log.  half-life ln2/gamma = mean attention distance.
    gamma = (LN2 / dist).clamp(o["gamma_min"], o["gamma_max"])
    beta = o["beta_min"] + o["beta_span"] * _at(conc, gdn)
    search = None
    if o["gate_search"]:
        gamma, beta, search = _gate_search(gdn, x, T, o)
    if o["gates_from"] == "stats":
        gdn.A_log.zero_()
        gdn.dt_bias.copy_(_softplus_inv(gamma))
    if o["a_proj"] == "zero":
        gdn.a_proj.weight.zero_()

    # 2. entropy -> write gate.
    Wb = gdn.b_proj.weight
    if o["gates_from"] == "naive":
        pass
    elif o["write_gate"] == "rescale":
        scale = Wb.float().abs().mean(1, keepdim=True).clamp_min(1e-12)
        Wb.copy_(_logit(beta)[:, None] / math.sqrt(d) * Wb.float() / scale)
    elif o["write_gate"] == "bias":
        gdn.b_proj.bias.copy_(_logit(beta))
    elif o["write_gate"] == "fit":
        Wb.copy_(_ridge_fit(X, _logit(beta)[None, :].expand(X.shape[0], H), o["ridge"]))
    beta_tokens = gdn.gates(gdn.project(x))[1]                                 # what beta really is
    beta_seen = beta_tokens.mean((0, 1))
    beta_std = beta_tokens.flatten(0, 1).std(0) if beta_tokens[..., 0].numel() > 1 else 0 * beta_seen  # (1 token)

    # 3. value scale: least squares of the readout G against the teacher context T, per head.
    G = _readout_raw(gdn, x)
    GG = G.pow(2).sum((0, 1, 3))
    sigma = torch.where(GG > 0, (T * G).sum((0, 1, 3)) / GG.clamp_min(1e-30), 1.0)   # no readout: no scale to fit
    sigma = sigma.clamp(o["sigma_min"], o["sigma_max"])
    Wv = gdn.v_proj.weight
    Wv.copy_((Wv.float().view(H, D, d) * sigma[:, None, None]).view(H * D, d))

    # 4. output gate from the scaled value projection.
    v = F.silu(F.linear(X, Wv.float()))
    kappa = o["damping"] * T.pow(2).mean().sqrt() / v.pow(2).mean().sqrt().clamp_min(1e-12)
    gdn.g_proj.weight.copy_(kappa * Wv.float())
    stats = o["gates_from"] == "stats"                 # (naive: the gates applied are the random ones)
    info = {"gamma": gamma.tolist() if stats else None, "beta_target": beta.tolist() if stats else None,
            "beta_mean": beta_seen.tolist(),
            "beta_token_std": beta_std.tolist(),
            "sigma": sigma.tolist(), "kappa": float(kappa)}
    if search is not None:
        info["gate_search"] = search
    if o["out_gate"] == "fit":
        info.update(_fit_out_gate(gdn, x, _at(st["y"], gdn), kappa, o))
    if not all(torch.isfinite(p).all() for p in gdn.parameters()):              # never NaN weights
        for p, old in zip(gdn.parameters(), saved):
            p.copy_(old)
        raise ValueError(f"layer {gdn.layer_idx}: Phase 1 produced non-finite weights")
    return info


@torch.no_grad()
def _gate_search(gdn, x, T, o):
    """Ours: each head's decay and write strength chosen by what the recurrence then reads out.

    The mean attention distance is dominated by the diffuse long-range part of attention (and by the
    sink), while what a head returns is mostly its sharp, local part; a memory as long as the mean
    distance blurs that. So, with constant gates (W_a = 0: g = -gamma; beta constant), run the exact
    recurrence for every (gamma, beta) on a small grid and score each head by the mean cosine
    between its readout G_h(t) and the teacher context T_h(t). Cosine, because the readout's
    RMSNorm removes the scale anyway. Heads are independent in GDN, so one run per grid point scores
    all heads at once. Returns (gamma [H], beta [H], what was seen)."""
    q, k, v, _ = gdn.qkv(gdn.project(x))
    N, L, H, D = q.shape
    # (a time step outside [gamma_min, gamma_max] is scored as it would be applied: clamped)
    gammas = [min(max(gm, o["gamma_min"]), o["gamma_max"]) for gm in _grid(o, "gamma_grid")]
    betas = _grid(o, "beta_grid")
    score = torch.empty(len(gammas), len(betas), H)
    for a, gm in enumerate(gammas):
        for b, bt in enumerate(betas):
            g = torch.full((N, L, H), -gm, device=q.device)
            beta = torch.full((N, L, H), bt, device=q.device)
            G, _ = chunk_gated_delta_rule(q, k, v, g.to(q.dtype) if q.dtype == torch.float64 else g, beta.to(q.dtype))
            score[a, b] = F.cosine_similarity(G.float(), T, dim=-1, eps=1e-6).mean((0, 1)).cpu()
    best = score.view(-1, H).argmax(0)
    ga = torch.tensor(gammas)[best // len(betas)].to(x.device)
    be = torch.tensor(betas)[best % len(betas)].to(x.device)
    return ga, be, {"gamma": ga.tolist(), "beta": be.tolist(), "cosine": score.view(-1, H).max(0).values.tolist()}


@torch.no_grad()
def _fit_out_gate(gdn, x, y, kappa, o):
    """Ours: the output gate's scale by least squares instead of a fixed damping.

    With W_g = kappa_h W_v (per head) and SiLU(u) ~ u/2 for small u, head h contributes
        W_o[:, h] ( n_h * kappa_h/2 * (W_v x)_h ),     n_h = RMSNorm(o_h) * w_norm,
    linear in kappa_h. So the kappa [H] minimising ||sum_h kappa_h/2 Z_h - y||^2, Z_h = W_o[:, h]
    (n_h * (W_v x)_h), is a least-squares problem with H unknowns. SiLU is not linear at larger u,
    so the solution is then shrunk (gate_shrinks: 1, 1/2, 1/4, ...) and the factor with the lowest
    true layer MSE kept, never worse than the damped start."""
    H, D = gdn.num_heads, gdn.head_dim
    N, L, d = x.shape
    n = gdn.normed(_readout_raw(gdn, x))                                       # [N, L, H, D]
    u = gdn.v_proj(x).float().view(N, L, H, D)
    Wo = gdn.o_proj.weight.float().view(d, H, D)
    Z = torch.einsum("nlhe,che->nlhc", n * u / 2, Wo).reshape(-1, H, d)        # [NL, H, d]
    bias = gdn.o_proj.bias.float() if gdn.o_proj.bias is not None else 0.0
    target = (y.float() - bias).reshape(-1, d)
    A = torch.einsum("thc,tkc->hk", Z.double(), Z.double())
    b = torch.einsum("thc,tc->h", Z.double(), target.double())
    A += o["gate_ridge"] * A.diagonal().mean() * torch.eye(H, dtype=A.dtype, device=A.device)
    k_ls = torch.linalg.solve(A, b).float()
    Wv = gdn.v_proj.weight.float().view(H, D, -1)
    best = (_layer_mse(gdn, x, y), kappa * torch.ones(H, device=k_ls.device), 0.0)
    for shrink in _grid(o, "gate_shrinks"):
        kh = torch.nan_to_num(k_ls * shrink)
        gdn.g_proj.weight.copy_((Wv * kh[:, None, None]).view(H * D, -1))
        mse = _layer_mse(gdn, x, y)
        if mse < best[0]:
            best = (mse, kh, shrink)
    gdn.g_proj.weight.copy_((Wv * best[1][:, None, None]).view(H * D, -1).to(gdn.g_proj.weight.dtype))
    return {"kappa_fit": best[1].tolist(), "kappa_shrink": best[2], "gate_fit_mse": best[0]}


# ----------------------------------------------------------------------------------------------
# Phase 2: short per-layer alignment
# ----------------------------------------------------------------------------------------------

def phase2(gdn, x, y, o, desc="phase 2"):
    """min MSE(GDN(x), y) with AdamW in two learning-rate groups, gradient clipping and keep-best,
    on a float32 copy of the layer (bf16 weights would swallow 1e-4 updates); the result is copied
    back into `gdn`. Returns {loss_before, loss_after, best_step, steps, seconds}.
    x: the layer's inputs [N, L, d]; y: its teacher's outputs, the same shape."""
    from tqdm import tqdm
    o = resolve(o)
    if x.dim() != 3 or tuple(y.shape) != tuple(x.shape):
        raise ValueError(f"phase2: x (inputs) and y (targets) must both be [N, L, d], the same shape; got "
                         f"{list(x.shape)} and {list(y.shape)}")
    t0 = time.time()
    dev = gdn.A_log.device
    x, y = x.to(dev, torch.float32), y.to(dev, torch.float32)
    layer = copy.deepcopy(gdn).float().train()
    qkv = [layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight]
    gates = [layer.a_proj.weight, layer.b_proj.weight, layer.g_proj.weight, layer.A_log, layer.dt_bias]
    gates += [] if layer.b_proj.bias is None else [layer.b_proj.bias]        # (write_gate=bias)
    if o["train_out"]:
        qkv += [layer.o_proj.weight, layer.o_norm]
    for p in layer.parameters():                                  # W_o, the norm, the conv: frozen
        p.requires_grad_(False)
    for p in qkv + gates:
        p.requires_grad_(True)
    groups = [{"params": qkv, "lr": o["lr_qkv"]}, {"params": gates, "lr": o["lr_gates"]}]
    try:                                    # one fused kernel per step (CPU and CUDA); same math
        opt = torch.optim.AdamW(groups, weight_decay=o["weight_decay"], fused=True)
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(groups, weight_decay=o["weight_decay"])
    trained = qkv + gates
    # Held-out rows (ours, val_rows > 0): 4 x 256 tokens fit ~1M parameters easily, and the loss on
    # tokens the fit never saw stops falling long before the fit loss does; keeping the parameters
    # that do best on held-out rows is early stopping.
    v = int(o["val_rows"])
    if v and not 0 < v < x.shape[0]:
        raise ValueError(f"val_rows={v} must leave at least one calibration sequence to fit (have {x.shape[0]})")
    (x, y), (xv, yv) = ((x[:-v], y[:-v]), (x[-v:], y[-v:])) if v else ((x, y), (None, None))
    best, best_step, best_state, first, first_val, best_fit = float("inf"), -1, None, None, None, None
    bar = tqdm(range(o["steps"] + 1), desc=desc, leave=False)
    for step in bar:
        loss = F.mse_loss(layer(x)[0], y)
        value = loss.item()
        first = value if first is None else first
        crit = value
        if v:
            with torch.no_grad():
                crit = F.mse_loss(layer(xv)[0], yv).item()
            first_val = crit if first_val is None else first_val
        if math.isfinite(crit) and crit < best:    # judged on the parameters *before* this update
            best, best_step, best_fit = crit, step, value
            best_state = [p.detach().clone() for p in trained]
        if step == o["steps"]:                     # the last pass only evaluates the final update
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, o["clip"])
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{value:.4g}", best=f"{best:.4g}")
    if o["keep_best"] and best_state is not None:
        with torch.no_grad():
            for p, b in zip(trained, best_state):
                p.copy_(b)
    bad = [name for name, p in layer.named_parameters() if not torch.isfinite(p).all()]
    if bad:                                        # never NaN weights (gdn is left as it came in)
        raise ValueError(f"layer {gdn.layer_idx}: Phase 2 diverged to non-finite {', '.join(bad)}"
                         f"{'' if o['keep_best'] else ' (keep_best=0 keeps the last step)'}: lower lr_qkv / lr_gates")
    with torch.no_grad():
        for name, p in gdn.named_parameters():
            p.copy_(dict(layer.named_parameters())[name].to(p.dtype))
    out = {"loss_before": first, "loss_after": (best_fit if v else best) if o["keep_best"] else value,
           "best_step": best_step, "steps": o["steps"], "seconds": time.time() - t0}
    if v:
        out.update(val_loss_before=first_val, val_loss_best=best, val_rows=v)
    return out


# ----------------------------------------------------------------------------------------------
# Our own init's extra: Phase 2 on the student's own inputs
# ----------------------------------------------------------------------------------------------

class _Stop(Exception):
    pass


@torch.no_grad()
def _residual_and_input(model, ids, layer):
    """(h, x) at decoder layer `layer` of `model` on ids: h the residual stream entering the layer,
    x the attention module's input (after the layer's input norm). The forward stops there."""
    dec = decoder_layers(model)[layer]
    got = {}

    def grab_h(module, args, kwargs):
        got["h"] = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).float()

    def grab_x(module, args, kwargs):
        got["x"] = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).float()
        raise _Stop

    hs = [dec.register_forward_pre_hook(grab_h, with_kwargs=True),
          dec.self_attn.register_forward_pre_hook(grab_x, with_kwargs=True)]
    try:
        model(ids.to(next(model.parameters()).device), use_cache=False)
    except _Stop:
        pass
    finally:
        for h in hs:
            h.remove()
    return got["h"], got["x"]


# ----------------------------------------------------------------------------------------------
# The inits
# ----------------------------------------------------------------------------------------------

def _teacher_stats(student, teacher, calib_ids, opts, o, name):
    """The statistics of the student's GDN layers: opts['_stats'] if the caller collected them
    already (convert.py's table and GA-S2 reuse one teacher pass), else one teacher pass now."""
    if opts.get("_stats") is not None:
        floors = {st["floor"] for st in opts["_stats"].values()}
        if floors != {o["dist_floor"]}:
            raise ValueError(f"the statistics given were collected with distance floor {sorted(floors)}, "
                             f"not dist_floor={o['dist_floor']}")
        return opts["_stats"]
    if calib_ids is None:
        raise ValueError(f"init '{name}' needs calibration tokens (calib_ids)")
    return collect_stats(teacher, calib_ids, layers=sorted(gdn_modules(student)), floor=o["dist_floor"])


def _run_init(student, teacher, calib_ids, opts, name, preset, do_phase1, do_phase2):
    opts = opts or {}
    o = resolve(opts, preset)
    layers = gdn_modules(student)
    _check_pair(student, teacher)
    if do_phase2 and o["phase2_input"] == "student":
        if any(hasattr(decoder_layers(student)[i], "pre_feedforward_layernorm") for i in layers):
            # Gemma-style sandwich norms: the layer adds norm(attn(x)) to the stream, not attn(x), so
            # the stream's error is not an error of the layer's output and the target would be wrong.
            raise ValueError("phase2_input=student assumes a layer adds its attention output to the residual "
                             "stream as it is; this model normalises it first (Gemma-style post-attention "
                             "norm): use phase2_input=teacher")
    if do_phase1 and o["gate_std"] == 0 and o["write_gate"] == "rescale" and o["gates_from"] == "stats":
        raise ValueError(f"init {name}: gate_std=0 with write_gate=rescale: the rescale sets each head's beta by "
                         f"scaling W_b's random rows, and gate_std=0 leaves none (beta would stay 0.5); give "
                         f"gate_std > 0 or another write_gate")
    t0 = time.time()
    stats = _teacher_stats(student, teacher, calib_ids, opts, o, name) if (do_phase1 or do_phase2) else None
    info = {"options": {k: o[k] for k in OPTIONS}, "stats_seconds": time.time() - t0, "layers": {}}
    if stats is not None:           # recorded with the concentration Phase 1 uses (this init's conc_eps)
        info["stats"] = summary({i: {**stats[i], "concentration": concentration(stats[i]["entropy"], o["conc_eps"])}
                                 for i in layers})
    progress = opts.get("_progress")        # (convert.py's: each layer saved once set, restored on a rerun)
    for i, gdn in layers.items():
        if progress is not None and (rec := progress.restore(i, gdn)) is not None:
            info["layers"][i] = rec
            continue
        t_layer = time.time()
        _standard_gates(gdn, o)
        rec = {}
        if do_phase1:
            rec["phase1"] = phase1(gdn, stats[i], o)
        if do_phase2 and o["steps"] > 0:
            x, y = stats[i]["x"], stats[i]["y"]
            if o["phase2_input"] == "student":
                # The layer will see the student's hidden states, not the teacher's: align on those.
                # The target adds the residual-stream error, so that after this layer the student's
                # stream h_s + GDN(x_s) is as close as it can be to the teacher's h_t + y_t.
                if calib_ids is None:
                    raise ValueError("phase2_input=student needs the calibration tokens")
                h_s, x = _residual_and_input(student, calib_ids, i)
                y = y.to(h_s.device) + o["correction"] * (stats[i]["h"].to(h_s.device) - h_s)
            rec["phase2"] = phase2(gdn, x, y, o, desc=f"{name} layer {i}")
        elif stats is not None:
            rec["mse"] = _layer_mse(gdn, _at(stats[i]["x"], gdn).to(gdn.q_proj.weight.dtype), _at(stats[i]["y"], gdn))
        rec["seconds"] = time.time() - t_layer
        info["layers"][i] = rec
        if progress is not None:
            progress.save(i, gdn, rec)
    return info


def _check_pair(student, teacher):
    """An init sets a hybrid's GDN layers from its teacher: both must be what they say."""
    if getattr(student.config, "hybrid", None) is None:      # (a hybrid of no GDN layer is one: all kept)
        raise ValueError("the student is not a hybrid: gdn.hybridize a copy of the teacher first")
    if teacher is not None:
        check_teacher(teacher, student)


def _init_naive(student, teacher, calib_ids, opts):
    o = resolve(opts)
    _check_pair(student, teacher)
    for gdn in gdn_modules(student).values():
        _standard_gates(gdn, o)
    return {}


@torch.no_grad()
def _init_zero_gate(student, teacher, calib_ids, opts):
    _init_naive(student, teacher, calib_ids, opts)
    for gdn in gdn_modules(student).values():
        gdn.g_proj.weight.zero_()
    return {}


# Ours. Each choice is an option above, so each can be switched off alone to see what it is worth.
PLUS = {"write_gate": "fit", "a_proj": "zero", "out_gate": "fit", "dt_from": "distance_nosink"}

# The inits built on the statistics and the alignment: (Phase 1?, Phase 2?) and the preset their
# options start from (over the defaults above; the user's --init-opt values go over both).
INIT_PHASES = {"taylor-phase1": (True, False), "align-only": (False, True), "taylor": (True, True),
               "taylor-plus": (True, True), "align-plus": (False, True)}
PRESETS = {"taylor-plus": PLUS, "align-plus": {"train_out": 1}}


def _phased_init(name):
    do1, do2 = INIT_PHASES[name]
    def init(student, teacher, calib_ids, opts):
        return _run_init(student, teacher, calib_ids, opts, name, PRESETS.get(name, {}), do1, do2)
    return init


INITS = {"naive": _init_naive, "zero-gate": _init_zero_gate, **{name: _phased_init(name) for name in INIT_PHASES}}


def check_val_rows(name, opts, calib_seqs):
    """A Phase 2 that holds val_rows calibration sequences out must keep one to fit on: said before the
    teacher pass rather than inside Phase 2, after it."""
    o = resolve(opts, PRESETS.get(name))
    if o["val_rows"] and o["val_rows"] >= calib_seqs and INIT_PHASES.get(name, (False, False))[1] and o["steps"]:
        raise ValueError(f"init {name}: val_rows={o['val_rows']} must leave at least one of the --calib-seqs "
                         f"{calib_seqs} calibration sequences to fit")


# What each init reads. Every init starts from the standard random gates, and write_gate shapes
# every layer (under write_gate=bias W_b gets a bias: set by Phase 1, trained by Phase 2 and by
# distillation, 0 at first for naive). Every init with a phase gathers the statistics (dist_floor,
# conc_eps: what conversion.json records of them, and Phase 1's time steps); Phase 1 reads the
# options of its four steps, Phase 2 its own. An option that no init of a conversion reads is
# refused there (convert.py), not recorded as if it had done something.
STANDARD_OPTIONS = ("seed", "gate_std", "a_max", "dt_min", "dt_max", "dt_floor", "write_gate")
STATS_OPTIONS = ("dist_floor", "conc_eps")
PHASE2_OPTIONS = ("steps", "lr_qkv", "lr_gates", "weight_decay", "clip", "train_out", "keep_best", "val_rows", "phase2_input",
          "correction")


def reads(name):
    """The names of the OPTIONS that init `name` reads."""
    do1, do2 = INIT_PHASES.get(name, (False, False))
    phase1 = set(OPTIONS) - set(STANDARD_OPTIONS) - set(STATS_OPTIONS) - set(PHASE2_OPTIONS)
    return set(STANDARD_OPTIONS) | (set(STATS_OPTIONS) if do1 or do2 else set()) | (phase1 if do1 else set()) | \
        (set(PHASE2_OPTIONS) if do2 else set())


def check_read(inits, opts):
    """A clear error for an option in `opts` that none of `inits` reads."""
    unread = sorted(k for k in opts if not k.startswith("_") and not any(k in reads(i) for i in inits))
    if unread:
        group = lambda k: "Phase 2's" if k in PHASE2_OPTIONS else "the statistics'" if k in STATS_OPTIONS else "Phase 1's"
        by = lambda phase: ", ".join(n for n, do in INIT_PHASES.items() if do[phase])
        raise ValueError(f"--init-opt {', '.join(f'{k} ({group(k)})' for k in unread)}: {' and '.join(inits)} "
                         f"never read{'s' * (len(inits) == 1)} {'them' if len(unread) > 1 else 'it'}. naive and "
                         f"zero-gate read only {', '.join(STANDARD_OPTIONS[1:])}; Phase 1's options are read by {by(0)}; "
                         f"Phase 2's by {by(1)}; the statistics' by all of those")


def layerwise(name, opts=None):
    """True when init `name` sets each layer independently from teacher-forced data: a layer's result
    is then the same in every hybrid it appears in, and convert.py's table computes it once. Only a
    Phase 2 on the student's own inputs (phase2_input=student) is not: the inits without Phase 2
    (naive, zero-gate, taylor-phase1) are layer-wise whatever that option says."""
    has_phase2 = INIT_PHASES.get(name, (False, False))[1]
    return not has_phase2 or resolve(opts, PRESETS.get(name))["phase2_input"] == "teacher"


# ----------------------------------------------------------------------------------------------
# `python calibrate.py`: what each init and option is worth, layer by layer, on held-out tokens.
# ----------------------------------------------------------------------------------------------

def _write_ablation(args, source, layers, variants, rows, asked):
    """main()'s report of the variants in `rows` (of the labels `asked`): json and md, each written
    atomically, a partial one (a run stopped or failed midway) marked as such."""
    import distill
    complete = len(variants) == len(asked)
    md = ([] if complete else [f"**Partial**: {len(variants)} of the {len(asked)} variants asked for (the run stopped "
                               f"before {', '.join(a for a in asked if a not in [v[0] for v in variants])}).", ""]) + [
          f"Per-layer teacher-forced MSE of one GDN layer vs its teacher attention layer (after W_o), teacher "
          f"{source}, calibration {args.calib_data or 'builtin'} ({args.calib_seqs} x {args.calib_len} tokens); held-out = "
          f"the next {args.calib_seqs} x {args.calib_len} tokens of the same text. 'zero' = MSE of a layer that outputs 0.",
          "", "| variant | " + " | ".join(f"layer {i}: held-out start -> end (fit end)" for i in layers) + " |",
          "|---|" + "---|" * len(layers)]
    for label, _, _ in variants:
        cells = []
        for i in layers:
            r = next(r for r in rows if r["variant"] == label and r["layer"] == i)
            fe = f"{r['fit_mse_end']:.4f}" if r["fit_mse_end"] is not None else "-"
            cells.append(f"{r['held_mse_start']:.4f} -> **{r['held_mse_end']:.4f}** ({fe})")
        md.append(f"| {label} | " + " | ".join(cells) + " |")
    md.append("| zero output | " + " | ".join(f"{next(r for r in rows if r['layer'] == i)['held_zero_output']:.4f}"
                                            for i in layers) + " |")
    if any(r["beta_off"] is not None for r in rows):
        md += ["", "The write gate after Phase 1, on the calibration tokens (mean over heads): |mean beta - beta_h| "
               "(does it sit at its target?) and the std of beta over tokens (does it still depend on the token?).", "",
               "| variant | " + " | ".join(f"layer {i}: off target, token std" for i in layers) + " |",
               "|---|" + "---|" * len(layers)]
        for label, _, _ in variants:
            rs = [next(r for r in rows if r["variant"] == label and r["layer"] == i) for i in layers]
            if rs[0]["beta_off"] is not None:
                md.append(f"| {label} | " + " | ".join(f"{r['beta_off']:.3f}, {r['beta_token_std']:.3f}" for r in rs) + " |")
    seeds = sorted({r["seed"] for r in rows})          # each variant's own (an option like any other)
    distill.write_json(args.out + ".json", {"teacher": source, "layers": layers, "variants": asked,
                                            "complete": complete, "rows": rows, "calib_data": args.calib_data,
                                            **distill.run_info(seeds[0] if len(seeds) == 1 else seeds, "cpu")})
    distill.write_atomic(args.out + ".md", "\n".join(md) + "\n")


def main(argv=None):
    """Per-layer ablation: for each variant 'INIT[:NAME=VALUE...]' and each layer, the teacher-forced
    MSE of the GDN layer against its teacher layer, on the calibration tokens (what the init fitted)
    and on the next block of the same text (what it did not see). Much cheaper than a zero-shot
    perplexity per variant, and it separates fitting from generalising."""
    import argparse
    import sys
    import convert
    import distill
    distill.code_version()                   # (the code this run started with, recorded at its end)
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--teacher", default="default")
    p.add_argument("--layers", default="5,18", help="comma-separated layer indices (default 5,18: two of "
                   "SmolLM2's 30; another teacher may need others)")
    p.add_argument("--calib-data")
    p.add_argument("--calib-seqs", type=int, default=4)
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--variants", nargs="+", default=["taylor-phase1", "align-only", "taylor", "taylor-plus"])
    p.add_argument("--out", default="results/calibrate_layers", help="output stem (.json, .md)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (.json, .md)")
    args = p.parse_args(argv)
    if args.calib_seqs < 1 or args.calib_len < 2:
        p.error(f"--calib-seqs must be >= 1 and --calib-len >= 2 (got {args.calib_seqs}, {args.calib_len})")
    try:
        distill.check_results(args.out, "--out", args.overwrite,
                              {"teacher": args.teacher.removeprefix("random:"), "calibration text": args.calib_data})
        try:
            layers = [int(i) for i in args.layers.split(",")]
        except ValueError:
            raise ValueError(f"--layers '{args.layers}' is not a comma-separated list of layer indices") from None
        if len(set(layers)) != len(layers):
            raise ValueError(f"--layers '{args.layers}' names a layer twice")
        if args.calib_data:
            distill.read_text(args.calib_data)
        if len(set(args.variants)) < len(args.variants):
            raise ValueError(f"--variants names one variant twice: {' '.join(args.variants)}")
        variants = []
        for v in args.variants:
            name, *pairs = v.split(":")
            if name not in INIT_PHASES:
                raise ValueError(f"variant '{v}': init must be one of {', '.join(INIT_PHASES)}")
            try:
                variants.append((v, name, parse_opts(pairs)))
                check_read([name], variants[-1][2])
                check_val_rows(name, variants[-1][2], args.calib_seqs)
            except ValueError as e:
                raise ValueError(f"variant '{v}': {str(e).replace('--init-opt ', 'option ')}") from None
        student_fed = [v for v, name, opts in variants if resolve(opts, PRESETS.get(name))["phase2_input"] != "teacher"]
        if student_fed:
            raise ValueError(f"variant(s) {', '.join(student_fed)}: this ablation fits each layer alone on the teacher's "
                             f"inputs; phase2_input=student needs the layers before it converted (convert.py --table)")
        floors = {resolve(opts, PRESETS.get(name))["dist_floor"] for _, name, opts in variants}
        if len(floors) > 1:
            raise ValueError(f"the variants share one teacher pass, so one dist_floor (got {sorted(floors)})")
        floor = floors.pop()
        teacher, tok, source = convert.load_teacher(args.teacher)
        distill.warn_past_trained(teacher.config, {"--calib-len": args.calib_len})
        bad = [i for i in layers if not 0 <= i < teacher.config.num_hidden_layers]
        if bad:
            raise ValueError(f"--layers {bad} out of range: the teacher has {teacher.config.num_hidden_layers} layers")
        fit_ids, held_ids = convert.calib_ids(args, tok, 0), convert.calib_ids(args, tok, 1)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {args.out} not written", file=sys.stderr)
        return 130
    rows, done = [], []
    try:                              # the report is rewritten after each variant: an error or ^C keeps those done
        fit = collect_stats(teacher, fit_ids, layers=layers, floor=floor)
        held = collect_stats(teacher, held_ids, layers=layers, floor=floor)
        for label, name, opts in variants:
            o = resolve(opts, PRESETS.get(name))
            do1, do2 = INIT_PHASES[name]
            for i in layers:
                gdn = gdn_from_attention(teacher.model.layers[i].self_attn, i, beta_bias=o["write_gate"] == "bias")
                _standard_gates(gdn, o)
                p1 = phase1(gdn, fit[i], o) if do1 else None
                start = _layer_mse(gdn, held[i]["x"], held[i]["y"])
                r = phase2(gdn, fit[i]["x"], fit[i]["y"], o, desc=f"{label} layer {i}") if do2 and o["steps"] else {}
                rows.append({"variant": label, "layer": i, "seed": o["seed"], "held_mse_start": start, "fit_mse_end": r.get("loss_after"),
                             "held_mse_end": _layer_mse(gdn, held[i]["x"], held[i]["y"]),
                             "held_zero_output": float(held[i]["y"].pow(2).mean()), "seconds": r.get("seconds"),
                             # the write gate Phase 1 left: how far beta's mean is from its target, how much
                             # it varies with the token (per head, averaged over heads)
                             "beta_off": None if p1 is None or p1["beta_target"] is None else
                             float((torch.tensor(p1["beta_mean"]) - torch.tensor(p1["beta_target"])).abs().mean()),
                             "beta_token_std": None if p1 is None else float(torch.tensor(p1["beta_token_std"]).mean())})
                print(f"{label:50s} layer {i:2d}  held-out MSE start {start:.4f} -> end {rows[-1]['held_mse_end']:.4f}"
                      f"  (fit {r.get('loss_after', float('nan')):.4f})", flush=True)
            done = [v for v in variants if any(r["variant"] == v[0] for r in rows)]
            _write_ablation(args, source, layers, done, rows, [v[0] for v in variants])
    except (ValueError, KeyboardInterrupt) as e:
        said = f" (the variants done are in {args.out}.json, marked partial)" if done else ""
        print(f"error: {e}{said}" if isinstance(e, ValueError) else f"interrupted{said}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 130
    with open(args.out + ".md") as f:
        print(f.read(), end="")
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main())
