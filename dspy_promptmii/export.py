"""The instruction outside DSPy: the follower prompt of every classification predictor of
a program, as a template with one slot per input field, so that any client sends the
request ``LabelAdapter`` would send.

The template is made by :class:`~dspy_promptmii.adapter.LabelAdapter` itself: its
``format`` (the protocol's :meth:`~dspy_promptmii.protocol.Protocol.messages`) is called with
each input field's slot (``{input}`` for a single input field, ``{<field name>}`` for
several) as the input value. Rendering an input is pure substitution (``Input: <value>``),
so a template filled with an input (:meth:`ExportedPrompt.fill`: each slot's last
occurrence in the last message, in field order) is byte for byte the messages
``LabelAdapter`` sends for that input.

A program comes from a DSPy state file (``program.save("program.json")``). The file holds
instructions, demos and field prefixes and descriptions, not the fields' types; the label
set is read back from the format line the protocol appends to every instruction (checked
by writing it again), the field names from DSPy's ``${name}`` placeholder descriptions,
the demos' keys, or, failing those, the prefixes (``Text Pair:`` -> ``text_pair``, checked
by DSPy's own ``infer_prefix``). Passing the program itself (``program=`` here,
``--program MODULE:ATTR`` on the command line) uses its own signatures instead.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import dspy

from dspy_promptmii.adapter import LabelAdapter
from dspy_promptmii.protocol import MultiLabels, Protocol, format_line, is_multilabel
from dspy_promptmii.secrets import protected_logger

logger = protected_logger(__name__)

__all__ = [
    "EXPORT_FORMATS",
    "ExportedPrompt",
    "export_prompts",
    "load_program",
    "program_from_state",
    "labels_from_instruction",
    "render_export",
    "SINGLE_SLOT",
]

#: ``--format`` of ``promptmii export``.
EXPORT_FORMATS = ("text", "messages", "json")
#: The slot of a predictor's input when it has one input field.
SINGLE_SLOT = "{input}"
#: What the ``json`` format calls itself (its ``format`` key).
JSON_FORMAT = "promptmii-export/1"

_FORMAT_LINES = (
    (re.compile(r'Only return one of these options: (?P<labels>.+)\. Do not output "Label:" or any extra text\.\Z'),
     False),
    (re.compile(
        r"Return a JSON array of the options that apply, from: (?P<labels>.+)\. Several may apply, or none "
        r'\(\[\]\)\. Do not output "Label:" or any extra text\.\Z'
    ), True),
)


def slots(field_names: Sequence[str]) -> dict[str, str]:
    """Each input field's slot: ``{input}`` for a single field, else ``{<name>}``."""
    if len(field_names) == 1:
        return {field_names[0]: SINGLE_SLOT}
    return {name: "{" + name + "}" for name in field_names}


@dataclass
class ExportedPrompt:
    """One predictor's follower prompt as a template.

    ``messages`` are chat messages (``role``, ``content``) with ``slots[field]`` where the
    value of each input field goes; ``settings`` are the request body's other fields the
    protocol sets for an LM without settings of its own (temperature, ``max_tokens``,
    constrained decoding), as they reach the server (``grammar`` and ``label_choice`` at
    the top level of the body). ``labels`` are the answers the follower may give (with
    ``multilabel``, a JSON array of any of them).
    """

    predictor: str
    labels: list[str]
    label_field: str
    input_fields: list[str]
    slots: dict[str, str]
    messages: list[dict[str, str]]
    settings: dict[str, Any] = field(default_factory=dict)
    multilabel: bool = False

    def fill(self, inputs: Mapping[str, Any]) -> list[dict[str, str]]:
        """The messages for one input: in the last message, each slot's last occurrence
        replaced by ``str(inputs[field])``, in field order (an instruction that quotes a
        slot comes before the input, and an earlier value cannot hold a later slot's
        last occurrence). Raises ``KeyError`` naming a missing input field."""
        missing = [name for name in self.input_fields if name not in inputs]
        if missing:
            raise KeyError(f"no value for input field(s) {missing} of predictor {self.predictor!r}")
        messages = [dict(message) for message in self.messages]
        content = messages[-1]["content"]
        for name in self.input_fields:
            slot = self.slots[name]
            head, found, tail = content.rpartition(slot)
            if not found:
                raise ValueError(f"the last message of predictor {self.predictor!r} has no slot {slot}")
            content = f"{head}{inputs[name]}{tail}"
        messages[-1]["content"] = content
        return messages

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _describe_refusal(name: str, predictor: dspy.Predict) -> str:
    signature = predictor.signature
    if len(signature.output_fields) != 1:
        outputs = list(signature.output_fields)
        return f"{name}: {len(outputs)} output fields {outputs} (LabelAdapter renders one label field)"
    return (
        f"{name}: not a classifier LabelAdapter renders (its label field is not a Literal, an Enum, a bool, "
        "or a list of a Literal or an Enum)"
    )


