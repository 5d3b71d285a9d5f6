"""The meta-training data builder (training/build_data.py) and its helpers: filters, the
paper's context proportions, disjoint test examples, determinism, byte-identical
meta-prompts with PromptMIIOptimizer, contamination, and files OpenRLHF can read."""

from __future__ import annotations

import ast
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import dspy  # noqa: E402
import pytest
from fakes import fake_lm  # noqa: E402

from dspy_promptmii import PromptMIIOptimizer  # noqa: E402
from dspy_promptmii.data import TaskData, load_task  # noqa: E402
from training import build_data  # noqa: E402
from training.build_data import BuildConfig, context_seed, plan_contexts, sample_context  # noqa: E402
from training.tokens import ApproxCounter  # noqa: E402

GGUF = Path.home() / ".cache" / "dspy_promptmii" / "models" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"


# --- a tiny datasets folder, made here so these tests need nothing outside the repo --------------


def _write_task(root: Path, name: str, rows: list[dict[str, str]]) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    with (folder / "data.jsonl").open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


@pytest.fixture()
def tiny_datasets(tmp_path: Path) -> Path:
    root = tmp_path / "datasets"
    weather = ["sunny", "rainy", "snowy"]
    _write_task(
        root,
        "weather",
        [
            {"text": f"Report {i}: the sky over town {i} looks {weather[i % 3]} today", "label": weather[i % 3]}
            for i in range(90)
        ],
    )
    _write_task(
        root,
        "entail_pair",
        [
            {
                "text": f"Premise number {i} about a {'cat' if i % 2 else 'dog'}.",
                "text_pair": f"Hypothesis {i}: an animal {'sleeps' if i % 2 else 'runs'}.",
                "label": "entailment" if i % 2 else "neutral",
            }
            for i in range(70)
        ],
    )
    _write_task(root, "one_label", [{"text": f"only text {i}", "label": "same"} for i in range(40)])
    _write_task(root, "too_unique", [{"text": f"row {i}", "label": f"class{i % 20}"} for i in range(30)])
    _write_task(root, "too_small", [{"text": f"small {i}", "label": str(i % 2)} for i in range(12)])
    # The evaluation task shares three texts (modulo case and spaces) with `weather`.
    _write_task(
        root,
        "eval_task",
        [
            {"text": "REPORT 0: the sky over town 0 looks   sunny today", "label": "a"},
            {"text": "Report 1: the sky over town 1 looks rainy today", "label": "b"},
            {"text": "report 2: THE sky over town 2 looks snowy today ", "label": "a"},
            {"text": "something unrelated", "label": "b"},
        ],
    )
    (root / "SPLITS.json").write_text(
        json.dumps(
            {
                "train": ["weather", "entail_pair", "one_label", "too_unique", "too_small"],
                "dev": ["eval_task"],
            }
        )
    )
    return root


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    # "\n" only: splitlines() also splits at U+2028 and the like, which task texts hold unescaped.
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def _run_cli(datasets: Path, out: Path, *extra: str) -> dict[str, Any]:
    assert build_data.main(["--datasets", str(datasets), "--out", str(out), "--no-progress", *extra]) == 0
    return json.loads((out / "summary.json").read_text())


def test_cli_on_a_tiny_folder_filters_plans_and_writes_openrlhf_lines(tiny_datasets: Path, tmp_path: Path) -> None:
    summary = _run_cli(tiny_datasets, tmp_path / "out", "--valid-fraction", "0", "--extra-shots", "10:1.0,50:0.5")
    filtered = summary["tasks"]["filtered"]
    assert set(filtered) == {"one_label", "too_unique", "too_small"}
    assert "only 1 label" in filtered["one_label"]
    assert "unique labels" in filtered["too_unique"]
    assert "fewer than 25" in filtered["too_small"]
    train = _read_jsonl(tmp_path / "out" / "train.jsonl")
    assert (tmp_path / "out" / "valid.jsonl").read_text() == ""
    # Every kept task gets a 5-shot and (fraction 1.0) a 10-shot context; one of the two a 50-shot one.
    shots = Counter(line["label"]["n_shot"] for line in train)
    assert shots == {5: 2, 10: 2, 50: 1}
    for line in train:
        assert set(line) == {"prompt", "label", "datasource"}
        assert line["prompt"][0]["role"] == "user" and len(line["prompt"]) == 1
        label = line["label"]
        assert len(label["test_ids"]) == len(label["test_inputs"]) == len(label["test_labels"]) == 20
        assert len(label["context_ids"]) == label["n_shot"]
        assert not set(label["context_ids"]) & set(label["test_ids"])
        assert all(len(row) == len(label["input_fields"]) for row in label["test_inputs"])
        assert label["template"] == "meta2"
    pair = next(line for line in train if line["label"]["task"] == "entail_pair")
    assert pair["label"]["input_fields"] == ["text", "text_pair"]
    assert "Text pair: Hypothesis" in pair["prompt"][0]["content"]
    # Contamination: 3 of weather's 90 rows match the evaluation task after normalisation.
    contamination = summary["contamination"]
    assert contamination["eval_tasks"] == ["eval_task"]
    assert contamination["rows_overlapping"] == 3
    assert contamination["row_overlap_rate"] == pytest.approx(3 / 160)
    assert contamination["per_task"] == {"weather": 3}
    assert "--data.label_key" in summary["openrlhf_flags"]


