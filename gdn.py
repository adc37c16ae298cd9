"""
gdn.py -- the Gated DeltaNet (GDN) attention layer, and the surgery that puts it into a teacher.

A hybrid keeps a few of the teacher's softmax-attention layers and replaces every other one with a
GDN layer. Everything else (embeddings, MLPs, norms, LM head, the teacher's own HF model class) is
untouched: `GatedDeltaNet` has the call signature of an HF attention module, so the decoder layer
around it runs unchanged.

Per token t and head h, with x_t the decoder layer's normalised input:

    q_t = SiLU(W_q x_t),  k_t = SiLU(W_k x_t),  v_t = SiLU(W_v x_t)     (optionally a short causal
                                                                         conv before each SiLU)
    q_t, k_t <- q_t / ||q_t||, k_t / ||k_t||                             (per head: keeps the delta
                                                                         rule's step I - beta k k^T
                                                                         non-expanding: it shrinks
                                                                         S along k by 1 - beta only)
    g_t    = -exp(A_log) * softplus(W_a x_t + dt_bias)                   (log decay, alpha = e^g)
    beta_t = sigmoid(W_b x_t [+ b_b])                                    (write strength; the bias
                                                                         only with beta_bias=True)
    S_t    = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T   (gdn_kernel.py)
    o_t    = S_t^T q_t / sqrt(head_dim)
    y_t    = W_o concat_h[ RMSNorm(o_t,h) * w_norm * SiLU(W_g x_t)_h ]

The gate parametrisation is Mamba-2's: exp(A_log) sets a per-head decay rate and softplus(. + dt_bias)
a per-token time step, so a head's memory half-life is ln2 / (exp(A_log) * softplus(dt_bias)) tokens
when W_a x is small. calibrate.py sets these from what the teacher's heads actually attend to.

Shapes follow the teacher: num_heads = its query heads, head_dim = its head_dim; its k and v heads
(fewer, under grouped-query attention) are repeated up to the query heads. There is no RoPE: the
decay is the position signal. Teacher q/k norms (Qwen3, Gemma 3) and q/k/v biases (Qwen2) have no place here
and are dropped (logged).

Caching. Softmax layers keep their KV cache in HF's Cache object as usual. A GDN layer's cache is its
state S [B, H, Dk, Dv] plus the last (conv_size - 1) inputs of each short conv: a fixed size, whatever
the context length (but for the placeholder below, one number a token). Both live on the same Cache
object (attribute `gdn_state`), so HF's generate() carries them without knowing. HF's own cache
operations know only their KV tensors, so `_gdn_states` gives the cache a subclass whose operations
that reorder, select, repeat or clear batch rows (beam search, contrastive search, cache reuse) also do
it to the states, and whose crop (assisted decoding) marks them unusable: a recurrent state cannot be
rewound, so continuing from it is an error rather than a silently wrong answer. HF reads the context
length off the cache's per-layer key tensors, so each GDN layer also appends a one-number-per-token
placeholder there (B x 1 x T x 1): position bookkeeping and masks then stay right even when layer 0 is
a GDN layer, on every transformers version and for growing and static caches alike.
Once a state exists it is updated in place (without autograd; under it, replaced, as a backward
needs it), so its memory address never changes: a captured CUDA graph of a decoding step can replay
against it. On CUDA everything a decoding step does between the
layer's input and output projections (conv, SiLU, norms, gates, the recurrence) is one Triton kernel
(gdn_kernel.gdn_layer_step), and `stack_projections` lets the six input projections run as one
matrix product: at one token per step, launches cost more than arithmetic.

Left padding (batched prompts of different lengths). HF hands an attention module only the 4-D
mask it built, whose form depends on the attention backend; the plain 2-D padding mask is what a
recurrent layer needs. So `hybridize` puts a pre-hook on the decoder stack that gives every GDN
layer the current tokens' padding mask. A pad token's input is zeroed (so k = v = 0: it writes
nothing, and the short conv sees the zeros it would see before the first token) and its decay is
set to 1 (g = 0), so the state after the pads is exactly the empty state an unpadded prompt starts
from. That holds for pads before a row's first real token (left padding, also when a chunked
prefill feeds them over several forwards). Pads between real tokens (a left-padded chunk appended
after cached tokens, pads inside a row, real tokens fed after a right-padded chunk) are refused where
the layer has a short conv: its window would carry the real inputs into the pads' k and v, and the
pads' zeros into the next real tokens' window. Every mask form HF builds is read (2-D, 4-D,
flex_attention's BlockMask); another is refused rather than ignored. One shows less: a sliding
window's over a static cache (Mistral's, under a chunked prefill) holds only the window's keys, not
every cached position, so there only a query that attends to nothing is known to be a pad (the
pads before a row's first real token; others pass as tokens), and each layer's check leaves on the
cache which rows have begun, for the next chunk.
"""

import logging
import math
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F

from gdn_kernel import chunk_gated_delta_rule, gated_delta_rule_step, gdn_layer_step, gdn_layer_step_usable

log = logging.getLogger(__name__)

