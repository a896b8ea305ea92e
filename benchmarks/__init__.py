"""engineflow's benchmarks: its cost against a raw PyTorch loop, plain Ignite and Lightning.

    python -m benchmarks                  # every family, 5 interleaved rounds (~10 min on 2 cores)
    python -m benchmarks --quick          # tiny sizes, 1 round: a smoke test
    python -m benchmarks --only overhead,handlers --rounds 10

Each configuration runs in a fresh process (:mod:`benchmarks.worker`); see ``benchmarks/README.md``
for the method, the machine and the latest table. This package imports nothing heavy itself.
"""
