"""
distill.py -- measuring and training a hybrid against its teacher.

This file holds what every experiment shares: reading text, the perplexity loop, and the record
that goes with every number (commit, device, versions, seed, command).

Perplexity, the usual convention (METHOD section 6): the text is tokenised once, cut into
non-overlapping windows of W tokens (the tail that does not fill a window is dropped), and
ppl = exp(mean NLL over every predicted token of every window), i.e. W - 1 predictions per window,
each window starting with an empty context. Every number is reported with its window size, window
count and token count, because perplexities over different windows are not comparable.

WikiText-2 raw is read as the HF dataset presents it: each line of the file is one row, keeping its
newline, whitespace-only lines become empty rows, and the text is "\\n\\n".join(rows).

Distillation (METHOD section 5), run after the init, the same for every init:

    python distill.py --student HYBRID --stage 1 --tokens 10M --data ../shared/data/corpus --out S1
    python distill.py --student S1     --stage 2 --tokens 30M --data ../shared/data/corpus --out S2
    (budgets cut down for a 135M model; METHOD's reference: 100M and 600M tokens)
    torchrun --standalone --nproc_per_node 8 distill.py ...    (several GPUs of one node: DDP)

On CUDA: fp32 master weights under bf16 autocast (the teacher itself in bf16), the Triton GDN
kernel (gdn_kernel.py, chosen by gdn.py for CUDA tensors), gradient checkpointing (Stage 2), and
gradient accumulation over micro-batches. Several GPUs use torch's DDP: every GPU holds the whole
teacher, student and optimiser state, which fits the paper's 1.5B-3B teachers on 80 GB cards; FSDP
(for larger ones) is not implemented.

Stage 1, per-layer alignment. Teacher forcing: one teacher forward (no grad) records, for every
converted layer l, the input x_l of its attention module (the normalised hidden state, after the
layer's input RMSNorm) and that module's output y_T,l (after W_o).
The student's GDN layer l gets the *same* x_l, and

    L1 = (1/|G|) sum_{l in G} mean_{b,t} ||y_T,l(b,t) - GDN_l(x_l)(b,t)||_2 / sqrt(d)

where G are the converted layers and d the hidden size. Only GDN parameters train. The student's
own forward is never run in Stage 1: with teacher forcing, layer l's input does not depend on the
student's other layers, so the GDN layers are independent problems (coupled only through the one
gradient-norm clip of their shared step), solved side by side, and the cost is one teacher forward
plus the GDN layers (no student MLPs, no LM head, no logits).

Stage 2, end-to-end: the student runs on the same tokens, each layer on the student's own hidden
states (no teacher forcing), and at every position t

    L2 = mean_{b,t} KL(p_T(.|x_<=t) || p_S(.|x_<=t)) = mean_{b,t} sum_v p_T,v (log p_T,v - log p_S,v)

at temperature 1. Every parameter trains, attention (softmax and GDN) at one learning rate, the
rest (MLPs, norms, embeddings, LM head) at a much smaller one.

Token budgets count real tokens: the corpus is packed into full sequences (documents joined by
EOS, no padding), a step consumes --batch sequences of --seq tokens, and a budget of N tokens
gives floor(N / (batch * seq)) steps. The run folder (--out) holds run.json (the configuration,
and the student and texts as digests), metrics.jsonl (one line per step, with this stage's tokens, and
per evaluation, with the tokens seen in every stage so far), checkpoints/ (atomic, every
--ckpt-every steps: weights and optimiser state as safetensors, RNG states, data position, step;
each is a student folder too), and at the end the student itself (loadable by gdn.load_hybrid,
and a --student for Stage 2) and distill.json, written last, which marks the run complete.
--resume continues from the latest checkpoint, and refuses another configuration, or other text
under the same paths. The teacher's validation perplexity on the same windows is logged once at
the start of a run: the yardstick for what follows.

The recovery report (METHOD section 6's claim: a good init needs several times fewer Stage-2 tokens)
compares finished Stage-2 runs of different inits, one of them naive:

    python distill.py --recovery RUN_naive RUN_taylor RUN_ours --results results/recovery/recovery

For each init, the Stage-2 tokens at which validation perplexity first comes within 10, 15, 20 and
25% of the teacher's, and at which it reaches the naive run's final perplexity, interpolated between
evaluation points; the speedup is naive's tokens over the init's.

Throughput and MFU come with every run (distill.json); --profile-steps N adds a torch.profiler
table of where N steps' time went.
"""

import argparse
import contextlib
import datetime
import decimal
import filecmp
import functools
import hashlib
import json
import math
import numbers
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm


# ----------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------