SUPPORTED = ("llama", "qwen2", "qwen3", "mistral", "gemma3_text")


class GatedDeltaNet(nn.Module):
    """One GDN attention layer. Drop-in for an HF attention module: forward(hidden_states, ...)
    returns (output, None). layer_idx names its slot on an HF Cache: unique among the layers that
    share one cache (two GDN layers of one index would read and write one state)."""

    def __init__(self, hidden_size, num_heads, head_dim, layer_idx, conv_size=0, norm_eps=1e-6,
                 o_bias=False, beta_bias=False):
        super().__init__()
        if isinstance(conv_size, bool) or not isinstance(conv_size, numbers.Integral) or conv_size < 0:
            raise ValueError(f"conv_size must be a whole number >= 0 (0: no short conv); got {conv_size!r}")
        if not norm_eps > 0:                  # (0 divides 0 by 0 at an all-zero head: a pad's)
            raise ValueError(f"norm_eps must be > 0; got {norm_eps!r}")
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.layer_idx, self.conv_size, self.norm_eps = layer_idx, conv_size, norm_eps
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(hidden_size, inner, bias=False)
        self.k_proj = nn.Linear(hidden_size, inner, bias=False)
        self.v_proj = nn.Linear(hidden_size, inner, bias=False)
        self.a_proj = nn.Linear(hidden_size, num_heads, bias=False)   # per-token time step
        self.b_proj = nn.Linear(hidden_size, num_heads, bias=beta_bias)   # write strength beta
        self.g_proj = nn.Linear(hidden_size, inner, bias=False)       # output gate
        self.o_proj = nn.Linear(inner, hidden_size, bias=o_bias)
        self.A_log = nn.Parameter(torch.zeros(num_heads))
        self.dt_bias = nn.Parameter(torch.zeros(num_heads))
        self.o_norm = nn.Parameter(torch.ones(head_dim))              # RMSNorm weight, shared by heads
        if conv_size > 0:
            # Depthwise causal convs over q, k, v (one filter per channel), concatenated.
            self.conv = nn.Conv1d(3 * inner, 3 * inner, conv_size, groups=3 * inner, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std=0.02):
        """The standard GDN random init (METHOD section 2): projections N(0, std^2), gates as reset_gates."""
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            nn.init.normal_(lin.weight, std=std)
            if lin.bias is not None:
                lin.bias.zero_()
        self.reset_gates(std)

    @torch.no_grad()
    def reset_gates(self, std=0.02, a_max=16.0, dt_min=1e-3, dt_max=0.1, dt_floor=1e-4, generator=None):
        """The standard init of everything but W_q, W_k, W_v, W_o: W_a, W_b, W_g ~ N(0, std^2);
        A ~ U(0, a_max), A_log = log A; dt = exp(U(log dt_min, log dt_max)) >= dt_floor,
        dt_bias = softplus^-1(dt) = dt + log(1 - e^-dt); output-norm weights 1; identity conv filters.
        Drawn on the CPU (from `generator` where given), so a seed gives the same layer on any device."""
        def draw(p, fill):
            return fill(torch.empty(p.shape)).to(p.device)
        for lin in (self.a_proj, self.b_proj, self.g_proj):
            lin.weight.copy_(draw(lin.weight, lambda t: t.normal_(0, std, generator=generator)))
            if lin.bias is not None:
                lin.bias.zero_()
        # (U(0, a_max) includes 0, whose log would be -inf; at a_max = 16 the floor lies below every
        # other float32 draw)
        A = draw(self.A_log, lambda t: t.uniform_(0, a_max, generator=generator))
        self.A_log.copy_(A.clamp_min(1e-8).log())
        dt = draw(self.dt_bias, lambda t: t.uniform_(math.log(dt_min), math.log(dt_max), generator=generator))
        dt = dt.exp().clamp(min=dt_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.o_norm.fill_(1.0)
        if self.conv_size > 0:
            self.reset_conv()

    @torch.no_grad()
    def reset_conv(self):
        """Identity filters (last tap 1, the rest 0): with them the layer computes exactly what it
        would without the conv, so adding one changes nothing at the start of training."""
        self.conv.weight.zero_()
        self.conv.weight[:, 0, -1] = 1.0

    def inputs(self):
        """The six input projections, in the order project() stacks them: q, k, v first, so they come
        out as one block (SiLU and the short conv take them together); the output gate before the two
        per-head gates keeps the blocks q, k, v, g (inner columns each) and the block a 16-byte
        aligned (b starts H columns after a). "g" here is the output gate, W_g x; the g of gates()
        is the log decay."""
        return {"q": self.q_proj, "k": self.k_proj, "v": self.v_proj, "g": self.g_proj, "a": self.a_proj,
                "b": self.b_proj}

    def project(self, x):
        """The six input projections of x [B, T, d] as one matrix product with their weights stacked,
        split back into pre-activations {"qkv": [B, T, 3*inner], "g": [B, T, inner], "a", "b":
        [B, T, H]}, and "all": the whole product (what gdn_layer_step reads). One launch instead of
        six matters when decoding, where a launch costs more than its arithmetic. The stacking is a
        copy of the weights per call, unless stack_projections() made the six weights views into one
        stored matrix (and nothing has since given them new storage). With autograd on, it always
        stacks per call: gradients reach the six weights only through the stacking. The product is
        self.linear where one is set (convert._use_decode_linear: a decoding kernel), else F.linear."""
        w, b = getattr(self, "stacked", None), getattr(self, "stacked_bias", None)
        if w is not None and not torch.compiler.is_compiling() and not self.stack_current():
            w = self.stacked = self.stacked_bias = None     # .to(), a deep copy, ...: the views are gone
        if w is None or torch.is_grad_enabled():
            w, b = torch.cat([lin.weight for lin in self.inputs().values()]), self.input_bias(0)
        z = getattr(self, "linear", F.linear)(x, w, b)  # rows: q, k, v, g (inner each), a, b (H each)
        i, H = 3 * self.num_heads * self.head_dim, self.num_heads
        j = i + self.num_heads * self.head_dim        # (a stored stack ends in zero rows: not read)
        return {"qkv": z[..., :i], "g": z[..., i:j], "a": z[..., j:j + H], "b": z[..., j + H:j + 2 * H], "all": z}

    def input_bias(self, pad):
        """The stacked product's bias: zeros but for W_b's bias (the last H rows, then `pad` zero rows),
        or None where W_b has none."""
        b = self.b_proj.bias
        return None if b is None else torch.cat([b.new_zeros(4 * self.num_heads * self.head_dim + self.num_heads),
                                                 b, b.new_zeros(pad)])

    def stack_current(self):
        """True while the stacked weight (and W_b's stacked bias) are still what the six Linears hold."""
        b = self.b_proj.bias
        return views_of(self.stacked, [lin.weight for lin in self.inputs().values()]) and (
            b is None or (getattr(self, "stacked_bias", None) is not None and views_of(self.stacked_bias, [b])))

    def gates(self, z):
        """Log decay g [B, T, H] (fp32) and write strength beta [B, T, H], from project()'s z (from its
        "a" and "b" blocks; its "g" block is the output gate's pre-activation, another g)."""
        f = torch.promote_types(z["a"].dtype, torch.float32)       # (fp64 stays fp64: a gradcheck's)
        g = -self.A_log.to(f).exp() * F.softplus(z["a"].to(f) + self.dt_bias.to(f))
        return g, torch.sigmoid(z["b"].to(f))

    def qkv(self, z, conv_state=None):
        """SiLU(conv(.)) of project()'s z["qkv"], with q and k L2-normalised per head. conv_state
        [B, 3*inner, conv_size-1] holds the inputs of the previous tokens (zeros at the start).
        Returns q, k, v [B, T, H, D] and the new conv state."""
        qkv = z["qkv"]
        B, T, _ = qkv.shape
        if self.conv_size > 0:
            qkv = qkv.transpose(1, 2)                                             # [B, C, T]
            if conv_state is None:
                conv_state = qkv.new_zeros(B, qkv.shape[1], self.conv_size - 1)
            qkv = torch.cat([conv_state.to(qkv.dtype), qkv], dim=-1)
            # (a copy: a view would keep the whole prompt's [B, C, T] inputs alive in the cache)
            conv_state = qkv[..., qkv.shape[-1] - (self.conv_size - 1):].clone()
            qkv = self.conv(qkv).transpose(1, 2)                                  # causal: no padding
        qkv = F.silu(qkv).view(B, T, 3, self.num_heads, self.head_dim)
        qk = F.normalize(qkv[:, :, :2], dim=-1)                                   # q and k in one go
        return qk[:, :, 0], qk[:, :, 1], qkv[:, :, 2], conv_state

    def normed(self, o):
        """RMSNorm(o_h) * w_norm for each head of o [..., H, D], in fp32 (fp64 for fp64)."""
        o = o.to(torch.promote_types(o.dtype, torch.float32))
        return o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.norm_eps) * self.o_norm.to(o.dtype)

    def readout(self, o, z):
        """W_o concat_h[RMSNorm(o_h) * w_norm * SiLU(z["g"])_h]: the per-head norm makes the output
        scale independent of how much the state has accumulated; the gate lets each head switch off."""
        B, T = o.shape[:2]
        o = self.normed(o)
        gate = F.silu(z["g"]).view(B, T, self.num_heads, self.head_dim)
        return self.o_proj((o.to(gate.dtype) * gate).reshape(B, T, -1))

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, past_key_values=None,
                cache=None, **kwargs):
        """hidden_states [B, T, hidden] -> (output [B, T, hidden], None), as an HF attention module
        returns. With a cache (an HF Cache; its class becomes a subclass, see _gdn_states, and this
        layer's slot layer_idx gets the placeholder of the module docstring), the layer's state and
        conv window are read from it and written back (prefill or decode alike). attention_mask and
        position_ids are not read: padding comes from self.pad_mask ([B, T] bool, True at a pad), which
        hybridize's pre-hook on the decoder stack sets for each forward; used alone, set it yourself
        (it stays until changed). Packed sequences are not separated."""
        # transformers renamed the cache argument (past_key_values -> cache); accept either.
        cache = cache if cache is not None else past_key_values
        x = hidden_states
        B, T, _ = x.shape
        if T == 0:
            return x.new_zeros(B, 0, self.hidden_size), None
        pad = getattr(self, "pad_mask", None)                                  # [B, T] bool, True = pad
        pad = pad if pad is not None and pad.shape == (B, T) else None
        if (pad is None and torch.is_tensor(attention_mask) and attention_mask.shape == (B, T)
                and not bool(attention_mask.bool().all())):      # (a padding mask given to the layer alone)
            raise ValueError("GatedDeltaNet does not read attention_mask: a padding mask goes in layer.pad_mask "
                             "([B, T] bool, True at a pad), which gdn.hybridize's pre-hook sets in an HF model")
        states = _gdn_states(cache) if cache is not None else {}
        S0, conv0 = states.get(self.layer_idx, (None, None))
        if S0 is not None and getattr(cache, "gdn_rewound", False):
            raise ValueError("this cache was cut back to fewer tokens (crop); a GDN layer's recurrent state "
                             "cannot be rewound, so decoding cannot continue from it (assisted or prompt-lookup "
                             "decoding does not work with a hybrid)")
        if self.conv_size and (pad is not None or getattr(cache, "gdn_pad_tail", 0)):
            self._check_pads(pad, cache, T)
        state = self.step_state(x, cache)
        if state is not None:
            return self.o_proj(self.step(self.project(x)["all"], state, cache, x)[:, None]), None
        # A pad's input is zeroed before the projections: k = v = 0 (it writes nothing) and a zero
        # output gate; its decay is set to none (g = 0) below, so the state passes through unchanged.
        z = self.project(x if pad is None else x.masked_fill(pad[..., None], 0))
        q, k, v, conv_state = self.qkv(z, conv0)
        g, beta = self.gates(z)
        if q.is_cuda and torch.is_autocast_enabled("cuda"):
            # Autocast runs F.normalize in fp32, so q and k would reach the kernel as fp32 next to a
            # bf16 v, and the kernel would take its fp32 path without tensor cores: 92% of the GPU
            # time of distillation's Stage 1 on the H100 (distill.py;
            # results/distill_h100/stage1_profile_before_fix.txt). The kernel keeps its own fp32
            # accumulation and state anyway.
            dt = torch.get_autocast_dtype("cuda")
            q, k, v = q.to(dt), k.to(dt), v.to(dt)
        if pad is not None:
            g = g.masked_fill(pad[..., None], 0.0)
        # The state is updated in place (its address kept for a captured CUDA graph), but not under
        # autograd: a backward through the step needs the state it started from.
        in_place = not torch.is_grad_enabled()
        if T == 1 and S0 is not None:   # decoding where step_state declined (CPU, autograd, a pad, head dim
                                        # over 128): one step of (1)
            o, S = gated_delta_rule_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], S0, inplace=in_place)
            o = o[:, None]
        else:
            o, S = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=S0, output_final_state=cache is not None)
        if cache is not None:
            if S0 is not None and in_place:                                    # in place: graph-safe
                S = S0.copy_(S) if S is not S0 else S0
                if conv0 is not None:
                    conv0.copy_(conv_state)
                    conv_state = conv0
            states[self.layer_idx] = (S, conv_state)
            self._placeholder(cache, x)
        return self.readout(o, z), None

    def _check_pads(self, pad, cache, T):
        """With a short conv, pads between a row's real tokens (cached or in this chunk) are refused:
        the conv window would carry real inputs into the pads' k and v, and the pads' zeros into the
        next real tokens' window. Pads after a row's last real token (right padding) change nothing
        of this forward's real outputs; the cache is marked, and refused if real tokens follow."""
        past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
        keys = getattr(self, "real_keys", None)
        # The rows whose cached tokens were all pads, as this layer's last check left them at that cache
        # length (a length since grown or cut: unknown, every row taken to have begun: refused, not mixed)
        length, unstarted = getattr(cache, "gdn_unstarted", {}).get(self.layer_idx, (-1, None))
        if keys is not None and keys.shape[1] == past + T:             # every position of the row known
            real = keys
        elif pad is not None:                     # only this chunk's (a sliding window's mask shows no more)
            begun = ~unstarted if length == past and unstarted.shape[0] == pad.shape[0] else torch.ones_like(pad[:, 0])
            real = torch.cat([begun[:, None], ~pad], 1) if past else ~pad
        else:
            real = None
        tail = getattr(cache, "gdn_pad_tail", 0)            # the cache length its right padding ends at
        after_tail = 0 < tail <= past and (pad is None or bool((~pad).any()))
        if after_tail or (real is not None and _pads_between_real(real)):
            raise ValueError("pads between real tokens of a row (after cached or earlier ones, before later ones): "
                             "a GDN layer's short conv would mix the real inputs into the pads and the pads into "
                             "the next tokens; pad prompts on the left only")
        if cache is not None and real is not None:
            if bool((~real[:, -1] & real.any(1)).any()):
                cache.gdn_pad_tail = past + T     # right padding: what follows it would be mixed in
            cache.gdn_unstarted = {**getattr(cache, "gdn_unstarted", {}), self.layer_idx: (past + T, ~real.any(1))}

    def step_state(self, x, cache):
        """(S, conv state) of this layer where decoding x [B, 1, d] takes the one-kernel step
        (gdn_kernel.gdn_layer_step: a GPU, no autograd, a state from the prompt, no padding), else None
        (also for a cache cut back, or right-padded under a short conv: forward then refuses it; the
        decoding layers of convert.py call this without forward's checks)."""
        pad = getattr(self, "pad_mask", None)
        if (cache is None or x.shape[1] != 1 or (pad is not None and pad.shape == x.shape[:2])
                or getattr(cache, "gdn_rewound", False) or (self.conv_size and getattr(cache, "gdn_pad_tail", 0))):
            return None
        S0, conv0 = _gdn_states(cache).get(self.layer_idx, (None, None))
        if S0 is None or not gdn_layer_step_usable(x, S0) or (self.conv_size and conv0 is None):
            return None
        return S0, conv0

    def step(self, z, state, cache, x):
        """Decoding on a GPU: everything between the two projections as one kernel, from the stacked
        projection z [B, >= 4*H*D + 2*H] to the output projection's input [B, H*D]; the state and the
        conv state (step_state) are updated in place."""
        y = gdn_layer_step(z, *state, self.conv.weight if self.conv_size else None, self.A_log, self.dt_bias,
                           self.o_norm, self.norm_eps)
        self._placeholder(cache, x)
        return y

    def _placeholder(self, cache, x):
        """One number per token in the cache's key/value slots of this layer (see the module docstring).
        A cache sized before its first write (early_initialization; generate does it for a static
        cache's chunked prefill) gave this layer K/V-shaped slots: they are dropped and sized for the stub."""
        stub = x.new_zeros(x.shape[0], 1, x.shape[1], 1)
        layers = getattr(cache, "layers", [])
        layer = layers[self.layer_idx] if self.layer_idx < len(layers) else None
        keys = getattr(layer, "keys", None)
        if (getattr(layer, "is_initialized", False) and keys is not None and keys.dim() == 4
                and (keys.shape[1], keys.shape[-1]) != (1, 1)):         # (a growing cache's empty start: 1-D)
            layer.is_initialized = False
        cache.update(stub, stub, self.layer_idx)


