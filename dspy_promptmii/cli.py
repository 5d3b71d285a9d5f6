"""The ``promptmii`` command: ``demo``, ``induce``, ``export``, ``models pull|list``, ``serve``.

Every option and input is checked before a model is pulled, a server started or an LM
called; an error is one line (``promptmii: error: ...``, exit 2; the traceback only with
``-v``), without credentials or raw control characters; what is printed is shown the same
way (:mod:`dspy_promptmii.console`). Ctrl-C and SIGTERM stop it (exit 130): no LM request
starts after them (:mod:`dspy_promptmii.stopping`). An ``--out`` file is never one of the
run's inputs.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from dspy_promptmii.params import CONTEXT_SIZE, COUNT, COUNT_OR_ZERO
from dspy_promptmii.secrets import protected_logger

# LiteLLM otherwise tries to download its model-cost map at import time; offline that
# costs seconds of retries. A user's own setting wins.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

logger = protected_logger("dspy_promptmii")


#: argparse type: an integer >= 1 (counts, limits, sizes); the rule of :mod:`dspy_promptmii.params`.
positive_int = COUNT.argparse_type("positive_int")
#: argparse type of every ``--n-ctx``: a local server's context size, 512 tokens at least.
context_size = CONTEXT_SIZE.argparse_type("n_ctx")


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (seconds)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


#: argparse type: an integer >= 0 (counts where 0 means none).
non_negative_int = COUNT_OR_ZERO.argparse_type("non_negative_int")


def _check_out(path: str | None, inputs: list[tuple[str, str | Path]] | None = None) -> None:
    """``--out``: a file that can be written and is none of ``inputs`` (``(option, path)``
    pairs; links followed), checked before any download or LM call.
    Raises ``ValueError`` naming the option and the path."""
    from dspy_promptmii.files import check_writable

    if path:
        try:
            check_writable(path, inputs=inputs or ())
        except ValueError as error:
            raise ValueError(f"--out: {error}") from None


def _write_out(data: dict, path: str) -> None:
    """Write a command's ``--out`` JSON, credentials redacted."""
    from dspy_promptmii.files import write_json
    from dspy_promptmii.secrets import redact

    write_json(redact(data), path)


def _check_context(route: str, n_ctx: int, max_tokens: int, max_prompt_tokens: int | None = None) -> None:
    """For a local generator, whose context size is known before its server starts: the
    context must leave room for a meta-prompt (of ``max_prompt_tokens``, if given) once
    the reply is set aside.
    Raises ``ValueError`` naming ``--n-ctx`` and the reply limit."""
    from dspy_promptmii.routes import is_local

    if is_local(route):
        _require_room(n_ctx, max_tokens, max_prompt_tokens)


def _require_room(n_ctx: int | None, max_tokens: int, max_prompt_tokens: int | None = None) -> int | None:
    """The meta-prompt budget a context of ``n_ctx`` tokens leaves once the reply and the
    chat framing are set aside (None for an unknown context); ``ValueError`` naming
    ``--n-ctx`` when that is less than ``max_prompt_tokens`` (or no room at all)."""
    from dspy_promptmii.optimizer import CHAT_FRAMING, meta_prompt_budget

    budget = meta_prompt_budget(n_ctx, max_tokens)
    if budget is not None and budget < (max_prompt_tokens or 1):
        wanted = f"a meta-prompt of --max-prompt-tokens {max_prompt_tokens}" if max_prompt_tokens else "a meta-prompt"
        raise ValueError(
            f"--n-ctx {n_ctx} leaves no room for {wanted} once the reply ({max_tokens} tokens) and "
            f"{CHAT_FRAMING} tokens of chat framing are set aside"
        )
    return budget


