"""``POST /v1/embeddings``: multi-vector embeddings in OpenAI's envelope."""

from __future__ import annotations

import base64
from typing import Any

from fastapi import APIRouter

from metaembed.serve import schemas
from metaembed.serve.checks import side_vectors
from metaembed.serve.errors import BadRequestError
from metaembed.serve.service import Service

BASE64_DTYPES = {"base64": ("float32", "<f4"), "base64_float16": ("float16", "<f2")}


def embeddings_router(service: Service) -> APIRouter:
    router = APIRouter()
    config = service.config

    @router.post("/v1/embeddings", response_model=schemas.EmbeddingsResponse, responses=schemas.ERROR_RESPONSES)
    def embeddings(body: schemas.EmbeddingsRequest) -> schemas.EmbeddingsResponse:
        """Multi-vector embeddings in the OpenAI envelope: each item's ``embedding`` is r × D."""
        side = "query" if body.input_type == "query" else "candidate"
        keep = side_vectors(body.budget, side, service.n_query, service.n_candidate)
        if body.dimensions is not None and body.dimensions != service.dim:
            raise BadRequestError(
                f"dimensions={body.dimensions}: this model has {service.dim} dimensions", "dimensions"
            )
        values = body.input if isinstance(body.input, list) else [body.input]
        if not values:
            raise BadRequestError("input is an empty list; send at least one item", "input")
        encoded = service.encode(service.parse_items(values, "input"), side)
        data = []
        for i, vectors in enumerate(encoded.embeddings[:, :keep]):
            if body.encoding_format in BASE64_DTYPES:
                # what OpenAI clients decode: the r × D matrix flattened row by row, little-endian (float32 unless
                # float16 was asked for by name); the shape is in its own field
                dtype, numpy_dtype = BASE64_DTYPES[body.encoding_format]
                embedding: Any = base64.b64encode(vectors.numpy().astype(numpy_dtype).tobytes()).decode("ascii")
            else:
                embedding, dtype = vectors.tolist(), "float32"
            data.append(schemas.EmbeddingObject(index=i, embedding=embedding, shape=[keep, service.dim], dtype=dtype))
        tokens = sum(encoded.tokens)
        return schemas.EmbeddingsResponse(
            data=data,
            model=config.model_name,
            usage=schemas.Usage(prompt_tokens=tokens, total_tokens=tokens),
            input_type=body.input_type,
            num_vectors=keep,
        )

    return router