def views_of(stack, weights):
    """True while every weight is still a view into `stack`'s storage (stack_as_views): .to() or a
    deep copy gives them storage of their own."""
    return all(w.untyped_storage().data_ptr() == stack.untyped_storage().data_ptr() for w in weights)


def stack_as_views(lins, rows_multiple=1):
    """One stored [W_1; W_2; ...] matrix of the Linears' weights (zero rows appended up to a multiple
    of rows_multiple) and one vector of their biases (None without biases); each Linear's weight and
    bias become views into them, so the stack costs no memory beyond those zero rows, and edits or
    training keep it current (views_of says whether they still are)."""
    w = torch.cat([lin.weight.detach() for lin in lins])
    w = torch.cat([w, w.new_zeros(-w.shape[0] % rows_multiple, w.shape[1])])
    b = None if lins[0].bias is None else torch.cat([lin.bias.detach() for lin in lins])
    i = 0
    for lin in lins:
        lin.weight.data = w[i:i + lin.out_features]
        if b is not None:
            lin.bias.data = b[i:i + lin.out_features]
        i += lin.out_features
    return w, b


def stack_projections(model):
    """For decoding: give every GDN layer of `model` one stored [q; k; v; g; a; b] weight matrix whose
    row blocks *are* its six input weights (each Linear's weight becomes a view into it; W_b's bias,
    where it has one, likewise a view into one bias vector, zero elsewhere), so project() runs one
    matrix product and copies nothing. Training, load_state_dict and in-place
    edits keep the sharing; whatever gives a weight new storage (.to(), a deep copy) ends it, and
    project() then notices and stacks per call again. Call it after moving the model. No extra memory
    but the zero rows that pad the stack (under 64)."""
    for m in gdn_modules(model).values():
        # Zero rows up to a multiple of 64. Rows 16-byte aligned (a multiple of 8) is what cuBLAS's
        # fast kernels need (on an H100, in a device script: 2322 rows took a generic kernel, 2x slower); a
        # multiple of 64 (128 bytes) is also the row stride torch.compile gives a wide bf16 product's
        # output, so the output it makes is already what gdn_layer_step was traced with. At 2328
        # rows it padded the stride to 2368 and then copied the output back to 2328 before the step
        # kernel (one more launch a GDN layer, seen in inductor's code on the H100).
        w, _ = stack_as_views(list(m.inputs().values()), rows_multiple=64)
        rows = sum(lin.out_features for lin in m.inputs().values())     # W_b's rows come last
        b = m.input_bias(w.shape[0] - rows)
        b = None if b is None else b.detach()                  # (a buffer, no autograd history)
        if b is not None:                                      # W_b's bias becomes a view into it
            m.b_proj.bias.data = b[rows - m.num_heads:rows]
        m.register_buffer("stacked", w, persistent=False)      # buffers: .to() takes them along
        m.register_buffer("stacked_bias", b, persistent=False)
    return model


