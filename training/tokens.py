"""Token counting for the meta-training data: the prompt-length filter of the data
builder and the instruction-length log of the reward.

OpenRLHF truncates prompts that are too long instead of dropping them, so the builder
filters them out beforehand and needs the policy's token counts. Three counters:

* a Hugging Face tokenizer folder (``tokenizer.json`` and ``tokenizer_config.json``):
  through ``transformers.AutoTokenizer`` when installed, else through the ``tokenizers``
  library plus the folder's chat template rendered with Jinja2 (what transformers does);
* a ``.gguf`` model file: llama.cpp loads only its vocabulary (``vocab_only``), and its
  embedded chat template is rendered with Jinja2. The embedded Qwen2.5-Coder GGUF has the
  same tokenizer and chat template as the Qwen2.5 instruct models the paper trains;
* no tokenizer (:class:`ApproxCounter`): a documented over-estimate, see its docstring.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from dspy_promptmii.secrets import protected_logger

logger = protected_logger(__name__)

__all__ = ["TokenCounter", "ApproxCounter", "GGUFCounter", "HFCounter", "load_counter"]

Messages = Sequence[Mapping[str, Any]]


class TokenCounter:
    """Counts tokens of plain text and of a chat-formatted prompt (with the generation prompt)."""

    #: A short description for logs and the data summary.
    name: str = "base"
    #: Whether counts are the tokenizer's own (False for the approximation).
    exact: bool = False

    def count(self, text: str) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def count_chat(self, messages: Messages) -> int:  # pragma: no cover - interface
        raise NotImplementedError


#: An unbroken run of more than 16 ASCII characters that are not white space.
_LONG_RUN = re.compile(r"[!-~]{17,}")


class ApproxCounter(TokenCounter):
    """A tokenizer-free estimate meant to over-count, never under-count, by much.

    Estimate = ceil(ASCII characters / ``chars_per_token`` + ``cjk_tokens`` per CJK
    character + ``other_tokens`` per other non-ASCII character), plus 4 per message and
    ``chat_overhead`` for a chat prompt (role markers and a default system prompt such as
    Qwen2.5's). The defaults were set against the Qwen2.5 tokenizer with its chat template
    on meta-prompts of the shared datasets (many languages and scripts, protein and DNA
    sequences) so that the length filter errs on the side of dropping; unbroken ASCII runs
    of more than 16 characters (sequences) count at ``run_chars_per_token``.
    ``test_approximate_counter_over_counts_the_qwen_tokenizer`` checks the over-count on
    the shared build. Pass ``--tokenizer`` for exact counts.
    """

    name = "approx"
    exact = False

    def __init__(
        self,
        chars_per_token: float = 2.5,
        cjk_tokens: float = 1.0,
        other_tokens: float = 1.5,
        chat_overhead: int = 32,
        run_chars_per_token: float = 1.8,
    ):
        if chars_per_token <= 0 or run_chars_per_token <= 0:
            raise ValueError(
                f"chars_per_token and run_chars_per_token must be positive, got {chars_per_token}, "
                f"{run_chars_per_token}"
            )
        self.chars_per_token = chars_per_token
        self.run_chars_per_token = run_chars_per_token
        self.cjk_tokens = cjk_tokens
        self.other_tokens = other_tokens
        self.chat_overhead = chat_overhead
        self.name = (
            f"approx(chars_per_token={chars_per_token}, cjk={cjk_tokens}, other={other_tokens}, "
            f"runs={run_chars_per_token})"
        )

    @staticmethod
    def _is_cjk(ch: str) -> bool:
        return "\u3000" <= ch <= "\u9fff" or "\uac00" <= ch <= "\ud7af" or "\uff00" <= ch <= "\uffef"

    def count(self, text: str) -> int:
        ascii_chars = cjk = 0
        for ch in text:
            if ord(ch) < 128:
                ascii_chars += 1
            elif self._is_cjk(ch):
                cjk += 1
        other = len(text) - ascii_chars - cjk
        # Long unbroken ASCII runs (DNA or peptide sequences, hashes, base64) are not words:
        # BPE splits them into short pieces, so they count at ``run_chars_per_token``.
        runs = sum(len(run) for run in _LONG_RUN.findall(text))
        estimate = (
            (ascii_chars - runs) / self.chars_per_token
            + runs / self.run_chars_per_token
            + cjk * self.cjk_tokens
            + other * self.other_tokens
        )
        return math.ceil(estimate)

    def count_chat(self, messages: Messages) -> int:
        return self.chat_overhead + sum(self.count(str(m.get("content", ""))) + 4 for m in messages)


def _render_chat_template(template: str, messages: Messages, **variables: Any) -> str:
    """Render a Hugging Face chat template the way transformers does (sandboxed Jinja2)."""
    try:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:  # pragma: no cover - jinja2 comes with dspy/litellm
        raise ImportError("rendering a chat template needs jinja2: pip install jinja2") from None

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template).render(
        messages=[dict(m) for m in messages], add_generation_prompt=True, tools=None, **variables
    )


class GGUFCounter(TokenCounter):
    """Counts with the vocabulary of a GGUF model file through llama.cpp (``vocab_only``)."""

    exact = True

    def __init__(self, path: str | os.PathLike):
        try:
            import llama_cpp
        except ImportError:
            raise ImportError(
                f"counting tokens with the GGUF file {path} needs llama-cpp-python: pip install 'dspy-promptmii[local]'"
            ) from None
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {path}")
        self._model = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        metadata = getattr(self._model, "metadata", {}) or {}
        self._template = metadata.get("tokenizer.chat_template")
        self._bos = self._token_text(metadata.get("tokenizer.ggml.bos_token_id"))
        self._eos = self._token_text(metadata.get("tokenizer.ggml.eos_token_id"))
        self.name = f"gguf:{path.name}"
        if not self._template:
            logger.warning("%s has no chat template: chat prompts are counted as text plus 32 tokens", path)

    def _token_text(self, token_id: Any) -> str:
        if token_id is None:
            return ""
        try:
            return self._model.detokenize([int(token_id)], special=True).decode("utf-8", errors="replace")
        except Exception:  # noqa: BLE001 - an odd vocabulary only loses the variable
            return ""

    def _tokens(self, text: str, special: bool) -> int:
        return len(self._model.tokenize(text.encode("utf-8"), add_bos=False, special=special))

    def count(self, text: str) -> int:
        return self._tokens(text, special=False)

    def count_chat(self, messages: Messages) -> int:
        if not self._template:
            return 32 + sum(self.count(str(m.get("content", ""))) for m in messages)
        rendered = _render_chat_template(self._template, messages, bos_token=self._bos, eos_token=self._eos)
        return self._tokens(rendered, special=True)


class HFCounter(TokenCounter):
    """Counts with a Hugging Face tokenizer folder (``transformers`` if installed, else
    ``tokenizers`` + the folder's chat template)."""

    exact = True

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        self.name = f"hf:{path}"
        self._hf = None
        try:
            from transformers import AutoTokenizer
        except ImportError:
            AutoTokenizer = None
        if AutoTokenizer is not None:
            self._hf = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
            return
        if not path.is_dir():
            raise FileNotFoundError(
                f"{path} is not a local tokenizer folder; without transformers installed only a local folder "
                "holding tokenizer.json can be used (pip install transformers to load a hub name)"
            )
        file = path / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"{path} holds no tokenizer.json (needed when transformers is not installed)")
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(file))
        config: dict[str, Any] = {}
        if (path / "tokenizer_config.json").is_file():
            config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
        template = config.get("chat_template")
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        self._template = template
        self._variables = {
            key: (value.get("content") if isinstance(value, dict) else value) or ""
            for key, value in config.items()
            if key in ("bos_token", "eos_token", "pad_token", "unk_token")
        }
        if not self._template:
            logger.warning("%s has no chat template: chat prompts are counted as text plus 32 tokens", path)

    def count(self, text: str) -> int:
        if self._hf is not None:
            return len(self._hf(text, add_special_tokens=False)["input_ids"])
        return len(self._tok.encode(text, add_special_tokens=False).ids)

    def count_chat(self, messages: Messages) -> int:
        if self._hf is not None:
            ids = self._hf.apply_chat_template([dict(m) for m in messages], tokenize=True, add_generation_prompt=True)
            if isinstance(ids, Mapping):  # newer transformers may return a BatchEncoding
                ids = ids["input_ids"]
            return len(ids)
        if not self._template:
            return 32 + sum(self.count(str(m.get("content", ""))) for m in messages)
        rendered = _render_chat_template(self._template, messages, **self._variables)
        return len(self._tok.encode(rendered, add_special_tokens=False).ids)


def load_counter(spec: str | os.PathLike | None) -> TokenCounter:
    """A counter for ``spec``: ``None``/``"approx"`` (the approximation), a ``.gguf`` file,
    or a tokenizer folder / hub name (hub names need transformers and a network)."""
    if spec is None or str(spec) == "approx":
        return ApproxCounter()
    text = os.fspath(spec)
    if text.lower().endswith(".gguf"):
        return GGUFCounter(text)
    path = Path(text).expanduser()
    # A hub id is "name" or "namespace/name"; anything else that does not exist is a missing folder
    # (transformers, when installed, would otherwise answer with a hub validation error).
    if not path.exists() and (path.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1):
        raise FileNotFoundError(f"no tokenizer folder at {path}")
    if not path.exists():
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise FileNotFoundError(
                f"tokenizer {text!r} is not a local path, and loading it by hub name needs transformers "
                "(pip install transformers) and a network"
            ) from None
    return HFCounter(text)
