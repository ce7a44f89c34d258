"""The bsuite scoring path (`experiments.bsuite_eval`) on CSVs recorded from scripted agents.

Scripted agents play through `envs.make("bsuite/<id>", results_dir=...)`, so the CSVs are written
by bsuite's own logger; the expected scores follow from what the agents did (counted here) and
bsuite's score definitions.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

import envs
from experiments import bsuite_eval

# agent(first observation of the episode, current observation, rng) -> action
Agent = Callable[[np.ndarray, np.ndarray, np.random.Generator], int]


def _play(bsuite_id: str, agent: Agent, episodes: int, results_dir, seed: int = 0) -> list[float]:
    """Play `episodes` recorded episodes; returns each episode's return."""
    env = envs.make(f"bsuite/{bsuite_id}", seed=seed, results_dir=str(results_dir))
    rng = np.random.default_rng(seed)
    returns = []
    for _ in range(episodes):
        obs, _ = env.reset()
        first, total, done = obs, 0.0, False
        while not done:
            obs, reward, terminated, truncated, _ = env.step(agent(first, obs, rng))
            total += reward
            done = terminated or truncated
        returns.append(total)
    env.close()
    return returns


def memory_perfect(first, obs, rng):
    return int(first[0, 2] > 0)  # the context bit, shown (as +-1) in the first observation


def memory_random(first, obs, rng):
    return int(rng.integers(2))


def _memory_sometimes(p_correct: float) -> Agent:
    return lambda first, obs, rng: memory_perfect(first, obs, rng) if rng.random() < p_correct else 1 - int(
        first[0, 2] > 0)


def catch_perfect(first, obs, rng):
    ball = int(np.argmax(first[0]))  # the ball starts in row 0 and falls straight down
    paddle = int(np.argmax(obs[-1]))
    return 1 + int(np.sign(ball - paddle))


def catch_random(first, obs, rng):
    return int(rng.integers(3))