def _gdn_states(cache):
    """{layer index: (S, conv state)} kept on an HF cache, created on first use. The cache's class is
    then swapped for a subclass (`_gdn_cache_class`) whose batch operations also act on the states
    (see the module docstring); a subclass rather than per-object wrappers, so a deep copy of the
    cache (prompt reuse) keeps operations that act on its own states."""
    if not hasattr(cache, "gdn_state"):
        if not hasattr(cache, "get_seq_length"):
            raise TypeError(f"a GDN layer keeps its state on an HF Cache (transformers' DynamicCache, StaticCache, "
                            f"...); got {type(cache).__name__}")
        cache.gdn_state = {}
        cache.__class__ = _gdn_cache_class(type(cache))
    return cache.gdn_state


_GDN_CACHE_CLASSES = {}


def _gdn_cache_class(base):
    """`base` (an HF Cache class) with reorder / select / repeat / reset applied to the GDN states
    too, and crop marking them unusable when it removes tokens (a recurrent state cannot be rewound)."""
    if base in _GDN_CACHE_CLASSES:
        return _GDN_CACHE_CLASSES[base]

    def each(cache, fn):                     # fn(tensor) -> tensor, applied to S and conv (and per row marks)
        for i, (S, conv) in list(cache.gdn_state.items()):
            cache.gdn_state[i] = (fn(S), None if conv is None else fn(conv))
        for i, (length, rows) in list(getattr(cache, "gdn_unstarted", {}).items()):
            cache.gdn_unstarted[i] = (length, fn(rows))

    class GDNCache(base):
        def reorder_cache(self, beam_idx):                   # in place: CUDA graphs stay valid
            super().reorder_cache(beam_idx)
            each(self, lambda t: t.copy_(t.index_select(0, beam_idx.to(t.device))))

        def batch_select_indices(self, indices):
            super().batch_select_indices(indices)
            each(self, lambda t: t[indices.to(t.device)])

        def batch_repeat_interleave(self, repeats):
            super().batch_repeat_interleave(repeats)
            each(self, lambda t: t.repeat_interleave(repeats, 0))

        def reset(self):
            super().reset()
            each(self, torch.Tensor.zero_)
            self.gdn_rewound, self.gdn_pad_tail, self.gdn_unstarted = False, 0, {}

        def crop(self, *args, **kwargs):
            before = self.get_seq_length()
            super().crop(*args, **kwargs)
            self.gdn_rewound = getattr(self, "gdn_rewound", False) or self.get_seq_length() < before

    GDNCache.__name__ = GDNCache.__qualname__ = "GDN" + base.__name__
    _GDN_CACHE_CLASSES[base] = GDNCache
    return GDNCache


