"""``LocalServer``: llama.cpp's OpenAI-compatible server as a child process, with a
ready ``dspy.LM`` routed to it."""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import dspy

from dspy_promptmii.local.adapters import resolve_adapter
from dspy_promptmii.local.lifetime import OwnedFolder, popen_for_process_lifetime, sweep
from dspy_promptmii.local.pull import cache_state, cached_path, check_gguf_file, resolve_model
from dspy_promptmii.local.registry import ADAPTERS, DEFAULT_MODEL, REGISTRY
from dspy_promptmii.params import CONTEXT_SIZE

logger = logging.getLogger(__name__)

__all__ = [
    "LocalServer",
    "ServerError",
    "FOLLOWER_STYLE",
    "DEFAULT_N_CTX",
    "DEFAULT_WAIT_POLICY",
    "WAIT_POLICIES",
    "PORTABLE_CMAKE_ARGS",
]

#: The follower's decoding style on the embedded server (see LabelAdapter and
#: :mod:`dspy_promptmii.local.label_server`): the label read off the log-probabilities,
#: no generation. Chosen on benchmarks/results/styles-choice-2026-12-05 and
#: benchmarks/results/speed-2026-12-05 (the figures are there and in README).
FOLLOWER_STYLE = "choice"
#: OpenMP wait policies a server can be given (``None``: OpenMP's own default).
WAIT_POLICIES = (None, "active", "passive")
#: The embedded server's wait policy (see ``benchmarks speed``'s load measurement).
DEFAULT_WAIT_POLICY: str | None = None
#: The llama.cpp build flags that README's commands and CI use: x86-64 with AVX2 rather than
#: the build machine's own instruction set (a native build crashed on an Intel Xeon VM with
#: AVX-512 and AMX, 2026-12-06, a general protection fault in libggml-cpu).
PORTABLE_CMAKE_ARGS = "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAVA_BUILD=OFF"
#: Room for an n=20 meta-prompt (about 1-3k tokens on short-text tasks) plus a 1024-token reply.
DEFAULT_N_CTX = 8192
#: Each server's log folder, in the temporary folder: ``promptmii-server-<pid>-<random>/``.
LOG_PREFIX = "promptmii-server-"
#: What llama.cpp (and llama-cpp-python) print when they cannot load a model file.
_MODEL_LOAD_FAILURE = re.compile(
    r"failed to load model|error loading model|invalid magic|failed to read header|gguf_init", re.IGNORECASE
)
#: llama.cpp's lines when it loaded the model but could not make a context of ``n_ctx``
#: tokens, for any reason; and the line when the reason is memory for its KV cache.
_CONTEXT_FAILURE = re.compile(r"failed to initialize the context|Failed to create llama_context", re.IGNORECASE)
_KV_CACHE_ALLOCATION_FAILURE = re.compile(r"failed to allocate buffer for kv cache", re.IGNORECASE)


class ServerError(RuntimeError):
    """The local server could not start or stopped answering."""


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def log_folder_parent() -> Path:
    """Where the servers' log folders go: the temporary folder (``$TMPDIR``, ``/tmp``)."""
    return Path(tempfile.gettempdir())


