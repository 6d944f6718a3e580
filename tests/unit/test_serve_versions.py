"""Versioned serving without a server: traffic shares, the round-robin, the config, feedback rules."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from rayrlhf.actors.serving.feedback import FeedbackBook, Preference, Rating, Served, parse_feedback
from rayrlhf.actors.serving.openai_schema import OpenAIError
from rayrlhf.actors.serving.versions import WeightedRoundRobin, resolve_shares
from rayrlhf.jobs.cli import build_parser
from rayrlhf.jobs.config.base import ConfigError
from rayrlhf.jobs.config.serve import FeedbackConfig, ServeConfig, VersionConfig, load_serve_config
from rayrlhf.jobs.data.supervised import load_rm_data
from rayrlhf.jobs.serve_state import ServingState

AB = ["A", "B"]


def test_shares_resolve_the_rest_evenly():
    assert resolve_shares(AB, {"B": 0.1}) == {"A": pytest.approx(0.9), "B": 0.1}
    assert resolve_shares(["A", "B", "C"], {"C": 0.4}) == {"A": pytest.approx(0.3), "B": pytest.approx(0.3), "C": 0.4}
    assert resolve_shares(AB, {}) == {"A": 0.5, "B": 0.5}
    assert resolve_shares(AB, {"B": 0.0}) == {"A": 1.0, "B": 0.0}  # a rollback names only B
    assert resolve_shares(AB, {"A": 0.25, "B": 0.75}) == {"A": 0.25, "B": 0.75}


@pytest.mark.parametrize(("explicit", "message"), [
    ({"C": 0.1}, "'C', which is not a served version"),
    ({"B": 1.5}, "share of 'B' must be in [0, 1]"),
    ({"B": -0.1}, "share of 'B' must be in [0, 1]"),
    ({"A": 0.5, "B": 0.4}, "sum to 0.9"),
    ({"A": 0.0, "B": 0.0}, "sum to 0"),
])
def test_bad_shares_name_what_is_wrong(explicit, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        resolve_shares(AB, explicit)


def test_round_robin_is_exact_per_window_and_skips_zero_shares():
    picker = WeightedRoundRobin({"A": 0.8, "B": 0.2})
    picks = [picker.pick() for _ in range(500)]
    for start in range(0, 500, 5):  # every 5 consecutive requests: exactly one B
        assert picks[start:start + 5].count("B") == 1
    picker = WeightedRoundRobin({"A": 1.0, "B": 0.0})
    assert Counter(picker.pick() for _ in range(20)) == {"A": 20}
    thirds = WeightedRoundRobin({"A": 1 / 3, "B": 2 / 3})
    assert Counter(thirds.pick() for _ in range(300)) == {"A": 100, "B": 200}


def test_config_and_cli_versions():
    args = build_parser().parse_args(["serve", "--model", "A=tiny-gpt2", "--model", "B=tiny-gpt2", "--traffic", "B=0.2"])
    assert args.model == ["A=tiny-gpt2", "B=tiny-gpt2"] and args.traffic == ["B=0.2"]
    versions = 'versions=[{"name": "A", "model": "tiny-gpt2"}, {"name": "B", "model": "tiny-gpt2"}]'
    cfg = load_serve_config(None, [versions, "traffic.B=0.2"])
    assert [v.name for v in cfg.versions] == AB and cfg.traffic == {"B": 0.2} and cfg.model_name == "rayrlhf"
    for overrides, message in [
        (["traffic.C=0.1"], "traffic names 'C'"),
        (["traffic.B=2"], "share of 'B'"),
        (['versions=[{"name": "A", "model": "x"}, {"name": "A", "model": "y"}]'], "names must be unique"),
        (['versions=[{"name": "a/b", "model": "x"}]'], "version name 'a/b'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_serve_config(None, [versions, *overrides] if "versions" not in overrides[0] else overrides)
    with pytest.raises(ConfigError, match="traffic needs versions"):
        load_serve_config(None, ["traffic.B=0.5"])


# --- feedback ---------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def book_with_answers(clock: Clock, max_records: int = 10) -> FeedbackBook:
    book = FeedbackBook(max_records=max_records, max_age_s=60, clock=clock)
    book.record(Served("r1", "A", ["2+3?"], ["5"], time=clock.now))
    book.record(Served("r2", "B", ["2+3?", "2+3?"], ["six", "5."], time=clock.now))
    book.record(Served("r3", "B", [[{"role": "user", "content": "hi"}]], ["hello"], time=clock.now))
    return book


def test_ratings_become_pairs_and_preferences_are_pairs(tmp_path):
    clock = Clock()
    book = book_with_answers(clock)
    ratings, pairs = book.feedback(parse_feedback(b'{"id": "r1", "rating": 1}'))
    assert pairs == [] and ratings[0] | {"time": 0} == {
        "prompt": "2+3?", "response": "5", "score": 1.0, "label": 1, "id": "r1", "index": 0, "version": "A",
        "served_at": 1000.0, "time": 0}
    ratings, pairs = book.feedback(Rating(id="r2", index=0, rating=0))  # one up, one down: a pair
    assert [(p["chosen"], p["rejected"], p["kind"], p["chosen_version"], p["rejected_version"]) for p in pairs] == [
        ("5", "six", "ratings", "A", "B")]
    ratings, pairs = book.feedback(Rating(id="r2", index=1, rating=1))  # equal to r1's: paired with r2#0 only
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("5.", "six")]
    _, pairs = book.feedback(parse_feedback(b'{"chosen": {"id": "r2", "index": 1}, "rejected": "r1"}'))
    assert [(p["prompt"], p["chosen"], p["rejected"], p["kind"]) for p in pairs] == [("2+3?", "5.", "5", "explicit")]
    # the rows are what train-rm reads
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs * 3))
    train, held_out = load_rm_data(str(path), None, 10, 10, seed=0)
    assert (train + held_out)[0].chosen == "5." and (train + held_out)[0].kind == "explicit"


@pytest.mark.parametrize(("body", "status", "param"), [
    (b'{"id": "nope", "rating": 1}', 404, "id"),
    (b'{"id": "r1", "rating": 1.5}', 400, "rating"),
    (b'{"id": "r1", "rating": "good"}', 400, "rating"),
    (b'{"id": "r1", "index": 1, "rating": 1}', 400, "index"),
    (b'{"id": "r1", "rating": 1, "extra": 2}', 400, "extra"),
    (b'{"id": "r1"}', 400, "rating"),
    (b'{"chosen": "r1"}', 400, "rejected"),
    (b'{"chosen": "r1", "rejected": "r3"}', 400, "rejected"),  # another prompt
    (b'{"chosen": "r1", "rejected": "r1"}', 400, "rejected"),
    (b'{"chosen": "r1", "rejected": {"id": "r2", "index": 7}}', 400, "rejected.index"),
    (b'{"chosen": "gone", "rejected": "r1"}', 404, "chosen"),
    (b'[1]', 400, None),
    (b'{"id": "r1", "rating": NaN}', 400, None),
])
def test_bad_feedback_is_a_4xx_naming_the_field(body, status, param):
    book = book_with_answers(Clock())
    with pytest.raises(OpenAIError) as err:
        book.feedback(parse_feedback(body))
    assert (err.value.status, err.value.param) == (status, param), err.value.message


def test_window_forgets_by_age_and_count_with_410():
    clock = Clock()
    book = book_with_answers(clock, max_records=3)
    book.feedback(Rating(id="r1", rating=1))
    with pytest.raises(OpenAIError) as err:
        book.feedback(Rating(id="r1", rating=0))
    assert err.value.status == 409
    book.record(Served("r4", "A", ["x"], ["y"], time=clock.now))  # count: r1 leaves
    assert len(book) == 3
    with pytest.raises(OpenAIError) as err:
        book.feedback(Preference(chosen="r1", rejected="r4"))
    assert (err.value.status, err.value.param) == (410, "chosen")
    clock.now += 61  # age: all leave
    with pytest.raises(OpenAIError) as err:
        book.feedback(Rating(id="r4", rating=1))
    assert err.value.status == 410 and len(book) == 0


def test_state_counts_each_versions_requests_and_latencies_and_keeps_answers_for_feedback(tmp_path):
    cfg = ServeConfig(versions=[VersionConfig(name="A", model="a"), VersionConfig(name="B", model="b")],
                      traffic={"B": 0.2}, feedback=FeedbackConfig(output_dir=str(tmp_path)))
    state = ServingState(cfg.model_dump())
    for latency in (0.4, 0.1, 0.3, 0.2):
        state.served("B", latency, "ok")
    state.served("B", 9.0, "refused")
    state.served("B", 9.0, "failed")
    report = state.report()
    assert report["versions"]["B"] == {
        "traffic": 0.2, "model": "b", "requests": 6, "ok": 4, "refused": 1, "failed": 1,
        "latency_mean_s": pytest.approx(0.25), "latency_p50_s": 0.3, "latency_p95_s": 0.4}  # of the ok ones only
    assert report["versions"]["A"]["requests"] == 0 and report["versions"]["A"]["latency_p50_s"] is None
    state.record(Served("cmpl-1", "B", ["2+3?", "2+3?"], ["5", "six"]))
    assert state.served_by(["cmpl-1", "cmpl-2"]) == {"cmpl-1": "B", "cmpl-2": None}
    assert state.feedback(b'{"id": "cmpl-1", "rating": 1}')[0] == "ok"
    assert state.feedback(b'{"id": "cmpl-1", "index": 1, "rating": 0}') == (
        "ok", {"object": "feedback", "ratings": 1, "pairs": 1})
    assert state.feedback(b'{"id": "cmpl-2", "rating": 1}')[:2] == ("error", 404)
    assert state.report()["feedback"] == {"kept": 1, "ratings": 2, "pairs": 1, "output_dir": str(tmp_path)}
    assert [json.loads(line)["chosen"] for line in (tmp_path / "preferences.jsonl").read_text().splitlines()] == ["5"]