# ----------------------------------------------------------------------------------------------
# Surgery: teacher -> hybrid.
# ----------------------------------------------------------------------------------------------

def decoder_layers(model):
    """The list of decoder layers of a supported HF causal LM."""
    model_type = model.config.model_type
    if model_type not in SUPPORTED:
        raise ValueError(f"unsupported architecture '{model_type}': supported are {', '.join(SUPPORTED)}")
    return model.model.layers


def gdn_from_attention(attn, layer_idx, conv_size=0, norm_eps=1e-6, beta_bias=False):
    """A GDN layer shaped like the teacher attention module `attn`, its W_q, W_k, W_v, W_o copied from
    it (k and v heads repeated up to the query heads) and its gates at the standard random init:
    the naive conversion of METHOD section 2. beta_bias: W_b gets a bias (zero until calibrate.py's
    write_gate=bias sets it)."""
    hidden = attn.q_proj.in_features
    head_dim = attn.head_dim
    num_heads = attn.q_proj.out_features // head_dim
    num_kv = attn.k_proj.out_features // head_dim
    rep = num_heads // num_kv
    w = attn.q_proj.weight
    gdn = GatedDeltaNet(hidden, num_heads, head_dim, layer_idx, conv_size, norm_eps,
                        o_bias=attn.o_proj.bias is not None, beta_bias=beta_bias).to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        gdn.q_proj.weight.copy_(attn.q_proj.weight)
        # kv head j serves query heads j*rep .. (j+1)*rep - 1 (HF's repeat_kv order).
        gdn.k_proj.weight.copy_(attn.k_proj.weight.view(num_kv, head_dim, hidden).repeat_interleave(rep, 0).view(-1, hidden))
        gdn.v_proj.weight.copy_(attn.v_proj.weight.view(num_kv, head_dim, hidden).repeat_interleave(rep, 0).view(-1, hidden))
        gdn.o_proj.weight.copy_(attn.o_proj.weight)
        if attn.o_proj.bias is not None:
            gdn.o_proj.bias.copy_(attn.o_proj.bias)
    return gdn


