"""``python -m training.sft``: LoRA fine-tuning of the generator on the selected pairs (the
fine-tuning step of rejection-sampling fine-tuning / expert iteration), on a CPU by
default, on CUDA when there is one.

* **Base weights = what llama.cpp serves.** ``--base`` is the registry model (default the
  embedded 0.5B generator), a ``.gguf`` file, or a Hugging Face model folder. A GGUF is
  loaded dequantized into fp32 by transformers (``from_pretrained(folder, gguf_file=...,
  dtype=torch.float32)``, about 85 s and 3.8 GB for the 0.5B model), so training and serving
  start from the same weights; its tokenizer and chat template come from the same file.
  The loader's GGUF "quantizer" is cleared after loading (the weights are plain fp32 by
  then; ``save_pretrained`` refuses a GGUF-loaded model otherwise).
* **Loss on the reply tokens only.** Each pair is the model's own chat template
  (``tokenizer.apply_chat_template``): the meta-prompt as the one user message with the
  generation prompt, then the target instruction and the end-of-turn token. The loss is the
  mean negative log-likelihood of the reply tokens (per sequence, then averaged over the
  batch: GRPO's seq-mean-token-mean). Logits are computed on the reply positions only
  (``logits_to_keep``: the hidden states are sliced before ``lm_head``; 33 s instead of 49 s
  per 900-token step on the 2-core CPU).
* **fp32 on CPU** (bf16 is ten times slower there without AVX-512), bf16 on CUDA by
  default. Micro-batches of one sequence, ``--batch-size`` sequences per optimizer step
  (AdamW, linear warm-up then cosine decay, gradient clipping).
* **Seeded and resumable.** The data order is a seeded permutation per epoch; every
  ``--checkpoint-every`` optimizer steps the adapter, optimizer, scheduler and RNG states
  are written atomically to ``checkpoints/step-NNNNNN``; a restart with the same command
  resumes from the last one with the same data order (a killed run loses at most the steps
  since it). SIGTERM/SIGINT and ``--stop-after`` stop at the next sequence boundary with a
  checkpoint of the last finished step. A restart with other settings, data or base is
  refused, naming what differs.
* **Validation.** Whole tasks of the pairs are held out (``--valid-fraction``, by overlap
  group from ``<datasets>/INDEX.tsv``, or ``--valid-tasks``); their mean reply NLL is
  reported before training, every ``--eval-every`` steps and at the end. (The validation
  *reward* needs the follower: ``python -m training.rollouts --split valid`` with the
  exported adapter.)

Output (``--out``): ``adapter/`` (PEFT: ``adapter_config.json``,
``adapter_model.safetensors``), ``base_config/config.json`` (the base model's config, what
llama.cpp's LoRA converter needs as ``--base``), ``metrics.jsonl`` (one line per step and
evaluation), ``report.json``, ``manifest.json`` and ``checkpoints/``.

Example (CPU, the embedded generator's GGUF)::

    python -m training.sft --pairs runs/rft/round1/select/pairs.jsonl --out runs/rft/round1/sft
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import random
import shutil
import signal
import statistics
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dspy_promptmii.files import check_writable, write_json, write_text
from dspy_promptmii.local.pull import sha256_file
from training.build_data import split_valid
from training.runlog import JsonlLog, RunLocked, SettingsMismatch, check_settings, digest, folder_lock
from training.sources import default_datasets_dir, read_overlap_groups

logger = logging.getLogger("training.sft")

__all__ = [
    "TARGET_MODULES",
    "TRAIN_REQUIREMENTS",
    "SFTConfig",
    "Encoded",
    "require_training_packages",
    "load_pairs",
    "split_pairs",
    "encode_pair",
    "data_order",
    "lr_factor",
    "reply_nll",
    "base_identity",
    "load_base",
    "clear_gguf_quantizer",
    "Trainer",
    "main",
]

#: The projections LoRA adapts (attention and MLP of Qwen2/Llama-style blocks).
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: What to install (the pinned torch is a CPU build on these machines; an unpinned one pulls CUDA).
TRAIN_REQUIREMENTS = 'pip install -e ".[train]"  (torch==2.13.0, transformers, peft, gguf, accelerate, safetensors)'
CHECKPOINTS = "checkpoints"
KEEP_CHECKPOINTS = 2


def require_training_packages() -> None:
    """Raise ``ImportError`` naming the install line when torch, transformers or peft is missing."""
    missing = []
    for name in ("torch", "transformers", "peft", "safetensors"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(f"training.sft needs {', '.join(missing)}: {TRAIN_REQUIREMENTS}")


# --- configuration and data --------------------------------------------------------------------------


@dataclass(frozen=True)
class SFTConfig:
    """What decides the trained adapter (all recorded; a resume with any of it changed is refused).

    Args:
        lora_r, lora_alpha, lora_dropout, target_modules: The LoRA (rank 16 on all
            attention and MLP projections: 8.8M trainable parameters on the 0.5B model;
            about 17.6 MB as an f16 GGUF).
        learning_rate: AdamW's peak rate (1e-4, usual for LoRA; GRPO's 2e-6 is for full
            weights).
        epochs: Passes over the training pairs.
        batch_size: Sequences per optimizer step (gradients accumulated one at a time).
        warmup_ratio: Share of the steps with a linear warm-up; then cosine decay to 0.
        weight_decay, max_grad_norm: AdamW's decay and the gradient clipping norm.
        max_seq_tokens: Pairs longer than this (prompt + reply tokens) are left out, counted.
        seed: Adapter initialisation and data order.
        valid_fraction, valid_tasks: Whole tasks held out for the validation loss.
        checkpoint_every: Optimizer steps between checkpoints.
        eval_every: Optimizer steps between validation evaluations (0: before and after only).

    Raises:
        ValueError: a value out of range, named.
    """

    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = TARGET_MODULES
    learning_rate: float = 1e-4
    epochs: int = 2
    batch_size: int = 8
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_seq_tokens: int = 2048
    seed: int = 0
    valid_fraction: float = 0.1
    valid_tasks: tuple[str, ...] = ()
    checkpoint_every: int = 5
    eval_every: int = 0

    def __post_init__(self) -> None:
        for name in ("lora_r", "lora_alpha", "epochs", "batch_size", "max_seq_tokens", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0 or self.max_grad_norm <= 0:
            raise ValueError(f"weight_decay must be >= 0 and max_grad_norm > 0, got {self.weight_decay}, "
                             f"{self.max_grad_norm}")
        if not 0 <= self.valid_fraction < 1:
            raise ValueError(f"valid_fraction must be in [0, 1), got {self.valid_fraction}")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        data["valid_tasks"] = sorted(self.valid_tasks)
        return data


def load_pairs(paths: Sequence[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """The SFT pairs of ``training.select`` files (``prompt``, ``target``, ``task`` per line).

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: a line that is not JSON or lacks a non-empty ``prompt``, ``target`` or
            ``task`` (named by file and line), or no pairs at all.
    """
    pairs = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            path = path / "pairs.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"no pairs file at {path} (python -m training.select writes pairs.jsonl)")
        # Lines end at "\n" only: str.splitlines() would also split at U+2028, U+0085 and the like,
        # which JSON written with ensure_ascii=False keeps unescaped inside task texts.
        for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not JSON ({error})") from None
            bad = [k for k in ("prompt", "target", "task") if not isinstance(record.get(k), str) or not record[k]]
            if bad:
                raise ValueError(f"{path}:{number}: missing or empty {', '.join(bad)}")
            pairs.append(record)
    if not pairs:
        raise ValueError(f"no pairs in {', '.join(map(str, paths))}")
    return pairs


def split_pairs(
    pairs: Sequence[Mapping[str, Any]], config: SFTConfig, groups: Mapping[str, str] | None = None
) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]], list[str]]:
    """(train pairs, validation pairs, validation task names): whole tasks held out by
    :func:`training.build_data.split_valid` (seeded, overlap groups kept together).

    Raises ``ValueError`` when ``valid_tasks`` names a task without pairs, or the split
    would take every task.
    """
    names = sorted({str(p["task"]) for p in pairs})
    if not config.valid_tasks and config.valid_fraction == 0:
        return list(pairs), [], []
    if config.valid_fraction > 0 and not config.valid_tasks and len(names) < 2:
        logger.warning("one task only: no task can be held out for validation")
        return list(pairs), [], []
    _, valid = split_valid(names, groups or {}, list(config.valid_tasks) or None, config.valid_fraction, config.seed)
    held = set(valid)
    return [p for p in pairs if p["task"] not in held], [p for p in pairs if p["task"] in held], valid


@dataclass(frozen=True)
class Encoded:
    """One tokenized pair: ``ids`` (prompt then reply token ids) and where the reply starts."""

    ids: tuple[int, ...]
    reply_start: int
    task: str

    @property
    def reply_tokens(self) -> int:
        return len(self.ids) - self.reply_start


def encode_pair(tokenizer: Any, prompt: str, target: str, task: str = "") -> Encoded:
    """The pair in the model's own chat template: the prompt is the template with the one
    user message and the generation prompt (what llama.cpp's server renders for compile's
    request); the reply is what the template puts after it for the assistant's turn, up to
    and including its end-of-turn token (trailing white space after it, never generated,
    is left out). Reply tokens are tokenized on their own, as the model generates them
    after the prompt.

    Raises:
        ValueError: the tokenizer has no chat template, or the template's conversation
            does not start with its generation prompt.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template: the base model must carry one (GGUF or HF folder)")
    messages = [{"role": "user", "content": prompt}]
    prompt_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": target}], add_generation_prompt=False, tokenize=False
    )
    if not full_text.startswith(prompt_text):
        raise ValueError(
            "the chat template renders the conversation differently from its generation prompt; cannot tell the "
            "reply tokens apart"
        )
    reply_text = full_text[len(prompt_text) :].rstrip()
    if target.strip() not in reply_text:
        raise ValueError("the chat template dropped the target from the assistant's turn")
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    reply_ids = tokenizer(reply_text, add_special_tokens=False)["input_ids"]
    return Encoded(tuple(prompt_ids) + tuple(reply_ids), len(prompt_ids), task)


