"""Sequence models behind one interface (`SequenceModel`), and the one place that picks between them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from jaxtyping import PRNGKeyArray

from worldmodels.sequence.base import SequenceModel, State
from worldmodels.sequence.ffm import FFM, FFMConfig, FFMState
from worldmodels.sequence.rssm import RSSM, RSSMConfig, RSSMState
from worldmodels.sequence.s3m import S3M, S3MConfig, S3MState
from worldmodels.sequence.transformer import Transformer, TransformerConfig, TransformerState

MODELS = ("rssm", "s3m", "ffm", "transformer")


@dataclass(frozen=True)
class SequenceConfig:
    model: Literal["rssm", "s3m", "ffm", "transformer"] = "rssm"
    rssm: RSSMConfig = field(default_factory=RSSMConfig)
    s3m: S3MConfig = field(default_factory=S3MConfig)
    ffm: FFMConfig = field(default_factory=FFMConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)

    @property
    def selected(self):
        """The config of the model `model` names."""
        return getattr(self, self.model)


def make_sequence_model(config: SequenceConfig, embed_dim: int, action_dim: int, *, key: PRNGKeyArray,
                        dtype: str = "float32") -> SequenceModel:
    """Build the sequence model named by `config.model`. The RSSM computes in `dtype`; the others in
    float32 (the S3M's and FFM's parallel scans sum many terms; the Transformer's softmax)."""
    if config.model == "rssm":
        return RSSM(config.rssm, embed_dim, action_dim, key=key, dtype=dtype)
    if config.model == "s3m":
        return S3M(config.s3m, embed_dim, action_dim, key=key)
    if config.model == "ffm":
        return FFM(config.ffm, embed_dim, action_dim, key=key)
    if config.model == "transformer":
        return Transformer(config.transformer, embed_dim, action_dim, key=key)
    raise ValueError(f"unknown sequence model {config.model!r}; valid: {', '.join(map(repr, MODELS))}")


__all__ = ["FFM", "FFMConfig", "FFMState", "MODELS", "RSSM", "RSSMConfig", "RSSMState", "S3M", "S3MConfig", "S3MState",
           "SequenceConfig", "SequenceModel", "State", "Transformer", "TransformerConfig", "TransformerState",
           "make_sequence_model"]
