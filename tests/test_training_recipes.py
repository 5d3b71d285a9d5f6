"""The launch recipes: every argument of training/train_grpo.sh (both configurations) is
accepted by the installed OpenRLHF 0.11.2's own ``train_ppo_ray`` parser and passes its
post-parse checks, with the paper's GRPO settings; serve_follower.sh has prefix caching.

The parser is built inline under ``if __name__ == "__main__"`` in
``openrlhf/cli/train_ppo_ray.py``, whose module imports ray and vLLM; the lightest way to
run it on CPU is to take that block out of the installed source with ``ast`` (see
training/openrlhf_compat.py). Skipped, with the reason, when openrlhf is not installed
(``pip install --no-deps openrlhf==0.11.2``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]

from training.openrlhf_compat import (  # noqa: E402
    SUPPORTED_VERSION,
    OpenRLHFUnavailable,
    openrlhf_version,
    parse_train_args,
)

BASH = shutil.which("bash")
pytestmark = pytest.mark.skipif(BASH is None, reason="bash is not available")


@pytest.fixture(scope="module")
def openrlhf() -> str:
    try:
        version = openrlhf_version()
    except OpenRLHFUnavailable as error:
        pytest.skip(
            f"{error} (the flag check needs OpenRLHF's source: pip install --no-deps openrlhf=={SUPPORTED_VERSION})"
        )
    if version != SUPPORTED_VERSION:
        pytest.skip(f"openrlhf {version} is installed; the recipes are written for {SUPPORTED_VERSION}")
    return version


def _script_args(script: str, *args: str, env: dict[str, str] | None = None) -> list[str]:
    result = subprocess.run(
        [BASH, str(ROOT / "training" / script), *args],
        env={**os.environ, **(env or {}), "PROMPTMII_PRINT_ARGS": "1"},
        capture_output=True,
        check=True,
    )
    return [a.decode() for a in result.stdout.split(b"\0") if a]


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    (tmp_path / "train.jsonl").write_text("{}\n")
    (tmp_path / "valid.jsonl").write_text("{}\n")  # a validation file turns the eval flags on
    return tmp_path


@pytest.mark.parametrize("config", ["paper", "smoke"])
def test_every_flag_passes_openrlhfs_parser(openrlhf: str, config: str, data_dir: Path) -> None:
    argv = _script_args("train_grpo.sh", config, env={"DATA_DIR": str(data_dir), "OUT_DIR": str(data_dir / "run")})
    args: Any = parse_train_args(argv)
    # The paper's GRPO settings (DESIGN.md section 4).
    assert args.algo.advantage.estimator == "group_norm"
    assert args.rollout.n_samples_per_prompt == 5
    assert args.actor.eps_clip_low_high == [0.2, 0.4]
    assert args.actor.dual_clip == 3.0
    assert args.actor.loss_agg_mode == "seq-mean-token-mean"
    assert args.algo.kl.init_coef == 0 and not args.algo.kl.use_loss
    assert args.actor.adam.lr == 2e-6 and args.actor.lr_warmup_ratio == 0.033
    assert args.rollout.temperature == 1.0 and args.rollout.top_p == 1.0
    assert args.data.max_len == 5120 and args.rollout.max_new_tokens == 1024
    assert args.vllm.enable_prefix_caching
    # The data and the reward.
    assert args.data.prompt_dataset == str(data_dir / "train.jsonl")
    assert args.eval.dataset == str(data_dir / "valid.jsonl")
    assert (args.data.input_key, args.data.label_key, args.data.apply_chat_template) == ("prompt", "label", True)
    assert (
        Path(args.train.agent_func_path) == ROOT / "training" / "agent.py"
        and Path(args.train.agent_func_path).is_file()
    )
    assert args.reward.remote_url == ["agent"]  # what OpenRLHF sets for an agent
    assert args.ckpt.save_hf and args.ckpt.output_dir == str(data_dir / "run" / "hf")
    if config == "paper":
        assert args.rollout.batch_size == 64 and args.train.batch_size == 160 and args.train.num_episodes == 15
        assert args.actor.num_gpus_per_node + args.vllm.num_engines == 6  # + 2 follower GPUs = 8
        assert args.ds.zero_stage == 3 and not args.train.colocate_all
    else:
        assert args.train.colocate_all and args.vllm.enable_sleep and args.ds.enable_sleep
        assert args.actor.num_gpus_per_node == 1 and args.vllm.num_engines == 1
        assert "0.5B" in args.actor.model_name_or_path


def test_extra_flags_are_passed_through_and_checked(openrlhf: str, data_dir: Path) -> None:
    argv = _script_args("train_grpo.sh", "smoke", "--train.num_episodes", "2", env={"DATA_DIR": str(data_dir)})
    assert parse_train_args(argv).train.num_episodes == 2
    with pytest.raises(ValueError, match="unrecognized arguments: --kl_coef"):
        parse_train_args([*argv, "--kl_coef", "0"])  # a pre-0.11 flat flag
    with pytest.raises(ValueError, match="n_samples_per_prompt > 1"):
        parse_train_args([*argv, "--rollout.n_samples_per_prompt", "1"])


def test_check_args_command(openrlhf: str, data_dir: Path) -> None:
    argv = _script_args("train_grpo.sh", "paper", env={"DATA_DIR": str(data_dir)})
    ok = subprocess.run(
        [sys.executable, "-m", "training.openrlhf_compat", "check-args", "--", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert f"OpenRLHF {SUPPORTED_VERSION} accepts" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "training.openrlhf_compat", "check-args", "--", "--nope"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "--nope" in bad.stderr


def test_train_grpo_refuses_unknown_configs() -> None:
    result = subprocess.run([BASH, str(ROOT / "training" / "train_grpo.sh"), "huge"], capture_output=True, text=True)
    assert result.returncode == 2 and "usage" in result.stderr


def test_shell_scripts_parse_and_follower_has_prefix_caching() -> None:
    for script in ("train_grpo.sh", "serve_follower.sh"):
        subprocess.run([BASH, "-n", str(ROOT / "training" / script)], check=True)
    argv = _script_args("serve_follower.sh", env={"GPUS": "0,1", "FOLLOWER_MODEL": "my/follower"})
    assert argv[:2] == ["serve", "my/follower"]
    assert "--enable-prefix-caching" in argv
    assert argv[argv.index("--data-parallel-size") + 1] == "2"
    single = _script_args("serve_follower.sh", env={"GPUS": "0", "GPU_MEM": "0.20"})
    assert "--data-parallel-size" not in single and single[single.index("--gpu-memory-utilization") + 1] == "0.20"
