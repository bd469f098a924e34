"""Request bodies, validated; unknown OpenAI fields are accepted and ignored."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Compression(BaseModel):
    """Per request, as the extra body field "grkv": {"method", "kv_ratio", "kv_budget"}."""

    model_config = ConfigDict(extra="forbid")
    method: str | None = None
    kv_ratio: float | None = None
    kv_budget: int | None = None

    @field_validator("method")
    @classmethod
    def _method(cls, v):
        if v is None or v == "full":
            return v
        from ..methods import parse_method

        parse_method(v)  # ValueError -> 400 with its message
        return v

    @field_validator("kv_ratio")
    @classmethod
    def _ratio(cls, v):
        if v is not None and not (math.isfinite(v) and 0.0 < v <= 1.0):
            raise ValueError("kv_ratio must lie in (0, 1]")
        return v

    @field_validator("kv_budget")
    @classmethod
    def _budget(cls, v):
        if v is not None and v < 1:
            raise ValueError("kv_budget must be >= 1")
        return v

    @model_validator(mode="after")
    def _one(self):
        if self.kv_ratio is not None and self.kv_budget is not None:
            raise ValueError("give one of kv_ratio or kv_budget, not both")
        return self


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stream: bool = False
    stop: str | list[str] | None = None
    grkv: Compression | None = None

    @property
    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]


class CompletionRequest(_Sampling):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("one prompt per request")
            v = v[0]
        if not v.strip():
            raise ValueError("the prompt is empty")
        return v


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = ""

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)

    @field_validator("messages")
    @classmethod
    def _messages(cls, v):
        if not any(m.text.strip() for m in v):
            raise ValueError("every message is empty")
        return v
