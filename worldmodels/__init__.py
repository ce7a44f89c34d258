"""worldmodels: DreamerV3 (RSSM) and R2I (S3M) world-model agents as pure JAX functions over PyTrees."""
