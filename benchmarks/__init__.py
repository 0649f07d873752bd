"""Measured comparisons for ftsearch (issue 6): ratios measured side by side, in BENCHMARKS.md.

Each module measures one goal and has a ``--smoke`` mode (tiny sizes) that the test suite
runs to keep it working; ``python -m benchmarks.run_all`` (``make bench``) runs them all and
rewrites BENCHMARKS.md.
"""