def read_text(path, fmt="auto"):
    """The text of `path`. fmt 'wikitext' applies the WikiText row convention above, 'plain' reads
    the file as it is; 'auto' picks 'wikitext' for files named wiki.*.raw. Fails with a clear
    message on a missing or undecodable file."""
    if not os.path.isfile(path):
        raise ValueError(f"text file '{path}' does not exist or is not a file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"'{path}' is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from None
    if text_format(path, fmt) == "wikitext":
        # A line ends at "\n" alone, as iterating over the file gives them (str.splitlines would also
        # cut at \f, \x1c, \u2028, ...); the last keeps no newline if the file ends without one.
        lines = text.split("\n")
        lines = [line + "\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])
        rows = ["" if not line.strip() else line for line in lines]
        text = "\n\n".join(rows)
    return text


def text_format(path, fmt="auto"):
    """The format read_text reads `path` in: fmt, or for 'auto' the one its name says."""
    if fmt != "auto":
        return fmt
    name = os.path.basename(path)
    return "wikitext" if name.startswith("wiki.") and name.endswith(".raw") else "plain"


def builtin_text(part):
    """Text every Python installation carries, so the main job needs no download: the docstrings
    of a fixed list of standard-library modules and their public members (English technical prose,
    not WikiText; its perplexities are not comparable to published ones, nor across Python versions,
    whose docstrings differ). part 'calib' and 'eval'
    are disjoint halves of the module list, so calibration does not see the evaluation text (but
    for one inherited docstring, email.message.Message's, which http.client.HTTPMessage repeats,
    beyond what the default calibration and probe blocks read)."""
    import importlib
    import inspect
    names = ["argparse", "collections", "functools", "itertools", "json", "logging", "pathlib",
             "subprocess", "textwrap", "unittest", "email.message", "http.client", "decimal",
             "fractions", "statistics", "datetime", "calendar", "csv", "string", "re", "enum",
             "asyncio.tasks", "threading", "multiprocessing.pool", "tarfile", "zipfile", "shutil",
             "os", "socket", "inspect", "pickle", "configparser", "heapq", "bisect", "random"]
    names = names[0::2] if part == "calib" else names[1::2]
    docs = []
    for name in names:
        mod = importlib.import_module(name)
        docs.append(inspect.getdoc(mod) or "")
        for attr in sorted(dir(mod)):
            obj = getattr(mod, attr, None)
            if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 200:
                docs.append(f"{attr}\n\n{doc}")
    return "\n\n".join(d for d in docs if d)


def tokenize(tokenizer, text):
    """One long 1-D LongTensor of token ids (no special tokens added: windows start mid-text)."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def warn_past_trained(config, lengths):
    """A warning for each {option: tokens} longer than the positions the model of `config` was
    trained on (max_position_embeddings): allowed (rotary positions run on, and speed can be
    measured there), but perplexity or statistics then measure extrapolation, rarely what was meant."""
    n = getattr(config, "max_position_embeddings", None)
    for option, length in lengths.items():
        if n and length > n:
            print(f"warning: {option} {length} is past the {n} positions the model was trained on: what is "
                  f"measured at such lengths is its extrapolation", file=sys.stderr, flush=True)


def windows(ids, window, max_windows=None, option="--window", text="the text"):
    """Non-overlapping windows [N, window] of a 1-D id tensor, the tail dropped. `option` names the
    window's command-line option in the error, `text` the text (which option gave it)."""
    n = ids.numel() // window
    if n == 0:
        raise ValueError(f"{text} has {ids.numel()} tokens, fewer than one window of {window}: "
                         f"give a longer text or a smaller {option}")
    if max_windows:
        n = min(n, max_windows)
    return ids[: n * window].view(n, window)


# ----------------------------------------------------------------------------------------------
# Perplexity
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def perplexity(model, ids, window=2048, max_windows=None, batch_size=1, desc="perplexity"):
    """exp(mean next-token NLL) over non-overlapping windows of `ids` (1-D; a [1, L] batch of one is
    taken as its row), the model in eval mode (each module's own mode put back after). Returns a dict
    with the perplexity and what it was measured on."""
    if torch.is_tensor(ids) and ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]                                       # (a tokenizer's return_tensors="pt")
    if not (torch.is_tensor(ids) and ids.dim() == 1 and not ids.is_floating_point()):
        raise ValueError(f"perplexity: ids must be a 1-D tensor of token ids; got "
                         f"{f'shape {list(ids.shape)}, {ids.dtype}' if torch.is_tensor(ids) else type(ids).__name__}")
    for name, value, least in (("window", window, 2), ("batch_size", batch_size, 1), ("max_windows", max_windows or 0, 0)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
            raise ValueError(f"perplexity: {name} must be a whole number >= {least}"
                             f"{' (0 or None: every window)' * (name == 'max_windows')}; got {value!r}")
    x = windows(ids, window, max_windows)
    device = next(model.parameters()).device
    nll = 0.0
    modes = {m: m.training for m in model.modules()}      # (dropout off: the same number every time)
    model.eval()
    try:
        for i in tqdm(range(0, len(x), batch_size), desc=desc, leave=False):
            batch = x[i: i + batch_size].to(device)
            logits = model(batch, use_cache=False).logits
            # The NLL in fp32 a block of a window's positions at a time, as the Stage-2 loss is (_KL):
            # the whole batch's logits in fp32 and cross_entropy's log-softmax of them take 8 bytes a
            # logit where the bf16 logits take 2, 20 GB against 5 at 8 windows of 2048 and Qwen2.5's
            # 152k vocabulary. (Slices of one window, not of the batch flattened: that copies the logits.)
            for b in range(len(batch)):
                for j in range(0, window - 1, KL_ROWS):
                    rows = logits[b, j:min(j + KL_ROWS, window - 1)]
                    nll += F.cross_entropy(rows.float(), batch[b, j + 1:j + 1 + len(rows)], reduction="sum").item()
    finally:
        for m, training in modes.items():
            m.train(training)
    count = x[:, 1:].numel()
    # (in fp64: an fp32 exp is inf past a mean NLL of 88.7, a wrecked student's range)
    ppl = math.exp(nll / count) if nll / count < 709 else float("inf")
    return {"ppl": ppl, "nll": nll / count, "window": window,
            "windows": len(x), "tokens": len(x) * window, "predicted_tokens": count}


# ----------------------------------------------------------------------------------------------
# The record that goes with every measurement
# ----------------------------------------------------------------------------------------------

@functools.cache
def code_version():
    """(commit, dirty) of the checkout this file is in, or (None, None) outside git; read once, at
    the first call. Each script's main() calls it first, so that a run records the code it started
    with even if the checkout moves on (a commit) before its results are written."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=here)
        commit = r.stdout.strip() if r.returncode == 0 else None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, cwd=here).stdout.strip()) if commit else None
    except OSError:
        commit, dirty = None, None
    return commit, dirty


def run_info(seed=None, device=None):
    """Commit, device, versions, seed and command: what anyone needs to reproduce a number. `device`:
    where the measured work ran ("cpu", "cuda" or a torch.device); by default the GPU where there is one."""
    if os.environ.get("GIT_COMMIT"):     # said explicitly: a copy of the tree (a GPU box) whose .git, if
        return {**_machine(seed, device), "commit": os.environ["GIT_COMMIT"], "dirty": None}   # any, is stale
    commit, dirty = code_version()
    return {**_machine(seed, device), "commit": commit, "dirty": dirty}


def _machine(seed, device=None):
    import transformers
    on_gpu = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if on_gpu:
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    return {"device": device, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "seed": seed,
            "command": " ".join(_launcher() + [shlex.join(sys.argv)])}


def _launcher():
    """How the command was started: python, or torchrun with its process count (sys.argv holds
    neither)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and os.environ.get("TORCHELASTIC_RUN_ID"):
        return ["torchrun", f"--nproc_per_node {os.environ.get('LOCAL_WORLD_SIZE', world)}"]
    return [os.path.basename(sys.executable)]


def write_atomic(path, text):
    """Write a text file so that a reader never sees half of it (replace_atomic)."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    replace_atomic(path, write)


def replace_atomic(path, write):
    """write(tmp) fills a temporary file in path's folder, which is then sealed and renamed to path: a
    reader never sees half a file, and a write that fails or is stopped (Ctrl-C, a kill) leaves no
    temporary file behind."""
    if os.path.isdir(path):
        raise ValueError(f"cannot write '{path}': it is a folder")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    os.close(fd)
    try:
        write(tmp)
        seal(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def seal(path):
    """Ready path (a file, or a folder and everything under it) to be renamed into place: give it the
    permissions a plain open() / mkdir would have (tempfile and safetensors' writer make files and
    folders private to their owner, and a published result should be readable like any other), and
    fsync it, so that after a power loss the renamed name never points at empty or partial files
    (a rename is atomic for a killed process without this, not for a crashed machine)."""
    mask = os.umask(0)
    os.umask(mask)
    for root, _, files in os.walk(path, topdown=False):                 # files before their folder
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~mask)
            _fsync(os.path.join(root, f), os.O_RDONLY)
        os.chmod(root, 0o777 & ~mask)
        _fsync(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    if os.path.isfile(path):
        os.chmod(path, 0o666 & ~mask)
        _fsync(path, os.O_RDONLY)
    return path


def _fsync(path, flags):
    try:
        fd = os.open(path, flags)
    except OSError:                     # a folder cannot be opened on some systems (Windows): skip it
        return
    try:
        os.fsync(fd)
    except OSError:                     # nor fsynced on some file systems
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def output_lock(path):
    """Held while a run writes `path` (a hybrid's or a run's folder): another run of this project into
    the same path meanwhile is refused, rather than the two deleting and interleaving each other's
    files. An advisory lock (fcntl.flock) on a file named by the path's real location, kept in /tmp
    (not $TMPDIR, which a job scheduler may set per job: every run on the machine must find it;
    nothing is written beside `path` before the run's own checks); the system drops it when the
    process ends, however it ends. Yields whether it holds one: where there is no flock (Windows) or
    no lock file can be opened, it does not, and runs on other machines are not seen either."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    fd = None
    if fcntl is not None:
        folder = os.path.join("/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir(), "taylor-calibrate-locks")
        name = hashlib.sha1(os.fsencode(os.path.realpath(path))).hexdigest()[:16] + ".lock"
        try:
            if not os.path.isdir(folder):
                os.makedirs(folder, exist_ok=True)
                os.chmod(folder, 0o1777)                # shared as /tmp is: any user's runs lock there
            fd = os.open(os.path.join(folder, name), os.O_RDONLY | os.O_CREAT, 0o666)   # (another's: read-only)
        except OSError:
            fd = None
    if fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ValueError(f"'{path}' is being written by another run, still going: wait for it to end, or "
                             f"choose another output") from None
    try:
        yield fd is not None
    finally:
        if fd is not None:
            os.close(fd)


def left_beside(path, kind):
    """The folders .NAME.KIND-XXXXXXXX (tempfile's 8 characters) beside `path`: what a run into it
    keeps there while it goes, and leaves there when killed."""
    parent, name = os.path.split(os.path.realpath(path))
    try:
        entries = sorted(os.listdir(parent))
    except OSError:                                     # no parent yet, or one that cannot be read
        return []
    pattern = re.compile(re.escape(f".{name}.{kind}-") + r"[a-z0-9_]{8}")
    return [os.path.join(parent, f) for f in entries if pattern.fullmatch(f)
            and os.path.isdir(os.path.join(parent, f)) and not os.path.islink(os.path.join(parent, f))]


def remove_left_beside(path, kinds):
    """What killed runs into `path` left beside it (left_beside), deleted, each said: for each KIND in
    `kinds` ({kind: the only entries such a folder holds, or None: any}). Only holding
    output_lock(path), so that no live run's folder is among them."""
    for kind, holds in kinds.items():
        for folder in left_beside(path, kind):
            with contextlib.suppress(OSError):
                if holds is None or set(os.listdir(folder)) <= set(holds):
                    shutil.rmtree(folder)
                    print(f"removed {folder}, left by a run into {path} that was killed")


def check_apart(out, written=None, **inputs):
    """--out is deleted or replaced by the run: refuse one that is, or holds, an input of the run, or
    one of `written` ({name: path}: what the run writes beside --out, like a scores cache, there yet
    or not), or one that lies inside a hybrid's or a run's folder."""
    o = os.path.realpath(out)
    paths = {**{k: v for k, v in inputs.items() if v and os.path.exists(v)}, **(written or {})}
    for name, path in paths.items():
        if path:
            p = os.path.realpath(path)
            if p == o or p.startswith(o + os.sep):
                raise ValueError(f"--out '{out}' is or holds the {name} '{path}', which the run uses: "
                                 f"choose another --out")
    # Nor inside a hybrid's or a run's folder: a conversion or run into that folder replaces it whole.
    up = os.path.dirname(o)
    while up != os.path.dirname(up):
        mark = project_folder(up)
        if mark:
            raise ValueError(f"--out '{out}' lies inside '{up}', a {'hybrid' if mark == 'conversion.json' else 'run'} "
                             f"folder ({mark}), which a conversion or run into it with --overwrite would delete, "
                             f"this with it: choose an --out outside it")
        up = os.path.dirname(up)


def project_folder(path):
    """'conversion.json' where `path` is a hybrid's folder written by convert.py, 'run.json' where it
    is a distill.py run's, else None (a file of that name written by something else does not count)."""
    for name, key in (("conversion.json", "kept_layers"), ("run.json", "config")):
        try:
            with open(os.path.join(path, name)) as f:
                record = json.load(f)
        except (OSError, ValueError):                   # none there, not JSON
            continue
        if isinstance(record, dict) and key in record:
            return name
    return None


def check_writable(path, what, overwrite=True, inputs=None):
    """Fail before any work where `path` could not be written at the end: the nearest existing folder
    above it must be a writable folder (not a file), and `path` itself no folder (nor, with
    overwrite=False, an existing file), nor an input of the run, nor a file already in an input folder
    (`inputs`: {name: path}, a file or a folder; absent ones and None skipped)."""
    if not path or path.endswith((os.sep, "/")):
        raise ValueError(f"{what} '{path}' names no file: give a file's path")
    # A path with its folder resolved, not its last part: a link as the output is replaced, not followed.
    def as_written(p):
        return os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(p))), os.path.basename(p))
    w = as_written(path)
    parent = os.path.dirname(w)
    for name, src in (inputs or {}).items():
        if not (src and os.path.exists(src)):
            continue
        s = os.path.realpath(src)
        if os.path.isfile(src) and w in (s, as_written(src)):
            raise ValueError(f"{what} '{path}' is the {name} '{src}', which the run reads: choose another path")
        if os.path.isdir(src) and parent == s and os.path.lexists(w):        # (a new file beside them: harmless)
            raise ValueError(f"{what} '{path}' would replace a file of the {name} '{src}', which the run reads: "
                             f"choose another path")
    if not overwrite and os.path.isfile(path):
        raise ValueError(f"{what} '{path}' already exists: pass --overwrite to replace it, or choose another path")
    probe = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{what} '{path}': '{probe}' is not a folder this process can write in")
    if os.path.isdir(path):
        raise ValueError(f"{what} '{path}' is a folder; a file is written there")


def check_results(stem, what="--results", overwrite=True, inputs=None):
    """check_writable for a measurement's stem.json and stem.md."""
    if not stem or stem.endswith((os.sep, "/")):
        raise ValueError(f"{what} '{stem}' names no file stem: give a path like results/NAME (.json and .md are added)")
    for ext in (".json", ".md"):
        check_writable(stem + ext, what, overwrite, inputs)


def write_json(path, obj):
    """`obj` as indented JSON, written atomically (write_atomic)."""
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def read_json(path):
    """The JSON object in `path`; a clear error naming the file when it holds something else."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except ValueError as e:                   # not JSON, or not UTF-8
        raise ValueError(f"'{path}' is not a valid JSON file ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"'{path}' does not hold a JSON object")
    return obj


# ----------------------------------------------------------------------------------------------
# Training data: packed sequences in a seeded order
# ----------------------------------------------------------------------------------------------

def parse_tokens(text, option=None):
    """'30M', '1.5k', '2G' or '123456' -> an int number of tokens. `option` names it in the error."""
    t = str(text).strip().upper()
    scale = {"K": 10**3, "M": 10**6, "G": 10**9, "B": 10**9}.get(t[-1:], 1)
    try:        # decimal, not float: float('4.079616') * 1e6 is 4079615.99..., a step short
        n = decimal.Decimal(t[:-1] if scale > 1 else t) * scale
    except decimal.InvalidOperation:
        n = decimal.Decimal(-1)
    if not (n.is_finite() and 0 <= n < 1e300):                    # (1e999: a typo, not a budget)
        raise ValueError(f"{option + ' ' if option else ''}'{text}' is not a token count "
                         f"(examples: 30M, 500k, 123456)")
    return int(n)


def text_files(path, flag="--data"):
    """A text file, or every .txt file under a folder (sorted: the order is part of the run)."""
    if os.path.isdir(path):
        files = sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs if f.endswith(".txt"))
        if not files:
            raise ValueError(f"{flag} folder '{path}' holds no .txt files")
        return files
    if os.path.isfile(path):
        return [path]
    raise ValueError(f"{flag} '{path}' is neither a text file nor a folder of .txt files")


def _corpus_ids(tokenizer, path):
    """Every document tokenised on its own, the documents joined by EOS: one 1-D id tensor."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    parts = []
    for f in tqdm(text_files(path), desc="tokenising", leave=False):
        parts += [tokenize(tokenizer, read_text(f, "plain")), torch.tensor(eos, dtype=torch.long)]
    return torch.cat(parts)


class Batches:
    """The corpus cut into [N, seq] full sequences (every token real, no padding), served `batch`
    at a time in the order of a permutation seeded by (seed, epoch). The position (epoch, index) is
    all a checkpoint needs to continue the exact same stream; a batch never straddles two epochs."""

    def __init__(self, ids, seq, batch, seed):
        n = ids.numel() // seq
        if n < batch:
            raise ValueError(f"the data has {ids.numel()} tokens = {n} sequences of {seq}, fewer than one batch "
                             f"of {batch} sequences: give more text, or a smaller --batch / --seq")
        self.seqs = ids[: n * seq].view(n, seq)
        self.batch, self.seed = batch, seed
        self.epoch, self.index = 0, 0
        self._order = (None, None)

    def order(self, epoch):
        if self._order[0] != epoch:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % 2**64)   # any seed fits
            self._order = (epoch, torch.randperm(len(self.seqs), generator=g))
        return self._order[1]

    def next(self):
        if self.index + self.batch > len(self.seqs):
            self.epoch, self.index = self.epoch + 1, 0
        rows = self.order(self.epoch)[self.index: self.index + self.batch]
        self.index += self.batch
        return self.seqs[rows]


# ----------------------------------------------------------------------------------------------
# The two losses
# ----------------------------------------------------------------------------------------------

