"""``python -m benchmarks speed``: how fast the follower and the generator run.

Measurements on fixed prompts built from the packaged SNIPS sample (the same rows,
instructions and order every run):

1. **Constrained styles**: latency per query of each constrained-decoding style (none,
   grammar, json_object, json_schema) over raw HTTP to the follower's server, with the
   completion tokens the server reports, and whether the replies were really constrained.
2. **Stack overhead**: the same queries through ``dspy.Predict`` + ``LabelAdapter``
   (DSPy, LiteLLM, the adapter, the usage meter) against raw HTTP.
3. **Prefix cache**: queries 2..N with a long (~400-token) instruction shared by all
   queries against the same queries with a short one: with the server's prefix cache
   working, the long instruction is processed once, not at every query.
4. **Prompt processing**: per style, the follower's latency over the raw prompt
   processing of the same prompts (a plain request with a one-token reply, which the
   server answers after processing the prompt and sampling once), both in the steady
   state where the server holds the previous query's prompt (the shared instruction).
5. **Load** (a local follower): the default style's latency with one core, then both
   cores, kept busy by other processes, over the idle latency, for several server thread
   settings (threads, prompt-processing threads, OpenMP wait policy), each in a server of
   its own.
6. **Scoring 20 rows**: rows per second when one instruction is scored on 20 held-out
   rows through ``evaluate`` (what compile-time selection does), per style and number of
   parallel calls; the median of 3 interleaved rounds.
7. **Compile**: one generator call split into meta-prompt processing (the call with a
   one-token reply) and generation (the same call again, its prompt now cached), per
   generator given.

Latencies are wall-clock seconds per request on this machine; medians and 90th
percentiles over the queries, each series after one untimed warm-up request (first-call
imports, client setup). Ratios compare series of the same run. Nothing else should run
while it measures (the load series makes its own load).
"""

from __future__ import annotations

import logging
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import dspy
import httpx

from dspy_promptmii.adapter import LabelAdapter
from dspy_promptmii.baselines import naive_program
from dspy_promptmii.data import TaskData, classifier_signature, split_rows
from dspy_promptmii.demo import demo_task
from dspy_promptmii.evaluation import evaluate
from dspy_promptmii.protocol import (
    CONSTRAINED_STYLES,
    NAIVE_INSTRUCTION,
    Protocol,
    parse_label,
    with_format_line,
)
from dspy_promptmii.routes import Endpoint
from dspy_promptmii.sampling import select_examples

logger = logging.getLogger(__name__)

__all__ = [
    "STYLES",
    "LONG_INSTRUCTION",
    "Latency",
    "SpeedConfig",
    "binary_queries",
    "measure_styles",
    "measure_prefix_cache",
    "measure_compile",
    "measure_prompt_processing",
    "measure_load",
    "measure_scoring",
    "ServerSetting",
    "LOAD_SETTINGS",
    "BusyCores",
    "run_speed",
    "format_speed",
]

#: Every constrained style, ``False`` meaning none.
STYLES: tuple[str | bool, ...] = (False, *CONSTRAINED_STYLES)
#: The two intents of the short-prompt queries (about 70 prompt tokens each).
BINARY_LABELS = ("GetWeather", "PlayMusic")
#: A long instruction (about 400 tokens with the format line) for the prefix-cache check.
LONG_INSTRUCTION = " ".join(
    [
        "You sort short requests that people say to a voice assistant into intents.",
        "GetWeather covers every question about the weather: forecasts for a day, a week or a season,",
        "temperatures, rain, snow, wind, storms, sunshine, humidity, heat waves and cold spells,",
        "in a named city, state, country or park, at the user's current position, or at a time",
        "given as a date, a weekday, a holiday, a number of hours or days from now, or a part of",
        "the day such as the morning or the evening. It also covers questions about what to wear",
        "or bring because of the weather, and whether an outdoor plan will be rained out.",
        "PlayMusic covers every request to start playing audio: a song, an album, an artist, a",
        "band, a genre, a playlist, a decade, a soundtrack or a radio station, on a named service",
        "such as Spotify, Deezer, Pandora, YouTube or Google Music, or on whatever service the",
        "device uses by default. It also covers requests to play something similar to what is",
        "playing, to shuffle, or to put on music for an activity such as running or sleeping.",
        "Decide by what the user wants done, not by single words: a question about a song called",
        "'Rain' is still music, and a request to play the sound of rain in the forecast is still",
        "weather only if it asks what the weather will be. Names of places can appear in both.",
        "Numbers can be dates, times, temperatures, ratings or years; read them in context.",
        "When a request names a service and a piece of music, it is PlayMusic. When it names a",
        "place and a time and asks how it will be outside, it is GetWeather. Requests can be",
        "ungrammatical, lower-case, without punctuation, or cut short; decide anyway. Answer with",
        "the intent name exactly as written, without quotes, explanation or any other text.",
    ]
)
SHORT_INSTRUCTION = NAIVE_INSTRUCTION
#: The untimed first request of each series (not one of the measured queries).
WARM_UP_TEXT = "what is the forecast for tomorrow"


