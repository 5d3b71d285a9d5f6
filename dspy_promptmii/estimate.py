"""What a compile will cost, said before it spends anything: LM calls, prompt tokens,
completion tokens (a bound: the reply limit of each call) and, where LiteLLM's model cost
map knows the route, a price in US dollars.

:meth:`dspy_promptmii.PromptMIIOptimizer.estimate` fills these for Prompt-MII from the
meta-prompts it would send (counted, not guessed); the benchmark fills them for GEPA and
MIPROv2 from those optimizers' own budget rules (:mod:`benchmarks.methods`). A price that
the cost map does not know is ``None`` and shown as ``unknown``, never as 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from dspy_promptmii.secrets import protected_logger

logger = protected_logger(__name__)

__all__ = [
    "RoleCost",
    "PredictorEstimate",
    "CompileEstimate",
    "token_price",
    "count_messages",
    "format_estimate",
    "UNKNOWN",
    "gepa_metric_budget",
    "gepa_estimate",
    "miprov2_estimate",
]

#: How an unknown price (or token count) is shown.
UNKNOWN = "unknown"


def token_price(model: str | None, prompt_tokens: int | None, completion_tokens: int | None) -> float | None:
    """US dollars for the tokens at the route's price in LiteLLM's model cost map
    (``litellm.cost_per_token``), or None when the map does not know the route (a local
    or self-hosted model: ``hosted_vllm/...``), or a count is unknown. Never raises."""
    if not model or prompt_tokens is None or completion_tokens is None:
        return None
    try:
        import litellm

        from dspy_promptmii.console import quiet_litellm

        with quiet_litellm():  # an unmapped route: no provider banner on stdout
            prompt_cost, completion_cost = litellm.cost_per_token(
                model=model, prompt_tokens=int(prompt_tokens), completion_tokens=int(completion_tokens)
            )
    except Exception as error:  # noqa: BLE001 - LiteLLM raises several kinds for an unmapped model
        logger.debug("no price for %s: %s", model, error)
        return None
    return float(prompt_cost) + float(completion_cost)


def count_messages(
    messages: Sequence[Mapping[str, str]],
    model: str,
    token_counter: Callable[[str], int] | None = None,
    framing: int = 0,
) -> int:
    """Prompt tokens of one chat request: with ``token_counter`` (a text counter, e.g. the
    model's own tokenizer) the sum over the messages' contents plus ``framing`` (what a
    chat template adds); without, LiteLLM's counter for ``model`` (its per-message
    framing included; an unknown model is counted with tiktoken's ``cl100k_base``).

    Raises whatever the counter raises."""
    if token_counter is not None:
        return sum(int(token_counter(m["content"])) for m in messages) + framing
    import litellm

    return int(litellm.token_counter(model=model, messages=[dict(m) for m in messages]))


@dataclass
class RoleCost:
    """One LM role's share of a compile (the generator's or the follower's).

    ``calls``: LM calls; ``prompt_tokens``: their prompt tokens (None when they could not
    be counted); ``completion_tokens``: the most they may write (each call's reply limit);
    ``price_usd``: the route's price for those tokens, None when unknown.
    """

    model: str | None
    calls: int = 0
    prompt_tokens: int | None = 0
    completion_tokens: int | None = 0
    price_usd: float | None = None

    def priced(self) -> RoleCost:
        """With ``price_usd`` from LiteLLM's cost map (0.0 when there are no calls)."""
        self.price_usd = 0.0 if not self.calls else token_price(self.model, self.prompt_tokens, self.completion_tokens)
        return self

    def add(self, other: RoleCost) -> RoleCost:
        """The sum of two shares of the same role (a count or price unknown in either is unknown)."""

        def plus(a: Any, b: Any) -> Any:
            return None if a is None or b is None else a + b

        models = [m for m in (self.model, other.model) if m]
        return RoleCost(
            model=", ".join(dict.fromkeys(models)) or None,
            calls=self.calls + other.calls,
            prompt_tokens=plus(self.prompt_tokens, other.prompt_tokens),
            completion_tokens=plus(self.completion_tokens, other.completion_tokens),
            price_usd=plus(self.price_usd, other.price_usd),
        )


@dataclass
class PredictorEstimate:
    """What compiling one predictor will cost. ``meta_prompt_tokens`` are those of the
    first generator call's meta-prompt (framing included), ``n_used`` the examples it
    shows, ``validation_rows`` the rows each candidate is scored on (0 with one
    candidate); ``notes`` say what is a bound and how tokens were counted."""

    predictor: str
    n_used: int
    meta_prompt_tokens: int | None
    generator: RoleCost
    follower: RoleCost
    validation_rows: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass
class CompileEstimate:
    """A compile's cost before it runs: per predictor, and in total.

    ``counted_by`` says how tokens were counted (the generator's own tokenizer, or
    LiteLLM's counter: exact for OpenAI models, tiktoken's ``cl100k_base`` for others,
    which over-counts scripts other than Latin ones).
    """

    predictors: list[PredictorEstimate]
    counted_by: str
    method: str = "promptmii"

    @property
    def generator(self) -> RoleCost:
        total = RoleCost(model=None, price_usd=0.0)
        for p in self.predictors:
            total = total.add(p.generator)
        return total

    @property
    def follower(self) -> RoleCost:
        total = RoleCost(model=None, price_usd=0.0)
        for p in self.predictors:
            total = total.add(p.follower)
        return total

    def total(self) -> dict[str, Any]:
        """``generator_calls``, ``follower_calls``, ``calls``, ``prompt_tokens``,
        ``completion_tokens`` (a bound), ``tokens`` (their sum; None when a count is
        unknown), ``price_usd`` (None when any role with calls has no known price) and
        ``price`` (the price as text: dollars, or ``"unknown"``)."""
        g, f = self.generator, self.follower
        prompt = None if g.prompt_tokens is None or f.prompt_tokens is None else g.prompt_tokens + f.prompt_tokens
        completion = (
            None if g.completion_tokens is None or f.completion_tokens is None
            else g.completion_tokens + f.completion_tokens
        )
        price = None if g.price_usd is None or f.price_usd is None else g.price_usd + f.price_usd
        return {
            "generator_calls": g.calls,
            "follower_calls": f.calls,
            "calls": g.calls + f.calls,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "tokens": None if prompt is None or completion is None else prompt + completion,
            "price_usd": price,
            "price": _price_text(price),
        }

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable: the method, how tokens were counted, the predictors and the total."""
        return {
            "method": self.method,
            "counted_by": self.counted_by,
            "predictors": [asdict(p) for p in self.predictors],
            "total": self.total(),
        }

    def format(self) -> str:
        """A plain-text table (see :func:`format_estimate`)."""
        return format_estimate(self)


def _price_text(price: float | None) -> str:
    if price is None:
        return UNKNOWN
    return f"${price:.4f}" if price < 1 else f"${price:,.2f}"


def _count_text(value: int | None) -> str:
    return UNKNOWN if value is None else f"{value:,}"


def format_estimate(estimate: CompileEstimate) -> str:
    """The estimate as a table: per predictor and in total, generator and follower calls,
    prompt tokens, completion tokens (at most), and the price; then how tokens were counted
    and the notes."""
    header = ("predictor", "generator calls", "follower calls", "prompt tokens", "completion tokens (max)", "price")
    rows = [header]

    def row(name: str, g: RoleCost, f: RoleCost) -> tuple[str, ...]:
        prompt = None if g.prompt_tokens is None or f.prompt_tokens is None else g.prompt_tokens + f.prompt_tokens
        completion = (
            None if g.completion_tokens is None or f.completion_tokens is None
            else g.completion_tokens + f.completion_tokens
        )
        price = None if g.price_usd is None or f.price_usd is None else g.price_usd + f.price_usd
        return (name, str(g.calls), str(f.calls), _count_text(prompt), _count_text(completion), _price_text(price))

    for p in estimate.predictors:
        rows.append(row(p.predictor, p.generator, p.follower))
    if len(estimate.predictors) > 1:
        rows.append(row("total", estimate.generator, estimate.follower))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for k, r in enumerate(rows):
        lines.append("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append(f"counted by {estimate.counted_by}; no LM was called")
    notes = list(dict.fromkeys(note for p in estimate.predictors for note in p.notes))
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines)


# -- the searches' own budget rules ---------------------------------------------------


def _search_estimate(
    method: str,
    rule: str,
    notes: list[str],
    *,
    proposer_calls: int,
    proposer_model: str | None,
    proposer_reply_limit: int | None,
    follower_calls: int,
    follower_model: str | None,
    follower_prompt_tokens_per_call: float | None,
    follower_reply_limit: int | None,
) -> CompileEstimate:
    """A search's estimate: its proposer's prompt tokens are unknown (they hold what the
    search has seen so far); the follower's are its calls times the tokens of one call."""
    follower_prompt = (
        None if follower_prompt_tokens_per_call is None else round(follower_calls * follower_prompt_tokens_per_call)
    )
    entry = PredictorEstimate(
        predictor="program",
        n_used=0,
        meta_prompt_tokens=None,
        generator=RoleCost(
            model=proposer_model,
            calls=proposer_calls,
            prompt_tokens=None,
            completion_tokens=None if proposer_reply_limit is None else proposer_calls * proposer_reply_limit,
            price_usd=None,
        ),
        follower=RoleCost(
            model=follower_model,
            calls=follower_calls,
            prompt_tokens=follower_prompt,
            completion_tokens=None if follower_reply_limit is None else follower_calls * follower_reply_limit,
        ).priced(),
        notes=notes,
    )
    return CompileEstimate([entry], counted_by=rule, method=method)


def gepa_metric_budget(
    *,
    valset_size: int,
    trainset_size: int = 0,
    predictors: int = 1,
    auto: str | None = None,
    max_metric_calls: int | None = None,
    max_full_evals: int | None = None,
) -> int:
    """GEPA's metric-call budget, by its own rule (``dspy.GEPA``): ``max_metric_calls``;
    ``max_full_evals`` times (train + val); or, for ``auto``, ``GEPA.auto_budget`` (with one
    predictor, ``auto="light"`` is 4 x |valset| + 380).

    Raises ``ValueError`` unless exactly one of the three is given, or for an unknown ``auto``.
    """
    if (auto is not None) + (max_metric_calls is not None) + (max_full_evals is not None) != 1:
        raise ValueError("give exactly one of auto, max_metric_calls, max_full_evals (as dspy.GEPA takes)")
    if max_metric_calls is not None:
        return int(max_metric_calls)
    if max_full_evals is not None:
        return int(max_full_evals) * (trainset_size + valset_size)
    from dspy.teleprompt.gepa.gepa import AUTO_RUN_SETTINGS, GEPA

    if auto not in AUTO_RUN_SETTINGS:
        raise ValueError(f"auto must be one of {sorted(AUTO_RUN_SETTINGS)}, got {auto!r}")
    return int(GEPA.auto_budget(None, predictors, AUTO_RUN_SETTINGS[auto]["n"], valset_size))


def gepa_estimate(
    *,
    valset_size: int,
    trainset_size: int = 0,
    predictors: int = 1,
    auto: str | None = None,
    max_metric_calls: int | None = None,
    max_full_evals: int | None = None,
    reflection_minibatch_size: int = 3,
    reflection_model: str | None = None,
    reflection_reply_limit: int | None = None,
    follower_model: str | None = None,
    follower_prompt_tokens_per_call: float | None = None,
    follower_reply_limit: int | None = None,
) -> CompileEstimate:
    """What ``dspy.GEPA`` will cost, from its budget rule (:func:`gepa_metric_budget`).

    Follower calls: the metric-call budget (each runs the program once, a follower call per
    predictor; GEPA may pass it by one iteration). Reflection calls: at most one per
    iteration, and an iteration that reflects spends at least two minibatches of metric
    calls (the current and the new candidate) after the first full evaluation of the
    valset: at most ceil((budget - |valset|) / (2 x minibatch)). Follower prompt tokens:
    the calls times ``follower_prompt_tokens_per_call`` (e.g. the naive instruction's
    prompt; GEPA's instructions grow, so a low figure); the reflection prompts' are unknown.
    """
    budget = gepa_metric_budget(
        valset_size=valset_size, trainset_size=trainset_size, predictors=predictors, auto=auto,
        max_metric_calls=max_metric_calls, max_full_evals=max_full_evals,
    )
    reflections = max(0, -(-(budget - valset_size) // (2 * reflection_minibatch_size)))
    given = (
        f"auto={auto!r}" if auto is not None
        else f"max_metric_calls={max_metric_calls}" if max_metric_calls is not None
        else f"max_full_evals={max_full_evals}"
    )
    notes = [
        f"GEPA's budget ({given}, |valset| {valset_size}): {budget} metric calls; it may pass them by one iteration",
        f"reflection calls at most ceil(({budget} - {valset_size}) / (2 x {reflection_minibatch_size})); "
        "their prompt tokens are unknown",
    ]
    return _search_estimate(
        "gepa", "dspy.GEPA's budget rule", notes,
        proposer_calls=reflections, proposer_model=reflection_model, proposer_reply_limit=reflection_reply_limit,
        follower_calls=budget * predictors, follower_model=follower_model,
        follower_prompt_tokens_per_call=follower_prompt_tokens_per_call, follower_reply_limit=follower_reply_limit,
    )


def miprov2_estimate(
    *,
    trainset_size: int,
    valset_size: int,
    predictors: int = 1,
    auto: str | None = "light",
    num_candidates: int | None = None,
    num_trials: int | None = None,
    minibatch: bool = True,
    minibatch_size: int = 35,
    minibatch_full_eval_steps: int = 5,
    zeroshot: bool = True,
    prompt_model: str | None = None,
    prompt_reply_limit: int | None = None,
    follower_model: str | None = None,
    follower_prompt_tokens_per_call: float | None = None,
    follower_reply_limit: int | None = None,
) -> CompileEstimate:
    """What ``dspy.MIPROv2`` will cost, from its own settings and loop.

    ``auto`` sets the candidates, the trials (``int(max(2 x variables x log2(n), 1.5 n))``),
    the valset (at most ``val_size``) and minibatching (valset over 50), as
    ``MIPROv2._set_hyperparams_from_run_mode`` does. Prompt-model calls: DSPy's own
    figure (``_estimate_lm_calls``: 10 data-summary calls + candidates x predictors +
    predictors + 1). Follower (program) calls: the default program's full evaluation, then
    each trial's (the whole valset, or a minibatch plus periodic full evaluations), plus
    at most (candidate sets - 1) x |trainset| calls bootstrapping demos for the proposer
    (- 2 with labelled demos; a set stops at its demo count).

    Raises ``ValueError`` for an unknown ``auto``, or ``auto=None`` without
    ``num_candidates`` and ``num_trials``.
    """
    import math

    from dspy.teleprompt.mipro_optimizer_v2 import AUTO_RUN_SETTINGS, MIN_MINIBATCH_SIZE

    variables = predictors if zeroshot else 2 * predictors
    if auto is not None:
        if auto not in AUTO_RUN_SETTINGS:
            raise ValueError(f"auto must be one of {sorted(AUTO_RUN_SETTINGS)}, got {auto!r}")
        n = AUTO_RUN_SETTINGS[auto]["n"]
        valset_size = min(valset_size, AUTO_RUN_SETTINGS[auto]["val_size"])
        minibatch = valset_size > MIN_MINIBATCH_SIZE
        instruct, fewshot = (n if zeroshot else int(n * 0.5)), n
        trials = int(max(2 * variables * math.log2(n), 1.5 * n))
    else:
        if not num_candidates or not num_trials:
            raise ValueError("MIPROv2 with auto=None needs num_candidates and num_trials")
        instruct = fewshot = num_candidates
        trials = num_trials
    proposer = 10 + instruct * predictors + predictors + 1
    if minibatch:
        full = 1 + trials // minibatch_full_eval_steps + (1 if trials % minibatch_full_eval_steps else 0)
        program_calls = trials * minibatch_size + full * valset_size
        shape = f"{trials} minibatches of {minibatch_size} + {full} full evaluations of {valset_size}"
    else:
        program_calls = (trials + 1) * valset_size
        shape = f"({trials} trials + the default program) x {valset_size} valset rows"
    # create_n_fewshot_demo_sets: the first set is zero-shot, the second labelled-only
    # (zero-shot runs have no labelled demos, so it bootstraps too), the others bootstrap;
    # each bootstrapping set runs the program on at most the whole trainset.
    bootstrap = max(0, fewshot - (1 if zeroshot else 2)) * trainset_size
    notes = [
        f"MIPROv2 ({'auto=' + repr(auto) if auto else f'{instruct} candidates, {trials} trials'}): {shape} "
        f"= {program_calls} program calls, plus at most {bootstrap} bootstrapping demos",
        f"prompt-model calls by DSPy's own rule: 10 + {instruct} x {predictors} + {predictors + 1} = {proposer}; "
        "their prompt tokens are unknown",
    ]
    return _search_estimate(
        "miprov2", "dspy.MIPROv2's budget rule", notes,
        proposer_calls=proposer, proposer_model=prompt_model, proposer_reply_limit=prompt_reply_limit,
        follower_calls=(program_calls + bootstrap) * predictors, follower_model=follower_model,
        follower_prompt_tokens_per_call=follower_prompt_tokens_per_call, follower_reply_limit=follower_reply_limit,
    )