def _stage1_loss(y_teacher, y_student):
    """Mean over converted layers of mean_{b,t} ||y_T - y_S||_2 / sqrt(d). Lists of [B, T, d].
    The norm (not its square) per token: a layer far off does not drown the others, and the
    1/sqrt(d) makes it an RMS error, comparable across model widths. Computed in fp32."""
    per_layer = [torch.linalg.vector_norm(yt.float() - ys.float(), dim=-1).mean() / math.sqrt(yt.shape[-1])
                 for yt, ys in zip(y_teacher, y_student)]
    return torch.stack(per_layer).mean()


KL_ROWS = 1024      # positions a block in the Stage-2 loss and the perplexity (fp32: a few x KL_ROWS x vocab)


def _stage2_loss(teacher_logits, student_logits):
    """mean_{b,t} KL(p_T || p_S) = mean sum_v p_T,v (log p_T,v - log p_S,v), temperature 1, fp32.
    Every position predicts a next token, so every position counts."""
    return _KL.apply(teacher_logits, student_logits)


class _KL(torch.autograd.Function):
    """_stage2_loss, a block of KL_ROWS positions at a time. Written plainly,
        log_t, log_s = log_softmax(t.float()), log_softmax(s.float());  (log_t.exp() * (log_t - log_s)).sum(-1).mean()
    autograd keeps two fp32 [N, V] tensors for the backward (p_T and log p_S) and the forward makes
    more on the way: 8 bytes kept per logit and about twice that at the peak, against 2 for the bf16
    logits themselves. At 4 x 4096 positions and SmolLM2's 49k vocabulary: 6 GiB kept, ~12 at the peak.
    The gradient is known in closed form, d KL_n / d s_n = softmax(s_n) - p_T,n, so each block's
    gradient is formed during the forward, divided by N for the mean, and kept in the logits' own
    dtype: nothing of size [N, V] in fp32 outlives its block (tests/test_distill.py checks both the
    values against the plain form and that only the gradient is kept)."""

    @staticmethod
    def forward(ctx, t, s):
        t2, s2 = t.reshape(-1, t.shape[-1]), s.reshape(-1, s.shape[-1])     # forward runs without autograd
        n = t2.shape[0]
        grad = torch.empty_like(s2)
        total = torch.zeros((), dtype=torch.float32, device=s.device)
        for i in range(0, n, KL_ROWS):
            log_t = F.log_softmax(t2[i:i + KL_ROWS].float(), dim=-1)
            log_s = F.log_softmax(s2[i:i + KL_ROWS].float(), dim=-1)
            p_t = log_t.exp()
            total += (p_t * (log_t - log_s)).sum()
            grad[i:i + KL_ROWS] = (log_s.exp() - p_t) / n
        ctx.save_for_backward(grad)
        ctx.shape = s.shape
        return total / n

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return None, (grad * g.to(grad.dtype)).view(ctx.shape)


class TeacherTaps:
    """Forward hooks on the teacher's attention modules of the converted layers, for the length of
    a `with` block: after a teacher forward inside it, io[l] = (x_l, y_l), the module's input hidden
    states and its output (after W_o). Outside it there are no hooks, so no other teacher forward
    (its perplexity at the start of a run, say) leaves its activations held here."""

    def __init__(self, teacher, layers):
        from gdn import decoder_layers
        self.io, self.modules = {}, {i: decoder_layers(teacher)[i].self_attn for i in layers}

    def __enter__(self):
        self.handles = [m.register_forward_hook(self._hook(i), with_kwargs=True) for i, m in self.modules.items()]
        return self.io

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def _hook(self, i):
        def hook(module, args, kwargs, output):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            y = output[0] if isinstance(output, tuple) else output     # (HF's: (output, weights))
            self.io[i] = (x.detach(), y.detach())
        return hook


class GDNStack(nn.Module):
    """The student's GDN layers side by side (the same module objects, so training them trains the
    student): forward({l: x_l}) -> [GDN_l(x_l)]. The unit Stage 1 trains (and DDP wraps)."""

    def __init__(self, student):
        super().__init__()
        from gdn import gdn_modules
        self.layers = nn.ModuleDict({str(i): m for i, m in gdn_modules(student).items()})

    def forward(self, xs):
        return [self.layers[str(i)](x)[0] for i, x in xs.items()]


def _stage1_step(stack, teacher, layers, ids):
    """L1 on one micro-batch: teacher forward (no grad, only its decoder: no logits), then every GDN
    layer on its teacher-forced input."""
    with torch.no_grad(), TeacherTaps(teacher, layers) as io:
        teacher.model(input_ids=ids, use_cache=False)
    return _stage1_loss([io[i][1] for i in layers], stack({i: io[i][0] for i in layers}))


def _stage2_step(student, teacher, ids):
    """L2 on one micro-batch."""
    with torch.no_grad():
        t = teacher(input_ids=ids, use_cache=False).logits
    return _stage2_loss(t, student(input_ids=ids, use_cache=False).logits)


# ----------------------------------------------------------------------------------------------
# Reference hyperparameters (METHOD section 5): every one an option of the command line
# ----------------------------------------------------------------------------------------------

STAGE_DEFAULTS = {
    1: dict(seq=512, batch=96, lr=1e-3, schedule="cosine", micro_cap=16),
    2: dict(seq=4096, batch=32, lr=1e-4, lr_rest=7e-6, schedule="constant", grad_ckpt=1, micro_cap=2),
}
# Stage 2's alone: Stage 1 trains only the GDN layers, each on the teacher's input to it, so it has no
# "rest" to train and no decoder layers to checkpoint.
STAGE2_ONLY = ("lr_rest", "grad_ckpt")


def _lr_factor(step, total, schedule, warmup=0, min_ratio=0.0):
    """Multiplier of the base learning rate at step `step` (0-based) of `total`: linear warm-up,
    then constant or cosine from 1 towards min_ratio (reached at step `total`, one past the last, so
    the last step trains a little above it). A pure function of the step, so resuming needs nothing
    but the step count."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _param_groups(student, stage, lr, lr_rest):
    """Stage 1: the GDN parameters only (everything else frozen). Stage 2: every attention module's
    parameters (softmax and GDN) at lr, the rest at lr_rest. Names fix the order, so a resumed run
    rebuilds exactly the same groups."""
    from gdn import gdn_modules
    if stage == 1:
        for p in student.parameters():
            p.requires_grad_(False)
        params = [p for _, m in sorted(gdn_modules(student).items()) for p in m.parameters()]
        for p in params:
            p.requires_grad_(True)
        return [{"params": params, "lr": lr, "name": "gdn"}]
    attn, rest = [], []
    for name, p in student.named_parameters():
        p.requires_grad_(True)
        (attn if ".self_attn." in name else rest).append(p)
    return [{"params": attn, "lr": lr, "name": "attention"}, {"params": rest, "lr": lr_rest, "name": "rest"}]


def _matmul_params(module, skip=()):
    """Weights of every nn.Linear inside (a tied LM head counted: its matmul runs anyway)."""
    return sum(m.weight.numel() for n, m in module.named_modules() if isinstance(m, nn.Linear) and n not in skip)


def _mixing_flops(model, seq, only=None):
    """Forward FLOPs per token of the token-mixing products that are not weight matmuls, summed over
    the decoder layers (or the layer indices in `only`), for sequences of `seq` tokens:
      softmax layer, causal (a token sees seq/2 keys on average): QK^T and PV, each 2 FLOPs per
        multiply-add over H heads of dim D:           2 * 2 * (seq / 2) * H * D  =  2 * seq * H * D
      GDN layer, chunked (C = gdn_kernel.CHUNK = 64), per head: inside the chunk Q K^T, K K^T, the W = Tm(beta e^gamma K) and
        U0 = Tm(beta V) products (gdn_kernel's names) and the masked (Q K^T) U readout:   2C (3 Dk + 2 Dv)
        and across chunks q S, W S and the state update K^T (U - W S):   6 Dk Dv.
    Everything counted as computed, the causal zeros inside a chunk included."""
    from gdn import GatedDeltaNet, decoder_layers
    from gdn_kernel import CHUNK
    c = model.config
    total = 0
    for i, layer in enumerate(decoder_layers(model)):
        if only is not None and i not in only:
            continue
        m = layer.self_attn
        if isinstance(m, GatedDeltaNet):
            total += m.num_heads * (2 * CHUNK * (3 * m.head_dim + 2 * m.head_dim) + 6 * m.head_dim * m.head_dim)
        else:
            D = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
            total += 2 * seq * c.num_attention_heads * D
    return total


def _flops_per_token(stage, student, teacher, seq, stack=None):
    """Model FLOPs per trained token: 2 per weight for a forward matmul, 3x that for forward +
    backward, plus the mixing products above (3x as well when trained):
      Stage 1:  teacher forward without its LM head  + 3 x (2 N_gdn + mixing of the GDN layers)
      Stage 2:  teacher forward (2 N_T + mixing_T)   + 3 x (2 N_S + mixing_S)
    Norms, activations and the softmax itself are left out (a few % at most), so Stage 2's MFU is a
    slight underestimate. Stage 1's is an overestimate: its GDN inputs come from the teacher,
    detached, so the backward skips the input gradients of the GDN layers' first projections
    (2 N_in), which the 3x counts (for SmolLM2 at keep 1/4 and seq 512, 12% of the count: MFU reads
    ~14% high). Recomputation under gradient checkpointing is not counted: it is overhead."""
    t = _mixing_flops(teacher, seq)
    if stage == 1:
        gdn = [int(i) for i in stack.layers]
        return 2 * _matmul_params(teacher, skip=("lm_head",)) + t + 3 * (2 * _matmul_params(stack) + _mixing_flops(student, seq, only=gdn))
    return 2 * _matmul_params(teacher) + t + 3 * (2 * _matmul_params(student) + _mixing_flops(student, seq))


# ----------------------------------------------------------------------------------------------
# Several GPUs of one node (torchrun sets the environment; DDP from torch itself)
# ----------------------------------------------------------------------------------------------

DIST_TIMEOUT = datetime.timedelta(hours=1)


class Dist:
    """rank, world size and device of this process; a single process when not under torchrun."""

    def __init__(self, device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "cuda":
            torch.cuda.set_device(local)
            self.device = torch.device("cuda", local)
        else:
            self.device = torch.device("cpu")
        if self.world > 1 and not torch.distributed.is_initialized():
            # Rank 0 alone evaluates, tests and writes checkpoints while the others wait at a barrier:
            # an hour for that, not the default 10 minutes, past which NCCL would end the run.
            torch.distributed.init_process_group("nccl" if device == "cuda" else "gloo", timeout=DIST_TIMEOUT)
        self.main = self.rank == 0

    def mean(self, x):
        """The mean of a scalar tensor over all processes."""
        if self.world > 1:
            x = x.clone()
            torch.distributed.all_reduce(x)
            x /= self.world
        return x

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    def gather(self, obj):
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out


# ----------------------------------------------------------------------------------------------
# Checkpoints: safetensors for weights (through transformers) and optimiser state, JSON for the rest
# ----------------------------------------------------------------------------------------------

def _rng_state():
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return state


def _save_checkpoint(folder, step, student, opt, rngs, state, tokenizer=None, records=None):
    """checkpoints/step_N, written into a temporary folder and renamed; then the `latest` pointer
    is rewritten atomically. A kill at any moment leaves `latest` pointing at a complete checkpoint;
    a failed write (a full disk) leaves nothing behind. Older checkpoints stay until the next step
    proves this one (_prune_checkpoints). A checkpoint is a student folder too (weights, tokenizer,
    conversion.json): --student for a new run, e.g. after a divergence."""
    root = os.path.join(folder, "checkpoints")
    os.makedirs(root, exist_ok=True)
    name = f"step_{step:08d}"
    tmp = tempfile.mkdtemp(dir=root, prefix=f".tmp-{name}-")
    try:
        _write_checkpoint(tmp, student, opt, rngs, state, tokenizer, records)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final = os.path.join(root, name)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_atomic(os.path.join(root, "latest"), name + "\n")
    return final


def _write_checkpoint(tmp, student, opt, rngs, state, tokenizer, records):
    from safetensors.torch import save_file
    from gdn import save_hybrid
    save_hybrid(student, tokenizer, tmp)                                # model.safetensors + config
    for name, obj in (records or {}).items():                           # (conversion.json)
        write_json(os.path.join(tmp, name), obj)
    sd = opt.state_dict()
    tensors = {f"{i}.{k}": v.detach().cpu().contiguous() for i, s in sd["state"].items() for k, v in s.items()}
    # The training state sits in a subfolder: the checkpoint itself stays a folder load_hybrid reads.
    os.makedirs(os.path.join(tmp, "train_state"))
    save_file(tensors, os.path.join(tmp, "train_state", "optimizer.safetensors"))
    save_file({f"rank{r}.{k}": v.contiguous() for r, states in enumerate(rngs) for k, v in states.items()},
              os.path.join(tmp, "train_state", "rng.safetensors"))
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    write_json(os.path.join(tmp, "train_state", "state.json"), {**state, "param_groups": groups})
    seal(tmp)


def _checkpoints(folder, below=None):
    """The run's checkpoint folders up to the one `latest` names, oldest first (one renamed into
    place by a write killed before `latest` was updated is not one of them), or those of fewer than
    `below` steps."""
    root = os.path.join(folder, "checkpoints")
    latest = _latest_checkpoint(folder)
    if latest is None:
        return []
    last = int(os.path.basename(latest)[len("step_"):])
    last = last if below is None else min(last, below - 1)
    steps = sorted(int(d[len("step_"):]) for d in os.listdir(root)
                   if d.startswith("step_") and d[len("step_"):].isdigit())
    return [os.path.join(root, f"step_{n:08d}") for n in steps if n <= last]


def _prune_checkpoints(folder, keep):
    """All but the newest `keep` checkpoints go, and what a killed write left (temporary files, a
    checkpoint newer than `latest`). Called once a step after the newest has a finite loss: a
    checkpoint's weights are proven by the step after it, so until then the one before it stays
    (a divergence right after a checkpoint still has one to start from)."""
    root = os.path.join(folder, "checkpoints")
    if not os.path.isdir(root):
        return
    kept = set(_checkpoints(folder)[-keep:])
    for d in os.listdir(root):
        if d.startswith("step_") and os.path.join(root, d) not in kept:
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    _remove_leftovers(root)                                     # (folders, or `latest`'s files)


def _remove_leftovers(folder, prefixes=(".tmp-",)):
    """The temporary files and folders a killed write left in `folder` (write_atomic's, a checkpoint's,
    _save_student's .final.tmp-*)."""
    for f in os.listdir(folder):
        if f.startswith(prefixes):
            path = os.path.join(folder, f)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.remove(path)


def _latest_checkpoint(folder):
    path = os.path.join(folder, "checkpoints", "latest")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return os.path.join(folder, "checkpoints", f.read().strip())


def _load_checkpoint(path, opt, rank, world):
    """Optimiser state and this process's RNG back from a checkpoint; returns its state.json.
    (The weights are loaded by gdn.load_hybrid on the same folder.)"""
    from transformers.modeling_utils import load_state_dict
    path = os.path.join(path, "train_state")
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    flat = load_state_dict(os.path.join(path, "optimizer.safetensors"))
    per = {}
    for key, v in flat.items():
        i, k = key.split(".", 1)
        per.setdefault(int(i), {})[k] = v
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in state["param_groups"]]
    opt.load_state_dict({"state": per, "param_groups": groups})
    if state["world"] == world:
        rng = load_state_dict(os.path.join(path, "rng.safetensors"))
        torch.set_rng_state(rng[f"rank{rank}.cpu"])
        for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
            if f"rank{rank}.cuda{i}" in rng:
                torch.cuda.set_rng_state(rng[f"rank{rank}.cuda{i}"], i)
    return state


