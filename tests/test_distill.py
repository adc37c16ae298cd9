"""distill.py: the two losses, the data stream, Stage 1 and Stage 2 end to end on a tiny hybrid,
exact kill-and-resume, the NaN stop, bad inputs, and convert.py's --distill-tokens chain.

The models here are tiny Llamas over a small BPE vocabulary trained on the spot (a few hundred
tokens), so a training step costs milliseconds and the whole file runs in about a minute on CPU."""
import json
import math
import os
import re
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import convert
import distill
from conftest import tiny_model

TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
        "it was the season of Darkness, it was the spring of hope, it was the winter of despair. ")


def bpe_tokenizer(text, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def save_teacher(path, tokenizer, seed=0):
    model = tiny_model("llama", vocab_size=len(tokenizer), seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny teacher, its 1/2 hybrid written by convert.py (Taylor-Calibrate, the default init), and text files."""
    root = tmp_path_factory.mktemp("distill")
    tok = bpe_tokenizer(TEXT * 4, 300)
    teacher = save_teacher(root / "teacher", tok)
    files = {}
    for name, reps in (("train", 6), ("small", 2), ("valid", 3), ("test", 3)):
        files[name] = root / f"{name}.txt"
        files[name].write_text(TEXT * reps)
    hybrid = root / "hybrid"
    code = convert.main(["--teacher", teacher, "--keep", "1/2", "--out", str(hybrid), "--eval-data",
                         str(files["valid"]), "--window", "32", "--max-windows", "1", "--no-sample",
                         "--calib-seqs", "1", "--calib-len", "16", "--calib-data", str(files["train"])])
    assert code == 0
    return {"root": root, "tok": tok, "teacher": teacher, "hybrid": str(hybrid), **{k: str(v) for k, v in files.items()}}


def args(s, out, stage=1, tokens=6 * 4 * 16, extra=()):
    """A tiny run: seq 16, global batch 4 in micro-batches of 2 (gradient accumulation on)."""
    return ["--student", s["hybrid"], "--stage", str(stage), "--tokens", str(tokens), "--data", s["train"],
            "--out", str(out), "--seq", "16", "--batch", "4", "--micro-batch", "2", "--lr", "3e-3",
            *(["--lr-rest", "3e-4"] if stage == 2 else []), "--eval-data", s["valid"], "--eval-window", "32",
            "--eval-max-windows", "2", "--eval-every", "128", "--test-data", s["test"], "--ckpt-every", "2", *extra]


def lines(out, kind):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["type"] == kind]


# ----------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------

def test_losses_are_the_formulas():
    torch.manual_seed(0)
    yt, ys = [torch.randn(2, 5, 8), torch.randn(2, 5, 8)], [torch.randn(2, 5, 8), torch.randn(2, 5, 8)]
    expect = sum(((a - b).pow(2).sum(-1).sqrt().mean() / 8 ** 0.5) for a, b in zip(yt, ys)) / 2
    assert torch.allclose(distill._stage1_loss(yt, ys), expect)
    assert distill._stage1_loss(yt, yt) == 0
    t, s = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum") / 10
    assert torch.allclose(distill._stage2_loss(t, s), kl) and distill._stage2_loss(t, t).abs() < 1e-6


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "gemma3_text"])
def test_taps_record_teacher_forced_attention_io(family):
    """Stage 1's hooks: x_l is layer l's normalised input in the teacher's own forward, y_l what its
    attention module returned for it (the same pair taylor_stats.collect_stats records, whose y it
    checks against softmax(QK^T)V W_o recomputed from the weights); and a GDN layer fed x_l by the
    stack gives what it gives alone. Outside their `with` block the hooks are gone: no other forward
    is held."""
    from gdn import decoder_layers, hybridize
    from taylor_stats import collect_stats
    teacher = tiny_model(family)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad(), distill.TeacherTaps(teacher, [1, 3]) as io:
        h = teacher.model(input_ids=ids, output_hidden_states=True).hidden_states
    assert sorted(io) == [1, 3]
    stats = collect_stats(teacher, ids, layers=[1, 3], progress=False)
    for l in (1, 3):
        x, y = io[l]
        assert torch.allclose(x, decoder_layers(teacher)[l].input_layernorm(h[l]), atol=1e-6)
        assert stats[l]["check"] < 1e-5
        assert (x - stats[l]["x"]).abs().max() < 1e-5
        assert (y - stats[l]["y"]).abs().max() < 1e-5
    held = dict(io)
    with torch.no_grad():
        teacher.model(input_ids=ids[:1, :5])
    assert all(io[l] is held[l] for l in (1, 3))                # nothing recorded: the hooks are gone
    import copy
    student = hybridize(copy.deepcopy(teacher), [1, 3])
    stack = distill.GDNStack(student)
    out = stack({l: io[l][0] for l in (1, 3)})
    assert torch.allclose(out[1], decoder_layers(student)[3].self_attn(io[3][0])[0])


def test_batches_are_seeded_packed_and_resumable():
    ids = torch.arange(100)
    a, b = distill.Batches(ids, 10, 3, seed=1), distill.Batches(ids, 10, 3, seed=1)
    first = [a.next() for _ in range(7)]                       # 3 batches an epoch: crosses two epochs
    assert all(x.shape == (3, 10) for x in first) and a.epoch == 2
    assert len({int(r[0]) for x in first[:3] for r in x}) == 9       # an epoch never repeats a sequence
    assert all(torch.equal(r, torch.arange(r[0], r[0] + 10)) for x in first for r in x)   # contiguous text
    b.epoch, b.index = 1, 3                                    # a restored position continues the stream
    assert torch.equal(b.next(), first[4])
    assert not torch.equal(torch.cat(first[:3]), torch.cat(first[3:6]))   # each epoch its own order
    with pytest.raises(ValueError, match="fewer than one batch"):
        distill.Batches(torch.arange(25), 10, 3, seed=0)


def test_parse_tokens_and_schedule():
    assert distill.parse_tokens("30M") == 30_000_000 and distill.parse_tokens("1.5k") == 1500
    assert distill.parse_tokens("123") == 123
    assert distill.parse_tokens("4.079616M") == 4_079_616 and distill.parse_tokens("8.2M") == 8_200_000  # exact
    with pytest.raises(ValueError):
        distill.parse_tokens("lots")
    for bad in ("inf", "1e999", "nan", "-1"):
        with pytest.raises(ValueError, match="is not a token count"):
            distill.parse_tokens(bad)
    with pytest.raises(ValueError, match="--eval-every 'abc' is not"):
        distill.parse_tokens("abc", "--eval-every")
    assert distill._lr_factor(0, 10, "cosine") == 1.0 and distill._lr_factor(5, 10, "cosine") == pytest.approx(0.5)
    assert distill._lr_factor(9, 10, "constant") == 1.0 and distill._lr_factor(0, 10, "cosine", warmup=4) == 0.25


def test_lr_schedule_warmup_cosine_and_floor():
    """_lr_factor's formula at a few steps of 14 with 4 warm-up steps and a floor of 0.1: (s + 1) / 4
    while warming up, then 0.1 + 0.9 * (1 + cos(pi * (s - 4) / 10)) / 2; constant ignores the floor."""
    f = lambda s, sched="cosine": distill._lr_factor(s, 14, sched, warmup=4, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(9) == pytest.approx(0.55, abs=1e-12) and f(14) == pytest.approx(0.1, abs=1e-12)
    assert f(13) == pytest.approx(0.1 + 0.45 * (1 + math.cos(0.9 * math.pi)), abs=1e-12)
    assert f(6) == pytest.approx(0.1 + 0.45 * (1 + math.cos(0.2 * math.pi)), abs=1e-12)
    assert distill._lr_factor(9, 10, "cosine", min_ratio=0.3) == pytest.approx(0.3 + 0.35 * (1 + math.cos(0.9 * math.pi)))
    assert [f(s, "constant") for s in (1, 4, 13)] == [0.5, 1.0, 1.0]


def test_param_groups_put_attention_at_lr_and_the_rest_at_lr_rest():
    """Stage 1 trains the GDN parameters alone, at --lr. Stage 2 trains everything: every attention
    module's parameters (softmax layers 0, 2 and GDN layers 1, 3) at --lr, all others at --lr-rest.
    Membership is judged by module, not by the parameter names the builder reads."""
    from gdn import GatedDeltaNet, decoder_layers, hybridize
    student = hybridize(tiny_model("llama"), [1, 3])
    attn = [decoder_layers(student)[i].self_attn for i in range(4)]
    assert [isinstance(m, GatedDeltaNet) for m in attn] == [False, True, False, True]
    ids = lambda ps: {id(p) for p in ps}
    every = ids(student.parameters())
    gdn = ids(p for m in attn[1::2] for p in m.parameters())
    softmax = ids(p for m in attn[0::2] for p in m.parameters())
    (g,) = distill._param_groups(student, 1, 1e-3, 7e-6)
    assert g["lr"] == 1e-3 and ids(g["params"]) == gdn and len(g["params"]) == len(gdn)
    assert {id(p) for p in student.parameters() if p.requires_grad} == gdn
    groups = distill._param_groups(student, 2, 1e-4, 7e-6)
    by_lr = {g["lr"]: g["params"] for g in groups}
    assert len(groups) == 2 and set(by_lr) == {1e-4, 7e-6}
    assert ids(by_lr[1e-4]) == gdn | softmax and len(by_lr[1e-4]) == len(gdn | softmax)
    assert ids(by_lr[7e-6]) == every - gdn - softmax and len(by_lr[7e-6]) == len(every - gdn - softmax)
    assert all(p.requires_grad for p in student.parameters())


def test_wikitext_rows_are_its_lines_joined_by_blank_lines(tmp_path):
    """METHOD 6's convention: each line a row keeping its newline, whitespace-only lines empty rows,
    "\n\n".join(rows); a line ends at "\n" alone (not at a form feed inside it). Files not named
    wiki.*.raw are read as they are."""
    body = " = A = \n \n a\x0cb \nlast"
    (tmp_path / "wiki.x.raw").write_text(body, encoding="utf-8")
    (tmp_path / "x.txt").write_text(body, encoding="utf-8")
    assert distill.read_text(str(tmp_path / "wiki.x.raw")) == "\n\n".join([" = A = \n", "", " a\x0cb \n", "last"])
    assert distill.read_text(str(tmp_path / "x.txt")) == body


def test_perplexity_is_exp_mean_nll_of_w_minus_1_predictions_per_window():
    """3 full windows of 8 tokens and a tail of 5, in batches of 2 (the last one short): the tail is
    dropped, each window is scored on its own from an empty context, W - 1 = 7 predictions each, and
    ppl = exp(mean cross-entropy), as computed here window by window from the model's logits."""
    model = tiny_model("llama")
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (3 * 8 + 5,))
    with torch.no_grad():
        nll = [F.cross_entropy(model(ids[None, i:i + 8]).logits[0, :-1], ids[i + 1:i + 8], reduction="none")
               for i in (0, 8, 16)]
    nll = torch.cat(nll)
    assert nll.numel() == 21
    r = distill.perplexity(model, ids, window=8, batch_size=2)
    assert (r["window"], r["windows"], r["tokens"], r["predicted_tokens"]) == (8, 3, 24, 21)
    assert r["nll"] == pytest.approx(nll.mean().item(), rel=1e-5)
    assert r["ppl"] == pytest.approx(nll.mean().exp().item(), rel=1e-5)
    two = distill.perplexity(model, ids, window=8, max_windows=2)
    assert (two["windows"], two["predicted_tokens"]) == (2, 14)
    assert two["ppl"] == pytest.approx(nll[:14].mean().exp().item(), rel=1e-5)


def test_perplexity_takes_a_batch_of_one_refuses_the_rest_and_switches_dropout_off():
    """A tokenizer's [1, L] is one text; other shapes, a window of 1 (no prediction), a batch of 0 and
    a negative window count are refused by name. A model left in train mode is measured in eval mode
    (dropout would change the number from call to call) and handed back in its own modes."""
    from transformers import AutoModelForCausalLM
    from conftest import tiny_config
    config = tiny_config("llama")
    config.attention_dropout = 0.5
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 128, (33,))
    ref = distill.perplexity(model, ids, window=8)["ppl"]
    assert distill.perplexity(model, ids[None], window=8)["ppl"] == ref
    assert distill.perplexity(model, ids, window=8, max_windows=0)["windows"] == 4          # (0: every window)
    model.train()
    model.model.layers[0].eval()                       # a mixed state, as Stage 1 leaves it
    assert distill.perplexity(model, ids, window=8)["ppl"] == ref
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training
    for kw, said in ((dict(ids=ids.view(3, 11)), r"1-D tensor of token ids; got shape \[3, 11\]"),
                     (dict(ids=ids.float()), "1-D tensor of token ids"), (dict(window=1), "window must be .* >= 2"),
                     (dict(batch_size=0), "batch_size must be .* >= 1"),
                     (dict(max_windows=-1), r"max_windows must be a whole number >= 0 \(0 or None: every window\)")):
        with pytest.raises(ValueError, match=said):
            distill.perplexity(model, **{"ids": ids, "window": 8, **kw})


