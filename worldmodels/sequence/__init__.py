"""Sequence models behind one interface (`SequenceModel`), and the one place that picks between them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from jaxtyping import PRNGKeyArray

from worldmodels.sequence.base import SequenceModel, State
from worldmodels.sequence.rssm import RSSM, RSSMConfig, RSSMState
from worldmodels.sequence.s3m import S3M, S3MConfig, S3MState


@dataclass(frozen=True)
class SequenceConfig:
    model: Literal["rssm", "s3m"] = "rssm"
    rssm: RSSMConfig = field(default_factory=RSSMConfig)
    s3m: S3MConfig = field(default_factory=S3MConfig)


def make_sequence_model(config: SequenceConfig, embed_dim: int, action_dim: int, *, key: PRNGKeyArray,
                        dtype: str = "float32") -> SequenceModel:
    """Build the sequence model named by `config.model`. The RSSM computes in `dtype`; the S3M always in
    float32 (its parallel scan sums many terms)."""
    if config.model == "rssm":
        return RSSM(config.rssm, embed_dim, action_dim, key=key, dtype=dtype)
    if config.model == "s3m":
        return S3M(config.s3m, embed_dim, action_dim, key=key)
    raise ValueError(f"unknown sequence model {config.model!r}; valid: 'rssm', 's3m'")


__all__ = ["RSSM", "RSSMConfig", "RSSMState", "S3M", "S3MConfig", "S3MState", "SequenceConfig", "SequenceModel", "State", "make_sequence_model"]
