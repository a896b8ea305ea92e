"""Keeping state: checkpoint files, the checkpoint policy, RNG states, the position in the data.

Below the engines: nothing here imports :mod:`engineflow.execute`, :mod:`engineflow.record` or
:mod:`engineflow.app`; what needs a fit receives it as an argument.
"""
