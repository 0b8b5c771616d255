"""Generate text: the same as ``python -m charnn.cli.generate`` (this path is named by infra/, the image and users)."""
from charnn.cli.generate import main
main()