def _dropped_weights(attn):
    """The teacher attention's weights a GDN layer has no place for (q/k norms, q/k/v biases)."""
    dropped = [n for n in ("q_norm", "k_norm") if getattr(attn, n, None) is not None]
    return dropped + [f"{n}.bias" for n in ("q_proj", "k_proj", "v_proj") if getattr(attn, n).bias is not None]


_said = set()       # hybridize's warnings, once per process (convert.py's GA-S2 policy builds one hybrid per layer)


def hybridize(model, gdn_layers, conv_size=0, norm_eps=1e-6, beta_bias=False, warn=True):
    """Replace the attention module of every layer in `gdn_layers` (the layers to CONVERT, not those
    kept) by a GDN layer copied from it, in place (the teacher itself becomes the hybrid: deep-copy it
    first to keep it), and record the hybrid's shape in model.config.hybrid (saved with the config).
    Also registers a forward pre-hook on the decoder stack (kept as model.model.gdn_pad_hook) that
    hands the GDN layers the padding mask. warn: say which teacher weights are dropped (not when
    rebuilding a saved hybrid: no teacher there)."""
    layers = decoder_layers(model)
    if isinstance(gdn_layers, (str, bytes)):      # ("12" would iterate as layers 1 and 2)
        raise ValueError(f"gdn_layers must be a list of layer indices; got the string {gdn_layers!r}")
    gdn_layers = list(gdn_layers)

    def whole(i):
        try:
            return not isinstance(i, bool) and float(i).is_integer()
        except (TypeError, ValueError):
            return False
    odd = [i for i in gdn_layers if not whole(i)]
    if odd:
        raise ValueError(f"layer indices must be whole numbers; got {odd}")
    gdn_layers = sorted(set(int(i) for i in gdn_layers))
    bad = [i for i in gdn_layers if not 0 <= i < len(layers)]
    if bad:
        raise ValueError(f"layer indices {bad} out of range: the model has {len(layers)} layers (0..{len(layers) - 1})")
    done = [i for i, layer in enumerate(layers) if isinstance(layer.self_attn, GatedDeltaNet)]
    if done:                  # (config.hybrid would name only this call's layers; a GDN layer has no softmax to copy)
        raise ValueError(f"hybridize: the model is a hybrid already (layers {done} are GDN): hybridize the teacher "
                         f"once, with every layer to convert")
    dropped = sorted({n for i in gdn_layers for n in _dropped_weights(layers[i].self_attn)})
    msg = f"teacher {', '.join(dropped)} have no place in GDN: dropped in the converted layers"
    if warn and dropped and msg not in _said:
        _said.add(msg)
        log.warning(msg)
    for i in gdn_layers:
        layers[i].self_attn = gdn_from_attention(layers[i].self_attn, i, conv_size, norm_eps, beta_bias)
    model.config.hybrid = {"gdn_layers": gdn_layers, "conv_size": conv_size, "norm_eps": norm_eps,
                           "beta_bias": beta_bias}
    if not getattr(model.model, "gdn_pad_hook", None):
        model.model.gdn_pad_hook = model.model.register_forward_pre_hook(_share_padding_mask, with_kwargs=True)
    return model


