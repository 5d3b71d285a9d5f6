"""The CPU route end to end on fakes and a tiny model: rollouts (fake generator and follower)
-> select -> sft (a tiny random Qwen2 made here) -> export -> serve (LocalServer passes the
exported adapter to a stand-in llama.cpp server) -> round-2 rollouts name the adapter by
sha256. The export runs a stand-in converter; the real llama.cpp converter (from the
llama-cpp-python 0.3.36 sdist, downloaded once into the cache) runs when it can be had,
else that test is skipped with the reason."""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import pytest

try:
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the environment
    pytest.skip(f"needs the train extra ({error.name} missing): pip install -e '.[train]' (torch==2.13.0 pinned)",
                allow_module_level=True)
pytest.importorskip("gguf", reason="needs the train extra (gguf): pip install -e '.[train]'")

from support.rollout_fakes import Fakes, make_datasets  # noqa: E402
from support.tiny_lm import make_tiny_model  # noqa: E402

from dspy_promptmii.local.server import LocalServer  # noqa: E402
from training import export, rollouts, select, sft  # noqa: E402
from training.export import ExportError, inspect_lora  # noqa: E402
from training.runlog import JsonlLog  # noqa: E402

SUPPORT = Path(__file__).resolve().parent / "support"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One round on fakes: rollouts, selection and SFT of a tiny model."""
    root = tmp_path_factory.mktemp("round1")
    datasets = make_datasets(root / "datasets")
    fakes = Fakes()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rollouts, "open_endpoints", fakes.open_endpoints)
        assert rollouts.main(["--datasets", str(datasets), "--out", str(root / "rollouts"), "--no-progress",
                              "--samples", "3", "--valid-tasks", "weather_west"]) == 0
    assert select.main(["--rollouts", str(root / "rollouts"), "--out", str(root / "select")]) == 0
    tiny = make_tiny_model(root / "tiny")
    assert sft.main(["--pairs", str(root / "select" / "pairs.jsonl"), "--out", str(root / "sft"), "--base", str(tiny),
                     "--epochs", "1", "--batch-size", "2", "--valid-fraction", "0", "--no-progress",
                     "--max-seq-tokens", "4096"]) == 0
    return {"root": root, "datasets": datasets, "sft": root / "sft"}


def test_selected_pairs_train_an_adapter(trained) -> None:
    pairs = [json.loads(line) for line in (trained["root"] / "select" / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all(p["source"] == "sample" for p in pairs)  # the fake's good instruction beat naive
    records = {r["meta_prompt"] for r in JsonlLog(trained["root"] / "rollouts" / "rollouts.jsonl").read()}
    assert {p["prompt"] for p in pairs} <= records
    report = json.loads((trained["sft"] / "report.json").read_text())
    assert report["train_pairs"] == len(pairs) and report["step"] == report["total_steps"]


def test_export_serve_and_roll_out_the_next_round(trained, tmp_path, monkeypatch) -> None:
    out = tmp_path / "dist" / "round1.gguf"
    assert export.main(["--run", str(trained["sft"]), "--out", str(out), "--round", "1",
                        "--converter", str(SUPPORT / "fake_lora_converter.py")]) == 0
    source = json.loads(out.with_name("round1.source.json").read_text())
    assert source["data"]["rollouts"][0]["generator"]["adapter"] is None  # round 1 sampled the base
    assert source["data"]["selections"][0]["kept"] == source["training"]["train_pairs"]

    # Served: the adapter reaches llama.cpp's server as --lora_path.
    record = tmp_path / "server.jsonl"
    monkeypatch.setenv("FAKE_LLAMA_RECORD", str(record))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    base = tmp_path / "base.gguf"
    base.write_bytes(b"GGUF base")
    server = LocalServer(base, lora=out, command=[sys.executable, str(SUPPORT / "fake_llama_server.py")],
                         startup_timeout=20)
    try:
        server.start()
    finally:
        server.stop()
    argv = json.loads(record.read_text().splitlines()[0])["argv"]
    assert argv[argv.index("--lora_path") + 1] == str(out)

    # Round 2 samples from the round-1 generator: its records name the adapter by sha256.
    fakes = Fakes()
    monkeypatch.setattr(rollouts, "open_endpoints", fakes.open_endpoints)
    round2 = tmp_path / "round2"
    assert rollouts.main(["--datasets", str(trained["datasets"]), "--out", str(round2), "--no-progress",
                          "--samples", "3", "--valid-tasks", "weather_west", "--seed", "1", "--lora", str(out),
                          "--limit", "1"]) == 0
    [record2] = JsonlLog(round2 / "rollouts.jsonl").read()
    assert record2["generator"]["adapter"] == "round1.gguf"
    assert record2["generator"]["adapter_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert fakes.opened[0]["generator"].lora == str(out)


def test_the_real_llama_cpp_converter_turns_the_adapter_into_a_gguf_lora(trained, tmp_path) -> None:
    try:
        export.ensure_converter()
    except ExportError as error:
        pytest.skip(f"llama.cpp's converter is not at hand (offline?): {str(error).splitlines()[0]}")
    out = tmp_path / "real.gguf"
    assert export.main(["--run", str(trained["sft"]), "--out", str(out), "--outtype", "f16"]) == 0
    info = inspect_lora(out)
    adapter = json.loads((trained["sft"] / "adapter" / "adapter_config.json").read_text())
    layers = json.loads((trained["sft"] / "base_config" / "config.json").read_text())["num_hidden_layers"]
    # One lora_a and one lora_b per adapted projection per layer; alpha carried over.
    assert info["tensors"] == 2 * layers * len(adapter["target_modules"])
    assert info["lora_alpha"] == adapter["lora_alpha"] and info["architecture"] == "qwen2"
