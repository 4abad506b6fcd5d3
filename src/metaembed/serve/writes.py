"""``POST /v1/index/add`` and ``POST /v1/index/delete``: index writes, each behind the API key."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from metaembed.serve import schemas
from metaembed.serve.checks import check_ids, check_metadata
from metaembed.serve.errors import BadRequestError
from metaembed.serve.security import check_bearer
from metaembed.serve.service import Service

AUTH = {"_401": "missing or wrong API key", "_403": "index writes disabled (no API key configured)"}
ADD_RESPONSES = schemas.error_responses(
    **AUTH, _404="no index configured", _409="ids already in the index (use upsert)"
)
DELETE_RESPONSES = schemas.error_responses(**AUTH, _404="unknown ids (nothing deleted), or no index configured")
BEARER = HTTPBearer(auto_error=False, description="the server's API key (METAEMBED_API_KEY or --api-key-file)")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]


def writes_router(service: Service) -> APIRouter:
    router = APIRouter()
    api_key = service.config.api_key

    @router.post("/v1/index/add", response_model=schemas.AddResponse, responses=ADD_RESPONSES)
    def index_add(body: schemas.AddRequest, credentials: Credentials) -> schemas.AddResponse:
        """Encode items as candidates and add them under ``ids`` (``upsert`` replaces existing ids). Needs the key."""
        _authorize(credentials, api_key)
        store = service.require_writable_index()
        if len(body.ids) != len(body.items):
            raise BadRequestError(f"{len(body.items)} items but {len(body.ids)} ids; send one id per item", "ids")
        if body.metadata is not None and len(body.metadata) != len(body.items):
            raise BadRequestError(
                f"{len(body.items)} items but {len(body.metadata)} metadata entries; send one per item (or null)",
                "metadata",
            )
        ids = check_ids(body.ids)
        metadata = check_metadata(body.metadata)
        embeddings = service.encode(service.parse_items(body.items, "items"), "candidate", urgent=True).embeddings
        with service.index_lock.write():
            if body.upsert:
                store.upsert(ids, embeddings, metadata=metadata)
            else:
                store.add(ids, embeddings, metadata=metadata)
            size = service.index_size = len(store)
        return schemas.AddResponse(added=len(ids), ids=ids, index_size=size)

    @router.post("/v1/index/delete", response_model=schemas.DeleteResponse, responses=DELETE_RESPONSES)
    def index_delete(body: schemas.DeleteRequest, credentials: Credentials) -> schemas.DeleteResponse:
        """Delete items by id; unknown ids are refused (404) and nothing is deleted. Needs the key."""
        _authorize(credentials, api_key)
        store = service.require_writable_index()
        ids = check_ids(body.ids)
        with service.index_lock.write():
            store.delete(ids)
            size = service.index_size = len(store)
        return schemas.DeleteResponse(deleted=len(ids), index_size=size)

    return router


def _authorize(credentials: HTTPAuthorizationCredentials | None, api_key: str | None) -> None:
    header = None if credentials is None else f"{credentials.scheme} {credentials.credentials}"
    check_bearer(header, api_key)