# -- demo ------------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    from dspy_promptmii.console import echo
    from dspy_promptmii.demo import demo_generator, format_cost, format_table, run_demo
    from dspy_promptmii.generation import budget_limit
    from dspy_promptmii.routes import check_route

    # Every option is checked before a model is pulled or a server started; the
    # generator's reply limit is the one run_demo sets (the budget plus a margin).
    _check_out(args.out)
    generator = demo_generator(args.generator, args.follower)
    for route in dict.fromkeys((args.follower, generator)):
        check_route(route)
    _check_context(generator, args.n_ctx, budget_limit(args.max_instruction_tokens or None))
    echo(
        f"Prompt-MII demo: SNIPS intents (7 labels), n={args.n} labelled examples, "
        f"{args.test_rows} held-out rows; follower {args.follower}, generator {generator}."
    )
    result = run_demo(
        follower=args.follower,
        generator=args.generator,
        n=args.n,
        test_rows=args.test_rows,
        seed=args.seed,
        follower_style="none" if args.no_constrained else (args.constrained or "endpoint"),
        adapter=args.adapter,
        n_ctx=args.n_ctx,
        exemplars=args.exemplars,
        max_instruction_tokens=args.max_instruction_tokens or None,
        candidates=args.candidates,
        timeout=args.timeout,
    )
    calls = "one call" if args.candidates == 1 else f"{args.candidates} calls, the follower's best"
    echo(f"\nInstruction written by the generator ({calls}):\n")
    echo(_indent(result["instruction"]))
    echo()
    echo(format_cost(result["estimate"], result["measured"]))
    echo()
    echo(format_table(result["results"]))
    if args.out:
        _write_out(result, args.out)
        echo(f"\nresults written to {args.out}")
    return 0


def _indent(text: str) -> str:
    return "\n".join(f"    {line}" for line in text.splitlines())


# -- induce ----------------------------------------------------------------------------


def _induce(args: argparse.Namespace) -> int:
    import dspy

    from dspy_promptmii.console import echo
    from dspy_promptmii.data import load_task
    from dspy_promptmii.generation import budget_limit
    from dspy_promptmii.optimizer import PromptMIIOptimizer
    from dspy_promptmii.protocol import load_template
    from dspy_promptmii.routes import LMPool

    # Every option is checked before a model is pulled, a server started or an LM called.
    try:
        load_template(args.template)
    except (ValueError, TypeError) as error:
        raise ValueError(f"--template: {error}") from None
    if args.api_base is not None:
        parts = urlsplit(args.api_base)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"--api-base {args.api_base!r} is not an http:// or https:// URL")
    task = load_task(args.data)
    data_file = Path(args.data) / "data.jsonl" if Path(args.data).is_dir() else Path(args.data)
    inputs: list[tuple[str, str | Path]] = [("--data", data_file)]
    if Path(args.template).is_file():
        inputs.append(("--template", args.template))
    _check_out(args.out, inputs)
    if args.max_tokens is None:  # the instruction budget's limit, or the default without one
        args.max_tokens = budget_limit(args.max_instruction_tokens)
    _check_context(args.generator, args.n_ctx, args.max_tokens, args.max_prompt_tokens)
    program = dspy.Predict(task.signature())
    # The optimizer checks its settings (template with exemplars, the library) here; the
    # generator (which carries the reply limit, --max-tokens) and the context budget are
    # set once the endpoint exists.
    optimizer = PromptMIIOptimizer(
        n=args.n,
        template=args.template,
        seed=args.seed,
        sampling=args.sampling,
        max_prompt_tokens=args.max_prompt_tokens,
        exemplars=args.exemplars,
        max_instruction_tokens=args.max_instruction_tokens or None,
    )
    if args.dry_run:
        return _induce_dry_run(args, optimizer, program, task)
    with LMPool(n_ctx=args.n_ctx, api_base=args.api_base, timeout=args.timeout) as pool:
        endpoint = pool.endpoint(
            args.generator, temperature=0.0, max_tokens=args.max_tokens, cache=not args.no_cache
        )
        if args.max_prompt_tokens is None:  # the context the endpoint reports (remote ones too)
            optimizer.max_prompt_tokens = _require_room(endpoint.context_tokens, args.max_tokens)
        optimizer.generator_lm = endpoint.lm
        optimizer.token_counter = endpoint.token_counter
        compiled = optimizer.compile(program, trainset=task.examples())
    instruction = compiled.predictors()[0].signature.instructions
    echo(instruction)
    if args.out:
        _write_out(
            {
                "data": str(args.data),
                "generator": endpoint.route,
                "instruction": instruction,
                "report": optimizer.report,
            },
            args.out,
        )
        echo(f"\ninstruction and report written to {args.out}", file=sys.stderr)
    return 0


