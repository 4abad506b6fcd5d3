"""The hub code paths (transport replaced by local parquet files read with the real `datasets`), and resume."""

from __future__ import annotations

import pytest

from metaembed.errors import DataError
from metaembed.eval.common import ResumeStore
from metaembed.eval.mmeb import evaluate_mmeb, load_datasets
from metaembed.eval.vidore import evaluate_vidore, resolve_tasks


@pytest.fixture
def local_hub(monkeypatch, tmp_path):
    """Route hub calls to local folders: ``datasets.load_dataset(repo, config, split=...)`` reads
    ``<folder>/<config>/*.parquet`` with the real parquet loader; revisions are fixed strings."""
    import datasets
    import huggingface_hub

    real = datasets.load_dataset
    folders = {}

    def load_dataset(repo, name=None, split=None, revision=None, **kwargs):
        assert split == "test" and revision == f"rev-{repo}"
        files = sorted(str(p) for p in (folders[repo] / name).glob("*.parquet"))
        return real("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf-cache"))

    def hf_hub_download(repo, filename, repo_type=None, revision=None):
        assert repo_type == "dataset" and revision == f"rev-{repo}"
        return str(folders[repo] / filename)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr("metaembed.eval.mmeb.hub_revision", lambda repo: f"rev-{repo}")
    monkeypatch.setattr("metaembed.eval.vidore.hub_revision", lambda repo: f"rev-{repo}")
    return folders


def test_mmeb_from_a_hub_id(local_hub, mmeb_zip_data, table_encoder):
    zipped, _ = mmeb_zip_data
    local_hub["TIGER-Lab/MMEB-eval"] = zipped
    hub = evaluate_mmeb(table_encoder(), load_datasets("TIGER-Lab/MMEB-eval", ["CIRR", "ToySet", "RefCOCO"]))
    local = evaluate_mmeb(table_encoder(), load_datasets(zipped, ["CIRR", "ToySet", "RefCOCO"]))
    assert hub.scores == local.scores
    assert {d["id"]: d["revision"] for d in hub.datasets} == {
        f"TIGER-Lab/MMEB-eval/{n}": "rev-TIGER-Lab/MMEB-eval" for n in ("CIRR", "ToySet", "RefCOCO")
    }


def test_vidore_from_a_hub_id(local_hub, vidore_data, table_encoder):
    local_hub["vidore/economics_reports_v2"] = vidore_data / "economics_reports_v2"  # the parquet-layout fixture
    (hub,) = resolve_tasks("vidore/economics_reports_v2", languages=["eng"])
    assert hub.revision == "rev-vidore/economics_reports_v2" and len(hub.query_ids) == 3
    (local,) = resolve_tasks(vidore_data / "economics_reports_v2", languages=["eng"])
    a = evaluate_vidore(table_encoder(), [hub])
    b = evaluate_vidore(table_encoder(), [local])
    assert a.scores == b.scores


def test_unreachable_hub_ids_are_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="not a local folder"):
        load_datasets("nobody/no-such-mmeb")


def test_a_rerun_reuses_finished_datasets(mmeb_data, vidore_data, table_encoder, tmp_path):
    eval_dir, root, _ = mmeb_data
    datasets = load_datasets(eval_dir, image_root=root)
    first = table_encoder()
    done = evaluate_mmeb(first, datasets, model_name="m", resume_dir=tmp_path / "partial")
    again = table_encoder()
    reused = evaluate_mmeb(again, datasets, model_name="m", resume_dir=tmp_path / "partial")
    assert again.calls == [] and reused.scores == done.scores and reused.encodes == done.encodes
    other_budgets = table_encoder()
    evaluate_mmeb(other_budgets, datasets, ["1x1"], model_name="m", resume_dir=tmp_path / "partial")
    assert len(other_budgets.calls) == 2 * len(datasets)  # different budgets: nothing reused
    other_model = table_encoder()
    evaluate_mmeb(other_model, datasets, model_name="m2", resume_dir=tmp_path / "partial")
    assert len(other_model.calls) == 2 * len(datasets)
    (tmp_path / "partial" / "CIRR.json").write_text("{trunc")  # a file cut by a kill is recomputed
    once_more = table_encoder()
    evaluate_mmeb(once_more, datasets, model_name="m2", resume_dir=tmp_path / "partial")
    assert [encoder_call[0] for encoder_call in once_more.calls] == ["query", "candidate"]

    tasks = resolve_tasks(vidore_data)
    v1 = evaluate_vidore(table_encoder(), tasks, model_name="m", resume_dir=tmp_path / "vidore")
    quiet = table_encoder()
    v2 = evaluate_vidore(quiet, tasks, model_name="m", resume_dir=tmp_path / "vidore")
    assert quiet.calls == [] and v1.scores == v2.scores


def test_resume_store_ignores_data_without_a_revision(tmp_path):
    store = ResumeStore(tmp_path, "mmeb", {"name": "m"}, ["1x1"])
    store.save("A", "inline", None, {"x": 1})
    assert store.load("A", "inline", None) is None and not list(tmp_path.iterdir())
    store.save("A", "src", "r1", {"x": 1})
    assert store.load("A", "src", "r1") == {"x": 1}
    assert store.load("A", "src", "r2") is None
