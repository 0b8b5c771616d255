"""Serve a published model: the same as ``python -m charnn.cli.serve`` (this path is named by infra/, the image and users)."""
from charnn.cli.serve import main
main()
