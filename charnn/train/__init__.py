"""Training: the model's step, carried state, the Trainer and its parts, and how Ray Train runs it."""
