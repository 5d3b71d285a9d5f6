"""``python -m training.export``: every input checked before the converter is fetched or
run; the converter's command line, its failures and a non-GGUF output; the provenance chain
(rollouts -> selection -> SFT -> export) with its sha256s; and the extraction of the
converter from the llama-cpp-python sdist (a small archive of the same layout made here).
A stand-in converter (tests/support/fake_lora_converter.py) writes a real, small GGUF LoRA;
the real converter runs in tests/test_training_rft_pipeline.py when the sdist is at hand."""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path

import pytest

pytest.importorskip("gguf", reason="needs the train extra (gguf): pip install -e '.[train]'")

from training import export  # noqa: E402
from training.export import ExportError, ensure_converter, extract_converter  # noqa: E402

FAKE_CONVERTER = Path(__file__).resolve().parent / "support" / "fake_lora_converter.py"


def make_run(root: Path, *, report: bool = True) -> Path:
    """An SFT run folder as training.sft leaves it, with the select and rollout folders it came from."""
    rollouts = root / "rollouts"
    rollouts.mkdir(parents=True)
    settings = {"config": {"split": "train", "seed": 1}, "generator": {"model": "g", "base_sha256": "b" * 64},
                "follower": {"model": "f"}, "protocol": {"constrained": "json_object"},
                "plan": {"contexts": 3}, "data": {"splits_sha256": "c" * 64}}
    (rollouts / "manifest.json").write_text(json.dumps({"settings": settings}))
    selection = root / "select"
    selection.mkdir()
    (selection / "pairs.jsonl").write_text('{"prompt": "p", "target": "t", "task": "x"}\n')
    (selection / "selection.json").write_text(json.dumps({
        "config": {"margin": 0.05}, "contexts": 3, "kept": 1, "kept_fraction": 0.333, "sample_targets": 1,
        "naive_targets": 0, "mean_advantage": 0.1, "any_sample_beat_naive": 0.6, "command": "python -m training.select",
        "inputs": [{"path": str(rollouts), "contexts": 3}]}))
    run = root / "sft"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}))
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    (run / "base_config").mkdir()
    (run / "base_config" / "config.json").write_text(json.dumps(
        {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}))
    if report:
        (run / "report.json").write_text(json.dumps({
            "step": 4, "total_steps": 4, "train_pairs": 1, "command": "python -m training.sft ...",
            "pairs_paths": [str(selection / "pairs.jsonl")],
            "settings": {"base": {"kind": "gguf", "file": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
                                  "sha256": "d" * 64}, "config": {"seed": 0}}}))
    return run


@pytest.fixture
def record(tmp_path: Path, monkeypatch) -> Path:
    path = tmp_path / "converter-record.jsonl"
    monkeypatch.setenv("FAKE_CONVERTER_RECORD", str(path))
    monkeypatch.delenv("FAKE_CONVERTER_MODE", raising=False)
    return path


def _export(run: Path, out: Path, *extra: str) -> int:
    return export.main(["--run", str(run), "--out", str(out), "--converter", str(FAKE_CONVERTER), *extra])