class LocalServer:
    """Run llama.cpp's server on 127.0.0.1 and hand out ``dspy.LM`` objects routed to it.

    >>> with LocalServer() as lm:            # doctest: +SKIP
    ...     dspy.configure(lm=lm)

    Lifetime: the server runs until ``stop()`` (or the end of the ``with`` block), or
    until this process ends, whichever thread started it. On Linux it is killed
    (SIGKILL) when this process dies in any way, ``kill -9`` included: it is forked by a
    helper thread that lives as long as the process, because Linux ties the
    parent-death signal to the thread that forks, not to the process. A server started
    from a worker thread thus outlives that thread. Elsewhere only ``stop()``, the
    ``with`` block and a normal interpreter exit (atexit) stop it. A server that ends on its
    own after it was ready (a crash in llama.cpp, the kernel's out-of-memory kill) is seen at
    once: :attr:`failure` becomes a ``ServerError`` naming the signal or exit code (with a
    rebuild command after a crash), logged at ERROR; requests to it would only fail with
    connection errors.

    Logs: the server's output goes to ``<temp dir>/promptmii-server-<pid>-<random>/server.log``
    (``<pid>`` is this process); ``ServerError`` messages quote its tail, and ``stop()``
    removes the folder. A folder left by a process that died without stopping its server
    is removed by the next ``start()`` of any process; folders of live processes are kept.

    Before launching, ``start()`` checks the model (see ``resolve_model``): a registry
    model must be cached and match its sha256, a ``.gguf`` path must exist and start
    with the GGUF magic bytes; so must a LoRA adapter file (``lora``).

    Args:
        model: A registry name (default ``qwen2.5-coder-0.5b-instruct``), a trained generator's
            name (:data:`~dspy_promptmii.local.registry.ADAPTERS`: its base model plus its
            shipped adapter, both verified) or a ``.gguf`` path.
        lora: A LoRA adapter in GGUF form (``python -m training.export``), applied to every
            request at scale 1.0 (llama-cpp-python's ``--lora_path``; it has no per-request
            scale, so base and base + adapter are two servers). Not with a trained
            generator's name, which brings its own.
        n_ctx: Context size in tokens.
        n_threads: CPU threads for generation (default: all cores).
        n_threads_batch: CPU threads for prompt processing (default: ``n_threads``).
        wait_policy: How llama.cpp's OpenMP threads wait for each other at every step:
            ``"active"`` (spin), ``"passive"`` (sleep at once) or ``None`` (OpenMP's
            default: spin a while, then sleep); the server's ``OMP_WAIT_POLICY``. See
            :data:`DEFAULT_WAIT_POLICY` for the measured default.
        host, port: Where to listen; ``port=None`` picks a free one.
        startup_timeout: Seconds to wait for the server to answer.
        auto_pull: Pull a registry model that is not cached yet (else the error says how).
        lm_kwargs: Defaults for the LM that ``start()`` returns (temperature 0 unless given).
        command: The server command, before ``--model ...``; defaults to
            ``python -m dspy_promptmii.local.label_server`` (llama-cpp-python's server
            with label choice, the ``choice`` style; tests put a stand-in here).
    """

    def __init__(
        self,
        model: str | os.PathLike = DEFAULT_MODEL,
        *,
        n_ctx: int = DEFAULT_N_CTX,
        n_threads: int | None = None,
        n_threads_batch: int | None = None,
        wait_policy: str | None = DEFAULT_WAIT_POLICY,
        host: str = "127.0.0.1",
        port: int | None = None,
        startup_timeout: float = 180.0,
        auto_pull: bool = False,
        lm_kwargs: dict[str, Any] | None = None,
        command: Sequence[str] | None = None,
        stop_grace: float = 5.0,
        lora: str | os.PathLike | None = None,
    ):
        CONTEXT_SIZE.check("n_ctx", n_ctx)
        self.model = os.fspath(model)
        if self.model in ADAPTERS and lora is not None:
            raise ValueError(f"{self.model!r} is a trained generator (base model + adapter): pass no other lora")
        self.lora = os.fspath(lora) if lora is not None else None
        self.lora_path: Path | None = None
        self.n_ctx = n_ctx
        if wait_policy not in WAIT_POLICIES:
            raise ValueError(f"wait_policy must be one of {WAIT_POLICIES}, got {wait_policy!r}")
        for name, value in (("n_threads", n_threads), ("n_threads_batch", n_threads_batch)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        self.n_threads = n_threads or os.cpu_count() or 2
        self.n_threads_batch = n_threads_batch or self.n_threads
        self.wait_policy = wait_policy
        self.host = host
        self.port = port
        self._auto_port = port is None
        self.startup_timeout = startup_timeout
        self.auto_pull = auto_pull
        self.lm_kwargs = {"temperature": 0.0, **(lm_kwargs or {})}
        self.command = list(command) if command is not None else None
        self.stop_grace = stop_grace
        self.process: subprocess.Popen | None = None
        self.model_path: Path | None = None
        self._log_folder: OwnedFolder | None = None
        self._log: IO[bytes] | None = None
        #: Why the server stopped on its own after it was ready (a crash, a kill), else None.
        self.failure: ServerError | None = None

    # -- names ----------------------------------------------------------------------

    @property
    def alias(self) -> str:
        """The model name the LM route carries: the registry or trained-generator name, or
        the file's stem; with a ``lora`` given here, ``"<that>+<adapter file's stem>"``, so
        that base and base + adapter never share a route name (nor a DSPy cache entry)."""
        name = self.model if self.model in REGISTRY or self.model in ADAPTERS else Path(self.model).stem
        return f"{name}+{Path(self.lora).stem}" if self.lora is not None else name

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible base URL, e.g. ``http://127.0.0.1:PORT/v1``."""
        if self.port is None:
            raise ServerError("the server has not been started")
        return f"http://{self.host}:{self.port}/v1"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # -- lifecycle ------------------------------------------------------------------

    @property
    def log_path(self) -> Path | None:
        """The running server's log file (``None`` when stopped)."""
        return Path(self._log.name) if self._log is not None else None

    def prepare(self) -> list[str]:
        """What :meth:`start` checks before it launches anything, on its own: llama.cpp is
        installed, the adapter (if any) and the model are there and intact (a registry
        model is pulled first with ``auto_pull``). Sets ``model_path`` and ``lora_path``;
        returns the server command. Cheap to repeat (a verified model is not hashed again).

        Raises what :meth:`start` raises before a launch: ``ServerError`` (llama.cpp is
        not installed), ``FileNotFoundError``, ``ModelFileError``, ``CorruptModelError``,
        ``PullError``.
        """
        command = self.command
        if command is None:
            try:
                import llama_cpp.server  # noqa: F401
            except ImportError:
                raise ServerError(
                    f"llama.cpp's server is not installed: CMAKE_ARGS=\"{PORTABLE_CMAKE_ARGS}\" "
                    "pip install --no-cache-dir 'dspy-promptmii[local]' "
                    "(builds llama-cpp-python from source, a few minutes)"
                ) from None
            command = [sys.executable, "-m", "dspy_promptmii.local.label_server"]
        if self.model in ADAPTERS:  # checked before the base model is pulled
            self.lora_path = resolve_adapter(self.model)
            self.model_path = resolve_model(ADAPTERS[self.model].base, auto_pull=self.auto_pull)
        else:
            self.lora_path = check_gguf_file(self.lora) if self.lora is not None else None
            self.model_path = resolve_model(self.model, auto_pull=self.auto_pull)
        return command

    def start(self) -> dspy.LM:
        """Start the server, wait until it answers, and return an LM routed to it.

        Raises:
            ServerError: llama.cpp is not installed, the port is taken, the command cannot
                be launched, the server exits while starting (a model it cannot load
                comes with a line of advice first) or does not answer in time.
            FileNotFoundError, ModelFileError, CorruptModelError, PullError: the model
                cannot be used (see ``resolve_model``), or the LoRA file is missing or
                not GGUF.
        """
        if self.running:
            return self.lm()
        if self.process is not None:  # it ended on its own: close its log before a new start
            self.stop()
        command = self.prepare()
        if self._auto_port:
            self.port = _free_port(self.host)
        elif _port_in_use(self.host, self.port):
            raise ServerError(f"port {self.port} on {self.host} is already in use; pass another port or port=None")
        args = [
            *command,
            "--model", str(self.model_path),
            "--model_alias", self.alias,
            "--host", self.host,
            "--port", str(self.port),
            "--n_ctx", str(self.n_ctx),
            "--n_threads", str(self.n_threads),
            "--n_threads_batch", str(self.n_threads_batch),
            *(["--lora_path", str(self.lora_path)] if self.lora_path is not None else []),
        ]
        env = dict(os.environ)
        env.pop("OMP_WAIT_POLICY", None)
        if self.wait_policy is not None:
            env["OMP_WAIT_POLICY"] = self.wait_policy.upper()
        sweep(log_folder_parent(), LOG_PREFIX)  # logs of processes that died without stopping
        atexit.register(self.stop)
        self._log_folder = OwnedFolder(log_folder_parent(), LOG_PREFIX)
        self._log = (self._log_folder.path / "server.log").open("wb")
        logger.info("starting %s (log: %s)", " ".join(args), self._log.name)
        try:
            self.process = popen_for_process_lifetime(
                args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        except OSError as error:
            self.stop()
            raise ServerError(f"could not launch the server command {command[0]!r}: {error}") from None
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        logger.info("local server ready at %s (model %s)", self.base_url, self.model_path)
        self.failure = None
        watch = (self.process, self.base_url, Path(self._log.name))
        threading.Thread(target=self._watch, args=watch, name="llama.cpp watch", daemon=True).start()
        return self.lm()

    def _watch(self, process: subprocess.Popen, url: str, log: Path) -> None:
        """Wait for ``process`` to end; when it ends on its own (not by :meth:`stop`, not by
        a Ctrl-C of this process's terminal, which reaches the server too), log why at once
        and set :attr:`failure`: every later request to it would only fail with a connection
        error (and LiteLLM's retries) that names no cause. Never raises."""
        from dspy_promptmii.stopping import stop_requested

        try:
            code = process.wait()
            if self.process is not process or code == -signal.SIGINT or stop_requested():
                return  # stop() forgets the process before it ends it
            failure = self._died_error(code, url, log)
            logger.error("%s", failure)
            if self.process is process:
                self.failure = failure
        except Exception:  # noqa: BLE001 - a watcher must not die noisily; the requests fail anyway
            logger.debug("the server watcher failed", exc_info=True)

    def _died_error(self, code: int, url: str, log: Path) -> ServerError:
        """The error of the server at ``url`` that ended on its own with exit ``code``
        (negative: a signal), with the tail of its ``log``."""
        if code < 0:
            try:
                how = f"killed by signal {signal.Signals(-code).name}"
            except ValueError:
                how = f"killed by signal {-code}"
        else:
            how = f"exited with code {code}"
        message = (
            f"the llama.cpp server of {self.model} at {url} stopped on its own ({how}); "
            "requests to it fail from now on"
        )
        if code in (-signal.SIGSEGV, -signal.SIGILL, -signal.SIGBUS):
            message += (
                ". llama.cpp crashed: a llama-cpp-python built for this CPU (pip's default, GGML_NATIVE) crashed "
                "like this on an Intel Xeon VM with AVX-512 and AMX (2026-12-06); rebuild it portably: "
                f'CMAKE_ARGS="{PORTABLE_CMAKE_ARGS}" pip install --force-reinstall --no-deps --no-cache-dir '
                "llama-cpp-python==0.3.36"
            )
        elif code == -signal.SIGKILL:
            message += " (killed: out of memory? see the kernel log, dmesg)"
        tail = self._log_tail(10, log)
        return ServerError(f"{message}. Its output ends:\n{tail}" if tail else message)

    def _log_text(self, log: Path | None = None) -> str:
        """The text of ``log`` (default: the running server's log), "" when it cannot be read."""
        if log is None:
            if self._log is None:
                return ""
            log = Path(self._log.name)
        try:
            return log.read_text(errors="replace")
        except OSError:
            return ""

    def _log_tail(self, lines: int = 40, log: Path | None = None) -> str:
        return "\n".join(self._log_text(log).strip().splitlines()[-lines:])

    def _load_failure_advice(self) -> str:
        """One line on a model file llama.cpp could not load: which file, and what to do."""
        path = self.model_path
        spec = REGISTRY.get(ADAPTERS[self.model].base if self.model in ADAPTERS else self.model)
        if spec is None or path != cached_path(spec):
            return (
                f"llama.cpp could not load the model file {path}: check the path, and that the file is a "
                "complete GGUF model that this llama-cpp-python supports."
            )
        if cache_state(spec, path.parent, rehash=True) != "cached":  # whatever its .verified record says
            return (
                f"llama.cpp could not load {path}: the file is corrupt (its sha256 is not the registry's); "
                f"run `promptmii models pull {spec.name}`, which replaces it."
            )
        return (
            f"llama.cpp could not load {path}, although it matches its sha256: "
            "this llama-cpp-python may be too old for the model; upgrade it."
        )

    def _exited_error(self) -> ServerError:
        message = (
            f"the server exited with code {self.process.returncode} while starting "
            f"(model {self.model_path}). Its output:\n{self._log_tail()}"
        )
        log = self._log_text()
        out_of_memory = _KV_CACHE_ALLOCATION_FAILURE.search(log) is not None
        if out_of_memory or _CONTEXT_FAILURE.search(log):
            advice = f"llama.cpp loaded the model but could not make a context of n_ctx={self.n_ctx} tokens"
            if not out_of_memory:
                advice += " (its output below says why)."
            elif self.n_ctx > CONTEXT_SIZE.low:
                advice += (
                    f" (its KV cache did not fit in memory): give a smaller n_ctx (--n-ctx; default {DEFAULT_N_CTX})."
                )
            else:
                advice += " (its KV cache did not fit in memory, at the smallest n_ctx): free memory."
        elif _MODEL_LOAD_FAILURE.search(log):
            advice = self._load_failure_advice()
        else:
            return ServerError(message)
        return ServerError(f"{advice}\n{message[0].upper()}{message[1:]}")

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise self._exited_error()
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.2)
        raise ServerError(
            f"the server did not answer within {self.startup_timeout:.0f} s. Its output:\n{self._log_tail()}"
        )

    def stop(self) -> None:
        """Terminate the server (kill it after a grace period) and remove its log folder."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=self.stop_grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._log_folder is not None:
            self._log_folder.close()
            self._log_folder = None
        atexit.unregister(self.stop)
        if self._auto_port:
            self.port = None  # a restart picks a free port again

    def __enter__(self) -> dspy.LM:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- clients --------------------------------------------------------------------

    def lm(self, **kwargs: Any) -> dspy.LM:
        """A ``dspy.LM`` routed to this server; ``kwargs`` override the defaults.

        The route is ``hosted_vllm/<alias>``: LiteLLM then sends ``max_tokens``, which
        llama.cpp accepts (``openai/`` would send ``max_completion_tokens``).
        """
        if not self.running:
            raise ServerError("the server is not running: call start() or use `with LocalServer() as lm:`")
        settings = {**self.lm_kwargs, **kwargs}
        return dspy.LM(f"hosted_vllm/{self.alias}", api_base=self.base_url, api_key="local", **settings)

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` by the served model's own tokenizer."""
        request = urllib.request.Request(
            f"http://{self.host}:{self.port}/extras/tokenize/count",
            data=json.dumps({"input": text}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return int(json.loads(response.read())["count"])