def data_order(count: int, epochs: int, seed: int) -> list[int]:
    """Indices of the training examples in the order they are used: one seeded permutation
    per epoch, concatenated (step ``s`` takes ``[s * batch, (s + 1) * batch)``)."""
    order: list[int] = []
    for epoch in range(epochs):
        permutation = list(range(count))
        random.Random(f"{seed}|epoch|{epoch}").shuffle(permutation)
        order.extend(permutation)
    return order


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier of optimizer step ``step`` (0-based): linear warm-up over
    ``warmup`` steps (the first step already moves), then cosine decay towards 0."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def reply_nll(model: Any, example: Encoded, device: Any) -> Any:
    """The mean negative log-likelihood of the reply tokens of one example (a 0-dim tensor).

    Shapes: ``input_ids`` is ``[1, T]``; only the ``R = T - reply_start`` positions that
    predict reply tokens get logits (``logits_to_keep`` slices the hidden states
    ``[1, T, H]`` to ``[1, R, H]`` before ``lm_head``), so the logits are ``[1, R, V]``
    instead of ``[1, T, V]``. Prompt tokens are context only: they never enter the loss.
    """
    import torch
    import torch.nn.functional as F

    ids = torch.tensor([example.ids], dtype=torch.long, device=device)
    positions = torch.arange(example.reply_start - 1, len(example.ids) - 1, device=device)
    logits = model(input_ids=ids, logits_to_keep=positions, use_cache=False).logits[0]
    targets = ids[0, example.reply_start :]
    return F.cross_entropy(logits.float(), targets, reduction="mean")


