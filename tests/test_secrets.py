"""Credentials never reach what the benchmark and the command line write: LM arguments and
headers are redacted in the manifest, and secret values are scrubbed from every stored or
logged error text (results.jsonl, run.log, warnings, the one-line CLI error). A local HTTP
server on 127.0.0.1 plays a provider that echoes the key back in its error messages."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

import dspy
import pytest
from fakes import fake_lm, word_count
from support.chat_stub import ChatStub

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest` run without the repository root on sys.path
    sys.path.insert(0, str(ROOT))

from benchmarks import cli as bench_cli  # noqa: E402
from benchmarks.manifest import model_info  # noqa: E402
from benchmarks.runner import Endpoints, RunConfig, run_benchmark  # noqa: E402
from benchmarks.store import read_records  # noqa: E402
from benchmarks.tasks import resolve_tasks  # noqa: E402
from dspy_promptmii import cli  # noqa: E402
from dspy_promptmii.routes import Endpoint  # noqa: E402
from dspy_promptmii.secrets import REDACTED, SecretFilter, is_credential_name, protect_handlers, redact, scrub  # noqa: E402

KEY = "sk-test-0123456789abcdef"
BEARER = "bearer-token-fedcba9876543210"
HEADER_KEY = "hdr-key-55555555aaaa"
ENV_SECRET = "env-secret-77777777bbbb"
SECRETS = (KEY, BEARER, HEADER_KEY, ENV_SECRET)


def assert_no_secret(text: str, where: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} leaked into {where}"


# --- the module itself ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["api_key", "API_KEY", "x-api-key", "Authorization", "Proxy-Authorization", "hf_token", "accessToken",
             "client_secret", "password", "db_passwd", "Cookie", "Set-Cookie", "vertex_credentials", "apikey"],
)
def test_credential_names(name):
    assert is_credential_name(name)


@pytest.mark.parametrize(
    "name", ["max_tokens", "max_completion_tokens", "prompt_tokens_per_query", "api_base", "temperature", "model",
             "extra_headers", "X-Route"],
)
def test_names_that_are_not_credentials(name):
    assert not is_credential_name(name)


def test_redact_replaces_credential_values_at_any_depth_and_keeps_the_rest():
    kwargs = {
        "api_key": KEY,
        "max_tokens": 16,
        "extra_headers": {"Authorization": f"Bearer {BEARER}", "X-Api-Key": HEADER_KEY, "X-Route": "a"},
        "api_base": f"https://user:{KEY}@host/v1?api_key={KEY}&region=eu",
        "nested": [{"token": "abc"}],
        "unset_key": None,
    }
    out = redact(kwargs)
    assert out == {
        "api_key": REDACTED,
        "max_tokens": 16,
        "extra_headers": {"Authorization": REDACTED, "X-Api-Key": REDACTED, "X-Route": "a"},
        "api_base": f"https://{REDACTED}@host/v1?api_key={REDACTED}&region=eu",
        "nested": [{"token": REDACTED}],
        "unset_key": None,
    }
    assert kwargs["api_key"] == KEY  # a copy: the LM's own arguments are untouched
    # Values met under credential names are remembered: an echo of them anywhere is scrubbed.
    assert scrub(f"server said: unknown key {HEADER_KEY}; token {BEARER}") == (
        f"server said: unknown key {REDACTED}; token {REDACTED}"
    )


def test_scrub_removes_credential_shapes_from_free_text(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_TOKEN", ENV_SECRET)
    text = (
        f"401: Authorization: Bearer abcdefgh12345678 rejected; {{'api_key': 'other-secret-1'}} "
        f"password=hunter2 via http://u:p4ss@h/x; echo {ENV_SECRET}; KeyError: 'label'; max_tokens: 16"
    )
    clean = scrub(text)
    for leaked in ("abcdefgh12345678", "other-secret-1", "hunter2", "u:p4ss", ENV_SECRET):
        assert leaked not in clean
    assert "KeyError: 'label'" in clean and "max_tokens: 16" in clean  # no damage to ordinary text
    monkeypatch.setenv("OTHER_API_KEY", "local")  # too short to be treated as a secret value
    assert scrub("short values stay: local") == "short values stay: local"


def test_the_log_filter_scrubs_messages_arguments_and_tracebacks(monkeypatch):
    monkeypatch.setenv("SERVICE_API_KEY", ENV_SECRET)
    try:
        raise RuntimeError(f"upstream echoed {ENV_SECRET}")
    except RuntimeError:
        record = logging.getLogger("x").makeRecord(
            "x", logging.ERROR, __file__, 1, "call failed: %s (key %s)", ("boom", ENV_SECRET), sys.exc_info()
        )
    assert SecretFilter().filter(record)
    text = logging.Formatter().format(record)
    assert ENV_SECRET not in text and "call failed: boom (key [redacted])" in text
    assert "RuntimeError: upstream echoed [redacted]" in text


# --- the benchmark: manifest, results.jsonl, log records ------------------------------------


def _echoing(body: dict, headers: dict) -> tuple[int, object]:
    """Labels like the toy task wants, except that a request about something 'awful' gets
    a 401 whose message echoes the credentials it was sent, and the environment's secret."""
    if "awful" in json.dumps(body["messages"]):
        message = (
            f"invalid credentials {headers.get('Authorization')} x-api-key={headers.get('X-Api-Key')} "
            f"(expected {ENV_SECRET})"
        )
        return 401, {"error": {"message": message, "type": "invalid_request_error"}}
    return 200, "pos"