def _offline_lm(route: str, api_base: str | None, **settings: object) -> tuple[object, str]:
    """A ``dspy.LM`` naming ``route``'s model for counting and pricing only: nothing is
    pulled or started and it is never called (a local model is named as its server would
    serve it, ``hosted_vllm/<alias>``). Returns the LM and the route shown.

    Raises:
        ValueError: a route :func:`dspy_promptmii.routes.check_route` refuses.
        FileNotFoundError, ModelFileError: a ``.gguf`` path with no file, or not a GGUF file.
    """
    import dspy

    from dspy_promptmii.local import LocalServer
    from dspy_promptmii.local.pull import check_gguf_file
    from dspy_promptmii.routes import check_route, is_local, litellm_route, local_model

    check_route(route, api_base)
    if is_local(route):
        model = local_model(route)
        if model.lower().endswith(".gguf"):  # a path: it must be a GGUF file (4 bytes read, nothing loaded)
            check_gguf_file(model)
        alias = LocalServer(model).alias
        return dspy.LM(f"hosted_vllm/{alias}", **settings), route
    full = litellm_route(route, api_base)
    return dspy.LM(full, **({"api_base": api_base} if api_base else {}), **settings), full


def _induce_dry_run(args: argparse.Namespace, optimizer, program, task) -> int:
    """``induce --dry-run``: what the compile would cost (no pull, no server, no LM call)."""
    from dspy_promptmii.console import echo
    from dspy_promptmii.routes import is_local

    lm, route = _offline_lm(args.generator, args.api_base, temperature=0.0, max_tokens=args.max_tokens)
    optimizer.generator_lm = lm
    if args.max_prompt_tokens is None and is_local(args.generator):
        optimizer.max_prompt_tokens = _require_room(args.n_ctx, args.max_tokens)
    estimate = optimizer.estimate(program, task.examples())
    echo(f"dry run: what `promptmii induce` would spend with generator {route} (nothing pulled, started or called)")
    echo(estimate.format())
    if args.out:
        _write_out({"data": str(args.data), "generator": route, "estimate": estimate.as_dict()}, args.out)
        echo(f"\nestimate written to {args.out}", file=sys.stderr)
    return 0


# -- export ----------------------------------------------------------------------------


def _export(args: argparse.Namespace) -> int:
    """``export``: the follower prompt of every classifier of a saved program (no LM call)."""
    from dspy_promptmii.console import echo
    from dspy_promptmii.export import export_prompts, load_program, render_export
    from dspy_promptmii.protocol import Protocol

    protocol = Protocol(constrained=args.constrained or False, demo_style=args.demos)
    program = load_program(args.program_file, args.program)
    echo(render_export(export_prompts(program, protocol), args.format, protocol))
    return 0


# -- models ----------------------------------------------------------------------------


def _models_pull(args: argparse.Namespace) -> int:
    from dspy_promptmii.local import pull

    path = pull(args.name)
    print(path)
    return 0


