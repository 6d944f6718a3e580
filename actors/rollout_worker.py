"""The rollout role: sample k responses per prompt with the current policy version.

A plain class; the driver makes it a Ray actor. It returns a Trajectory of numpy arrays, so the
batch crosses the object store zero-copy. Notes on what the learner can rely on:
- Sampling is exactly softmax(logits / temperature), restricted by top_p: the model's own
  generation_config (top_k, repetition penalty, ...) is replaced by a neutral one at load time.
  old_logprobs are log softmax(logits / temperature) without the top_p cut (as OpenRLHF and
  verl do), so with top_p < 1 they are not the exact sampling probabilities. They are recorded
  while sampling, from the same logits (a second forward pass cost 40% of the rollout time);
  a KV-cached decode differs from a full forward pass by 1e-6 to 1e-5, far below what the
  PPO ratio's clip sees.
- `Trajectory.prompts` holds the prompt as the policy saw it: after the chat template and the
  left truncation to max_prompt_tokens, decoded with special tokens kept.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from rayrlhf.actors.devices import select_device, select_dtype
from rayrlhf.actors.models import load_policy, resolve_policy_here
from rayrlhf.actors.trajectory import Prompt, Trajectory
from rayrlhf.actors.weight_sync import BroadcastGroup, Weights, check_names


def eos_token_ids(model: torch.nn.Module, tokenizer) -> list[int]:
    """Every id that ends a response: the generation config's (int or list) and the tokenizer's."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("the policy has no EOS token: responses could never end")
    return sorted(set(ids))


def prompt_token_ids(
    tokenizer, prompt: Prompt, *, use_chat_template: bool, system_prompt: str | None, max_prompt_tokens: int
) -> list[int]:
    """The prompt as the policy sees it: chat template with the generation prompt (or plain text),
    left-truncated to max_prompt_tokens. SFT renders its prompts with this too."""
    if use_chat_template:
        messages = prompt.text
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
            if system_prompt:
                messages.insert(0, {"role": "system", "content": system_prompt})
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False).input_ids  # the template has its own
    else:
        if not isinstance(prompt.text, str):
            raise ValueError(f"prompt {prompt.id}: chat messages need data.use_chat_template=true")
        ids = tokenizer(prompt.text).input_ids
    if not ids:
        raise ValueError(f"prompt {prompt.id} is empty after tokenisation")
    return ids[-max_prompt_tokens:]


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows right-aligned into one batch (input_ids, attention_mask): decoder-only models
    generate from the last column, so every prompt must end there."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = torch.tensor(row)
        attention_mask[i, width - len(row) :] = 1
    return input_ids, attention_mask


