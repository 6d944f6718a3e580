"""The quiet console's worker-log sink, fed batches as Ray's log dispatcher hands them over (no Ray)."""

from __future__ import annotations

import io

from rayrlhf.cluster.worker_logs import WorkerLogs
from rayrlhf.jobs.run.tracking import what_you_have


def batch(role: str, pid: int, *lines: str) -> dict:
    return {"lines": list(lines), "pid": pid, "actor_name": role, "is_err": True, "ip": "127.0.0.1"}


def test_every_line_to_the_file_and_each_warning_once_to_the_console(tmp_path):
    console = io.StringIO()
    logs = WorkerLogs(console)
    logs(batch("RolloutWorker", 11, "Loading weights: 100%|##########| 28/28", "[INFO] Running in WANDB offline mode"))
    logs(batch("Learner", 12, "model.py:3: UserWarning: step 4 used 3 micro-batches"))
    logs.write_to(tmp_path / "workers.log")  # the lines before the run knew its folder are kept
    logs(batch("Learner", 12, "model.py:3: UserWarning: step 5 used 3 micro-batches"))  # the same, other numbers
    logs(batch("RewardScorer", 13, "ERROR scorer failed", "Writing model shards: 100%"))
    written = (tmp_path / "workers.log").read_text().splitlines()
    assert written == [
        "(RolloutWorker pid=11) Loading weights: 100%|##########| 28/28",
        "(RolloutWorker pid=11) [INFO] Running in WANDB offline mode",
        "(Learner pid=12) model.py:3: UserWarning: step 4 used 3 micro-batches",
        "(Learner pid=12) model.py:3: UserWarning: step 5 used 3 micro-batches",
        "(RewardScorer pid=13) ERROR scorer failed",
        "(RewardScorer pid=13) Writing model shards: 100%",
    ]
    assert console.getvalue().splitlines() == [
        "(Learner) model.py:3: UserWarning: step 4 used 3 micro-batches",
        "(RewardScorer) ERROR scorer failed",
    ]


def test_what_you_have_lists_the_places_and_the_serve_command():
    block = what_you_have({"final policy": "out/final", "TensorBoard": "tensorboard --logdir out/tb"}, "out/final")
    assert block.splitlines() == [
        "what you have:",
        "  final policy  out/final",
        "  TensorBoard   tensorboard --logdir out/tb",
        "  serve it      rayrlhf serve --model out/final",
    ]
    assert "serve" not in what_you_have({"reward model": "rm/final"}, None)
