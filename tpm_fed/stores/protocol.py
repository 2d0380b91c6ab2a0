"""The vector-store API's shapes, in one module: what callers send and what the service answers.

The objects follow OpenAI's vector store, vector store file, file batch and search result objects field
for field, so the official ``openai`` client parses them (``client.vector_stores``); tpm-fed's own facts
(the project, the snapshot searched, the embedding model's version, SUs) travel in a ``tpm`` object beside
them, as the other routes do. Bodies are checked here, once, as they enter.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

AUTO_CHUNK_TOKENS, AUTO_OVERLAP_TOKENS = 800, 400
"""OpenAI's ``auto`` chunking: 800-token chunks overlapping by 400 (capped at the embedding model's context)."""

MIN_CHUNK_TOKENS, MAX_CHUNK_TOKENS = 100, 4096
"""The ``max_chunk_size_tokens`` OpenAI accepts for ``static`` chunking."""

MAX_RESULTS = 50
"""``max_num_results``: 1 to 50, as OpenAI's."""

DEFAULT_RESULTS = 10

MAX_ATTRIBUTES = 16
"""Attributes and metadata: at most 16 keys of at most 64 characters, string values of at most 512."""

AttributeValue = Union[str, float, bool]


def _check_pairs(pairs: dict[str, Any] | None, what: str) -> dict[str, Any] | None:
    if pairs is None:
        return None
    if len(pairs) > MAX_ATTRIBUTES:
        raise ValueError(f"{what}: at most {MAX_ATTRIBUTES} keys, not {len(pairs)}")
    for key, value in pairs.items():
        if not 1 <= len(key) <= 64:
            raise ValueError(f"{what}: key {key[:80]!r} must be 1 to 64 characters")
        if isinstance(value, str) and len(value) > 512:
            raise ValueError(f"{what}: the value of {key!r} is over 512 characters")
    return pairs


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StaticChunking(_Strict):
    max_chunk_size_tokens: int = Field(ge=MIN_CHUNK_TOKENS, le=MAX_CHUNK_TOKENS)
    chunk_overlap_tokens: int = Field(ge=0)

    @model_validator(mode="after")
    def _overlap_at_most_half(self) -> StaticChunking:
        if self.chunk_overlap_tokens > self.max_chunk_size_tokens // 2:
            raise ValueError("chunking_strategy.static.chunk_overlap_tokens must not exceed half of "
                             "max_chunk_size_tokens")
        return self


class ChunkingStrategy(_Strict):
    """OpenAI's ``chunking_strategy``: ``{"type": "auto"}`` or ``{"type": "static", "static": {...}}``."""

    type: Literal["auto", "static"] = "auto"
    static: StaticChunking | None = None

    @model_validator(mode="after")
    def _static_has_sizes(self) -> ChunkingStrategy:
        if (self.type == "static") != (self.static is not None):
            raise ValueError("chunking_strategy: 'static' needs a static object, 'auto' takes none")
        return self

    def sizes(self) -> tuple[int, int]:
        """(chunk tokens, overlap tokens) asked for."""
        if self.static is None:
            return AUTO_CHUNK_TOKENS, AUTO_OVERLAP_TOKENS
        return self.static.max_chunk_size_tokens, self.static.chunk_overlap_tokens

    def wire(self) -> dict[str, Any]:
        """As OpenAI shows it on a file (``auto`` is shown as the static sizes it means)."""
        size, overlap = self.sizes()
        return {"type": "static", "static": {"max_chunk_size_tokens": size, "chunk_overlap_tokens": overlap}}


class StoreExpiry(_Strict):
    anchor: Literal["last_active_at"]
    days: int = Field(ge=1, le=365)


class StoreCreateBody(_Strict):
    """``POST /v1/vector_stores``. ``project`` and ``embedding_model`` are tpm-fed's (extra body fields)."""

    name: str = Field(default="", max_length=256)
    description: str | None = Field(default=None, max_length=512)
    file_ids: list[str] = Field(default_factory=list, max_length=500)
    chunking_strategy: ChunkingStrategy | None = None
    expires_after: StoreExpiry | None = None
    metadata: dict[str, str] | None = None
    project: str | None = None
    embedding_model: str | None = None

    _pairs = field_validator("metadata")(classmethod(lambda cls, v: _check_pairs(v, "metadata")))


class StoreUpdateBody(_Strict):
    """``POST /v1/vector_stores/{id}``. ``published`` is tpm-fed's: an operator makes a store readable by all."""

    name: str | None = Field(default=None, max_length=256)
    expires_after: StoreExpiry | None = None
    metadata: dict[str, str] | None = None
    published: bool | None = None

    _pairs = field_validator("metadata")(classmethod(lambda cls, v: _check_pairs(v, "metadata")))


