"""The rollout role: sample k responses per prompt with the current policy version.

A plain class; the driver makes it a Ray actor. It returns a Trajectory of numpy arrays, so the
batch crosses the object store zero-copy. Notes on what the learner can rely on:
- Sampling is exactly softmax(logits / temperature), restricted by top_p, in the generation engine
  that Serve uses too (actors/generation/engine.py): each prompt is prefilled once for its k
  samples and rows leave the batch at their EOS. The model's generation_config (top_k, repetition
  penalty, ...) plays no part. Each row draws from its own generator, seeded from (seed, policy
  version, call counter, row): see actors/generation/sampler.py for the scheme resume relies on.
  old_logprobs are log softmax(logits / temperature) without the top_p cut (as OpenRLHF and
  verl do), so with top_p < 1 they are not the exact sampling probabilities. They are recorded
  while sampling, from the same logits (a second forward pass cost 40% of the rollout time);
  a KV-cached decode differs from a full forward pass by 1e-6 to 1e-5, far below what the
  PPO ratio's clip sees. Greedy (evaluation) rows record log softmax(logits), at temperature 1.
- `Trajectory.prompts` holds the prompt as the policy saw it: after the chat template and the
  left truncation to max_prompt_tokens, decoded with special tokens kept.
"""

from __future__ import annotations

import numpy as np
import torch

from rayrlhf.actors.environments.episode import MessageRenderer, Turn
from rayrlhf.actors.generation.engine import GenerationEngine, LocalEngine
from rayrlhf.actors.generation.requests import SamplingParams
from rayrlhf.actors.generation.sampler import mix_seed
from rayrlhf.actors.generation.tokens import left_pad, prompt_token_ids
from rayrlhf.actors.rl.trajectory import Prompt, Trajectory
from rayrlhf.actors.runtime.devices import select_device, select_dtype
from rayrlhf.actors.runtime.host_memory import keep_freed_memory
from rayrlhf.actors.runtime.models import load_policy, resolve_policy_here
from rayrlhf.actors.runtime.weight_sync import BroadcastGroup, Weights, check_names


