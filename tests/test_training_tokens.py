"""Token counters for the prompt-length filter (training/tokens.py): the approximation,
a Hugging Face tokenizer folder read with the ``tokenizers`` library plus its chat
template, a GGUF vocabulary through llama.cpp, and the errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.tokens import ApproxCounter, HFCounter, load_counter  # noqa: E402

GGUF = Path.home() / ".cache" / "dspy_promptmii" / "models" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
CHAT = [{"role": "user", "content": "Label these texts please"}]


def test_approximation() -> None:
    counter = ApproxCounter()
    assert counter.count("") == 0
    assert counter.count("abcde") == 2  # 5 ASCII characters / 2.5
    assert counter.count("这是") == 2 and counter.count("ሰላም") == 5  # CJK 1 each, other scripts 1.5 each
    assert counter.count_chat(CHAT) == 32 + counter.count(CHAT[0]["content"]) + 4
    assert not counter.exact
    with pytest.raises(ValueError, match="chars_per_token"):
        ApproxCounter(chars_per_token=0)
    with pytest.raises(ValueError, match="run_chars_per_token"):
        ApproxCounter(run_chars_per_token=-1)


def test_long_unbroken_runs_count_as_the_short_pieces_bpe_makes_of_them() -> None:
    counter = ApproxCounter()
    dna = "ACGT" * 10  # 40 characters, no space: a sequence, not words
    assert counter.count(dna) == 23  # 40 / 1.8, not 40 / 2.5 = 16
    assert counter.count("sixteen chars ok") == 7  # short words: 16 / 2.5
    assert counter.count("Input: " + dna) == 3 + 23  # "Input: " at the word rate, the run at its own


def test_hf_folder_with_tokenizers_and_a_chat_template(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    try:
        import transformers  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("transformers is installed: HFCounter would use it, not the tokenizers fallback tested here")
    vocab = {"[UNK]": 0, "<s>": 1, "user": 2, "label": 3, "these": 4, "texts": 5, "please": 6, ":": 7}
    model = tokenizers.models.WordLevel(vocab=vocab, unk_token="[UNK]")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.normalizer = tokenizers.normalizers.Lowercase()
    tok.add_special_tokens(["<s>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    template = "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "bos_token": "<s>"}))
    counter = load_counter(tmp_path)
    assert isinstance(counter, HFCounter) and counter.exact
    assert counter.count("Label these texts please") == 4
    assert counter.count_chat(CHAT) == 7  # <s> user : label these texts please


def test_gguf_vocabulary_and_chat_template() -> None:
    if not GGUF.is_file():
        pytest.skip(f"the embedded model's GGUF is not at {GGUF}")
    pytest.importorskip("llama_cpp")
    counter = load_counter(GGUF)
    assert counter.exact and counter.name.startswith("gguf:")
    plain = counter.count(CHAT[0]["content"])
    assert 3 <= plain <= 8
    # Qwen2.5's template adds a default system prompt and role markers.
    assert counter.count_chat(CHAT) > plain + 15


def test_missing_tokenizers_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        load_counter(tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError):
        load_counter(tmp_path / "no-such-folder")
    assert isinstance(load_counter(None), ApproxCounter) and isinstance(load_counter("approx"), ApproxCounter)
