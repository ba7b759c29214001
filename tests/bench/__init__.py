"""`make bench`: the app against a bare Channels consumer, same client, same run.

See docs/benchmarks.md for what is measured and how to read it.
"""
