"""The command line: one module per job, and what they share (Ray start-up, errors, the JSON result)."""
