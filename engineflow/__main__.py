"""``python -m engineflow`` is the ``engineflow`` command."""

from engineflow.app.cli import entry

entry()