def export_prompts(program: dspy.Module, protocol: Protocol | None = None) -> list[ExportedPrompt]:
    """The follower prompt template of every predictor of ``program`` that
    :class:`~dspy_promptmii.adapter.LabelAdapter` renders itself, in ``named_predictors``
    order, under ``protocol`` (default ``Protocol()``, ``LabelAdapter()``'s).

    Raises:
        TypeError: ``program`` is not a ``dspy.Module``.
        ValueError: no predictor is a classifier ``LabelAdapter`` renders (each predictor
            and why named), e.g. a program with no ``Literal`` output or a ChainOfThought.
    """
    if not isinstance(program, dspy.Module):
        raise TypeError(f"program must be a dspy.Module, got {type(program).__name__}")
    adapter = LabelAdapter(protocol=protocol or Protocol())
    prompts: list[ExportedPrompt] = []
    refused: list[str] = []
    for name, predictor in program.named_predictors():
        task = adapter.task(predictor.signature)
        if task is None:
            refused.append(_describe_refusal(name, predictor))
            continue
        slot_of = slots(task.input_fields)
        messages = adapter.format(predictor.signature, list(predictor.demos or []), dict(slot_of))
        prompts.append(
            ExportedPrompt(
                predictor=name,
                labels=list(task.labels),
                label_field=task.label_field,
                input_fields=list(task.input_fields),
                slots=slot_of,
                messages=[{"role": m["role"], "content": m["content"]} for m in messages],
                settings=adapter.protocol.settings(task.labels),
                multilabel=task.multilabel,
            )
        )
    if not prompts:
        detail = "; ".join(refused) if refused else "it has no predictor"
        raise ValueError(f"the program has no classification predictor to export: {detail}")
    return prompts


# -- programs from files ----------------------------------------------------------------


def labels_from_instruction(instruction: str) -> Sequence[str] | None:
    """The labels the protocol's format line at the end of ``instruction`` lists (a
    :class:`~dspy_promptmii.protocol.MultiLabels` for the multi-label line), or None
    when it does not end with one. The line is written again from the labels read and
    must come out the same (labels holding a comma are JSON-quoted, see
    :func:`~dspy_promptmii.protocol.label_list`)."""
    last = (instruction or "").rstrip().rsplit("\n", 1)[-1]
    found = next(((m, multi) for pattern, multi in _FORMAT_LINES if (m := pattern.match(last))), None)
    if found is None:
        return None
    match, multilabel = found
    text = match.group("labels")
    labels: list[str] | None
    if text.startswith('"'):
        try:
            labels = json.loads(f"[{text}]")
        except ValueError:
            labels = None
    else:
        labels = text.split(", ")
    if not labels or not all(isinstance(label, str) for label in labels):
        return None
    labels = MultiLabels(labels) if multilabel else labels
    return labels if format_line(labels) == last else None


def _placeholder_name(description: str | None) -> str | None:
    match = re.fullmatch(r"\$\{(\w+)\}", description or "")
    return match.group(1) if match else None


def _name_from_prefix(prefix: str) -> str | None:
    from dspy.signatures.signature import infer_prefix

    title = (prefix or "").strip().removesuffix(":").strip()
    guess = re.sub(r"\s+", "_", title).lower()
    return guess if guess.isidentifier() and infer_prefix(guess) == title else None


