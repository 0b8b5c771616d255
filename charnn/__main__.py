"""``python -m charnn SUB ARGS``: the same as the ``charnn`` command."""
from charnn.cli.main import main

main()