def test_label_fields_have_one_type_across_lines(tiny_datasets: Path, tmp_path: Path) -> None:
    """The datasets JSON loader (OpenRLHF's) needs one schema for all lines."""
    _run_cli(tiny_datasets, tmp_path / "out", "--valid-fraction", "0")
    lines = _read_jsonl(tmp_path / "out" / "train.jsonl")

    def shape(value: Any) -> Any:
        if isinstance(value, list):
            return ["list", shape(value[0]) if value else None]
        return type(value).__name__

    shapes = {json.dumps({k: shape(v) for k, v in line["label"].items()}, sort_keys=True) for line in lines}
    assert len(shapes) == 1


def test_deterministic_by_seed(tiny_datasets: Path, tmp_path: Path) -> None:
    _run_cli(tiny_datasets, tmp_path / "a", "--seed", "3")
    _run_cli(tiny_datasets, tmp_path / "b", "--seed", "3")
    _run_cli(tiny_datasets, tmp_path / "c", "--seed", "4")
    for name in ("train.jsonl", "valid.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "train.jsonl").read_bytes() != (tmp_path / "c" / "train.jsonl").read_bytes()


def test_prompts_over_the_limit_are_dropped_and_counted(tiny_datasets: Path, tmp_path: Path) -> None:
    summary = _run_cli(tiny_datasets, tmp_path / "out", "--valid-fraction", "0", "--max-prompt-tokens", "300")
    written = _read_jsonl(tmp_path / "out" / "train.jsonl")
    counter = ApproxCounter()
    assert all(counter.count_chat(line["prompt"]) <= 300 for line in written)
    assert summary["dropped"]["too_long_total"] >= 1
    assert (
        summary["prompts"]["train"]["written"] + summary["dropped"]["too_long_total"]
        == summary["prompts"]["train"]["planned"]
    )


def test_drop_contaminated_keeps_overlapping_rows_out(tiny_datasets: Path, tmp_path: Path) -> None:
    summary = _run_cli(
        tiny_datasets, tmp_path / "out", "--drop-contaminated", "--repeats", "4", "--valid-fraction", "0"
    )
    assert summary["contamination"]["examples_used_overlapping"] == 0
    for line in _read_jsonl(tmp_path / "out" / "train.jsonl"):
        if line["label"]["task"] == "weather":
            assert not {0, 1, 2} & set(line["label"]["context_ids"] + line["label"]["test_ids"])


def test_evaluation_task_in_training_is_refused(tiny_datasets: Path, tmp_path: Path, capsys) -> None:
    code = build_data.main(
        [
            "--datasets",
            str(tiny_datasets),
            "--out",
            str(tmp_path / "o"),
            "--no-progress",
            "--tasks",
            "weather",
            "eval_task",
        ]
    )
    # One line, no traceback (issue 21: every user-facing error is one line).
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err.startswith("python -m training.build_data: error: ") and "also evaluation tasks" in err


def test_validation_split_keeps_overlap_groups_together() -> None:
    names = [f"t{i}" for i in range(10)]
    groups = {"t1": "g", "t2": "g", "t3": "g"}
    for seed in range(20):
        train, valid = build_data.split_valid(names, groups, None, 0.2, seed)
        assert sorted(train + valid) == sorted(names)
        in_valid = {n for n in ("t1", "t2", "t3") if n in valid}
        assert in_valid in (set(), {"t1", "t2", "t3"})
        assert valid
    train, valid = build_data.split_valid(names, groups, ["t2"], 0.0, 0)
    assert valid == ["t1", "t2", "t3"]
    with pytest.raises(ValueError, match="not being built"):
        build_data.split_valid(names, groups, ["nope"], 0.0, 0)


def _optimizer_meta_prompt(task: TaskData, pool_rows: list[dict[str, Any]], n: int, seed: int, template: str) -> str:
    """What PromptMIIOptimizer sends to its generator for this trainset, n and seed."""
    lm, engine = fake_lm("Decide the label from the text.", model="fake/generator")
    optimizer = PromptMIIOptimizer(generator_lm=lm, n=n, seed=seed, template=template)
    optimizer.compile(dspy.Predict(task.signature()), trainset=task.examples(pool_rows))
    return engine.prompt(0)


def _check_identical_to_optimizer(task: TaskData, line: dict[str, Any]) -> None:
    label = line["label"]
    held = set(label["test_ids"])
    pool = [row for i, row in enumerate(task.rows) if i not in held]
    expected = _optimizer_meta_prompt(task, pool, label["n_shot"], label["context_seed"], label["template"])
    assert line["prompt"][0]["content"] == expected


def test_prompt_is_byte_identical_to_what_the_optimizer_renders(tiny_datasets: Path, tmp_path: Path) -> None:
    _run_cli(tiny_datasets, tmp_path / "out", "--valid-fraction", "0", "--extra-shots", "10:1.0", "--template", "meta1")
    for line in _read_jsonl(tmp_path / "out" / "train.jsonl"):
        _check_identical_to_optimizer(load_task(tiny_datasets / line["label"]["task"]), line)


def test_sample_context_prefix_property_and_disjointness(tiny_datasets: Path) -> None:
    task = load_task(tiny_datasets / "weather")
    small, test_a = sample_context(task, 5, 11, 20)
    large, test_b = sample_context(task, 30, 11, 20)
    assert test_a == test_b and large[:5] == small
    assert not set(large) & set(test_b)
    assert {task.rows[i]["label"] for i in small} == {"sunny", "rainy", "snowy"}  # stratified first
    with pytest.raises(ValueError, match="fewer than"):
        sample_context(task, 80, 1, 20)


def test_plan_contexts_proportions() -> None:
    config = BuildConfig()
    available = {f"task{i:02d}": 3000 for i in range(40)}
    specs = plan_contexts(available, config, "train")
    per_shot = Counter(s.n_shot for s in specs)
    assert per_shot == {5: 40, 10: 12, 20: 8, 50: 4}
    # Only tasks with enough rows get a large context.
    available["task00"] = 60
    specs = plan_contexts(available, config, "train")
    assert all(s.task != "task00" for s in specs if s.n_shot == 50)
    assert context_seed(0, "a", 5, 0) == context_seed(0, "a", 5, 0) != context_seed(0, "a", 5, 1)


def test_build_rejects_bad_config() -> None:
    with pytest.raises(ValueError, match="sampling"):
        BuildConfig(sampling="nope")
    with pytest.raises(ValueError, match="placeholder"):
        BuildConfig(template="no placeholders here")
    with pytest.raises(ValueError, match="max_instruction_tokens must be an integer >= 1 or None"):
        BuildConfig(max_instruction_tokens=-5)
    assert BuildConfig(max_instruction_tokens=None).max_instruction_tokens is None


def _openrlhf_preprocess() -> Any:
    """OpenRLHF 0.11.2's own `preprocess_data` (datasets/prompts_dataset.py), taken out of
    the installed file with ast because that module imports torch."""
    from training.openrlhf_compat import OpenRLHFUnavailable, openrlhf_dir

    try:
        source = (openrlhf_dir() / "datasets" / "prompts_dataset.py").read_text()
    except OpenRLHFUnavailable as error:
        pytest.skip(str(error))
    tree = ast.parse(source)
    keep = [
        n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in ("_str_to_content_list", "preprocess_data")
    ]
    keep.insert(0, ast.parse("import copy").body[0])
    namespace: dict[str, Any] = {}
    exec(compile(ast.Module(body=keep, type_ignores=[]), "prompts_dataset.py", "exec"), namespace)
    return namespace["preprocess_data"]


def test_lines_pass_openrlhf_preprocessing(tiny_datasets: Path, tmp_path: Path) -> None:
    preprocess = _openrlhf_preprocess()
    _run_cli(tiny_datasets, tmp_path / "out")

    def chat_template(chat: list[dict[str, Any]], tokenize: bool, add_generation_prompt: bool) -> str:
        assert all(isinstance(m["content"], str) for m in chat), "content must stay text (no <image> parts)"
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in chat) + "<|im_start|>assistant\n"

    for name in ("train.jsonl", "valid.jsonl"):
        for line in _read_jsonl(tmp_path / "out" / name):
            prompt, label = preprocess(line, None, "prompt", "label", chat_template)
            assert line["prompt"][0]["content"] in prompt and prompt.endswith("assistant\n")
            assert label is line["label"]


