"""A stand-in for ``python -m llama_cpp.server`` in the LocalServer tests.

It takes exactly the arguments LocalServer passes (an unknown argument is an error,
as it would be for llama.cpp), and serves what LocalServer and ``dspy.LM`` use:

* ``GET  /v1/models``                -> the model list (the readiness probe)
* ``POST /v1/chat/completions``      -> an OpenAI-shaped reply with usage
* ``POST /extras/tokenize/count``    -> ``{"count": <words in "input">}``

The behaviour comes from environment variables (the child inherits the test's):

* ``FAKE_LLAMA_MODE``: ``normal`` (default); ``crash`` (fail to load the model: write
  llama.cpp's message for a file that is not GGUF on stderr and exit 3 before
  listening); ``crash-other`` (exit 4 before listening for another reason, a port
  that cannot be bound); ``no-context`` (load the model, then fail to allocate the
  context's KV cache as llama.cpp does for too large an ``n_ctx``: its lines, then
  llama-cpp-python's traceback end, exit 1); ``no-context-other`` (the same for another
  reason than memory); ``hang`` (listen but never answer); ``ignore-term`` (ignore
  SIGTERM, otherwise normal).
* ``FAKE_LLAMA_REPLY``: the assistant text (default ``fake reply``). A constrained
  request answers with the first allowed label, as a constrained server would: a
  ``response_format`` schema whose ``label`` property is an enum gets
  ``{"label": <first enum value>}``; a ``grammar`` (GBNF) of quoted alternatives,
  ``root ::= "A" | "B"``, gets ``A``; a ``label_choice`` gets its first label between
  its prefix and suffix.
* ``FAKE_LLAMA_RECORD``: a file; the arguments and each request body are appended to
  it as JSON lines (``{"argv": ..., "omp_wait_policy": ...}``, then ``{"path": ...,
  "body": ...}``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CRASH_MESSAGE = "fake llama: error loading model: invalid magic characters"
OTHER_CRASH_MESSAGE = "fake llama: ERROR: [Errno 98] error while attempting to bind on address: address already in use"
#: What llama.cpp 0.3.36 printed for --n_ctx 100000000 on the 0.5B model (2026-12-06).
NO_CONTEXT_MESSAGES = (
    "llama_init_from_model: failed to initialize the context: failed to allocate buffer for kv cache",
    'File "llama_cpp/_internals.py", line 266, in __init__',
    'raise ValueError("Failed to create llama_context")',
    "ValueError: Failed to create llama_context",
)
OTHER_CONTEXT_MESSAGE = "llama_init_from_model: V cache quantization requires flash_attn"


def record(entry: dict) -> None:
    path = os.environ.get("FAKE_LLAMA_RECORD")
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")


def reply_text(body: dict) -> str:
    choice = body.get("label_choice")
    if choice:
        return choice.get("prefix", "") + choice.get("texts", choice["labels"])[0] + choice.get("suffix", "")
    grammar = body.get("grammar")
    if grammar:
        first = re.search(r'"((?:[^"\\]|\\.)*)"', grammar)
        return json.loads(f'"{first.group(1)}"') if first else ""
    response_format = body.get("response_format") or {}
    schema = response_format.get("schema") or (response_format.get("json_schema") or {}).get("schema") or {}
    enum = ((schema.get("properties") or {}).get("label") or {}).get("enum")
    if enum:
        return json.dumps({"label": enum[0]})
    return os.environ.get("FAKE_LLAMA_REPLY", "fake reply")


def make_handler(alias: str):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # keep the log quiet
            pass

        def _send(self, payload: dict, status: int = 200) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> dict:
            length = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(length) or b"{}")

        def do_GET(self) -> None:
            if self.path == "/v1/models":
                self._send({"object": "list", "data": [{"id": alias, "object": "model", "owned_by": "me"}]})
            else:
                self._send({"error": "not found"}, 404)

        def do_POST(self) -> None:
            body = self._body()
            record({"path": self.path, "body": body})
            if self.path == "/v1/chat/completions":
                text = reply_text(body)
                prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
                completion_tokens = max(1, len(text.split()))
                self._send({
                    "id": "chatcmpl-fake",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": body.get("model", alias),
                    "choices": [{
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }],
                    "usage": {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": completion_tokens,
                        "total_tokens": prompt_tokens + completion_tokens,
                    },
                })
            elif self.path == "/extras/tokenize/count":
                self._send({"count": len(str(body.get("input", "")).split())})
            else:
                self._send({"error": "not found"}, 404)

    return Handler


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--model_alias", required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--n_ctx", type=int, required=True)
    parser.add_argument("--n_threads", type=int, required=True)
    parser.add_argument("--n_threads_batch", type=int, required=True)
    parser.add_argument("--lora_path", default=None)  # llama-cpp-python's LoRA flag (optional)
    args = parser.parse_args()
    record({"argv": sys.argv[1:], "pid": os.getpid(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")})
    mode = os.environ.get("FAKE_LLAMA_MODE", "normal")

    if not os.path.isfile(args.model):
        print(f"fake llama: no model file at {args.model}", file=sys.stderr)
        return 2
    if args.lora_path is not None and not os.path.isfile(args.lora_path):
        print(f"fake llama: no LoRA file at {args.lora_path}", file=sys.stderr)
        return 2
    if mode == "crash":
        print("fake llama: loading model", flush=True)
        print(CRASH_MESSAGE, file=sys.stderr, flush=True)
        return 3
    if mode == "crash-other":
        print(f"fake llama: loaded {args.model}", flush=True)
        print(OTHER_CRASH_MESSAGE, file=sys.stderr, flush=True)
        return 4
    if mode in ("no-context", "no-context-other"):
        print(f"fake llama: loaded {args.model}", flush=True)
        lines = NO_CONTEXT_MESSAGES if mode == "no-context" else (OTHER_CONTEXT_MESSAGE, *NO_CONTEXT_MESSAGES[1:])
        print("\n".join(lines), file=sys.stderr, flush=True)
        return 1
    if mode == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if mode == "hang":
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind((args.host, args.port))
        listener.listen(16)
        while True:  # accepts nothing: connections sit in the backlog unanswered
            time.sleep(3600)

    server = ThreadingHTTPServer((args.host, args.port), make_handler(args.model_alias))
    print(f"fake llama: serving {args.model} as {args.model_alias} on {args.host}:{args.port}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