def _field_names(state: Mapping[str, Any], where: str) -> list[str]:
    """The field names of a predictor's state (see the module docstring). Raises
    ``ValueError`` naming a field whose name cannot be recovered."""
    fields = state["signature"].get("fields") or []
    demo_keys = [list(demo) for demo in state.get("demos") or [] if isinstance(demo, Mapping)]
    names: list[str] = []
    for index, entry in enumerate(fields):
        name = _placeholder_name(entry.get("description"))
        if name is None:
            # A demo holding every field lists them in the signature's order.
            full = next((keys for keys in demo_keys if len(keys) == len(fields)), None)
            name = full[index] if full else _name_from_prefix(entry.get("prefix", ""))
        if name is None:
            raise ValueError(
                f"{where}: the name of field {index} (prefix {entry.get('prefix')!r}) cannot be read from the file; "
                "pass the program itself (--program MODULE:ATTR)"
            )
        names.append(name)
    return names


def _predictor_from_state(state: Mapping[str, Any], where: str) -> tuple[dspy.Predict | None, str | None]:
    """A ``dspy.Predict`` rebuilt from one predictor's saved state, or (None, why not)."""
    signature = state.get("signature")
    if not isinstance(signature, Mapping) or not isinstance(signature.get("fields"), list):
        return None, f"{where}: not a predictor's state"
    instruction = signature.get("instructions") or ""
    labels = labels_from_instruction(instruction)
    if labels is None:
        return None, f"{where}: its instruction does not end with the protocol's format line"
    names = _field_names(state, where)
    if len(names) < 2:
        return None, f"{where}: it has no input field"
    if len(set(names)) < len(names):
        return None, f"{where}: its field names repeat: {names}"
    inputs, label_field = names[:-1], names[-1]
    if any(name in ("reasoning", "rationale") for name in inputs):
        return None, f"{where}: it reasons before its label (ChainOfThought), which LabelAdapter leaves to ChatAdapter"
    descriptions = [entry.get("description") for entry in signature["fields"]]
    fields: dict[str, Any] = {}
    for name, description in zip(inputs, descriptions):
        own = description if description and _placeholder_name(description) != name else None
        fields[name] = (str, dspy.InputField(desc=own) if own else dspy.InputField())
    own = descriptions[-1] if descriptions[-1] and _placeholder_name(descriptions[-1]) != label_field else None
    label_type: Any = Literal[tuple(labels)]  # type: ignore[valid-type]
    if is_multilabel(labels):
        label_type = list[label_type]
    fields[label_field] = (label_type, dspy.OutputField(desc=own) if own else dspy.OutputField())
    predictor = dspy.Predict(dspy.Signature(fields, instruction))
    predictor.load_state({**state, "lm": None})
    return predictor, None


class _Rebuilt(dspy.Module):
    """Predictors rebuilt from a state file, under their saved names."""

    def __init__(self, predictors: Mapping[str, dspy.Predict]):
        super().__init__()
        self._names = list(predictors)
        self._rebuilt = dict(predictors)

    def named_predictors(self) -> list[tuple[str, dspy.Predict]]:  # the saved names, e.g. ``classify.predict``
        return [(name, self._rebuilt[name]) for name in self._names]


def program_from_state(state: Any, where: str = "the program") -> dspy.Module:
    """A program of the classification predictors a DSPy state (``Module.dump_state()``,
    what ``save`` writes) describes, rebuilt without the program's code (see the module
    docstring).

    Raises:
        ValueError: the state is not a DSPy program's, or none of its predictors has an
            instruction ending with the protocol's format line (each named with why).
    """
    if not isinstance(state, Mapping):
        raise ValueError(f"{where} is not a saved DSPy program (a JSON object), got {type(state).__name__}")
    if "signature" in state:  # a bare Predict saves its own state at the top
        entries = {"self": state}
    else:
        entries = {k: v for k, v in state.items() if k != "metadata" and isinstance(v, Mapping) and "signature" in v}
    if not entries:
        raise ValueError(f"{where} holds no predictor (no object with a 'signature'): is it a DSPy program's save()?")
    predictors: dict[str, dspy.Predict] = {}
    refused: list[str] = []
    for name, entry in entries.items():
        predictor, why = _predictor_from_state(entry, f"predictor {name!r}")
        if predictor is None:
            refused.append(why or name)
        else:
            predictors[name] = predictor
    if not predictors:
        raise ValueError(
            f"{where} has no classification predictor to export: {'; '.join(refused)}. A program compiled by "
            "PromptMIIOptimizer (or any whose instruction ends with the protocol's format line) is read from the "
            "file alone; for others pass the program itself (--program MODULE:ATTR)"
        )
    for why in refused:
        logger.info("not exported: %s", why)
    return _Rebuilt(predictors)


