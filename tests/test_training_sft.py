"""``training.sft`` on a tiny random Qwen2 model built in the test (no hub, no download):
the chat-template encoding, the loss on reply tokens only (logits on reply positions),
the seeded data order, checkpoint/resume equality after a simulated kill, the refusal of
changed settings, whole-task validation, and the GGUF route (a tiny GGUF written here,
loaded dequantized by transformers as the real generator is).

Needs the ``train`` extra (torch, transformers, peft, gguf); skipped with that reason
when it is absent."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

try:
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401
except ImportError as error:  # pragma: no cover - depends on the environment
    pytest.skip(f"needs the train extra ({error.name} missing): pip install -e '.[train]' (torch==2.13.0 pinned)",
                allow_module_level=True)

from safetensors.torch import load_file  # noqa: E402
from support.tiny_lm import make_tiny_model, write_tiny_gguf  # noqa: E402

from training import sft  # noqa: E402
from training.sft import (  # noqa: E402
    Encoded,
    SFTConfig,
    clear_gguf_quantizer,
    data_order,
    encode_pair,
    load_pairs,
    lr_factor,
    reply_nll,
    split_pairs,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def loaded(tiny: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32), AutoTokenizer.from_pretrained(tiny)


def _pairs(path: Path, tasks: int = 4, per_task: int = 4) -> Path:
    lines = [
        {
            "prompt": f"Write guidelines for task {t}, example {i}.\nInput: the film was great\nLabel: positive",
            "target": f"Decide whether the review praises the film ({t}.{i}).",
            "task": f"task{t}",
        }
        for t in range(tasks)
        for i in range(per_task)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def _run(tiny: Path, pairs: Path, out: Path, *extra: str) -> int:
    return sft.main(["--pairs", str(pairs), "--out", str(out), "--base", str(tiny), "--batch-size", "3",
                     "--epochs", "2", "--checkpoint-every", "1", "--valid-fraction", "0.25", "--no-progress",
                     "--threads", "1", *extra])


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


# --- encoding and the loss ---------------------------------------------------------------------


def test_a_pair_is_the_models_chat_template_and_the_reply_ends_its_turn(loaded) -> None:
    _, tokenizer = loaded
    prompt, target = "Write guidelines.\nInput: hello\nLabel: positive", "Answer positive when it praises."
    example = encode_pair(tokenizer, prompt, target, "t")
    generation_prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                      add_generation_prompt=True, tokenize=False)
    assert tokenizer.decode(example.ids[: example.reply_start]) == generation_prompt
    assert generation_prompt.endswith("<|im_start|>assistant\n") and "You are a helpful assistant." in generation_prompt
    assert tokenizer.decode(example.ids[example.reply_start :]) == target + "<|im_end|>"  # no trailing newline


def test_encoding_refuses_a_tokenizer_without_a_chat_template() -> None:
    with pytest.raises(ValueError, match="no chat template"):
        encode_pair(SimpleNamespace(chat_template=None), "p", "t")


def test_the_loss_covers_reply_tokens_only(loaded) -> None:
    model, tokenizer = loaded
    example = encode_pair(tokenizer, "Write guidelines for the weather reports.", "Answer sunny or rainy.", "t")
    ids = torch.tensor([example.ids])
    with torch.no_grad():
        loss = float(reply_nll(model, example, torch.device("cpu")))
        logits = model(input_ids=ids).logits[0]
    start = example.reply_start
    # The reference: cross-entropy of the positions that predict reply tokens only.
    reply_only = torch.nn.functional.cross_entropy(logits[start - 1 : -1], ids[0, start:])
    every_token = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:])
    assert loss == pytest.approx(float(reply_only), abs=1e-5)
    assert abs(loss - float(every_token)) > 1e-3  # a loss over the prompt tokens too would fail the line above
    # Moving the boundary changes which tokens count: one more reply token, one more term.
    wider = Encoded(example.ids, start - 1, "t")
    with torch.no_grad():
        assert float(reply_nll(model, wider, torch.device("cpu"))) == pytest.approx(
            float(torch.nn.functional.cross_entropy(logits[start - 2 : -1], ids[0, start - 1 :])), abs=1e-5)


def test_logits_are_computed_on_reply_positions_only(loaded, monkeypatch) -> None:
    model, tokenizer = loaded
    example = encode_pair(tokenizer, "A long prompt " * 20, "Short reply.", "t")
    shapes = []
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda module, inputs, output: shapes.append(tuple(inputs[0].shape)))
    try:
        with torch.no_grad():
            reply_nll(model, example, torch.device("cpu"))
    finally:
        handle.remove()
    assert shapes == [(1, example.reply_tokens, model.config.hidden_size)]  # lm_head never saw the prompt


def test_data_order_is_a_seeded_permutation_per_epoch() -> None:
    order = data_order(5, 3, seed=7)
    assert len(order) == 15 and all(sorted(order[e * 5 : (e + 1) * 5]) == list(range(5)) for e in range(3))
    assert order == data_order(5, 3, seed=7) and order != data_order(5, 3, seed=8)
    assert order[:5] != order[5:10]


def test_learning_rate_warms_up_then_decays() -> None:
    factors = [lr_factor(s, 10, 2) for s in range(10)]
    assert factors[0] == pytest.approx(1 / 3) and factors[1] == pytest.approx(2 / 3) and factors[2] == 1.0
    assert all(a >= b for a, b in zip(factors[2:], factors[3:])) and factors[-1] > 0


def test_validation_holds_out_whole_tasks(tmp_path: Path) -> None:
    pairs = load_pairs([_pairs(tmp_path / "pairs.jsonl", tasks=6)])
    train, valid, tasks = split_pairs(pairs, SFTConfig(valid_fraction=0.3))
    assert tasks and {p["task"] for p in valid} == set(tasks)
    assert not {p["task"] for p in train} & set(tasks)
    # Overlap groups stay on one side.
    _, valid, tasks = split_pairs(pairs, SFTConfig(valid_tasks=("task0",)), {"task0": "g", "task1": "g"})
    assert set(tasks) == {"task0", "task1"}
    with pytest.raises(ValueError, match="not being built"):
        split_pairs(pairs, SFTConfig(valid_tasks=("nope",)))


def test_pairs_keep_unicode_line_separators_inside_texts(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    text = "first part\u2028second part\x85third"  # in subj_subjectivity, mr_movie_review_sentiment, ...
    path.write_text(json.dumps({"prompt": text, "target": "t", "task": "x"}, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    assert [p["prompt"] for p in load_pairs([path])] == [text]


@pytest.mark.parametrize("line, problem", [("{", "not JSON"), ('{"prompt": "p", "task": "t"}', "target")])
def test_bad_pairs_are_named(tmp_path: Path, line: str, problem: str) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=problem):
        load_pairs([path])


# --- runs: checkpoints, resume, refusal ---------------------------------------------------------------


def test_a_killed_run_resumes_to_the_same_adapter(tiny: Path, tmp_path: Path) -> None:
    pairs = _pairs(tmp_path / "pairs.jsonl")
    whole = tmp_path / "whole"
    assert _run(tiny, pairs, whole) == 0
    report = json.loads((whole / "report.json").read_text())
    assert report["step"] == report["total_steps"] == 8  # 12 training pairs x 2 epochs / 3
    assert report["valid_tasks"] and report["valid_loss_before"] is not None and report["valid_loss_after"] is not None

    # Same run, killed: it stopped after 5 steps (checkpoints 1..5 written, the last two kept), and the
    # kill came before checkpoint 5 was complete: only step 4 survives as "latest".
    killed = tmp_path / "killed"
    assert _run(tiny, pairs, killed, "--max-steps", "5") == 0
    assert not (killed / "report.json").exists()
    checkpoints = killed / "checkpoints"
    import shutil

    shutil.rmtree(checkpoints / "step-000005")
    (checkpoints / "latest").write_text("step-000004\n")
    assert _run(tiny, pairs, killed) == 0
    first, second = _adapter(whole / "adapter"), _adapter(killed / "adapter")
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    assert any(float(t.abs().sum()) > 0 for n, t in first.items() if "lora_B" in n)  # it did train
    steps = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in steps if r["kind"] == "train"}) == list(range(1, 9))
    # A finished run is not trained again.
    assert _run(tiny, pairs, killed) == 0


def test_a_restart_with_other_settings_is_refused(tiny: Path, tmp_path: Path) -> None:
    pairs = _pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "run"
    assert _run(tiny, pairs, out, "--max-steps", "1") == 0
    with pytest.raises(SystemExit, match=r"differing: config\.learning_rate"):
        _run(tiny, pairs, out, "--lr", "0.001")
    _pairs(pairs, tasks=5)  # the data changed under the same file name
    with pytest.raises(SystemExit, match=r"pairs"):
        _run(tiny, pairs, out)


@pytest.mark.parametrize(
    "extra, problem",
    [
        (["--lora-dropout", "1.5"], "lora_dropout must be in"),
        (["--valid-tasks", "nope"], "not being built"),
        (["--base", "{tmp}/nowhere"], "no base model"),
        (["--base", "{tmp}"], "has no config.json"),
        (["--stop-after", "0"], "--stop-after must be positive"),
        (["--out", "{pairs}"], "it is a file"),
    ],
)
def test_options_are_checked_before_the_model_is_loaded(tiny, tmp_path, monkeypatch, extra, problem) -> None:
    monkeypatch.setattr(sft, "load_base", lambda *a, **k: pytest.fail("the model was loaded"))
    pairs = _pairs(tmp_path / "pairs.jsonl")
    argv = ["--pairs", str(pairs), "--out", str(tmp_path / "out"), "--base", str(tiny),
            *[a.format(tmp=tmp_path, pairs=pairs) for a in extra]]
    with pytest.raises(SystemExit, match=problem):
        sft.main(argv)


# --- the GGUF route ------------------------------------------------------------------------------------


def test_a_gguf_base_is_dequantized_and_trains_like_its_source(tiny: Path, tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM

    gguf_file = write_tiny_gguf(tiny, tmp_path / "gguf" / "tiny.gguf")
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    assert model.hf_quantizer is not None  # what makes save_pretrained refuse it
    clear_gguf_quantizer(model)
    assert model.hf_quantizer is None and not hasattr(model.config, "quantization_config")
    model.save_pretrained(tmp_path / "saved")  # refused before the quantizer was cleared

    pairs = _pairs(tmp_path / "pairs.jsonl")
    assert _run(gguf_file, pairs, tmp_path / "from-gguf", "--max-steps", "2") == 0
    assert _run(tiny, pairs, tmp_path / "from-hf", "--max-steps", "2") == 0
    gguf_metrics = (tmp_path / "from-gguf" / "metrics.jsonl").read_text().splitlines()
    hf_metrics = (tmp_path / "from-hf" / "metrics.jsonl").read_text().splitlines()
    first = [json.loads(line) for line in gguf_metrics][:3]
    second = [json.loads(line) for line in hf_metrics][:3]
    assert [r.get("valid_loss", r.get("loss")) for r in first] == pytest.approx(
        [r.get("valid_loss", r.get("loss")) for r in second], abs=1e-4)
    manifest = json.loads((tmp_path / "from-gguf" / "manifest.json").read_text())
    assert manifest["settings"]["base"]["kind"] == "gguf" and len(manifest["settings"]["base"]["sha256"]) == 64


def test_the_base_config_names_its_architecture(tiny: Path, tmp_path: Path) -> None:
    pairs = _pairs(tmp_path / "pairs.jsonl", tasks=2, per_task=2)
    out = tmp_path / "run"
    assert sft.main(["--pairs", str(pairs), "--out", str(out), "--base", str(tiny), "--epochs", "1",
                     "--batch-size", "2", "--valid-fraction", "0", "--no-progress"]) == 0
    config = json.loads((out / "base_config" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and "quantization_config" not in config
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 16 and set(adapter["target_modules"]) == set(sft.TARGET_MODULES)
    report = json.loads((out / "report.json").read_text())
    assert report["valid_pairs"] == 0 and report["valid_loss_before"] is None
    assert report["pairs_paths"] == [str(pairs.resolve())]


def test_merge_gives_a_model_folder_that_computes_what_base_plus_adapter_computes(tiny: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from training import merge

    pairs = _pairs(tmp_path / "pairs.jsonl", tasks=2, per_task=3)
    run = tmp_path / "run"
    assert sft.main(["--pairs", str(pairs), "--out", str(run), "--base", str(tiny), "--epochs", "2",
                     "--batch-size", "2", "--valid-fraction", "0", "--no-progress", "--lr", "0.01"]) == 0
    out = tmp_path / "merged"
    assert merge.main(["--run", str(run), "--out", str(out), "--dtype", "float32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32),
                                             str(run / "adapter"))
    base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, with_adapter(ids).logits, atol=1e-5)
        assert not torch.allclose(merged(ids).logits, base(ids).logits, atol=1e-4)  # the adapter did something
    record = json.loads((out / "merge.json").read_text())
    assert record["adapter"]["sha256"] and record["base"]["kind"] == "hf"
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()
    with pytest.raises(SystemExit, match="has not finished"):
        merge.main(["--run", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m2")])
