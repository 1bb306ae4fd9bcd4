"""Benchmark harnesses, kept outside the installed package: ``make bench`` (throughput, ``throughput.py``),
``make bench-gpu`` (``gpu.py``), the merge (``merge.py``) and memory / start-up (``memory.py``). Shared pieces
(the machine line, BENCHMARKS.md sections, the environment for child processes) are in ``common.py``."""
