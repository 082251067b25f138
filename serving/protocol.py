"""Request bodies of the OpenAI-compatible API (pydantic), and OpenAI's error shape.

Types are strict (a string is not a number, a number is not a string) and unknown fields are refused, so that a
typo or a field this server does not implement is a 400 naming it rather than silently ignored. A few OpenAI fields
are accepted when they ask for nothing (penalties of 0, no logprobs, text response format, ...): clients send
them by default. Nothing in a request can carry embeddings: the only soft prompt is the server's own user table.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_ID_CHARS = 256
MAX_USER_TEXT_CHARS = 4096
MAX_STOP = 4


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def check_user_id(value: Any, field: str) -> str | None:
    """User ids are data (keys of users.json), never paths: any text, but bounded and without control characters.
    Numbers are accepted and used as their decimal string."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"{field} must be a string")
    value = str(value)
    if not value.strip():
        raise ValueError(f"{field} must not be empty")
    if len(value) > MAX_ID_CHARS:
        raise ValueError(f"{field} is longer than {MAX_ID_CHARS} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"{field} must not contain control characters")
    return value


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _no_embeddings(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in data:
                if isinstance(key, str) and "embed" in key.lower():
                    raise ValueError(f"field '{key}': this server never accepts embeddings from clients; the user's "
                                     "soft prompt comes from its own user table (send user / user_id)")
        return data


class _UserFields(_Body):
    """Who is asking: `user_id` (extra_body) wins over OpenAI's `user`, then `safety_identifier` (its successor)."""

    user: Any = None
    user_id: Any = None
    safety_identifier: Any = None
    user_text: str | None = Field(default=None, max_length=MAX_USER_TEXT_CHARS)

    @field_validator("user", "user_id", "safety_identifier", mode="before")
    @classmethod
    def _user_id(cls, v, info):
        return check_user_id(v, info.field_name)

    @property
    def resolved_user_id(self) -> str | None:
        for v in (self.user_id, self.user, self.safety_identifier):
            if v is not None:
                return v
        return None


class StreamOptions(_Body):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # OpenAI's; nothing to obfuscate here


class _SamplingFields(_UserFields):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1)
    stop: Union[str, list[str], None] = Field(default=None, validate_default=True)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # OpenAI fields accepted only with the value that asks for nothing (clients send them by default)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: Any = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None

    @field_validator("stop", mode="after")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stops

    @model_validator(mode="after")
    def _neutral(self):
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise ValueError(f"{name} is not supported (only 0)")
        if self.logprobs not in (None, False, 0):
            raise ValueError("logprobs is not supported")
        if self.top_logprobs not in (None, 0):
            raise ValueError("top_logprobs is not supported")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported")
        return self


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: str | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _chat_neutral(self):
        if self.response_format not in (None, {"type": "text"}):
            raise ValueError("response_format is not supported (only {'type': 'text'})")
        if self.tools:
            raise ValueError("tools are not supported")
        if self.tool_choice not in (None, "none"):
            raise ValueError("tool_choice is not supported")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str]]
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _completion_neutral(self):
        if self.echo:
            raise ValueError("echo is not supported")
        if self.best_of not in (None, 1):
            raise ValueError("best_of is not supported (use n)")
        if self.suffix:
            raise ValueError("suffix is not supported")
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if not prompts:
            raise ValueError("prompt must not be an empty list")
        return self

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_tokens


class RewardRequest(_UserFields):
    """Best-of-n reranking for one user: r(prompt, response_i, user) for every response."""

    model: str | None = None
    prompt: str = Field(min_length=1)
    responses: list[str] = Field(min_length=1, max_length=64)


class Comparison(_Body):
    prompt: str = Field(min_length=1, max_length=20000)
    chosen: str = Field(min_length=1, max_length=20000)
    rejected: str = Field(min_length=1, max_length=20000)


class OnboardRequest(_Body):
    """A new user and a few of their comparisons: their row is fitted with the run's own objective."""

    user_id: Any
    comparisons: list[Comparison] = Field(min_length=1, max_length=256)
    steps: int | None = Field(default=None, ge=1, le=1000)
    lr: float | None = Field(default=None, gt=0, le=1)
    overwrite: bool = False

    @field_validator("user_id", mode="before")
    @classmethod
    def _uid(cls, v):
        if v is None:
            raise ValueError("user_id is required")
        return check_user_id(v, "user_id")
