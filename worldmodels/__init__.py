"""worldmodels: DreamerV3 (RSSM) and R2I (S3M) world-model agents as pure JAX functions over PyTrees."""

__all__ = ["Policy", "load"]


def __getattr__(name: str):
    # lazily, so that importing a submodule does not import the policy's dependencies first
    if name in __all__:
        from worldmodels import policy

        return getattr(policy, name)
    raise AttributeError(f"module 'worldmodels' has no attribute {name!r}")
