"""What a fit's handlers and tools show in TensorBoard between epochs: scalars and histograms by
iteration (a learning rate, a gradient norm, activation statistics).

A producer adds entries to the fit's :class:`Board`; a recorded run's recorder writes them to the
run's TensorBoard file at the end of each iteration (tags ``iteration/<stage prefix><name>``, step
= the pipeline's iteration). A fit that nothing records (``ef.build``) has a closed board, which drops
what it is given: check ``board.open`` before computing a value only the board needs. Values may be
tensors on the device; they are read back when written, so add them only as often as a host sync is
affordable.

Example:
    >>> board = Board()
    >>> board.scalar("lr", 0.1, 3)     # closed: dropped
    >>> board.open = True
    >>> board.scalar("lr", 0.1, 3)
    >>> board.drain()
    [('scalar', 'lr', 0.1, 3)]
"""

from __future__ import annotations

from typing import Any


class Board:
    """Entries waiting for the run's TensorBoard file: ``(kind, name, value, iteration)``, kind
    "scalar", "histogram" (a tensor of values) or "bins" (``(edges, counts)`` of a histogram counted already)."""

    def __init__(self) -> None:
        self.open = False
        self._entries: list[tuple[str, str, Any, int]] = []

    def scalar(self, name: str, value: Any, iteration: int) -> None:
        """Show ``value`` (a number or a one-element tensor) under ``name`` at the stage's ``iteration``."""
        if self.open:
            self._entries.append(("scalar", name, value, iteration))

    def histogram(self, name: str, values: Any, iteration: int) -> None:
        """Show the distribution of ``values`` (a tensor) under ``name`` at the stage's ``iteration``."""
        if self.open:
            self._entries.append(("histogram", name, values, iteration))

    def histogram_bins(self, name: str, edges: list[float], counts: list[int], iteration: int) -> None:
        """Show a histogram counted already: ``counts[i]`` values between ``edges[i]`` and ``edges[i + 1]``."""
        if self.open:
            self._entries.append(("bins", name, (edges, counts), iteration))

    def drain(self) -> list[tuple[str, str, Any, int]]:
        """The entries added since the last drain, oldest first; the board is empty afterwards."""
        entries, self._entries = self._entries, []
        return entries
