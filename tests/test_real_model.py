"""End to end on the REAL embedded model (llama.cpp, Qwen2.5-Coder-0.5B, 2 CPU cores):
compile a SNIPS intent classifier with one generator call, evaluate it through
LabelAdapter with constrained decoding, and leave no server process behind.

Marked ``real_model``; skipped when llama-cpp-python or the model is missing, unless
PROMPTMII_REQUIRE_REAL_MODEL=1 (CI), which makes that a failure.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import dspy
import pytest

from dspy_promptmii.adapter import LabelAdapter
from dspy_promptmii.data import split_rows
from dspy_promptmii.demo import demo_task
from dspy_promptmii.evaluation import evaluate
from dspy_promptmii.generation import budget_limit
from dspy_promptmii.local import DEFAULT_MODEL, LocalServer, ModelFileError, ServerError
from dspy_promptmii.local.server import FOLLOWER_STYLE
from dspy_promptmii.optimizer import DEFAULT_MAX_INSTRUCTION_TOKENS, PromptMIIOptimizer
from dspy_promptmii.protocol import format_line
from dspy_promptmii.usage import metered

pytestmark = pytest.mark.real_model

TEST_ROWS = 30
GENERATOR_MAX_TOKENS = 512


def llama_server_children() -> dict[int, str]:
    """This process's child processes running the embedded server: pid -> command line
    (from /proc; zombies, which have exited, are not counted)."""
    found = {}
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == me and state != "Z" and "dspy_promptmii.local.label_server" in cmdline:
            found[int(entry.name)] = cmdline
    return found


@pytest.fixture(scope="module")
def snips():
    task = demo_task()
    train_rows, test_rows = split_rows(task.rows, train=len(task.rows) - TEST_ROWS, test=TEST_ROWS, seed=0)
    return task, task.examples(train_rows), task.examples(test_rows)


@pytest.fixture(scope="module")
def compiled(local_server, snips):
    """The classifier compiled with the local model as generator (one call), with the
    optimizer and the generator's metered usage."""
    task, trainset, _ = snips
    generator, meter = metered(local_server.lm(cache=False, max_tokens=GENERATOR_MAX_TOKENS))
    optimizer = PromptMIIOptimizer(
        generator_lm=generator,
        n=20,
        seed=0,
        max_tokens=GENERATOR_MAX_TOKENS,
        max_prompt_tokens=local_server.n_ctx - GENERATOR_MAX_TOKENS - 64,
        token_counter=local_server.count_tokens,
    )
    started = time.perf_counter()
    program = optimizer.compile(dspy.Predict(task.signature()), trainset=trainset)
    return program, optimizer, meter.snapshot(), time.perf_counter() - started


def test_compile_makes_one_generator_call(compiled, snips):
    task, _, _ = snips
    program, optimizer, usage, seconds = compiled

    assert usage.calls == 1
    [report] = optimizer.report
    assert report["generator_calls"] == 1
    assert report["n_used"] == 20 and set(report["labels"]) == set(task.labels)
    assert report["prompt_tokens"] and report["prompt_tokens"] > 20 * 5  # twenty examples went in
    instruction = program.predictors()[0].signature.instructions
    line = format_line(task.labels)
    assert instruction.endswith(line)
    assert len(instruction[: -len(line)].strip()) >= 20, f"the generator wrote next to nothing: {instruction!r}"
    print(f"\ncompile: {seconds:.1f} s, {usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens")
    print(instruction)


@pytest.mark.parametrize("style", sorted({"json_object", FOLLOWER_STYLE}))
def test_compiled_classifier_gives_valid_labels(local_server, compiled, snips, style):
    task, _, test = snips
    program = compiled[0]

    result = evaluate(
        program,
        test,
        lm=local_server.lm(cache=False, max_tokens=16),
        adapter=LabelAdapter(constrained=style),
        progress=False,
    )

    print(f"\n{style}: {result.summary()}")
    assert result.n == result.calls == TEST_ROWS
    assert result.invalid_rate < 0.2
    assert 0.0 <= result.macro_f1 <= 1.0
    assert result.macro_f1 > 1 / len(task.labels)  # above chance (7 intents)
    assert result.prompt_tokens_per_query is not None and result.prompt_tokens_per_query > 20


