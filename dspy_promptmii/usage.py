"""Counting LM calls and tokens per role (generator, follower), through DSPy callbacks."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import dspy
from dspy.utils.callback import BaseCallback

__all__ = ["Usage", "UsageMeter", "metered"]


@dataclass
class Usage:
    """Calls and tokens seen by a meter. ``calls_without_usage`` counts calls whose
    response carried no token counts (cache hits, or servers that do not report them);
    ``errors`` counts calls that raised (a server gone, a prompt over the context), the
    last one described in ``last_error``."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls_without_usage: int = 0
    errors: int = 0
    last_error: str | None = None

    def as_dict(self) -> dict[str, int | str | None]:
        return dict(self.__dict__)


class UsageMeter(BaseCallback):
    """A callback that counts the calls of the LMs it is attached to and the tokens
    their responses report. Attach it with :func:`metered`; it also counts calls made
    through copies of a metered LM (copies keep their callbacks). Token counts are read
    from the LM's history, which DSPy keeps unless ``disable_history`` is set."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[str, Any] = {}
        self._seen: set[str] = set()
        self.total = Usage()

    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        with self._lock:
            self._open[call_id] = instance
            self.total.calls += 1

    def on_lm_end(self, call_id: str, outputs: Any, exception: BaseException | None = None) -> None:
        with self._lock:
            instance = self._open.pop(call_id, None)
            if exception is not None:
                self.total.errors += 1
                self.total.last_error = f"{type(exception).__name__}: {exception}"[:500]
                return
            if instance is None:
                return
            # The call's history entry is recorded before the callback ends; entries of
            # concurrent calls on the same LM are counted once each, whichever ends first.
            for entry in reversed(getattr(instance, "history", [])[-64:]):
                uid = entry.get("uuid")
                if uid is None or uid in self._seen:
                    continue
                self._seen.add(uid)
                usage = entry.get("usage") or {}
                if usage:
                    self.total.prompt_tokens += int(usage.get("prompt_tokens") or 0)
                    self.total.completion_tokens += int(usage.get("completion_tokens") or 0)
                else:
                    self.total.calls_without_usage += 1

    def snapshot(self) -> Usage:
        with self._lock:
            return Usage(**self.total.as_dict())


def metered(lm: dspy.BaseLM) -> tuple[dspy.BaseLM, UsageMeter]:
    """A copy of ``lm`` with a fresh :class:`UsageMeter` attached, and the meter."""
    meter = UsageMeter()
    copy = lm.copy()
    copy.callbacks = [*copy.callbacks, meter]
    return copy, meter
