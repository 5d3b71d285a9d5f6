"""The instruction library: instructions for meta-training tasks that the follower scored
well, shown to the generator as worked examples (``PromptMIIOptimizer(exemplars=K)``).

The packaged library (``dspy_promptmii/data/instruction_library.json``) is built by
``python -m training.build_library`` (see training/README.md): for every meta-training
task, the generator wrote several candidate instructions, the follower scored each with
the training reward (macro-F1 on held-out rows of that task), and the best one was kept
when it beat the naive instruction. No development or evaluation task is in it.

Which entries a task gets (:func:`select_exemplars`): the ``k`` entries whose text
(labels and sample inputs) is most similar to the task's (labels and shown inputs), by
cosine similarity of TF-IDF vectors of character 3-5-grams (scikit-learn), so that
tasks in any language and script are compared; ties go to the entry with the larger
gain over the naive instruction, then to the task name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from functools import lru_cache
from importlib import resources
from typing import Any

from dspy_promptmii.files import read_json
from dspy_promptmii.secrets import protected_logger

logger = protected_logger(__name__)

__all__ = ["LIBRARY_FILE", "load_library", "check_entries", "select_exemplars", "entry_text"]

#: The packaged library, inside the package's data folder.
LIBRARY_FILE = "instruction_library.json"
_REQUIRED = ("task", "labels", "instruction")


def check_entries(entries: Any, source: str = "the library") -> list[dict[str, Any]]:
    """``entries`` checked as a library file's are (``ValueError`` naming the entry), as
    copies."""
    if not isinstance(entries, list):
        raise ValueError(f"{source}: an instruction library holds a list of entries under 'entries'")
    for index, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise ValueError(f"{source}: entry {index} is a {type(entry).__name__}, not an object")
        missing = [key for key in _REQUIRED if not entry.get(key)]
        if missing:
            raise ValueError(f"{source}: entry {index} has no {', '.join(missing)}")
        if isinstance(entry["labels"], (str, bytes)) or not isinstance(entry["labels"], Sequence):
            raise ValueError(f"{source}: entry {index} has labels {entry['labels']!r}, not a list of labels")
        if not isinstance(entry["instruction"], str):
            raise ValueError(f"{source}: entry {index} has an instruction that is not text")
        inputs = entry.get("inputs")
        if inputs is not None and (isinstance(inputs, (str, bytes)) or not isinstance(inputs, Sequence)):
            raise ValueError(f"{source}: entry {index} has inputs {inputs!r}, not a list of sample inputs")
        for key in ("reward", "naive_reward"):
            value = entry.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{source}: entry {index} has {key} {value!r}, not a number")
    return [dict(entry) for entry in entries]


@lru_cache(maxsize=4)
def _load(path: str | None) -> tuple[dict[str, Any], ...]:
    if path is None:
        with resources.files("dspy_promptmii").joinpath("data", LIBRARY_FILE).open(encoding="utf-8") as handle:
            data = json.load(handle)
        source = f"the packaged {LIBRARY_FILE}"
    else:
        try:
            data = read_json(path)
        except (OSError, ValueError) as error:
            raise ValueError(f"instruction library {path} cannot be read: {error}") from None
        source = path
    entries = data.get("entries") if isinstance(data, Mapping) else data
    return tuple(check_entries(entries, source))


def load_library(path: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """The entries of an instruction library file (default: the packaged one).

    Each entry has at least ``task``, ``labels`` and ``instruction``; the packaged one
    also ``inputs`` (sample inputs), ``reward`` and ``naive_reward`` (the follower's
    macro-F1 with the instruction and with the naive one), ``template``, ``generator``
    and ``follower``.

    Raises:
        ValueError: the file cannot be read, is not JSON, or an entry lacks a required key.
    """
    return [dict(entry) for entry in _load(None if path is None else os.fspath(path))]


def entry_text(labels: Sequence[Any], inputs: Sequence[Any]) -> str:
    """The text a task is compared by: its labels and sample inputs."""
    return " ".join([*(str(label) for label in labels), *(str(text) for text in inputs)])


def select_exemplars(
    library: Sequence[Mapping[str, Any]], labels: Sequence[Any], inputs: Sequence[Any], k: int
) -> list[dict[str, Any]]:
    """The ``k`` library entries most similar to a task (see the module docstring), most
    similar first. Returns fewer when the library is smaller; none for ``k`` = 0."""
    if k <= 0 or not library:
        return []
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.metrics.pairwise import cosine_similarity

    documents = [entry_text(entry["labels"], entry.get("inputs") or ()) for entry in library]
    vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), lowercase=True, sublinear_tf=True)
    matrix = vectorizer.fit_transform([*documents, entry_text(labels, inputs)])
    similarity = cosine_similarity(matrix[-1], matrix[:-1]).ravel()

    def gain(entry: Mapping[str, Any]) -> float:
        return float(entry.get("reward") or 0.0) - float(entry.get("naive_reward") or 0.0)

    order = sorted(
        range(len(library)), key=lambda i: (-round(float(similarity[i]), 6), -gain(library[i]), str(library[i]["task"]))
    )
    return [dict(library[i], similarity=round(float(similarity[i]), 4)) for i in order[:k]]
