"""``python -m training.merge``: the base weights with a trained LoRA adapter merged in, saved
as a Hugging Face model folder: the starting point of a GPU run (OpenRLHF GRPO's actor,
``POLICY=<folder> training/train_grpo.sh smoke``; or ``vllm serve <folder>``).

The base is loaded as ``training.sft`` loaded it (a GGUF dequantized to fp32, so the merged
weights are exactly the ones the adapter was trained on), the adapter applied and merged
(``merge_and_unload``), and the result saved with its tokenizer and chat template, in
``--dtype`` (bfloat16 by default, what GPU training takes; the 0.5B model is about 1.3 GB).
A ``merge.json`` beside it records the base and adapter sha256s.

Example::

    python -m training.merge --run runs/rft/round2/sft --out runs/rft/round2/merged
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dspy_promptmii.files import check_writable, write_json
from dspy_promptmii.local.pull import sha256_file
from training.sft import base_identity, clear_gguf_quantizer, load_base, require_training_packages, resolve_base

logger = logging.getLogger("training.merge")

__all__ = ["merge", "main"]


def merge(base: str, adapter: Path, out: Path, *, dtype: str = "bfloat16") -> dict[str, Any]:
    """Merge ``adapter`` (a PEFT LoRA folder) into ``base`` (as :func:`training.sft.resolve_base`
    takes it) and save the model and tokenizer into ``out``; returns the provenance written
    to ``out/merge.json``.

    Raises:
        FileNotFoundError, ValueError: the base or adapter cannot be used (named).
        ImportError: torch, transformers or peft is missing (the install line is named).
    """
    require_training_packages()
    import torch
    from peft import PeftModel

    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter} is not a PEFT adapter folder (adapter_config.json)")
    spec = resolve_base(base)
    model, tokenizer = load_base(spec, dtype=torch.float32, device=torch.device("cpu"))
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    clear_gguf_quantizer(merged)
    if not merged.config.architectures:
        merged.config.architectures = [type(merged).__name__]
    merged = merged.to(getattr(torch, dtype))
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = {
        "base": base_identity(spec),
        "adapter": {"folder": str(adapter), "sha256": sha256_file(adapter / "adapter_model.safetensors"),
                    "config": json.loads((adapter / "adapter_config.json").read_text())},
        "dtype": dtype,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(record, out / "merge.json")
    return record


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.merge", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, default=None, help="a training.sft --out folder (its adapter/ and base)")
    p.add_argument("--adapter", type=Path, default=None, help="a PEFT adapter folder (default RUN/adapter)")
    p.add_argument("--base", default=None, help="the base weights (default: the run's, from its manifest)")
    p.add_argument("--out", type=Path, required=True, help="the merged Hugging Face model folder")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def _run_base(run: Path) -> str:
    """The ``--base`` a finished training.sft run was given (its report's ``base_argument``).

    Raises ``FileNotFoundError`` when the run has no report (it has not finished)."""
    report = run / "report.json"
    if not report.is_file():
        raise FileNotFoundError(f"{run} has no report.json: the SFT run has not finished")
    return str(json.loads(report.read_text())["base_argument"])


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.run is None and (args.adapter is None or args.base is None):
        raise SystemExit("error: pass --run SFT_FOLDER, or --adapter DIR and --base BASE")
    adapter = args.adapter or args.run / "adapter"
    try:
        base = args.base or _run_base(args.run)
        check_writable(args.out, folder=True)
        record = merge(base, adapter, args.out, dtype=args.dtype)
    except (FileNotFoundError, ValueError, KeyError, ImportError) as error:
        raise SystemExit(f"error: {str(error).strip(chr(39))}") from None
    logger.info("merged %s into %s: %s", adapter, record["base"], args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
