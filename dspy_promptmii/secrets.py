"""Keep credentials out of what the package writes: manifests, result records, logs.

Two operations, both pure functions of their input plus one process-wide set of known
secret values:

* :func:`redact` copies a structure (dicts, lists, tuples) with the value of every
  credential-named key replaced by :data:`REDACTED`, and known secret values and
  credential-shaped substrings (``Bearer ...`` tokens, ``user:password@`` with or without
  a ``scheme://`` before it, and ``?api_key=...`` in URLs) removed from every string. Use
  it on LM arguments and on anything written as JSON (a benchmark's manifest, settings
  and result records, the command lines' ``--out`` files).
* :func:`scrub` removes the same from free text, and also the value of ``name: value`` or
  ``name=value`` pairs whose name ends in a credential word (``Authorization: Bearer x``,
  ``'api_key': 'x'``). Use it on error texts and log messages. :class:`SecretFilter` is a
  :class:`logging.Filter` that scrubs every record a handler emits.

A key name is credential-named when one of its words (split at ``_``, ``-``, ``.``, white
space and camelCase) is ``key``/``keys``/``apikey``, ``token`` or a word ending in it
(``accesstoken``; not ``tokens``, which counts, as in ``max_tokens``), ``secret(s)``,
``password(s)``/``passwd``/``pwd``/``passphrase``, ``credential(s)``, ``cookie(s)``,
``bearer``, or starts with ``auth`` (``Authorization``, ``auth_token``). In free text the
*last* word of the name must be such a word, so ``KeyError: 'x'`` stays readable.

Known secret values (at least :data:`MIN_SECRET_LENGTH` characters, so that ``"local"``
or ``"none"`` are not erased everywhere) are those :func:`remember` and :func:`redact`
met under credential-named keys, the credentials of URLs they met anywhere (the password
of ``http://user:password@host``, percent-decoded too, ``user:password`` and its HTTP
Basic form, which a server may echo), and the values of environment variables with
credential-named names (``OPENAI_API_KEY``, ``HF_TOKEN``, ...), read at each call.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import threading
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

__all__ = [
    "REDACTED",
    "MIN_SECRET_LENGTH",
    "is_credential_name",
    "remember",
    "redact",
    "scrub",
    "SecretFilter",
    "protect_handlers",
    "protected_logger",
]

REDACTED = "[redacted]"
#: Shorter values are not remembered as secrets (they would be erased from unrelated text).
MIN_SECRET_LENGTH = 8

_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
_CREDENTIAL_WORD = re.compile(
    r"^(?:(?:api)?keys?|\w*token|secrets?|passwords?|passwd|pwd|passphrase|credentials?|cookies?|bearer|auth\w*)$"
)
_BEARER = re.compile(r"\b(Bearer)\s+[A-Za-z0-9._~+/=-]{8,}")
_URL_USERINFO = re.compile(r"(?<=://)[^/\s@'\"]+@")
# ``user:password@host`` without a scheme before it, as connection errors print it
# ("failed to connect to user:password@host:8000"); an e-mail address has no colon.
_BARE_USERINFO = re.compile(r"(?<![\w.%+~:/-])[\w.%+~-]+:[^\s/@'\"]+@(?=[\w\[])")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
_URL_QUERY = re.compile(r"(?P<head>[?&](?P<name>[A-Za-z0-9_.-]+)=)(?P<value>[^&#\s'\"]+)")
_PAIR = re.compile(
    r"(?P<name>[A-Za-z][A-Za-z0-9_.-]*)(?P<sep>[\"']?\s*[:=]\s*[\"']?)"
    r"(?P<value>(?:(?:Bearer|Basic|Digest|Token)\s+)?[^\s\"'&,;)}\]]+)"
)

_lock = threading.Lock()
_known: set[str] = set()


def _words(name: str) -> list[str]:
    return [word.lower() for word in _WORD.findall(name)]


def is_credential_name(name: object, *, last_word: bool = False) -> bool:
    """Whether a key (or header, or environment variable) name looks like it holds a
    credential; with ``last_word``, only the name's last word counts (see the module docs)."""
    if not isinstance(name, str):
        return False
    words = _words(name)
    if last_word:
        words = words[-1:]
    return any(word != "tokens" and _CREDENTIAL_WORD.match(word) for word in words)


def _remember_value(value: Any) -> None:
    if isinstance(value, str):
        candidates = {value.strip()}
        parts = value.split()
        if len(parts) > 1:
            candidates.add(parts[-1])  # "Bearer <token>": the token alone, too
        with _lock:
            _known.update(c for c in candidates if len(c) >= MIN_SECRET_LENGTH and c != REDACTED)
    elif isinstance(value, Mapping):
        for item in value.values():
            _remember_value(item)
    elif isinstance(value, (list, tuple, set)):
        for item in value:
            _remember_value(item)