# --- the base model ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseSpec:
    """Where the base weights are: a GGUF file (``gguf`` set) or a HF model folder."""

    folder: Path
    gguf: str | None
    name: str


def resolve_base(base: str) -> BaseSpec:
    """A registry model name, a ``.gguf`` path or a HF model folder.

    Raises:
        FileNotFoundError: no such file or folder, or a registry model not in the cache
            (the message names the pull command).
        ValueError: a folder without ``config.json``.
    """
    from dspy_promptmii.local.pull import check_gguf_file, resolve_model
    from dspy_promptmii.local.registry import REGISTRY

    if base in REGISTRY:
        path = resolve_model(base)
        return BaseSpec(path.parent, path.name, base)
    path = Path(base).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} has no config.json: pass a Hugging Face model folder, a .gguf file or a "
                             "registry model name")
        return BaseSpec(path, None, path.name)
    if path.suffix == ".gguf" or path.exists():
        path = check_gguf_file(path)
        return BaseSpec(path.parent, path.name, path.name)
    raise FileNotFoundError(f"no base model at {base!r} (a registry name, a .gguf file or a model folder)")


def base_identity(spec: BaseSpec) -> dict[str, Any]:
    """The sha256 of the base weights: the GGUF file's (the registry's value for a registry
    model), or of a folder's config and weight files."""
    from dspy_promptmii.local.registry import REGISTRY

    if spec.gguf is not None:
        sha = REGISTRY[spec.name].sha256 if spec.name in REGISTRY else sha256_file(spec.folder / spec.gguf)
        return {"kind": "gguf", "file": spec.gguf, "sha256": sha}
    files = sorted(p for p in spec.folder.iterdir() if p.is_file() and (
        p.name == "config.json" or p.suffix in (".safetensors", ".bin")))
    return {"kind": "hf", "folder": spec.folder.name,
            "sha256": digest({p.name: sha256_file(p) for p in files})}


