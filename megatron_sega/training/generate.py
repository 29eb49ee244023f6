"""``megatron-sega generate``: a quick look at what the policy writes, with entropy scores."""

from __future__ import annotations

from megatron_sega.config import ConfigError
from megatron_sega.data import TokenizedExample
from megatron_sega.training.sega import load_prompts, make_sampler, sampling_params, score_rollout
from megatron_sega.training.session import open_session, preflight

_SHOWN = 4  # prompts sampled (from data.eval, else data.train)


def run_generate(config, args) -> int:
    source = config.data.eval or config.data.train
    if not source:
        raise ConfigError("generate needs prompts: set data.eval or data.train")
    preflight(config, "generate")
    session = open_session(config, train=False)
    prompts: list[TokenizedExample] = load_prompts(session, source)[:_SHOWN]
    k = config.sega.k
    rows = [p.prompt_ids for p in prompts for _ in range(k)]
    rollout = make_sampler(session).generate(rows, sampling_params(session),
                                             list(range(len(rows))), session.tokenizer.decode)
    scored = score_rollout(session, rollout, k)
    if session.is_main:
        for g, prompt in enumerate(prompts):
            print(f"=== {prompt.id}: {session.tokenizer.decode(prompt.prompt_ids)!r}")
            for j in range(k):
                i = g * k + j
                text = session.tokenizer.decode(
                    rollout.response_ids[i, : int(rollout.lengths[i])].tolist())
                print(f"  [{j}] score {float(scored.score[i]):+.3f} "
                      f"(H_final {float(scored.h_final[i]):.3f}, fork {float(scored.fork[i]):.3f}, "
                      f"{rollout.finish_reason[i]}) {text!r}")
    return 0
