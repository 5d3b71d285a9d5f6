"""What the command lines show on a terminal: text without credentials or raw control
characters, and errors as one line.

* :func:`escape_controls` writes control characters (C0 but newline and tab, DEL, C1,
  and the bidirectional overrides) as Python escapes (``\\x1b``, ``\\r``, ``\\u202e``):
  a label or an instruction holding an escape sequence is shown, never obeyed.
* :func:`shown` is what every printed text goes through: known secret values and
  credentials in URLs removed (:func:`dspy_promptmii.secrets.redact`, which leaves the
  rest of an instruction or a table as it is), then :func:`escape_controls`. :func:`echo`
  prints it. :func:`shown_error` does the same for an error text, also removing the
  values of credential-named ``name: value`` pairs (:func:`dspy_promptmii.secrets.scrub`).
  :class:`ControlFilter` does the escaping for log records; :func:`protect_output` gives a
  handler both filters.
* :func:`error_line` turns an exception into the one line a command prints (its first
  line; a ``KeyError``'s message without the quotes), :func:`fail` prints it, with the
  traceback only when asked (``-v``), and returns the exit code 2.
* :func:`command` runs a command line's body the same way for every command: signals
  (:mod:`dspy_promptmii.stopping`), ``interrupted`` (exit 130), one-line errors.
* :func:`quiet_litellm` keeps LiteLLM's own prints (the coloured provider list it writes
  to stdout when it cannot route a model) off the terminal while we ask it about a route.
* :func:`write_stdout` writes a command's report to stdout after its files are written: a
  reader that went away (``| head``) or a closed stdout ends the command quietly, a stdout
  that cannot take the text (a full disk) is one warning, never a traceback.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

from dspy_promptmii.secrets import protect_handlers, redact, scrub

__all__ = [
    "escape_controls",
    "shown",
    "shown_error",
    "echo",
    "ControlFilter",
    "protect_output",
    "error_line",
    "fail",
    "command",
    "write_stdout",
]

logger = logging.getLogger("dspy_promptmii.console")

# C0 controls but \t and \n, DEL, C1 controls, and the bidirectional embeddings, overrides
# and isolates (text that reorders what follows it on the screen).
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_SURROGATES = re.compile("[\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    return match[0].encode("unicode_escape").decode("ascii")


def escape_controls(text: str) -> str:
    """``text`` with control characters (but newline and tab) and lone surrogates written
    as Python escapes, e.g. ``"\\x1b[31m"`` shown as ``\\x1b[31m``."""
    if not isinstance(text, str):
        text = str(text)
    text = _CONTROLS.sub(_escape, text)
    return _SURROGATES.sub(lambda m: f"\\u{ord(m[0]):04x}", text)


def shown(text: object) -> str:
    """``text`` (an instruction, a table) as a command line may show it: known secrets and
    credentials in URLs removed, control characters escaped."""
    return escape_controls(redact(str(text)))


def shown_error(text: object) -> str:
    """An error text as a command line may show it: :func:`dspy_promptmii.secrets.scrub`bed
    (``Authorization: ...`` and other credential-named values too), controls escaped."""
    return escape_controls(scrub(str(text)))


def echo(text: object = "", file: TextIO | None = None) -> None:
    """Print :func:`shown` ``text`` (to stdout by default), flushed."""
    print(shown(text), file=file or sys.stdout, flush=True)


class ControlFilter(logging.Filter):
    """Escapes control characters in each record's message (never drops a record)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string: the handler reports it
            return True
        clean = escape_controls(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


@contextmanager
def quiet_litellm() -> Iterator[None]:
    """LiteLLM with ``suppress_debug_info`` set for the duration (then as it was): its
    lookups of an unknown route raise without printing a banner to stdout."""
    import litellm

    quiet, litellm.suppress_debug_info = litellm.suppress_debug_info, True
    try:
        yield
    finally:
        litellm.suppress_debug_info = quiet


def protect_output(*handlers: logging.Handler) -> None:
    """Make each handler scrub credentials (:func:`dspy_promptmii.secrets.protect_handlers`)
    and escape control characters (:class:`ControlFilter`), once."""
    protect_handlers(*handlers)
    for handler in handlers:
        if not any(isinstance(f, ControlFilter) for f in handler.filters):
            handler.addFilter(ControlFilter())


def error_line(error: BaseException) -> str:
    """The one line that describes ``error`` to a user: its message's first line (a
    ``KeyError``'s argument without quotes; the exception's type name when it has no
    message), scrubbed of credentials and with controls escaped."""
    if isinstance(error, KeyError) and error.args:
        text = str(error.args[0])
    else:
        text = str(error)
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    # Errors of these kinds say what went wrong in their message; others are named.
    plain = (ValueError, LookupError, OSError, RuntimeError, ImportError) + _lm_errors()
    return shown_error(lines[0] if isinstance(error, plain) else f"{type(error).__name__}: {lines[0]}")


def _lm_errors() -> tuple[type[BaseException], ...]:
    """DSPy's LM errors (their first line names the model and the problem), when DSPy is loaded."""
    module = sys.modules.get("dspy.utils.exceptions")
    error = getattr(module, "LMError", None)
    return (error,) if isinstance(error, type) else ()


def fail(prog: str, error: BaseException, *, verbose: bool = False, file: TextIO | None = None) -> int:
    """Print ``prog: error: <one line>`` (after the scrubbed traceback when ``verbose``)
    and return 2, a command line's exit code for an error."""
    stream = file or sys.stderr
    if verbose:
        stream.write(shown_error("".join(traceback.format_exception(type(error), error, error.__traceback__))))
    print(f"{prog}: error: {error_line(error)}", file=stream, flush=True)
    return 2


def command(prog: str, body: Callable[[], int], *, verbose: bool = False, program: bool = False) -> int:
    """Run a command line's ``body`` and return its exit code: under
    :func:`dspy_promptmii.stopping.stop_on_signals` (Ctrl-C and SIGTERM stop it and no LM
    request starts after them), ``interrupted`` and 130 on a stop, :func:`fail`'s one line
    and 2 on an error. With ``program`` (the process is this command), the process ends
    without waiting for requests a stop left in flight
    (:func:`dspy_promptmii.stopping.exit_process`)."""
    from dspy_promptmii.stopping import exit_process, stop_on_signals

    with stop_on_signals():
        try:
            code = body()
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr, flush=True)
            code = 130
        except Exception as error:  # noqa: BLE001 - every error is one line (a traceback only when verbose)
            code = fail(prog, error, verbose=verbose)
    return exit_process(code) if program else code


def write_stdout(text: str) -> bool:
    """Write ``text`` to stdout and flush it; meant for a report whose files are already
    written, so a failing stdout loses nothing.

    Returns ``True`` when the text was written or nobody reads it (stdout closed, or the
    reader of a pipe went away: ``| head``; stdout is then pointed at the null device so
    the interpreter's last flush stays quiet), ``False`` after logging one warning when
    stdout refused the text (``OSError``, e.g. ``[Errno 28]`` on a full disk). Never raises
    for a failing stdout.
    """
    stream = sys.stdout
    if stream is None:
        return True
    try:
        stream.write(text)
        stream.flush()
        return True
    except (OSError, ValueError) as error:  # ValueError: a closed file object
        _silence(stream)
        if isinstance(error, BrokenPipeError) or getattr(error, "errno", None) == errno.EBADF:
            return True  # the reader went away, or the stdout descriptor was closed
        logger.warning("could not write the report to stdout: %s", error)
        return False


def _silence(stream: TextIO) -> None:
    """Point ``stream``'s descriptor at the null device, so nothing more fails on it."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
