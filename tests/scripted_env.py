"""A scripted two-turn environment for the multi-turn tests (unit and e2e, by env.path to this file)."""


class Scripted:
    """Whatever the reply: first a tool message "7" (reward tool_reward, an env.options key), then done (reward 1)."""

    def __init__(self, tool_reward: float = 0.25) -> None:
        self.tool_reward = tool_reward

    def reset(self, row, seed):
        self.turn = 0
        return [{"role": "user", "content": "Say a number."}]

    def step(self, assistant):
        self.turn += 1
        return ([{"role": "tool", "content": "7"}], self.tool_reward, False) if self.turn == 1 else ([], 1.0, True)
