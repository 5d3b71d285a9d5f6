"""An OpenAI-compatible chat-completions endpoint on 127.0.0.1 for tests: every request
body is recorded, and a function of the body (and the request's headers) decides the
reply.

>>> with ChatStub(lambda body, headers: (200, "pos")) as stub:     # doctest: +SKIP
...     lm = dspy.LM("hosted_vllm/m", api_base=stub.url, api_key="x")
...     stub.bodies                                                 # what was sent

The function returns ``(status, content)``: a 200 gets a normal completion whose message
is ``content`` (or, when ``content`` is a dict, that dict as the whole body); any other
status gets ``content`` as the JSON body (an error object).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["ChatStub", "completion"]

Reply = Callable[[dict[str, Any], Mapping[str, str]], tuple[int, Any]]


def completion(content: str, model: str = "m") -> dict[str, Any]:
    """A chat-completions response body with one choice."""
    return {
        "id": "x",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11},
    }


class ChatStub:
    """A recording chat endpoint; use as a context manager (or ``start``/``close``)."""

    def __init__(self, reply: Reply):
        self.reply = reply
        self.bodies: list[dict[str, Any]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.bodies.append(body)
                status, content = stub.reply(body, dict(self.headers))
                whole = status != 200 or not isinstance(content, str)
                payload = content if whole else completion(content, body.get("model", "m"))
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        """The OpenAI-compatible base URL (``.../v1``)."""
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def start(self) -> ChatStub:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> ChatStub:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()