def _models_list(args: argparse.Namespace) -> int:
    """Each registry model, cached (intact), corrupt (size or sha256 off) or not cached;
    then each trained generator, whether its shipped adapter is intact. A model's sha256
    is computed only when it changed since it was last verified (an adapter's, 9 MB, always)."""
    from dspy_promptmii.local import ADAPTERS, REGISTRY, CorruptModelError, cache_state, cached_path, models_dir
    from dspy_promptmii.local.adapters import resolve_adapter
    from dspy_promptmii.local.registry import adapters_dir

    print(f"cache: {models_dir()}")
    for name, spec in REGISTRY.items():
        path = cached_path(spec)
        try:
            state = cache_state(spec)
        except OSError as error:  # e.g. a cache file this user may not read: say so, list the rest
            state, unreadable = "unreadable", error
        if state == "unreadable":
            shown = f"unreadable {path}: {unreadable}"
        elif state == "cached":
            shown = f"cached  {path}"
        elif state == "corrupt":
            shown = f"corrupt {path} (size or sha256 is not the registry's): `promptmii models pull {name}` replaces it"
        else:
            shown = "not cached"
        print(f"  {name:30s} {spec.size / 1e6:8.1f} MB  {shown}\n      {spec.description}")
    print(f"trained generators (base model + LoRA shipped in the package: {adapters_dir()}):")
    for name, adapter in ADAPTERS.items():
        try:
            resolve_adapter(adapter)
            shown = f"adapter intact, base {adapter.base}"
        except (OSError, CorruptModelError) as error:  # missing, unreadable or damaged
            shown = f"adapter unusable: {error}"
        print(f"  {name:30s} {adapter.size / 1e6:8.1f} MB  {shown}\n      {adapter.description}")
    return 0


# -- serve -----------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    from dspy_promptmii.local import LocalServer
    from dspy_promptmii.routes import is_local, local_model, unknown_local_model

    model = local_model(args.model)
    if not is_local(model) and not Path(model).expanduser().exists():
        raise ValueError(unknown_local_model(model) + "; serve runs local models only")
    server = LocalServer(
        model, n_ctx=args.n_ctx, port=args.port, n_threads=args.threads, auto_pull=True, lora=args.lora
    )
    with server:
        adapter = f" + LoRA {server.lora_path}" if server.lora_path is not None else ""
        print(f"serving {server.model_path}{adapter} at {server.base_url}", flush=True)
        route = f'dspy.LM("hosted_vllm/{server.alias}", api_base="{server.base_url}", api_key="local")'
        print(f"in DSPy: {route}", flush=True)
        print("Ctrl-C stops it.", flush=True)
        try:
            while server.running:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    if server.failure is not None:  # it ended on its own (a crash): say so, exit 2
        raise server.failure
    return 0


# -- parser ----------------------------------------------------------------------------


def _quality_options(
    parser: argparse.ArgumentParser, exemplars: int, max_instruction_tokens: int | None, candidates: int
) -> None:
    """PromptMIIOptimizer's quality options, with the given defaults."""
    parser.add_argument(
        "--exemplars",
        type=non_negative_int,
        default=exemplars,
        help=f"instructions of other tasks from the instruction library shown to the generator (default {exemplars})",
    )
    parser.add_argument(
        "--max-instruction-tokens",
        type=non_negative_int,
        default=max_instruction_tokens or 0,
        help=f"instruction length budget, 0 for none (default {max_instruction_tokens or 0})",
    )
    parser.add_argument(
        "--candidates",
        type=positive_int,
        default=candidates,
        help=f"generator calls; above 1 the follower keeps the best on unseen labelled rows (default {candidates})",
    )


def _timeout_option(parser: argparse.ArgumentParser) -> None:
    from dspy_promptmii.routes import LOCAL_TIMEOUT, REMOTE_TIMEOUT

    parser.add_argument(
        "--timeout",
        type=positive_float,
        default=None,
        help=f"seconds an LM request may wait for the server (default {LOCAL_TIMEOUT:g} for local models, "
        f"{REMOTE_TIMEOUT:g} for others)",
    )