def test_stage1_from_python_as_its_docstring_shows_and_the_in_place_trap(tmp_path):
    """stage1's docstring drives a run from Python; a teacher that hybridize turned into the student
    (it converts in place) would train the student against itself at loss 0: refused, as is a student
    with no GDN layer."""
    import copy
    from gdn import hybridize
    teacher = tiny_model("llama")
    student = hybridize(copy.deepcopy(teacher), [1, 2])
    a = distill.parse_args(["--student", "S", "--stage", "1", "--data", "T", "--out", str(tmp_path), "--tokens",
                            "64", "--eval-data", "none", "--test-data", "none", "--device", "cpu", "--seq", "8",
                            "--batch", "2", "--ckpt-every", "0"])
    run = distill.Run(a, distill.Dist(a.device), distill.check_shapes(a, 1), {}, None, None, 0, teacher, None, {})
    data = distill.Batches(torch.randint(0, 128, (400,)), a.seq, a.batch, a.seed)
    losses = [r["loss"] for r in distill.stage1(run, student, teacher, data)]
    assert len(losses) == 4 and min(losses) > 0
    for s, t in ((hybridize(teacher, [1]), None), (tiny_model("llama"), tiny_model("llama"))):
        for stage in (distill.stage1, distill.stage2):
            with pytest.raises(ValueError, match="the teacher has GDN layers|the student has no GDN layers"):
                stage(run, s, s if t is None else t, data)


def test_importing_a_file_starts_no_process():
    """No work at import time: reading the commit (git) waits for a main() or a record."""
    import subprocess
    import sys
    code = ("import subprocess; calls = []; run = subprocess.run\n"
            "subprocess.run = lambda *a, **k: calls.append(a) or run(*a, **k)\n"
            "import convert, calibrate, taylor_stats, distill, gdn, gdn_kernel\nprint(len(calls))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.split()[-1] == "0"


def test_perplexity_scores_a_block_of_rows_at_a_time(monkeypatch):
    """The NLL is taken KL_ROWS positions of a window at a time, each block alone in fp32 (not the
    batch's whole [B, W - 1, V] logits, 20 GB in fp32 at 8 x 2048 and a 152k vocabulary), and sums
    to the same."""
    model = tiny_model("llama")
    torch.manual_seed(2)
    ids = torch.randint(0, 128, (4 * 8,))
    plain = distill.perplexity(model, ids, window=8, batch_size=2)
    rows, cross_entropy = [], F.cross_entropy

    def spy(logits, *args, **kwargs):
        rows.append((logits.shape[0], logits.dtype))
        return cross_entropy(logits, *args, **kwargs)
    monkeypatch.setattr(distill, "KL_ROWS", 5)
    monkeypatch.setattr(distill.F, "cross_entropy", spy)
    r = distill.perplexity(model, ids, window=8, batch_size=2)
    assert rows == [(5, torch.float32), (2, torch.float32)] * 4       # 4 windows, 7 predictions each
    assert r["predicted_tokens"] == plain["predicted_tokens"] == 28
    assert r["nll"] == pytest.approx(plain["nll"], rel=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="measures CUDA memory")
def test_perplexity_needs_little_memory_beyond_the_logits():
    """On CUDA, scoring 4 windows of 2048 with a 32k vocabulary (bf16 logits: 0.5 GiB) takes at most
    a few fp32 blocks more at the peak; the batch's logits in fp32 and their log-softmax took 1.5 GiB
    more (2 GiB, less the bf16 logits freed once copied; an H200, before the blocks)."""
    from types import SimpleNamespace
    B, W, V = 4, 2048, 32768

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1, device="cuda"))

        def forward(self, ids, use_cache=False):
            return SimpleNamespace(logits=torch.randn(*ids.shape, V, device="cuda", dtype=torch.bfloat16))
    ids = torch.randint(0, V, (B * W,))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    r = distill.perplexity(Logits(), ids, window=W, batch_size=B)
    extra = torch.cuda.max_memory_allocated() - base - B * W * V * 2
    assert r["predicted_tokens"] == B * (W - 1) and math.isfinite(r["ppl"])
    assert extra <= 4 * distill.KL_ROWS * V * 4, f"{extra / 2 ** 20:.0f} MiB beyond the logits"


def test_perplexity_of_a_wrecked_model_is_finite():
    """A mean NLL of 200 (past fp32's exp range, 88.7) is still a number: e^200, not inf."""
    from types import SimpleNamespace

    class Sure(torch.nn.Module):                 # all its mass on token 0, which never comes
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids, use_cache=False):
            logits = torch.zeros(*ids.shape, 8)
            logits[..., 0] = 200.0
            return SimpleNamespace(logits=logits)
    r = distill.perplexity(Sure(), torch.randint(1, 8, (16,)), window=8)
    assert r["nll"] == pytest.approx(200.0, rel=1e-6) and r["ppl"] == pytest.approx(math.exp(200.0), rel=1e-5)


# ----------------------------------------------------------------------------------------------
# Both stages train
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage", [1, 2])
def test_stage_reduces_its_loss(setup, tmp_path, stage):
    """With a data file of exactly one batch, every step sees the same 4 sequences, so the loss of
    the stage must fall; Stage 1 may only move GDN parameters, Stage 2 moves everything. The first and
    last evaluations are the perplexities of the student it started from and of the one it saved
    (measured here again on the same windows), not the teacher's."""
    s = setup
    ids = distill.tokenize(s["tok"], TEXT * 6)
    one_batch = tmp_path / "one.txt"
    one_batch.write_text(s["tok"].decode(ids[: 4 * 16 + 8]))
    assert distill.tokenize(s["tok"], one_batch.read_text()).numel() // 16 == 4
    out = tmp_path / "run"
    a = args(s, out, stage, tokens=10 * 64, extra=["--lr", "1e-2"] + (["--lr-rest", "1e-3"] if stage == 2 else []))
    a[a.index("--data") + 1] = str(one_batch)
    assert distill.main(a) == 0
    loss = [r["loss"] for r in lines(out, "train")]
    assert len(loss) == 10 and loss[-1] < 0.8 * loss[0], loss
    from gdn import load_hybrid
    from transformers import AutoModelForCausalLM
    start, end = load_hybrid(s["hybrid"]), load_hybrid(out)
    ids = distill.tokenize(s["tok"], distill.read_text(s["valid"]))
    ppl = {name: distill.perplexity(m, ids, window=32, max_windows=2)["ppl"]
           for name, m in (("start", start), ("end", end), ("teacher", AutoModelForCausalLM.from_pretrained(s["teacher"])))}
    evals = lines(out, "eval")
    tol = 2e-2 if torch.cuda.is_available() else 1e-5          # (on a GPU the run evaluated under bf16 autocast)
    assert evals[0]["ppl"] == pytest.approx(ppl["start"], rel=tol) and evals[-1]["ppl"] == pytest.approx(ppl["end"], rel=tol)
    assert ppl["teacher"] != pytest.approx(ppl["start"], rel=1e-3) and ppl["teacher"] != pytest.approx(ppl["end"], rel=1e-3)
    before, after = start.state_dict(), end.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    gdn = {k for k in before if ".self_attn." in k and int(k.split(".")[2]) in (1, 3)}
    if stage == 1:
        assert moved == gdn, sorted(moved ^ gdn)[:5]
    else:
        assert moved == set(before), f"did not move: {sorted(set(before) - moved)[:5]}"
    record = json.load(open(out / "distill.json"))
    assert record["tokens_by_stage"] == {str(stage): 640} and record["test"]["window"] == 32
    assert record["seed"] == 0 and record["commit"]
    if torch.cuda.is_available():                                # a GPU run also records its memory
        assert record["throughput"]["gpus"] == 1 and record["throughput"]["peak_memory_gib"] > 0
    assert [e["tokens"] for e in evals] == [0, 128, 256, 384, 512, 640]      # every 128 tokens, start, end


@pytest.mark.parametrize("stage", [1, 2])
def test_optimizer_steps_at_the_reference_learning_rates(setup, tmp_path, monkeypatch, stage):
    """METHOD section 5 with the stage's defaults (no --lr, --lr-rest, --schedule): Stage 1 steps the
    GDN parameters at 1e-3 on a cosine to 0, Stage 2 the attention and GDN parameters at 1e-4 and the
    rest at 7e-6, constant. Read off the optimizer's param_groups at each of its steps: the logged lr
    is computed apart, and _lr_factor alone is a pure function, so neither would show a schedule that
    never reaches the optimizer. 6 steps: cosine factors (1 + cos(pi s / 6)) / 2."""
    seen = []

    class AdamW(torch.optim.AdamW):
        def step(self, *a, **k):
            seen.append({g["name"]: g["lr"] for g in self.param_groups})
            return super().step(*a, **k)

    monkeypatch.setattr(torch.optim, "AdamW", AdamW)
    a = args(setup, tmp_path / "run", stage, extra=["--eval-data", "none", "--eval-every", "0", "--test-data", "none",
                                                      "--ckpt-every", "0"])
    for flag in ("--lr", "--lr-rest")[:stage]:
        del a[a.index(flag): a.index(flag) + 2]
    assert distill.main(a) == 0
    if stage == 1:
        want = [{"gdn": 1e-3 * (1 + math.cos(math.pi * k / 6)) / 2} for k in range(6)]
    else:
        want = [{"attention": 1e-4, "rest": 7e-6}] * 6
    assert len(seen) == 6 and [g.keys() for g in seen] == [w.keys() for w in want]
    for got, w in zip(seen, want):
        assert got == pytest.approx(w, rel=1e-12, abs=0), (seen, want)
    assert [r["lr"] for r in lines(tmp_path / "run", "train")] == pytest.approx([next(iter(w.values())) for w in want], rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stage2_loss_blocks_match_the_plain_form_and_keep_only_the_gradient(dtype):
    """2100 positions: two full blocks of KL_ROWS and a partial one. Loss and gradient equal the
    plain formula's (through a loss scaled by 3, so the incoming gradient is used), and what autograd
    keeps for the backward is the gradient alone, in the logits' dtype."""
    torch.manual_seed(0)
    t = (3 * torch.randn(3, 700, 50)).to(dtype)
    s = (3 * torch.randn(3, 700, 50)).to(dtype)
    assert distill.KL_ROWS < 2100 < 3 * distill.KL_ROWS
    ours, plain = s.clone().requires_grad_(), s.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel() * x.element_size()) or x,
                                                  lambda x: x):
        loss = distill._stage2_loss(t, ours)
    (3 * loss).backward()
    log_t, log_s = F.log_softmax(t.float(), -1), F.log_softmax(plain.float(), -1)
    ref = (log_t.exp() * (log_t - log_s)).sum(-1).mean()
    (3 * ref).backward()
    assert loss.dtype == torch.float32 and torch.allclose(loss, ref, rtol=1e-5)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert ours.grad.dtype == dtype and torch.allclose(ours.grad.float(), plain.grad.float(), atol=tol * plain.grad.abs().max())
    assert saved == [s.numel() * s.element_size()]