# --- the shared datasets (../shared/datasets; skipped when absent) -------------------------------


@pytest.fixture(scope="module")
def shared_build(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    shared = request.getfixturevalue("shared_datasets")
    out = tmp_path_factory.mktemp("shared_build")
    summary = _run_cli(shared, out, "--seed", "0")
    return out, summary


@pytest.mark.shared_data
def test_shared_build_follows_the_paper(shared_datasets: Path, shared_build: tuple[Path, dict]) -> None:
    out, summary = shared_build
    splits = json.loads((shared_datasets / "SPLITS.json").read_text())
    assert sorted(summary["tasks"]["train"] + summary["tasks"]["valid"]) == sorted(splits["train"])
    assert summary["tasks"]["filtered"] == {}
    assert summary["contamination"]["eval_tasks"] == sorted(splits["dev"])
    assert summary["contamination"]["row_overlap_rate"] < 0.01
    train = _read_jsonl(out / "train.jsonl")
    n_tasks = len(summary["tasks"]["train"])
    per_shot = {k: len({x["label"]["task"] for x in train if x["label"]["n_shot"] == k}) for k in (5, 10, 20, 50)}
    assert per_shot[5] == n_tasks
    for k, fraction in build_data.PAPER_EXTRA_SHOTS.items():
        assert per_shot[k] == round(fraction * n_tasks) - summary["dropped"]["too_long"].get(f"train:{k}", 0)
    # Overlap groups stay on one side of the validation split.
    groups = build_data.read_overlap_groups(shared_datasets)
    for group in set(groups.values()):
        members = {n for n, g in groups.items() if g == group and n in splits["train"]}
        assert members <= set(summary["tasks"]["train"]) or members <= set(summary["tasks"]["valid"])
    for line in train + _read_jsonl(out / "valid.jsonl"):
        label = line["label"]
        assert not set(label["context_ids"]) & set(label["test_ids"])
        assert len(label["test_ids"]) == 20 and len(label["context_ids"]) == label["n_shot"]


@pytest.mark.shared_data
def test_shared_build_is_deterministic(shared_datasets: Path, shared_build: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = shared_build
    _run_cli(shared_datasets, tmp_path / "again", "--seed", "0")
    assert (tmp_path / "again" / "train.jsonl").read_bytes() == (out / "train.jsonl").read_bytes()
    assert (tmp_path / "again" / "valid.jsonl").read_bytes() == (out / "valid.jsonl").read_bytes()


@pytest.mark.shared_data
def test_shared_prompts_match_the_optimizer(shared_datasets: Path, shared_build: tuple[Path, dict]) -> None:
    out, _ = shared_build
    lines = _read_jsonl(out / "train.jsonl") + _read_jsonl(out / "valid.jsonl")
    # One line per n-shot, plus every pair-input task's first line.
    chosen: dict[Any, dict] = {}
    for line in lines:
        label = line["label"]
        chosen.setdefault(label["n_shot"], line)
        if len(label["input_fields"]) > 1:
            chosen.setdefault(label["task"], line)
    assert any(len(x["label"]["input_fields"]) > 1 for x in chosen.values())
    for line in chosen.values():
        _check_identical_to_optimizer(load_task(shared_datasets / line["label"]["task"]), line)


@pytest.mark.shared_data
def test_approximate_counter_over_counts_the_qwen_tokenizer(shared_build: tuple[Path, dict]) -> None:
    if not GGUF.is_file():
        pytest.skip(f"the embedded model's GGUF (for its tokenizer) is not at {GGUF}")
    pytest.importorskip("llama_cpp")
    from training.tokens import GGUFCounter

    out, _ = shared_build
    exact, approx = GGUFCounter(GGUF), ApproxCounter()
    for line in _read_jsonl(out / "train.jsonl"):
        real = exact.count_chat(line["prompt"])
        assert real > exact.count(line["prompt"][0]["content"])  # the chat template adds tokens
        assert approx.count_chat(line["prompt"]) >= real
    assert math.isfinite(real)
