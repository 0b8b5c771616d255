"""Entry points and the job spec tree."""
