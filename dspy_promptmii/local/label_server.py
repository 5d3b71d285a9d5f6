"""The embedded follower's server: llama-cpp-python's OpenAI-compatible server, plus label
choice on its chat-completions route.

A chat-completions request that carries ``label_choice`` (the protocol's ``"choice"``
style, see :func:`dspy_promptmii.protocol.constrained_body`)::

    {"model": ..., "messages": [...], "logprobs": true, "top_logprobs": 3,
     "label_choice": {"labels": ["a", "b", "c"], "prefix": "{\\"label\\": \\"", "suffix": "\\"}"}}

is answered without generating: the messages are rendered with the model's own chat
template (as llama.cpp renders them for generation), the answer ``prefix`` is appended,
and :func:`~dspy_promptmii.local.label_choice.choose_label` reads the most probable label
off the model's next-token distributions. The reply is an ordinary chat completion whose
content is ``prefix + label + suffix`` (what constrained decoding would write; ``label_choice.texts``, when given, is
the text each label is written as, e.g. JSON-escaped), with
``finish_reason`` ``"stop"``, usage counts, and, when ``logprobs`` is asked for, OpenAI's
logprobs shape with one entry whose ``top_logprobs`` are the labels' log-probabilities.
Any other request goes to llama-cpp-python's own handler unchanged. The answer is the most
probable label whatever the request's temperature (label choice does not sample), so ``n``
must be 1.

Run it as llama-cpp-python's server is run (the same options)::

    python -m dspy_promptmii.local.label_server --model M.gguf --n_ctx 8192 --n_threads 2

``label_choice.tolerance`` (0 to 1, default :data:`DEFAULT_TOLERANCE`) sets how much
probability may stay in unexplored branches once the best label is certain (see
:func:`~dspy_promptmii.local.label_choice.choose_label`). Errors in a label-choice request
(no labels, labels the tokenizer cannot tell apart, a model without a chat template) are
HTTP 400 with a message naming the problem.
"""

# No ``from __future__ import annotations``: FastAPI reads the route handler's annotations.
import argparse
import contextlib
import logging
import math
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from dspy_promptmii.local.label_choice import LabelChoice, choose_label, label_sequences

logger = logging.getLogger(__name__)

__all__ = ["LABEL_CHOICE_FIELD", "LabelChoiceError", "chat_prompt", "LlamaLogits", "answer", "create_app", "main"]

#: The request field that asks for label choice.
LABEL_CHOICE_FIELD = "label_choice"
#: Unless a request sets ``label_choice.tolerance``: stop as soon as the most probable label
#: is certain. Its probability, and every explored branch's, is exact; labels inside a
#: branch never explored share that branch's (exact) probability evenly. 0 explores every
#: branch point (exact probabilities for all labels, one short decode per branch point).
DEFAULT_TOLERANCE = 1.0


class LabelChoiceError(ValueError):
    """A label-choice request this server cannot answer (HTTP 400)."""


def _request(body: Any) -> tuple[list[dict[str, Any]], dict[str, str], str, str, float]:
    """(messages, label -> its text, prefix, suffix, tolerance) of a label-choice request body.
    Raises :class:`LabelChoiceError` naming what is wrong."""
    choice = body.get(LABEL_CHOICE_FIELD)
    if not isinstance(choice, dict):
        raise LabelChoiceError(f"{LABEL_CHOICE_FIELD} must be an object with 'labels', got {type(choice).__name__}")
    labels = choice.get("labels")
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x for x in labels):
        raise LabelChoiceError(f"{LABEL_CHOICE_FIELD}.labels must be a non-empty list of non-empty strings")
    if len(set(labels)) != len(labels):
        raise LabelChoiceError(f"{LABEL_CHOICE_FIELD}.labels has duplicates: {labels}")
    prefix, suffix = choice.get("prefix", ""), choice.get("suffix", "")
    if not isinstance(prefix, str) or not isinstance(suffix, str):
        raise LabelChoiceError(f"{LABEL_CHOICE_FIELD}.prefix and .suffix must be strings")
    texts = choice.get("texts", labels)
    if not isinstance(texts, list) or len(texts) != len(labels) or not all(isinstance(x, str) and x for x in texts):
        raise LabelChoiceError(f"{LABEL_CHOICE_FIELD}.texts must be a list of non-empty strings, one per label")
    if len(set(texts)) != len(texts):
        raise LabelChoiceError(f"{LABEL_CHOICE_FIELD}.texts has duplicates: {texts}")
    tolerance = choice.get("tolerance", DEFAULT_TOLERANCE)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance <= 1:
        raise LabelChoiceError(f"{LABEL_CHOICE_FIELD}.tolerance must be a number from 0 to 1, got {tolerance!r}")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise LabelChoiceError("messages must be a non-empty list")
    if body.get("stream"):
        raise LabelChoiceError(f"{LABEL_CHOICE_FIELD} answers in one piece: send it without stream=true")
    if body.get("n") not in (None, 1):
        raise LabelChoiceError(
            f"{LABEL_CHOICE_FIELD} gives one answer, the most probable label (whatever the temperature): n must be "
            f"1, got {body.get('n')!r}; for several samples use a generating style such as json_object"
        )
    return messages, dict(zip(labels, texts)), prefix, suffix, float(tolerance)


