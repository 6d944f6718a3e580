"""The built-in math task and GSM8K-format files: hand-checked answers, disjoint splits, whole files."""

import json
import re

import pytest

from rayrlhf.actors.rewards.math_answers import final_number, math_exact_match
from rayrlhf.jobs.config.run import BUILTIN_NUM_TRAIN
from rayrlhf.jobs.data.math_task import FAMILIES, HELD_OUT_BLOCK, math_task, problem_stream
from rayrlhf.jobs.data.prompts import DataError, load_task, to_prompt


def test_every_worked_answer_computes_its_final_number():
    """Each family's arithmetic written in the answer evaluates to the number after ####."""
    for family, (question, worked, answer) in problem_stream(seed=0)[:500]:
        lhs, rhs = re.findall(r"(\d+ [-+*/] \d+) = (\d+)", worked)[-1]
        assert eval(lhs) == int(rhs) == answer, (family, worked)  # noqa: S307 (digits and one operator)
        assert str(answer) not in question.split("How many")[-1]  # the question does not give it away


def test_hand_checked_problems():
    render = FAMILIES["two_steps"][1]
    import random

    question, worked, answer = render((12, 5, 3), random.Random(0))
    assert answer == 14 and "12 + 5 = 17" in worked and "17 - 3 = 14" in worked
    question, worked, answer = FAMILIES["share"][1]((4, 6), random.Random(0))
    assert "shares 24 " in question and answer == 6


def test_splits_are_disjoint_and_stable_and_the_reference_checks():
    train, held = math_task(300, 50, seed=1)
    assert [p.id for p in train] == list(range(300)) and [p.id for p in held] == list(range(300, 350))
    assert not {p.text for p in train} & {p.text for p in held}
    assert math_task(300, 50, seed=1) == (train, held)
    assert [p.text for p in math_task(10, 20, seed=1)[1]] == [p.text for p in held[:20]]  # a prefix
    assert {p.extra["family"] for p in train} == set(FAMILIES)
    p = train[0]
    assert final_number(p.reference) == p.extra["answer"]
    assert p.reference.endswith(f"#### {p.extra['answer']}")
    assert math_exact_match([p.text], [f"So the answer is {p.extra['answer']}."], [p.reference]) == [1.0]
    with pytest.raises(ValueError, match="distinct items"):
        math_task(len(problem_stream(0)), 0, seed=0)
    assert HELD_OUT_BLOCK >= 100


def test_builtin_math_through_load_task_uses_the_schema_default_count():
    train, held = load_task("builtin_math", None, None, 10, seed=0)
    assert len(train) == BUILTIN_NUM_TRAIN and len(held) == 10


def test_gsm8k_fields_are_read_and_a_whole_file_is_used(tmp_path):
    rows = [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}", "source": "x"}
            for i in range(700)]
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    train, held = load_task(str(path), None, None, 1000, seed=0)
    assert len(train) + len(held) == 700 and len(held) == 70  # more than 512 rows: none dropped
    p = to_prompt(rows[3], 0, "x:4")
    assert p.text == "What is 3 + 1?" and p.reference.endswith("#### 4") and p.extra == {"source": "x"}
    with pytest.raises(DataError, match="x:1: 'reference' must be a string"):
        to_prompt({"question": "q", "answer": 4}, 0, "x:1")


def test_a_file_that_is_not_utf8_names_its_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl: line 2: not UTF-8 \(byte 15: b'\\xe9'\)"):
        load_task(str(path), None, None, 1, seed=0)


def test_overlong_prompts_are_found_before_ray_starts(tmp_path, capsys):
    from rayrlhf.jobs.config.base import ConfigError
    from rayrlhf.jobs.config.run import load_config
    from rayrlhf.jobs.train import prepare

    path = tmp_path / "long.jsonl"
    rows = [{"prompt": "short question?"}] * 9 + [{"prompt": "word " * 60}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    base = ["data.train=" + str(path), "policy.max_prompt_tokens=32", f"output_dir={tmp_path / 'run'}",
            "data.eval=" + str(path)]
    with pytest.raises(ConfigError, match=r"data: 1 of \d+ prompts are longer than policy.max_prompt_tokens=32 "
                                          r"once rendered; the first: prompt 9 \(\d+ tokens\)"):
        prepare(load_config("tiny", base))
    prepare(load_config("tiny", [*base, "data.overlong_prompts=truncate"]))
    assert "data: 1 prompts are longer than policy.max_prompt_tokens=32" in capsys.readouterr().err