def clear_gguf_quantizer(model: Any) -> None:
    """Forget that a model was loaded from a GGUF: its weights are dequantized fp32 tensors
    by then, but transformers keeps a GGUF "quantizer" that makes ``save_pretrained`` refuse
    the model and PEFT treat it as quantized."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    if getattr(model, "is_quantized", False) and hasattr(model, "_is_quantized"):  # pragma: no cover
        model._is_quantized = False


def load_base(spec: BaseSpec, *, dtype: Any, device: Any) -> tuple[Any, Any]:
    """(model, tokenizer) of the base, on ``device`` in ``dtype`` (a GGUF is dequantized)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    extra = {"gguf_file": spec.gguf} if spec.gguf else {}
    tokenizer = AutoTokenizer.from_pretrained(spec.folder, **extra)
    model = AutoModelForCausalLM.from_pretrained(spec.folder, dtype=dtype, **extra)
    clear_gguf_quantizer(model)
    model.to(device)
    logger.info("loaded %s (%s parameters, %s) in %.0f s", spec.name,
                f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M", dtype, time.perf_counter() - started)
    return model, tokenizer


def base_config(model: Any) -> dict[str, Any]:
    """The base model's config as ``config.json`` (no quantization entry, its architecture named):
    what ``convert_lora_to_gguf.py --base`` reads."""
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    if not config.get("architectures"):
        config["architectures"] = [type(model).__name__]
    return config


# --- training ------------------------------------------------------------------------------------------


class Stop(Exception):
    """A stop was asked for (signal or time limit): checkpoint and leave."""


class Trainer:
    """LoRA training of a causal LM on encoded pairs, with checkpoints (see the module docstring).

    Args:
        model: The PEFT model (adapter trainable, base frozen).
        train, valid: Encoded examples.
        config: The run's :class:`SFTConfig`.
        out: The run folder.
        device: Where the model is.
        settings_sha256: Recorded in every checkpoint; a checkpoint of other settings is refused.
    """

    def __init__(
        self,
        model: Any,
        train: Sequence[Encoded],
        valid: Sequence[Encoded],
        config: SFTConfig,
        out: Path,
        device: Any,
        settings_sha256: str,
    ):
        import torch

        self.model = model
        self.train_examples = list(train)
        self.valid_examples = list(valid)
        self.config = config
        self.out = out
        self.device = device
        self.settings_sha256 = settings_sha256
        self.order = data_order(len(self.train_examples), config.epochs, config.seed)
        self.total_steps = math.ceil(len(self.order) / config.batch_size)
        self.warmup = math.ceil(config.warmup_ratio * self.total_steps)
        self.params = [p for _, p in model.named_parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=config.learning_rate, weight_decay=config.weight_decay, betas=(0.9, 0.999)
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, self.total_steps, self.warmup)
        )
        self.step = 0
        self.metrics = JsonlLog(out / "metrics.jsonl")
        self.stop_requested: str | None = None

    # -- checkpoints --------------------------------------------------------------------------------

    @property
    def checkpoints(self) -> Path:
        return self.out / CHECKPOINTS

    def save_checkpoint(self) -> Path:
        """Write the adapter, optimizer, scheduler and RNG states of the current step, atomically."""
        import torch

        final = self.checkpoints / f"step-{self.step:06d}"
        if final.is_dir():
            return final
        partial = self.checkpoints / f".step-{self.step:06d}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        self.model.save_pretrained(partial / "adapter")
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "python_rng": random.getstate(),
        }
        torch.save(state, partial / "trainer.pt")
        write_json({"step": self.step, "total_steps": self.total_steps, "settings_sha256": self.settings_sha256,
                    "saved": datetime.now(timezone.utc).isoformat(timespec="seconds")}, partial / "state.json")
        for file in partial.rglob("*"):
            if file.is_file():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        os.replace(partial, final)
        write_text(final.name + "\n", self.checkpoints / "latest")
        kept = sorted(p for p in self.checkpoints.glob("step-*") if p.is_dir())
        for old in kept[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("checkpoint %s", final)
        return final

    def latest_checkpoint(self) -> Path | None:
        pointer = self.checkpoints / "latest"
        if not pointer.is_file():
            return None
        path = self.checkpoints / pointer.read_text().strip()
        return path if (path / "state.json").is_file() else None

    def load_checkpoint(self, path: Path) -> None:
        """Restore a checkpoint's adapter, optimizer, scheduler, RNG states and step.

        Raises ``ValueError`` when it was written with other settings."""
        import torch
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        state = json.loads((path / "state.json").read_text())
        if state.get("settings_sha256") != self.settings_sha256:
            raise ValueError(f"checkpoint {path} was written with other settings")
        weights = load_file(str(path / "adapter" / "adapter_model.safetensors"), device=str(self.device))
        result = set_peft_model_state_dict(self.model, weights)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ValueError(f"checkpoint {path} has tensors the adapter does not: {unexpected[:3]}")
        # On the CPU: RNG states must stay CPU byte tensors; the optimizer moves its state to the parameters.
        trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
        self.optimizer.load_state_dict(trainer["optimizer"])
        self.scheduler.load_state_dict(trainer["scheduler"])
        torch.set_rng_state(trainer["torch_rng"])
        if trainer.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(trainer["cuda_rng"])
        random.setstate(trainer["python_rng"])
        self.step = int(state["step"])
        logger.info("resumed from %s (step %d of %d)", path, self.step, self.total_steps)

    # -- evaluation and steps --------------------------------------------------------------------------

    def evaluate(self, progress: bool = False) -> dict[str, Any] | None:
        """Mean reply NLL (and its token-weighted form) of the validation examples."""
        import torch

        if not self.valid_examples:
            return None
        self.model.eval()
        losses, weighted, tokens = [], 0.0, 0
        with torch.no_grad():
            for example in tqdm(self.valid_examples, desc="validation", unit="pair", disable=not progress,
                                leave=False):
                loss = float(reply_nll(self.model, example, self.device))
                losses.append(loss)
                weighted += loss * example.reply_tokens
                tokens += example.reply_tokens
        self.model.train()
        result = {"kind": "eval", "step": self.step, "valid_loss": round(statistics.fmean(losses), 6),
                  "valid_token_loss": round(weighted / tokens, 6), "valid_pairs": len(losses)}
        self.metrics.append(result)
        logger.info("step %d: validation loss %.4f on %d pairs", self.step, result["valid_loss"], len(losses))
        return result

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over the next ``batch_size`` examples of the data order.

        Raises :class:`Stop` (before the step is applied) when a stop was asked for."""
        import torch

        started = time.perf_counter()
        batch = self.order[self.step * self.config.batch_size : (self.step + 1) * self.config.batch_size]
        self.optimizer.zero_grad(set_to_none=True)
        losses, tokens = [], 0
        for index in batch:
            if self.stop_requested:
                self.optimizer.zero_grad(set_to_none=True)
                raise Stop(self.stop_requested)
            example = self.train_examples[index]
            loss = reply_nll(self.model, example, self.device)
            (loss / len(batch)).backward()
            losses.append(loss.item())
            tokens += len(example.ids)
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        record = {"kind": "train", "step": self.step, "loss": round(statistics.fmean(losses), 6), "lr": lr,
                  "grad_norm": round(float(norm), 6), "sequences": len(batch), "tokens": tokens,
                  "seconds": round(time.perf_counter() - started, 3)}
        self.metrics.append(record)
        return record

    def run(self, *, max_steps: int | None = None, stop_after: float | None = None,
            progress: bool = True) -> str:
        """Train until the last step, ``max_steps`` more steps, ``stop_after`` seconds or a stop
        request; returns ``"finished"`` or why it stopped. A checkpoint of the last finished
        step is written whenever it stops."""
        started = time.perf_counter()
        ran = 0
        self.model.train()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="sft", unit="step", disable=not progress)
        why = "finished"
        try:
            while self.step < self.total_steps:
                if max_steps is not None and ran >= max_steps:
                    why = f"--max-steps {max_steps} reached"
                    break
                if stop_after is not None and time.perf_counter() - started > stop_after:
                    why = f"--stop-after {stop_after:.0f} s reached"
                    break
                record = self.train_step()
                ran += 1
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.1e}", s=f"{record['seconds']:.0f}")
                if self.step % self.config.checkpoint_every == 0 or self.step == self.total_steps:
                    self.save_checkpoint()
                if self.config.eval_every and self.step % self.config.eval_every == 0 and self.step < self.total_steps:
                    self.evaluate()
        except Stop as stop:
            why = f"stopped ({stop})"
        finally:
            bar.close()
        if self.step > 0:
            self.save_checkpoint()
        return why


@contextlib.contextmanager
def stop_on_signals(trainer: Trainer) -> Iterator[None]:
    """SIGTERM/SIGINT/SIGHUP ask the trainer to stop at the next sequence boundary."""

    def handler(signum: int, frame: Any) -> None:
        trainer.stop_requested = signal.Signals(signum).name
        logger.warning("%s: stopping after the current sequence (a checkpoint of the last step follows)",
                       trainer.stop_requested)

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        with contextlib.suppress(ValueError):  # not the main thread
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# --- command line --------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    from dspy_promptmii.cli import non_negative_int, positive_int
    from dspy_promptmii.local.registry import DEFAULT_MODEL

    defaults = SFTConfig()
    p = argparse.ArgumentParser(prog="python -m training.sft", description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", nargs="+", type=Path, required=True, help="pairs.jsonl files (or select folders)")
    p.add_argument("--out", type=Path, required=True, help="run folder (adapter/, base_config/, checkpoints/, ...)")
    p.add_argument("--base", default=DEFAULT_MODEL,
                   help=f"base weights: a registry model (default {DEFAULT_MODEL}, its cached GGUF), a .gguf file "
                   "or a Hugging Face model folder")
    p.add_argument("--init-adapter", type=Path, default=None,
                   help="continue training this PEFT adapter folder (its LoRA settings are used)")
    p.add_argument("--datasets", type=Path, default=None,
                   help="datasets folder whose INDEX.tsv overlap groups keep related tasks on one side of the "
                   "validation split (default: ../shared/datasets when present)")
    lora = p.add_argument_group("LoRA")
    lora.add_argument("--lora-r", type=positive_int, default=defaults.lora_r)
    lora.add_argument("--lora-alpha", type=positive_int, default=defaults.lora_alpha)
    lora.add_argument("--lora-dropout", type=float, default=defaults.lora_dropout)
    lora.add_argument("--target-modules", default=",".join(defaults.target_modules))
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--lr", type=float, default=defaults.learning_rate, help=f"peak ({defaults.learning_rate})")
    opt.add_argument("--epochs", type=positive_int, default=defaults.epochs)
    opt.add_argument("--batch-size", type=positive_int, default=defaults.batch_size,
                     help=f"sequences per optimizer step ({defaults.batch_size})")
    opt.add_argument("--warmup-ratio", type=float, default=defaults.warmup_ratio)
    opt.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    opt.add_argument("--max-grad-norm", type=float, default=defaults.max_grad_norm)
    opt.add_argument("--max-seq-tokens", type=positive_int, default=defaults.max_seq_tokens,
                     help=f"leave out longer pairs ({defaults.max_seq_tokens})")
    opt.add_argument("--seed", type=int, default=defaults.seed)
    val = p.add_argument_group("validation")
    val.add_argument("--valid-fraction", type=float, default=defaults.valid_fraction,
                     help=f"share of the pairs' tasks held out whole ({defaults.valid_fraction}; 0: none)")
    val.add_argument("--valid-tasks", nargs="*", default=None, help="held-out tasks instead")
    val.add_argument("--eval-every", type=non_negative_int, default=0,
                     help="steps between validation losses (0: before and after only)")
    run = p.add_argument_group("run")
    run.add_argument("--checkpoint-every", type=positive_int, default=defaults.checkpoint_every,
                     help=f"optimizer steps between checkpoints ({defaults.checkpoint_every})")
    run.add_argument("--max-steps", type=positive_int, default=None, help="stop (resumable) after this many steps now")
    run.add_argument("--stop-after", type=float, default=None,
                     help="stop (resumable) after this many minutes, at a step boundary")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA when present")
    run.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                     help="auto: float32 on CPU (bf16 is 10x slower there), bfloat16 on CUDA")
    run.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (all cores)")
    run.add_argument("--no-progress", action="store_true")
    run.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def _default_datasets() -> Path | None:
    path = default_datasets_dir()
    return path if path.is_dir() else None


def _adapter_identity(folder: Path | None) -> dict[str, Any] | None:
    if folder is None:
        return None
    weights = folder / "adapter_model.safetensors"
    if not (folder / "adapter_config.json").is_file() or not weights.is_file():
        raise FileNotFoundError(f"{folder} is not a PEFT adapter folder (adapter_config.json, "
                                "adapter_model.safetensors)")
    return {"folder": folder.name, "sha256": sha256_file(weights),
            "config": json.loads((folder / "adapter_config.json").read_text())}


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()
    # Every option and input is checked before torch or the model is loaded.
    try:
        config = SFTConfig(
            lora_r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            target_modules=tuple(m.strip() for m in args.target_modules.split(",") if m.strip()),
            learning_rate=args.lr,
            epochs=args.epochs,
            batch_size=args.batch_size,
            warmup_ratio=args.warmup_ratio,
            weight_decay=args.weight_decay,
            max_grad_norm=args.max_grad_norm,
            max_seq_tokens=args.max_seq_tokens,
            seed=args.seed,
            valid_fraction=args.valid_fraction,
            valid_tasks=tuple(args.valid_tasks or ()),
            checkpoint_every=args.checkpoint_every,
            eval_every=args.eval_every,
        )
        if args.stop_after is not None and args.stop_after <= 0:
            raise ValueError(f"--stop-after must be positive minutes, got {args.stop_after}")
        check_writable(args.out, folder=True)
        pairs = load_pairs(args.pairs)
        datasets = args.datasets or _default_datasets()
        if args.datasets is not None and not args.datasets.is_dir():
            raise ValueError(f"--datasets {args.datasets} is not a folder")
        train_pairs, valid_pairs, valid_tasks = split_pairs(pairs, config, read_overlap_groups(datasets)
                                                            if datasets else {})
        spec = resolve_base(args.base)
        init = _adapter_identity(args.init_adapter)
        require_training_packages()
    except (ValueError, FileNotFoundError, KeyError, ImportError) as error:
        raise SystemExit(f"error: {str(error).strip(chr(39))}") from None

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA device")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(args.dtype) or (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    if device.type == "cpu" and dtype == torch.bfloat16:
        logger.warning("bfloat16 on this CPU is about 10x slower than float32 (measured without AVX-512)")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)

    settings = {
        "config": config.to_dict(),
        "pairs": [{"file": Path(p).name, "sha256": sha256_file(Path(p) / "pairs.jsonl" if Path(p).is_dir() else p)}
                  for p in args.pairs],
        "valid_tasks": valid_tasks,
        "base": base_identity(spec),
        "init_adapter": init,
        "dtype": str(dtype).removeprefix("torch."),
    }
    out: Path = args.out
    try:
        with folder_lock(out, "SFT run"):
            new = check_settings(out / "manifest.json", settings, what="an SFT run",
                                 hint="run the same command to resume, or pass another --out")
            settings_sha256 = digest(json.loads(json.dumps(settings, default=str)))
            if not new and (out / "report.json").is_file() and (out / "adapter").is_dir():
                logger.info("%s already holds the finished run (report.json); nothing to do", out)
                return 0
            command = "python -m training.sft " + " ".join(map(str, sys.argv[1:] if argv is None else argv))
            why, trainer, extra = _train(args, config, spec, init, train_pairs, valid_pairs, valid_tasks, out,
                                         device, dtype, settings_sha256, command)
            report = {**extra, "status": why, "settings": settings, "settings_sha256": settings_sha256,
                      "seconds_this_run": round(time.perf_counter() - started, 1)}
            if trainer.step < trainer.total_steps:
                write_json(report, out / "progress.json")
                logger.info("%s at step %d of %d; run the same command to resume", why, trainer.step,
                            trainer.total_steps)
                return 0 if why.startswith("--") else 130
            write_json(report, out / "report.json")
            logger.info("finished: adapter in %s; validation loss %s -> %s", out / "adapter",
                        report.get("valid_loss_before"), report.get("valid_loss_after"))
            return 0
    except (RunLocked, SettingsMismatch, ValueError) as error:
        raise SystemExit(f"error: {error}") from None


def _train(args: argparse.Namespace, config: SFTConfig, spec: BaseSpec, init: dict[str, Any] | None,
           train_pairs: Sequence[Mapping[str, Any]], valid_pairs: Sequence[Mapping[str, Any]],
           valid_tasks: list[str], out: Path, device: Any, dtype: Any,
           settings_sha256: str, command: str) -> tuple[str, Trainer, dict[str, Any]]:
    """Load, encode, build the adapter, resume, train, save (see :func:`main`)."""
    import peft
    import torch
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    model, tokenizer = load_base(spec, dtype=dtype, device=device)
    encoded_train, encoded_valid, too_long = [], [], 0
    for pairs, sink in ((train_pairs, encoded_train), (valid_pairs, encoded_valid)):
        for pair in pairs:
            example = encode_pair(tokenizer, pair["prompt"], pair["target"], pair["task"])
            if len(example.ids) > config.max_seq_tokens:
                too_long += 1
                continue
            sink.append(example)
    if too_long:
        logger.warning("%d pairs are longer than --max-seq-tokens %d: left out", too_long, config.max_seq_tokens)
    if not encoded_train:
        raise ValueError("no training pairs left (all held out for validation or too long)")
    for param in model.parameters():
        param.requires_grad_(False)
    if args.init_adapter is not None:
        model = PeftModel.from_pretrained(model, str(args.init_adapter), is_trainable=True)
    else:
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=list(config.target_modules), bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    model.to(device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tokens = [len(e.ids) for e in encoded_train]
    logger.info("%d training pairs (%d held out in %d validation tasks), median %d tokens; %s trainable "
                "parameters; device %s", len(encoded_train), len(encoded_valid), len(valid_tasks),
                statistics.median(tokens), f"{trainable / 1e6:.1f}M", device)
    trainer = Trainer(model, encoded_train, encoded_valid, config, out, device, settings_sha256)
    checkpoint = trainer.latest_checkpoint()
    if checkpoint is not None:
        trainer.load_checkpoint(checkpoint)
    evals = {r["step"]: r for r in trainer.metrics.read() if r.get("kind") == "eval"}
    if 0 not in evals and trainer.step == 0:
        evals[0] = trainer.evaluate(progress=not args.no_progress) or {}
    with stop_on_signals(trainer):
        why = trainer.run(max_steps=args.max_steps, stop_after=args.stop_after * 60 if args.stop_after else None,
                          progress=not args.no_progress)
    extra: dict[str, Any] = {
        "step": trainer.step,
        "total_steps": trainer.total_steps,
        "train_pairs": len(encoded_train),
        "valid_pairs": len(encoded_valid),
        "valid_tasks": valid_tasks,
        "too_long": too_long,
        "trainable_parameters": trainable,
        "train_tokens": {"median": statistics.median(tokens), "max": max(tokens), "total": sum(tokens)},
        "device": str(device),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "python": platform.python_version()},
        "command": command,
        "base_argument": args.base,
        "pairs_paths": [str((Path(p) / "pairs.jsonl" if Path(p).is_dir() else Path(p)).resolve()) for p in args.pairs],
    }
    if trainer.step < trainer.total_steps:
        return why, trainer, extra
    final = trainer.evaluate(progress=not args.no_progress) if trainer.valid_examples else None
    steps = [r for r in trainer.metrics.read() if r.get("kind") == "train"]
    last = {r["step"]: r for r in steps}
    extra.update({
        "valid_loss_before": (evals.get(0) or {}).get("valid_loss"),
        "valid_loss_after": (final or {}).get("valid_loss"),
        "train_loss_last": last[trainer.step]["loss"] if trainer.step in last else None,
        "seconds_per_step": round(statistics.median(r["seconds"] for r in last.values()), 2) if last else None,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    adapter = out / "adapter"
    shutil.rmtree(adapter, ignore_errors=True)
    model.save_pretrained(adapter)
    config_dir = out / "base_config"
    config_dir.mkdir(parents=True, exist_ok=True)
    write_json(base_config(model.get_base_model()), config_dir / "config.json")
    extra["adapter_sha256"] = sha256_file(adapter / "adapter_model.safetensors")
    return why, trainer, extra


if __name__ == "__main__":
    sys.exit(main())
