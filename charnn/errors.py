"""Data-parallel stacked-GRU training on Ray Train: model, carried state, loop, checkpoints."""


class TrainingError(RuntimeError):
    """Ray Train gave up on a run; the message is the first worker's error, in one line."""
