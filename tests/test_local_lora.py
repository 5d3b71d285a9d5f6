"""A trained generator served by llama.cpp: ``LocalServer(..., lora=PATH)`` passes the
adapter as ``--lora_path`` (llama-cpp-python 0.3.36's server flag), checked before launch;
the registry's "base model + adapter" entries are verified by size and sha256. The fake
server script (tests/support/fake_llama_server.py) stands in for llama.cpp."""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import pytest

from dspy_promptmii.local import adapters as adapters_module
from dspy_promptmii.local import registry
from dspy_promptmii.local.adapters import resolve_adapter, resolve_generator
from dspy_promptmii.local.pull import CorruptModelError, ModelFileError
from dspy_promptmii.local.registry import AdapterSpec
from dspy_promptmii.local.server import LocalServer

FAKE_COMMAND = [sys.executable, str(Path(__file__).resolve().parent / "support" / "fake_llama_server.py")]


@pytest.fixture
def files(tmp_path: Path, monkeypatch) -> dict[str, Path]:
    record = tmp_path / "record.jsonl"
    monkeypatch.setenv("FAKE_LLAMA_RECORD", str(record))
    monkeypatch.delenv("FAKE_LLAMA_MODE", raising=False)
    logs = tmp_path / "tmp"
    logs.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(logs))
    model = tmp_path / "base.gguf"
    model.write_bytes(b"GGUF base")
    adapter = tmp_path / "adapter.gguf"
    adapter.write_bytes(b"GGUF adapter")
    return {"record": record, "model": model, "adapter": adapter}


def _argv(record: Path) -> list[str]:
    return next(json.loads(line)["argv"] for line in record.read_text().splitlines() if '"argv"' in line)


def test_the_adapter_reaches_the_server_as_lora_path(files) -> None:
    server = LocalServer(files["model"], command=FAKE_COMMAND, startup_timeout=20, lora=files["adapter"])
    try:
        server.start()
        argv = _argv(files["record"])
        assert argv[argv.index("--lora_path") + 1] == str(files["adapter"])
        assert server.lora_path == files["adapter"]
    finally:
        server.stop()


def test_without_an_adapter_no_lora_flag_is_passed(files) -> None:
    server = LocalServer(files["model"], command=FAKE_COMMAND, startup_timeout=20)
    try:
        server.start()
        assert "--lora_path" not in _argv(files["record"])
    finally:
        server.stop()


@pytest.mark.parametrize("content, error", [(None, FileNotFoundError), (b"PK not gguf", ModelFileError)])
def test_a_missing_or_foreign_adapter_is_refused_before_launch(files, tmp_path, content, error) -> None:
    adapter = tmp_path / "bad-adapter.gguf"
    if content is not None:
        adapter.write_bytes(content)
    server = LocalServer(files["model"], command=FAKE_COMMAND, startup_timeout=20, lora=adapter)
    with pytest.raises(error, match="bad-adapter.gguf"):
        server.start()
    assert not server.running and not files["record"].exists()  # nothing was launched


def _spec(path: Path, name: str = "promptmii-test") -> AdapterSpec:
    data = path.read_bytes()
    return AdapterSpec(
        name=name,
        base=registry.DEFAULT_MODEL,
        filename=path.name,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        description="a test adapter",
    )


def test_registry_adapters_are_verified_by_size_and_sha256(files, tmp_path, monkeypatch) -> None:
    spec = _spec(files["adapter"])
    monkeypatch.setitem(registry.ADAPTERS, spec.name, spec)
    assert resolve_adapter(spec.name, tmp_path) == files["adapter"]
    base = tmp_path / "models" / "base.gguf"
    monkeypatch.setattr(adapters_module, "resolve_model", lambda name, auto_pull=False: base)
    assert resolve_generator(spec.name, directory=tmp_path) == (base, files["adapter"])
    assert resolve_generator(registry.DEFAULT_MODEL) == (base, None)

    files["adapter"].write_bytes(b"GGUF adapteR")  # same size, other bytes
    with pytest.raises(CorruptModelError, match="corrupt"):
        resolve_adapter(spec.name, tmp_path)
    files["adapter"].unlink()
    with pytest.raises(FileNotFoundError, match="reinstall"):
        resolve_adapter(spec.name, tmp_path)
    with pytest.raises(KeyError, match="unknown trained generator"):
        resolve_adapter("no-such-adapter", tmp_path)
    with pytest.raises(KeyError, match="unknown generator"):
        resolve_generator("no-such-generator")


