"""``python -m training.export``: the SFT adapter as a GGUF LoRA that llama.cpp serves
(``LocalServer(base, lora=ADAPTER.gguf)``, ``--lora_path``), with its provenance.

The conversion is llama.cpp's own ``convert_lora_to_gguf.py``, taken from the
llama-cpp-python 0.3.36 source distribution (the llama.cpp that the embedded server runs):
``pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36`` once (76 MB, about a
minute), checked against :data:`SDIST_SHA256`, and only the converter with what it imports
beside it (``vendor/llama.cpp/convert_lora_to_gguf.py``, ``convert_hf_to_gguf.py``,
``conversion/``, ``gguf-py/``) extracted into a cache folder
(``$PROMPTMII_HOME/tools/llama.cpp-0.3.36``). The converter needs only the base model's
``config.json`` (``training.sft`` writes ``base_config/``), not its weights.

Writes ``--out`` (``ADAPTER.gguf``, checked: a GGUF of type adapter/lora) and beside it
``ADAPTER.source.json``: what the adapter was trained on (pairs, selection report, rollout
folders with their generator, follower and protocol), rounds, seed, commands, date,
machine, versions, and the sha256 of every file in the chain. It prints the registry
entry (:class:`~dspy_promptmii.local.registry.AdapterSpec`) that would ship it.

Example::

    python -m training.export --run runs/rft/round1/sft --out runs/rft/round1/promptmii-qwen2.5-0.5b-r1.gguf --round 1
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dspy_promptmii.console import write_stdout
from dspy_promptmii.files import check_writable, read_json, write_json
from dspy_promptmii.local.lifetime import OwnedFolder, death_signal, sweep
from dspy_promptmii.local.pull import GGUF_MAGIC, sha256_file
from dspy_promptmii.local.registry import home

logger = logging.getLogger("training.export")

__all__ = [
    "LLAMA_CPP_PYTHON_VERSION",
    "SDIST_SHA256",
    "OUTTYPES",
    "ExportError",
    "converter_cache",
    "ensure_converter",
    "extract_converter",
    "check_inputs",
    "convert",
    "inspect_lora",
    "provenance",
    "registry_entry",
    "main",
]

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
#: sha256 of the sdist on PyPI (checked 2026-12-05).
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
#: What the converter needs, relative to the sdist's vendor/llama.cpp.
CONVERTER_MEMBERS = ("convert_lora_to_gguf.py", "convert_hf_to_gguf.py", "conversion/", "gguf-py/")
CONVERTER = "convert_lora_to_gguf.py"
OUTTYPES = ("f16", "q8_0", "bf16", "f32")
_SCRATCH = ".export-"


class ExportError(RuntimeError):
    """The converter could not be obtained or run, or its output is not a GGUF LoRA."""


def converter_cache() -> Path:
    """Where the extracted converter lives: ``$PROMPTMII_HOME/tools/llama.cpp-<version>``."""
    return home() / "tools" / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"


def extract_converter(sdist: Path, target: Path, expected_sha256: str = SDIST_SHA256) -> Path:
    """Check ``sdist`` against ``expected_sha256`` and extract the converter's files into
    ``target`` (replaced atomically); returns the converter script's path.

    Raises:
        ExportError: another sha256, a member missing, or a member that would land outside
            the target (a link, an absolute path, ``..``).
    """
    digest = sha256_file(sdist)
    if digest != expected_sha256:
        raise ExportError(f"{sdist} has sha256 {digest}, not llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}'s "
                          f"{expected_sha256}: download it again")
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep(target.parent, _SCRATCH)
    with OwnedFolder(target.parent, _SCRATCH) as scratch, tarfile.open(sdist, "r:gz") as archive:
        found = {m: False for m in CONVERTER_MEMBERS}
        tree = scratch.path / "llama.cpp"
        for member in archive.getmembers():
            if not member.name.startswith(prefix):
                continue
            relative = member.name[len(prefix):]
            wanted = next((m for m in CONVERTER_MEMBERS if relative == m or (m.endswith("/") and
                                                                               relative.startswith(m))), None)
            if wanted is None or not relative:
                continue
            if member.issym() or member.islnk() or ".." in Path(relative).parts or Path(relative).is_absolute():
                raise ExportError(f"{sdist}: refusing the member {member.name!r} (a link or a path outside)")
            found[wanted] = True
            destination = tree / relative
            if member.isdir():
                destination.mkdir(parents=True, exist_ok=True)
            elif member.isfile():
                destination.parent.mkdir(parents=True, exist_ok=True)
                with archive.extractfile(member) as source, destination.open("wb") as sink:
                    shutil.copyfileobj(source, sink)
        missing = [m for m, seen in found.items() if not seen]
        if missing:
            raise ExportError(f"{sdist} lacks vendor/llama.cpp/{', '.join(missing)}")
        (tree / ".sdist_sha256").write_text(digest + "\n")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tree, target)
    return target / CONVERTER


def ensure_converter(*, cache: Path | None = None, sdist: Path | None = None, download: bool = True) -> Path:
    """The converter script, extracted once into ``cache`` (default :func:`converter_cache`)
    from ``sdist`` or from a ``pip download`` of the sdist.

    Raises:
        ExportError: not cached and no ``sdist`` given with ``download`` off, or pip failed
            (its last lines quoted), or the sdist does not check out.
    """
    cache = cache or converter_cache()
    script = cache / CONVERTER
    marker = cache / ".sdist_sha256"
    if script.is_file() and marker.is_file() and marker.read_text().strip() == SDIST_SHA256:
        return script
    if sdist is not None:
        return extract_converter(sdist, cache)
    if not download:
        raise ExportError(f"llama.cpp's converter is not in {cache}: pass --sdist {SDIST_NAME} or allow the download")
    cache.parent.mkdir(parents=True, exist_ok=True)
    sweep(cache.parent, _SCRATCH)
    with OwnedFolder(cache.parent, _SCRATCH) as scratch:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--disable-pip-version-check", "-d", str(scratch.path),
                   f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"]
        logger.info("downloading the llama-cpp-python %s source (76 MB) for its LoRA converter",
                    LLAMA_CPP_PYTHON_VERSION)
        result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                preexec_fn=death_signal())
        if result.returncode != 0:
            tail = "\n".join(result.stderr.strip().splitlines()[-10:])
            raise ExportError(f"pip download of llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} failed "
                              f"(exit {result.returncode}):\n{tail}")
        archive = scratch.path / SDIST_NAME
        if not archive.is_file():
            raise ExportError(f"pip download left no {SDIST_NAME} in {scratch.path}")
        return extract_converter(archive, cache)


def _json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; ValueError naming the file (with line and column) otherwise."""
    value = read_json(path)
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def check_inputs(adapter: Path, base_config: Path, out: Path, outtype: str) -> dict[str, Any]:
    """Check everything before anything is downloaded or run; returns the adapter's config.

    Raises:
        ValueError: naming the problem (no PEFT adapter, a base config without
            ``architectures``, an output that is not a writable ``.gguf`` path, an unknown
            ``outtype``, an adapter that is not LoRA or trains embeddings).
    """
    if outtype not in OUTTYPES:
        raise ValueError(f"--outtype must be one of {OUTTYPES}, got {outtype!r}")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (adapter / name).is_file():
            raise ValueError(f"{adapter} has no {name}: pass the adapter/ folder of a training.sft run")
    config = _json_object(adapter / "adapter_config.json")
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise ValueError(f"{adapter} is a {config.get('peft_type')} adapter; llama.cpp takes LoRA adapters")
    if config.get("modules_to_save"):
        raise ValueError(f"{adapter} also trains {config['modules_to_save']}; llama.cpp's LoRA takes projections only")
    file = base_config / "config.json"
    if not file.is_file():
        raise ValueError(f"no config.json in {base_config}: pass the base_config/ folder of a training.sft run")
    base = _json_object(file)
    if not base.get("architectures"):
        raise ValueError(f"{file} names no architectures; the converter needs them (e.g. Qwen2ForCausalLM)")
    if out.suffix != ".gguf":
        raise ValueError(f"--out {out} must end in .gguf")
    check_writable(out)
    return config


