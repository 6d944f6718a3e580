"""The reward's reserved names, declared once: the built-in components are named with them and a user
reward function may not take one (the config refuses it before Ray starts, the scorer again).

Pure Python with no imports: jobs/config/reward.py reads it, and the CLI must not load torch.
"""

FREQ, SIM, BLEU, ROUGE_L = "freq", "sim", "bleu", "rouge_l"
"""The built-in metrics, always computed (actors/rewards/components.py)."""
RM = "rm"
"""The learned reward model: a component only when reward.rm_weight != 0 (it costs a forward pass)."""
REMOTE = "remote"
"""reward.remote, a reward served over HTTP."""
TOTAL = "total"
"""The weighted sum: its normaliser (normalize=total) and its metric reward/total."""
LOGGED = ("raw", "length", "empty_frac", "truncated_frac", "length_penalty", "length_ratio")
"""The other reward metrics logged beside the components (reward/raw, eval/length, ...)."""

RESERVED = frozenset({FREQ, SIM, BLEU, ROUGE_L, RM, REMOTE, TOTAL, *LOGGED})
"""Names a user reward function cannot take."""