def test_adapter_names_must_not_shadow_base_models() -> None:
    with pytest.raises(ValueError, match="name of a base model"):
        registry._check_adapters({registry.DEFAULT_MODEL: AdapterSpec(registry.DEFAULT_MODEL, registry.DEFAULT_MODEL,
                                                                      "a.gguf", 1, "0" * 64, "x")})
    with pytest.raises(ValueError, match="unknown base model"):
        registry._check_adapters({"x": AdapterSpec("x", "nope", "a.gguf", 1, "0" * 64, "x")})


def test_a_trained_generator_name_serves_its_base_with_its_verified_adapter(files, tmp_path, monkeypatch) -> None:
    from dspy_promptmii import routes
    from dspy_promptmii.local import server as server_module

    spec = _spec(files["adapter"], name="promptmii-test")
    monkeypatch.setitem(registry.ADAPTERS, spec.name, spec)
    monkeypatch.setattr(adapters_module, "adapters_dir", lambda: tmp_path)
    pulled: list[str] = []
    monkeypatch.setattr(server_module, "resolve_model",
                        lambda name, auto_pull=False: pulled.append(name) or files["model"])
    assert routes.is_local(spec.name)
    server = LocalServer(spec.name, command=FAKE_COMMAND, startup_timeout=20)
    assert server.alias == spec.name
    try:
        server.start()
        argv = _argv(files["record"])
        assert pulled == [registry.DEFAULT_MODEL]  # the base model, by its registry name
        assert argv[argv.index("--model") + 1] == str(files["model"])
        assert argv[argv.index("--lora_path") + 1] == str(files["adapter"])
        assert argv[argv.index("--model_alias") + 1] == spec.name
        assert routes._model_file(server) == {"sha256": registry.REGISTRY[registry.DEFAULT_MODEL].sha256,
                                              "adapter_sha256": spec.sha256}
    finally:
        server.stop()
    with pytest.raises(ValueError, match="trained generator"):
        LocalServer(spec.name, lora=files["adapter"])

    files["adapter"].write_bytes(b"GGUF adapteR")  # corrupt: refused before anything is launched or pulled
    pulled.clear()
    files["record"].unlink()
    with pytest.raises(CorruptModelError, match="corrupt"):
        LocalServer(spec.name, command=FAKE_COMMAND, startup_timeout=20).start()
    assert pulled == [] and not files["record"].exists()


def test_a_base_model_with_an_extra_adapter_has_its_own_cache_scope(files) -> None:
    from dspy_promptmii import routes

    plain = LocalServer(registry.DEFAULT_MODEL)
    adapted = LocalServer(registry.DEFAULT_MODEL, lora=files["adapter"])
    assert routes._model_file(plain) == {"sha256": registry.REGISTRY[registry.DEFAULT_MODEL].sha256}
    assert routes._model_file(adapted)["adapter"]["bytes"] == len(b"GGUF adapter")
    assert routes._model_file(plain) != routes._model_file(adapted)


def test_the_shipped_trained_generator_is_packaged_verified_and_documented() -> None:
    """The default trained generator's adapter is in the package (pyproject's package data
    takes ``data/adapters/*.gguf``), matches its registry entry by size and sha256, and has
    its provenance file beside it naming the same bytes and base model."""
    spec = registry.ADAPTERS[registry.DEFAULT_GENERATOR]
    assert spec.base == registry.DEFAULT_MODEL
    path = resolve_adapter(spec.name)  # raises unless size and sha256 match
    assert path.parent == registry.adapters_dir() and path.read_bytes()[:4] == b"GGUF"
    source = json.loads((path.parent / spec.source).read_text())
    assert source["adapter"]["sha256"] == spec.sha256 and source["adapter"]["bytes"] == spec.size
    assert source["adapter"]["file"] == spec.filename
    assert source["base"]["sha256"] == registry.REGISTRY[spec.base].sha256
    assert source["commands"]["sft"].startswith("python -m training.sft")
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"data/adapters/*.gguf"' in pyproject and '"data/adapters/*.json"' in pyproject
