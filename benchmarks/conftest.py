"""pytest-benchmark suite (not part of the default test run):

    pytest benchmarks/ --benchmark-only --benchmark-autosave --benchmark-storage=benchmarks/results/pytest-benchmark
    pytest benchmarks/ --benchmark-only --benchmark-compare     # regressions against the last saved run
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