def _remember_url_credentials(text: str) -> None:
    """Remember the credentials of every URL in ``text``: a password (as written and
    percent-decoded), ``user:password`` and its HTTP Basic form, or a lone user name that
    is long enough to be a token (``https://TOKEN@host``)."""
    if "@" not in text:
        return
    for url in _URL.findall(text):
        try:
            parts = urlsplit(url)
            user, password = parts.username, parts.password
        except ValueError:  # a malformed port or netloc: nothing to learn from it
            continue
        found: list[str] = []
        if password:
            for form_user, form_password in ((user or "", password), (unquote(user or ""), unquote(password))):
                pair = f"{form_user}:{form_password}"
                found += [form_password, pair, base64.b64encode(pair.encode("utf-8")).decode("ascii")]
        elif user:
            found += [user, unquote(user)]
        with _lock:
            _known.update(value for value in found if len(value) >= MIN_SECRET_LENGTH and value != REDACTED)


def remember(obj: Any) -> None:
    """Remember the values under credential-named keys of ``obj`` (nested dicts and lists
    searched) and the credentials of URLs in any of its strings (``api_base``), so that
    :func:`scrub` and :func:`redact` erase them from any text later."""
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            if is_credential_name(key):
                _remember_value(value)
            else:
                remember(value)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            remember(item)
    elif isinstance(obj, str):
        _remember_url_credentials(obj)


#: Environment variables the shell defines whose names read like credentials but hold
#: none (``PWD`` is the working directory, not a password).
_SHELL_VARIABLES = frozenset({"PWD", "OLDPWD"})


def _known_values() -> list[str]:
    with _lock:
        values = set(_known)
    for name, value in os.environ.items():
        if name in _SHELL_VARIABLES:
            continue
        if is_credential_name(name) and len(value.strip()) >= MIN_SECRET_LENGTH:
            values.add(value.strip())
    return sorted(values, key=len, reverse=True)  # a longer secret before a part of it


def _scrub_values(text: str) -> str:
    for value in _known_values():
        if value in text:
            text = text.replace(value, REDACTED)
    text = _BEARER.sub(rf"\1 {REDACTED}", text)
    text = _URL_QUERY.sub(lambda m: m["head"] + REDACTED if is_credential_name(m["name"]) else m[0], text)
    text = _URL_USERINFO.sub(f"{REDACTED}@", text)
    return _BARE_USERINFO.sub(f"{REDACTED}@", text)


def _pair(match: re.Match[str]) -> str:
    if not is_credential_name(match["name"], last_word=True) or REDACTED.rstrip("]") in match["value"]:
        return match[0]
    return f"{match['name']}{match['sep']}{REDACTED}"


def scrub(text: str) -> str:
    """``text`` without known secret values, bearer tokens, credentials in URLs, and the
    values of credential-named ``name: value`` / ``name=value`` pairs."""
    if not isinstance(text, str) or not text:
        return text
    return _PAIR.sub(_pair, _scrub_values(text))


def redact(obj: Any) -> Any:
    """A copy of ``obj`` (dicts, lists and tuples copied; other values kept) in which the
    value of every credential-named key is :data:`REDACTED` (and remembered, see
    :func:`remember`) and every string is rid of known secret values, bearer tokens and
    credentials in URLs. ``None`` and empty values under credential-named keys are kept
    (they show that no credential was set)."""
    if isinstance(obj, Mapping):
        out: dict[Any, Any] = {}
        for key, value in obj.items():
            if is_credential_name(key) and value not in (None, "", {}, []):
                _remember_value(value)
                out[key] = REDACTED
            else:
                out[key] = redact(value)
        return out
    if isinstance(obj, list):
        return [redact(item) for item in obj]
    if isinstance(obj, tuple):
        return tuple(redact(item) for item in obj)
    if isinstance(obj, str):
        _remember_url_credentials(obj)
        return _scrub_values(obj)
    return obj


class SecretFilter(logging.Filter):
    """Scrubs each record's message, exception text and stack (see :func:`scrub`); never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string: leave it to the handler's error path
            return True
        clean = scrub(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        return True


def protect_handlers(*handlers: logging.Handler) -> None:
    """Add a :class:`SecretFilter` to each handler (once)."""
    for handler in handlers:
        if not any(isinstance(f, SecretFilter) for f in handler.filters):
            handler.addFilter(SecretFilter())


def protected_logger(name: str) -> logging.Logger:
    """``logging.getLogger(name)`` with a :class:`SecretFilter` (once): whatever handlers
    its records reach (the command lines', a user's, OpenRLHF's), they carry no known
    secret. Every module of the package, the benchmarks and training logs through one."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, SecretFilter) for f in logger.filters):
        logger.addFilter(SecretFilter())
    return logger
