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
"""

import json
import os
import platform
import subprocess
import sys
import tempfile

import torch
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
    if fmt == "auto":
        name = os.path.basename(path)
        fmt = "wikitext" if name.startswith("wiki.") and name.endswith(".raw") else "plain"
    if fmt == "wikitext":
        rows = ["" if not line.strip() else line for line in text.splitlines(keepends=True)]
        text = "\n\n".join(rows)
    return text


def builtin_text(part):
    """Text every Python installation carries, so the main job needs no download: the docstrings
    of a fixed list of standard-library modules and their public members (English technical prose,
    not WikiText; its perplexities are not comparable to published ones). part 'calib' and 'eval'
    are disjoint halves of the module list, so calibration never sees the evaluation text."""
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


def windows(ids, window, max_windows=None):
    """Non-overlapping windows [N, window] of a 1-D id tensor, the tail dropped."""
    n = ids.numel() // window
    if n == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {window}: "
                         f"give a longer text or a smaller --window")
    if max_windows:
        n = min(n, max_windows)
    return ids[: n * window].view(n, window)


# ----------------------------------------------------------------------------------------------
# Perplexity
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def perplexity(model, ids, window=2048, max_windows=None, batch_size=1, desc="perplexity"):
    """exp(mean next-token NLL) over non-overlapping windows of `ids` (1-D). Returns a dict with the
    perplexity and what it was measured on."""
    x = windows(ids, window, max_windows)
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in tqdm(range(0, len(x), batch_size), desc=desc, leave=False):
        batch = x[i: i + batch_size].to(device)
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                               reduction="sum").item()
        count += batch[:, 1:].numel()
    return {"ppl": float(torch.tensor(nll / count).exp()), "nll": nll / count, "window": window,
            "windows": len(x), "tokens": len(x) * window, "predicted_tokens": count}


# ----------------------------------------------------------------------------------------------
# The record that goes with every measurement
# ----------------------------------------------------------------------------------------------

def run_info(seed=None):
    """Commit, device, versions, seed and command: what anyone needs to reproduce a number."""
    import transformers
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip())
    except OSError:
        commit, dirty = None, None
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    return {"commit": commit, "dirty": dirty, "device": device, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "seed": seed,
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}


def write_atomic(path, text):
    """Write a file so that a reader never sees half of it: temp file in the same folder, then rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path, obj):
    write_atomic(path, json.dumps(obj, indent=2) + "\n")