def test_fresh_server_leaves_no_process(local_server):
    """A LocalServer started and stopped here: its llama.cpp process is gone after.
    (``local_server`` only for the skip when llama.cpp or the model is missing.)"""
    before = llama_server_children()
    server = LocalServer(DEFAULT_MODEL, n_ctx=512, startup_timeout=300)
    with server:  # started means it answered on its port
        pid = server.process.pid
        assert pid in llama_server_children()  # the scan does see a running server
    assert pid not in llama_server_children()
    assert llama_server_children() == before
    assert not Path(f"/proc/{pid}").exists()  # gone and reaped, not a zombie


def test_bad_model_file_is_a_clear_error(local_server, tmp_path):
    """A file that is not GGUF at all is refused before launch; one with the GGUF magic but
    a broken header makes llama.cpp exit, and the error's first line names the file and
    what to check, before the server's output. (``local_server`` only for the skip when
    llama.cpp is missing.)"""
    text = tmp_path / "not-a-model.gguf"
    text.write_bytes(b"this is not a GGUF file\n" * 100)
    with pytest.raises(ModelFileError, match="not a GGUF model file"):
        LocalServer(text, n_ctx=512).start()

    bogus = tmp_path / "broken-header.gguf"
    bogus.write_bytes(b"GGUF" + b"\xff" * 4 + b"not a model\n" * 100)
    server = LocalServer(bogus, n_ctx=512, startup_timeout=120)

    with pytest.raises(ServerError, match="exited with code") as caught:
        server.start()

    first = str(caught.value).splitlines()[0]
    assert first.startswith(f"llama.cpp could not load the model file {bogus}: check the path")
    print(caught.value)
    assert server.process is None
    assert not llama_server_children().keys() - {local_server.process.pid}


def test_choice_style_gives_each_labels_probability(local_server, compiled, snips):
    """The label server reads the label off the model's probabilities: every prediction
    names a label, with a probability per label that sums to 1 and peaks at it; a request
    it cannot answer is an HTTP 400 that says why."""
    import httpx

    from dspy_promptmii.protocol import Protocol

    task, _, test = snips
    program = compiled[0]
    with dspy.context(lm=local_server.lm(cache=False), adapter=LabelAdapter(constrained="choice")):
        predictions = [program(**example.inputs()) for example in test[:5]]
    for prediction in predictions:
        probabilities = prediction.probabilities
        assert set(probabilities) == set(task.labels)
        assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-6)
        assert max(probabilities, key=probabilities.get) == prediction.label

    body = Protocol(constrained="choice").request_body(
        local_server.alias, "Classify.", ["same", "same"], {"text": "x"}, ["text"]
    )
    reply = httpx.post(f"{local_server.base_url}/chat/completions", json=body, timeout=60)
    assert reply.status_code == 400 and "duplicates" in reply.json()["error"]["message"]


def test_the_shipped_trained_generator_loads_and_changes_what_the_model_writes(local_server, compiled, snips):
    """The demo's default generator (the base model plus the shipped LoRA, both verified by
    sha256) starts under llama.cpp with the adapter applied, writes a usable instruction in
    one call, and writes something other than the untrained model given the same request."""
    from dspy_promptmii.local import DEFAULT_GENERATOR

    task, trainset, _ = snips
    server = LocalServer(DEFAULT_GENERATOR, startup_timeout=300)
    with server as lm:
        assert server.lora_path is not None and server.lora_path.name.endswith(".gguf")
        generator, meter = metered(lm.copy(cache=False, max_tokens=budget_limit(DEFAULT_MAX_INSTRUCTION_TOKENS)))
        optimizer = PromptMIIOptimizer(generator_lm=generator, n=20, seed=0, token_counter=server.count_tokens)
        program = optimizer.compile(dspy.Predict(task.signature()), trainset=trainset)
        request = "Define the intent label PlayMusic in one sentence."
        trained_reply = lm.copy(cache=False, max_tokens=48)(request)[0]
    untrained_reply = local_server.lm(cache=False, max_tokens=48, temperature=0.0)(request)[0]

    assert meter.snapshot().calls == 1
    instruction = program.predictors()[0].signature.instructions
    line = format_line(task.labels)
    assert instruction.endswith(line) and len(instruction[: -len(line)].strip()) >= 20, instruction
    assert trained_reply != untrained_reply, "the adapter changed nothing: was it applied?"
    print(f"\ntrained: {trained_reply!r}\nuntrained: {untrained_reply!r}\n{instruction}")