def _share_padding_mask(stack, args, kwargs):
    """Pre-hook on the decoder stack: hand each GDN layer the padding of the tokens about to be
    processed (pad_mask [B, T], True at a pad; None when there is none) and which cache positions hold
    real tokens (real_keys [B, positions], None where the mask does not show them). The mask stays
    set after the forward, as gradient checkpointing recomputes a layer in the backward pass, after
    the stack has returned; so a GDN layer called on its own, outside the stack, after a padded batch
    of the same shape would still see it (the next stack forward resets it)."""
    mask = kwargs.get("attention_mask")
    if isinstance(mask, dict):                    # Gemma 3: one mask per attention type; the full one
        mask = mask.get("full_attention", next((m for m in mask.values() if m is not None), None))  # sees all
    ids = kwargs.get("input_ids", args[0] if args else None)
    x = ids if ids is not None else kwargs.get("inputs_embeds")
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    past = cache.get_seq_length() if cache is not None else 0
    pad, keys = _padding(mask, *x.shape[:2], past) if mask is not None and x is not None else (None, None)
    if pad is None or not bool(pad.any()):          # one check per forward, not per layer; the keys are
        pad, keys = None, None                      # read only where there are pads (not at a decoding step)
    for layer in stack.layers:
        if isinstance(layer.self_attn, GatedDeltaNet):
            layer.self_attn.pad_mask, layer.self_attn.real_keys = pad, keys


