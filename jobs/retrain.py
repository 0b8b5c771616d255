"""Retrain when the corpus grows: the same as ``python -m charnn.cli.retrain`` (this path is named by infra/, the image and users)."""
from charnn.cli.retrain import main
main()