@dataclass
class Latency:
    """Per-request seconds of a series, summarised (milliseconds)."""

    n: int
    median_ms: float
    p90_ms: float
    mean_ms: float
    completion_tokens: float | None = None
    prompt_tokens: float | None = None
    valid_rate: float | None = None
    constrained_replies: float | None = None

    @classmethod
    def of(cls, seconds: Sequence[float], **extra: Any) -> Latency:
        ordered = sorted(seconds)
        p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
        return cls(
            n=len(ordered),
            median_ms=round(1000 * statistics.median(ordered), 1),
            p90_ms=round(1000 * p90, 1),
            mean_ms=round(1000 * statistics.fmean(ordered), 1),
            **extra,
        )


@dataclass
class SpeedConfig:
    """What to measure. ``queries``: requests per series; ``styles``: constrained styles
    (``False`` for none); ``generators``: endpoints to time a compile call with."""

    queries: int = 16
    styles: tuple[str | bool, ...] = STYLES
    seed: int = 0
    n_examples: int = 20
    generator_max_tokens: int = 1024
    stack: bool = True
    prefix_cache: bool = True
    prompt_processing: bool = True
    load: bool = True
    load_settings: tuple[ServerSetting, ...] = ()  # () means LOAD_SETTINGS
    scoring: bool = True
    scoring_styles: tuple[str | bool, ...] = ("json_object", "choice")
    scoring_threads: tuple[int, ...] = (1, 4)
    extra: dict[str, Any] = field(default_factory=dict)


def binary_queries(task: TaskData, count: int, seed: int = 0) -> list[dict[str, str]]:
    """``count`` held-out SNIPS rows of the two :data:`BINARY_LABELS` intents, in a seeded order."""
    rows = [row for row in task.rows if row["label"] in BINARY_LABELS]
    _, test = split_rows(rows, train=0, test=min(count, len(rows)), seed=seed)
    return test


def _base_url(endpoint: Endpoint) -> str:
    if endpoint.server is not None:
        return endpoint.server.base_url
    base = (getattr(endpoint.lm, "kwargs", {}) or {}).get("api_base")
    if not base:
        raise ValueError(f"route {endpoint.route!r} has no api_base: raw HTTP timing needs an OpenAI-compatible server")
    return str(base).rstrip("/")


def _served_model(endpoint: Endpoint) -> str:
    return endpoint.lm.model.split("/", 1)[-1]


