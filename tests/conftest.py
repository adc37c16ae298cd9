"""Shared fixtures: tiny random teachers of every supported family, and a tokenizer.

The tokenizer is the real default teacher's (read from its GGUF once per session), so the
command-line tests run the same text path as the main job without any download."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")
WIKITEXT_TEST = os.path.join(DATA, "wikitext-2-raw", "wiki.test.raw")

FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma3_text"]


def tiny_config(family, vocab_size=128, layers=4):
    """A tiny config of the family: GQA (4 query / 2 KV heads), every family's quirk left on
    (Qwen2 q/k/v biases, Qwen3 q/k norms, Mistral's sliding window on every layer, Gemma3 sliding-window
    layers and head_dim != hidden/heads)."""
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "qwen3":
        return Qwen3Config(head_dim=16, **common)
    if family == "mistral":
        return MistralConfig(sliding_window=8, **common)
    if family == "gemma3_text":
        return Gemma3TextConfig(head_dim=32, sliding_window=8, **common)
    raise ValueError(family)


def tiny_model(family, vocab_size=128, layers=4, seed=0):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family, vocab_size, layers)).eval()


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer
    from convert import _default_teacher_path
    path = _default_teacher_path()
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama saved as an HF folder with the real tokenizer: a teacher for CLI tests."""
    path = tmp_path_factory.mktemp("teacher")
    model = tiny_model("llama", vocab_size=len(tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
