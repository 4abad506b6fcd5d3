"""MMEB runner: every reported number against an independent per-query MaxSim computation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from metaembed import Budget, BudgetError
from metaembed.errors import DataError
from metaembed.eval.mmeb import (
    MMEB_DATASETS,
    budget_scores,
    evaluate_mmeb,
    load_datasets,
    parse_records,
)
from metaembed.scoring import maxsim_reference


def reference_ranks(encoder, rows, budget):
    """Rank of the gold among the query's distinct candidates, ties counted against it (float64 maxsim)."""
    ranks = []
    for row in rows:
        qkey = (row["qry_text"] or None, row["qry_img_path"] or None)
        texts, images = row["tgt_text"], row["tgt_img_path"] or [""] * len(row["tgt_text"])
        keys = []
        for text, image in zip(texts, images, strict=True):
            key = (text or None, image or None)
            if key not in keys:
                keys.append(key)
        q = encoder.vectors("query", qkey)[None].double()
        c = torch.stack([encoder.vectors("candidate", k) for k in keys]).double()
        scores = maxsim_reference(q, c, budget)[0]
        ranks.append(sum(1 for s in scores.tolist() if s >= scores[0].item()))
    return ranks


def expected_metrics(ranks):
    n = len(ranks)
    return {
        "precision_at_1": sum(r == 1 for r in ranks) / n,
        "hit_at_5": sum(r <= 5 for r in ranks) / n,
        "mrr": sum(1 / r for r in ranks) / n,
    }


def test_every_number_matches_an_independent_computation(mmeb_data, table_encoder):
    eval_dir, root, rows = mmeb_data
    encoder = table_encoder()
    result = evaluate_mmeb(encoder, load_datasets(eval_dir, image_root=root), model_name="table")
    assert result.budgets == [str(b) for b in Budget.LADDER]
    assert sorted(result.task_names) == sorted(rows)
    per = {}
    for name, records in rows.items():
        for budget in Budget.LADDER:
            expected = expected_metrics(reference_ranks(encoder, records, budget))
            per[(name, str(budget))] = expected
            for metric, value in expected.items():
                assert result.value(name, budget, metric) == pytest.approx(value, abs=1e-12), (name, budget, metric)
    groups = {
        "overall": list(rows),
        "Classification": ["ImageNet-1K"],
        "Retrieval": ["CIRR"],
        "Visual Grounding": ["RefCOCO"],
        "Other": ["ToySet"],
        "IND": ["ImageNet-1K", "CIRR"],
        "OOD": ["RefCOCO"],
    }
    assert set(result.group_names) == set(groups)
    for group, members in groups.items():
        for budget in result.budgets:
            for metric in ("precision_at_1", "hit_at_5", "mrr"):
                value = sum(per[(m, budget)][metric] for m in members) / len(members)
                assert result.group_value(group, budget, metric) == pytest.approx(value, abs=1e-12)
    described = {d["name"]: d for d in result.datasets}
    assert described["ImageNet-1K"]["category"] == "Classification" and described["ImageNet-1K"]["split"] == "IND"
    assert described["ToySet"]["category"] == "Other" and described["ToySet"]["split"] == "n/a"
    assert described["RefCOCO"]["revision"].startswith("sha256:")
    assert result.embedding_dim == 4


def test_each_distinct_item_is_encoded_once_for_all_budgets(mmeb_data, table_encoder):
    eval_dir, root, _ = mmeb_data
    encoder = table_encoder()
    result = evaluate_mmeb(encoder, load_datasets(eval_dir, ["ImageNet-1K", "CIRR"], image_root=root))
    assert [side for side, _ in encoder.calls] == ["query", "candidate"] * 2
    for _, items in encoder.calls:
        keys = [encoder.key(i) for i in items]
        assert len(keys) == len(set(keys))
    imagenet_candidates = [encoder.key(i)[0] for i in encoder.calls[1][1]]
    assert imagenet_candidates == ["red", "green", "blue", "yellow"]  # 3 lists of 5 slots → 4 distinct labels
    assert result.encodes == {
        "query_encodes": 3 + 2,
        "candidate_encodes": 4 + 6,
        "naive_query_encodes": (3 + 2) * 5,
        "naive_candidate_encodes": (3 * 4 + 2 * 3) * 5,  # per-list repeats are dropped in both counts
    }


def test_a_tie_with_the_gold_is_a_miss_and_a_repeated_gold_is_the_gold(table_encoder):
    same = torch.ones(64, 4) / 4
    rows = [
        {"qry_text": "q", "qry_img_path": "", "tgt_text": ["gold", "twin"], "tgt_img_path": ["", ""]},
        {"qry_text": "q", "qry_img_path": "", "tgt_text": ["gold", "other", "gold"], "tgt_img_path": []},
    ]
    table = {
        ("candidate", ("gold", None)): same,
        ("candidate", ("twin", None)): same,
        ("candidate", ("other", None)): -same,
        ("query", ("q", None)): torch.ones(16, 4),
    }
    queries, candidates = parse_records(rows, "inline")
    assert candidates[1] == [("gold", None), ("other", None)]
    from metaembed.eval.mmeb import MMEBDataset

    dataset = MMEBDataset("Ties", "inline", None, None, queries, candidates)
    result = evaluate_mmeb(table_encoder(table=table), [dataset])
    for budget in result.budgets:
        assert result.value("Ties", budget) == 0.5  # first query: tie → miss; second: hit
        assert result.value("Ties", budget, "mrr") == pytest.approx((1 / 2 + 1) / 2)