# ----------------------------------------------------------------------------------------------
# The run folder's metrics file
# ----------------------------------------------------------------------------------------------

class Metrics:
    """metrics.jsonl: one JSON object a line, written (by the main process) as the run goes."""

    def __init__(self, path, enabled, keep_until_step=None):
        self.path, self.enabled = path, enabled
        if enabled and keep_until_step is not None:
            # Resuming: lines logged after the checkpoint are redone, so they are dropped first.
            lines = []
            if os.path.exists(path):
                with open(path) as f:
                    lines = [l for l in f if l.strip()]
            kept = []
            for n, line in enumerate(lines):
                try:
                    rec = json.loads(line)
                except ValueError:
                    if n < len(lines) - 1:
                        raise ValueError(f"{path}: line {n + 1} is not JSON; the run's log is damaged") from None
                    print(f"warning: {path}: its last line was cut off (a killed write); dropped", file=sys.stderr)
                    continue
                if rec["step"] <= keep_until_step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            write_atomic(path, "".join(kept))

    def log(self, record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def sync(self):
        """On disk before a checkpoint is: a resume then finds every line up to its step."""
        if self.enabled and os.path.exists(self.path):
            seal(self.path)


class Diverged(RuntimeError):
    pass


def _restart_from(a, step):
    """Where a diverged run can start again: its newest checkpoint whose weights are proven (a
    checkpoint written at `step`, the step that diverged, holds the weights that gave the loss)."""
    good = _checkpoints(a.out, below=step)
    if not good:
        return f"no checkpoint before it was kept: start a new run from the student ({a.student})"
    if not os.path.isfile(os.path.join(good[-1], "conversion.json")):    # (written by an earlier version)
        return (f"the last good checkpoint is {good[-1]}; to start a new run from it, copy the student's "
                f"conversion.json and tokenizer files into it (or a copy of it) and pass it as --student")
    return (f"start a new run from the last good checkpoint, --student {good[-1]} (a student folder; copy "
            f"it elsewhere first if this run will go on, which would delete it)")


# ----------------------------------------------------------------------------------------------
# The training loop both stages share
# ----------------------------------------------------------------------------------------------

def _train(run, student, data, model, step_fn, groups):
    """Optimise `model` (the student, or Stage 1's GDN stack; DDP-wrapped under torchrun) with
    step_fn(model, ids) -> loss. Global batch = run.args.batch sequences, split over processes, then
    into micro-batches whose gradients accumulate. Evaluates, checkpoints, stops on a non-finite
    loss. Returns the list of per-step records this process ran."""
    a, dist = run.args, run.dist
    opt = torch.optim.AdamW(groups, lr=a.lr, betas=(a.beta1, a.beta2), weight_decay=a.weight_decay)
    base = [g["lr"] for g in opt.param_groups]
    params = [p for g in groups for p in g["params"]]
    start = 0
    if run.resume_from:
        state = _load_checkpoint(run.resume_from, opt, dist.rank, dist.world)
        start, data.epoch, data.index = state["step"], state["data_epoch"], state["data_index"]
    # Lines past the checkpoint are redone; at step 0 (no checkpoint yet) everything is.
    metrics = Metrics(os.path.join(a.out, "metrics.jsonl"), dist.main, keep_until_step=start if start else -1)
    per_rank = a.batch // dist.world
    tokens_per_step = a.batch * a.seq
    prune = dist.main                                  # (a resumed run's older checkpoints, too)
    records = []
    bar = tqdm(range(start, run.steps), desc=f"stage {a.stage}", initial=start, total=run.steps,
               disable=not dist.main)
    if start == 0:
        _evaluate(run, student, 0, metrics, teacher=run.teacher)
    prof = None

    def end_profile():
        nonlocal prof
        if prof is not None:
            _report_profile(prof, a, dist)
            prof = None

    for step in bar:
        if a.profile_steps and step == start + 2:     # after warm-up: compilation stays out of it
            prof = profiler(torch.profiler.ProfilerActivity.CPU, *(
                [torch.profiler.ProfilerActivity.CUDA] if dist.device.type == "cuda" else []))
            prof.__enter__()
        if step == start + 2 + a.profile_steps:
            end_profile()
        t0 = time.time()
        rows = data.next().view(dist.world, per_rank, a.seq)[dist.rank]
        micro = rows.split(a.micro_batch)
        loss_sum = 0.0
        for j, ids in enumerate(micro):
            # DDP: all-reduce gradients only on the last micro-batch of the step.
            quiet = dist.world > 1 and j < len(micro) - 1
            with (model.no_sync() if quiet else contextlib.nullcontext()), run.autocast():
                loss = step_fn(model, ids.to(dist.device))
            (loss / len(micro)).backward()
            loss_sum = loss_sum + loss.detach()
        loss = dist.mean(loss_sum / len(micro)).item()
        grad_norm = float(nn.utils.clip_grad_norm_(params, a.clip))
        tokens = (step + 1) * tokens_per_step
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise Diverged(f"stage {a.stage}: loss {loss} / gradient norm {grad_norm} at step {step + 1} "
                           f"({tokens} tokens): stopping without saving. The run is deterministic (up to some "
                           f"CUDA backward kernels), so --resume would most likely meet the same step again: "
                           f"{_restart_from(a, step)}, with other settings (e.g. a lower --lr)")
        if prune:
            _prune_checkpoints(a.out, a.keep_checkpoints)
            prune = False
        f = _lr_factor(step, run.steps, a.schedule, a.warmup_steps, a.min_lr_ratio)
        for g, b in zip(opt.param_groups, base):
            g["lr"] = b * f
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dist.device.type == "cuda":
            torch.cuda.synchronize()                    # the step's time, not its launch time
        dt = time.time() - t0
        rec = {"type": "train", "stage": a.stage, "step": step + 1, "tokens": tokens, "loss": loss,
               "grad_norm": grad_norm, "lr": base[0] * f, "seconds": dt, "tokens_per_s": tokens_per_step / dt}
        records.append(rec)
        metrics.log(rec)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_step / dt:,.0f}")
        if a.eval_every and tokens // a.eval_every > (tokens - tokens_per_step) // a.eval_every \
                and step + 1 < run.steps:
            _evaluate(run, student, step + 1, metrics)
        if a.ckpt_every and (step + 1) % a.ckpt_every == 0 and step + 1 < run.steps:
            rngs = dist.gather(_rng_state())
            if dist.main:
                metrics.sync()
                _save_checkpoint(a.out, step + 1, student, opt, rngs, {
                    "step": step + 1, "tokens": tokens, "data_epoch": data.epoch, "data_index": data.index,
                    "tokens_by_stage": _tokens_by_stage(run.prior_tokens, a.stage, tokens),
                    "world": dist.world, "config": run.config}, run.tokenizer,
                    {"conversion.json": run.conversion})
                prune = True
            dist.barrier()
        if a.stop_after_steps and step + 1 - start >= a.stop_after_steps and step + 1 < run.steps:
            end_profile()
            bar.close()
            run.stopped = True
            return records
    end_profile()                                     # the run may end inside the profiled steps
    bar.close()
    _evaluate(run, student, run.steps, metrics)
    return records


def profiler(*activities):
    """A torch.profiler over `activities` that tears CUPTI down when it stops. Unless told to
    (TEARDOWN_CUPTI=1), the profiler leaves CUPTI attached, and every kernel launched after it pays
    for that: on an H100, convert.py --bench's batch-1 steps timed after a profiled step ran
    0.65 / 0.82 / 1.04 ms (keep 1/4 / keep 1/2 / teacher) against 0.61 / 0.73 / 0.90 without one, and
    0.62 / 0.71 / 0.91 after one made here (results/inference_h100_b1_*.md)."""
    os.environ.setdefault("TEARDOWN_CUPTI", "1")
    return torch.profiler.profile(activities=list(activities))


