"""``python -m engineflow`` is the ``engineflow`` command."""

from engineflow.cli import main

main()
