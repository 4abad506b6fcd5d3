"""The mteb adapter on mteb's offline mock tasks, with retrieval numbers checked independently."""

from __future__ import annotations

import mteb
import pytest
import pytrec_eval
import torch
from mteb.mocks.mock_tasks.classification import MockClassificationTask
from mteb.mocks.mock_tasks.retrieval import MockAny2AnyRetrievalI2TTask, MockAny2AnyRetrievalT2ITask, MockRetrievalTask
from mteb.mocks.mock_tasks.sts import MockSTSTask
from mteb.mocks.mock_tasks.summarization import MockSummarizationTask

from metaembed import Budget
from metaembed.errors import InputError, ShapeError
from metaembed.eval.mteb_adapter import MetaEmbedMTEB
from metaembed.scoring import maxsim_reference


@pytest.mark.slow
def test_every_mock_task_for_text_and_image_passes(tiny_model):
    results = mteb.mock_run(MetaEmbedMTEB(tiny_model, "4x8", name="tiny"))
    ran = {name: status for name, status in results.items() if status is not None}
    assert len(ran) >= 40  # text and image tasks (audio / video are not our modalities)
    assert results.all_passed, results.to_markdown()


def test_pooled_task_types_run_in_mteb(tiny_model):
    """Classification / STS / summarization evaluators need one vector per item: the pooled path."""
    tasks = [MockClassificationTask(), MockSTSTask(), MockSummarizationTask()]
    results = mteb.evaluate(MetaEmbedMTEB(tiny_model, "2x4"), tasks, cache=None, show_progress_bar=False)
    assert sorted(r.task_name for r in results.task_results) == sorted(t.metadata.name for t in tasks)
    assert not results.exceptions


@pytest.mark.parametrize("task_class", [MockRetrievalTask, MockAny2AnyRetrievalT2ITask, MockAny2AnyRetrievalI2TTask])
@pytest.mark.parametrize("budget", ["1x1", "16x64"])
def test_retrieval_scores_equal_direct_maxsim_and_pytrec_eval(tiny_model, task_class, budget):
    wrapper = MetaEmbedMTEB(tiny_model, budget, name="tiny")
    (result,) = mteb.evaluate(wrapper, [task_class()], cache=None, show_progress_bar=False).task_results
    scores = result.scores["test"][0]
    task = task_class()
    task.load_data()
    split = task.dataset["default"]["test"]
    queries, corpus = split["queries"], split["corpus"]

    def items(rows):  # mteb joins a document's title and text with a space
        return [{"text": " ".join(filter(None, [row.get("title"), row.get("text")])) or None,
                 "image": row.get("image")} for row in rows]  # fmt: skip

    b = Budget.parse(budget)
    q = tiny_model.encode_queries([{k: v for k, v in i.items() if v is not None} for i in items(queries)])
    c = tiny_model.encode_candidates([{k: v for k, v in i.items() if v is not None} for i in items(corpus)])
    similarity = maxsim_reference(q, c, b)
    run = {qid: {did: float(similarity[i, j]) for j, did in enumerate(corpus["id"])}
           for i, qid in enumerate(queries["id"])}  # fmt: skip
    expected = pytrec_eval.RelevanceEvaluator(split["relevant_docs"], {"ndcg_cut.10", "recall.1"}).evaluate(run)
    ndcg = sum(v["ndcg_cut_10"] for v in expected.values()) / len(expected)
    recall = sum(v["recall_1"] for v in expected.values()) / len(expected)
    assert scores["ndcg_at_10"] == pytest.approx(ndcg, abs=1e-5)  # mteb rounds to 5 decimals
    assert scores["recall_at_1"] == pytest.approx(recall, abs=1e-5)


def test_encode_similarity_and_metadata(tiny_model):
    wrapper = MetaEmbedMTEB(tiny_model, "2x4", name="tiny")
    meta = wrapper.mteb_model_meta
    assert meta.name == "metaembed/tiny@2x4" and meta.embed_dim == 64 and "late-interaction" in meta.model_type
    batches = [{"text": ["a red bicycle", "a blue car"]}, {"text": ["green"]}]
    q = wrapper.encode(batches, task_metadata=MockRetrievalTask.metadata, hf_split="test", hf_subset="default",
                       prompt_type=mteb.types.PromptType.query)  # fmt: skip
    d = wrapper.encode(batches, task_metadata=MockRetrievalTask.metadata, hf_split="test", hf_subset="default",
                       prompt_type=mteb.types.PromptType.document)  # fmt: skip
    assert q.shape == (3, 2, 64) and d.shape == (3, 4, 64)
    expected = maxsim_reference(q, d).float()
    torch.testing.assert_close(wrapper.similarity(q, d), expected)
    torch.testing.assert_close(wrapper.similarity_pairwise(q, d), torch.diagonal(expected))
    pooled = wrapper.encode(batches, task_metadata=MockClassificationTask.metadata, hf_split="test",
                            hf_subset="default")  # fmt: skip
    assert pooled.shape == (3, 64)
    torch.testing.assert_close(pooled.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(wrapper.similarity(pooled, pooled).diagonal(), torch.ones(3))
    strict = MetaEmbedMTEB(tiny_model, single_vector=None)
    assert strict.budget == Budget(16, 64)
    with pytest.raises(InputError, match="one vector per item"):
        strict.encode(batches, task_metadata=MockClassificationTask.metadata, hf_split="test", hf_subset="default")
    with pytest.raises(ShapeError):
        wrapper.similarity(q, pooled)