def _report_profile(prof, a, dist):
    """--profile-steps: where the profiled steps' time went, by operator (device time first on a
    GPU), printed and saved as profile.txt in the run folder."""
    prof.__exit__(None, None, None)
    if not dist.main:
        return
    key = "self_cuda_time_total" if dist.device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60)
    cpu = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60)
    text = f"stage {a.stage}, {a.profile_steps} steps after 2 warm-up steps, by {key}:\n{table}\nby self CPU time:\n{cpu}"
    write_atomic(os.path.join(a.out, "profile.txt"), text)
    print(text)


def _evaluate(run, student, step, metrics, teacher=None):
    """Validation perplexity (main process only), logged with the tokens seen in every stage. With
    `teacher` (at the start of a run), the teacher's on the same windows too: the yardstick the
    recovery report measures the student against."""
    a = run.args
    if teacher is not None and run.eval_ids is not None and run.dist.main:
        with run.autocast():
            ppl = perplexity(teacher, run.eval_ids, a.eval_window, a.eval_max_windows or None,
                             a.eval_batch_size, desc="teacher ppl")
        metrics.log({"type": "teacher_eval", "stage": a.stage, "step": 0, "data": a.eval_data, "ppl": ppl["ppl"],
                     "nll": ppl["nll"], "window": ppl["window"], "windows": ppl["windows"],
                     "eval_tokens": ppl["tokens"]})
    if run.eval_ids is not None and run.dist.main:
        # (perplexity puts each module's own mode back: Stage 1 trains a stack of GDN layers in an
        # eval-mode model)
        with run.autocast():
            ppl = perplexity(student, run.eval_ids, a.eval_window, a.eval_max_windows or None,
                             a.eval_batch_size, desc="eval ppl")
        tokens = step * a.batch * a.seq
        rec = {"type": "eval", "stage": a.stage, "step": step, "tokens": tokens,
               "tokens_by_stage": _tokens_by_stage(run.prior_tokens, a.stage, tokens), "data": a.eval_data,
               "ppl": ppl["ppl"], "nll": ppl["nll"], "window": ppl["window"], "windows": ppl["windows"],
               "eval_tokens": ppl["tokens"]}
        metrics.log(rec)
    run.dist.barrier()


def _check_pair(student, teacher):
    """Distillation trains a hybrid against its teacher: both must be what they say."""
    from gdn import check_teacher, gdn_modules
    if not gdn_modules(student):
        raise ValueError("the student has no GDN layers: convert a teacher first (convert.py, or gdn.hybridize)")
    check_teacher(teacher, student)


def stage1(run, student, teacher, data):
    """Stage 1: per-layer alignment of every GDN layer to its teacher attention layer, teacher-forced.

    stage1 and stage2 are the training loops behind the command line: `run` carries its parsed
    arguments. From Python, the least that drives one (it writes metrics.jsonl into --out):
        a = parse_args(["--student", "S", "--stage", "1", "--data", "T", "--out", "O", "--tokens", "65536",
                        "--eval-data", "none", "--test-data", "none", "--device", "cpu"])
        run = Run(a, Dist(a.device), check_shapes(a, 1), {}, None, None, 0, teacher, None, {})
        stage1(run, student, teacher, Batches(ids, a.seq, a.batch, a.seed))"""
    _check_pair(student, teacher)
    groups = _param_groups(student, 1, run.args.lr, run.args.lr_rest)
    stack = GDNStack(student).train()
    layers = sorted(int(i) for i in stack.layers)
    model = stack if run.dist.world == 1 else nn.parallel.DistributedDataParallel(stack)
    run.flops_per_token = _flops_per_token(1, student, teacher, run.args.seq, stack)
    return _train(run, student, data, model, lambda m, ids: _stage1_step(m, teacher, layers, ids), groups)


def stage2(run, student, teacher, data):
    """Stage 2: end-to-end KL distillation of the whole student (driven as stage1's docstring shows)."""
    _check_pair(student, teacher)
    groups = _param_groups(student, 2, run.args.lr, run.args.lr_rest)
    student.train()
    if run.args.grad_ckpt:
        # Recompute each (every n-th) decoder layer in the backward instead of keeping its activations:
        # at seq 4096 the activations, not the weights, are what fill the GPU.
        kw = {"use_reentrant": False}
        if hasattr(student, "activation_checkpointing_enable"):
            student.activation_checkpointing_enable(kw, every_n_layers=run.args.grad_ckpt)
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    model = student if run.dist.world == 1 else nn.parallel.DistributedDataParallel(student)
    run.flops_per_token = _flops_per_token(2, student, teacher, run.args.seq)
    return _train(run, student, data, model, lambda m, ids: _stage2_step(m, teacher, ids), groups)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

HERE = os.path.dirname(os.path.abspath(__file__))
WIKI = os.path.join(HERE, "..", "shared", "data", "wikitext-2-raw")


def parse_args(argv, prog=None, chain=False):
    """distill.py's arguments; prog: the name its errors go under (convert.py's chain names itself).
    chain: one set of options for both stages (convert.py's chain), so Stage 1 drops Stage 2's own
    options instead of refusing them."""
    p = argparse.ArgumentParser(prog=prog, description="Stage 1 / Stage 2 distillation of a hybrid from convert.py",
                                epilog="Also: distill.py --recovery RUN [RUN ...] [--results STEM] [--overwrite], the "
                                       "report comparing finished Stage-2 runs of different inits (one of them naive)")
    p.add_argument("--student", required=True, help="hybrid folder written by convert.py (or by a previous stage)")
    p.add_argument("--stage", type=int, required=True, choices=[1, 2])
    p.add_argument("--tokens", required=True, help="token budget of this stage (30M, 500k, 123456)")
    p.add_argument("--data", required=True, help="training text: a file or a folder of .txt files")
    p.add_argument("--out", required=True, help="run folder; ends up holding the distilled student")
    p.add_argument("--teacher", help="teacher spec for convert.load_teacher (default: the one recorded in "
                                     "the student's conversion.json)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete an existing --out's run once this one has passed its "
                   "checks and loaded its models (not when it ends: stopped or failed after that, it leaves "
                   "nothing of the old one) and start afresh")
    g = p.add_argument_group("hyperparameters (default: the reference's for the stage)")
    g.add_argument("--seq", type=int, help="sequence length (1: 512, 2: 4096)")
    g.add_argument("--batch", type=int, help="global batch in sequences (1: 96, 2: 32)")
    g.add_argument("--micro-batch", type=int, help="sequences per forward per GPU (default: the largest "
                                                   "divisor of batch/GPUs up to 16 (1) or 2 (2))")
    g.add_argument("--lr", type=float, help="learning rate (1: 1e-3 on GDN; 2: 1e-4 on attention and GDN)")
    g.add_argument("--lr-rest", type=float, help="stage 2 only: learning rate of everything else (7e-6)")
    g.add_argument("--schedule", choices=["cosine", "constant"], help="1: cosine, 2: constant")
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine floor as a fraction of --lr")
    g.add_argument("--beta1", type=float, default=0.9)
    g.add_argument("--beta2", type=float, default=0.95)
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (torch's default; the "
                                                                    "reference does not state one)")
    g.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    g.add_argument("--grad-ckpt", type=int, help="stage 2 only: gradient checkpointing of every n-th decoder "
                                                 "layer, 0: off (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="data order and everything random")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when there is one")
    p.add_argument("--amp", type=int, choices=[0, 1], help="bf16 autocast, CUDA only (default: 1 on CUDA, 0 on CPU)")
    e = p.add_argument_group("evaluation")
    e.add_argument("--eval-data", default=os.path.join(WIKI, "wiki.valid.raw"),
                   help="validation text (default: WikiText-2 raw validation); 'none' to skip")
    e.add_argument("--eval-every", default="0", help="evaluate every this many tokens (and at start and end)")
    e.add_argument("--eval-window", type=int, default=2048, help="tokens a window, for both texts (default 2048)")
    e.add_argument("--eval-max-windows", type=int, default=0, help="at most this many windows of --eval-data "
                   "(0: all); --test-data is read whole")
    e.add_argument("--eval-batch-size", type=int, default=0, help="0: 1 on CPU, 8 on CUDA")
    e.add_argument("--test-data", default=os.path.join(WIKI, "wiki.test.raw"),
                   help="final-number text, evaluated once at the end (default: WikiText-2 test); 'none' to skip")
    c = p.add_argument_group("checkpoints and measurement")
    c.add_argument("--ckpt-every", type=int, default=100, help="checkpoint every this many steps (0: never)")
    c.add_argument("--keep-checkpoints", type=int, default=1,
                   help="how many of the newest checkpoints stay (the one before the newest also stays "
                        "until a step after the newest has a finite loss)")
    c.add_argument("--stop-after-steps", type=int, default=0,
                   help="stop after this many steps of this process, as if killed (but exit 0): no checkpoint is "
                        "written, --resume goes on from the last --ckpt-every one (tests of resuming)")
    c.add_argument("--profile-steps", type=int, default=0, help="profile this many steps (after 2 warm-up "
                   "steps) with torch.profiler: the top operators go to the screen and to OUT/profile.txt")
    c.add_argument("--peak-tflops", type=float, default=989.0,
                   help="per-GPU peak for MFU (H100 SXM dense bf16: 989)")
    a = p.parse_args(argv)
    if not -2**63 <= a.seed < 2**64:                                  # (what torch.manual_seed takes)
        raise ValueError(f"--seed must fit in 64 bits (got {a.seed})")
    if a.stage == 1:
        given = ["--" + k.replace("_", "-") for k in STAGE2_ONLY if getattr(a, k) is not None]
        if given and not chain:
            raise ValueError(f"{' and '.join(given)}: Stage 2's options; Stage 1 trains only the GDN layers, each "
                             f"on its own, and would ignore them: drop them (convert.py's chain passes them to "
                             f"Stage 2 only)")
        for k in STAGE2_ONLY:
            setattr(a, k, None)
        a.stage2_given = given                      # (the chain refuses them where it runs no Stage 2)
    schedule_given = a.schedule is not None
    for k, v in STAGE_DEFAULTS[a.stage].items():
        if k != "micro_cap" and getattr(a, k) is None:
            setattr(a, k, v)
    if a.resume and a.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
    # Settings that would do nothing are refused here and in check_shapes, but not on --resume (a run
    # begun before they were keeps its settings). convert.py's chain gives both stages one
    # --distill-args: a floor meant for Stage 1's cosine is not refused in Stage 2's constant default,
    # as Stage 2's options are not in Stage 1.
    if a.min_lr_ratio and a.schedule == "constant" and (schedule_given or not chain) and not a.resume:
        whose = "--schedule constant" if schedule_given else f"Stage {a.stage}'s constant schedule"
        raise ValueError(f"--min-lr-ratio is the cosine schedule's floor; {whose} never reads it: drop it, or "
                         f"pass --schedule cosine")
    a.tokens = parse_tokens(a.tokens, "--tokens")
    a.eval_every = parse_tokens(a.eval_every, "--eval-every")
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: this machine has no CUDA GPU (or this torch build has no CUDA)")
    if a.amp is None:
        a.amp = int(a.device == "cuda")
    if a.amp and a.device != "cuda":
        raise ValueError("--amp 1 is bf16 autocast on CUDA; on a CPU it would do nothing (and be recorded as done)")
    a.eval_batch_size = a.eval_batch_size or (8 if a.device == "cuda" else 1)
    for name in ("eval_data", "test_data"):
        v = getattr(a, name)
        setattr(a, name, None if v in (None, "", "none") else os.path.abspath(v))
        if getattr(a, name) and not os.path.isfile(getattr(a, name)):       # before the corpus is read
            raise ValueError(f"--{name.replace('_', '-')} '{v}' does not exist or is not a file ('none' skips it)")
    if a.eval_every and not a.eval_data and not a.resume:
        raise ValueError("--eval-every evaluates on --eval-data, which is 'none': give one or drop --eval-every")
    a.student, a.data, a.out = (os.path.abspath(x) for x in (a.student, a.data, a.out))
    check_apart(a.out, student=a.student, data=a.data, **{"eval data": a.eval_data, "test data": a.test_data})
    if not (chain or os.path.isfile(a.out)):    # (made once the student and data have loaded: said now if it
        check_writable(os.path.join(a.out, "run.json"), "--out")    # cannot be; the chain's, by convert.py)
    if os.path.isdir(a.data) and os.path.realpath(a.out).startswith(os.path.realpath(a.data) + os.sep):
        raise ValueError(f"--out '{a.out}' lies inside --data '{a.data}': the run's own .txt files would become "
                         f"training text; choose another --out")
    for flag, path in (("--eval-data", a.eval_data), ("--test-data", a.test_data)):
        same = [f for f in (text_files(a.data) if path and os.path.exists(a.data) else [])
                if os.path.getsize(f) == os.path.getsize(path) and filecmp.cmp(f, path, shallow=False)]
        if same:
            raise ValueError(f"--data holds {flag}'s text ('{same[0]}'): the run would be measured on what it "
                             f"trained on; give other texts")
    return a