class RolloutWorker:
    def __init__(
        self,
        *,
        model: str,
        max_prompt_tokens: int,
        use_chat_template: bool,
        system_prompt: str | None,
        samples_per_prompt: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        torch_threads: int,
        seed: int,
        max_batch_rows: int | None = None,
        dtype: str = "auto",
        device: str = "cpu",
        cache_dir: str | None = None,
    ):
        torch.set_num_threads(torch_threads)
        self.device = select_device(device)
        keep_freed_memory(self.device)
        path = resolve_policy_here(model, cache_dir)  # on this node: the driver's paths mean nothing here
        local = LocalEngine(*load_policy(path, select_dtype(dtype, self.device), self.device))
        self.engine: GenerationEngine = local
        self.model, self.tokenizer = local.model, local.tokenizer  # weights are loaded into this model
        self.eos_ids, self.pad_id = local.eos_ids, local.pad_id
        self.max_prompt_tokens = max_prompt_tokens
        self.use_chat_template = use_chat_template
        self.system_prompt = system_prompt
        self.samples_per_prompt = samples_per_prompt
        self.max_batch_rows = max_batch_rows
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self.version = 0
        self._calls = 0
        self._weight_group: BroadcastGroup | None = None
        self._renderer: MessageRenderer | None = None

    def _check_version(self, version: int) -> None:
        if version < self.version:
            raise ValueError(f"refusing weights of version {version}: this worker already holds {self.version}")

    def load_weights(self, version: int, weights: Weights) -> int:
        """Load a full state dict (HF names) published by the learner as `version` (cast to this model's dtype)."""
        self._check_version(version)
        check_names(self.model, set(weights.arrays))
        self.model.load_state_dict(weights.tensors(), strict=True)
        self.version = int(version)
        return self.version

    def get_weights(self) -> Weights:
        """The weights this worker samples with (a pipelined run keeps them when a batch they were to
        sample is owed: jobs/run/pipeline.py)."""
        return Weights.from_state_dict(self.model.state_dict())

    def weight_dtypes(self) -> dict[str, str]:
        """The dtype of each tensor of this worker's state dict: what a broadcast must send."""
        return {name: str(t.dtype).removeprefix("torch.") for name, t in self.model.state_dict().items()}

    def join_weight_group(self, master_addr: str, master_port: int, rank: int, world_size: int, backend: str) -> None:
        """Join the broadcast group of learner rank 0 (see actors/runtime/weight_sync.py); blocks until all joined."""
        self._weight_group = BroadcastGroup(master_addr=master_addr, master_port=master_port, rank=rank,
                                            world_size=world_size, backend=backend, device=self.device)  # fmt: skip

    def receive_weights(self, version: int) -> int:
        """Take `version` from the broadcast that learner rank 0 is sending at the same moment."""
        self._check_version(version)
        self._weight_group.receive(self.model)
        self.version = int(version)
        return self.version

    def state_dict(self) -> dict[str, int]:
        """What seeds the next call's samples: the policy version and the call counter. A restarted
        worker (jobs/run/recovery.py) or a resumed run (jobs/run/state.py) gets both back, and the weights
        of that version with load_weights, so its samples equal those the lost process would have drawn."""
        return {"version": self.version, "calls": self._calls}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Rewind or restore the counters; the weights of that version come with load_weights."""
        self.version, self._calls = int(state["version"]), int(state["calls"])

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        return prompt_token_ids(
            self.tokenizer, prompt, use_chat_template=self.use_chat_template, system_prompt=self.system_prompt,
            max_prompt_tokens=self.max_prompt_tokens,
        )

    def _left_padded(self, prompts: list[Prompt]) -> tuple[torch.Tensor, torch.Tensor]:
        return left_pad([self._prompt_ids(p) for p in prompts], self.pad_id)

    @torch.no_grad()
    def generate(
        self, prompts: list[Prompt], greedy: bool = False, max_new_tokens: int | None = None, num_beams: int = 1,
        samples: int | None = None, seed: int | None = None,
    ) -> Trajectory:
        """k samples per prompt (1 if greedy; `samples` instead of rollout.samples_per_prompt for a
        sampled evaluation), rows ordered prompt by prompt. `seed` (evaluation): draw from it alone,
        not from this worker's (seed, version, call) stream, which it leaves untouched, so an evaluation
        of the same weights samples the same answers in training and in `rayrlhf eval`.

        greedy with num_beams > 1 is beam search (held-out evaluation): the best beam per prompt. Its
        old_logprobs are all 0: beams are reordered while decoding, and evaluation never trains on them.
        """
        if not prompts:
            raise ValueError("generate() needs at least one prompt")
        if num_beams > 1 and not greedy:
            raise ValueError("num_beams > 1 is for greedy (evaluation) decoding, not for sampling")
        k = 1 if greedy else samples or self.samples_per_prompt
        ids = [self._prompt_ids(p) for p in prompts]
        prompt_ids, prompt_mask = left_pad(ids, self.pad_id)
        rendered = [self.tokenizer.decode(row) for row in ids]
        if seed is None:  # the sampler's RNG scheme (actors/generation/sampler.py): rows add their index
            seed = mix_seed(self.seed, self.version, self._calls)
            self._calls += 1
        budget = max_new_tokens or self.max_new_tokens
        if num_beams > 1:  # held-out evaluation only: beam search, no log-probs (never trained on)
            out = self.engine.beam_search(ids, 1, num_beams, budget)
        else:
            params = SamplingParams(max_tokens=budget, temperature=0.0 if greedy else self.temperature,
                                    top_p=self.top_p, stop=(), seed=seed)  # fmt: skip
            out = self.engine.generate(ids, k, params, max_rows=self.max_batch_rows)
        response, recorded = out.tokens, out.logprobs
        prompt_ids, prompt_mask = prompt_ids.repeat_interleave(k, dim=0), prompt_mask.repeat_interleave(k, dim=0)
        is_eos = torch.isin(response, torch.tensor(self.eos_ids))
        after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
        response = response.masked_fill(after_eos, self.pad_id)
        in_response = (~after_eos).long()

        input_ids = torch.cat([prompt_ids, response], dim=1)
        attention_mask = torch.cat([prompt_mask, in_response], dim=1)
        response_mask = torch.cat([torch.zeros_like(prompt_mask), in_response], dim=1).float()
        old_logprobs = torch.cat([torch.zeros_like(prompt_mask, dtype=torch.float32), recorded], dim=1) * response_mask

        group_ids = np.repeat(np.array([p.id for p in prompts], dtype=np.int64), k)
        return Trajectory(
            input_ids=input_ids.numpy(),
            attention_mask=attention_mask.numpy(),
            response_mask=response_mask.numpy(),
            old_logprobs=old_logprobs.float().numpy(),
            group_ids=group_ids,
            sample_ids=group_ids * k + np.tile(np.arange(k, dtype=np.int64), len(prompts)),
            policy_version=self.version,
            prompts=[text for text in rendered for _ in range(k)],
            responses=[
                self.tokenizer.decode(row[mask.bool()], skip_special_tokens=True)
                for row, mask in zip(response, in_response)
            ],
            references=[p.reference for p in prompts for _ in range(k)],
            prompt_texts=[p.text for p in prompts for _ in range(k)],
            extras=[p.extra for p in prompts for _ in range(k)],
            truncated=(~is_eos.any(dim=1)).numpy(),
            max_new_tokens=budget,
        )

    @torch.no_grad()
    def turn(
        self, contexts: list[list[int] | None], messages: list[list[dict]], rooms: list[int], max_new_tokens: int,
        greedy: bool = False, seed: int | None = None,
    ) -> list[Turn]:
        """One reply for each episode of a multi-turn rollout (jobs/run/episodes.py), from its ids so
        far (None on the first turn) and the environment's new messages, rendered as the chat template
        adds them (the first turn: the prompt; later: only the new messages' ids, after the sampled ones).
        A reply takes at most max_new_tokens ids and, with the new messages, at most rooms[i]; an episode
        without room gets a Turn without tokens. Seeded as generate() is: one call counter step per turn."""
        if self._renderer is None:
            self._renderer = MessageRenderer(self.tokenizer, self.eos_ids)
        observations = [
            self._prompt_ids(Prompt(-1, new)) if ids is None else self._renderer.delta(new)
            for ids, new in zip(contexts, messages)
        ]
        budgets = [min(max_new_tokens, room - (0 if ids is None else len(obs)))
                   for ids, obs, room in zip(contexts, observations, rooms)]  # fmt: skip
        rows = [i for i, budget in enumerate(budgets) if budget > 0]
        if seed is None:
            seed = mix_seed(self.seed, self.version, self._calls)
            self._calls += 1
        turns = [Turn(obs, [], [], "", False) for obs in observations]
        if not rows:
            return turns
        params = SamplingParams(max_tokens=max(budgets[i] for i in rows), stop=(), seed=seed,
                                temperature=0.0 if greedy else self.temperature, top_p=self.top_p)  # fmt: skip
        # each row draws from its own generator, so cutting a row at its own budget is exact
        out = self.engine.generate([(contexts[i] or []) + observations[i] for i in rows], 1, params)
        for i, tokens, logprobs in zip(rows, out.tokens.tolist(), out.logprobs.tolist()):
            ends = [j for j, t in enumerate(tokens[:budgets[i]]) if t in self.eos_ids]
            n = ends[0] + 1 if ends else budgets[i]
            text = self.tokenizer.decode(tokens[:n], skip_special_tokens=True)
            prompt_text = self.tokenizer.decode(observations[i]) if contexts[i] is None else ""
            turns[i] = Turn(observations[i], tokens[:n], logprobs[:n], text, bool(ends), prompt_text)
        return turns
