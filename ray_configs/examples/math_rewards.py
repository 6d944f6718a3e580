"""An example user reward file (ray_configs/math_tiny.yaml names it in reward.functions).

A reward function takes keyword lists over a batch (prompts, completions, references, and every
other field of the data rows: here `answer` and `steps` of ray_configs/examples/math_tiny.jsonl) and
returns one float per row, or None where it does not apply.
"""

import re


def answer_mentioned(completions, answer, **kwargs):
    """Partial credit: 1.0 if the row's numeric answer appears anywhere in the completion, else 0.0."""
    scores = []
    for completion, value in zip(completions, answer):
        if value is None:
            scores.append(None)
        else:
            numbers = re.findall(r"-?\d+", completion.replace(",", ""))
            scores.append(1.0 if str(value) in numbers else 0.0)
    return scores
