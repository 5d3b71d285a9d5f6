"""Input validation: the one label rule in every reader of task data, UTF-8 errors with
file:line, and `promptmii induce|demo` / `python -m benchmarks run` options checked before
any model pull, server start or LM call, with no `.partial` file left on a failed write."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from fakes import fake_lm, word_count

from dspy_promptmii import cli, demo, files, routes
from dspy_promptmii.data import LabelReader, TaskData, label_text, load_jsonl, load_task
from dspy_promptmii.routes import Endpoint

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest` run without the repository root on sys.path
    sys.path.insert(0, str(ROOT))

from training.sources import ColumnChoice, rows_from_columns  # noqa: E402

REPLY = "Decide what the user asks for."
LABELS = {"PlayMusic": "play some jazz", "GetWeather": "will it rain", "BookRestaurant": "a table for two"}


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def error_of(path: Path) -> str:
    with pytest.raises(ValueError) as info:
        load_jsonl(path)
    return str(info.value)


# --- the label rule --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "label"),
    [("x", "x"), ("  x \t", "x"), (1, "1"), (-3, "-3"), (0, "0"), (2.0, "2"), (True, "true"), (False, "false")],
)
def test_label_rule_converts_strings_integers_and_booleans(raw, label):
    assert label_text(raw) == label


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (None, "null"),
        ("", "empty"),
        ("   ", "empty"),
        (["x", "y"], "a list"),
        ({"k": 1}, "an object"),
        (1.5, "integral"),
        (float("nan"), "integral"),
        (float("inf"), "integral"),
    ],
)
def test_label_rule_refuses_everything_else(raw, reason):
    with pytest.raises(ValueError, match=reason):
        label_text(raw)


@pytest.mark.parametrize(
    ("bad", "needle"),
    [(["x", "y"], "a list"), ({"k": 1}, "an object"), (None, "null"), ("", "empty"), (0.5, "integral")],
)
def test_task_file_refuses_a_bad_label_with_file_and_line(tmp_path, bad, needle):
    path = write_rows(tmp_path / "d.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": bad}])
    message = error_of(path)
    assert message.startswith(f"{path}:2: 'label'") and needle in message


@pytest.mark.parametrize(("first", "second"), [(1, "1"), (" x", "x"), (True, "true"), (1, 1.0), ("x", "x ")])
def test_two_spellings_of_one_label_are_an_error_naming_both_lines(tmp_path, first, second):
    rows = [{"text": "a", "label": first}, {"text": "b", "label": "other"}, {"text": "c", "label": second}]
    message = error_of(write_rows(tmp_path / "d.jsonl", rows))
    path = tmp_path / "d.jsonl"
    assert message.startswith(f"{path}:3: 'label' {json.dumps(second)}"), message
    assert f"{json.dumps(first)} at {path}:1" in message


def test_one_spelling_repeated_is_one_label(tmp_path):
    rows = [{"text": t, "label": label} for t, label in (("a", " x"), ("b", " x"), ("c", 7), ("d", 7))]
    task = load_task(write_rows(tmp_path / "d.jsonl", rows))
    assert task.labels == ["7", "x"]


def test_the_format_line_lists_each_label_once(tmp_path):
    """The reported instance: ' x' and 'x' were two labels and the format line read 'x, x, y'."""
    rows = [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}, {"text": "c", "label": "x"}]
    assert load_task(write_rows(tmp_path / "d.jsonl", rows)).labels == ["x", "y"]
    rows[2]["label"] = " x"
    with pytest.raises(ValueError, match="both become the label 'x'"):
        load_task(write_rows(tmp_path / "e.jsonl", rows))


def test_text_pair_must_be_a_non_empty_string(tmp_path):
    rows = [{"text": "a", "text_pair": "p", "label": "x"}, {"text": "b", "text_pair": 3, "label": "x"}]
    assert error_of(write_rows(tmp_path / "d.jsonl", rows)).startswith(f"{tmp_path / 'd.jsonl'}:2: 'text_pair'")
    rows[1]["text_pair"] = " "
    assert error_of(write_rows(tmp_path / "e.jsonl", rows)).startswith(f"{tmp_path / 'e.jsonl'}:2: 'text_pair'")


def test_task_data_built_by_hand_needs_label_strings():
    with pytest.raises(ValueError, match="row 1: label 1"):
        TaskData("t", [{"text": "a", "label": "x"}, {"text": "b", "label": 1}])
    with pytest.raises(ValueError, match="row 0"):
        TaskData("t", [{"text": "a", "label": " x"}])


def test_label_reader_is_the_one_rule_of_hub_rows_too():
    choice = ColumnChoice(text="t", label="y")
    rows = [{"t": t, "y": y} for t, y in (("a", 1), ("b", True), ("c", " z "), ("d", None), ("e", ""))]
    assert [r["label"] for r in rows_from_columns(rows, choice)] == ["1", "true", "z"]  # unlabelled rows dropped
    with pytest.raises(ValueError, match=r"ds row 1 \(column 'y'\): 'label': a list"):
        rows_from_columns([{"t": "a", "y": "x"}, {"t": "b", "y": ["x"]}], choice, source="ds")
    with pytest.raises(ValueError, match=r"ds row 1 .* and 'label' 1 at ds row 0"):
        rows_from_columns([{"t": "a", "y": 1}, {"t": "b", "y": "1"}], choice, source="ds")
    names = ColumnChoice(text="t", label="y", label_names=("neg ", "pos"))
    assert [r["label"] for r in rows_from_columns([{"t": "a", "y": 0}, {"t": "b", "y": 1}], names)] == ["neg", "pos"]
    with pytest.raises(ValueError, match="ClassLabel name 1"):
        rows_from_columns([], ColumnChoice(text="t", label="y", label_names=("x", " x")), source="ds")


def test_label_reader_names_both_places():
    read = LabelReader()
    assert read(1, "a:1") == "1"
    with pytest.raises(ValueError, match=r"^b:2: 'label' \"1\" and 'label' 1 at a:1"):
        read("1", "b:2")


# --- UTF-8 ---------------------------------------------------------------------------


def test_bytes_that_are_not_utf8_name_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a", "label": "x"}\n\n{"text": "caf\xe9", "label": "x"}\n')
    message = error_of(path)
    assert message.startswith(f"{path}:3: not valid UTF-8") and "0xe9" in message


def test_a_byte_order_mark_is_allowed(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a", "label": "x"}\n')
    assert load_jsonl(path) == [{"text": "a", "label": "x"}]


def test_benchmark_loads_refuse_bad_labels_too(tmp_path):
    """The benchmarks read task folders with the same reader."""
    from benchmarks.tasks import resolve_tasks

    (tmp_path / "t").mkdir()
    write_rows(tmp_path / "t" / "data.jsonl", [{"text": "a", "label": {"k": 1}}])
    [folder] = resolve_tasks(tmp_path, ["t"])
    with pytest.raises(ValueError, match=r"data.jsonl:1: 'label': an object"):
        load_task(folder)


# --- the promptmii command: every option before any LM -----------------------------------


class NoPool:
    """Stands in for LMPool where none may be made: records that one was."""

    made = 0

    def __init__(self, **kwargs):
        NoPool.made += 1
        raise AssertionError("an LM pool was set up before the options were checked")


class FakePool:
    """A pool of fake LMs; ``on_generate`` runs during the generator call."""

    on_generate = None

    def __init__(self, **kwargs):
        pass

    def endpoint(self, route, **kwargs):
        def reply(request):
            if FakePool.on_generate is not None:
                FakePool.on_generate()
            return REPLY

        settings = {k: v for k, v in kwargs.items() if k not in ("api_base", "cache")}
        lm, _ = fake_lm(reply, model=f"fake/{route}")
        return Endpoint(
            lm=lm.copy(**settings), route=f"fake/{route}", token_counter=word_count, context_tokens=None,
            constrained_style="json_schema",
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        pass


@pytest.fixture
def no_pool(monkeypatch):
    NoPool.made = 0
    monkeypatch.setattr(routes, "LMPool", NoPool)
    monkeypatch.setattr(demo, "LMPool", NoPool)
    return NoPool


@pytest.fixture
def task_file(tmp_path: Path) -> Path:
    rows = [{"text": f"{text} {i}", "label": label} for label, text in LABELS.items() for i in range(3)]
    return write_rows(tmp_path / "intents.jsonl", rows)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("promptmii: error: "), err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"


@pytest.mark.parametrize("generator", ["local", "hosted_vllm/some-model"])
def test_induce_checks_the_template_before_any_model_or_server(capsys, task_file, no_pool, generator):
    code, out, err = run(capsys, "induce", "--data", str(task_file), "--generator", generator, "--template", "meta9")
    one_line_error(code, err, "--template", "meta9")
    assert no_pool.made == 0 and out == ""


def test_induce_checks_a_template_file_before_any_model_or_server(capsys, tmp_path, task_file, no_pool):
    template = tmp_path / "t.txt"
    template.write_text("no placeholders here", encoding="utf-8")
    code, _, err = run(capsys, "induce", "--data", str(task_file), "--generator", "local", "--template", str(template))
    one_line_error(code, err, "--template", str(template))
    assert no_pool.made == 0


def test_induce_checks_the_data_file_before_any_model_or_server(capsys, tmp_path, no_pool):
    # A list label in a single-label file (a file whose first row has one is multi-label).
    bad = write_rows(tmp_path / "d.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": ["x", "y"]}])
    code, _, err = run(capsys, "induce", "--data", str(bad), "--generator", "local")
    one_line_error(code, err, f"{bad}:2", "a list")
    assert no_pool.made == 0


@pytest.mark.parametrize("kind", ["folder", "under_a_file"])
def test_induce_checks_the_output_before_any_model_or_server(capsys, tmp_path, task_file, no_pool, kind):
    if kind == "folder":
        out = tmp_path / "outdir"
        out.mkdir()
    else:
        (tmp_path / "plain").write_text("x")
        out = tmp_path / "plain" / "instruction.json"
    code, _, err = run(capsys, "induce", "--data", str(task_file), "--generator", "local", "--out", str(out))
    one_line_error(code, err, "--out", str(out))
    assert no_pool.made == 0
    assert not list(tmp_path.rglob("*.partial"))


def test_induce_checks_api_base_and_context_before_any_model_or_server(capsys, task_file, no_pool):
    code, _, err = run(capsys, "induce", "--data", str(task_file), "--generator", "m", "--api-base", "localhost:8000")
    one_line_error(code, err, "--api-base", "localhost:8000")
    code, _, err = run(
        capsys, "induce", "--data", str(task_file), "--generator", "local", "--n-ctx", "1024", "--max-tokens", "1024"
    )
    one_line_error(code, err, "--n-ctx 1024")
    # a meta-prompt budget the context cannot hold either
    args = ["--generator", "local", "--n-ctx", "600", "--max-tokens", "100", "--max-prompt-tokens", "500"]
    code, _, err = run(capsys, "induce", "--data", str(task_file), *args)
    one_line_error(code, err, "--n-ctx 600", "--max-prompt-tokens 500")
    assert no_pool.made == 0


def test_induce_checks_exemplars_against_the_template_before_any_model_or_server(capsys, task_file, no_pool):
    template = "L {label_names} E {examples}"
    code, _, err = run(
        capsys, "induce", "--data", str(task_file), "--generator", "local", "--template", template, "--exemplars", "2"
    )
    one_line_error(code, err, "{exemplars} placeholder")
    assert no_pool.made == 0


def test_induce_output_made_unwritable_during_the_call_fails_in_one_line_without_a_partial(
    capsys, tmp_path, task_file, monkeypatch
):
    """The check passed; the path became a folder while the generator ran: the instruction is
    printed, the error is one line (no traceback) and no .partial is left beside it."""
    out = tmp_path / "instruction.json"
    monkeypatch.setattr(routes, "LMPool", FakePool)
    monkeypatch.setattr(FakePool, "on_generate", lambda: out.mkdir(exist_ok=True))
    code, stdout, err = run(capsys, "induce", "--data", str(task_file), "--generator", "g", "--out", str(out))
    one_line_error(code, err, str(out))
    assert stdout.startswith(REPLY)
    assert not list(tmp_path.glob("*.partial"))


def test_demo_checks_the_output_and_context_before_any_model_or_server(capsys, tmp_path, no_pool):
    code, _, err = run(capsys, "demo", "--out", str(tmp_path))
    one_line_error(code, err, "--out", str(tmp_path), "folder")
    # The reply set aside is the generator's real limit: the budget (160) plus 64 tokens,
    # or 1,024 tokens without a budget.
    code, _, err = run(capsys, "demo", "--n-ctx", "512", "--max-instruction-tokens", "500")
    one_line_error(code, err, "--n-ctx 512", "(564 tokens)")
    code, _, err = run(capsys, "demo", "--n-ctx", "1024", "--max-instruction-tokens", "0")
    one_line_error(code, err, "--n-ctx 1024", "(1024 tokens)")
    assert no_pool.made == 0


# --- files -----------------------------------------------------------------------------


def test_check_writable(tmp_path):
    assert files.check_writable(tmp_path / "new" / "deeper" / "x.json") == tmp_path / "new" / "deeper" / "x.json"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    with pytest.raises(ValueError, match="is a folder"):
        files.check_writable(tmp_path)
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        files.check_writable(tmp_path / "f" / "x.json")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        files.check_writable(tmp_path / "f", folder=True)
    assert files.check_writable(tmp_path, folder=True) == tmp_path
    assert list(tmp_path.iterdir()) == [tmp_path / "f"]  # no probe file left
    if Path("/proc/self").is_dir():  # a folder where no file can be made (even by root)
        with pytest.raises(ValueError, match=r"cannot write /proc/x\.md: no file can be created in /proc \("):
            files.check_writable("/proc/x.md")


def test_a_failed_write_leaves_no_partial_and_keeps_the_old_file(tmp_path, monkeypatch):
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(IsADirectoryError):
        files.write_json({"a": 1}, tmp_path / "folder.json")
    target = tmp_path / "x.json"
    target.write_text("old")

    def broken(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", broken)
    with pytest.raises(OSError, match="No space"):
        files.write_json({"a": 1}, target)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.json", "x.json"]


def test_benchmark_run_checks_its_output_folder_first(tmp_path, monkeypatch, capsys):
    from benchmarks import cli as bench_cli

    monkeypatch.setattr(routes, "LMPool", NoPool)
    NoPool.made = 0
    (tmp_path / "file").write_text("x")
    assert bench_cli.main(["run", "--data-dir", str(tmp_path), "--out", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err
    assert "benchmarks: error: --out" in err and str(tmp_path / "file") in err
    assert NoPool.made == 0 and not (tmp_path / "file.partial").exists()
