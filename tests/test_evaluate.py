"""Evaluation protocols: the arithmetic (fractions, statistics, aggregation over runs) and an end-to-end
evaluation of a briefly trained run."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest

import envs
from experiments import evaluate
from experiments.evaluate import Benchmark, benchmark_of
from worldmodels import loop
from worldmodels.config import make_config


def test_benchmark_names():
    assert benchmark_of("memory_maze/9x9") == Benchmark("memory_maze", "9x9")
    assert benchmark_of("dmc/walker-walk") == Benchmark("dmc", "walker-walk")
    assert benchmark_of("dmc-vision/cartpole-swingup") == Benchmark("dmc-vision", "cartpole-swingup")
    assert benchmark_of("popgym/RepeatPreviousEasy") == Benchmark("popgym", "RepeatPrevious", "Easy")
    assert benchmark_of("popgym/MineSweeperHard") == Benchmark("popgym", "MineSweeper", "Hard")
    assert benchmark_of("bsuite/memory_len/3") == Benchmark("bsuite", "memory_len/3")
    assert benchmark_of("gym:CartPole-v1") == Benchmark("gym", "CartPole-v1")
    with pytest.raises(ValueError, match="difficulty"):
        benchmark_of("popgym/RepeatPrevious")


@pytest.mark.parametrize("size, human, best", [("9x9", 26.4, 34.8), ("11x11", 44.3, 58.0),
                                               ("13x13", 55.5, 74.5), ("15x15", 67.7, 87.7)])
def test_memory_maze_fractions(size, human, best):
    at_human = evaluate.memory_maze_fractions(human, size)
    assert at_human["human_fraction"] == pytest.approx(1.0)
    assert at_human["max_fraction"] == pytest.approx(human / best)
    assert evaluate.memory_maze_fractions(best, size)["max_fraction"] == pytest.approx(1.0)
    assert evaluate.memory_maze_fractions(0.0, size)["human_fraction"] == 0.0


def test_memory_maze_unknown_size():
    with pytest.raises(ValueError, match="valid sizes: 9x9, 11x11"):
        evaluate.memory_maze_fractions(1.0, "7x7")


def test_episode_stats():
    stats = evaluate.episode_stats([1.0, 2.0, 6.0])
    assert stats["return_mean"] == 3.0
    assert stats["return_std"] == pytest.approx(math.sqrt(7.0))  # sample std: (4 + 1 + 9) / 2
    assert stats["return_stderr"] == pytest.approx(math.sqrt(7.0 / 3.0))
    assert (stats["return_min"], stats["return_max"], stats["episodes"]) == (1.0, 6.0, 3)
    assert evaluate.episode_stats([5.0])["return_std"] == 0.0
    with pytest.raises(ValueError):
        evaluate.episode_stats([])


def test_protocol_figures_per_benchmark():
    maze = evaluate.protocol_figures("memory_maze/11x11", [40.0, 48.6], [2000, 2000])
    assert maze["score"] == pytest.approx(44.3) and maze["human_fraction"] == pytest.approx(1.0)
    assert maze["max_fraction"] == pytest.approx(44.3 / 58.0)
    dmc = evaluate.protocol_figures("dmc-vision/walker-walk", [900.0, 700.0], [500, 500])
    assert dmc["return_mean"] == 800.0 and dmc["control_steps_mean"] == 1000 and "human_fraction" not in dmc
    with pytest.warns(UserWarning, match="not the protocol's 1000"):
        evaluate.protocol_figures("dmc/walker-walk", [10.0], [50])
    pop = evaluate.protocol_figures("popgym/RepeatPreviousMedium", [0.5], [51])
    assert (pop["task"], pop["difficulty"], pop["return_mean"]) == ("RepeatPrevious", "Medium", 0.5)


def _result(env, returns, lengths):
    return {"figures": evaluate.protocol_figures(env, returns, lengths)}


def test_aggregate_over_runs_and_popgym_table():
    results = [_result("memory_maze/9x9", [20.0, 30.0], [1000, 1000]),  # run mean 25
               _result("memory_maze/9x9", [33.0], [1000]),  # run mean 33
               _result("popgym/RepeatPreviousEasy", [0.5, 0.7], [51, 51]),
               _result("popgym/RepeatPreviousHard", [-0.2], [51]),
               _result("popgym/CountRecallEasy", [0.1], [51])]
    rows = {row["env"]: row for row in evaluate.aggregate(results)}
    maze = rows["memory_maze/9x9"]
    assert (maze["runs"], maze["episodes"]) == (2, 3)
    assert maze["return_mean"] == 29.0  # the mean of the run means, not of the episodes
    assert maze["return_std_over_runs"] == pytest.approx(math.sqrt(32.0))
    assert maze["human_fraction"] == pytest.approx(29.0 / 26.4)
    assert maze["max_fraction"] == pytest.approx(29.0 / 34.8)
    assert rows["popgym/RepeatPreviousEasy"]["return_std_over_runs"] == 0.0
    table = evaluate.popgym_table(list(rows.values()))
    assert table == {"RepeatPrevious": {"Easy": pytest.approx(0.6), "Hard": -0.2}, "CountRecall": {"Easy": 0.1}}
    text = evaluate.report([{**r, "run": f"r{i}", "trained_env_steps": 10, "final_train_return": None}
                            for i, r in enumerate(results)])
    assert "POPGym final episode return" in text and "RepeatPrevious" in text and "1.098" in text


def test_final_train_return(tmp_path):
    lines = [{"mode": "train", "return": float(i)} for i in range(10)] + [{"mode": "eval", "return": 100.0}]
    (tmp_path / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert evaluate.final_train_return(tmp_path, 4) == 7.5
    assert evaluate.final_train_return(tmp_path / "missing", 4) is None


def test_evaluate_a_briefly_trained_run(tmp_path):
    # RepeatPreviousEasy: 51-step episodes; a few training steps, then a checkpoint at the end.
    config = make_config(["debug"], {"run.env": "popgym/RepeatPreviousEasy", "run.logdir": str(tmp_path),
                                     "run.steps": 120, "run.train_start": 64})
    trained = loop.run(config, lambda seed: envs.make(config.run.env, seed=seed))

    config_back = evaluate.load_config(tmp_path)
    assert config_back == config
    probe = envs.make(config.run.env)
    state, step, counters = evaluate.restore_agent(tmp_path, config, probe.observation_space, probe.action_space)
    assert step == counters["env_steps"] == 120
    leaves = lambda s: jax.tree.leaves(s)
    assert all(np.array_equal(a, b) for a, b in zip(leaves(trained["state"]), leaves(state)))

    results = evaluate.main([str(tmp_path), "--episodes", "3", "--num-envs", "2", "--parallel",
                             "--out", str(tmp_path / "all.json")])
    (result,) = results
    saved = json.loads((tmp_path / "evaluation.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert [e["length"] for e in saved["episodes"]] == [51, 51, 51]
    assert saved["checkpoint_step"] == saved["trained_env_steps"] == 120 and saved["greedy"]
    figures = saved["figures"]
    assert (figures["benchmark"], figures["task"], figures["difficulty"]) == ("popgym", "RepeatPrevious", "Easy")
    assert figures["return_mean"] == pytest.approx(np.mean([e["return"] for e in saved["episodes"]]))
    assert saved["final_train_return"] is not None  # 120 steps hold two 51-step training episodes
    assert json.loads((tmp_path / "all.json").read_text())["popgym"] == {
        "RepeatPrevious": {"Easy": pytest.approx(figures["return_mean"])}}

    # Greedy evaluation with the same seed is reproducible; sampling runs too.
    again = evaluate.evaluate_run(tmp_path, 3, num_envs=2, write=False)
    assert again["episodes"] == result["episodes"]
    sampled = evaluate.evaluate_run(tmp_path, 1, greedy=False, write=False)
    assert not sampled["greedy"] and sampled["episodes"][0]["length"] == 51


def test_evaluate_refuses_a_directory_without_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        evaluate.evaluate_run(tmp_path)


def test_evaluate_names_the_fix_for_a_device_loop_run(tmp_path):
    import envs.jax as jenvs

    env, params = jenvs.make("memory_len/0")
    config = make_config(["debug"], {"run.logdir": str(tmp_path), "run.env": "bsuite/memory_len/0",
                                     "run.steps": 32, "run.train_ratio": 0.0})
    loop.run_on_device(config, env, params, chunk_env_steps=32)
    with pytest.raises(ValueError, match="device-loop run.*--run.eval-every"):
        evaluate.evaluate_run(tmp_path)