def test_hand_computed_budget_dependence(table_encoder):
    """1x1 sees only the first vectors (distractor wins 0.6 vs 0.5); 2x4 sums two maxima (gold 1.0 vs 0.6)."""
    query = [[1.0, 0.0], [0.0, 1.0]]
    gold = [[0.5, 0.0], [0.0, 0.0], [0.0, 0.5], [0.0, 0.0]]
    distractor = [[0.6, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]]
    table = {("query", ("q", None)): query, ("candidate", ("g", None)): gold, ("candidate", ("d", None)): distractor}
    from metaembed.eval.mmeb import MMEBDataset

    dataset = MMEBDataset("Hand", "inline", None, None, [("q", None)], [[("g", None), ("d", None)]])
    encoder = table_encoder(num_query=2, num_candidate=4, dim=2, table=table)
    result = evaluate_mmeb(encoder, [dataset])
    assert result.budgets == ["1x1", "2x4"]  # the ladder budgets that fit 2 query / 4 candidate vectors
    assert result.value("Hand", "1x1") == 0.0 and result.value("Hand", "1x1", "mrr") == 0.5
    assert result.value("Hand", "2x4") == 1.0


def test_budget_scores_equal_the_reference_at_every_budget():
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(16, 8, generator=gen, dtype=torch.float64)
    candidates = torch.randn(30, 64, 8, generator=gen, dtype=torch.float64)
    budgets = [*Budget.LADDER, Budget(3, 5), Budget(16, 1)]
    got = budget_scores(query, candidates, budgets)
    for row, budget in enumerate(budgets):
        torch.testing.assert_close(got[row], maxsim_reference(query[None], candidates, budget)[0], rtol=0, atol=1e-12)


def test_hub_layout_with_images_zip_gives_the_same_numbers(mmeb_data, mmeb_zip_data, table_encoder):
    eval_dir, root, _ = mmeb_data
    zipped, _ = mmeb_zip_data
    a = evaluate_mmeb(table_encoder(), load_datasets(eval_dir, image_root=root))
    b = evaluate_mmeb(table_encoder(), load_datasets(zipped))
    assert a.scores == b.scores and a.groups == b.groups
    assert all(d["id"].startswith(str(zipped)) for d in b.datasets)


def test_the_table_has_36_datasets_in_4_categories():
    assert len(MMEB_DATASETS) == 36
    by_split = [s for _, s in MMEB_DATASETS.values()]
    assert by_split.count("IND") == 20 and by_split.count("OOD") == 16
    counts = {
        c: sum(1 for cat, _ in MMEB_DATASETS.values() if cat == c)
        for c in ("Classification", "VQA", "Retrieval", "Visual Grounding")
    }
    assert counts == {"Classification": 10, "VQA": 10, "Retrieval": 12, "Visual Grounding": 4}


def test_bad_data_is_rejected_before_any_encoding(mmeb_data, table_encoder, tmp_path):
    eval_dir, root, _ = mmeb_data
    with pytest.raises(DataError, match="no data for"):
        load_datasets(eval_dir, ["NotThere"], image_root=root)
    with pytest.raises(DataError, match="images are missing"):
        load_datasets(eval_dir, ["CIRR"], image_root=tmp_path)
    with pytest.raises(DataError, match="missing field 'tgt_text'"):
        parse_records([{"qry_text": "q", "qry_img_path": "", "tgt_img_path": []}], "x")
    with pytest.raises(DataError, match="pair up"):
        parse_records([{"qry_text": "q", "qry_img_path": "", "tgt_text": ["a", "b"], "tgt_img_path": ["x"]}], "x")
    with pytest.raises(DataError, match="neither text nor an image"):
        parse_records([{"qry_text": "", "qry_img_path": "", "tgt_text": ["a"], "tgt_img_path": [""]}], "x")
    with pytest.raises(DataError, match="neither a folder nor a hub id"):
        load_datasets(tmp_path / "missing" / "dir")
    encoder = table_encoder(num_query=4, num_candidate=8)
    with pytest.raises(BudgetError):
        evaluate_mmeb(encoder, load_datasets(eval_dir, ["ToySet"]), budgets=["16x64"])
    assert encoder.calls == []


def test_bf16_storage_scores_exactly_representable_vectors_identically(mmeb_data, table_encoder):
    eval_dir, root, _ = mmeb_data
    datasets = load_datasets(eval_dir, image_root=root)
    full = evaluate_mmeb(table_encoder(), datasets)
    half = evaluate_mmeb(table_encoder(), datasets, store_dtype=torch.bfloat16)  # k/8 values are exact in bf16
    assert half.scores == full.scores


@settings(max_examples=40, deadline=None)
@given(
    r_q=st.integers(1, 6), r_c=st.integers(1, 9), n=st.integers(1, 7), dim=st.integers(1, 5),
    picks=st.lists(st.tuples(st.integers(1, 6), st.integers(1, 9)), min_size=1, max_size=5), seed=st.integers(0, 99),
)  # fmt: skip
def test_budget_scores_property(r_q, r_c, n, dim, picks, seed):
    budgets = [Budget(min(a, r_q), min(b, r_c)) for a, b in picks]
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(r_q, dim, generator=gen, dtype=torch.float64)
    candidates = torch.randn(n, r_c, dim, generator=gen, dtype=torch.float64)
    got = budget_scores(query, candidates, budgets)
    assert got.shape == (len(budgets), n)
    for row, budget in enumerate(budgets):
        torch.testing.assert_close(got[row], maxsim_reference(query[None], candidates, budget)[0], rtol=0, atol=1e-12)


def test_a_source_folder_with_an_eval_subfolder_is_read_with_images_beside_it(mmeb_data, table_encoder):
    eval_dir, root, _ = mmeb_data
    direct = evaluate_mmeb(table_encoder(), load_datasets(eval_dir, image_root=root))
    via_source = evaluate_mmeb(table_encoder(), load_datasets(root))  # data/<source>/ itself
    assert via_source.scores == direct.scores
