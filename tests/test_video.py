"""Open-loop prediction videos ("dreams"): layout, what the model predicts after training on a toy
sequence, and the host loop writing them for replay and evaluation episodes."""

from __future__ import annotations

import dataclasses

import gymnasium as gym
import imageio.v3 as iio
import jax
import numpy as np
import pytest

from worldmodels import agent as agent_lib
from worldmodels import loop
from worldmodels.config import ConfigError, make_config, validate

SIDE, T = 16, 12


def _toy_images(batch: int, steps: int) -> np.ndarray:
    """A bright 4x4 square moving one pixel right per step on a dark background: `[B, T, 16, 16, 3]`."""
    images = np.full((batch, steps, SIDE, SIDE, 3), 20, np.uint8)
    for b in range(batch):
        for t in range(steps):
            x, y = (b * 3 + t) % (SIDE - 4), 4 + 2 * b
            images[b, t, y:y + 4, x:x + 4] = 230
    return images


def _toy_batch(batch: int = 4, steps: int = T) -> dict[str, np.ndarray]:
    return {"image": _toy_images(batch, steps), "action": np.tile(np.eye(2, dtype=np.float32)[0], (batch, steps, 1)),
            "reward": np.zeros((batch, steps), np.float32), "is_first": np.eye(1, steps, dtype=bool).repeat(batch, 0),
            "is_last": np.zeros((batch, steps), bool), "is_terminal": np.zeros((batch, steps), bool)}


def _init(lr: float | None = None):
    overrides = {"agent.optim.lr": lr} if lr else {}
    config = make_config(["debug"], overrides).agent
    return agent_lib.init(config, {"image": ((SIDE, SIDE, 3), "uint8")}, agent_lib.ActionSpec(2, True),
                          jax.random.PRNGKey(0))


def _panels(video: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split a `[T, B * H, 3 * W, C]` video into truth, model, error `[B, T, H, W, C]`."""
    t, _, w3, c = video.shape
    rows = video.reshape(t, batch, SIDE, 3, w3 // 3, c).transpose(1, 0, 3, 2, 4, 5)  # [B, T, 3, H, W, C]
    return rows[:, :, 0], rows[:, :, 1], rows[:, :, 2]


def test_open_loop_video_layout_and_truth_panel():
    state, batch = _init(), _toy_batch()
    videos = agent_lib.open_loop_video(state, batch, jax.random.PRNGKey(1))
    video = np.asarray(videos["image"])
    assert video.shape == (T, 4 * SIDE, 3 * SIDE, 3) and video.dtype == np.uint8
    truth, model, error = _panels(video, 4)
    np.testing.assert_array_equal(truth, batch["image"])  # the left panel is the replayed sequence itself
    expected_error = np.round(((model.astype(np.float64) - truth) / 255.0 + 1.0) / 2.0 * 255.0)
    assert np.abs(expected_error - error).max() <= 1  # (model - truth + 1) / 2, up to rounding of both
    before = agent_lib.TRACE_COUNTS["open_loop_video"]
    agent_lib.open_loop_video(state, batch, jax.random.PRNGKey(2))
    assert agent_lib.TRACE_COUNTS["open_loop_video"] == before  # one compiled program


def test_observed_frames_are_predicted_after_training_on_a_toy_sequence():
    batch = _toy_batch()
    state = _init(lr=1e-3)
    context_error = lambda s: np.abs(
        _panels(np.asarray(agent_lib.open_loop_video(s, batch, jax.random.PRNGKey(3))["image"]), 4)[1][:, :5]
        .astype(np.float64) - batch["image"][:, :5]).mean() / 255.0
    untrained = context_error(state)
    key = jax.random.PRNGKey(4)
    for _ in range(300):
        key, k = jax.random.split(key)
        state, _, _ = agent_lib.train(state, batch, k)
    trained = context_error(state)
    # the observed frames: mean abs error in [0, 1] pixel units, far below the untrained model's
    assert trained < 0.05 and trained < untrained / 4, (trained, untrained)


class _MovingSquare(gym.Env):
    """16x16 images of a square the action moves left or right; 30-step episodes; reward = x / 12."""

    observation_space = gym.spaces.Box(0, 255, (SIDE, SIDE, 3), np.uint8)
    action_space = gym.spaces.Discrete(2)

    def _obs(self):
        image = np.full((SIDE, SIDE, 3), 20, np.uint8)
        image[6:10, self.x:self.x + 4] = 230
        return image

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.x, self.t = int(self.np_random.integers(0, SIDE - 4)), 0
        return self._obs(), {}

    def step(self, action):
        self.x = int(np.clip(self.x + (1 if action else -1), 0, SIDE - 4))
        self.t += 1
        return self._obs(), self.x / 12.0, False, self.t >= 30, {}


def test_host_loop_writes_open_loop_videos(tmp_path):
    config = make_config(["debug"], {"run.env": "test:moving-square", "run.logdir": str(tmp_path), "run.steps": 192,
                                     "run.train_start": 64, "run.video_every": 96, "run.eval_every": 192,
                                     "run.eval_episodes": 1, "run.eval_video": True, "run.final_eval_episodes": 1,
                                     "run.tensorboard": True})
    loop.run(config, lambda seed: _MovingSquare())
    files = sorted(p.name for p in (tmp_path / "videos").iterdir())
    # replay videos at 96 and 192 (length: the 17-step window), evaluation videos at 192 (periodic, final)
    assert [f for f in files if f.startswith("open_loop")] == ["open_loop_image_000000096.mp4",
                                                               "open_loop_image_000000192.mp4"]
    assert [f for f in files if f.startswith("eval_open_loop")] == ["eval_open_loop_image_000000192.mp4"]
    replay_video = iio.imread(tmp_path / "videos" / "open_loop_image_000000192.mp4")
    assert replay_video.shape == (config.run.window, 4 * SIDE, 3 * SIDE, 3)
    eval_video = iio.imread(tmp_path / "videos" / "eval_open_loop_image_000000192.mp4")
    assert eval_video.shape == (30, SIDE, 3 * SIDE, 3)  # the whole 30-step episode (< 50 steps)
    (events,) = (tmp_path / "tensorboard").glob("events.*")
    assert b"open_loop/image" in events.read_bytes() and b"GIF89a" in events.read_bytes()  # animated GIF summaries


def test_video_options_need_images_and_a_long_enough_window(tmp_path):
    config = make_config(["debug"], {"run.env": "gym:CartPole-v1", "run.logdir": str(tmp_path), "run.video_every": 64})
    with pytest.raises(ValueError, match="no image observations"):
        loop.run(config, lambda seed: gym.make("CartPole-v1"))
    with pytest.raises(ConfigError, match="--run.seq-len 6 or more"):
        validate(dataclasses.replace(config, run=dataclasses.replace(config.run, seq_len=4)))
