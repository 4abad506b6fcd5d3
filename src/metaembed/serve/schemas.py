"""Request and response bodies (pydantic): the OpenAI embeddings envelope plus search and index writes.

Unknown fields are refused (``extra="forbid"``) so a typo such as ``"budjet"`` is an error, not a
silently ignored option. Limits that depend on the server (items per request, image sizes, budgets
within the model's vector counts) are checked by the handlers and answered 413 / 400 with the limit.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class InputItem(BaseModel):
    """Text, an image, or both. ``image`` is a base64 data URL or a path under the server's image directory."""

    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(None, description="the item's text")
    image: str | None = Field(
        None, description="'data:image/png;base64,...' or a path relative to the server's --image-dir"
    )


Input = str | InputItem
BudgetSpec = str | int


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"input": ["a red bicycle", "two dogs on a beach"], "input_type": "query", "budget": "4x8"},
                {"input": "quarterly revenue table", "encoding_format": "base64", "budget": 8},
                {"input": "quarterly revenue table", "encoding_format": "base64_float16", "budget": 8},
            ]
        },
    )
    input: Input | list[Input] = Field(..., description="one item or a list; a plain string is text")
    model: str | None = Field(None, description="accepted for OpenAI compatibility; the server has one model")
    input_type: Literal["query", "document"] = Field(
        "document", description="'query' gives R_q query vectors, 'document' R_c candidate vectors"
    )
    budget: BudgetSpec | None = Field(
        None,
        description="vectors to return: 'R_QxR_C' (e.g. '4x8'; the side's half is used) or an int; default all",
    )
    encoding_format: Literal["float", "base64", "base64_float16"] = Field(
        "float",
        description=(
            "'float': r × D list of lists; 'base64': the r × D matrix flattened row by row as little-endian float32 "
            "bytes (what OpenAI clients decode), its shape in 'shape'; 'base64_float16': the same as float16"
        ),
    )
    dimensions: int | None = Field(None, description="must equal the model's dimension if given")
    user: str | None = None


class EmbeddingObject(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[list[float]] | str
    shape: list[int] = Field(..., description="[r, D]: the matrix a base64 embedding reshapes to")
    dtype: Literal["float32", "float16"]


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingObject]
    model: str
    usage: Usage
    input_type: Literal["query", "document"]
    num_vectors: int


class SearchRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"query": "a red bicycle", "budget": "4x8", "k": 5}]}
    )
    query: Input = Field(..., description="text, or an item with text and/or image")
    budget: BudgetSpec | None = Field(
        None,
        description="'R_QxR_C', e.g. '4x8', an int N for NxN, or 'auto' (the index's calibrated per-query budget: "
        "cheap first, escalated only when the ranking is unsure); default the full budget",
    )
    k: int = Field(10, ge=1, description="results to return")
    two_stage: bool = Field(False, description="coarse (1,1) candidates from the ANN index, then exact rerank")


class SearchHit(BaseModel):
    id: str
    score: float
    metadata: dict[str, Any] | None = None


class Timings(BaseModel):
    encode_ms: float
    score_ms: float
    total_ms: float


class AutoBudgetInfo(BaseModel):
    """How a ``budget="auto"`` search went: the policy and how far this query climbed."""

    cheap: str
    ceiling: str
    threshold: float | None = Field(..., description="normalised margin below which a query escalates (null = inf)")
    top_m: int
    escalations: int = Field(..., description="rescorings at a larger budget (0: the cheap budget was sure)")

    @classmethod
    def of(cls, policy: Any, escalations: int) -> AutoBudgetInfo:
        threshold = policy.threshold if policy.threshold != float("inf") else None
        return cls(
            cheap=str(policy.cheap),
            ceiling=str(policy.ceiling),
            threshold=threshold,
            top_m=policy.top_m,
            escalations=escalations,
        )


class SearchResponse(BaseModel):
    object: Literal["search.result"] = "search.result"
    results: list[SearchHit]
    budget: str = Field(..., description="the budget the results were scored at (auto: where the query ended)")
    k: int
    two_stage: bool
    model: str
    timings: Timings
    index_bytes_read: int = Field(..., description="bytes of candidate vectors the budget read (two-stage: reranked)")
    auto: AutoBudgetInfo | None = Field(None, description="set when the request asked for budget 'auto'")


class AddRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "items": ["a red bicycle", "two dogs on a beach"],
                    "ids": ["bike", "dogs"],
                    "metadata": [{"src": "demo"}, None],
                }
            ]
        },
    )
    items: list[Input] = Field(..., min_length=1, description="candidates to encode (document side)")
    ids: list[str] = Field(..., min_length=1, description="one unique id per item")
    metadata: list[dict[str, Any] | None] | None = Field(None, description="one JSON object (or null) per item")
    upsert: bool = Field(False, description="replace items whose id exists instead of refusing them")


class AddResponse(BaseModel):
    object: Literal["index.add"] = "index.add"
    added: int
    ids: list[str]
    index_size: int


class DeleteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"ids": ["bike"]}]})
    ids: list[str] = Field(..., min_length=1)


class DeleteResponse(BaseModel):
    object: Literal["index.delete"] = "index.delete"
    deleted: int
    index_size: int


class HealthResponse(BaseModel):
    status: Literal["ok"]
    model: str
    dim: int
    num_query_vectors: int
    num_candidate_vectors: int
    index_size: int | None
    queue_depth: int
    index_writes_enabled: bool


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "bad input (what was wrong is in error.message)",
        413: "request, item or image too large",
        422: "request body does not match the schema",
        503: "encode queue full",
        504: "encode did not finish in time",
    }.items()
}


def error_responses(**extra: str) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` of a route: the common errors plus ``_404="why"`` style extras."""
    codes = {int(code.lstrip("_")): text for code, text in extra.items()}
    return {**ERROR_RESPONSES, **{c: {"model": ErrorResponse, "description": t} for c, t in codes.items()}}