def build_parser() -> argparse.ArgumentParser:
    from dspy_promptmii.demo import DEMO_CANDIDATES, DEMO_EXEMPLARS, DEMO_GENERATOR, DEMO_MAX_INSTRUCTION_TOKENS
    from dspy_promptmii.local.registry import DEFAULT_GENERATOR, DEFAULT_MODEL
    from dspy_promptmii.local.server import DEFAULT_N_CTX
    from dspy_promptmii.optimizer import DEFAULT_MAX_INSTRUCTION_TOKENS
    from dspy_promptmii.protocol import CONSTRAINED_STYLES

    parser = argparse.ArgumentParser(prog="promptmii", description=__doc__)
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log progress at INFO level; tracebacks with errors"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    lm_help = "'local' (the embedded default), a registry model, a .gguf path, or a LiteLLM route"

    demo = commands.add_parser("demo", help="compile and evaluate a classifier on the embedded model, offline")
    demo.add_argument("--follower", default="local", help=f"the follower LM: {lm_help}")
    demo.add_argument(
        "--generator",
        default=None,
        help=f"the generator LM: a trained generator, 'local' (the embedded model, untrained: Prompt-MII-Zero), a "
        f"registry model, a .gguf path, or a LiteLLM route (default: {DEMO_GENERATOR}, the embedded model with the "
        "shipped Prompt-MII LoRA, when the follower is local; else the follower)",
    )
    demo.add_argument("--n", type=positive_int, default=20, help="labelled examples every method sees (default 20)")
    demo.add_argument("--test-rows", type=positive_int, default=100, help="held-out rows to evaluate on (default 100)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument(
        "--adapter",
        choices=("label", "chat"),
        default="label",
        help="follower prompt: the compact LabelAdapter (default) or DSPy's ChatAdapter",
    )
    decoding = demo.add_mutually_exclusive_group()
    decoding.add_argument("--no-constrained", action="store_true", help="no constrained decoding with LabelAdapter")
    decoding.add_argument(
        "--constrained",
        choices=CONSTRAINED_STYLES,
        default=None,
        help="the follower's decoding style with LabelAdapter (default: the follower endpoint's, 'choice' for the "
        "embedded model)",
    )
    _quality_options(demo, DEMO_EXEMPLARS, DEMO_MAX_INSTRUCTION_TOKENS, DEMO_CANDIDATES)
    demo.add_argument("--n-ctx", type=context_size, default=DEFAULT_N_CTX, help="context size of the local server")
    _timeout_option(demo)
    demo.add_argument("--out", help="also write the results as JSON here")
    demo.set_defaults(func=_demo)

    induce = commands.add_parser("induce", help="write an instruction for a JSONL task file")
    induce.add_argument("--data", required=True, help='JSONL with {"text", ["text_pair"], "label"}, or a task folder')
    induce.add_argument("--generator", required=True, help=f"the generator LM: {lm_help}")
    induce.add_argument("--api-base", help="base URL of an OpenAI-compatible server (vLLM, llama.cpp, ...)")
    induce.add_argument("--n", type=positive_int, default=20, help="examples shown to the generator (default 20)")
    induce.add_argument(
        "--template",
        default="auto",
        help="meta1, meta2, label_defs, auto (default), a template file or a template text",
    )
    induce.add_argument("--seed", type=int, default=0)
    induce.add_argument("--sampling", choices=("stratified", "random"), default="stratified")
    induce.add_argument(
        "--max-tokens",
        type=positive_int,
        default=None,
        help="most tokens the generator may write (default: the instruction budget + 64, or 1024 without a budget)",
    )
    induce.add_argument(
        "--exemplars",
        type=non_negative_int,
        default=0,
        help="instructions of other tasks from the instruction library shown to the generator (default 0)",
    )
    induce.add_argument(
        "--max-instruction-tokens",
        type=non_negative_int,
        default=DEFAULT_MAX_INSTRUCTION_TOKENS,
        help=f"instruction length budget in tokens, 0 for none (default {DEFAULT_MAX_INSTRUCTION_TOKENS})",
    )
    induce.add_argument(
        "--max-prompt-tokens", type=positive_int, help="meta-prompt budget (local default: context - reply)"
    )
    induce.add_argument("--n-ctx", type=context_size, default=DEFAULT_N_CTX, help="context size of a local server")
    _timeout_option(induce)
    induce.add_argument(
        "--no-cache",
        action="store_true",
        help="ask the generator even when DSPy's cache holds its reply to the same request (see README, 'Caching')",
    )
    induce.add_argument("--out", help="write the instruction and the report as JSON here (never the --data file)")
    induce.add_argument(
        "--dry-run",
        action="store_true",
        help="print what the compile would cost (calls, tokens, price) and stop: no model is pulled or started and "
        "no LM called; tokens by LiteLLM's counter",
    )
    induce.set_defaults(func=_induce)

    export = commands.add_parser(
        "export",
        help="print the follower prompt of a saved program's classifiers, as LabelAdapter sends it (no LM call)",
    )
    export.add_argument("program_file", metavar="PROGRAM.json", help="a program saved with DSPy's program.save()")
    export.add_argument(
        "--format",
        choices=("text", "messages", "json"),
        default="text",
        help="text (default): readable; messages: the chat messages as JSON; json: messages, slots, labels, "
        "request settings and the protocol",
    )
    export.add_argument(
        "--program",
        metavar="MODULE:ATTR",
        default=None,
        help="the program (a dspy.Module, a Signature or a factory) to load the file into; default: rebuilt from "
        "the file alone (needs the protocol's format line at the end of each instruction)",
    )
    export.add_argument(
        "--constrained",
        choices=CONSTRAINED_STYLES,
        default=None,
        help="the follower's constrained decoding (the request settings; default none, LabelAdapter()'s)",
    )
    export.add_argument(
        "--demos", choices=("inline", "turns"), default="inline", help="how demos are shown (default inline)"
    )
    export.set_defaults(func=_export)

    models = commands.add_parser("models", help="the embedded models: pull, list")
    model_commands = models.add_subparsers(dest="models_command", required=True)
    pull = model_commands.add_parser("pull", help="download, verify and cache a model")
    pull.add_argument("name", nargs="?", default=DEFAULT_MODEL, help=f"registry name (default {DEFAULT_MODEL})")
    pull.set_defaults(func=_models_pull)
    listing = model_commands.add_parser("list", help="registry models (cached or not) and trained generators")
    listing.set_defaults(func=_models_list)

    serve = commands.add_parser("serve", help="run llama.cpp's OpenAI-compatible server for a local model")
    serve.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"registry name, trained generator (e.g. {DEFAULT_GENERATOR}) or .gguf path",
    )
    serve.add_argument("--port", type=positive_int, default=None, help="port (default: a free one)")
    serve.add_argument("--n-ctx", type=context_size, default=DEFAULT_N_CTX)
    serve.add_argument("--threads", type=positive_int, default=None)
    serve.add_argument(
        "--lora",
        default=None,
        metavar="ADAPTER.gguf",
        help="a GGUF LoRA adapter (python -m training.export) applied to every request; the route's model "
        "name becomes MODEL+ADAPTER",
    )
    serve.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module docstring). Run as a program (``argv`` None), it
    does not wait for LM requests left in flight by a stop: the process ends at once."""
    from dspy_promptmii.console import command

    args = build_parser().parse_args(argv)
    return command("promptmii", lambda: _run_command(args), verbose=args.verbose, program=argv is None)


def _run_command(args: argparse.Namespace) -> int:
    from dspy_promptmii.console import protect_output

    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # No credential nor control character reaches a log line: the root's handlers, and
    # DSPy's own (its logger does not propagate).
    protect_output(*logging.getLogger().handlers, *logging.getLogger("dspy").handlers)
    logging.captureWarnings(True)  # Python warnings go through those handlers too
    if not args.verbose:
        logging.getLogger("dspy_promptmii").setLevel(logging.INFO)
        for noisy in ("LiteLLM", "httpx", "dspy"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        # DSPy's LM errors (a route no provider knows, a server that refused) name the model
        # and the problem on their first line; an OSError, e.g. an output that became
        # unwritable after the up-front check, names the file.
        return args.func(args)
    finally:
        logging.captureWarnings(False)


if __name__ == "__main__":
    sys.exit(main())
