"""Meta-training for dspy-promptmii: the GRPO data builder, the follower reward and the
OpenRLHF agent, and the launch recipes for vLLM + OpenRLHF (see ``training/README.md``).

Modules:

* :mod:`training.build_data` -- ``python -m training.build_data``: OpenRLHF prompt files
  from labelled task folders (and HF hub datasets when online).
* :mod:`training.sources` -- where tasks come from: local folders, ``SPLITS.json``,
  overlap groups, HF hub datasets with column detection.
* :mod:`training.tokens` -- token counting for the prompt-length filter.
* :mod:`training.follower` -- the reward itself: a generated instruction scored by a frozen
  follower LM over an OpenAI-compatible endpoint (shared by the reward and the agent).
* :mod:`training.reward` -- ``reward_func`` for ``--reward.remote_url /abs/path/reward.py``.
* :mod:`training.agent` -- ``AgentExecutor`` for ``--train.agent_func_path /abs/path/agent.py``.
* :mod:`training.openrlhf_compat` -- loading OpenRLHF pieces on machines without its
  GPU dependencies (the agent base class, the ``train_ppo_ray`` argument parser).
* :mod:`training.build_library` -- ``python -m training.build_library``: the instruction library.

Rejection-sampling fine-tuning on a CPU (expert iteration; ``training/README.md`` section 2c):

* :mod:`training.rollouts` -- ``python -m training.rollouts``: k scored samples per context
  from the current generator and the naive baseline (resumable JSONL).
* :mod:`training.select` -- ``python -m training.select``: SFT pairs (best of the samples and
  the naive instruction per context) and a report.
* :mod:`training.sft` -- ``python -m training.sft``: LoRA on the generator's GGUF-dequantized
  weights, loss on the reply tokens only, checkpoints and resume.
* :mod:`training.export` -- ``python -m training.export``: the adapter as a GGUF LoRA for
  llama.cpp, with its provenance.
* :mod:`training.merge` -- ``python -m training.merge``: base + adapter as a Hugging Face folder
  (the starting point of GRPO on GPUs).
* :mod:`training.runlog` -- append-only run files and the resume rule they share.
"""

import os as _os

# dspy (imported by the protocol) loads LiteLLM, which otherwise tries to download its
# model-cost map at import: training nodes and these CPU machines are often offline.
_os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