def chat_prompt(llama: Any, messages: Sequence[dict[str, Any]]) -> str:
    """The prompt text llama-cpp-python renders for ``messages`` before generating: the
    GGUF's own chat template (``tokenizer.chat_template``), with the generation prompt.
    Raises :class:`LabelChoiceError` for a model served with another chat format."""
    from llama_cpp import llama_chat_format

    name = llama.chat_format or ""
    template = llama.metadata.get("tokenizer." + name) if name.startswith("chat_template.") else None
    if name == "chat_template.default":
        template = llama.metadata.get("tokenizer.chat_template")
    if llama.chat_handler is not None or not template:
        raise LabelChoiceError(
            f"label choice needs the model's own chat template (a GGUF with tokenizer.chat_template); this model is "
            f"served with chat format {name!r}"
        )
    cached = getattr(llama, "_promptmii_formatter", None)
    if cached is None or cached[0] != template:  # compiling the template takes milliseconds: once per model
        eos, bos = llama.token_eos(), llama.token_bos()
        formatter = llama_chat_format.Jinja2ChatFormatter(
            template=template,
            eos_token=llama._model.token_get_text(eos) if eos != -1 else "",
            bos_token=llama._model.token_get_text(bos) if bos != -1 else "",
        )
        cached = (template, formatter)
        llama._promptmii_formatter = cached
    return cached[1](messages=list(messages)).prompt


class LlamaLogits:
    """:data:`~dspy_promptmii.local.label_choice.LogitsAfter` for a ``llama_cpp.Llama``:
    decodes only the tokens past the longest prefix its KV cache already holds (the
    shared instruction of consecutive queries, the prompt between branch points)."""

    def __init__(self, llama: Any):
        self.llama = llama
        self.decoded = 0

    def __call__(self, tokens: Sequence[int], children: Sequence[int]) -> list[float]:
        llama = self.llama
        held = llama.n_tokens
        if getattr(llama, "_is_recurrent", False) or getattr(llama, "_is_hybrid", False):
            llama.reset()  # a recurrent state cannot drop its tail: start from nothing
            held = 0
        common = min(held, len(tokens))
        if common:
            different = np.flatnonzero(llama.input_ids[:common] != np.asarray(tokens[:common]))
            common = int(different[0]) if len(different) else common
        common = min(common, len(tokens) - 1)  # decode at least one token: its logits are the answer
        llama.n_tokens = common  # eval() drops the KV cache from here on
        llama.eval(list(tokens[common:]))
        self.decoded += len(tokens) - common
        # The next generation must not sample from these logits as if they were its prompt's.
        llama._requires_eval = True
        logits = np.ctypeslib.as_array(llama._ctx.get_logits_ith(-1), shape=(llama.n_vocab(),))
        return [float(logits[token]) for token in children]


def _tokenizer(llama: Any):
    def tokenize(text: str) -> list[int]:
        return llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    return tokenize


def _score(
    llama: Any, messages: list[dict[str, Any]], texts: dict[str, str], prefix: str, suffix: str, tolerance: float
) -> tuple[LabelChoice, int]:
    """The label choice for a parsed request (see :func:`_request`), and the prompt's token count."""
    context = chat_prompt(llama, messages) + prefix
    try:
        by_text = label_sequences(_tokenizer(llama), context, list(texts.values()), suffix)
    except ValueError as error:
        raise LabelChoiceError(str(error)) from None
    sequences = {label: by_text[text] for label, text in texts.items()}
    longest = max(len(s) for s in sequences.values())
    if longest > llama.n_ctx():
        raise LabelChoiceError(f"the prompt and a label take {longest} tokens, more than the context ({llama.n_ctx()})")
    choice = choose_label(LlamaLogits(llama), sequences, tolerance=tolerance)
    return choice, len(_tokenizer(llama)(context))


