"""Shared plumbing for every stage: config, model loading, batching, training loop, checkpoints, logging."""