class SampledLogprobs(LogitsProcessor):
    """Records log p(sampled token) from the raw logits, step by step, in O(batch x vocab) memory.

    HF runs custom processors before the sampling warpers, so `scores` are the model's logits.
    The token sampled from step t's scores is the last column of input_ids at step t+1; the last
    step's token is read from the finished sequences in `collect`.
    """

    def __init__(self, temperature: float):
        self.temperature = temperature
        self._pending: torch.Tensor | None = None  # [B, V] log-probs of the step not yet resolved
        self._steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._pending is not None:
            self._resolve(input_ids[:, -1])
        self._pending = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def _resolve(self, tokens: torch.Tensor) -> None:
        self._steps.append(self._pending.gather(-1, tokens.unsqueeze(-1)).squeeze(-1))
        self._pending = None

    def collect(self, sequences: torch.Tensor, num_new: int) -> torch.Tensor:
        """[B, num_new] log-probs of the generated columns of `sequences`."""
        if self._pending is not None:
            self._resolve(sequences[:, -1])
        if len(self._steps) != num_new:
            raise RuntimeError(f"recorded {len(self._steps)} sampling steps for {num_new} generated tokens")
        return torch.stack(self._steps, dim=1) if self._steps else sequences.new_zeros((len(sequences), 0)).float()


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
        dtype: str = "auto",
        device: str = "cpu",
        cache_dir: str | None = None,
    ):
        torch.set_num_threads(torch_threads)
        self.device = select_device(device)
        path = resolve_policy_here(model, cache_dir)  # on this node: the driver's paths mean nothing here
        self.model, self.tokenizer = load_policy(path, select_dtype(dtype, self.device), self.device)
        self.model.requires_grad_(False)
        self.eos_ids = eos_token_ids(self.model, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id
        self.model.generation_config = GenerationConfig(
            eos_token_id=self.eos_ids, pad_token_id=self.pad_id, bos_token_id=self.tokenizer.bos_token_id
        )
        self.max_prompt_tokens = max_prompt_tokens
        self.use_chat_template = use_chat_template
        self.system_prompt = system_prompt
        self.samples_per_prompt = samples_per_prompt
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self.version = 0
        self._calls = 0
        self._weight_group: BroadcastGroup | None = None

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

    def weight_dtypes(self) -> dict[str, str]:
        """The dtype of each tensor of this worker's state dict: what a broadcast must send."""
        return {name: str(t.dtype).removeprefix("torch.") for name, t in self.model.state_dict().items()}

    def join_weight_group(self, master_addr: str, master_port: int, rank: int, world_size: int, backend: str) -> None:
        """Join the broadcast group of learner rank 0 (see actors/weight_sync.py); blocks until all joined."""
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
        worker (jobs/recovery.py) or a resumed run (jobs/run_state.py) gets both back, and the weights
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
        self, prompts: list[Prompt], greedy: bool = False, max_new_tokens: int | None = None, num_beams: int = 1
    ) -> Trajectory:
        """k samples per prompt (1 if greedy), rows ordered prompt by prompt.

        greedy with num_beams > 1 is beam search (held-out evaluation): the best beam per prompt. Its
        old_logprobs are all 0: beams are reordered while decoding, and evaluation never trains on them.
        """
        if not prompts:
            raise ValueError("generate() needs at least one prompt")
        if num_beams > 1 and not greedy:
            raise ValueError("num_beams > 1 is for greedy (evaluation) decoding, not for sampling")
        k = 1 if greedy else self.samples_per_prompt
        prompt_ids, prompt_mask = self._left_padded(prompts)
        rendered = [self.tokenizer.decode(row[mask.bool()]) for row, mask in zip(prompt_ids, prompt_mask)]
        sampling = {} if greedy else {"temperature": self.temperature, "top_p": self.top_p, "top_k": 0}
        if num_beams > 1:
            sampling = {"num_beams": num_beams, "early_stopping": True}
        # Reproducible per (seed, version, call), independent of what else ran in this process.
        torch.manual_seed(int(np.random.SeedSequence([self.seed, self.version, self._calls]).generate_state(1)[0]))
        self._calls += 1
        recorder = SampledLogprobs(self.temperature)
        budget = max_new_tokens or self.max_new_tokens
        sequences = self.model.generate(
            input_ids=prompt_ids.to(self.device),
            attention_mask=prompt_mask.to(self.device),
            do_sample=not greedy,
            num_return_sequences=k,
            max_new_tokens=budget,
            logits_processor=LogitsProcessorList([recorder] if num_beams == 1 else []),
            **sampling,
        )
        n_new = sequences.shape[1] - prompt_ids.shape[1]
        sampled_logprobs = recorder.collect(sequences, n_new).cpu() if num_beams == 1 else torch.zeros(len(sequences), n_new)
        sequences = sequences.cpu()
        width = prompt_ids.shape[1]
        prompt_ids, prompt_mask = prompt_ids.repeat_interleave(k, dim=0), prompt_mask.repeat_interleave(k, dim=0)
        if not torch.equal(sequences[:, :width], prompt_ids):
            raise RuntimeError("generate() returned rows in an unexpected order")
        response = sequences[:, width:]
        is_eos = torch.isin(response, torch.tensor(self.eos_ids))
        after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
        response = response.masked_fill(after_eos, self.pad_id)
        in_response = (~after_eos).long()

        input_ids = torch.cat([prompt_ids, response], dim=1)
        attention_mask = torch.cat([prompt_mask, in_response], dim=1)
        response_mask = torch.cat([torch.zeros_like(prompt_mask), in_response], dim=1).float()
        old_logprobs = torch.cat([torch.zeros_like(prompt_mask, dtype=torch.float32),
                                  sampled_logprobs], dim=1) * response_mask  # fmt: skip

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
