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

from rayrlhf.actors.logprobs import from_numpy, position_ids
from rayrlhf.actors.models import load_policy
from rayrlhf.actors.trajectory import Prompt, Trajectory


def state_dict_from_numpy(model: torch.nn.Module, weights: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Check a full HF state dict against the model's keys; tensors share the arrays' memory."""
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise ValueError(
            f"weights do not match the policy's state dict: missing {missing[:5]} ({len(missing)} in all), "
            f"unexpected {unexpected[:5]} ({len(unexpected)} in all)"
        )
    return {name: from_numpy(array) for name, array in weights.items()}


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
        model_dir: str,
        max_prompt_tokens: int,
        use_chat_template: bool,
        system_prompt: str | None,
        samples_per_prompt: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        torch_threads: int,
        seed: int,
        dtype: str = "float32",
    ):
        torch.set_num_threads(torch_threads)
        self.model, self.tokenizer = load_policy(model_dir, dtype=dtype)
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

    def load_weights(self, version: int, weights: dict[str, np.ndarray]) -> int:
        """Load a full state dict (HF names) published by the learner as `version`."""
        if version < self.version:
            raise ValueError(f"refusing weights of version {version}: this worker already holds {self.version}")
        self.model.load_state_dict(state_dict_from_numpy(self.model, weights), strict=True)
        self.version = int(version)
        return self.version

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
        out = self.model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=position_ids(prompt_mask),
                         use_cache=True, logits_to_keep=1)  # fmt: skip
        cache, logits = out.cache, out.logits[:, -1]  # `cache`: past_key_values renamed in transformers 5.2x
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
            out = self.model(input_ids=tokens.unsqueeze(-1), attention_mask=mask, position_ids=next_position,
                             cache=cache, use_cache=True)  # fmt: skip
            logits = out.logits[:, -1]
        return torch.cat([prompt_ids.repeat_interleave(k, dim=0), tokens_out[:, :steps]], dim=1), logp_out[:, :steps]

    @torch.no_grad()
    def generate(self, prompts: list[Prompt], greedy: bool = False, max_new_tokens: int | None = None) -> Trajectory:
        """k samples per prompt (1 if greedy), rows ordered prompt by prompt."""
        if not prompts:
            raise ValueError("generate() needs at least one prompt")
        k = 1 if greedy else self.samples_per_prompt
        prompt_ids, prompt_mask = self._left_padded(prompts)
        rendered = [self.tokenizer.decode(row[mask.bool()]) for row, mask in zip(prompt_ids, prompt_mask)]
        # Reproducible per (seed, version, call), independent of what else ran in this process.
        torch.manual_seed(int(np.random.SeedSequence([self.seed, self.version, self._calls]).generate_state(1)[0]))
        self._calls += 1
        sequences, recorded = self._decode(prompt_ids, prompt_mask, k, greedy, max_new_tokens or self.max_new_tokens)
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
        )