def check_shapes(a, world):
    """The batch arithmetic and the other numbers, checked before anything is loaded; returns the
    number of optimiser steps, and sets a.micro_batch where it was left to choose (None)."""
    if a.seq < 2 or a.batch < 1:
        raise ValueError(f"--seq must be >= 2 and --batch >= 1 (got {a.seq}, {a.batch})")
    if a.eval_window < 2 or a.eval_batch_size < 0:
        raise ValueError(f"--eval-window must be >= 2 and --eval-batch-size >= 0 (got {a.eval_window}, "
                         f"{a.eval_batch_size})")
    if not a.clip > 0 or not a.peak_tflops > 0:
        raise ValueError(f"--clip and --peak-tflops must be positive (got {a.clip}, {a.peak_tflops})")
    for option, value, ok, rule in (
            ("--lr", a.lr, a.lr > 0, "> 0"),
            ("--beta1", a.beta1, 0 <= a.beta1 < 1, "in [0, 1)"), ("--beta2", a.beta2, 0 <= a.beta2 < 1, "in [0, 1)"),
            ("--weight-decay", a.weight_decay, a.weight_decay >= 0, ">= 0"),
            ("--min-lr-ratio", a.min_lr_ratio, 0 <= a.min_lr_ratio <= 1, "in [0, 1]"),
            ("--warmup-steps", a.warmup_steps, a.warmup_steps >= 0, ">= 0"),
            ("--eval-max-windows", a.eval_max_windows, a.eval_max_windows >= 0, ">= 0"),
            ("--ckpt-every", a.ckpt_every, a.ckpt_every >= 0, ">= 0"),
            ("--keep-checkpoints", a.keep_checkpoints, a.keep_checkpoints >= 1, ">= 1"),
            ("--stop-after-steps", a.stop_after_steps, a.stop_after_steps >= 0, ">= 0"),
            ("--profile-steps", a.profile_steps, a.profile_steps >= 0, ">= 0"),
            *([("--lr-rest", a.lr_rest, a.lr_rest >= 0, ">= 0"), ("--grad-ckpt", a.grad_ckpt, a.grad_ckpt >= 0, ">= 0")]
              if a.stage == 2 else [])):
        if not (ok and math.isfinite(value)):                   # a NaN fails every comparison
            raise ValueError(f"{option} must be {rule} (got {value})")
    if a.batch % world:
        raise ValueError(f"--batch {a.batch} does not split over {world} processes")
    per_rank = a.batch // world
    if a.micro_batch is None:
        cap = STAGE_DEFAULTS[a.stage]["micro_cap"]
        a.micro_batch = max(d for d in range(1, min(cap, per_rank) + 1) if per_rank % d == 0)
    if a.micro_batch < 1 or per_rank % a.micro_batch:
        raise ValueError(f"--micro-batch {a.micro_batch} does not divide the {per_rank} sequences per process")
    step_tokens = a.batch * a.seq
    if a.tokens < step_tokens:
        raise ValueError(f"--tokens {a.tokens} is smaller than one step (batch {a.batch} x seq {a.seq} = "
                         f"{step_tokens} tokens)")
    steps = a.tokens // step_tokens
    if a.profile_steps and steps <= 2 and not a.resume:
        raise ValueError(f"--profile-steps profiles the steps after the first 2 (they compile and warm up); "
                         f"this Stage {a.stage} run has {steps}")
    if a.warmup_steps > steps and not a.resume:
        raise ValueError(f"--warmup-steps {a.warmup_steps} is longer than this Stage {a.stage} run's {steps} steps "
                         f"(--tokens {a.tokens} / {step_tokens} a step): the learning rate would never reach --lr")
    return steps


def _tokens_by_stage(prior, stage, tokens):
    """The tokens seen in each stage so far: the student's earlier runs (`prior`, from its
    distill.json) plus this run's `tokens` of `stage` (a stage run again on its own output adds up)."""
    return {**prior, str(stage): prior.get(str(stage), 0) + tokens}


def _read_student(path):
    """The student folder's conversion record; a clear error unless convert.py (or a stage) wrote it."""
    record = os.path.join(path, "conversion.json")
    if not os.path.isdir(path):
        raise ValueError(f"--student '{path}' is not a folder")
    if not os.path.isfile(os.path.join(path, "config.json")) or not os.path.isfile(record):
        raise ValueError(f"--student '{path}' is not a hybrid written by convert.py (no config.json + conversion.json)")
    hybrid = read_json(os.path.join(path, "config.json")).get("hybrid")
    if not hybrid:
        raise ValueError(f"--student '{path}' is not a hybrid written by convert.py (its config has no 'hybrid' entry)")
    if not hybrid.get("gdn_layers"):
        raise ValueError(f"--student '{path}' has no GDN layers (every layer was kept): nothing to distil")
    if not any(f.endswith(".safetensors") for f in os.listdir(path)):
        raise ValueError(f"--student '{path}' holds no weights (no .safetensors file)")
    if os.path.isfile(os.path.join(path, "run.json")) and not os.path.isfile(os.path.join(path, "distill.json")):
        raise ValueError(f"--student '{path}' is a distillation run that did not finish (run.json but no distill.json): "
                         f"finish it with --resume, or start from the hybrid it began with")
    conversion = read_json(record)
    prior = {}
    if os.path.isfile(os.path.join(path, "distill.json")):
        prior = read_json(os.path.join(path, "distill.json")).get("tokens_by_stage", {})
    elif os.path.isfile(os.path.join(path, "train_state", "state.json")):      # a checkpoint of a run
        prior = read_json(os.path.join(path, "train_state", "state.json")).get("tokens_by_stage", {})
    return conversion, prior


def _teacher_spec(a, conversion):
    spec = a.teacher or conversion.get("teacher_spec")
    if spec is None and str(conversion.get("teacher", "")).startswith("default"):
        spec = "default"
    if spec is None:
        raise ValueError("the student's conversion.json does not say how to load its teacher: pass --teacher")
    # A local path that is not there: said now, not after the corpus is tokenised (hub ids and
    # random shapes are left to load_teacher).
    from convert import RANDOM_SHAPES, local_path                    # lazy: convert imports distill
    path = spec.removeprefix("random:")
    if spec != "default" and local_path(path) and not os.path.exists(path):
        raise ValueError(f"teacher '{spec}' does not exist" +
                         ("" if a.teacher else " (recorded in the student's conversion.json; pass --teacher)"))
    if spec.startswith("random:") and path not in RANDOM_SHAPES and not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"random teacher '{path}': not a shape ({', '.join(RANDOM_SHAPES)}) nor a folder with a "
                         f"config.json")
    return spec


def _check_teacher(teacher, t_tok, s_config, s_tok, conversion):
    """The teacher must speak the student's vocabulary, have its shape (same layers, same width) and,
    where the conversion recorded them in a dtype this teacher holds as precisely or more, its
    weights (a teacher of the same shape and vocabulary with other weights would teach another model;
    a teacher held in bfloat16 against a float32 conversion from before teacher_weights_bf16 was
    recorded is not checked)."""
    if len(t_tok) != len(s_tok) or t_tok.get_vocab() != s_tok.get_vocab() \
            or teacher.config.vocab_size != s_config.vocab_size:
        raise ValueError(f"the teacher's tokenizer differs from the student's ({len(t_tok)} vs {len(s_tok)} "
                         f"tokens, vocab_size {teacher.config.vocab_size} vs {s_config.vocab_size}): "
                         f"distillation compares distributions over the same vocabulary; pass the student's teacher")
    for k in ("num_hidden_layers", "hidden_size"):
        if getattr(teacher.config, k) != getattr(s_config, k):
            raise ValueError(f"the teacher's {k} ({getattr(teacher.config, k)}) differs from the student's "
                             f"({getattr(s_config, k)}): not this student's teacher")
    # The conversion's dtype first; a float32 conversion also records bfloat16's (a run on a GPU).
    recorded = [(conversion.get("dtype"), conversion.get("teacher_weights")),
                ("bfloat16", conversion.get("teacher_weights_bf16"))]
    held = next(teacher.parameters()).dtype
    for dtype, want in ((getattr(torch, str(n), None), w) for n, w in recorded):
        if want and isinstance(dtype, torch.dtype) and held.itemsize >= dtype.itemsize:
            have = weights_digest(teacher, dtype)
            if have != want:
                raise ValueError(f"the teacher's weights (digest {have} in {dtype}) are not those the student was "
                                 f"converted from ({want}): pass the student's teacher")
            break


def _run_config(a, spec):
    """What fixes a run's trajectory and what it measures: a resumed run must agree on every item."""
    keys = ("stage", "student", "data", "tokens", "seq", "batch", "lr", "lr_rest", "schedule", "warmup_steps",
            "min_lr_ratio", "beta1", "beta2", "weight_decay", "clip", "seed", "amp", "eval_data", "eval_every",
            "eval_window", "eval_max_windows", "eval_batch_size", "test_data")
    return {"teacher": spec, **{k: getattr(a, k) for k in keys}}


def _check_run_folder(a, config):
    """A new run: --out must not exist (or --overwrite). --resume: --out's run.json must hold the same
    configuration; returns the checkpoint to continue from (None: start at step 0). --resume where
    --out does not exist yet (or is empty: killed as it was made) starts the run, so a job that may
    be killed and restarted can always pass --resume. Only reads."""
    run_json = os.path.join(a.out, "run.json")
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        raise ValueError(f"--out '{a.out}' is a file, not a run folder")
    if a.resume and os.path.exists(a.out) and os.listdir(a.out):   # (an empty one: killed as it was made)
        if not os.path.isfile(run_json):
            raise ValueError(f"--resume: '{a.out}' is not a distill.py run folder (no run.json)")
        old = read_json(run_json)["config"]
        if config["stage"] == 1:              # (a Stage 1 before STAGE2_ONLY recorded its unused lr_rest)
            old.pop("lr_rest", None)
        diff = {k: (old.get(k), config.get(k)) for k in set(old) | set(config) if old.get(k) != config.get(k)}
        if diff:
            raise ValueError("--resume: the run in '" + a.out + "' has another configuration: " +
                             "; ".join(f"{k}: {o!r} there, {n!r} now" for k, (o, n) in sorted(diff.items())))
        return _latest_checkpoint(a.out)
    if holds_other_files(a.out):
        raise ValueError(f"--out '{a.out}' is a folder that holds no distill.py run (no run.json), which "
                         f"--overwrite does not replace: choose another --out")
    if os.path.exists(a.out) and not (a.overwrite or a.resume):
        raise ValueError(f"--out '{a.out}' already exists: pass --resume to continue it, --overwrite to replace "
                         f"it, or choose another folder")
    return None


