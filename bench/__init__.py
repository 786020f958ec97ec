"""The benchmark suite: carpool against the physical limit and its peers, in one run.

``python -m bench`` (or ``make bench``) measures the offline limit of each
model, starts carpool and each peer on a loopback port pinned to one core,
drives them from the other core in closed loop (wrk) and open loop (our own
Poisson generator), checks every answer, and writes
``bench/results/<date>-<host>.json`` with a Markdown report and PNG plots.
"""