def _import_program(spec: str) -> dspy.Module:
    """``MODULE:ATTR`` (the current directory importable): a ``dspy.Module``, a
    ``dspy.Signature`` class (as ``dspy.Predict``) or a callable returning a module."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--program {spec!r} is not MODULE:ATTR (e.g. myapp.classifier:program)")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"--program: cannot import {module_name!r}: {error}") from None
    value: Any = module
    for part in attr.split("."):
        if not hasattr(value, part):
            raise ValueError(f"--program: {module_name!r} has no attribute {attr!r}")
        value = getattr(value, part)
    if isinstance(value, type) and issubclass(value, dspy.Signature):
        return dspy.Predict(value)
    if isinstance(value, dspy.Module):
        return value.deepcopy()
    if callable(value):
        made = value()
        if isinstance(made, dspy.Module):
            return made
        raise ValueError(f"--program {spec}: calling it gave a {type(made).__name__}, not a dspy.Module")
    raise ValueError(f"--program {spec} is a {type(value).__name__}: expected a dspy.Module, a Signature or a factory")


def load_program(path: str | os.PathLike[str], program: str | dspy.Module | None = None) -> dspy.Module:
    """The program saved at ``path`` (a ``.json`` state file): loaded into ``program`` (a
    module, or ``MODULE:ATTR`` naming one) when given, else rebuilt from the file alone
    (:func:`program_from_state`).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: a file that is not JSON or not a DSPy program's state, a state that
            does not fit ``program``, a ``MODULE:ATTR`` that cannot be imported.
    """
    from dspy_promptmii.files import read_json

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no program file at {path}")
    state = read_json(path)
    if program is None:
        return program_from_state(state, str(path))
    module = _import_program(program) if isinstance(program, str) else program.deepcopy()
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} is not a saved DSPy program (a JSON object)")
    try:
        module.load_state({k: v for k, v in state.items() if k != "metadata"})
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path} does not fit the program given: {type(error).__name__}: {error}") from None
    return module


# -- output ---------------------------------------------------------------------------


def render_export(prompts: Sequence[ExportedPrompt], fmt: str = "text", protocol: Protocol | None = None) -> str:
    """The export as printed. ``text``: per predictor a header line, then each message
    under ``--- <role> ---``; ``messages``: a JSON object, predictor name -> its
    messages; ``json``: a JSON object with the protocol and, per predictor, labels,
    fields, slots, messages and the request settings.

    Raises ``ValueError`` for another format."""
    if fmt == "messages":
        return json.dumps({p.predictor: p.messages for p in prompts}, indent=2, ensure_ascii=False)
    if fmt == "json":
        data = {
            "format": JSON_FORMAT,
            "protocol": (protocol or Protocol()).to_dict(),
            "fill": "in the last message, replace each slot's last occurrence by the input field's value, in "
            "input_fields order",
            "predictors": [p.as_dict() for p in prompts],
        }
        return json.dumps(data, indent=2, ensure_ascii=False)
    if fmt != "text":
        raise ValueError(f"format must be one of {EXPORT_FORMATS}, got {fmt!r}")
    parts = []
    for p in prompts:
        where = ", ".join(f"{slot} = {name}" for name, slot in p.slots.items())
        settings = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in p.settings.items())
        lines = [f"=== predictor {p.predictor}: {len(p.messages)} message(s); slots: {where}; {settings} ==="]
        for message in p.messages:
            lines += [f"--- {message['role']} ---", message["content"]]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)

