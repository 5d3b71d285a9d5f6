"""Fakes for the rollout tests: a tiny datasets folder (four weather tasks, one task with
opaque id labels, one dev task), a fake generator (tests/fakes.py) answering by call number,
and a fake follower (httpx MockTransport) that labels right only when the instruction
explains the weather labels; ``Fakes.open_endpoints`` stands in for
``training.rollouts.open_endpoints`` (no llama.cpp server)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import httpx
from fakes import fake_lm

from training import rollouts
from training.follower import Follower, FollowerConfig

__all__ = ["WEATHER", "GOOD", "TRAIN_TASKS", "make_datasets", "follower_reply", "Fakes"]

WEATHER = ["sunny", "rainy", "snowy"]
GOOD = "A sky that looks sunny is sunny, rainy is rainy, snowy is snowy."
TRAIN_TASKS = ["weather_north", "weather_south", "weather_east", "weather_west", "ids_task"]


def _write_task(root: Path, name: str, rows: list[dict[str, str]]) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def make_datasets(root: Path) -> Path:
    """The tiny datasets folder, with SPLITS.json."""
    for town in ("north", "south", "east", "west"):
        _write_task(root, f"weather_{town}", [
            {"text": f"Report {i} from the {town}: the sky looks {WEATHER[i % 3]}", "label": WEATHER[i % 3]}
            for i in range(60)
        ])
    # Opaque id labels, as 21 of the shared train tasks have.
    _write_task(root, "ids_task", [{"text": f"item {i} is {'odd' if i % 2 else 'even'}", "label": str(i % 2)}
                                   for i in range(60)])
    _write_task(root, "dev_weather", [{"text": f"Dev report {i}: {WEATHER[i % 3]}", "label": WEATHER[i % 3]}
                                      for i in range(40)])
    (root / "SPLITS.json").write_text(json.dumps({"train": TRAIN_TASKS, "dev": ["dev_weather"]}))
    return root


def follower_reply(request: httpx.Request) -> httpx.Response:
    """The follower: right when the instruction names the labels' meaning, else always the first label."""
    body = json.loads(request.content)
    content = body["messages"][-1]["content"]
    if "response_format" in body:
        labels = body["response_format"]["schema"]["properties"]["label"]["enum"]
    else:
        labels = (body.get("label_choice") or {}).get("labels")
    item = content.rsplit("Input:", 1)[-1]
    if labels == WEATHER or set(labels or ()) <= set(WEATHER):
        label = next((w for w in WEATHER if w in item), labels[0]) if "sunny is sunny" in content else labels[0]
    else:
        label = labels[0] if labels else "0"
    return httpx.Response(200, json={"choices": [{"message": {"content": json.dumps({"label": label})}}]})


class Fakes:
    """The fake generator (a reply per call, by call number) and follower of a run."""

    def __init__(self, replies: Any = None, follower: Any = follower_reply):
        self.calls = 0
        self.replies = replies or (lambda n: GOOD if n % 3 == 0 else "Guess any label.")
        self.lm, self.engine = fake_lm(self._reply, model="hosted_vllm/qwen2.5-coder-0.5b-instruct")
        self.handler = follower
        self.opened: list[dict[str, Any]] = []

    def _reply(self, request: Any) -> str:
        self.calls += 1
        reply = self.replies(self.calls - 1)
        if isinstance(reply, BaseException):
            raise reply
        return reply

    @contextlib.contextmanager
    def open_endpoints(self, generator, follower, **kwargs):
        self.opened.append({"generator": generator, "follower": follower, **kwargs})
        client = Follower(FollowerConfig(base_url="http://follower.test/v1", model="m", max_retries=0,
                                         max_failure_share=1.0), transport=httpx.MockTransport(self.handler))
        yield rollouts.Endpoints(self.lm, client, "choice")
