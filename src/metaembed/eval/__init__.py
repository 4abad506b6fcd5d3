"""Evaluation: ranking metrics, the MMEB and ViDoRe runners at every budget, an mteb adapter, reports.

The runners encode every query and every distinct candidate once, with all vectors, and score each
budget of the ladder from that one pass (encoding cost does not depend on the budget).
"""

from __future__ import annotations