def test_memory_len_perfect_and_random(tmp_path):
    ids = ["memory_len/0", "memory_len/1", "memory_len/4"]  # memory lengths 1, 2, 5
    for bsuite_id in ids:
        assert set(_play(bsuite_id, memory_perfect, 120, tmp_path / "perfect")) == {1.0}
        _play(bsuite_id, memory_random, 120, tmp_path / "random")
    df = bsuite_eval.load({"perfect": str(tmp_path / "perfect"), "random": str(tmp_path / "random")})
    scores = bsuite_eval.experiment_scores(df).set_index("label")
    assert scores.loc["perfect", "score"] == 1.0
    assert scores.loc["random", "score"] == 0.0
    assert not scores["finished"].any() and (scores["episodes"] == 120).all() and (scores["ids"] == 3).all()

    table = bsuite_eval.per_id(df).set_index(["label", "bsuite_id"])
    assert list(table.loc["perfect", "setting"]) == [1, 2, 5]
    assert (table.loc["perfect", "accuracy"] == 1.0).all() and (table.loc["perfect", "regret_ratio"] == 0).all()
    assert (table.loc["perfect", "id_score"] == 1.0).all() and (table.loc["perfect", "final_accuracy"] == 1).all()
    random = table.loc["random"]
    assert (random["id_score"] == 0.0).all()
    assert ((random["accuracy"] > 0.35) & (random["accuracy"] < 0.65)).all()  # chance: 0.5
    np.testing.assert_allclose(random["mean_return"], 2 * random["accuracy"] - 1)  # returns are +-1

    # A perfect and a random seed under one label: success rate 0.5 at every length.
    both = bsuite_eval.load({"agent": [str(tmp_path / "perfect"), str(tmp_path / "random")]})
    rates = bsuite_eval.success_by_setting(bsuite_eval.per_id(both), "memory_len")
    assert list(rates["setting"]) == [1, 2, 5] and (rates["success_rate"] == 0.5).all() and (rates["runs"] == 2).all()
    png = bsuite_eval.plot_success(bsuite_eval.per_id(both), "memory_len", tmp_path / "success.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_memory_regret_ratio_threshold_matches_counts(tmp_path):
    """bsuite's per-length success: regret ratio 2 * (1 - accuracy) < 0.75, from the counted episodes."""
    expected = {}
    for bsuite_id, p in [("memory_len/2", 0.85), ("memory_len/3", 0.55)]:
        returns = _play(bsuite_id, _memory_sometimes(p), 100, tmp_path, seed=3)  # 100 is a log point
        accuracy = np.mean(np.array(returns) == 1.0)
        expected[bsuite_id] = (accuracy, float(2 * (1 - accuracy) < bsuite_eval.MEMORY_REGRET_THRESHOLD))
    table = bsuite_eval.per_id(bsuite_eval.load(str(tmp_path))).set_index("bsuite_id")
    for bsuite_id, (accuracy, success) in expected.items():
        assert table.loc[bsuite_id, "accuracy"] == pytest.approx(accuracy)
        assert table.loc[bsuite_id, "regret_ratio"] == pytest.approx(2 * (1 - accuracy))
        assert table.loc[bsuite_id, "id_score"] == success
    assert [s for _, s in expected.values()] == [1.0, 0.0]  # the agents land on both sides
    score = bsuite_eval.experiment_scores(bsuite_eval.load(str(tmp_path)))["score"].item()
    assert score == 0.5


def test_partial_runs_are_scored_at_the_last_logged_episode(tmp_path):
    _play("memory_len/0", memory_perfect, 13, tmp_path)  # bsuite logs at ..., 10, 12, 14, ...
    row = bsuite_eval.per_id(bsuite_eval.load(str(tmp_path))).iloc[0]
    assert row["episodes"] == 12 and row["id_score"] == 1.0


def test_discounting_chain_myopic_and_oracle(tmp_path):
    ids = [f"discounting_chain/{k}" for k in range(5)]  # bonus chains 0..4: reward delays 1, 3, 10, 30, 100
    for bsuite_id in ids:
        bonus = int(bsuite_id.split("/")[1]) % 5
        # myopic: always the 1-step chain; oracle: the bonus chain
        assert set(_play(bsuite_id, lambda f, o, r: 0, 20, tmp_path / "myopic")) == {1.1 if bonus == 0 else 1.0}
        returns = _play(bsuite_id, lambda f, o, r, b=bonus: b, 20, tmp_path / "oracle")
        assert np.allclose(returns, 1.1)
    df = bsuite_eval.load({"myopic": str(tmp_path / "myopic"), "oracle": str(tmp_path / "oracle")})
    scores = bsuite_eval.experiment_scores(df).set_index("label")["score"]
    assert scores["myopic"] == pytest.approx(0.2) and scores["oracle"] == pytest.approx(1.0)
    table = bsuite_eval.per_id(df)
    myopic = table[table["label"] == "myopic"]
    assert list(myopic["setting"]) == [1, 3, 10, 30, 100]
    np.testing.assert_allclose(myopic["id_score"], [1, 0, 0, 0, 0], atol=1e-9)
    rates = bsuite_eval.success_by_setting(table, "discounting_chain")
    assert rates[rates["label"] == "oracle"]["success_rate"].tolist() == pytest.approx([1.0] * 5)


def test_catch_perfect_and_random(tmp_path):
    for k, bsuite_id in enumerate(["catch/0", "catch/1"]):
        assert set(_play(bsuite_id, catch_perfect, 50, tmp_path / "perfect", seed=k)) == {1.0}
        _play(bsuite_id, catch_random, 50, tmp_path / "random", seed=10 + k)
    df = bsuite_eval.load({"perfect": str(tmp_path / "perfect"), "random": str(tmp_path / "random")})
    scores = bsuite_eval.experiment_scores(df).set_index("label")["score"]
    assert scores["perfect"] == 1.0
    assert scores["random"] < 0.35  # bsuite's baseline regret 1.6 is about a random agent's


def test_cli_report_and_plot(tmp_path, capsys):
    _play("memory_len/0", memory_perfect, 20, tmp_path / "run")
    bsuite_eval.main([str(tmp_path / "run"), "--labels", "perfect", "--plot", str(tmp_path / "plot.png")])
    out = capsys.readouterr().out
    assert "memory_len/0" in out and "bsuite scores" in out
    assert (tmp_path / "plot.png").exists()


def test_load_names_the_fix_for_an_empty_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="envs.make"):
        bsuite_eval.load(str(tmp_path))
