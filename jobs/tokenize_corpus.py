"""Tokenise a corpus: the same as ``python -m charnn.cli.tokenize`` (this path is named by infra/, the image and users)."""
from charnn.cli.tokenize import main
main()