def test_bf16_student_folder_trains_in_fp32(setup, tmp_path):
    """convert.py saves bf16 weights on a GPU. distill.py must still keep fp32 master weights: in bf16
    an AdamW step of lr 7e-6 rounds away, and a bf16 layer fed fp32 teacher states fails outright."""
    from gdn import load_hybrid, save_hybrid
    s = setup
    bf16 = tmp_path / "bf16"
    save_hybrid(load_hybrid(s["hybrid"], dtype=torch.bfloat16), s["tok"], str(bf16))
    shutil.copy(os.path.join(s["hybrid"], "conversion.json"), bf16)
    assert {t.dtype for t in load_hybrid(bf16).state_dict().values()} == {torch.bfloat16}
    for stage in (1, 2):
        out = tmp_path / f"run{stage}"
        a = args({**s, "hybrid": str(bf16)}, out, stage, tokens=2 * 64,
                 extra=["--lr-rest", "1e-5"] if stage == 2 else [])
        assert distill.main(a) == 0
        after = load_hybrid(out).state_dict()
        assert {t.dtype for t in after.values()} == {torch.float32}
    before = load_hybrid(bf16).state_dict()
    moved = [k for k in before if not torch.equal(before[k].float(), after[k])]
    assert len(moved) == len(before), "a Stage-2 step of lr 1e-5 must move every weight in fp32"


# ----------------------------------------------------------------------------------------------
# Checkpoints: kill and resume, NaN
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage", [1, 2])
def test_resume_continues_exactly(setup, tmp_path, stage):
    """Uninterrupted 6 steps vs. stopped after 3 (last checkpoint at 2, so step 3 is redone) and
    resumed: the same loss and gradient-norm trace, evaluations and final weights, bit for bit.
    The data (15 sequences, 4 a step) wraps around an epoch, and Stage 1's cosine lr moves."""
    s = {**setup, "train": setup["small"]}
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert distill.main(args(s, full, stage)) == 0
    assert distill.main(args(s, cut, stage, extra=["--stop-after-steps", "3"])) == 0
    assert not (cut / "distill.json").exists() and len(lines(cut, "train")) == 3
    assert open(cut / "checkpoints" / "latest").read().strip() == "step_00000002"
    # What a killed process leaves: the log's last line cut off, a temporary file of `latest`.
    with open(cut / "metrics.jsonl", "a") as f:
        f.write('{"type": "tr')
    (cut / "checkpoints" / ".tmp-abc").write_text("step_0000")
    (cut / ".final.tmp-x").mkdir()                                   # ... and of the student's and a log's save
    (cut / ".final.tmp-x" / "model.safetensors").write_text("half")
    (cut / ".tmp-y").write_text("{")
    if stage == 1:          # as a Stage 1 from before Stage 2's own options were dropped there recorded it
        run = json.loads((cut / "run.json").read_text())
        run["config"]["lr_rest"] = 0.0
        (cut / "run.json").write_text(json.dumps(run))
    assert distill.main(args(s, cut, stage, extra=["--resume"])) == 0
    assert not (cut / "checkpoints" / ".tmp-abc").exists()
    assert not [f for f in os.listdir(cut) if f.startswith(".")]
    a, b = lines(full, "train"), lines(cut, "train")
    key = lambda rs: [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in rs]
    assert key(a) == key(b) and len(a) == 6
    assert [(e["step"], e["ppl"]) for e in lines(full, "eval")] == [(e["step"], e["ppl"]) for e in lines(cut, "eval")]
    from gdn import load_hybrid
    wa, wb = load_hybrid(full).state_dict(), load_hybrid(cut).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ra, rb = json.load(open(full / "distill.json")), json.load(open(cut / "distill.json"))
    assert rb["test"] == ra["test"]
    # the record covers the whole run, not only the steps after the resume
    assert [(e["step"], e["ppl"]) for e in rb["evals"]] == [(e["step"], e["ppl"]) for e in ra["evals"]]
    assert rb["first_loss"] == ra["first_loss"] and rb["resumed_from"] and not ra["resumed_from"]


def test_nan_stops_and_keeps_the_last_checkpoint(setup, tmp_path, capsys):
    """lr 1e30: the first update throws the weights to ~1e30, the next loss overflows. The run must
    stop with a clear message, write no student, and leave the step-1 checkpoint as it was; the
    message does not offer that checkpoint (it holds the weights that overflowed) but the student."""
    out = tmp_path / "run"
    code = distill.main(args(setup, out, 1, extra=["--lr", "1e30", "--ckpt-every", "1"]))
    err = capsys.readouterr().err
    assert code == 3 and "step 2" in err and "no checkpoint before it was kept" in err, err
    assert "step_00000001" not in err and setup["hybrid"] in err
    assert not (out / "distill.json").exists() and not (out / "model.safetensors").exists()
    assert os.listdir(out / "checkpoints") == ["latest", "step_00000001"] or \
        sorted(os.listdir(out / "checkpoints")) == ["latest", "step_00000001"]
    from gdn import load_hybrid
    model = load_hybrid(out / "checkpoints" / "step_00000001")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert [r["step"] for r in lines(out, "train")] == [1]


def test_nan_after_a_checked_checkpoint_names_it_good(setup, tmp_path, capsys, monkeypatch):
    """A non-finite gradient at step 4, checkpoints every 2 steps: step 3's finite loss came from the
    step-2 checkpoint's weights, so that one is named the last good checkpoint."""
    real, calls = torch.nn.utils.clip_grad_norm_, []

    def clip(params, max_norm):
        calls.append(1)
        norm = real(params, max_norm)
        return torch.tensor(float("nan")) if len(calls) == 4 else norm
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    out = tmp_path / "run"
    assert distill.main(args(setup, out, 1)) == 3
    err = capsys.readouterr().err
    assert "step 4" in err and "from the last good checkpoint" in err and err.count("step_00000002") == 1, err


def test_divergence_right_after_a_checkpoint_keeps_the_one_before(setup, tmp_path, capsys, monkeypatch):
    """Checkpoints at steps 2 and 4 (--keep-checkpoints 1), a non-finite gradient at step 5: the
    step-4 checkpoint holds the weights that gave it, so step 2's must still be there (a checkpoint
    goes only once the step after a newer one has a finite loss), and the message names it. It is a
    student folder: a new run starts from it, counting the tokens it had already seen."""
    real, calls = torch.nn.utils.clip_grad_norm_, []

    def clip(params, max_norm):
        calls.append(1)
        norm = real(params, max_norm)
        return torch.tensor(float("nan")) if len(calls) == 5 else norm
    with monkeypatch.context() as m:
        m.setattr(torch.nn.utils, "clip_grad_norm_", clip)
        out = tmp_path / "run"
        assert distill.main(args(setup, out, 1)) == 3
    err = capsys.readouterr().err
    good = str(out / "checkpoints" / "step_00000002")
    assert "step 5" in err and f"--student {good}" in err and "step_00000004" not in err, err
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step_00000002", "step_00000004"]
    again = tmp_path / "again"
    assert distill.main(args({**setup, "hybrid": good}, again, 1)) == 0
    assert json.load(open(again / "distill.json"))["tokens_by_stage"] == {"1": 2 * 4 * 16 + 6 * 4 * 16}
    # A run that goes on: once a step after the newest checkpoint is finite, the older one goes.
    assert distill.main(args(setup, tmp_path / "on", 1, extra=["--stop-after-steps", "5"])) == 0
    assert sorted(os.listdir(tmp_path / "on" / "checkpoints")) == ["latest", "step_00000004"]


def test_a_failed_checkpoint_write_leaves_nothing(tmp_path, monkeypatch):
    """A full disk mid-write: the error goes up, and no half-written .tmp- folder stays behind."""
    def fail(tmp, *rest):
        open(os.path.join(tmp, "model.safetensors"), "w").write("half")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(distill, "_write_checkpoint", fail)
    with pytest.raises(OSError, match="No space"):
        distill._save_checkpoint(str(tmp_path), 2, None, None, [], {})
    assert os.listdir(tmp_path / "checkpoints") == []


