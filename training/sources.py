"""Where meta-training tasks come from.

* Local task folders in the shared format (``<dir>/<name>/data.jsonl`` with ``text``,
  optional ``text_pair`` and a string ``label``), loaded with the package's own
  :func:`dspy_promptmii.data.load_task`; ``SPLITS.json`` names the ``train`` and ``dev``
  tasks and ``INDEX.tsv`` the overlap groups that must stay on one side of a split.
* Hugging Face hub datasets (needs the ``datasets`` library and a network), whose input
  and label columns are detected by heuristics (:func:`detect_columns`) or, optionally,
  by an LLM reached through any LiteLLM route (:func:`detect_columns_with_lm`).
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dspy_promptmii.data import LabelReader, TaskData, load_task, read_splits
from dspy_promptmii.secrets import protected_logger

logger = protected_logger(__name__)

__all__ = [
    "ColumnChoice",
    "ColumnDetectionError",
    "read_splits",
    "read_overlap_groups",
    "resolve_task_paths",
    "load_local_tasks",
    "describe_features",
    "detect_columns",
    "detect_columns_with_lm",
    "rows_from_columns",
    "load_hub_task",
]

#: Column names that usually hold the class (matched after lower-casing).
LABEL_COLUMN_NAMES = (
    "label",
    "labels",
    "gold_label",
    "label_text",
    "class",
    "classes",
    "category",
    "categories",
    "target",
    "sentiment",
    "polarity",
    "intent",
    "topic",
    "emotion",
    "stance",
    "coarse_label",
    "fine_label",
    "tag",
    "y",
)
_LABELISH = re.compile(r"(label|class|category|sentiment|intent|topic|emotion|stance|polarity)", re.IGNORECASE)
#: Known (first, second) input column pairs of pair-classification datasets, in order of preference.
PAIR_COLUMNS = (
    ("text", "text_pair"),
    ("premise", "hypothesis"),
    ("sentence1", "sentence2"),
    ("question1", "question2"),
    ("text_a", "text_b"),
    ("text1", "text2"),
    ("sentence_a", "sentence_b"),
    ("question", "sentence"),
    ("question", "passage"),
    ("query", "passage"),
    ("claim", "evidence"),
    ("context", "question"),
)
_ID_LIKE = re.compile(
    r"^(id|idx|index|uid|uuid|guid|url|link|path|file|filename|split|source|lang|language)$", re.IGNORECASE
)


class ColumnDetectionError(ValueError):
    """No usable input/label columns were found in a dataset."""


# --- local folders ------------------------------------------------------------------


def default_datasets_dir() -> Path:
    """The shared task folders: ``$PROMPTMII_SHARED_DATASETS``, else ``shared/datasets`` beside
    the repository checkout (absent on a user's clone: callers check before reading it)."""
    env = os.environ.get("PROMPTMII_SHARED_DATASETS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "datasets"


def read_overlap_groups(datasets_dir: str | Path) -> dict[str, str]:
    """Task name -> overlap group, from ``INDEX.tsv`` (column ``overlap_group``; ``-`` or
    empty means none). Tasks in one group share source texts and must stay on one side of
    any train/validation split. Tasks without a group are absent from the result."""
    file = Path(datasets_dir) / "INDEX.tsv"
    if not file.is_file():
        return {}
    groups: dict[str, str] = {}
    with file.open(encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            group = (row.get("overlap_group") or "").strip()
            if row.get("name") and group and group != "-":
                groups[row["name"]] = group
    return groups


def resolve_task_paths(names: Iterable[str], datasets_dir: str | Path | None) -> list[Path]:
    """Paths of tasks given by name (a folder under ``datasets_dir``) or by path (a folder
    holding ``data.jsonl``, or a ``.jsonl`` file). Errors list every name not found."""
    paths, missing = [], []
    for name in names:
        candidate = Path(name)
        if not candidate.exists() and datasets_dir is not None:
            candidate = Path(datasets_dir) / name
        if candidate.is_dir() and (candidate / "data.jsonl").is_file():
            paths.append(candidate)
        elif candidate.is_file() and candidate.suffix == ".jsonl":
            paths.append(candidate)
        else:
            missing.append(name)
    if missing:
        where = f" under {datasets_dir}" if datasets_dir is not None else ""
        raise FileNotFoundError(f"no task folder (with data.jsonl) or .jsonl file for {', '.join(missing)}{where}")
    return paths


def load_local_tasks(paths: Sequence[Path]) -> list[tuple[TaskData, str]]:
    """(task, source description) for each local task path."""
    return [(load_task(path), f"local:{path}") for path in paths]


# --- HF hub datasets: column detection ------------------------------------------------


@dataclass(frozen=True)
class ColumnChoice:
    """Which columns of a dataset are the input(s) and the label.

    ``label_names``: the class names when the label column is a ClassLabel (its integer
    values are then mapped to names); None for a column holding the labels themselves.
    """

    text: str
    label: str
    text_pair: str | None = None
    label_names: tuple[str, ...] | None = None
    how: str = "heuristics"


def describe_features(dataset: Any) -> dict[str, dict[str, Any]]:
    """Column name -> ``{"kind": "class_label"|"string"|"int"|"float"|"bool"|"other", "names": [...]}``
    from a ``datasets.Dataset``'s features (duck-typed: a ClassLabel is anything with
    ``names`` and ``str2int``; a Value anything with a ``dtype``)."""
    described: dict[str, dict[str, Any]] = {}
    for name, feature in dict(getattr(dataset, "features", {}) or {}).items():
        if hasattr(feature, "names") and hasattr(feature, "str2int"):
            described[name] = {"kind": "class_label", "names": [str(n) for n in feature.names]}
            continue
        dtype = str(getattr(feature, "dtype", ""))
        if dtype in ("string", "large_string"):
            kind = "string"
        elif dtype.startswith(("int", "uint")):
            kind = "int"
        elif dtype.startswith("float"):
            kind = "float"
        elif dtype == "bool":
            kind = "bool"
        else:
            kind = "other"
        described[name] = {"kind": kind}
    return described


def _mean_length(rows: Sequence[Mapping[str, Any]], column: str) -> float:
    values = [row.get(column) for row in rows]
    texts = [v for v in values if isinstance(v, str)]
    return sum(len(t) for t in texts) / len(texts) if texts else 0.0


def _distinct_ratio(rows: Sequence[Mapping[str, Any]], column: str) -> float:
    values = [row.get(column) for row in rows if row.get(column) is not None]
    return len({str(v) for v in values}) / len(values) if values else 1.0


def detect_columns(
    features: Mapping[str, Mapping[str, Any]],
    rows: Sequence[Mapping[str, Any]],
    max_label_ratio: float = 0.5,
) -> ColumnChoice:
    """Pick the input and label columns of a dataset by heuristics.

    Label: a ClassLabel column (one named like a label first), else a string/int/bool
    column named like a label (``label``, ``class``, ``category``, ``sentiment``, ...)
    whose distinct values are at most ``max_label_ratio`` of the sampled ``rows``.
    Input: a known pair of columns (``premise``/``hypothesis``, ``sentence1``/``sentence2``,
    ...) when both are text, else the text column with the longest mean length
    (id-like columns and the label excluded).

    Raises :class:`ColumnDetectionError` saying what is missing.
    """
    if not features:
        raise ColumnDetectionError("the dataset has no columns")
    kinds = {name: info.get("kind") for name, info in features.items()}

    def rank(name: str) -> tuple[int, int]:
        lower = name.lower()
        exact = LABEL_COLUMN_NAMES.index(lower) if lower in LABEL_COLUMN_NAMES else len(LABEL_COLUMN_NAMES)
        return (0 if exact < len(LABEL_COLUMN_NAMES) else 1 if _LABELISH.search(name) else 2, exact)

    label: str | None = None
    label_names: tuple[str, ...] | None = None
    class_labels = sorted((n for n, k in kinds.items() if k == "class_label"), key=rank)
    if class_labels:
        label = class_labels[0]
        label_names = tuple(features[label]["names"])
    else:
        candidates = sorted(
            (
                n
                for n, k in kinds.items()
                if k in ("string", "int", "bool") and rank(n)[0] < 2 and _distinct_ratio(rows, n) <= max_label_ratio
            ),
            key=rank,
        )
        label = candidates[0] if candidates else None
    if label is None:
        raise ColumnDetectionError(
            f"no label column: no ClassLabel feature and no low-cardinality column named like a label among "
            f"{sorted(features)}"
        )

    texts = [n for n, k in kinds.items() if k == "string" and n != label and not _ID_LIKE.match(n)]
    lowered = {n.lower(): n for n in texts}
    for first, second in PAIR_COLUMNS:
        if first in lowered and second in lowered:
            return ColumnChoice(text=lowered[first], text_pair=lowered[second], label=label, label_names=label_names)
    if not texts:
        raise ColumnDetectionError(f"no text column besides the label {label!r} among {sorted(features)}")
    text = max(texts, key=lambda n: (_mean_length(rows, n), n))
    return ColumnChoice(text=text, label=label, label_names=label_names)


_DETECT_PROMPT = """A dataset for text classification has these columns (name: type):
{columns}

Here are a few of its rows as JSON:
{rows}

Which column holds the class label, and which column(s) hold the text to classify? If the
task compares two texts (for example a premise and a hypothesis), give both text columns.
Answer with one JSON object and nothing else:
{{"text": "<column>", "text_pair": "<column or null>", "label": "<column>"}}"""


def detect_columns_with_lm(
    lm: Any,
    features: Mapping[str, Mapping[str, Any]],
    rows: Sequence[Mapping[str, Any]],
) -> ColumnChoice | None:
    """Ask an LM (any callable ``dspy.LM``, e.g. ``dspy.LM("openai/gpt-4o-mini")``) which
    columns are the input(s) and the label. Returns None, with a warning, when the reply
    is not a JSON object naming existing columns; the caller then uses the heuristics."""
    columns = "\n".join(f"- {name}: {info.get('kind')}" for name, info in features.items())
    shown = "\n".join(json.dumps({k: _shorten(v) for k, v in row.items()}, ensure_ascii=False) for row in rows[:3])
    try:
        outputs = lm(_DETECT_PROMPT.format(columns=columns, rows=shown), temperature=0.0)
    except Exception as error:  # noqa: BLE001 - any client error falls back to heuristics
        logger.warning("LLM column detection failed (%s); using heuristics", error)
        return None
    reply = outputs[0] if outputs else ""
    reply = reply.get("text", "") if isinstance(reply, dict) else str(reply or "")
    match = re.search(r"\{.*\}", reply, re.DOTALL)
    try:
        answer = json.loads(match.group(0)) if match else None
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        logger.warning("LLM column detection gave no JSON object (%r); using heuristics", reply[:200])
        return None
    text, pair, label = answer.get("text"), answer.get("text_pair"), answer.get("label")
    pair = pair if pair not in (None, "", "null", "none") else None
    unknown = [c for c in (text, label, pair) if c is not None and c not in features]
    if not isinstance(text, str) or not isinstance(label, str) or unknown or text == label:
        logger.warning("LLM column detection named unusable columns (%r); using heuristics", answer)
        return None
    names = features[label].get("names")
    return ColumnChoice(text=text, text_pair=pair, label=label, label_names=tuple(names) if names else None, how="llm")


def _shorten(value: Any, limit: int = 300) -> Any:
    return value[:limit] + "..." if isinstance(value, str) and len(value) > limit else value


def rows_from_columns(
    rows: Iterable[Mapping[str, Any]], choice: ColumnChoice, source: str = "dataset"
) -> list[dict[str, str]]:
    """Rows in the shared task format. Rows with an empty input, no label (``None`` or a
    blank string: unlabelled rows), or a ClassLabel value outside its names (e.g. -1 for
    unlabelled test splits) are dropped, as are exact duplicates (the first copy is kept;
    copies with another label are dropped).

    Labels follow the one rule of task files (:func:`dspy_promptmii.data.label_text`):
    strings stripped, integers as decimal text, booleans as ``"true"``/``"false"``.

    Raises ``ValueError`` naming ``source``, the row index and the column: a label value
    the rule refuses (a list, an object, a fractional number), or two raw values (or two
    ClassLabel names) that become one label.
    """
    out: list[dict[str, str]] = []
    seen: dict[tuple[str, ...], str] = {}
    conflicted: set[tuple[str, ...]] = set()
    read_label = LabelReader()
    names: list[str] | None = None
    if choice.label_names is not None:
        names = [
            read_label(name, f"{source}: ClassLabel name {index} of column {choice.label!r}")
            for index, name in enumerate(choice.label_names)
        ]
    for index, row in enumerate(rows):
        text = row.get(choice.text)
        pair = row.get(choice.text_pair) if choice.text_pair else None
        value = row.get(choice.label)
        if not isinstance(text, str) or not text.strip() or value is None:
            continue
        if choice.text_pair and (not isinstance(pair, str) or not pair.strip()):
            continue
        if names is not None:
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(names):
                continue
            label = names[value]
        else:
            if isinstance(value, str) and not value.strip():
                continue
            label = read_label(value, f"{source} row {index} (column {choice.label!r})")
        key = (text, pair) if choice.text_pair else (text,)
        if key in seen:
            if seen[key] != label:
                conflicted.add(key)
            continue
        seen[key] = label
        record = {"text": text}
        if choice.text_pair:
            record["text_pair"] = pair
        record["label"] = label
        out.append(record)
    if conflicted:
        out = [
            r for r in out if ((r["text"], r.get("text_pair")) if choice.text_pair else (r["text"],)) not in conflicted
        ]
    return out


def _safe_name(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", spec).strip("_") or "dataset"


def load_hub_task(
    spec: str,
    *,
    max_rows: int = 3000,
    seed: int = 0,
    detect_lm: Any = None,
    max_label_ratio: float = 0.5,
    cache_dir: str | None = None,
) -> tuple[TaskData, str, ColumnChoice]:
    """A task from the HF hub. ``spec`` is ``name``, ``name:config``, ``name@split`` or
    ``name:config@split``; without a split every split is pooled. Rows are capped at
    ``max_rows`` by a seeded sample (the shared folders were made the same way).

    Needs the ``datasets`` library and a network (or a populated HF cache).
    """
    try:
        import datasets
    except ImportError:
        raise ImportError(
            "loading HF hub datasets needs the datasets library: pip install 'dspy-promptmii[train]'"
        ) from None
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    loaded = datasets.load_dataset(name, config or None, split=split or None, cache_dir=cache_dir)
    parts = [loaded] if split else [loaded[s] for s in loaded]
    if not parts:
        raise ColumnDetectionError(f"{spec}: the dataset has no splits")
    features = describe_features(parts[0])
    sample = [dict(r) for r in parts[0].select(range(min(200, len(parts[0]))))]
    choice = detect_columns_with_lm(detect_lm, features, sample) if detect_lm is not None else None
    if choice is None:
        choice = detect_columns(features, sample, max_label_ratio=max_label_ratio)
    logger.info(
        "%s: input %r%s, label %r (%s)",
        spec,
        choice.text,
        f" + {choice.text_pair!r}" if choice.text_pair else "",
        choice.label,
        choice.how,
    )
    needed = [c for c in (choice.text, choice.text_pair, choice.label) if c]
    usable = [part for part in parts if all(c in part.column_names for c in needed)]
    rows = rows_from_columns(itertools.chain.from_iterable(usable), choice, source=spec)
    if not rows:
        raise ColumnDetectionError(f"{spec}: no labelled rows with columns {choice}")
    if len(rows) > max_rows:
        keep = sorted(random.Random(seed).sample(range(len(rows)), max_rows))
        rows = [rows[i] for i in keep]
    return TaskData(name=_safe_name(spec), rows=rows), f"hf:{spec}", choice