def test_export_runs_the_converter_and_writes_the_provenance(tmp_path, record, capsys) -> None:
    run = make_run(tmp_path)
    out = tmp_path / "dist" / "promptmii-test.gguf"
    assert _export(run, out, "--outtype", "q8_0", "--round", "2", "--notes", "a note") == 0
    [call] = [json.loads(line) for line in record.read_text().splitlines()]
    assert call["argv"] == ["--base", str((run / "base_config").resolve()), "--outtype", "q8_0", "--outfile",
                            str(out.resolve()) + ".partial", str((run / "adapter").resolve())]
    assert call["cwd"] == str(FAKE_CONVERTER.parent)
    assert out.read_bytes()[:4] == b"GGUF" and not out.with_name(out.name + ".partial").exists()
    source = json.loads((tmp_path / "dist" / "promptmii-test.source.json").read_text())
    assert source["adapter"]["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert source["adapter"]["adapter.type"] == "lora" and source["adapter"]["lora_alpha"] == 4.0
    assert source["adapter"]["outtype"] == "q8_0" and source["round"] == 2 and source["notes"] == "a note"
    assert source["peft_adapter"]["sha256"] == hashlib.sha256(b"weights").hexdigest()
    assert source["base"]["sha256"] == "d" * 64
    assert source["data"]["pairs"][0]["sha256"] == hashlib.sha256(
        (tmp_path / "select" / "pairs.jsonl").read_bytes()).hexdigest()
    assert source["data"]["selections"][0]["kept"] == 1
    assert source["data"]["rollouts"][0]["generator"]["base_sha256"] == "b" * 64
    assert source["commands"]["sft"] == "python -m training.sft ..." and "--round 2" in source["commands"]["export"]
    assert source["converter"]["llama_cpp_python"] == "0.3.36" and source["machine"]["cpus"]
    printed = capsys.readouterr().out
    assert 'AdapterSpec(name="promptmii-qwen2.5-0.5b", base="qwen2.5-coder-0.5b-instruct"' in printed


def _without(path: Path) -> None:
    path.unlink()


@pytest.mark.parametrize(
    "damage, extra, problem",
    [
        (lambda run: _without(run / "adapter" / "adapter_config.json"), [], "has no adapter_config.json"),
        (lambda run: (run / "adapter" / "adapter_config.json").write_text('{"peft_type": "IA3"}'), [],
         "llama.cpp takes LoRA adapters"),
        (lambda run: (run / "adapter" / "adapter_config.json").write_text(
            '{"peft_type": "LORA", "modules_to_save": ["lm_head"]}'), [], "projections only"),
        (lambda run: (run / "base_config" / "config.json").write_text("{}"), [], "names no architectures"),
        (lambda run: _without(run / "base_config" / "config.json"), [], "no config.json"),
        (lambda run: _without(run / "report.json"), [], "has not finished"),
        (lambda run: None, ["--converter", "/nowhere/convert.py"], "is not a file"),
        (lambda run: None, ["--sdist", "/nowhere/sdist.tar.gz"], "is not a file"),
    ],
)
def test_inputs_are_checked_before_anything_runs(tmp_path, record, damage, extra, problem) -> None:
    run = make_run(tmp_path)
    damage(run)
    with pytest.raises(SystemExit, match=problem):
        _export(run, tmp_path / "a.gguf", *extra)
    assert not record.exists()


def test_output_path_and_outtype_are_checked(tmp_path, record) -> None:
    run = make_run(tmp_path)
    with pytest.raises(SystemExit, match=r"must end in \.gguf"):
        _export(run, tmp_path / "adapter.bin")
    (tmp_path / "taken.gguf").mkdir()
    with pytest.raises(SystemExit, match="is a folder"):
        _export(run, tmp_path / "taken.gguf")
    with pytest.raises(SystemExit):
        _export(run, tmp_path / "a.gguf", "--outtype", "q4_0")  # argparse: not a choice
    with pytest.raises(SystemExit, match="pass --run"):
        export.main(["--out", str(tmp_path / "a.gguf")])
    assert not record.exists()


@pytest.mark.parametrize("mode, problem", [("fail", "is not supported"), ("garbage", "not a GGUF file")])
def test_converter_failures_are_reported_and_leave_nothing(tmp_path, record, monkeypatch, mode, problem) -> None:
    monkeypatch.setenv("FAKE_CONVERTER_MODE", mode)
    out = tmp_path / "a.gguf"
    with pytest.raises(SystemExit, match=problem):
        _export(make_run(tmp_path), out)
    assert not out.exists() and not out.with_name("a.gguf.partial").exists()


# --- the converter out of the sdist ----------------------------------------------------------------


def _sdist(path: Path, *, link: bool = False, drop: str | None = None) -> Path:
    prefix = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
    files = {
        "convert_lora_to_gguf.py": b"print('converter')\n",
        "convert_hf_to_gguf.py": b"",
        "conversion/__init__.py": b"",
        "gguf-py/gguf/__init__.py": b"",
        "README.md": b"not needed",
    }
    with tarfile.open(path, "w:gz") as archive:
        for name, data in files.items():
            if drop and name.startswith(drop):
                continue
            info = tarfile.TarInfo(prefix + name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo(prefix + "conversion/evil.py")
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            archive.addfile(info)
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_converter_is_extracted_from_the_sdist(tmp_path) -> None:
    sdist = _sdist(tmp_path / "sdist.tar.gz")
    target = tmp_path / "cache" / "llama.cpp-0.3.36"
    script = extract_converter(sdist, target, expected_sha256=_sha(sdist))
    assert script == target / "convert_lora_to_gguf.py" and script.read_text() == "print('converter')\n"
    assert (target / "conversion" / "__init__.py").is_file() and (target / "gguf-py" / "gguf" / "__init__.py").is_file()
    assert not (target / "README.md").exists()
    assert not list(target.parent.glob(".export-*"))  # no scratch left


def test_a_foreign_or_broken_sdist_is_refused(tmp_path) -> None:
    sdist = _sdist(tmp_path / "sdist.tar.gz")
    with pytest.raises(ExportError, match="sha256"):
        extract_converter(sdist, tmp_path / "cache" / "x")  # not the pinned llama-cpp-python 0.3.36
    evil = _sdist(tmp_path / "evil.tar.gz", link=True)
    with pytest.raises(ExportError, match="refusing the member"):
        extract_converter(evil, tmp_path / "cache" / "x", expected_sha256=_sha(evil))
    partial = _sdist(tmp_path / "partial.tar.gz", drop="gguf-py")
    with pytest.raises(ExportError, match="lacks vendor/llama.cpp/gguf-py/"):
        extract_converter(partial, tmp_path / "cache" / "x", expected_sha256=_sha(partial))
    assert not (tmp_path / "cache" / "x").exists()


def test_without_a_cached_converter_and_no_download_the_error_says_what_to_pass(tmp_path) -> None:
    with pytest.raises(ExportError, match="pass --sdist"):
        ensure_converter(cache=tmp_path / "empty", download=False)


def test_a_cached_converter_is_used_without_the_sdist(tmp_path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "convert_lora_to_gguf.py").write_text("")
    (cache / ".sdist_sha256").write_text(export.SDIST_SHA256 + "\n")
    monkeypatch.setattr(export.subprocess, "run", lambda *a, **k: pytest.fail("pip was run"))
    assert ensure_converter(cache=cache) == cache / "convert_lora_to_gguf.py"


def test_the_fake_converter_takes_the_real_ones_arguments() -> None:
    """The stand-in must accept exactly what convert() passes (its argparse mirrors the real one)."""
    import subprocess

    result = subprocess.run([sys.executable, str(FAKE_CONVERTER), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--outtype" in result.stdout and "lora_path" in result.stdout


@pytest.mark.parametrize(
    "name, text, problem",
    [
        ("adapter/adapter_config.json", '{"peft', r"adapter_config\.json:1:\d+: not valid JSON"),
        ("adapter/adapter_config.json", "[1]", r"adapter_config\.json: expected a JSON object, got list"),
        ("base_config/config.json", "{", r"config\.json:1:2: not valid JSON"),
        ("base_config/config.json", '"x"', r"config\.json: expected a JSON object, got str"),
    ],
)
def test_a_broken_json_input_is_named_in_a_one_line_error(tmp_path, record, name, text, problem) -> None:
    run = make_run(tmp_path)
    (run / name).write_text(text)
    with pytest.raises(SystemExit, match=problem):
        _export(run, tmp_path / "a.gguf")
    assert not record.exists()
