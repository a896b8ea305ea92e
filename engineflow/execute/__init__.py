"""Executing a recipe: engines around steps, injection by name, metrics, the best epoch, the fit.

Imports :mod:`engineflow.declare` and :mod:`engineflow.state`, never :mod:`engineflow.record` or
:mod:`engineflow.app`.
"""