class StoreFileBody(_Strict):
    """``POST /v1/vector_stores/{id}/files``."""

    file_id: str = Field(min_length=1)
    attributes: dict[str, AttributeValue] | None = None
    chunking_strategy: ChunkingStrategy | None = None

    _pairs = field_validator("attributes")(classmethod(lambda cls, v: _check_pairs(v, "attributes")))


class BatchFile(_Strict):
    file_id: str = Field(min_length=1)
    attributes: dict[str, AttributeValue] | None = None
    chunking_strategy: ChunkingStrategy | None = None

    _pairs = field_validator("attributes")(classmethod(lambda cls, v: _check_pairs(v, "attributes")))


class FileBatchBody(_Strict):
    """``POST /v1/vector_stores/{id}/file_batches``: ``file_ids`` (with shared attributes and chunking) or
    ``files`` (each its own), not both."""

    file_ids: list[str] | None = Field(default=None, max_length=2000)
    files: list[BatchFile] | None = Field(default=None, max_length=2000)
    attributes: dict[str, AttributeValue] | None = None
    chunking_strategy: ChunkingStrategy | None = None

    _pairs = field_validator("attributes")(classmethod(lambda cls, v: _check_pairs(v, "attributes")))

    @model_validator(mode="after")
    def _one_list(self) -> FileBatchBody:
        if (self.file_ids is None) == (self.files is None):
            raise ValueError("give file_ids or files, not both and not neither")
        if not (self.file_ids or self.files):
            raise ValueError("a file batch needs at least one file")
        return self

    def entries(self) -> list[BatchFile]:
        if self.files is not None:
            return self.files
        return [BatchFile(file_id=file_id, attributes=self.attributes, chunking_strategy=self.chunking_strategy)
                for file_id in self.file_ids or []]


class ComparisonFilter(_Strict):
    key: str = Field(min_length=1, max_length=64)
    type: Literal["eq", "ne", "gt", "gte", "lt", "lte", "in", "nin"]
    value: Union[str, float, bool, list[Union[str, float]]]

    @model_validator(mode="after")
    def _lists_for_membership(self) -> ComparisonFilter:
        if (self.type in ("in", "nin")) != isinstance(self.value, list):
            raise ValueError(f"filters: '{self.type}' takes {'a list' if self.type in ('in', 'nin') else 'one value'}")
        return self


class CompoundFilter(_Strict):
    type: Literal["and", "or"]
    filters: list[Union[ComparisonFilter, CompoundFilter]] = Field(min_length=1, max_length=32)


Filter = Union[ComparisonFilter, CompoundFilter]


class HybridWeights(_Strict):
    embedding_weight: float = Field(ge=0)
    text_weight: float = Field(ge=0)


class RankingOptions(_Strict):
    ranker: Literal["none", "auto", "default-2024-11-15"] = "auto"
    score_threshold: float = Field(default=0.0, ge=0, le=1)
    hybrid_search: HybridWeights | None = None


class SearchBody(_Strict):
    """``POST /v1/vector_stores/{id}/search``. The store id may pin a snapshot: ``vs_...@SNAPSHOT``."""

    query: Union[str, list[str]]
    filters: Filter | None = None
    max_num_results: int = Field(default=DEFAULT_RESULTS, ge=1, le=MAX_RESULTS)
    ranking_options: RankingOptions | None = None
    rewrite_query: bool = False
    project: str | None = None

    @field_validator("query")
    @classmethod
    def _query_text(cls, query: str | list[str]) -> str | list[str]:
        texts = [query] if isinstance(query, str) else query
        if not texts or not all(text.strip() for text in texts):
            raise ValueError("query: a non-empty text (or a list of them)")
        return query

    def query_text(self) -> str:
        """One text to embed: a list of queries is searched as their lines joined."""
        return self.query if isinstance(self.query, str) else "\n".join(self.query)


class ChatFileSearch(_Strict):
    """tpm-fed's ``file_search`` field on ``/v1/chat/completions``: the Responses API's tool, on the chat route."""

    vector_store_ids: list[str] = Field(min_length=1, max_length=8)
    max_num_results: int = Field(default=5, ge=1, le=MAX_RESULTS)
    filters: Filter | None = None
    ranking_options: RankingOptions | None = None


FileStatus = Literal["in_progress", "completed", "cancelled", "failed"]
StoreStatus = Literal["expired", "in_progress", "completed"]