def holds_other_files(path):
    """Whether `path` is a folder --overwrite may not replace: one that is not empty and holds no run."""
    return (os.path.isdir(path) and bool(os.listdir(path))
            and not any(os.path.isfile(os.path.join(path, f)) for f in ("run.json", "distill.json")))


def _student_digest(path, conversion):
    """16 hex digits naming the student in folder `path`: the conversion it came from (which a new
    conversion into the folder rewrites) and, for a distilled one, the run that made it (its
    distill.json, or a checkpoint's state): the path alone does not say which student is there."""
    h = hashlib.sha1(json.dumps(conversion, sort_keys=True).encode())
    for f in ("distill.json", os.path.join("train_state", "state.json")):
        if os.path.isfile(os.path.join(path, f)):
            with open(os.path.join(path, f), "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()[:16]


def _check_inputs(a, now, what, advice):
    """--resume: the run's inputs (`now`: name -> digest) must be those run.json recorded when it
    started, not only the same paths: a conversion (or a Stage 1) redone into the --student folder,
    or a corpus edited in place, would continue the run on something else. Inputs an earlier version
    did not record are not checked."""
    run_json = os.path.join(a.out, "run.json")
    if not (a.resume and os.path.isfile(run_json)):
        return
    old = read_json(run_json).get("inputs", {})
    diff = [k for k in now if k in old and old[k] != now[k]]
    if diff:
        raise ValueError(f"--resume: the run in '{a.out}' {what}: " + ", ".join(
            f"{k} (digest {old[k]} then, {now[k]} now)" for k in diff) + f"; {advice}")


def _start_run_folder(a, config, inputs, dist):
    """A new run's folder, holding run.json; under --overwrite it replaces --out. Called last, once
    everything that can fail before training has been checked: nothing is deleted for a run that
    cannot start."""
    run_json = os.path.join(a.out, "run.json")
    dist.barrier()
    if dist.main:
        real = os.path.realpath(a.out)                  # (a link to a folder: the folder is the run)
        if os.path.exists(real):
            # Moved aside, then deleted: a kill leaves the old run gone or whole (in a .trash- folder
            # beside it), never a run folder that has lost its run.json.
            trash = tempfile.mkdtemp(dir=os.path.dirname(real), prefix=f".{os.path.basename(real)}.trash-")
            try:
                os.replace(real, os.path.join(trash, "run"))
            except OSError:
                os.rmdir(trash)
                raise
            shutil.rmtree(trash)
        os.makedirs(real)
        write_json(run_json, {"config": config, "inputs": inputs, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "commit": run_info()["commit"]})
    dist.barrier()


_DIGESTS = weakref.WeakKeyDictionary()       # model -> {dtype: digest}: a teacher's weights never change


def weights_digest(model, dtype=None):
    """16 hex digits of a sha1 over the model's weights (names and bytes; floating ones cast to
    `dtype` where given): what cached scores and an --append table are matched on besides the
    teacher's name, since a folder's (or a hub id's) weights can change under the same name, and what
    a run checks its teacher against (conversion.json's teacher_weights). 0.5 s for SmolLM2-135M in
    fp32 on this project's 2-core CPU, so computed once per teacher and dtype."""
    digests = _DIGESTS.setdefault(model, {})
    if dtype not in digests:
        h = hashlib.sha1()
        for name, t in sorted(model.state_dict().items()):
            t = t.detach().to(dtype) if dtype is not None and t.is_floating_point() else t.detach()
            h.update(name.encode())
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        digests[dtype] = h.hexdigest()[:16]
    return digests[dtype]


def ids_digest(ids):
    """16 hex digits of a sha1 over token ids and their shape: a text as the model reads it."""
    h = hashlib.sha1(str(tuple(ids.shape)).encode())
    h.update(ids.cpu().contiguous().numpy())                 # (read in place: a corpus can be gigabytes)
    return h.hexdigest()[:16]


def _save_student(student, tokenizer, a, records):
    """The final student: gdn.save_hybrid into a temporary folder, with `records` (name -> what it
    holds, as JSON; the conversion record as read at the start, as --student may be gone by now),
    then its files renamed into --out (distill.json, written after, marks the run complete)."""
    from gdn import save_hybrid
    tmp = tempfile.mkdtemp(dir=a.out, prefix=".final.tmp-")
    save_hybrid(student, tokenizer, tmp)
    for name, obj in records.items():
        write_json(os.path.join(tmp, name), obj)
    seal(tmp)
    for f in os.listdir(tmp):
        os.replace(os.path.join(tmp, f), os.path.join(a.out, f))
    os.rmdir(tmp)


class Run:
    """What the loop needs besides models and data."""

    def __init__(self, args, dist, steps, config, resume_from, eval_ids, prior_tokens, teacher, tokenizer,
                 conversion):
        self.args, self.dist, self.steps, self.config, self.teacher = args, dist, steps, config, teacher
        self.tokenizer, self.conversion = tokenizer, conversion              # (what a checkpoint holds besides)
        self.resume_from, self.eval_ids, self.prior_tokens = resume_from, eval_ids, prior_tokens
        self.stopped, self.flops_per_token = False, None

    def autocast(self):
        if self.args.amp and self.dist.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()


def _throughput(run, records):
    """Median step throughput after 2 warm-up steps (compilation, autotuning), and the MFU it means."""
    times = sorted(r["tokens_per_s"] for r in records[2:]) or sorted(r["tokens_per_s"] for r in records)
    if not times:
        return None
    tps = times[len(times) // 2]
    out = {"tokens_per_s": tps, "steps_timed": len(times), "flops_per_token": run.flops_per_token,
           "gpus": run.dist.world if run.dist.device.type == "cuda" else 0}
    if run.dist.device.type == "cuda":
        out["mfu"] = run.flops_per_token * tps / (run.args.peak_tflops * 1e12 * run.dist.world)
        out["peak_tflops_per_gpu"] = run.args.peak_tflops
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(run.dist.device) / 2**30
    return out


def _distill(a):
    """Everything `python distill.py` does; raises ValueError on bad input before writing anything."""
    from transformers import AutoConfig, AutoTokenizer
    from gdn import load_hybrid
    t_start = time.time()
    conversion, prior = _read_student(a.student)
    dist = Dist(a.device)
    steps = check_shapes(a, dist.world)
    spec = _teacher_spec(a, conversion)
    config = _run_config(a, spec)
    resume_from = _check_run_folder(a, config)             # (a finished run's configuration checked too)
    inputs = {"student": _student_digest(a.student, conversion)}
    _check_inputs(a, inputs, f"began from another student ('{a.student}' holds another conversion or "
                  f"distillation since)", "start the run afresh (--overwrite)")  # (a finished run's, too)
    if a.resume and os.path.isfile(os.path.join(a.out, "distill.json")):
        if dist.main:
            print(f"{a.out} is complete already (distill.json); nothing to do")
        return None
    s_config = AutoConfig.from_pretrained(a.student)
    if dist.main:
        warn_past_trained(s_config, {"--seq": a.seq, **({"--eval-window": a.eval_window}
                                                        if a.eval_data or a.test_data else {})})
    torch.manual_seed(a.seed)
    try:
        s_tok = AutoTokenizer.from_pretrained(a.student)
    except Exception as e:                          # no tokenizer files, a broken one
        raise ValueError(f"could not load the tokenizer of --student '{a.student}' ({type(e).__name__}): a hybrid "
                         f"folder from convert.py holds its teacher's tokenizer files (tokenizer.json, ...)") from None
    data = Batches(_corpus_ids(s_tok, a.data), a.seq, a.batch, a.seed)
    eval_ids = None
    if a.eval_data:
        eval_ids = tokenize(s_tok, read_text(a.eval_data))
        windows(eval_ids, a.eval_window, option="--eval-window", text="--eval-data's text")    # too short: fail now
    test_ids = None
    if a.test_data:
        test_ids = tokenize(s_tok, read_text(a.test_data))
        windows(test_ids, a.eval_window, option="--eval-window", text="--test-data's text")
    texts = {"data": ids_digest(data.seqs),
             "eval_data": ids_digest(eval_ids) if eval_ids is not None else None,
             "test_data": ids_digest(test_ids) if test_ids is not None else None}
    _check_inputs(a, texts, "started on other text (token digests)", "restore the files, or start a new run")
    inputs.update(texts)                                               # (checked before minutes of loading)
    from convert import load_teacher                                  # lazy: convert imports distill
    dtype = torch.bfloat16 if (a.amp and a.device == "cuda") else torch.float32
    teacher, t_tok, _ = load_teacher(spec, dist.device, dtype)
    for p in teacher.parameters():
        p.requires_grad_(False)
    _check_teacher(teacher, t_tok, s_config, s_tok, conversion)
    # fp32 master weights whatever the folder holds (convert.py saves bf16 on a GPU): AdamW steps of
    # lr 7e-6 are below bf16's resolution and would leave most weights where they were.
    try:
        student = load_hybrid(resume_from or a.student, dist.device, torch.float32)
    except Exception as e:                          # missing, truncated or corrupt weights (SafetensorError)
        raise ValueError(f"could not load the student's weights from '{resume_from or a.student}' "
                         f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    if a.resume and os.path.isfile(os.path.join(a.out, "run.json")):
        if dist.main:
            _remove_leftovers(a.out, (".tmp-", ".final.tmp-"))      # (checkpoints/ keeps its own in order)
    else:
        if a.resume and dist.main:
            print(f"--resume: nothing to resume in {a.out} yet; starting the run")
        _start_run_folder(a, config, inputs, dist)                     # every check passed: now write
    run = Run(a, dist, steps, config, resume_from, eval_ids, prior, teacher, s_tok, conversion)
    if dist.main:
        print(f"stage {a.stage}: {steps} steps x {a.batch} x {a.seq} = {steps * a.batch * a.seq:,} tokens "
              f"(budget {a.tokens:,}); data {data.seqs.numel():,} tokens = {len(data.seqs)} sequences, read "
              f"{steps * a.batch / len(data.seqs):.3g} times over; "
              f"{dist.world} process(es), micro-batch {a.micro_batch}, accumulation "
              f"{a.batch // dist.world // a.micro_batch}" + (f"; resuming {resume_from}" if resume_from else ""))
    records = (stage1 if a.stage == 1 else stage2)(run, student, teacher, data)
    if run.stopped:
        if dist.main:
            print(f"stopped after step {records[-1]['step'] if records else '-'} (--stop-after-steps); "
                  f"continue with --resume")
        return None
    student.eval()
    if a.grad_ckpt and a.stage == 2:
        getattr(student, "activation_checkpointing_disable", student.gradient_checkpointing_disable)()
    test = None
    if dist.main:
        if test_ids is not None:
            with run.autocast():
                test = perplexity(student, test_ids, a.eval_window, None, a.eval_batch_size, desc="test ppl")
        _save_student(student, s_tok, a, {"conversion.json": conversion})
        tokens = steps * a.batch * a.seq
        # The whole run's log (metrics.jsonl, cut back to the checkpoint on a resume), not only what
        # this process ran: after a resume, records and evaluations start at the checkpoint.
        with open(os.path.join(a.out, "metrics.jsonl")) as f:
            logged = [json.loads(l) for l in f if l.strip()]
        losses = [r["loss"] for r in logged if r["type"] == "train"]
        evals = [r for r in logged if r["type"] == "eval"]
        record = {"stage": a.stage, "student_in": a.student, "teacher_spec": spec, "steps": steps,
                  "tokens": tokens, "tokens_by_stage": _tokens_by_stage(prior, a.stage, tokens),
                  "config": config, "micro_batch": a.micro_batch, "grad_ckpt": a.grad_ckpt,
                  "processes": dist.world, "first_loss": losses[0] if losses else None,
                  "last_loss": losses[-1] if losses else None, "evals": evals,
                  "final_eval": evals[-1] if evals else None, "test": test, "test_data": a.test_data,
                  "throughput": _throughput(run, records), "resumed_from": resume_from,   # (this process's steps)
                  "seconds": time.time() - t_start, **run_info(a.seed, a.device), "arguments": a.arguments}
        write_json(os.path.join(a.out, "distill.json"), record)
        _summary(record, a)
    dist.barrier()
    return run


def _summary(r, a):
    loss = "-" if r["first_loss"] is None else f"{r['first_loss']:.4f} -> {r['last_loss']:.4f}"
    print(f"\nstage {r['stage']} done: {r['steps']} steps, {r['tokens']:,} tokens, loss {loss}")
    if r["evals"]:
        e0, e1 = r["evals"][0], r["evals"][-1]
        print(f"validation ppl ({e1['windows']} x {e1['window']} tokens): {e0['ppl']:.3f} at {e0['tokens']:,} "
              f"tokens -> {e1['ppl']:.3f} at {e1['tokens']:,}")
    if r["test"]:
        print(f"test ppl ({r['test']['windows']} x {r['test']['window']} tokens): {r['test']['ppl']:.3f}")
    t = r["throughput"]
    if t:
        print(f"throughput {t['tokens_per_s']:,.0f} tokens/s" + (f", MFU {100 * t['mfu']:.1f}%, peak memory "
                                                               f"{t['peak_memory_gib']:.1f} GiB" if "mfu" in t else ""))
    print(f"wrote {a.out} ({r['seconds']:.0f} s)")


# ----------------------------------------------------------------------------------------------
# The recovery report: how many Stage-2 tokens each init needs (METHOD section 6's efficiency claim)
# ----------------------------------------------------------------------------------------------

THRESHOLDS = (1.10, 1.15, 1.20, 1.25)


def _tokens_to_reach(curve, target):
    """The first Stage-2 token count at which validation perplexity is <= target, for a curve of
    (tokens, ppl) evaluation points: linear in log perplexity between the two points around the
    first crossing (perplexity falls roughly exponentially in the tokens seen between evaluations,
    so log-ppl is the smoother quantity). None if the curve never gets there."""
    for i, (t, p) in enumerate(curve):
        if p <= target:
            if i == 0:
                return float(t)
            (t0, p0) = curve[i - 1]
            f = (math.log(p0) - math.log(target)) / (math.log(p0) - math.log(p))
            return t0 + f * (t - t0)
    return None


def _read_stage2_run(folder):
    """(label, teacher ppl, curve, test ppl, record, conversion) of a finished Stage-2 run folder
    (conversion: its conversion.json, or {})."""
    path = os.path.join(folder, "distill.json")
    if not os.path.isfile(path):
        raise ValueError(f"{folder} is not a finished distill.py run (no distill.json)")
    record = read_json(path)
    if record.get("stage") != 2:
        raise ValueError(f"{folder} is a Stage-{record.get('stage')} run; the recovery report reads Stage-2 runs")
    path = os.path.join(folder, "metrics.jsonl")
    try:
        with open(path) as f:
            lines = [json.loads(l) for l in f if l.strip()]
    except (OSError, ValueError) as e:
        raise ValueError(f"'{path}' cannot be read as JSON lines ({e})") from None
    teacher = [l["ppl"] for l in lines if l["type"] == "teacher_eval"]
    if not teacher:
        raise ValueError(f"{folder}: no teacher_eval line in metrics.jsonl (the run had no --eval-data?)")
    curve = sorted({l["tokens"]: l["ppl"] for l in lines if l["type"] == "eval" and l["stage"] == 2}.items())
    if not curve or curve[-1][0] != record["tokens"]:       # every run evaluates after its last step
        raise ValueError(f"{path} holds no Stage-2 evaluation at the run's end ({record['tokens']} tokens; its "
                         f"last: {curve[-1][0] if curve else 'none'}): a truncated log, or a run without --eval-data")
    conv = os.path.join(folder, "conversion.json")
    conversion = read_json(conv) if os.path.isfile(conv) else {}
    label = conversion.get("init", os.path.basename(os.path.normpath(folder)))
    return label, teacher[0], curve, (record.get("test") or {}).get("ppl"), record, conversion


def _stage1_settings(student, skip):
    """The settings of the Stage-1 run that wrote `student` (its distill.json), less what _recovery
    skips and the student it started from (each init's own conversion); None where there is none."""
    path = os.path.join(student, "distill.json") if student else None
    if not (path and os.path.isfile(path)):
        return None
    record = read_json(path)
    if record.get("stage") != 1:
        return None
    return {k: v for k, v in record["config"].items() if k not in skip}


def _recovery(folders, results):
    """Compare Stage-2 runs of different inits (one of them 'naive'): the tokens each needs to come
    within 10/15/20/25% of the teacher's validation perplexity, and to reach the naive run's final
    perplexity; speedup = naive's tokens / the init's. JSON and a markdown table at `results`."""
    runs = {}
    for folder in folders:
        label, teacher, curve, test, record, conversion = _read_stage2_run(folder)
        if label in runs:
            raise ValueError(f"two runs of init '{label}' ({runs[label]['folder']} and {folder}): one per init")
        same = {k: record["config"].get(k) for k in ("teacher", "eval_data", "eval_window", "eval_max_windows")}
        # ... and only the init may differ in how the runs were trained: Stage 2's settings (all but
        # its student and how and on what it evaluated) and the tokens of the stages before it.
        skip = set(same) | {"student", "eval_every", "eval_batch_size", "test_data"}
        earlier = dict(record.get("tokens_by_stage") or {})          # what the student had seen before this run
        earlier["2"] = earlier.get("2", 0) - record["tokens"]
        earlier = {k: v for k, v in earlier.items() if v}
        # The hybrid's shape too (how many layers are GDN; which ones may differ: GA-S2 picks by init),
        # and, where the Stage-1 run's record is at hand (the student Stage 2 started from), its settings.
        trained = {**{k: v for k, v in record["config"].items() if k not in skip}, "earlier stages' tokens": earlier,
                   "GDN layer count": len(conversion["gdn_layers"]) if "gdn_layers" in conversion else None,
                   "Stage-1 settings": _stage1_settings(record["config"].get("student"), skip)}
        for other in runs.values():
            theirs = other["trained_as"]
            differ = sorted(k for k in set(trained) | set(theirs) if trained.get(k) != theirs.get(k))
            if differ:
                raise ValueError(f"{folder} and {other['folder']} were not trained alike (they differ in "
                                 f"{', '.join(differ)}): the report credits the init with every difference")
        # Thresholds and speed-ups compare curves on one yardstick: the same windows, so the same
        # teacher perplexity, up to 0.1% (a bf16 teacher's moves in its 4th digit on another GPU or
        # kernel mix; 0.1% of the teacher moves each threshold by 0.1%).
        for other in runs.values():
            if other["evaluated_as"] != same or abs(other["teacher_ppl"] - teacher) > 1e-3 * teacher:
                raise ValueError(f"{folder} and {other['folder']} were not evaluated alike (teacher, validation "
                                 f"text and windows: {same} vs {other['evaluated_as']}; teacher ppl {teacher} vs "
                                 f"{other['teacher_ppl']}): the report compares runs on the same windows")
        runs[label] = {"folder": folder, "teacher_ppl": teacher, "curve": curve, "test_ppl": test,
                       "evaluated_as": same, "trained_as": trained,
                       "final_val_ppl": curve[-1][1], "commit": record.get("commit"),
                       "device": record.get("device"), "tokens_by_stage": record.get("tokens_by_stage")}
    if "naive" not in runs:
        raise ValueError(f"the report needs the naive run among the folders (have: {', '.join(runs)})")
    teacher = runs["naive"]["teacher_ppl"]
    naive_final = runs["naive"]["final_val_ppl"]
    for r in runs.values():
        r["tokens_to"] = {f"{x:.2f}x teacher": _tokens_to_reach(r["curve"], x * teacher) for x in THRESHOLDS}
        r["tokens_to"]["naive final"] = _tokens_to_reach(r["curve"], naive_final)
    for r in runs.values():
        r["speedup_vs_naive"] = {k: (runs["naive"]["tokens_to"][k] / t if t and runs["naive"]["tokens_to"][k] else None)
                                 for k, t in r["tokens_to"].items()}
    out = {"teacher_val_ppl": teacher, "thresholds": list(THRESHOLDS), "runs": runs, **run_info()}
    fmt = lambda t: "not reached" if t is None else ("at start" if t == 0 else f"{t / 1e6:.2f}M")
    keys = list(runs["naive"]["tokens_to"])
    md = [f"Stage-2 recovery: validation perplexity vs Stage-2 tokens; teacher {teacher:.2f} on the same windows. "
          f"Tokens to reach a target are interpolated (log-ppl, linear in tokens) between evaluation points; "
          f"speedup = naive's tokens / the init's.", "",
          "| init | final val ppl | test ppl | " + " | ".join(f"tokens to {k}" for k in keys) + " | "
          + " | ".join(f"speedup {k}" for k in keys) + " |", "|---|" + "---|" * (2 + 2 * len(keys))]
    for label, r in runs.items():
        # An init already at the target when Stage 2 starts needs no tokens: unbounded, not a number.
        sp = [("inf (at start)" if r["tokens_to"][k] == 0 and runs["naive"]["tokens_to"][k] else
               "-" if r["speedup_vs_naive"][k] is None else f"{r['speedup_vs_naive'][k]:.1f}x") for k in keys]
        md.append(f"| {label} | {r['final_val_ppl']:.2f} | " + (f"{r['test_ppl']:.2f}" if r["test_ppl"] else "-")
                  + " | " + " | ".join(fmt(r["tokens_to"][k]) for k in keys) + " | " + " | ".join(sp) + " |")
    md += ["", "Curves (Stage-2 tokens: validation ppl):"] + [
        f"- {label}: " + ", ".join(f"{t / 1e6:.2f}M: {p:.2f}" for t, p in r["curve"]) for label, r in runs.items()]
    write_json(results + ".json", out)                # both written once both are made
    write_atomic(results + ".md", "\n".join(md) + "\n")
    print("\n".join(md))
    return out


def _recovery_main(argv):
    p = argparse.ArgumentParser(prog="distill.py --recovery", description=_recovery.__doc__.split("\n")[0])
    p.add_argument("--recovery", nargs="+", required=True, metavar="RUN", help="finished Stage-2 run folders")
    p.add_argument("--results", default="results/recovery/recovery", help="output stem (.json, .md)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --results")
    a = p.parse_args(argv)
    try:
        check_results(a.results, "--results", a.overwrite,      # said before any run is read
                      {f"run {i + 1}": run for i, run in enumerate(a.recovery)})
        _recovery(a.recovery, a.results)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv=None, chain=False):
    """The command line (--help); with chain=True, a stage of convert.py's --distill-tokens chain."""
    code_version()
    argv = sys.argv[1:] if argv is None else argv
    if "--recovery" in argv:
        return _recovery_main(argv)
    a = None
    try:
        a = parse_args(argv, chain=chain)
        a.arguments = shlex.join(argv)          # recorded: the command line is convert.py's in its chain
        with output_lock(a.out) if int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext() as held:
            if held:
                remove_left_beside(a.out, {"trash": ["run"]})
            _distill(a)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        instead = " (in place of --overwrite)" if a is not None and a.overwrite else ""
        print(f"interrupted: the same command with --resume{instead} goes on from the run's last checkpoint (or "
              f"starts it, where it made none)", file=sys.stderr)
        return 130
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