def test_overwrite_moves_the_old_run_aside_first(setup, tmp_path, capsys, monkeypatch):
    """--overwrite renames the old run away before deleting it: a kill while deleting (here: the
    deletion fails) leaves --out gone and the old run whole beside it, never a run folder without
    its run.json, which neither --resume nor --overwrite would take. Through a link, the folder it
    points to is the run. --resume with --overwrite is refused: one continues, the other replaces."""
    out = tmp_path / "runs" / "run"
    assert distill.main(args(setup, out, 1, extra=["--stop-after-steps", "2", "--eval-every", "0"])) == 0
    assert distill.main(args(setup, out, 1, extra=["--resume", "--overwrite"])) == 2
    assert "pass one of them" in capsys.readouterr().err and (out / "checkpoints").exists()
    dist = SimpleNamespace(main=True, barrier=lambda: None)
    with monkeypatch.context() as m:
        m.setattr(distill.shutil, "rmtree", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            distill._start_run_folder(SimpleNamespace(out=str(out)), {}, {}, dist)
    assert not out.exists()
    [trash] = os.listdir(tmp_path / "runs")
    assert trash.startswith(".run.trash-") and (tmp_path / "runs" / trash / "run" / "run.json").exists()
    shutil.copytree(str(tmp_path / "runs" / trash / "run"), str(out))
    with distill.output_lock(str(out)):                  # another run into it, still going: refused
        assert distill.main(args(setup, out, 1, extra=["--resume"])) == 2
    assert "being written by another run" in capsys.readouterr().err and os.path.isdir(tmp_path / "runs" / trash)
    assert distill.main(args(setup, out, 1, extra=["--resume", "--stop-after-steps", "3", "--eval-every", "0"])) == 0
    assert "left by a run into" in capsys.readouterr().out          # (the killed run's trash goes)
    link = tmp_path / "link"
    os.symlink(out, link)
    assert distill.main(args(setup, link, 1, extra=["--overwrite", "--stop-after-steps", "1", "--eval-every", "0"])) == 0
    assert link.is_symlink() and not (out / "checkpoints").exists() and (out / "run.json").exists()
    assert os.listdir(tmp_path / "runs") == ["run"]


def test_pruning_follows_latest(tmp_path):
    """A checkpoint renamed into place by a write killed before `latest` moved is not one: a resumed
    run goes on from the one `latest` names, so pruning keeps that one (and drops the other), and
    a divergence never names a checkpoint of the step that diverged or after it."""
    root = tmp_path / "checkpoints"
    for n in (2, 4, 6):
        (root / f"step_{n:08d}").mkdir(parents=True)
    (root / "latest").write_text("step_00000004\n")
    assert distill._checkpoints(str(tmp_path)) == [str(root / "step_00000002"), str(root / "step_00000004")]
    a = SimpleNamespace(out=str(tmp_path), student="S")
    assert "step_00000002" in distill._restart_from(a, 4)        # (step_4's weights gave the 5th loss)
    assert "step_00000004" in distill._restart_from(a, 5) and "step_00000004" in distill._restart_from(a, 7)
    assert "copy the student's conversion.json" in distill._restart_from(a, 5)  # (an earlier version's)
    distill._prune_checkpoints(str(tmp_path), 1)
    assert sorted(os.listdir(root)) == ["latest", "step_00000004"]
    assert "from the student (S)" in distill._restart_from(a, 4)


# ----------------------------------------------------------------------------------------------
# Bad input: a clear error, exit code 2, nothing written or overwritten
# ----------------------------------------------------------------------------------------------

def untouched(out):
    return not os.path.exists(out)


def test_student_that_is_not_a_hybrid(setup, tmp_path, capsys):
    a = args(setup, tmp_path / "o")
    a[a.index("--student") + 1] = setup["teacher"]
    assert distill.main(a) == 2 and "not a hybrid" in capsys.readouterr().err and untouched(tmp_path / "o")
    # A run folder killed between moving its student in and writing distill.json is no student.
    unfinished = tmp_path / "unfinished"
    shutil.copytree(setup["hybrid"], unfinished)
    (unfinished / "run.json").write_text("{}")
    a[a.index("--student") + 1] = str(unfinished)
    assert distill.main(a) == 2 and "did not finish" in capsys.readouterr().err and untouched(tmp_path / "o")


def test_teacher_with_another_tokenizer(setup, tmp_path, capsys):
    other = save_teacher(tmp_path / "other", bpe_tokenizer(TEXT * 4 + "zebra quagga okapi " * 20, 320))
    code = distill.main(args(setup, tmp_path / "o", extra=["--teacher", other]))
    assert code == 2 and "tokenizer differs" in capsys.readouterr().err and untouched(tmp_path / "o")


def test_overwrite_replaces_only_a_run(setup, tmp_path, capsys):
    """--overwrite deletes --out before the run starts: only a folder holding a run (or an empty one),
    never a folder of something else."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert distill.main(args(setup, mine, extra=["--overwrite"])) == 2
    assert "holds no distill.py run" in capsys.readouterr().err and os.listdir(mine) == ["notes.txt"]


def test_out_that_is_an_input_is_refused_even_with_overwrite(setup, tmp_path, capsys):
    """--overwrite deletes --out first: where --out is the student (or holds the data) that would
    delete the run's own input."""
    import shutil
    student = tmp_path / "h"
    shutil.copytree(setup["hybrid"], student)
    a = args(setup, student, extra=["--overwrite"])
    a[a.index("--student") + 1] = str(student)
    assert distill.main(a) == 2 and "is or holds the student" in capsys.readouterr().err
    assert (student / "model.safetensors").exists()
    for flag, name in (("--data", "data"), ("--eval-data", "eval data"), ("--test-data", "test data")):
        folder = tmp_path / name.replace(" ", "_")             # (apart from the student's folder)
        folder.mkdir()
        shutil.copy(setup["train"], folder / "text.txt")
        a = args(setup, folder, extra=["--overwrite"])
        a[a.index(flag) + 1] = str(folder / "text.txt")
        assert distill.main(a) == 2 and f"is or holds the {name} " in capsys.readouterr().err
        assert (folder / "text.txt").exists()


def test_student_without_gdn_layers_and_missing_eval_text(setup, tmp_path, capsys):
    all_kept = tmp_path / "all"
    code = convert.main(["--teacher", setup["teacher"], "--keep", "0,1,2,3", "--out", str(all_kept),
                         "--no-sample", "--eval-data", setup["valid"], "--window", "32"])
    assert code == 2 and "nothing to convert" in capsys.readouterr().err and untouched(all_kept)
    code = distill.main(args(setup, tmp_path / "o", extra=["--eval-data", str(tmp_path / "nope.txt")]))
    assert code == 2 and "--eval-data" in capsys.readouterr().err and untouched(tmp_path / "o")


@pytest.mark.parametrize("change, message", [
    (["--tokens", "63"], "smaller than one step"),
    (["--batch", "64", "--tokens", "2048"], "fewer than one batch"),
    (["--micro-batch", "3"], "does not divide"),
    (["--eval-window", "1"], "--eval-window must be >= 2"),
    (["--clip", "-1"], "must be positive"),
    (["--peak-tflops", "0"], "must be positive"),
    (["--eval-window", "100000"], "a smaller --eval-window"),
])
def test_budget_and_data_sizes(setup, tmp_path, capsys, change, message):
    code = distill.main(args(setup, tmp_path / "o", extra=change))
    assert code == 2 and message in capsys.readouterr().err and untouched(tmp_path / "o")


def test_existing_out_and_resume_with_another_configuration(setup, tmp_path, capsys):
    out = tmp_path / "run"
    assert distill.main(args(setup, out, extra=["--stop-after-steps", "2", "--eval-every", "0"])) == 0
    before = {f: open(os.path.join(r, f), "rb").read() for r, _, fs in os.walk(out) for f in fs}
    capsys.readouterr()
    assert distill.main(args(setup, out, extra=["--eval-every", "0"])) == 2
    assert "--resume" in capsys.readouterr().err
    assert distill.main(args(setup, out, extra=["--eval-every", "0", "--resume", "--lr", "5e-3"])) == 2
    err = capsys.readouterr().err
    assert "another configuration" in err and "lr: 0.003 there, 0.005 now" in err
    other = tmp_path / "other_test.txt"
    other.write_text(open(setup["test"]).read() + "\nOne more line.\n")
    for change, name in ((["--eval-batch-size", "3"], "eval_batch_size"), (["--test-data", str(other)], "test_data")):
        assert distill.main(args(setup, out, extra=["--eval-every", "0", "--resume", *change])) == 2
        assert f"{name}: " in capsys.readouterr().err                      # what it measures, too
    after = {f: open(os.path.join(r, f), "rb").read() for r, _, fs in os.walk(out) for f in fs}
    assert before == after
    # A finished run: --resume has nothing to do, but a configuration other than its own is still named.
    assert distill.main(args(setup, out, extra=["--eval-every", "0", "--resume"])) == 0
    assert (out / "distill.json").exists()
    capsys.readouterr()
    assert distill.main(args(setup, out, extra=["--eval-every", "0", "--resume", "--lr", "5e-3"])) == 2
    assert "another configuration" in capsys.readouterr().err


def test_resume_refuses_other_text_under_the_same_paths(setup, tmp_path, capsys):
    """The configuration names the files; run.json also holds their texts' token digests, so a
    corpus or evaluation text edited in place is refused rather than continued as if unchanged."""
    s = dict(setup, train=str(tmp_path / "train.txt"), valid=str(tmp_path / "valid.txt"))
    shutil.copyfile(setup["train"], s["train"])
    shutil.copyfile(setup["valid"], s["valid"])
    out = tmp_path / "run"
    assert distill.main(args(s, out, extra=["--stop-after-steps", "2", "--eval-every", "0"])) == 0
    before = {f: open(os.path.join(r, f), "rb").read() for r, _, fs in os.walk(out) for f in fs}
    for name in ("train", "valid"):
        text = open(s[name]).read()
        open(s[name], "w").write(text.replace(" the ", " a ", 1))
        capsys.readouterr()
        assert distill.main(args(s, out, extra=["--eval-every", "0", "--resume"])) == 2
        err = capsys.readouterr().err
        assert "started on other text" in err and ("data (" if name == "train" else "eval_data (") in err, err
        assert {f: open(os.path.join(r, f), "rb").read() for r, _, fs in os.walk(out) for f in fs} == before
        open(s[name], "w").write(text)
    assert distill.main(args(s, out, extra=["--eval-every", "0", "--resume"])) == 0   # restored: it goes on
    assert (out / "distill.json").exists()


def test_resume_refuses_a_student_made_again(setup, tmp_path, capsys):
    """Stage 2 stopped, its Stage 1 redone into the same folder (--overwrite): the student under the
    same path is another one, and --resume refuses to continue the old run's checkpoints on it."""
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    assert distill.main(args(setup, s1, 1, extra=["--eval-every", "0"])) == 0
    stage2 = args({**setup, "hybrid": str(s1)}, s2, 2, extra=["--eval-every", "0", "--seq", "32", "--batch", "2",
                                                               "--micro-batch", "1"])
    assert distill.main(stage2 + ["--stop-after-steps", "2"]) == 0
    assert distill.main(stage2 + ["--resume", "--stop-after-steps", "1"]) == 0     # the same student: goes on
    assert distill.main(args(setup, s1, 1, extra=["--eval-every", "0", "--overwrite"])) == 0
    capsys.readouterr()
    assert distill.main(stage2 + ["--resume"]) == 2
    assert "began from another student" in capsys.readouterr().err and not (s2 / "distill.json").exists()


def test_evaluation_leaves_each_module_in_its_mode():
    """Stage 1 trains its GDN layers inside a student loaded in eval mode: an evaluation must hand
    every module back in the mode it had (the whole model's mode would put the trained layers in
    eval mode from the first evaluation on)."""
    import contextlib
    from types import SimpleNamespace
    model = tiny_model("llama").eval()
    model.model.layers[1].train()
    run = SimpleNamespace(args=SimpleNamespace(eval_window=8, eval_max_windows=1, eval_batch_size=1, batch=1, seq=8,
                                               stage=1, eval_data="v"),
                          eval_ids=torch.randint(0, 128, (16,)), dist=SimpleNamespace(main=True, barrier=lambda: None),
                          autocast=contextlib.nullcontext, prior_tokens={})
    logged = []
    distill._evaluate(run, model, 1, SimpleNamespace(log=logged.append))
    assert len(logged) == 1 and not model.training and model.model.layers[1].training
    assert all(m.training for m in model.model.layers[1].modules()) and not model.model.layers[0].training


def test_processes_wait_an_hour_for_rank_0(monkeypatch):
    """Under torchrun the process group waits an hour at a barrier (rank 0 evaluating or writing a
    checkpoint), not the default 10 minutes."""
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: seen.update(kw, backend=backend))
    distill.Dist("cpu")
    assert seen["backend"] == "gloo" and seen["timeout"].total_seconds() >= 3600


