"""``python -m engineflow`` is the ``engineflow`` command."""

from engineflow.cli import entry

entry()
