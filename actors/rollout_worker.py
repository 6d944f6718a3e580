"""The rollout role: sample k responses per prompt with the current policy version.

A plain class; the driver makes it a Ray actor. It returns a Trajectory of numpy arrays, so the
batch crosses the object store zero-copy. Notes on what the learner can rely on:
- Sampling is exactly softmax(logits / temperature), restricted by top_p, in the worker's own decode
  loop (`_decode`): each prompt is prefilled once for its k samples and rows leave the batch at
  their EOS. The model's generation_config (top_k, repetition penalty, ...) plays no part; it is
  replaced by a neutral one at load time for anyone who calls HF generate on the model.
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
from transformers import GenerationConfig

from rayrlhf.actors.runtime.devices import select_device, select_dtype
from rayrlhf.actors.runtime.host_memory import keep_freed_memory
from rayrlhf.actors.rl.logprobs import position_ids
from rayrlhf.actors.runtime.models import load_policy, resolve_policy_here, transpose_output_head
from rayrlhf.actors.generation.tokens import eos_token_ids, left_pad, prompt_token_ids
from rayrlhf.actors.rl.trajectory import Prompt, Trajectory
from rayrlhf.actors.runtime.weight_sync import BroadcastGroup, Weights, check_names


def nucleus(logp: torch.Tensor, top_p: float) -> torch.Tensor:
    """[n, V] probabilities of exp(logp) cut to the smallest set of tokens holding top_p of the mass
    (at least one token), unnormalised: torch.multinomial does not need it."""
    probs = logp.exp()
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens ranked above each one
    sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


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
        keep_freed_memory(self.device)
        path = resolve_policy_here(model, cache_dir)  # on this node: the driver's paths mean nothing here
        self.model, self.tokenizer = load_policy(path, select_dtype(dtype, self.device), self.device)
        self.model.requires_grad_(False)
        transpose_output_head(self.model)  # decode steps drop finished rows: few rows against a big head
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

    def _choose(self, logp: torch.Tensor, greedy: bool, rows: torch.Tensor) -> torch.Tensor:
        """The next token of each still-running row (`rows`: their indices in the batch)."""
        if greedy:
            return logp.argmax(dim=-1)
        return torch.multinomial(nucleus(logp, self.top_p), 1).squeeze(-1)

    def _decode(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, k: int, greedy: bool, max_new_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[B*k, P + N] prompt and response tokens (padding after a row's EOS) and [B*k, N] the
        response tokens' log-probs (0 after EOS), like HF generate(num_return_sequences=k).

        Each prompt is prefilled once and its KV cache copied to its k samples; a row that emits
        EOS leaves the batch, so later steps only run the rows still writing. The log-probs are
        log softmax(logits / T) of the logits each token was sampled from (before the top_p cut).
        """
        dev = self.device  # the model and its cache live there; tokens are chosen on the CPU
        out = self.model(input_ids=prompt_ids.to(dev), attention_mask=prompt_mask.to(dev),
                         position_ids=position_ids(prompt_mask).to(dev), use_cache=True, logits_to_keep=1)  # fmt: skip
        cache, logits = out.cache, out.logits[:, -1].cpu()  # `cache`: past_key_values renamed in transformers 5.2x
        if k > 1:
            cache.batch_repeat_interleave(k)
            logits = logits.repeat_interleave(k, dim=0)
        mask = prompt_mask.repeat_interleave(k, dim=0)
        rows = torch.arange(len(mask))  # batch index of each row still writing
        tokens_out = torch.full((len(mask), max_new_tokens), self.pad_id, dtype=torch.long)
        logp_out = torch.zeros((len(mask), max_new_tokens), dtype=torch.float32)
        eos = torch.tensor(self.eos_ids)
        steps = 0
        for step in range(max_new_tokens):
            logp = torch.log_softmax(logits.float() / self.temperature, dim=-1)
            tokens = self._choose(logp, greedy, rows)
            tokens_out[rows, step] = tokens
            logp_out[rows, step] = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
            steps = step + 1
            running = ~torch.isin(tokens, eos)
            if step + 1 == max_new_tokens or not running.any():
                break
            if not running.all():
                keep = running.nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                rows, tokens, mask = rows[keep], tokens[keep], mask[keep]
            next_position = mask.sum(dim=1, keepdim=True)  # positions count real tokens only
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = self.model(input_ids=tokens.unsqueeze(-1).to(dev), attention_mask=mask.to(dev),
                             position_ids=next_position.to(dev), cache=cache, use_cache=True)  # fmt: skip
            logits = out.logits[:, -1].cpu()
        return torch.cat([prompt_ids.repeat_interleave(k, dim=0), tokens_out[:, :steps]], dim=1), logp_out[:, :steps]

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
        prompt_ids, prompt_mask = self._left_padded(prompts)
        rendered = [self.tokenizer.decode(row[mask.bool()]) for row, mask in zip(prompt_ids, prompt_mask)]
        # Reproducible per (seed, version, call), independent of what else ran in this process.
        if seed is None:
            torch.manual_seed(int(np.random.SeedSequence([self.seed, self.version, self._calls]).generate_state(1)[0]))
            self._calls += 1
        else:
            torch.manual_seed(int(np.random.SeedSequence([seed]).generate_state(1)[0]))
        budget = max_new_tokens or self.max_new_tokens
        if num_beams > 1:  # held-out evaluation only: HF's beam search, no log-probs (never trained on)
            sequences = self.model.generate(
                input_ids=prompt_ids.to(self.device), attention_mask=prompt_mask.to(self.device), do_sample=False,
                max_new_tokens=budget, num_beams=num_beams, early_stopping=True,
            ).cpu()
            recorded = torch.zeros(len(sequences), sequences.shape[1] - prompt_ids.shape[1])
        else:
            sequences, recorded = self._decode(prompt_ids, prompt_mask, k, greedy, budget)
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
