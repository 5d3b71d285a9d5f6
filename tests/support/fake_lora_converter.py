"""A stand-in for llama.cpp's ``convert_lora_to_gguf.py`` in the export tests: the same
arguments (an unknown one is an error), and a small but real GGUF LoRA written with the
``gguf`` package (type adapter/lora, the adapter's alpha, one lora_a/lora_b tensor pair).

Environment: ``FAKE_CONVERTER_RECORD`` (a file: the arguments are appended as a JSON line);
``FAKE_CONVERTER_MODE``: ``normal`` (default), ``fail`` (exit 1 with an error on stderr),
``garbage`` (write a file that is not GGUF).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--outfile", type=Path)
    parser.add_argument("--outtype", choices=["f32", "f16", "bf16", "q8_0", "auto"], default="f32")
    parser.add_argument("--base", type=Path)
    parser.add_argument("lora_path", type=Path)
    args = parser.parse_args()
    record = os.environ.get("FAKE_CONVERTER_RECORD")
    if record:
        with open(record, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd()}) + "\n")
    mode = os.environ.get("FAKE_CONVERTER_MODE", "normal")
    if mode == "fail":
        print("ERROR:lora-to-gguf:Model FooForCausalLM is not supported", file=sys.stderr)
        return 1
    if mode == "garbage":
        args.outfile.write_bytes(b"not a gguf")
        return 0
    config = json.loads((args.lora_path / "adapter_config.json").read_text())
    json.loads((args.base / "config.json").read_text())
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(args.outfile), "qwen2")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(config["lora_alpha"]))
    writer.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((config.get("r", 2), 4), dtype=np.float32))
    writer.add_tensor("blk.0.attn_q.weight.lora_b", np.zeros((4, config.get("r", 2)), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