def test_record_names_torchrun(monkeypatch):
    """Under torchrun sys.argv holds only the script: the record says how it was launched."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setattr(sys, "argv", ["distill.py", "--stage", "2"])
    assert distill.run_info()["command"] == "torchrun --nproc_per_node 2 distill.py --stage 2"
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distill.run_info()["command"].endswith(" distill.py --stage 2")
    # quoted as a shell would need it, so the line runs again as it was
    monkeypatch.setattr(sys, "argv", ["convert.py", "--distill-args", "--seq 32 --batch 2"])
    assert distill.run_info()["command"].endswith(" convert.py --distill-args '--seq 32 --batch 2'")


@pytest.mark.parametrize("change", [["--lr", "-1"], ["--lr", "nan"], ["--beta1", "2"], ["--weight-decay", "-1"],
                                    ["--min-lr-ratio", "5"], ["--warmup-steps", "-5"],
                                    ["--grad-ckpt", "-1", "--stage", "2"], ["--grad-ckpt", "0"], ["--lr-rest", "1e-4"],
                                    ["--ckpt-every", "-1"], ["--profile-steps", "-1"], ["--keep-checkpoints", "0"],
                                    ["--tokens", "inf"], ["--tokens", "1e999"], ["--eval-every", "abc"],
                                    ["--amp", "1", "--device", "cpu"], ["--warmup-steps", "7"],
                                    ["--min-lr-ratio", "0.1", "--schedule", "constant"],
                                    ["--min-lr-ratio", "0.1", "--stage", "2"], ["--eval-data", "none"],
                                    ["--profile-steps", "1", "--tokens", "128"],
                                    *([] if torch.cuda.is_available() else [["--device", "cuda"]])])
def test_bad_value_creates_nothing_and_overwrites_nothing(setup, tmp_path, capsys, change):
    """A bad value is named before --out is created, or, under --overwrite, deleted. Stage 2's own
    options are refused in Stage 1 (it would ignore them), whatever their value; so are a warm-up
    longer than the run (6 steps), a cosine floor under a constant schedule, --eval-every (128 here)
    with no evaluation text and a profile of a run too short to reach it (2 steps)."""
    old = tmp_path / "old"
    old.mkdir()
    (old / "distill.json").write_text("{}")
    assert distill.main(args(setup, tmp_path / "new", extra=change)) == 2
    assert change[0] in capsys.readouterr().err and untouched(tmp_path / "new")
    assert distill.main(args(setup, old, extra=[*change, "--overwrite"])) == 2
    assert change[0] in capsys.readouterr().err and os.listdir(old) == ["distill.json"]


def test_training_text_apart_from_what_is_measured(setup, tmp_path, capsys):
    """--data holding the evaluation or test text (the same file, or a copy of it in a folder) is
    refused, as is an --out inside the --data folder; nothing is written. A seed far past int64 still
    orders the data (the per-epoch offset wraps)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(setup["train"], corpus / "train.txt")
    shutil.copy(setup["test"], corpus / "copy.txt")
    for data, message in ((setup["valid"], "--data holds --eval-data's text"),
                          (str(corpus), "copy.txt')")):             # (the fixture's test text is its eval text)
        assert distill.main(args({**setup, "train": data}, tmp_path / "o")) == 2
        assert message in capsys.readouterr().err and untouched(tmp_path / "o")
    (corpus / "copy.txt").unlink()
    assert distill.main(args({**setup, "train": str(corpus)}, corpus / "run")) == 2
    assert "lies inside --data" in capsys.readouterr().err and untouched(corpus / "run")
    order = distill.Batches(torch.arange(64 * 16), 16, 4, seed=10**15).order(0)
    assert sorted(order.tolist()) == list(range(64))


