"""Data-parallel stacked-GRU training on Ray Train: model, carried state, loop, checkpoints."""
