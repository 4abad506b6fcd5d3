"""Turning measurements into serving choices: the budget planner and the adaptive budget's calibration.

``metaembed plan`` reads quality results (``metaembed eval``) and cost measurements (``metaembed bench
scoring`` or measured on the spot) and recommends a budget, storage dtype and search mode for a latency,
memory or quality target; ``metaembed plan calibrate`` fits the threshold of the per-query ``auto`` budget
(:mod:`metaembed.index.adaptive`) on a dev split, and ``metaembed plan evaluate`` checks it on a test split.
"""
