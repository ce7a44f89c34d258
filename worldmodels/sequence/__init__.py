"""Sequence models behind one interface (`SequenceModel`), and the one place that picks between them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from jaxtyping import PRNGKeyArray

from worldmodels.sequence.base import SequenceModel, State
from worldmodels.sequence.rssm import RSSM, RSSMConfig, RSSMState


@dataclass(frozen=True)
class SequenceConfig:
    model: Literal["rssm"] = "rssm"
    rssm: RSSMConfig = field(default_factory=RSSMConfig)


def make_sequence_model(config: SequenceConfig, embed_dim: int, action_dim: int, *, key: PRNGKeyArray
                        ) -> SequenceModel:
    """Build the sequence model named by `config.model`."""
    if config.model == "rssm":
        return RSSM(config.rssm, embed_dim, action_dim, key=key)
    raise ValueError(f"unknown sequence model {config.model!r}; valid: 'rssm'")


__all__ = ["RSSM", "RSSMConfig", "RSSMState", "SequenceConfig", "SequenceModel", "State", "make_sequence_model"]