def _padding(mask, B, T, past, rows=256):
    """(pad [B, T], real keys [B, positions] or None) from a mask of any form HF hands the decoder
    stack: 2-D [B, positions] (1 = real token); 4-D [B or 1, 1, T, keys] (bool, True = attend; or
    additive, 0 = attend), as generate builds for a static cache; or flex_attention's BlockMask,
    evaluated through its mask_mod `rows` queries at a time (a dense [B, T, keys] could be gigabytes
    at a long prefill). In a mask over keys no pad is attended by any query and every real token at
    least by itself, so where key k is position k (keys >= past + T), the current tokens' columns
    say which are pads. Otherwise (a sliding window's keys) only rows that attend to nothing are
    known to be pads: the left padding generate makes."""
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        real = mask != 0
        return ~real[:, -T:], real
    if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[-2] == T:
        attends = (mask if mask.dtype == torch.bool else mask == 0)[:, 0]
        real_q, real_k = attends.any(-1).expand(B, T), attends.any(-2).expand(B, -1)
    elif hasattr(mask, "mask_mod") and hasattr(mask, "seq_lengths") and mask.seq_lengths[0] == T:
        K = mask.seq_lengths[1]
        dev = mask.kv_num_blocks.device
        b, h, kv = torch.arange(B, device=dev)[:, None, None], torch.zeros(1, 1, 1, dtype=torch.long, device=dev), \
            torch.arange(K, device=dev)[None, None, :]
        real_q, real_k = [], torch.zeros(B, K, dtype=torch.bool, device=dev)
        for q0 in range(0, T, rows):
            q = torch.arange(q0, min(q0 + rows, T), device=dev)[None, :, None]
            attends = mask.mask_mod(b, h, q, kv).expand(B, q.shape[1], K)
            real_q.append(attends.any(-1))
            real_k |= attends.any(-2)
        real_q = torch.cat(real_q, 1)
    else:
        raise ValueError(f"a hybrid reads its padding from the attention mask; this one ({type(mask).__name__}"
                         f"{', shape ' + str(tuple(mask.shape)) if hasattr(mask, 'shape') else ''}) it cannot read: "
                         f"load the model with attn_implementation='sdpa' or 'eager'")
    if real_k.shape[1] >= past + T:
        return ~real_k[:, past:past + T], real_k[:, :past + T]
    return ~real_q, None


def _pads_between_real(real):
    """Per row [B, N] of real (True) and pad positions: whether a pad has a real token before it and
    one after it, where a short conv would mix pads and real tokens."""
    before = real.cumsum(1) > 0
    after = real.flip(1).cumsum(1).flip(1) > 0
    return bool((~real & before & after).any())


def gdn_modules(model):
    """{layer index: GatedDeltaNet} of a hybrid."""
    return {i: l.self_attn for i, l in enumerate(decoder_layers(model)) if isinstance(l.self_attn, GatedDeltaNet)}


def check_teacher(teacher, student):
    """A teacher is a plain model, not the student: hybridize converts the model it is given in place,
    so `student = hybridize(teacher, ...)` leaves no teacher (an init or a distillation against it
    would match the student to itself)."""
    if teacher is student or gdn_modules(teacher):
        raise ValueError("the teacher has GDN layers (or is the student): gdn.hybridize converts the model it is "
                         "given in place, so hybridize a copy (copy.deepcopy(teacher)) and keep the teacher")


def save_hybrid(model, tokenizer, path):
    """Weights (safetensors) and config through transformers, plus the tokenizer. `path` must be a
    fresh folder: a new path or an empty folder (convert.py writes into a temporary one and renames it
    when all is written). Anything there already is refused, not overwritten or mixed in."""
    import os
    if not getattr(model.config, "hybrid", None):
        raise ValueError("save_hybrid: the model has no GDN layers (model.config.hybrid is unset); run hybridize first")
    if os.path.lexists(path) and not (os.path.isdir(path) and not os.listdir(path)):
        raise ValueError(f"save_hybrid: '{path}' exists and is not an empty folder: save into a new path (or "
                         f"remove what is there first)")
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def load_hybrid(path, device="cpu", dtype=None):
    """Rebuild a hybrid saved by save_hybrid: the teacher's architecture from the config, GDN modules
    swapped in, then every weight loaded (strictly: a missing or extra tensor is an error)."""
    import os
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_utils import load_state_dict
    if not os.path.isdir(path):
        raise ValueError(f"load_hybrid: '{path}' is not a folder (a hybrid is the folder save_hybrid wrote)")
    config = AutoConfig.from_pretrained(path)
    hyb = getattr(config, "hybrid", None)
    if not hyb or "gdn_layers" not in hyb:
        raise ValueError(f"{path} is not a hybrid saved by convert.py (its config.json has no 'hybrid' entry)")
    # Built in `dtype` rather than cast to it afterwards: a cast would also round the kept softmax
    # layers' rotary frequencies, which transformers keeps in fp32 in a bf16 model.
    model = AutoModelForCausalLM.from_config(config, **({"dtype": dtype} if dtype else {}))
    hybridize(model, hyb["gdn_layers"], hyb.get("conv_size", 0), hyb.get("norm_eps", 1e-6), hyb.get("beta_bias", False),
              warn=False)
    model.config.hybrid = {**hyb, **model.config.hybrid}    # what convert.py added (kept_layers, init) stays
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise ValueError(f"load_hybrid: '{path}' has a hybrid's config.json but no .safetensors weights")
    state = {}
    for f in files:
        state.update(load_state_dict(os.path.join(path, f)))
    if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]          # saved once when tied
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
