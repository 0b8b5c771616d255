"""Train a charnn model: the same as ``python -m charnn.cli.train`` (this path is named by infra/, the image and users)."""
from charnn.cli.train import main
main()
