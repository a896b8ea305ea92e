"""Recording runs: the run folder (the source of truth), the SQLite index over them, code
snapshots, TensorBoard files and loading a past run.

Imports the layers below (:mod:`engineflow.declare`, :mod:`engineflow.state`,
:mod:`engineflow.execute`), never :mod:`engineflow.app`.
"""
