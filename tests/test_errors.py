"""One error tree: MetaEmbedError at the root, one subtree per room, built-in bases kept for old handlers."""

from __future__ import annotations

import pytest

from metaembed.bench.ceilings import BenchError, CeilingError
from metaembed.errors import DataError, EvalError, MetaEmbedError, RecordError
from metaembed.eval.metrics import MetricError
from metaembed.eval.report import ReportError
from metaembed.index import DuplicateIdError, IndexStoreError, UnknownIdError
from metaembed.index.ingestion import IngestError
from metaembed.plan.calibrate import CalibrationError
from metaembed.plan.measurements import PlanError
from metaembed.serve.errors import RequestError, ServeConfigError, ServeError

ROOMS = {
    EvalError: (ReportError, MetricError),
    DataError: (RecordError,),
    PlanError: (CalibrationError,),
    BenchError: (CeilingError,),
    IndexStoreError: (DuplicateIdError, UnknownIdError, IngestError),
    ServeError: (RequestError, ServeConfigError),
}


@pytest.mark.parametrize("root", list(ROOMS), ids=lambda root: root.__name__)
def test_each_room_raises_under_its_own_root(root):
    assert issubclass(root, MetaEmbedError)
    for error in ROOMS[root]:
        assert issubclass(error, root), f"{error.__name__} is not under {root.__name__}"


def test_value_errors_stay_value_errors():
    for error in (ReportError, MetricError, RecordError, CalibrationError, CeilingError, IngestError, DuplicateIdError):
        assert issubclass(error, ValueError), error.__name__