def answer(llama: Any, body: dict[str, Any], model: str) -> dict[str, Any]:
    """The chat-completion reply to a label-choice request (see the module docstring)."""
    request = _request(body)
    choice, prompt_tokens = _score(llama, *request)
    _, texts, prefix, suffix, _ = request
    content = prefix + texts[choice.label] + suffix
    completion_tokens = len(_tokenizer(llama)(texts[choice.label] + suffix))
    reply: dict[str, Any] = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }
    if body.get("logprobs"):
        top = body.get("top_logprobs")
        count = len(choice.probabilities) if not isinstance(top, int) or top <= 0 else top
        ranked = sorted(choice.probabilities.items(), key=lambda item: -item[1])[:count]

        def entry(label: str, probability: float) -> dict[str, Any]:
            logprob = math.log(probability) if probability > 0 else -9999.0
            return {"token": label, "logprob": logprob, "bytes": list(label.encode("utf-8"))}

        reply["choices"][0]["logprobs"] = {
            "content": [{**entry(choice.label, choice.probabilities[choice.label]), "top_logprobs": [
                entry(label, p) for label, p in ranked
            ]}]
        }
    return reply


def create_app(server_settings: Any, model_settings: list[Any]) -> Any:
    """llama-cpp-python's FastAPI app with its chat-completions route wrapped: a request
    with ``label_choice`` is answered by :func:`answer`, any other by the original handler."""
    from fastapi import Depends, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from fastapi.routing import APIRoute
    from llama_cpp.server import app as llama_app
    from llama_cpp.server.types import CreateChatCompletionRequest
    from pydantic import ValidationError
    from starlette.concurrency import run_in_threadpool

    app = llama_app.create_app(server_settings=server_settings, model_settings=model_settings)
    path = "/v1/chat/completions"

    async def chat_completions(request: Request):
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": {"message": "the request body is not JSON"}}, status_code=400)
        if not isinstance(body, dict) or LABEL_CHOICE_FIELD not in body:
            try:
                parsed = CreateChatCompletionRequest.model_validate(body)
            except ValidationError as error:
                raise RequestValidationError(error.errors()) from None
            return await llama_app.create_chat_completion(request, parsed)
        async with contextlib.asynccontextmanager(llama_app.get_llama_proxy)() as proxy:
            if proxy is None:
                return JSONResponse({"error": {"message": "no model is loaded"}}, status_code=503)
            llama = proxy(body.get("model"))
            try:
                reply = await run_in_threadpool(answer, llama, body, body.get("model") or "")
            except LabelChoiceError as error:
                return JSONResponse({"error": {"message": str(error), "type": "invalid_request_error"}}, 400)
            except Exception as error:  # noqa: BLE001 - a JSON error body, not a bare 500 page
                logger.exception("label choice failed")
                message = f"label choice failed: {type(error).__name__}: {error}"
                return JSONResponse({"error": {"message": message, "type": "server_error"}}, 500)
        return JSONResponse(reply)

    app.add_api_route(
        path, chat_completions, methods=["POST"], dependencies=[Depends(llama_app.authenticate)], summary="Chat"
    )
    # Routes match in order: put this one before llama-cpp-python's own route of the same path.
    ours = [r for r in app.router.routes if isinstance(r, APIRoute) and r.endpoint is chat_completions]
    app.router.routes[:] = ours + [r for r in app.router.routes if r not in ours]
    return app


def main(argv: Sequence[str] | None = None) -> None:
    """The command line: llama-cpp-python's server options (``--model``, ``--n_ctx``, ...)."""
    import uvicorn
    from llama_cpp.server.cli import add_args_from_model, parse_model_from_args
    from llama_cpp.server.settings import ModelSettings, ServerSettings, Settings

    parser = argparse.ArgumentParser(
        prog="python -m dspy_promptmii.local.label_server",
        description="llama.cpp's OpenAI-compatible server with label choice (see dspy_promptmii.local.label_server)",
    )
    add_args_from_model(parser, Settings)
    args = parser.parse_args(argv)
    server_settings = parse_model_from_args(ServerSettings, args)
    model_settings = [parse_model_from_args(ModelSettings, args)]
    app = create_app(server_settings, model_settings)
    uvicorn.run(app, host=server_settings.host, port=server_settings.port)


if __name__ == "__main__":
    sys.exit(main())