def _post(client: httpx.Client, url: str, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    response = client.post(f"{url}/chat/completions", json=body)
    seconds = time.perf_counter() - started
    response.raise_for_status()
    return seconds, response.json()


def _content(reply: dict[str, Any]) -> str:
    return (reply.get("choices") or [{}])[0].get("message", {}).get("content") or ""


def _is_json_label(text: str) -> bool:
    return text.strip().startswith("{") and '"label"' in text


def measure_styles(
    endpoint: Endpoint, queries: Sequence[dict[str, str]], styles: Sequence[str | bool], stack: bool = True
) -> list[dict[str, Any]]:
    """Per style: raw HTTP latency (and, with ``stack``, the DSPy + LabelAdapter latency
    of the same queries) for the naive instruction on the binary queries."""
    labels = list(BINARY_LABELS)
    instruction = with_format_line(SHORT_INSTRUCTION, labels)
    url, model = _base_url(endpoint), _served_model(endpoint)
    signature = classifier_signature(labels, pair=False, instructions=instruction)
    rows = []
    with httpx.Client(timeout=300) as client:
        for style in styles:
            protocol = Protocol(constrained=style)
            seconds, completion, prompt, valid, constrained = [], [], [], [], []
            warm_up = protocol.request_body(model, instruction, labels, {"text": WARM_UP_TEXT}, ["text"])
            try:
                _post(client, url, warm_up)  # untimed: the first request of a style pays one-time setup
            except httpx.HTTPStatusError:
                pass  # the timed loop below reports the refusal
            for query in queries:
                body = protocol.request_body(model, instruction, labels, {"text": query["text"]}, ["text"])
                try:
                    took, reply = _post(client, url, body)
                except httpx.HTTPStatusError as error:
                    logger.warning("style %s refused by the server: %s", style or "none", error)
                    rows.append({"style": style or "none", "refused": str(error).splitlines()[0][:200]})
                    break
                usage = reply.get("usage") or {}
                text = _content(reply)
                seconds.append(took)
                completion.append(usage.get("completion_tokens") or 0)
                prompt.append(usage.get("prompt_tokens") or 0)
                valid.append(parse_label(text, labels) is not None)
                constrained.append(_is_json_label(text) if style in ("json_schema", "json_object", "choice") else True)
            else:
                row: dict[str, Any] = {
                    "style": style or "none",
                    "raw": asdict(
                        Latency.of(
                            seconds,
                            completion_tokens=statistics.median(completion),
                            prompt_tokens=statistics.median(prompt),
                            valid_rate=sum(valid) / len(valid),
                            constrained_replies=sum(constrained) / len(constrained),
                        )
                    ),
                }
                if stack:
                    row["stack"] = asdict(_stack_latency(endpoint, signature, protocol, queries))
                    row["stack_overhead"] = round(row["stack"]["median_ms"] / row["raw"]["median_ms"] - 1, 3)
                rows.append(row)
                logger.info("style %s: %s", row["style"], row)
    return rows


def _stack_latency(
    endpoint: Endpoint, signature: type[dspy.Signature], protocol: Protocol, queries: Sequence[dict[str, str]]
) -> Latency:
    program = dspy.Predict(signature)
    lm = endpoint.lm.copy(cache=False)
    seconds = []
    valid = 0
    with dspy.context(lm=lm, adapter=LabelAdapter(protocol=protocol)):
        try:
            program(text=WARM_UP_TEXT)  # untimed: first-call imports and client setup
        except Exception as error:  # noqa: BLE001 - only a warm-up
            logger.debug("stack warm-up call failed: %s", error)
        for query in queries:
            started = time.perf_counter()
            try:
                program(text=query["text"])
                valid += 1
            except Exception as error:  # noqa: BLE001 - an invalid reply still took its time
                logger.debug("stack call failed: %s", error)
            seconds.append(time.perf_counter() - started)
    return Latency.of(seconds, valid_rate=valid / len(queries))


def measure_prefix_cache(
    endpoint: Endpoint, queries: Sequence[dict[str, str]], style: str | bool
) -> dict[str, Any]:
    """Queries 2..N with :data:`LONG_INSTRUCTION` against the same queries with the short
    instruction (raw HTTP, one style). ``ratio`` near 1 means the long shared prefix is
    processed once and reused."""
    labels = list(BINARY_LABELS)
    url, model = _base_url(endpoint), _served_model(endpoint)
    protocol = Protocol(constrained=style)
    result: dict[str, Any] = {"style": style or "none"}
    with httpx.Client(timeout=300) as client:
        for name, text in (("short", SHORT_INSTRUCTION), ("long", LONG_INSTRUCTION)):
            instruction = with_format_line(text, labels)
            seconds, prompt = [], []
            for query in queries:
                body = protocol.request_body(model, instruction, labels, {"text": query["text"]}, ["text"])
                took, reply = _post(client, url, body)
                seconds.append(took)
                prompt.append((reply.get("usage") or {}).get("prompt_tokens") or 0)
            result[name] = {
                "prompt_tokens": statistics.median(prompt),
                "first_ms": round(1000 * seconds[0], 1),
                "rest": asdict(Latency.of(seconds[1:])),
            }
    result["ratio"] = round(result["long"]["rest"]["median_ms"] / result["short"]["rest"]["median_ms"], 3)
    # The first long query follows the short series, so nearly all of its prompt is new:
    # prompt processing's throughput for a large batch, to compare with the small batches
    # (the ~20 new tokens) of the steady state.
    result["cold_prompt_tokens_per_second"] = round(
        result["long"]["prompt_tokens"] / (result["long"]["first_ms"] / 1000), 1
    )
    return result


def _series(client: httpx.Client, url: str, bodies: Sequence[dict[str, Any]]) -> list[float]:
    return [_post(client, url, body)[0] for body in bodies]


def measure_prompt_processing(
    endpoint: Endpoint, queries: Sequence[dict[str, str]], styles: Sequence[str | bool]
) -> list[dict[str, Any]]:
    """Per style: the follower's latency over the raw prompt processing of the same
    prompts (naive instruction, binary queries, raw HTTP). ``ratio`` 1 would mean the
    answer costs nothing beyond reading the prompt.

    The two are interleaved query by query (prompt only, then answered), each after an
    untimed one-token request for another text, so both find the shared instruction and
    nothing else of their prompt in the server's cache, and a change in the machine's load
    during the run touches both series alike."""
    labels = list(BINARY_LABELS)
    instruction = with_format_line(SHORT_INSTRUCTION, labels)
    url, model = _base_url(endpoint), _served_model(endpoint)
    raw = Protocol(constrained=False, reply_limit=1)

    def body(protocol: Protocol, text: str) -> dict[str, Any]:
        return protocol.request_body(model, instruction, labels, {"text": text}, ["text"])

    reset = body(raw, WARM_UP_TEXT)
    rows = []
    with httpx.Client(timeout=300) as client:
        for style in styles:
            protocol = Protocol(constrained=style)
            prompt_only, answered = [], []
            try:
                _post(client, url, body(protocol, WARM_UP_TEXT))  # untimed: the style's first request
                for query in queries:
                    for series, chosen in ((prompt_only, raw), (answered, protocol)):
                        _post(client, url, reset)
                        series.append(_post(client, url, body(chosen, query["text"]))[0])
            except httpx.HTTPStatusError as error:
                rows.append({"style": style or "none", "refused": str(error).splitlines()[0][:200]})
                continue
            prompt_latency, style_latency = Latency.of(prompt_only), Latency.of(answered)
            rows.append(
                {
                    "style": style or "none",
                    "prompt_processing": asdict(prompt_latency),
                    "follower": asdict(style_latency),
                    "ratio": round(style_latency.median_ms / prompt_latency.median_ms, 3),
                }
            )
            logger.info("prompt processing, style %s: %s", style or "none", rows[-1])
    return rows


@dataclass(frozen=True)
class ServerSetting:
    """Thread settings of a local llama.cpp server (see :class:`LocalServer`)."""

    n_threads: int
    n_threads_batch: int
    wait_policy: str | None = None

    @property
    def name(self) -> str:
        return f"threads {self.n_threads}/{self.n_threads_batch}, wait {self.wait_policy or 'default'}"


#: The settings the load measurement compares (2 cores: both threads, one thread, and
#: OpenMP's three wait behaviours).
LOAD_SETTINGS: tuple[ServerSetting, ...] = (
    ServerSetting(2, 2, None),
    ServerSetting(2, 2, "passive"),
    ServerSetting(2, 2, "active"),
    ServerSetting(1, 1, None),
    ServerSetting(1, 2, "passive"),
)


class BusyCores:
    """``count`` other processes, each able to keep one core busy (a Python busy loop),
    paused until :meth:`run` lets some of them go. Use as a context manager: they are
    killed at the end."""

    def __init__(self, count: int):
        self.processes = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
        self.run(0)

    def run(self, count: int) -> None:
        """Let ``count`` of the processes run (SIGCONT) and pause the rest (SIGSTOP)."""
        for index, process in enumerate(self.processes):
            process.send_signal(signal.SIGCONT if index < count else signal.SIGSTOP)
        if count:
            time.sleep(0.05)  # on the run queue before the request

    def __enter__(self) -> BusyCores:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for process in self.processes:
            process.kill()
            process.wait()


def measure_load(
    model: str,
    queries: Sequence[dict[str, str]],
    style: str | bool,
    settings: Sequence[ServerSetting] = LOAD_SETTINGS,
    n_ctx: int = 2048,
    start_server: Callable[..., Any] | None = None,
    busy: Sequence[int] = (1, 2),
) -> list[dict[str, Any]]:
    """Per server setting, in a server of its own: the latency of ``style`` on the binary
    queries when idle, and with ``b`` cores kept busy by other processes for each ``b`` in
    ``busy`` (``loaded``: the first; ``loaded_<b>``: each); ``ratio`` (and ``ratio_<b>``) is
    loaded over idle (1: unaffected). Idle and loaded requests alternate query by query
    (the busy processes paused and resumed, see :class:`BusyCores`), so a change in the
    machine's own load touches every series alike. ``start_server(setting)`` returns a
    started :class:`LocalServer`-like object (tests pass a stub)."""
    from dspy_promptmii.local.server import LocalServer

    def default_start(setting: ServerSetting) -> LocalServer:
        server = LocalServer(
            model,
            n_ctx=n_ctx,
            n_threads=setting.n_threads,
            n_threads_batch=setting.n_threads_batch,
            wait_policy=setting.wait_policy,
        )
        server.start()
        return server

    labels = list(BINARY_LABELS)
    instruction = with_format_line(SHORT_INSTRUCTION, labels)
    protocol = Protocol(constrained=style)
    rows = []
    levels = (0, *busy)
    for setting in settings:
        server = (start_server or default_start)(setting)
        try:
            url, model_name = server.base_url, server.alias
            warm = protocol.request_body(model_name, instruction, labels, {"text": WARM_UP_TEXT}, ["text"])
            seconds: dict[int, list[float]] = {level: [] for level in levels}
            with httpx.Client(timeout=600) as client, BusyCores(max(busy, default=0)) as cores:
                _post(client, url, warm)  # untimed
                for query in queries:
                    body = protocol.request_body(model_name, instruction, labels, {"text": query["text"]}, ["text"])
                    for level in levels:  # the same query at every level, the cache reset in between
                        cores.run(0)
                        _post(client, url, warm)
                        cores.run(level)
                        seconds[level].append(_post(client, url, body)[0])
                    cores.run(0)
        finally:
            server.stop()
        idle = Latency.of(seconds[0])
        loaded = {level: Latency.of(seconds[level]) for level in busy}
        first = loaded[busy[0]]
        rows.append(
            {
                "setting": asdict(setting),
                "name": setting.name,
                "idle": asdict(idle),
                "loaded": asdict(first),
                "ratio": round(first.median_ms / idle.median_ms, 3),
                **{f"loaded_{count}": asdict(latency) for count, latency in loaded.items()},
                **{f"ratio_{count}": round(latency.median_ms / idle.median_ms, 3) for count, latency in loaded.items()},
            }
        )
        logger.info("load, %s: %s", setting.name, rows[-1])
    return rows


def measure_scoring(
    endpoint: Endpoint,
    task: TaskData,
    styles: Sequence[str | bool],
    threads: Sequence[int] = (1, 4),
    rows: int = 20,
    repeats: int = 3,
) -> list[dict[str, Any]]:
    """Rows per second when the naive instruction is scored on ``rows`` held-out rows of
    ``task`` through :func:`~dspy_promptmii.evaluation.evaluate` (compile-time selection's
    path), per style and number of parallel calls: the median of ``repeats`` rounds, each
    round running every (style, calls) pair once, so that a change in the machine's load
    touches every pair alike."""
    _, test = split_rows(task.rows, train=0, test=rows, seed=0)
    examples = task.examples(test)
    program = naive_program(dspy.Predict(task.signature()))
    lm = endpoint.lm.copy(cache=False)
    adapters = {style: LabelAdapter(protocol=Protocol(constrained=style)) for style in styles}
    for adapter in adapters.values():
        evaluate(program, examples[:2], lm=lm, adapter=adapter, progress=False)  # untimed warm-up
    seconds: dict[tuple[str | bool, int], list[float]] = {(style, n): [] for style in styles for n in threads}
    results = {}
    for _ in range(repeats):
        for style, count in seconds:
            result = evaluate(program, examples, lm=lm, adapter=adapters[style], threads=count, progress=False)
            seconds[(style, count)].append(result.seconds)
            results[(style, count)] = result
    out = []
    for (style, count), taken in seconds.items():
        median = statistics.median(taken)
        result = results[(style, count)]
        out.append(
            {
                "style": style or "none",
                "threads": count,
                "rows": len(examples),
                "seconds": round(median, 3),
                "rounds": [round(x, 3) for x in taken],
                "rows_per_second": round(len(examples) / median, 3),
                "macro_f1": round(result.macro_f1, 4),
                "errors": result.errors + result.lm_errors,
            }
        )
        logger.info("scoring %d rows, style %s, %d thread(s): %s", len(examples), style or "none", count, out[-1])
    return out


def measure_compile(
    generator: Endpoint, task: TaskData, n: int, max_tokens: int, seed: int = 0, name: str | None = None
) -> dict[str, Any]:
    """One Prompt-MII meta-prompt (``n`` SNIPS examples, the protocol's template for this
    generator): prompt processing time (a one-token reply) and generation time (the full
    reply, the prompt now cached), with the server's token counts."""
    url, model = _base_url(generator), _served_model(generator)
    protocol = Protocol()
    examples = [
        ({"text": row["text"]}, row["label"])
        for row, _ in select_examples([(row, row["label"]) for row in task.rows], n, seed)
    ]
    meta_prompt = protocol.meta_prompt(task.labels, examples, ["text"], generator_model=model)
    base = {"model": model, "messages": [{"role": "user", "content": meta_prompt}], "temperature": 0.0}
    with httpx.Client(timeout=1800) as client:
        prompt_s, prompt_reply = _post(client, url, {**base, "max_tokens": 1})
        total_s, reply = _post(client, url, {**base, "max_tokens": max_tokens})
    usage = reply.get("usage") or {}
    completion = usage.get("completion_tokens") or 0
    return {
        "generator": name or generator.route,
        "n": n,
        "prompt_tokens": (prompt_reply.get("usage") or {}).get("prompt_tokens"),
        "prompt_seconds": round(prompt_s, 2),
        "completion_tokens": completion,
        "generation_seconds": round(total_s, 2),
        "compile_seconds": round(prompt_s + total_s, 2),
        "generation_tokens_per_second": round(completion / total_s, 1) if total_s else None,
        "max_tokens": max_tokens,
        "finish_reason": (reply.get("choices") or [{}])[0].get("finish_reason"),
    }


def run_speed(
    follower: Endpoint,
    generators: Sequence[tuple[str, Endpoint]],
    config: SpeedConfig,
    progress: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """All four measurements; returns a JSON-serialisable dict."""
    task = demo_task()
    queries = binary_queries(task, config.queries, config.seed)
    progress(f"constrained styles ({len(queries)} queries each, raw HTTP and through DSPy)")
    styles = measure_styles(follower, queries, config.styles, stack=config.stack)
    result: dict[str, Any] = {"queries": len(queries), "labels": list(BINARY_LABELS), "styles": styles}
    usable = [row for row in styles if "raw" in row]
    if config.prefix_cache and usable:
        fastest = min(usable, key=lambda row: row["raw"]["median_ms"])["style"]
        progress(f"prefix cache (style {fastest})")
        result["prefix_cache"] = measure_prefix_cache(follower, queries, False if fastest == "none" else fastest)
    if config.prompt_processing:
        progress("prompt processing against the answer, per style")
        result["prompt_processing"] = measure_prompt_processing(follower, queries, config.styles)
    if config.scoring:
        progress(f"scoring {20} rows per style and parallel calls")
        result["scoring"] = measure_scoring(follower, task, config.scoring_styles, config.scoring_threads)
    if config.load and follower.server is not None:
        progress("latency with one core busy, per server thread setting")
        result["load"] = measure_load(
            str(follower.server.model_path),
            queries,
            follower.constrained_style,
            config.load_settings or LOAD_SETTINGS,
        )
        result["load_style"] = follower.constrained_style
    result["compile"] = []
    for name, generator in generators:
        progress(f"compile with {name}")
        result["compile"].append(
            measure_compile(generator, task, config.n_examples, config.generator_max_tokens, config.seed, name)
        )
    return result


def format_speed(result: dict[str, Any]) -> str:
    """The measurements as plain-text tables."""
    lines = [
        f"Follower latency per query, {result['queries']} queries, labels {', '.join(result['labels'])} "
        "(ms; median / p90)",
        "",
        f"{'style':<12} {'raw HTTP':>16} {'DSPy+LabelAdapter':>19} {'overhead':>9} {'completion tok':>15} "
        f"{'prompt tok':>11} {'valid':>6} {'constrained':>12}",
    ]
    for row in result["styles"]:
        if "refused" in row:
            lines.append(f"{row['style']:<12} refused: {row['refused']}")
            continue
        raw, stack = row["raw"], row.get("stack")
        stack_text = f"{stack['median_ms']:.0f} / {stack['p90_ms']:.0f}" if stack else "-"
        overhead = f"{100 * row['stack_overhead']:+.0f}%" if stack else "-"
        lines.append(
            f"{row['style']:<12} {raw['median_ms']:>7.0f} / {raw['p90_ms']:<6.0f} {stack_text:>19} {overhead:>9} "
            f"{raw['completion_tokens']:>15.0f} {raw['prompt_tokens']:>11.0f} {raw['valid_rate']:>6.0%} "
            f"{raw['constrained_replies']:>12.0%}"
        )
    cache = result.get("prefix_cache")
    if cache:
        lines += [
            "",
            f"Prefix cache (style {cache['style']}): queries 2..N, median ms",
            f"  short instruction ({cache['short']['prompt_tokens']:.0f} prompt tokens): "
            f"{cache['short']['rest']['median_ms']:.0f} (first query {cache['short']['first_ms']:.0f})",
            f"  long instruction  ({cache['long']['prompt_tokens']:.0f} prompt tokens): "
            f"{cache['long']['rest']['median_ms']:.0f} (first query {cache['long']['first_ms']:.0f})",
            f"  ratio long/short: {cache['ratio']:.2f}",
            f"  prompt processing of the first long query: {cache['cold_prompt_tokens_per_second']:.0f} tokens/s",
        ]
    if result.get("prompt_processing"):
        lines += ["", "Answer over prompt processing of the same prompts (ms; median / p90)", ""]
        lines.append(f"{'style':<12} {'prompt only':>16} {'answered':>16} {'ratio':>6}")
        for row in result["prompt_processing"]:
            if "refused" in row:
                lines.append(f"{row['style']:<12} refused: {row['refused']}")
                continue
            pp, fo = row["prompt_processing"], row["follower"]
            lines.append(
                f"{row['style']:<12} {pp['median_ms']:>7.0f} / {pp['p90_ms']:<6.0f} {fo['median_ms']:>7.0f} / "
                f"{fo['p90_ms']:<6.0f} {row['ratio']:>6.2f}"
            )
    if result.get("scoring"):
        base = next(
            (r for r in result["scoring"] if r["style"] == "json_object" and r["threads"] == 1), result["scoring"][0]
        )
        lines += ["", f"Scoring {base['rows']} rows with one instruction (evaluate)", ""]
        lines.append(f"{'style':<12} {'threads':>7} {'seconds':>8} {'rows/s':>7} {'vs ' + base['style'] + ' x1':>16}")
        for row in result["scoring"]:
            lines.append(
                f"{row['style']:<12} {row['threads']:>7} {row['seconds']:>8.2f} {row['rows_per_second']:>7.2f} "
                f"{row['rows_per_second'] / base['rows_per_second']:>16.2f}"
            )
    if result.get("load"):
        counts = sorted(int(key.split("_")[1]) for key in result["load"][0] if key.startswith("loaded_"))
        lines += ["", f"Cores kept busy beside the server (style {result.get('load_style')}; ms, median / p90)", ""]
        header = f"{'server setting':<34} {'idle':>16}"
        for count in counts:
            header += f" {f'{count} busy':>16} {'ratio':>6}"
        lines.append(header)
        for row in result["load"]:
            idle = row["idle"]
            line = f"{row['name']:<34} {idle['median_ms']:>7.0f} / {idle['p90_ms']:<6.0f}"
            for count in counts:
                loaded = row[f"loaded_{count}"]
                line += f" {loaded['median_ms']:>7.0f} / {loaded['p90_ms']:<6.0f} {row[f'ratio_{count}']:>6.2f}"
            lines.append(line)
    if result.get("compile"):
        lines += ["", "Compile (one generator call)", ""]
        lines.append(
            f"{'generator':<32} {'prompt tok':>10} {'prompt s':>9} {'reply tok':>10} {'generation s':>13} "
            f"{'tok/s':>6} {'total s':>8}"
        )
        for row in result["compile"]:
            lines.append(
                f"{row['generator']:<32} {row['prompt_tokens'] or 0:>10} {row['prompt_seconds']:>9.1f} "
                f"{row['completion_tokens']:>10} {row['generation_seconds']:>13.1f} "
                f"{row['generation_tokens_per_second'] or 0:>6.1f} {row['compile_seconds']:>8.1f}"
            )
    return "\n".join(lines)
