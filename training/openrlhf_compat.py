"""OpenRLHF 0.11.2 pieces, loadable on a machine without its GPU dependencies.

``pip install --no-deps openrlhf==0.11.2`` installs OpenRLHF's source (200 kB) without
torch, deepspeed, vLLM, ray or flash-attn. Two pieces of it are needed on CPU:

* the agent base class (``openrlhf.utils.agent.AgentExecutorBase``): importing it the
  normal way runs ``openrlhf/utils/__init__.py``, which imports torch, transformers and
  sympy. :func:`agent_module` imports it normally when it can (on a training node it
  always can), else loads ``agent.py`` (which needs only aiohttp) while skipping that
  package ``__init__``;
* the argument parser of ``openrlhf.cli.train_ppo_ray``: it is built inline under
  ``if __name__ == "__main__":``, after imports of ray and vLLM. :func:`parse_train_args`
  takes that block from the installed source with :mod:`ast`, and runs it with the
  given argument list -- the parser, ``hierarchize`` and OpenRLHF's own post-parse
  checks (asserts) -- stopping before ``train(args)``.

Command line, used by ``train_grpo.sh`` before launching::

    python -m training.openrlhf_compat check-args -- --actor.model_name_or_path ... [flags]
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.metadata
import importlib.util
import io
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dspy_promptmii.secrets import protected_logger

logger = protected_logger("training.openrlhf_compat")

__all__ = ["OpenRLHFUnavailable", "openrlhf_dir", "openrlhf_version", "agent_module", "parse_train_args", "main"]

#: The OpenRLHF release the recipes and the agent are written against.
SUPPORTED_VERSION = "0.11.2"
_STDLIB_IMPORTS = {"argparse", "os", "sys", "datetime", "json", "math", "re", "time"}


class OpenRLHFUnavailable(ImportError):
    """OpenRLHF is not installed, or a piece of it cannot be loaded here."""


def openrlhf_dir() -> Path:
    """The installed ``openrlhf`` package folder (found without importing it)."""
    spec = importlib.util.find_spec("openrlhf")
    if spec is None or not spec.submodule_search_locations:
        raise OpenRLHFUnavailable(
            f"openrlhf is not installed: pip install --no-deps openrlhf=={SUPPORTED_VERSION} (CPU: source only)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def openrlhf_version() -> str:
    try:
        return importlib.metadata.version("openrlhf")
    except importlib.metadata.PackageNotFoundError:
        raise OpenRLHFUnavailable("openrlhf is not installed") from None


def agent_module() -> types.ModuleType:
    """``openrlhf.utils.agent``, imported normally when possible, else loaded without
    running ``openrlhf/utils/__init__.py`` (whose torch/sympy imports fail on CPU)."""
    try:
        return importlib.import_module("openrlhf.utils.agent")
    except ImportError as error:
        if isinstance(error, ModuleNotFoundError) and error.name in ("openrlhf", "openrlhf.utils"):
            raise OpenRLHFUnavailable(
                f"openrlhf is not installed: pip install --no-deps openrlhf=={SUPPORTED_VERSION}"
            ) from None
        reason = error
    utils_dir = openrlhf_dir() / "utils"
    if not (utils_dir / "agent.py").is_file():
        raise OpenRLHFUnavailable(f"{utils_dir / 'agent.py'} is missing; is openrlhf {SUPPORTED_VERSION} installed?")
    logger.info("loading openrlhf.utils.agent without openrlhf/utils/__init__.py (%s)", reason)
    importlib.import_module("openrlhf")  # its own __init__ is light
    stub = types.ModuleType("openrlhf.utils")
    stub.__path__ = [str(utils_dir)]  # type: ignore[attr-defined]
    saved = sys.modules.get("openrlhf.utils")
    sys.modules["openrlhf.utils"] = stub
    try:
        module = importlib.import_module("openrlhf.utils.agent")
    except ImportError as error:
        raise OpenRLHFUnavailable(f"openrlhf.utils.agent cannot be loaded: {error}") from error
    finally:
        # Leave no stub package behind; the loaded submodules stay in sys.modules.
        if saved is None:
            sys.modules.pop("openrlhf.utils", None)
        else:
            sys.modules["openrlhf.utils"] = saved
        parent = sys.modules.get("openrlhf")
        if parent is not None and getattr(parent, "utils", None) is stub:
            delattr(parent, "utils")
    return module


def _load_hierarchize(root: Path) -> Any:
    spec = importlib.util.spec_from_file_location("_openrlhf_config", root / "utils" / "config.py")
    if spec is None or spec.loader is None:
        raise OpenRLHFUnavailable(f"cannot load {root / 'utils' / 'config.py'}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.hierarchize


class _Rewrite(ast.NodeTransformer):
    """``parser.parse_args()`` -> ``parser.parse_args(__argv__)``; drop ``train(args)`` and
    the ``hierarchize`` import (provided in the namespace)."""

    def __init__(self) -> None:
        self.parse_calls = 0
        self.train_calls = 0

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "parse_args" and not node.args:
            self.parse_calls += 1
            node.args = [ast.Name(id="__argv__", ctx=ast.Load())]
        return node

    def visit_Expr(self, node: ast.Expr) -> ast.AST | None:
        call = node.value
        if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "train":
            self.train_calls += 1
            return None
        return self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> ast.AST | None:
        if node.module == "openrlhf.utils.config":
            return None
        return node


def _main_block(tree: ast.Module) -> list[ast.stmt]:
    for node in tree.body:
        if (
            isinstance(node, ast.If)
            and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name)
            and node.test.left.id == "__name__"
        ):
            return node.body
    raise OpenRLHFUnavailable('train_ppo_ray.py has no `if __name__ == "__main__":` block to take the parser from')


def parse_train_args(argv: Sequence[str], *, check: bool = True) -> Any:
    """Parse ``argv`` with the installed ``openrlhf.cli.train_ppo_ray`` parser and, with
    ``check``, run its post-parse checks. Returns the hierarchical args namespace.

    Raises ``ValueError`` with OpenRLHF's own message for a rejected flag or a failed check,
    and :class:`OpenRLHFUnavailable` when OpenRLHF is not installed.
    """
    root = openrlhf_dir()
    source_file = root / "cli" / "train_ppo_ray.py"
    tree = ast.parse(source_file.read_text(encoding="utf-8"), filename=str(source_file))
    body = _main_block(tree)
    if not check:
        cut = next(
            (i for i, stmt in enumerate(body) if "parse_args" in ast.unparse(stmt)),
            None,
        )
        if cut is None:
            raise OpenRLHFUnavailable("no parse_args() call found in train_ppo_ray.py")
        body = [*body[:cut], *ast.parse("args = parser.parse_args(__argv__)").body]
    rewrite = _Rewrite()
    module = ast.Module(body=[rewrite.visit(stmt) for stmt in body], type_ignores=[])
    module.body = [stmt for stmt in module.body if stmt is not None]
    if check and rewrite.parse_calls != 1:
        raise OpenRLHFUnavailable(f"expected one parser.parse_args() in train_ppo_ray.py, found {rewrite.parse_calls}")
    ast.fix_missing_locations(module)
    imports = [
        node
        for node in tree.body
        if isinstance(node, (ast.Import, ast.ImportFrom))
        and all(
            ((node.module if isinstance(node, ast.ImportFrom) else a.name) or "").split(".")[0] in _STDLIB_IMPORTS
            for a in node.names
        )
    ]
    namespace: dict[str, Any] = {"__name__": "_openrlhf_train_ppo_ray_args", "__argv__": list(argv)}
    exec(compile(ast.Module(body=imports, type_ignores=[]), str(source_file), "exec"), namespace)  # noqa: S102
    namespace["hierarchize"] = _load_hierarchize(root)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            exec(compile(module, str(source_file), "exec"), namespace)  # noqa: S102
    except SystemExit as error:
        message = stderr.getvalue().strip().splitlines()
        raise ValueError(
            f"OpenRLHF {openrlhf_version()} train_ppo_ray rejects the arguments: {message[-1] if message else error}"
        ) from None
    except AssertionError as error:
        raise ValueError(f"OpenRLHF {openrlhf_version()} train_ppo_ray's checks fail: {error}") from None
    return namespace["args"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.openrlhf_compat")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-args", help="check OpenRLHF train_ppo_ray flags against the installed parser")
    check.add_argument("flags", nargs=argparse.REMAINDER, help="the flags (after --)")
    args = parser.parse_args(argv)
    flags = args.flags[1:] if args.flags[:1] == ["--"] else args.flags
    try:
        parsed = parse_train_args(flags)
    except OpenRLHFUnavailable as error:
        print(f"cannot check the flags: {error}", file=sys.stderr)
        return 2
    except ValueError as error:
        print(str(error), file=sys.stderr)
        return 1
    version = openrlhf_version()
    note = "" if version == SUPPORTED_VERSION else f" (written for {SUPPORTED_VERSION})"
    print(f"OpenRLHF {version}{note} accepts {len(flags)} arguments; agent={parsed.train.agent_func_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
