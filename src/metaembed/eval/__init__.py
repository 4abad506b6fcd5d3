"""Evaluation: ranking metrics, the MMEB, ViDoRe and index-retrieval runs at every budget, an mteb adapter, reports.

One skeleton (:mod:`metaembed.eval.runner`) runs every benchmark: it encodes every query and every distinct
candidate once, with all vectors, scores each budget of the ladder from that one pass (encoding cost does not
depend on the budget), and can resume; each benchmark supplies only its data, its scoring and its groups.
"""

from __future__ import annotations
