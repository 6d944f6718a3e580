"""Does prefilling a batch's common first tokens once pay? Multi-turn rollouts prefill every episode's
whole conversation at every turn, and every episode of a step starts with the same tokens (the tool
description, the worked example or game, the rules).

    python benchmarks/shared_prefill.py --repeats 3

SmolLM2-135M-Instruct, 2 torch threads, the rollout's call (`LocalEngine.generate`, one sample per
episode, temperature 0.7) on the prompts of a step of 4 problems x 8 episodes: the calculator's first
turn, guess_number's first turn, and guess_number's fourth (each episode 3 scripted guesses in). The
"whole" side is the same loop with the shared prefill switched off. Writes results/shared_prefill.json.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import common  # first: the offline defaults, before torch and transformers load
import torch
from transformers import DynamicCache

from rayrlhf.actors.environments.calculator import Calculator
from rayrlhf.actors.environments.guess_number import GuessNumber
from rayrlhf.actors.generation.decode_loop import DecodeLoop
from rayrlhf.actors.generation.engine import LocalEngine
from rayrlhf.actors.generation.requests import SamplingParams
from rayrlhf.actors.runtime.models import load_policy, resolve_policy
from rayrlhf.jobs.data.prompts import load_task

PROBLEMS, EPISODES = 4, 8


def guess_episode(seed: int, turns: int) -> list[dict]:
    """A game `turns` guesses in, the guesses drawn at random inside the hints."""
    env, pick = GuessNumber(), random.Random(seed)
    messages = env.reset({}, seed)
    low, high = 1, 20
    for _ in range(turns):
        guess = pick.randint(low, high)
        messages.append({"role": "assistant", "content": str(guess)})
        hint, _, done = env.step({"content": str(guess)})
        if done:
            break
        low, high = (guess + 1, high) if hint[0]["content"] == "Higher." else (low, guess - 1)
        messages += hint
    return messages


def cases() -> dict[str, list[list[dict]]]:
    rows = load_task("builtin_math", None, PROBLEMS, 1, 0)[0]
    calculator = [Calculator().reset({"prompt": p.text, "reference": p.reference}, 0) for p in rows]
    return {
        "calculator, turn 1": [m for m in calculator for _ in range(EPISODES)],
        "guess_number, turn 1": [guess_episode(i, 0) for i in range(PROBLEMS * EPISODES)],
        "guess_number, turn 4": [guess_episode(i, 3) for i in range(PROBLEMS * EPISODES)],
    }


def timed(engine: LocalEngine, prompts: list[list[int]], max_tokens: int, repeats: int) -> list[float]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.7, top_p=1.0, stop=(), seed=0)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        engine.generate(prompts, 1, params)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tokenizer = load_policy(resolve_policy("smollm2-135m-instruct"))
    engine = LocalEngine(model, tokenizer)
    shared_prefill = DecodeLoop._shared_prefill
    report = {}
    for name, conversations in cases().items():
        prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, return_dict=True)["input_ids"]
                   for c in conversations]  # the tool description is in the calculator's system message
        max_tokens = 64 if name.startswith("calculator") else 8  # the configs' rollout.max_new_tokens
        sides = {}
        for side in ("whole", "shared", "whole", "shared"):  # interleaved, the first pass a warm-up
            DecodeLoop._shared_prefill = shared_prefill if side == "shared" else lambda self, p: (0, DynamicCache())
            sides[side] = timed(engine, prompts, max_tokens, args.repeats)
        DecodeLoop._shared_prefill = shared_prefill
        whole, shared = statistics.median(sides["whole"]), statistics.median(sides["shared"])
        report[name] = {"prompt_tokens": sum(map(len, prompts)), "mean_prompt": statistics.mean(map(len, prompts)),
                        "whole_s": whole, "shared_s": shared, "speedup": whole / shared}  # fmt: skip
        print(f"{name:24s} {report[name]['mean_prompt']:6.0f} tokens a prompt   whole {whole:6.2f} s   "
              f"shared {shared:6.2f} s   {whole / shared:4.2f}x", flush=True)
    common.write_results("shared_prefill.json", report)


if __name__ == "__main__":
    main()