@pytest.fixture
def provider():
    with ChatStub(_echoing) as stub:
        yield stub.url


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    (tmp_path / "datasets" / "toy").mkdir(parents=True)
    pairs = [("great", "pos"), ("awful", "neg")] * 10
    rows = [{"text": f"row {i} was {word}", "label": label} for i, (word, label) in enumerate(pairs)]
    (tmp_path / "datasets" / "toy" / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "datasets"


def keyed_lm(url: str) -> dspy.LM:
    return dspy.LM(
        "hosted_vllm/m",
        api_base=url,
        api_key=KEY,
        extra_headers={"Authorization": f"Bearer {BEARER}", "X-Api-Key": HEADER_KEY},
        cache=False,
        num_retries=0,
    )


def test_a_benchmark_stores_and_logs_no_credential(data_dir, tmp_path, provider, caplog, monkeypatch):
    monkeypatch.setenv("PROVIDER_SECRET_TOKEN", ENV_SECRET)
    protect_handlers(caplog.handler)  # as the command line protects its console and run.log handlers
    caplog.set_level(logging.INFO)
    follower = Endpoint(keyed_lm(provider), "hosted_vllm/m", None, None, "json_schema")
    config = RunConfig(
        out=tmp_path / "out", tasks=resolve_tasks(data_dir), n_values=[4], methods=["naive", "promptmii_zero"],
        test_rows=6, follower_style="none", progress=False,
    )
    run_benchmark(config, Endpoints(follower=follower, generator=follower))

    manifest = (tmp_path / "out" / "manifest.json").read_text()
    assert_no_secret(manifest, "manifest.json")
    lm_kwargs = json.loads(manifest)["models"]["follower"]["lm_kwargs"]
    assert lm_kwargs["api_key"] == REDACTED
    assert lm_kwargs["extra_headers"] == {"Authorization": REDACTED, "X-Api-Key": REDACTED}
    assert json.loads(manifest)["settings"]["follower"]["lm_kwargs"]["extra_headers"]["X-Api-Key"] == REDACTED

    results = (tmp_path / "out" / "results.jsonl").read_text()
    assert_no_secret(results, "results.jsonl")
    records = {r["method"]: r for r in read_records(tmp_path / "out")}
    # The naive cell ran, some of its queries refused: no score (an error cell, retried by the
    # next run), and the first error is kept, scrubbed.
    assert records["naive"]["status"] == "error" and records["naive"]["eval_rows_failed"] > 0
    assert "macro_f1" not in records["naive"]
    first_error = records["naive"]["eval_first_error"]
    assert "invalid credentials" in first_error and REDACTED in first_error
    # The generator was refused (its meta-prompt shows an 'awful' example): an error record, scrubbed.
    assert records["promptmii_zero"]["status"] == "error" and REDACTED in records["promptmii_zero"]["error"]
    assert_no_secret(records["promptmii_zero"]["traceback"], "traceback")

    assert "invalid credentials" in caplog.text  # the warnings and errors were logged ...
    assert_no_secret(caplog.text, "log records")  # ... without the credentials


def test_model_info_redacts_every_credential_argument():
    lm, _ = fake_lm("x", model="fake/m")
    lm.kwargs.update({"api_key": KEY, "extra_headers": {"Authorization": f"Bearer {BEARER}"}})
    info = model_info(Endpoint(lm, "fake/m", word_count, None, "json_schema"))
    assert_no_secret(json.dumps(info), "model_info")
    assert info["lm_kwargs"]["api_key"] == REDACTED


# --- the command lines: run.log, console, the one-line error ---------------------------------


def test_benchmark_command_keeps_credentials_out_of_run_log_results_and_console(
    data_dir, tmp_path, provider, capsys, monkeypatch, restore_logging
):
    monkeypatch.setenv("PROVIDER_API_KEY", ENV_SECRET)  # the key the provider echoes in its errors
    out = tmp_path / "out"
    code = bench_cli.main(
        ["run", "--data-dir", str(data_dir), "--follower", "m", "--generator", "m", "--api-base", provider,
         "--n", "4", "--test-rows", "6", "--methods", "naive,promptmii_zero", "--no-constrained", "--no-progress",
         "--out", str(out)]
    )
    assert code in (0, 1)
    log = (out / "run.log").read_text()
    assert "invalid credentials" in log
    assert_no_secret(log, "run.log")
    assert_no_secret((out / "results.jsonl").read_text(), "results.jsonl")
    assert_no_secret((out / "manifest.json").read_text(), "manifest.json")
    assert_no_secret(capsys.readouterr().err, "the console")


def test_python_warnings_reach_run_log_scrubbed(tmp_path, monkeypatch, restore_logging):
    monkeypatch.setenv("PROVIDER_API_KEY", ENV_SECRET)
    bench_cli._setup_logging(tmp_path, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        logging.captureWarnings(True)  # what _setup_logging does, again inside pytest's own warning capture
        warnings.warn(f"provider said: bad key {ENV_SECRET}", UserWarning, stacklevel=1)
    for handler in logging.getLogger().handlers:
        handler.flush()
    log = (tmp_path / "run.log").read_text()
    assert "provider said: bad key [redacted]" in log
    assert_no_secret(log, "run.log")


def test_promptmii_error_line_is_scrubbed(tmp_path, provider, capsys, monkeypatch, restore_logging):
    monkeypatch.setenv("PROVIDER_API_KEY", ENV_SECRET)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"this is awful {i}", "label": "neg"}) + "\n" for i in range(3)))
    code = cli.main(["induce", "--data", str(data), "--generator", "m", "--api-base", provider])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("promptmii: error:") and "invalid credentials" in err
    assert_no_secret(err, "the error line")


def test_the_working_directory_is_not_a_secret(monkeypatch, tmp_path):
    from dspy_promptmii.secrets import scrub

    monkeypatch.setenv("PWD", str(tmp_path))
    monkeypatch.setenv("OLDPWD", str(tmp_path / "before"))
    monkeypatch.setenv("DB_PWD", "hunter2-hunter2")
    text = f"no such file: {tmp_path}/data.jsonl (password hunter2-hunter2)"
    assert scrub(text) == f"no such file: {tmp_path}/data.jsonl (password [redacted])"
