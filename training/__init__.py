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
"""

import os as _os

# dspy (imported by the protocol) loads LiteLLM, which otherwise tries to download its
# model-cost map at import: training nodes and these CPU machines are often offline.
_os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
