"""Train/eval parity: for the same instruction, labels and input, every place that calls
the follower sends the same request body (LabelAdapter through DSPy and LiteLLM, the
benchmark runner, the training reward and the OpenRLHF agent), and every place that
cleans a generator reply cleans it the same way (compile and the reward).

The follower is a real HTTP server on 127.0.0.1 that records each request body."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import dspy
import pytest
from fakes import fake_lm
from support.chat_stub import ChatStub

from benchmarks.methods import Budgets
from benchmarks.runner import Endpoints, RunConfig, make_adapter, make_protocol, run_cell
from benchmarks.tasks import make_split
from dspy_promptmii.adapter import LabelAdapter
from dspy_promptmii.baselines import naive_program
from dspy_promptmii.data import TaskData
from dspy_promptmii.optimizer import PromptMIIOptimizer
from dspy_promptmii.protocol import Protocol, format_line
from dspy_promptmii.routes import Endpoint
from training.build_data import BuildConfig, ContextSpec, make_record, sample_context
from training.follower import Follower, FollowerConfig, extract_instruction, parse_payload, score_instruction

LABELS = ["negative", "positive"]
ROWS = [
    {"text": f"review {i}: {'a joy to watch' if i % 2 else 'a waste of time'}", "label": LABELS[i % 2]}
    for i in range(40)
]
TASK = TaskData(name="reviews", rows=ROWS)
STYLES = [False, "json_schema", "json_object", "grammar", "choice"]


def _label(body: dict[str, Any], headers: dict[str, str]) -> tuple[int, str]:
    return 200, json.dumps({"label": LABELS[0]}) if "response_format" in body else LABELS[0]


@pytest.fixture()
def follower_server():
    with ChatStub(_label) as stub:
        yield stub


def _lm(server: ChatStub) -> dspy.LM:
    """The follower as the benchmark and the demo make it: no temperature or reply limit
    of its own (the protocol sets them)."""
    return dspy.LM("hosted_vllm/follower", api_base=server.url, api_key="local", cache=False, num_retries=0)


def _without_model(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "model"}


def _by_input(bodies: list[dict[str, Any]], text: str) -> dict[str, Any]:
    found = [b for b in bodies if text in json.dumps(b["messages"], ensure_ascii=False)]
    assert found, f"no request held {text!r}"
    return _without_model(found[-1])


def _reward_body(server: ChatStub, protocol: Protocol, instruction: str, text: str) -> dict[str, Any]:
    label = {
        "task": "reviews",
        "labels": LABELS,
        "input_fields": ["text"],
        "test_inputs": [[text]],
        "test_labels": [LABELS[0]],
        "protocol": protocol.to_dict(),
    }
    follower = Follower(FollowerConfig(base_url=server.url, model="follower", max_retries=0))

    async def run() -> None:
        try:
            await score_instruction(follower, instruction, parse_payload(label))
        finally:
            await follower.aclose()

    asyncio.run(run())
    return _by_input(server.bodies, text)


@pytest.mark.parametrize("style", STYLES, ids=[str(s) for s in STYLES])
def test_label_adapter_benchmark_reward_and_agent_send_the_same_body(follower_server, style, tmp_path: Path) -> None:
    text = ROWS[3]["text"]
    protocol = Protocol(constrained=style, demo_style="turns")
    program = naive_program(dspy.Predict(TASK.signature()))
    instruction = program.signature.instructions

    # 1. LabelAdapter, through dspy.LM and LiteLLM.
    with dspy.context(lm=_lm(follower_server), adapter=LabelAdapter(protocol=protocol)):
        program(text=text)
    adapter_body = _by_input(follower_server.bodies, text)

    # 2. The benchmark runner: its protocol and adapter for this follower, the naive cell.
    endpoint = Endpoint(
        lm=_lm(follower_server), route="hosted_vllm/follower", token_counter=None, context_tokens=None,
        constrained_style=style or "json_schema",
    )
    config = RunConfig(out=tmp_path, tasks=[], n_values=[4], methods=["naive"], test_rows=10,
                       constrained=bool(style), progress=False, budgets=Budgets())
    run_protocol = make_protocol(config, endpoint)
    assert run_protocol == protocol
    adapter, _ = make_adapter("label", run_protocol)
    split = make_split(TASK, 10, seed=0)
    split.test = [ex for ex in split.test]
    record = run_cell(split, 4, "naive", config=config, endpoints=Endpoints(endpoint, endpoint), adapter=adapter,
                      run_config_id="parity", protocol=run_protocol)
    assert record["status"] == "ok", record.get("error")
    bench_text = split.test_rows[0]["text"]
    benchmark_body = _by_input(follower_server.bodies, bench_text)
    expected_for_bench = _reward_body(follower_server, protocol, instruction, bench_text)
    assert benchmark_body == expected_for_bench

    # 3. The training reward (reward_func and the agent share this client).
    reward_body = _reward_body(follower_server, protocol, instruction, text)

    assert adapter_body == reward_body
    expected = protocol.request_body("follower", instruction, LABELS, {"text": text}, ["text"])
    assert reward_body == _without_model(expected)
    assert reward_body["messages"] == [
        {"role": "user", "content": f"{instruction}\n\nInput: {text}\nLabel:"}
    ]
    assert reward_body["temperature"] == 0.0 and reward_body["max_tokens"] == protocol.max_tokens(LABELS)


def test_the_agent_and_reward_func_call_the_follower_with_one_client(follower_server) -> None:
    """reward.py and agent.py both score through training.follower.score_instruction and
    Follower.body: the only request builder of the training side."""
    import inspect

    from training import agent, reward

    for module in (agent, reward):
        source = inspect.getsource(module)
        assert "score_instruction" in source
        assert "request_body" not in source and "messages" not in source.replace("multi_modal", "")


# --- cleaning: compile and the reward ------------------------------------------------------


def _reply(shown_text: str) -> str:
    return (
        "<think>Two labels; the reviews either praise or pan the film.</think>\n"
        "**Guidelines:**\n"
        "Label each review by the reviewer's overall opinion.\n"
        f'- "{shown_text}" shows how a verdict reads.\n'
        "Praise means positive; complaints mean negative.\n\n"
        "Examples:\n"
        f"Input: {shown_text}\nLabel: positive\n"
    )


@pytest.mark.parametrize("finish_reason", ["stop", "length"])
def test_compile_and_the_reward_clean_a_reply_identically(finish_reason: str) -> None:
    config = BuildConfig(template="meta2", constrained=False, m=10)
    spec = ContextSpec("reviews", 6, 0, "train")
    seed = 1234
    context_ids, test_ids = sample_context(TASK, 6, seed, config.m)
    record = make_record(
        TASK, "local", spec, seed, context_ids, test_ids, config.protocol, "promptmii", config.max_instruction_tokens
    )
    label = record["label"]
    shown_text = label["context_inputs"][0][0]
    reply = _reply(shown_text) + ("Mixed reviews are" if finish_reason == "length" else "")

    # Compile: the optimizer, with the trainset the line's context was drawn from.
    held = set(test_ids)
    pool = [TASK.examples([row])[0] for i, row in enumerate(TASK.rows) if i not in held]
    lm, engine = fake_lm([reply], finish_reason=finish_reason)
    optimizer = PromptMIIOptimizer(generator_lm=lm, n=6, seed=seed, protocol=config.protocol)
    compiled = optimizer.compile(dspy.Predict(TASK.signature()), trainset=pool)
    assert engine.prompt(0) == record["prompt"][0]["content"]  # the same meta-prompt
    at_compile = compiled.signature.instructions.removesuffix("\n" + format_line(TASK.labels))

    # The reward: the policy's decoded text (an end-of-turn token unless it was cut off).
    eot = "" if finish_reason == "length" else "<|im_end|>"
    in_reward = extract_instruction("<|im_start|>assistant\n" + reply + eot, parse_payload(label))

    assert at_compile == in_reward
    assert "<think>" not in in_reward and shown_text not in in_reward and "Guidelines" not in in_reward
    assert in_reward.startswith("Label each review by the reviewer's overall opinion.")
    assert "Praise means positive; complaints mean negative." in in_reward
    assert optimizer.report[0]["copied_lines"] >= 1 and optimizer.report[0]["reasoning_removed"]