def test_student_whose_weights_do_not_load_leaves_the_old_run(setup, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    old = tmp_path / "old"
    old.mkdir()
    (old / "distill.json").write_text("{}")
    student = tmp_path / "h"
    shutil.copytree(setup["hybrid"], student)
    weights = student / "model.safetensors"
    state = load_file(weights)
    save_file({k: v for k, v in state.items() if k != sorted(state)[-1]}, weights, metadata={"format": "pt"})
    a = args({**setup, "hybrid": str(student)}, old, extra=["--overwrite"])
    assert distill.main(a) == 2 and "could not load the student's weights" in capsys.readouterr().err
    assert os.listdir(old) == ["distill.json"]
    weights.write_bytes(b"\x00" * 1000)               # a truncated copy: safetensors' own error type
    assert distill.main(a) == 2 and "could not load the student's weights" in capsys.readouterr().err
    assert os.listdir(old) == ["distill.json"]
    weights.unlink()
    assert distill.main(a) == 2 and "no .safetensors file" in capsys.readouterr().err
    assert os.listdir(old) == ["distill.json"]


def test_student_without_its_tokenizer_is_named(setup, tmp_path, capsys):
    student = tmp_path / "h"
    shutil.copytree(setup["hybrid"], student)
    for f in os.listdir(student):
        if f.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            os.remove(student / f)
    assert distill.main(args({**setup, "hybrid": str(student)}, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert f"could not load the tokenizer of --student '{student}'" in err and "Traceback" not in err
    assert untouched(tmp_path / "out")


def test_run_info_names_the_device_the_work_ran_on(monkeypatch):
    """On a GPU machine, a run on the CPU (--device cpu) is recorded as the CPU's, not the GPU's."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "FAKE GPU")
    assert distill.run_info(0, "cpu")["device"].startswith("CPU: ")
    assert distill.run_info(0, torch.device("cpu"))["device"].startswith("CPU: ")
    assert distill.run_info(0, "cuda")["device"] == distill.run_info(0)["device"] == "FAKE GPU"


@pytest.mark.parametrize("name", ["config.json", "conversion.json", "distill.json"])
def test_student_with_a_broken_json_file_is_named(setup, tmp_path, capsys, name):
    student = tmp_path / "h"
    shutil.copytree(setup["hybrid"], student)
    (student / name).write_text("not json")
    assert distill.main(args({**setup, "hybrid": str(student)}, tmp_path / "o")) == 2
    assert f"'{student / name}' is not a valid JSON file" in capsys.readouterr().err and untouched(tmp_path / "o")


def test_out_teacher_and_resume_are_checked_before_the_corpus_is_read(setup, tmp_path, capsys, monkeypatch):
    def read(*_):
        raise AssertionError("the corpus is read before the cheap checks")
    monkeypatch.setattr(distill, "_corpus_ids", read)
    out = tmp_path / "run"
    out.mkdir()
    assert distill.main(args(setup, out)) == 2 and "already exists" in capsys.readouterr().err
    assert distill.main(args(setup, tmp_path / "o", extra=["--teacher", str(tmp_path / "no-teacher")])) == 2
    assert "does not exist" in capsys.readouterr().err and untouched(tmp_path / "o")
    (tmp_path / "f").write_text("x")
    assert distill.main(args(setup, tmp_path / "f", extra=["--overwrite"])) == 2
    assert "is a file, not a run folder" in capsys.readouterr().err and (tmp_path / "f").read_text() == "x"
    # a run folder that could not be made (here under a file) is said before the corpus is read,
    # not as a traceback once the models have loaded; so is a seed torch would not take
    assert distill.main(args(setup, tmp_path / "f" / "run")) == 2
    assert "'" + str(tmp_path / "f") + "' is not a folder this process can write in" in capsys.readouterr().err
    assert distill.main(args(setup, tmp_path / "o", extra=["--seed", str(2**64)])) == 2
    assert "--seed must fit in 64 bits" in capsys.readouterr().err and untouched(tmp_path / "o")
    # nor inside a hybrid's folder (here the student's), which a conversion with --overwrite replaces
    # whole; nor a conversion inside a run's
    assert distill.main(args(setup, os.path.join(setup["hybrid"], "run"))) == 2
    assert "a hybrid folder (conversion.json)" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(setup["hybrid"], "run"))
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "run.json").write_text('{"config": {"stage": 1}}')
    assert convert.main(["--teacher", setup["teacher"], "--out", str(tmp_path / "done" / "h")]) == 2
    assert "a run folder (run.json)" in capsys.readouterr().err and os.listdir(tmp_path / "done") == ["run.json"]
    (tmp_path / "theirs").mkdir()                       # a run.json of another tool's does not count
    (tmp_path / "theirs" / "run.json").write_text('{"experiment": "x"}')
    distill.check_apart(str(tmp_path / "theirs" / "h"))
    # and a hybrid folder that holds one already (made before this was refused) is not overwritten
    shutil.copytree(setup["hybrid"], tmp_path / "h")
    (tmp_path / "h" / "run").mkdir()
    (tmp_path / "h" / "run" / "run.json").write_text('{"config": {"stage": 1}}')
    for extra in ([], ["--overwrite"]):
        assert convert.main(["--teacher", setup["teacher"], "--out", str(tmp_path / "h"), *extra]) == 2
        err = capsys.readouterr().err
        assert "holds another hybrid or run, in '" + str(tmp_path / "h" / "run") in err and "pass --" not in err
    assert os.path.isfile(tmp_path / "h" / "run" / "run.json")
    # a folder that holds no run is said as such, not met with advice (--overwrite) that is then refused
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    assert distill.main(args(setup, tmp_path / "mine")) == 2
    err = capsys.readouterr().err
    assert "holds no distill.py run" in err and "pass --resume" not in err


def test_a_text_shorter_than_a_window_is_named(setup, tmp_path, capsys):
    (tmp_path / "short.txt").write_text("A few words.")
    for flag in ("--eval-data", "--test-data"):
        assert distill.main(args(setup, tmp_path / "o", extra=[flag, str(tmp_path / "short.txt")])) == 2
        assert f"{flag}'s text has" in capsys.readouterr().err and untouched(tmp_path / "o")


def test_resume_where_nothing_ran_yet_starts_the_run(setup, tmp_path, capsys):
    """A job that may be killed and restarted passes --resume every time: the first launch starts."""
    out = tmp_path / "run"
    assert distill.main(args(setup, out, extra=["--resume"])) == 0
    said = capsys.readouterr().out
    assert "nothing to resume" in said and (out / "distill.json").exists()
    # the start line says how often the budget (6 steps x 4 sequences) reads the data
    n, times = re.search(r"= (\d+) sequences, read (\S+) times over", said).groups()
    assert times == f"{6 * 4 / int(n):.3g}"
    # killed after making --out, before writing run.json in it: an empty folder starts the run too,
    # and without --resume is refused like any existing --out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert distill.main(args(setup, empty)) == 2 and "already exists" in capsys.readouterr().err
    assert distill.main(args(setup, empty, extra=["--resume"])) == 0
    assert "nothing to resume" in capsys.readouterr().out and (empty / "distill.json").exists()


def test_write_atomic_leaves_no_temp_file(tmp_path, monkeypatch):
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match="is a folder"):
        distill.write_json(str(tmp_path / "d"), {})

    def replace(src, dst):
        raise OSError("the rename fails")
    monkeypatch.setattr(distill.os, "replace", replace)
    with pytest.raises(OSError, match="the rename fails"):
        distill.write_atomic(str(tmp_path / "f.txt"), "text")
    assert os.listdir(tmp_path) == ["d"]


def test_published_files_reach_the_disk_before_their_rename(tmp_path, monkeypatch):
    """seal fsyncs every file and folder it publishes before the rename that makes them visible: a
    crash after the rename then never leaves a checkpoint or result with empty files."""
    synced, order = set(), []
    fsync = os.fsync
    monkeypatch.setattr(distill.os, "fsync", lambda fd: (synced.add(os.path.realpath(f"/proc/self/fd/{fd}")), fsync(fd)))
    replace = os.replace
    monkeypatch.setattr(distill.os, "replace", lambda a, b: (order.append(set(synced)), replace(a, b)))
    tmp_path = type(tmp_path)(os.path.realpath(tmp_path))
    distill.write_atomic(str(tmp_path / "f.txt"), "text")
    assert order and any(p.startswith(str(tmp_path / ".tmp-")) for p in order[0])
    folder = tmp_path / "run"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "w.bin").write_bytes(b"123")
    synced.clear()
    distill.seal(str(folder))
    assert {str(folder / "sub" / "w.bin"), str(folder / "sub"), str(folder)} <= synced


# ----------------------------------------------------------------------------------------------
# One command: teacher -> init -> Stage 1 -> Stage 2 -> evaluation
# ----------------------------------------------------------------------------------------------

def test_convert_chains_both_stages(setup, tmp_path):
    s = setup
    out = tmp_path / "h"
    more = (f"--seq 16 --batch 4 --eval-data {s['valid']} --eval-window 32 --eval-max-windows 1 "
            f"--test-data {s['test']} --ckpt-every 0 --grad-ckpt 0 --lr-rest 2e-5 --min-lr-ratio 0.1")
    code = convert.main(["--teacher", s["teacher"], "--keep", "1/2", "--out", str(out), "--eval-data", s["valid"],
                         "--window", "32", "--max-windows", "1", "--no-sample", "--calib-seqs", "1",
                         "--calib-len", "16", "--calib-data", s["train"], "--distill-tokens", "128,64",
                         "--distill-data", s["train"], "--distill-args", more])
    assert code == 0
    assert json.load(open(out / "conversion.json"))["teacher_spec"] == s["teacher"]
    r1 = json.load(open(f"{out}-stage1/distill.json"))
    r2 = json.load(open(f"{out}-stage2/distill.json"))
    assert r1["tokens_by_stage"] == {"1": 128} and r2["tokens_by_stage"] == {"1": 128, "2": 64}
    # each stage records its own arguments beside the process's (convert.py's) command line
    assert "--stage 1 " in r1["arguments"] and "--stage 2 " in r2["arguments"] and "--seq 16" in r2["arguments"]
    assert r2["student_in"] == f"{out}-stage1" and r2["test"]["ppl"] > 0
    # Stage 2's own options (one --distill-args for both stages) reach Stage 2 only
    assert (r1["grad_ckpt"], r1["config"]["lr_rest"]) == (None, None)
    assert (r2["grad_ckpt"], r2["config"]["lr_rest"]) == (0, 2e-5)
    # and the cosine floor is Stage 1's: Stage 2's constant schedule does not refuse it
    assert (r1["config"]["schedule"], r1["config"]["min_lr_ratio"], r2["config"]["schedule"]) == ("cosine", 0.1, "constant")
    assert lines(f"{out}-stage2", "eval")[-1]["tokens_by_stage"] == {"1": 128, "2": 64}


def test_convert_chain_names_resume_for_a_hybrid_already_there(setup, tmp_path, capsys):
    """A hybrid in --out and no stage run yet: the chain's message names --resume (which runs the
    chain from that hybrid) beside --overwrite (which would convert again)."""
    s = setup
    out = tmp_path / "h"
    conversion = ["--teacher", s["teacher"], "--keep", "1/2", "--init", "naive", "--out", str(out), "--eval-data",
                  s["valid"], "--window", "32", "--max-windows", "1", "--no-sample"]
    assert convert.main(conversion) == 0
    assert convert.main(conversion + ["--distill-tokens", "128,0", "--distill-data", s["train"], "--distill-args",
                                      "--seq 16 --batch 4 --eval-data none --test-data none"]) == 2
    assert "already exists: pass --resume to run the chain from it" in capsys.readouterr().err
    other = tmp_path / "other"                          # a folder that holds no hybrid: --resume would not help
    other.mkdir()
    (other / "notes.txt").write_text("not a hybrid")
    assert convert.main([a if a != str(out) else str(other) for a in conversion]
                        + ["--distill-tokens", "128,0", "--distill-data", s["train"], "--distill-args",
                           "--seq 16 --batch 4 --eval-data none --test-data none"]) == 2
    err = capsys.readouterr().err
    assert "holds no hybrid written by convert.py" in err and "--resume" not in err and "pass --overwrite" not in err


def test_chain_resumes_a_hybrid_recorded_with_an_option_its_init_never_read(setup, tmp_path, capsys):
    """A hybrid converted before an --init-opt its init never reads was refused (its request records
    one): the chain's --resume keeps it, with the option or without; a new conversion with the
    option is refused."""
    s = setup
    out = tmp_path / "h"
    conversion = ["--teacher", s["teacher"], "--keep", "1/2", "--init", "naive", "--out", str(out), "--eval-data",
                  s["valid"], "--window", "32", "--max-windows", "1", "--no-sample"]
    assert convert.main(conversion) == 0
    record = json.load(open(out / "conversion.json"))
    record["request"]["init_opts"] = {"steps": 5}
    distill.write_json(str(out / "conversion.json"), record)
    chain = ["--distill-tokens", "64,0", "--distill-data", s["train"], "--distill-args",
             "--seq 16 --batch 4 --eval-data none --test-data none", "--resume"]
    for opts in (["--init-opt", "steps=5"], []):
        assert convert.main(conversion + opts + chain) == 0
        assert "keeping the hybrid" in capsys.readouterr().out
    assert convert.main(conversion + ["--init-opt", "steps=5", "--overwrite"]) == 2
    assert "naive never reads it" in capsys.readouterr().err
    assert json.load(open(out / "conversion.json")) == record


def test_a_resumed_run_keeps_settings_now_refused_as_doing_nothing(setup, tmp_path):
    """A run begun before these were refused goes on under --resume: the refusals are of new runs."""
    for change in (["--eval-data", "none"], ["--min-lr-ratio", "0.1", "--stage", "2"], ["--warmup-steps", "7"],
                   ["--profile-steps", "1", "--tokens", "128"]):
        with pytest.raises(ValueError):
            distill.check_shapes(distill.parse_args(args(setup, tmp_path / "r", extra=change)), 1)
        a = distill.parse_args(args(setup, tmp_path / "r", extra=[*change, "--resume"]))
        assert distill.check_shapes(a, 1) >= 1


def test_convert_chain_resumes(setup, tmp_path, capsys):
    """A chain stopped before Stage 2 ran, run again with --resume: the hybrid and Stage 1 are kept
    as they are, Stage 2 runs, and ends where an unbroken chain ends. Without --resume the stopped
    chain's folders are refused; with other conversion settings, --resume is refused, naming them."""
    import shutil
    s = setup
    out = tmp_path / "h"
    more = (f"--seq 16 --batch 4 --eval-data none --test-data {s['test']} --eval-window 32 --eval-max-windows 1 "
            f"--ckpt-every 0")
    argv = ["--teacher", s["teacher"], "--keep", "1/2", "--out", str(out), "--eval-data", s["valid"], "--window", "32",
            "--max-windows", "1", "--no-sample", "--calib-seqs", "1", "--calib-len", "16", "--calib-data",
            str(tmp_path / "calib.txt"), "--distill-tokens", "128,64", "--distill-data", s["train"], "--distill-args", more]
    shutil.copy(s["train"], tmp_path / "calib.txt")
    assert convert.main(argv) == 0
    done = {f: open(f).read() for f in (out / "conversion.json", f"{out}-stage1/distill.json",
                                        f"{out}-stage2/distill.json")}
    shutil.rmtree(f"{out}-stage2")                                     # stopped before Stage 2
    with pytest.raises(SystemExit):
        convert.main(argv)
    assert "pass --resume to continue the chain" in capsys.readouterr().err
    assert convert.main(argv + ["--init", "naive", "--resume"]) == 2
    assert "converted with other init ('taylor', not 'naive')" in capsys.readouterr().err
    text = (tmp_path / "calib.txt").read_text()
    (tmp_path / "calib.txt").write_text(text.replace("the", "THE"))              # edited in place
    assert convert.main(argv + ["--resume"]) == 2
    assert "converted with other calib_text" in capsys.readouterr().err
    (tmp_path / "calib.txt").write_text(text)
    assert convert.main(argv + ["--resume"]) == 0
    assert "keeping the hybrid" in capsys.readouterr().out
    again = {f: open(f).read() for f in done}
    for f in list(done)[:2]:
        assert again[f] == done[f], f                                  # the hybrid and Stage 1 as they were
    r2, r2_again = json.loads(done[f"{out}-stage2/distill.json"]), json.loads(again[f"{out}-stage2/distill.json"])
    assert r2_again["test"]["ppl"] == pytest.approx(r2["test"]["ppl"], rel=1e-6)
    assert convert.main(argv + ["--resume"]) == 0                     # a finished chain: nothing to do
    assert convert.main([a if a != "1/2" else "0.5" for a in argv] + ["--resume"]) == 0     # the same keep
    shutil.rmtree(out)                                  # the hybrid gone, its stages there: not redone under them
    assert convert.main(argv + ["--resume"]) == 2
    assert "holds no hybrid, yet" in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit):
        convert.main(argv + ["--resume", "--overwrite"])
    assert "give one" in capsys.readouterr().err
    # A stage's run folder holds a hybrid with its conversion.json, but no conversion may replace it.
    assert convert.main(["--teacher", s["teacher"], "--keep", "1/2", "--init", "naive", "--no-sample", "--eval-data",
                         s["valid"], "--window", "32", "--out", f"{out}-stage1", "--overwrite"]) == 2
    assert "holds a distill.py run" in capsys.readouterr().err
    assert open(f"{out}-stage1/distill.json").read() == done[f"{out}-stage1/distill.json"]
    # A conversion redone into --out on its own (no chain), then the chain resumed with its settings:
    # the stages began from the old hybrid, finished or not, and are refused rather than kept.
    assert convert.main(argv[:argv.index("--distill-tokens")] + ["--init", "naive"]) == 0
    assert convert.main(argv + ["--init", "naive", "--resume"]) == 2
    assert "began from another student" in capsys.readouterr().err
    assert open(f"{out}-stage1/distill.json").read() == done[f"{out}-stage1/distill.json"]


@pytest.mark.parametrize("bad, message", [(["--distill-data", "/no/such/text"], "--distill-data '/no/such/text' is neither a text file"),
                                          (["--distill-args", "--bogus 1"], "unrecognized arguments"),
                                          (["--distill-tokens", "100,64", "--distill-args", "--eval-data none --test-data none"],
                                           "--distill-tokens: Stage 1's budget of 100 tokens is smaller than one step (batch 96 x seq 512"),
                                          (["--distill-args", "--seq 1 --eval-data none --test-data none"],
                                           "--distill-args (distill.py's options): --seq must be >= 2"),
                                          (["--distill-args", "--eval-data /no/such.txt"], "--distill-args (distill.py's options): --eval-data"),
                                          (["--out", ""], "--distill-tokens needs --out"),
                                          (["--distill-tokens", "0,0"], "runs no stage"),
                                          (["--distill-args", "--stage 2"], "may not set --stage"),
                                          (["--distill-args", "--seed 3 --out=/tmp/x"], "may not set --out, --seed"),
                                          (["--distill-data", "SHORT", "--distill-args",
                                            "--seq 16 --batch 2 --eval-data none --test-data none"],
                                           "too few tokens for one Stage 1 batch of 2 x 16"),
                                          (["--distill-args", "--tok 999 --stud /etc --res"],
                                           "may not set --student, --tokens, --resume"),
                                          (["--distill-args", "--stop-after-steps 1"], "may not set --stop-after-steps"),
                                          (["--distill-tokens", "128,0", "--distill-args", "--grad-ckpt 1"],
                                           "--grad-ckpt: Stage 2's options, and --distill-tokens runs no Stage 2"),
                                          (["--distill-data", "BINARY"], "not UTF-8"),
                                          (["--distill-args", "--seq 16 --batch 2 --eval-data BINARY"], "--distill-args --eval-data: "),
                                          (["--distill-args", "--seq 16 --batch 2 --test-data EMPTY"], "holds no text"),
                                          (["--distill-args", "--teacher random:nope"], "may not set --teacher"),
                                          (["--distill-args", "--schedule constant --min-lr-ratio 0.1"],
                                           "--schedule constant never reads it"),
                                          (["--distill-args", "--seq 16 --batch 2 --eval-data SMALL --eval-window 4096"],
                                           "--distill-args --eval-data"),      # (tokenized before converting)
                                          (["--overwrite"], "'STAGE1' is a folder that holds no distill.py run"),
                                          (["--out", "AFILE/h", "--distill-args", "--seq 16 --batch 4 --eval-data none --test-data none"], "error: --out 'AFILE/h/config.json': 'AFILE' is not a "
                                                                 "folder this process can write in")])
def test_convert_chain_checks_its_inputs_before_converting(setup, tmp_path, capsys, bad, message):
    out = tmp_path / "h"
    if "--overwrite" in bad:                   # a stage's folder in the way, holding something else
        (tmp_path / "h-stage1").mkdir()
        (tmp_path / "h-stage1" / "notes.txt").write_text("not a run: --overwrite may not delete it")
        message = message.replace("STAGE1", str(tmp_path / "h-stage1"))
    (tmp_path / "afile").write_text("a file, not a folder")
    message = message.replace("AFILE", str(tmp_path / "afile"))
    if "AFILE/h" in bad:
        out = tmp_path / "afile" / "h"
    (tmp_path / "short.txt").write_text("short")
    (tmp_path / "binary.txt").write_bytes(bytes(range(128, 256)) * 8)
    (tmp_path / "empty.txt").write_text(" \n")
    (tmp_path / "small.txt").write_text("Some words. " * 200)      # 2,400 bytes, fewer tokens than 4096
    bad = [str(tmp_path / "short.txt") if a == "SHORT" else
           a.replace("BINARY", str(tmp_path / "binary.txt")).replace("EMPTY", str(tmp_path / "empty.txt"))
           .replace("SMALL", str(tmp_path / "small.txt")).replace("AFILE", str(tmp_path / "afile")) for a in bad]
    argv = ["--teacher", setup["teacher"], "--keep", "1/2", "--out", str(out), "--no-sample",
            "--distill-tokens", "128,64", "--distill-data", setup["train"]] + bad
    try:
        code = convert.main(argv)
    except SystemExit as e:                      # argparse's own exit, from distill.py's parser
        code = e.code
    assert code == 2 and message in capsys.readouterr().err and not out.exists()


# ----------------------------------------------------------------------------------------------
# Several processes (torchrun, DDP over gloo on CPU): the same trajectory as one process
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage", [1, 2])
def test_ddp_matches_one_process(setup, tmp_path, stage):
    """Two processes with a micro-batch of 2 each vs. one process accumulating two micro-batches of 2:
    the same global batch, so the same losses up to the order of float additions in the all-reduce."""
    import subprocess
    import sys
    s = {**setup, "train": setup["small"]}
    one, two = tmp_path / "one", tmp_path / "two"
    extra = ["--tokens", "256", "--eval-every", "0", "--test-data", "none", "--ckpt-every", "2", "--device", "cpu"]
    assert distill.main(args(s, one, stage, extra=extra)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           distill.__file__, *args(s, two, stage, extra=extra)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = lines(one, "train"), lines(two, "train")
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5) and x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
    assert json.load(open(two / "distill.json"))["processes"] == 2
    assert lines(one, "eval")[-1]["ppl"] == pytest.approx(lines(two, "eval")[-1]["ppl"], rel=1e-4)


def test_profile_steps_writes_a_profile(setup, tmp_path):
    out = tmp_path / "prof"
    assert distill.main(args(setup, out, 1, tokens=6 * 64, extra=["--profile-steps", "2"])) == 0
    text = (out / "profile.txt").read_text()
    assert "2 steps after 2 warm-up steps" in text and "aten::" in text


def test_tokens_to_reach_interpolates_in_log_ppl():
    curve = [(0, 100.0), (1000, 10.0), (2000, 5.0)]
    assert distill._tokens_to_reach(curve, 100.0) == 0
    assert distill._tokens_to_reach(curve, 10.0 ** 1.5) == pytest.approx(500)      # halfway in log10
    assert distill._tokens_to_reach(curve, 5.0) == pytest.approx(2000)
    assert distill._tokens_to_reach(curve, 4.9) is None


def fake_stage2_run(folder, init, curve, teacher=10.0, test=None, eval_windows=0, lr=1e-4, stage1_tokens=1000,
                    stage2_before=0):
    folder.mkdir()
    (folder / "conversion.json").write_text(json.dumps({"init": init}))
    rows = [{"type": "teacher_eval", "stage": 2, "step": 0, "ppl": teacher}]
    rows += [{"type": "eval", "stage": 2, "step": i, "tokens": t, "ppl": p} for i, (t, p) in enumerate(curve)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"teacher": "t", "eval_data": "valid.txt", "eval_window": 2048, "eval_max_windows": eval_windows,
              "student": str(folder) + "-stage1", "lr": lr, "eval_every": 1000}
    (folder / "distill.json").write_text(json.dumps({"stage": 2, "test": {"ppl": test} if test else None,
                                                     "config": config, "tokens": int(curve[-1][0]),
                                                     "tokens_by_stage": {"1": stage1_tokens,
                                                                         "2": stage2_before + int(curve[-1][0])}}))
    return str(folder)


def test_recovery_report(tmp_path, capsys):
    naive = fake_stage2_run(tmp_path / "n", "naive", [(0, 1000.0), (4e6, 14.0), (8e6, 12.0)], test=12.5)
    ours = fake_stage2_run(tmp_path / "t", "taylor", [(0, 300.0), (1e6, 12.0), (2e6, 11.0)])
    stem = str(tmp_path / "out" / "rec")
    assert distill.main(["--recovery", naive, ours, "--results", stem]) == 0
    # an existing report is replaced only under --overwrite, and refused before any run is read
    assert distill.main(["--recovery", naive, ours, "--results", stem]) == 2
    assert "already exists: pass --overwrite" in capsys.readouterr().err
    (tmp_path / "file.txt").write_text("x")
    assert distill.main(["--recovery", naive, ours, "--results", str(tmp_path / "file.txt" / "rec")]) == 2
    assert "is not a folder this process can write in" in capsys.readouterr().err
    record = open(os.path.join(naive, "distill.json")).read()        # a run's own record, under --overwrite
    assert distill.main(["--recovery", naive, ours, "--results", os.path.join(naive, "distill"), "--overwrite"]) == 2
    assert "would replace a file of the run 1" in capsys.readouterr().err
    assert open(os.path.join(naive, "distill.json")).read() == record
    assert distill.main(["--recovery", naive, ours, "--results", os.path.join(naive, "recovery")]) == 0   # a new file
    r = json.load(open(stem + ".json"))["runs"]
    assert r["naive"]["tokens_to"]["1.20x teacher"] == pytest.approx(8e6)          # 12.0 = 1.2 x 10
    assert r["taylor"]["tokens_to"]["1.20x teacher"] == pytest.approx(1e6)
    assert r["taylor"]["speedup_vs_naive"]["1.20x teacher"] == pytest.approx(8.0)
    assert r["taylor"]["tokens_to"]["naive final"] == pytest.approx(1e6)
    assert r["naive"]["tokens_to"]["1.10x teacher"] is None
    assert "| taylor | 11.00 | - |" in open(stem + ".md").read()
    # an init already past naive's final perplexity when Stage 2 starts: 0 tokens, an unbounded speedup
    early = fake_stage2_run(tmp_path / "a", "align-plus", [(0, 11.5), (1e6, 11.0)])
    assert distill.main(["--recovery", naive, ours, early, "--results", stem, "--overwrite"]) == 0
    r = json.load(open(stem + ".json"))["runs"]["align-plus"]
    assert r["tokens_to"]["naive final"] == 0 and r["speedup_vs_naive"]["naive final"] is None
    row = next(l for l in open(stem + ".md") if l.startswith("| align-plus"))
    assert row.rstrip().endswith("| 1.00M | at start | at start | at start | at start | - | - | "
                                 "inf (at start) | inf (at start) | inf (at start) |"), row
    # without the naive run there is nothing to compare against
    assert distill.main(["--recovery", ours, "--results", stem, "--overwrite"]) == 2
    assert "needs the naive run" in capsys.readouterr().err
    # runs evaluated on other windows (or against another teacher perplexity) are not compared
    fewer = fake_stage2_run(tmp_path / "f", "taylor-plus", [(0, 300.0), (1e6, 12.0)], eval_windows=8)
    other = fake_stage2_run(tmp_path / "o", "align-only", [(0, 300.0), (1e6, 12.0)], teacher=11.0)
    for run in (fewer, other):
        assert distill.main(["--recovery", naive, run, "--results", stem, "--overwrite"]) == 2
        assert "not evaluated alike" in capsys.readouterr().err
    # ... though the same windows scored on another machine may move the teacher's in its 4th digit
    elsewhere = fake_stage2_run(tmp_path / "e", "align-only", [(0, 300.0), (1e6, 12.0)], teacher=10.005)
    assert distill.main(["--recovery", naive, elsewhere, "--results", stem, "--overwrite"]) == 0
    # nor runs trained otherwise than by their init: another Stage-2 setting, a shorter Stage 1, a
    # student that had been through Stage 2 before (its curve starts at 0 again)
    hotter = fake_stage2_run(tmp_path / "h", "taylor-plus", [(0, 300.0), (1e6, 12.0)], lr=1e-3)
    shorter = fake_stage2_run(tmp_path / "s", "align-only", [(0, 300.0), (1e6, 12.0)], stage1_tokens=10)
    again = fake_stage2_run(tmp_path / "again", "taylor-phase1", [(0, 300.0), (1e6, 12.0)], stage2_before=int(1e6))
    for run, what in ((hotter, "differ in lr"), (shorter, "differ in earlier stages' tokens"),
                      (again, "differ in earlier stages' tokens")):
        assert distill.main(["--recovery", naive, run, "--results", stem, "--overwrite"]) == 2
        assert what in capsys.readouterr().err
    # ... nor hybrids of another shape (as many GDN layers: which ones may differ), nor runs whose
    # Stage 1, where its record is at hand, ran otherwise
    wider = fake_stage2_run(tmp_path / "w", "taylor-plus", [(0, 300.0), (1e6, 12.0)])
    (tmp_path / "w" / "conversion.json").write_text(json.dumps({"init": "taylor-plus", "gdn_layers": [1, 2, 3]}))
    (tmp_path / "n" / "conversion.json").write_text(json.dumps({"init": "naive", "gdn_layers": [1, 3]}))
    assert distill.main(["--recovery", naive, wider, "--results", stem, "--overwrite"]) == 2
    assert "differ in GDN layer count" in capsys.readouterr().err
    (tmp_path / "n" / "conversion.json").write_text(json.dumps({"init": "naive"}))
    for run, lr in ((naive, 1e-4), (ours, 1e-3)):
        os.makedirs(run + "-stage1")
        with open(os.path.join(run + "-stage1", "distill.json"), "w") as f:
            json.dump({"stage": 1, "config": {"student": run + "-conversion", "lr": lr, "seq": 64}}, f)
    assert distill.main(["--recovery", naive, ours, "--results", stem, "--overwrite"]) == 2
    assert "differ in Stage-1 settings" in capsys.readouterr().err
    json.dump({"stage": 1, "config": {"student": "elsewhere", "lr": 1e-4, "seq": 64}},
              open(os.path.join(ours + "-stage1", "distill.json"), "w"))      # only the student differs
    assert distill.main(["--recovery", naive, ours, "--results", stem, "--overwrite"]) == 0
    # a run whose log lacks its last evaluation (cut short), or has none, is refused before anything
    # is written: the report would take an earlier point for its final perplexity
    for curve in ([(0, 300.0), (1e6, 12.0), (2e6, 11.0)], [(0, 300.0)]):
        cut = fake_stage2_run(tmp_path / f"cut{len(curve)}", "taylor-plus", curve)
        log = (tmp_path / f"cut{len(curve)}" / "metrics.jsonl").read_text().splitlines(keepends=True)
        (tmp_path / f"cut{len(curve)}" / "metrics.jsonl").write_text("".join(log[:-1]))
        fresh = str(tmp_path / f"fresh{len(curve)}" / "rec")
        assert distill.main(["--recovery", naive, cut, "--results", fresh]) == 2
        assert "holds no Stage-2 evaluation at the run's end" in capsys.readouterr().err
        assert not os.path.exists(fresh + ".json") and not os.path.exists(fresh + ".md")
    # a broken record is named
    for name in ("distill.json", "conversion.json"):
        broken = fake_stage2_run(tmp_path / f"broken-{name}", "broken", [(0, 300.0)])
        open(os.path.join(broken, name), "w").write("")
        assert distill.main(["--recovery", naive, broken, "--results", stem, "--overwrite"]) == 2
        assert os.path.join(broken, name) in capsys.readouterr().err


def test_stage2_logs_the_teacher_on_the_eval_windows(setup, tmp_path):
    """... with the windows' token count, as every perplexity is reported; and a stage run again on
    its own output adds its tokens to the earlier run's (tokens seen in each stage, METHOD 5)."""
    out = tmp_path / "s2"
    assert distill.main(args(setup, out, 2, tokens=2 * 64)) == 0
    t, e = lines(out, "teacher_eval"), lines(out, "eval")
    assert len(t) == 1 and t[0]["windows"] == e[0]["windows"] == 2
    assert t[0]["eval_tokens"] == e[0]["eval_tokens"] > 0
    teacher = convert.load_teacher(setup["teacher"])[0]
    ids = distill.tokenize(setup["tok"], distill.read_text(setup["valid"]))
    want = distill.perplexity(teacher, ids, window=32, max_windows=2)["ppl"]
    tol = 2e-2 if torch.cuda.is_available() else 1e-5          # (on a GPU the run measured in bf16)
    assert t[0]["ppl"] == pytest.approx(want, rel=tol) and e[0]["ppl"] != pytest.approx(want, rel=1e-3)
    again = tmp_path / "s2-again"
    assert distill.main(args({**setup, "hybrid": str(out)}, again, 2, tokens=2 * 64)) == 0
    record = json.load(open(again / "distill.json"))
    assert record["tokens"] == 128 and record["tokens_by_stage"] == {"2": 256}
    assert lines(again, "eval")[-1]["tokens_by_stage"] == {"2": 256}


def test_random_teacher_for_throughput(setup, tmp_path):
    """--teacher random:FOLDER: a config and a tokenizer, no weights; the same seeded weights every
    time it is loaded, so convert.py's hybrid and distill.py's reloaded teacher agree."""
    folder = tmp_path / "shape"
    tiny_model("llama", vocab_size=len(setup["tok"])).config.save_pretrained(folder)
    setup["tok"].save_pretrained(folder)
    a, _, what = convert.load_teacher(f"random:{folder}")
    b, _, _ = convert.load_teacher(f"random:{folder}")
    assert "random weights" in what and all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    hybrid = tmp_path / "hybrid"
    assert convert.main(["--teacher", f"random:{folder}", "--keep", "1/2", "--out", str(hybrid), "--no-sample",
                         "--eval-data", setup["valid"], "--window", "32", "--max-windows", "1"]) == 0
    s = {**setup, "hybrid": str(hybrid)}
    out = tmp_path / "run"
    assert distill.main(args(s, out, 2, tokens=2 * 64, extra=["--eval-data", "none", "--eval-every", "0",
                                                                     "--test-data", "none"])) == 0
    assert json.load(open(out / "distill.json"))["teacher_spec"] == f"random:{folder}"
    with pytest.raises(ValueError, match="nor a folder"):
        convert.load_teacher("random:nothing-here")


def test_flops_count_softmax_and_gdn_layers_apart():
    from gdn import hybridize
    teacher = tiny_model("llama")                      # 4 layers
    student = hybridize(tiny_model("llama"), [1, 3])
    c = teacher.config
    H, D = c.num_attention_heads, c.hidden_size // c.num_attention_heads
    soft, gdn = 2 * 100 * H * D, H * (2 * 64 * 5 * D + 6 * D * D)
    assert distill._mixing_flops(teacher, 100) == 4 * soft
    assert distill._mixing_flops(student, 100) == 2 * soft + 2 * gdn
    stack = distill.GDNStack(student)
    W, I, Hkv = c.hidden_size, c.intermediate_size, c.num_key_value_heads
    n_t = 4 * (2 * W * H * D + 2 * W * Hkv * D + 3 * W * I)        # q, o; k, v; gate, up, down (no LM head)
    n_gdn = 2 * (5 * W * H * D + 2 * W * H)                         # q, k, v, g, o; a, b (one number a head)
    assert (n_t, n_gdn) == (147456, 41984)
    assert distill._flops_per_token(1, student, teacher, 100, stack) == 2 * n_t + 4 * soft + 3 * (2 * n_gdn + 2 * gdn)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_softmax_mixing_flops_are_half_what_torch_counts(family):
    """The softmax term against torch's own FLOP counter: eager attention computes QK^T and PV over
    the whole T x T square (masked, not skipped), 2 x 2 T^2 H D per sequence and layer, the
    aten.bmm FLOPs inside the attention modules; _mixing_flops counts the causal half (T / 2 keys a
    token). Gemma3's head_dim (32) is not hidden / heads (16)."""
    from torch.utils.flop_counter import FlopCounterMode
    teacher = tiny_model(family)
    teacher.config._attn_implementation = "eager"
    B, T = 2, 12
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        teacher(torch.randint(0, 128, (B, T)), use_cache=False)
    counts = counter.get_flop_counts()
    attn = [k for k in counts if k.endswith(".self_attn")]
    assert len(attn) == 4
    measured = sum(counts[k].get(torch.ops.aten.bmm, 0) for k in attn)
    assert measured > 0 and measured == 2 * distill._mixing_flops(teacher, T) * B * T


def test_ctrl_c_says_how_to_go_on(setup, tmp_path, capsys, monkeypatch):
    """Ctrl-C ends in a line naming --resume (checkpoints make it lose at most --ckpt-every steps),
    not a traceback."""
    monkeypatch.setattr(distill, "_distill", lambda a: (_ for _ in ()).throw(KeyboardInterrupt))
    assert distill.main(args(setup, tmp_path / "run")) == 130
    err = capsys.readouterr().err
    assert "with --resume goes on from the run's last checkpoint" in err and "Traceback" not in err
    assert distill.main(args(setup, tmp_path / "run", extra=["--overwrite"])) == 130   # (--overwrite named only if given)
    assert "with --resume (in place of --overwrite) goes on" in capsys.readouterr().err


def test_a_teacher_with_other_weights_is_refused(setup, tmp_path, capsys, monkeypatch):
    """A teacher of the student's shape and vocabulary but not the one it was converted from (its
    weights' digest differs from conversion.json's) is refused before the run folder is made; the
    student's own teacher passes the same check (every other test here runs with it)."""
    from transformers import AutoModelForCausalLM
    other = tmp_path / "other"
    shutil.copytree(setup["teacher"], other)
    model = AutoModelForCausalLM.from_pretrained(other)
    with torch.no_grad():
        model.model.norm.weight.mul_(2)                # (a change bf16 keeps: a GPU run compares in bf16)
    model.save_pretrained(other)
    assert distill.main(args(setup, tmp_path / "run", extra=["--teacher", str(other)])) == 2
    assert "are not those the student was converted from" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    # a random shape that does not exist: said before the training text is read (a corpus: seconds)
    monkeypatch.setattr(distill, "_corpus_ids", lambda *a: pytest.fail("the data was read first"))
    assert distill.main(args(setup, tmp_path / "run", extra=["--teacher", "random:nope"])) == 2
    assert "random teacher 'nope': not a shape" in capsys.readouterr().err


def test_chain_reads_its_texts_from_distill_args_alone(setup, tmp_path, monkeypatch):
    """Where distill.py's default evaluation texts are not there (a checkout without ../shared/data,
    as on the GPU machine), a chain that names its own in --distill-args is not refused for them."""
    monkeypatch.setattr(distill, "WIKI", str(tmp_path / "nowhere"))
    more = f"--seq 16 --batch 4 --eval-data {setup['valid']} --test-data {setup['test']}"
    args = convert._parse_args(["--teacher", setup["teacher"], "--keep", "1/2", "--out", str(tmp_path / "h"),
                                "--distill-tokens", "128,64", "--distill-data", setup["train"], "--distill-args", more])
    assert args.distill_tokens == [128, 64]


def test_teacher_held_in_bf16_is_checked_against_a_float32_conversion(setup, tmp_path):
    """A float32 conversion (the CPU's) records its teacher's digest in bfloat16 too, so a run holding
    the teacher in bfloat16 (a GPU's) checks it as well: the student's teacher passes, another is
    refused."""
    from transformers import AutoConfig, AutoModelForCausalLM
    conversion = json.loads(open(os.path.join(setup["hybrid"], "conversion.json")).read())
    if conversion["dtype"] != "float32":
        pytest.skip("the fixture converted in bfloat16 (on a GPU): no second dtype is recorded")
    assert conversion["teacher_weights_bf16"]
    s_config = AutoConfig.from_pretrained(setup["hybrid"])
    teacher, tok, _ = convert.load_teacher(setup["teacher"], dtype=torch.bfloat16)
    distill._check_teacher(teacher, tok, s_config, tok, conversion)
    other = AutoModelForCausalLM.from_pretrained(setup["teacher"], dtype=torch.bfloat16)
    with torch.no_grad():
        other.model.norm.weight.mul_(2)
    with pytest.raises(ValueError, match="are not those the student was converted from"):
        distill._check_teacher(other, tok, s_config, tok, conversion)
