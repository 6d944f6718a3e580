"""The built-in task and the user-data loaders."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pandas as pd
import pytest

from rayrlhf.jobs.data.prompts import DataError, load_prompts, load_task
from rayrlhf.jobs.data.task import DAYS, FAMILIES, MONTHS, builtin_task, family_stream

# ---- built-in task ---------------------------------------------------------------------------


def test_builtin_is_deterministic_by_seed() -> None:
    a = builtin_task(512, 100, seed=3)
    b = builtin_task(512, 100, seed=3)
    c = builtin_task(512, 100, seed=4)
    assert a == b
    assert [p.text for p in a[0]] != [p.text for p in c[0]]


def test_builtin_counts_ids_and_disjoint_splits() -> None:
    train, held = builtin_task(512, 100, seed=0)
    assert len(train) == 512 and len(held) == 100
    assert [p.id for p in train] == list(range(512))
    assert [p.id for p in held] == list(range(512, 612))
    assert not {p.text for p in train} & {p.text for p in held}
    assert len({p.text for p in train}) == 512  # no question twice
    assert all(isinstance(p.reference, str) and p.reference.endswith(".") for p in train + held)
    # The held-out split does not move when the training set grows.
    bigger_train, same_held = builtin_task(3000, 100, seed=0)
    assert len(bigger_train) == 3000 and [p.text for p in same_held] == [p.text for p in held]
    # A smaller held-out split is a prefix of it, and training still avoids all 100.
    small_train, small_held = builtin_task(512, 16, seed=0)
    assert [p.text for p in small_held] == [p.text for p in held[:16]]
    assert [p.text for p in small_train] == [p.text for p in train]


def test_builtin_mixes_every_family_evenly() -> None:
    stream = family_stream(0)
    first = [family for family, _, _ in stream[:100]]
    # 100 held-out items over 8 families round-robin: 4 families get 13, 4 get 12.
    assert sorted(first.count(f) for f in FAMILIES) == [12] * 4 + [13] * 4
    # No fact twice: a+b and b+a count as one, so the addition pool is C(75, 2) + 75 = 2850.
    additions = [q for f, q, _ in stream if f == "addition"]
    assert len(additions) == 75 * 74 // 2 + 75


def test_builtin_refuses_more_than_it_has() -> None:
    with pytest.raises(ValueError, match="distinct items"):
        builtin_task(20000, 100, seed=0)


def test_builtin_references_are_right() -> None:
    checked = 0
    for family, question, reference in family_stream(1)[:400]:
        nums = [int(n) for n in re.findall(r"\d+", question)]
        answer = reference.rstrip(".").split()[-1]
        if family == "addition":
            assert int(answer) == nums[0] + nums[1]  # e.g. "17 plus 25 is 42."
        elif family == "subtraction":
            a, b = (nums[0], nums[1]) if "minus" in question else (max(nums), min(nums))
            assert int(answer) == a - b
        elif family == "comparison":
            assert int(answer) == (max(nums) if "larger" in question else min(nums))
        elif family == "units" and "hour" in question and "minutes" in question:
            assert reference == f"{nums[0]} hour{'s' if nums[0] > 1 else ''} is {60 * nums[0]} minutes."
        checked += 1
    assert checked == 400


def test_builtin_hand_checked_cycles_and_tables() -> None:
    render_day = FAMILIES["weekday"][1]
    render_month = FAMILIES["month"][1]
    rng = random.Random(0)
    # Sunday (index 6) + 2 days wraps to Tuesday; January (0) - 3 months wraps to October.
    assert render_day((6, 2), rng)[1] == "Two days after Sunday is Tuesday."
    assert render_month((0, -3), rng)[1] == "Three months before January is October."
    assert render_day((0, 1), rng)[1] == "The day after Monday is Tuesday."
    assert DAYS[(6 + 2) % 7] == "Tuesday" and MONTHS[(0 - 3) % 12] == "October"
    assert FAMILIES["plural"][1](("mouse", "mice"), rng)[1] == "The plural of mouse is mice."
    assert FAMILIES["units"][1]((1, 3), rng)[1] == "3 minutes is 180 seconds."  # 3 * 60


# ---- user files ------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[object]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]


def test_jsonl_round_trip_with_chat_messages(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [{"prompt": "What is 2 plus 2?", "reference": "4.", "extra": 1}, {"prompt": CHAT}, {"prompt": "3"}],
    )
    prompts = load_prompts(path)
    assert [p.id for p in prompts] == [0, 1, 2]
    assert prompts[0].text == "What is 2 plus 2?" and prompts[0].reference == "4."
    assert prompts[1].text == CHAT and prompts[1].reference is None
    assert prompts[0].extra == {"extra": 1} and prompts[1].extra == {}  # other fields travel along
    assert [p.text for p in load_prompts(path, limit=2)] == ["What is 2 plus 2?", CHAT]


def test_parquet_round_trip_with_chat_messages(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pd.DataFrame({"prompt": [CHAT, CHAT[1:]], "reference": ["Hello.", None], "answer": [4.0, None]}).to_parquet(path)
    prompts = load_prompts(str(path))
    assert prompts[0].extra == {"answer": 4.0} and prompts[1].extra == {"answer": None}  # NaN: missing
    assert prompts[0].text == CHAT and prompts[0].reference == "Hello."
    assert prompts[1].text == CHAT[1:] and prompts[1].reference is None
    plain = tmp_path / "p.parquet"
    pd.DataFrame({"prompt": ["a", "b", "c"]}).to_parquet(plain)
    assert [p.text for p in load_prompts(str(plain), limit=2)] == ["a", "b"]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"prompt": "ok"}', "{not json"], r"line 2: not valid JSON"),
        (['{"prompt": "ok"}', "", '{"reference": "x"}'], r"line 3: missing 'prompt'"),
        (['{"prompt": "   "}'], r"line 1: 'prompt' is empty"),
        (['{"prompt": 7}'], r"line 1: 'prompt' must be a string or a list"),
        (['{"prompt": []}'], r"line 1: 'prompt' is an empty list"),
        (['{"prompt": [{"role": "user"}]}'], r"line 1: prompt message 0 must be"),
        (['{"prompt": "ok", "reference": 3}'], r"line 1: 'reference' must be a string"),
        (['["a", "b"]'], r"line 1: expected an object"),
        (["", "  "], r"no prompts"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path: Path, lines: list[str], message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*" + message):
        load_prompts(str(path))


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing.jsonl: file not found"):
        load_prompts(str(tmp_path / "missing.jsonl"))
    csv = tmp_path / "d.csv"
    csv.write_text("prompt\nhi\n")
    with pytest.raises(DataError, match=r"d\.csv: unknown file type '\.csv'"):
        load_prompts(str(csv))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="broken.parquet: not a readable Parquet file"):
        load_prompts(str(broken))
    nocol = tmp_path / "nocol.parquet"
    pd.DataFrame({"question": ["a"]}).to_parquet(nocol)
    with pytest.raises(DataError, match="nocol.parquet: no 'prompt' column"):
        load_prompts(str(nocol))
    badrow = tmp_path / "badrow.parquet"
    pd.DataFrame({"prompt": ["fine", ""]}).to_parquet(badrow)
    with pytest.raises(DataError, match=r"badrow.parquet: row 1: 'prompt' is empty"):
        load_prompts(str(badrow))
    empty = tmp_path / "empty.parquet"
    pd.DataFrame({"prompt": pd.Series([], dtype=str)}).to_parquet(empty)
    with pytest.raises(DataError, match="empty.parquet: no prompts"):
        load_prompts(str(empty))


# ---- load_task -------------------------------------------------------------------------------


def test_load_task_builtin_matches_builtin_task() -> None:
    assert load_task("builtin", None, 16, 8, seed=5) == builtin_task(16, 8, seed=5)


def test_load_task_holds_out_a_tenth_by_seed(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": f"q{i}", "reference": f"r{i}"} for i in range(25)])
    train, held = load_task(path, None, num_train=100, num_eval=100, seed=1)
    # 25 rows: 25 // 10 = 2 held out, 23 trained on; ids continue across the split.
    assert len(train) == 23 and len(held) == 2
    assert [p.id for p in train + held] == list(range(25))
    assert sorted(p.text for p in train + held) == sorted(f"q{i}" for i in range(25))
    assert load_task(path, None, 100, 100, seed=1) == (train, held)
    assert load_task(path, None, 100, 100, seed=2)[1] != held
    # Caps apply after the split: 5 of the 23, and the held-out part is unchanged.
    small_train, same_held = load_task(path, None, num_train=5, num_eval=100, seed=1)
    assert [p.text for p in small_train] == [p.text for p in train[:5]]
    assert [p.text for p in same_held] == [p.text for p in held]


def test_load_task_with_eval_file_and_tiny_train(tmp_path: Path) -> None:
    train_path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": f"q{i}"} for i in range(5)])
    eval_path = write_jsonl(tmp_path / "e.jsonl", [{"prompt": f"e{i}"} for i in range(4)])
    train, held = load_task(train_path, eval_path, num_train=3, num_eval=2, seed=0)
    assert [(p.id, p.text) for p in train + held] == [(0, "q0"), (1, "q1"), (2, "q2"), (3, "e0"), (4, "e1")]
    # 5 rows without an eval file: 5 // 10 = 0, raised to 1 held out.
    assert [len(s) for s in load_task(train_path, None, 10, 10, seed=0)] == [4, 1]
    one = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "only"}])
    with pytest.raises(DataError, match="one.jsonl: needs at least 2 prompts"):
        load_task(one, None, 10, 10, seed=0)
    builtin_train, user_held = load_task("builtin", eval_path, num_train=6, num_eval=3, seed=0)
    assert len(builtin_train) == 6 and [(p.id, p.text) for p in user_held] == [(6, "e0"), (7, "e1"), (8, "e2")]