def convert(adapter: Path, base_config: Path, out: Path, outtype: str, converter: Path,
            python: str = sys.executable) -> list[str]:
    """Run the converter into ``<out>.partial`` and move the result to ``out`` once it starts
    with the GGUF magic; returns the command.

    Raises:
        ExportError: the converter failed (its last lines quoted) or wrote no GGUF.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    partial.unlink(missing_ok=True)
    command = [python, str(converter), "--base", str(base_config.resolve()), "--outtype", outtype,
               "--outfile", str(partial.resolve()), str(adapter.resolve())]
    logger.info("running %s", " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True, cwd=converter.parent, stdin=subprocess.DEVNULL,
                            preexec_fn=death_signal())
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:])
        raise ExportError(f"the LoRA converter failed (exit {result.returncode}):\n{tail}")
    if not partial.is_file():
        raise ExportError(f"the LoRA converter wrote nothing at {partial}")
    with partial.open("rb") as handle:
        if handle.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
            partial.unlink(missing_ok=True)
            raise ExportError("the LoRA converter's output is not a GGUF file")
    os.replace(partial, out)
    return command


def inspect_lora(path: Path) -> dict[str, Any]:
    """What a GGUF LoRA holds (``general.type``, ``adapter.type``, ``adapter.lora.alpha``,
    tensor count), read with the ``gguf`` package.

    Raises:
        ExportError: it is not a LoRA adapter GGUF.
    """
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def value(key: str) -> Any:
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    info = {
        "general.type": value("general.type"),
        "adapter.type": value("adapter.type"),
        "lora_alpha": value("adapter.lora.alpha"),
        "tensors": len(reader.tensors),
        "architecture": value("general.architecture"),
    }
    if info["general.type"] != "adapter" or info["adapter.type"] != "lora" or not info["tensors"]:
        raise ExportError(f"{path} is not a LoRA adapter GGUF: {info}")
    return info


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def provenance(run: Path | None, adapter: Path, out: Path, *, outtype: str, round_: int | None,
               command: str, lora: dict[str, Any], notes: str | None) -> dict[str, Any]:
    """The SOURCE record of an exported adapter: the chain rollouts -> selection -> SFT ->
    export, each with its sha256s and settings as far as the files are found."""
    report = _read_json(run / "report.json") if run else None
    data: dict[str, Any] = {"pairs": [], "selections": [], "rollouts": []}
    for pairs_path in (report or {}).get("pairs_paths", []):
        pairs = Path(pairs_path)
        entry = {"path": str(pairs), "sha256": sha256_file(pairs) if pairs.is_file() else None}
        data["pairs"].append(entry)
        selection = _read_json(pairs.parent / "selection.json")
        if selection:
            data["selections"].append({key: selection.get(key) for key in (
                "config", "contexts", "kept", "kept_fraction", "sample_targets", "naive_targets", "mean_advantage",
                "any_sample_beat_naive", "command")})
            for source in selection.get("inputs", []):
                manifest = _read_json(Path(source["path"]) / "manifest.json")
                settings = (manifest or {}).get("settings", {})
                data["rollouts"].append({
                    "path": source["path"], "contexts": source.get("contexts"),
                    "generator": settings.get("generator"), "follower": settings.get("follower"),
                    "protocol": settings.get("protocol"), "config": settings.get("config"),
                    "plan": settings.get("plan"), "splits_sha256": (settings.get("data") or {}).get("splits_sha256"),
                })
    settings = (report or {}).get("settings", {})
    return {
        "adapter": {"file": out.name, "bytes": out.stat().st_size, "sha256": sha256_file(out), "outtype": outtype,
                    **lora},
        "peft_adapter": {"sha256": sha256_file(adapter / "adapter_model.safetensors"),
                         "config": _read_json(adapter / "adapter_config.json")},
        "base": settings.get("base"),
        "round": round_,
        "training": {key: (report or {}).get(key) for key in (
            "step", "total_steps", "train_pairs", "valid_pairs", "valid_tasks", "valid_loss_before",
            "valid_loss_after", "train_loss_last", "seconds_per_step", "device", "versions", "machine", "finished")}
        | {"config": settings.get("config"), "init_adapter": settings.get("init_adapter")},
        "data": data,
        "commands": {"sft": (report or {}).get("command"), "export": command,
                     "selections": [s.get("command") for s in data["selections"]]},
        "converter": {"llama_cpp_python": LLAMA_CPP_PYTHON_VERSION, "sdist_sha256": SDIST_SHA256,
                      "script": CONVERTER},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "python": platform.python_version()},
        "notes": notes,
    }


def registry_entry(name: str, base: str, out: Path, source: Path) -> str:
    """The ``AdapterSpec(...)`` that ships the adapter (for ``dspy_promptmii/local/registry.py``)."""
    return (f'AdapterSpec(name="{name}", base="{base}", filename="{out.name}", size={out.stat().st_size}, '
            f'sha256="{sha256_file(out)}", description="...", source="{source.name}")')


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, default=None,
                   help="a training.sft --out folder (its adapter/, base_config/ and report.json)")
    p.add_argument("--adapter", type=Path, default=None, help="a PEFT adapter folder (default RUN/adapter)")
    p.add_argument("--base-config", type=Path, default=None, help="the base model's config folder "
                   "(default RUN/base_config)")
    p.add_argument("--out", type=Path, required=True, help="the GGUF LoRA to write (ADAPTER.gguf)")
    p.add_argument("--outtype", choices=OUTTYPES, default="f16",
                   help="f16 (default; rank 16: about 17.6 MB), q8_0 (about 13.9 MB), bf16, f32")
    p.add_argument("--round", type=int, default=None, help="which round of rollouts -> select -> sft this is")
    p.add_argument("--notes", default=None, help="free text for the provenance")
    p.add_argument("--name", default="promptmii-qwen2.5-0.5b", help="registry name in the printed entry")
    p.add_argument("--sdist", type=Path, default=None, help=f"a local {SDIST_NAME} (else downloaded once)")
    p.add_argument("--no-download", action="store_true", help="never download the sdist")
    p.add_argument("--converter", type=Path, default=None, help="a convert_lora_to_gguf.py to run instead")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.run is None and (args.adapter is None or args.base_config is None):
        raise SystemExit("error: pass --run SFT_FOLDER, or --adapter DIR and --base-config DIR")
    adapter = args.adapter or args.run / "adapter"
    base_config = args.base_config or args.run / "base_config"
    try:
        check_inputs(adapter, base_config, args.out, args.outtype)
        if args.converter is not None and not args.converter.is_file():
            raise ValueError(f"--converter {args.converter} is not a file")
        if args.sdist is not None and not args.sdist.is_file():
            raise ValueError(f"--sdist {args.sdist} is not a file")
        if args.run is not None and not (args.run / "report.json").is_file():
            raise ValueError(f"{args.run} has no report.json: the SFT run has not finished")
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    try:
        converter = args.converter or ensure_converter(sdist=args.sdist, download=not args.no_download)
        command = convert(adapter, base_config, args.out, args.outtype, converter)
        lora = inspect_lora(args.out)
    except ExportError as error:
        raise SystemExit(f"error: {error}") from None
    logger.info("converted with %s", " ".join(command))
    this = "python -m training.export " + " ".join(sys.argv[1:] if argv is None else argv)
    record = provenance(args.run, adapter, args.out, outtype=args.outtype, round_=args.round, command=this,
                        lora=lora, notes=args.notes)
    source = args.out.with_name(args.out.stem + ".source.json")
    write_json(record, source)
    base = (record.get("base") or {}).get("file") or "?"
    from dspy_promptmii.local.registry import REGISTRY

    base_name = next((name for name, spec in REGISTRY.items() if spec.filename == base), base)
    summary = json.dumps({"adapter": str(args.out), "source": str(source), "bytes": record["adapter"]["bytes"],
                          "sha256": record["adapter"]["sha256"], "tensors": lora["tensors"]})
    return 0 if write_stdout(summary + "\n" + registry_entry(args.name, base_name, args.out, source) + "\n") else 1


if __name__ == "__main__":
    sys.exit(main())
