"""The OpenAI-compatible surface's request types, as msgspec structs.

They follow OpenAI's published API (chat completions and legacy completions) rather than the
Coordinator API, so they live apart from `schemas.py`; the same edge (`edge.py`) decodes them
strictly. Parameters this node does not implement are declared too, so that a client that
sends one is told so by name (`unsupported_parameters`) instead of getting a generic
unknown-field error, or worse, having it silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from aitbc_node.schemas import MAX_MESSAGES, MAX_TOKENS_CEILING, TEXT_PATTERN, JobParams, Name

_PARAMS = JobParams()
StopString = Annotated[str, Meta(max_length=64, pattern=TEXT_PATTERN)]
Stop = StopString | Annotated[list[StopString], Meta(max_length=4)] | None
Text = Annotated[str, Meta(pattern=TEXT_PATTERN)]
Anything = Any | UnsetType


class TextPart(Struct, forbid_unknown_fields=True, kw_only=True):
    """A part of a message's content; only text parts are served."""

    type: str
    text: Text | UnsetType = UNSET
    image_url: Anything = UNSET
    input_audio: Anything = UNSET
    file: Anything = UNSET


class Message(Struct, forbid_unknown_fields=True, kw_only=True):
    """One chat message as OpenAI's clients send it."""

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Text | Annotated[list[TextPart], Meta(max_length=MAX_MESSAGES)] | None = None
    name: Annotated[str, Meta(max_length=256)] | None = None
    tool_calls: Anything = UNSET
    tool_call_id: Anything = UNSET
    function_call: Anything = UNSET
    refusal: Anything = UNSET
    audio: Anything = UNSET


class StreamOptions(Struct, forbid_unknown_fields=True, kw_only=True):
    include_usage: bool = False
    include_obfuscation: bool | None = None


class Sampling(Struct, forbid_unknown_fields=True, kw_only=True):
    """The parameters both kinds of completion share, bounded as a job's params are."""

    model: Name | None = None
    max_tokens: Annotated[int, Meta(ge=1, le=MAX_TOKENS_CEILING)] | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, Meta(gt=0, le=1)] | None = None
    seed: Annotated[int, Meta(ge=0, le=2**32 - 1)] | None = None
    stop: Stop = None
    n: Annotated[int, Meta(ge=1, le=128)] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: Annotated[str, Meta(max_length=256)] | None = None
    # Extensions that vLLM and llama-server accept too.
    ignore_eos: bool = False
    min_tokens: Annotated[int, Meta(ge=0, le=MAX_TOKENS_CEILING)] = 0
    # OpenAI parameters this node does not implement: refused by name when they ask for
    # anything but the default behaviour.
    logprobs: Anything = UNSET
    top_logprobs: Anything = UNSET
    logit_bias: Anything = UNSET
    presence_penalty: Anything = UNSET
    frequency_penalty: Anything = UNSET
    service_tier: Anything = UNSET
    metadata: Anything = UNSET
    store: Anything = UNSET


class ChatCompletionRequest(Sampling, forbid_unknown_fields=True, kw_only=True):
    """`POST /v1/chat/completions`."""

    messages: Annotated[list[Message], Meta(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: Annotated[int, Meta(ge=1, le=MAX_TOKENS_CEILING)] | None = None
    tools: Anything = UNSET
    tool_choice: Anything = UNSET
    parallel_tool_calls: Anything = UNSET
    functions: Anything = UNSET
    function_call: Anything = UNSET
    response_format: Anything = UNSET
    modalities: Anything = UNSET
    audio: Anything = UNSET
    prediction: Anything = UNSET
    reasoning_effort: Anything = UNSET
    web_search_options: Anything = UNSET
    verbosity: Anything = UNSET
    prompt_cache_key: Anything = UNSET
    safety_identifier: Anything = UNSET


class CompletionRequest(Sampling, forbid_unknown_fields=True, kw_only=True):
    """`POST /v1/completions` (OpenAI's legacy text completion)."""

    prompt: Text | Annotated[list[Text], Meta(min_length=1, max_length=1)]
    echo: Anything = UNSET
    suffix: Anything = UNSET
    best_of: Anything = UNSET


# What each unsupported parameter may be sent as without asking for anything: the default
# OpenAI itself applies (a client library or UI often sends these explicitly).
HARMLESS: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "service_tier": (None, "auto", "default"),
    "metadata": (None,),
    "store": (None, False),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "parallel_tool_calls": (None, True, False),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
    "verbosity": (None,),
    "prompt_cache_key": (None,),
    "safety_identifier": (None,),
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
}


def unsupported_parameters(request: Struct) -> list[str]:
    """The parameters of `request` that ask for something this node does not do."""
    asked = []
    for name, harmless in HARMLESS.items():
        value = getattr(request, name, UNSET)
        if value is UNSET or any(_same(value, h) for h in harmless):
            continue
        if name == "tool_choice" and not getattr(request, "tools", None):
            continue  # "auto"-like choices without tools ask for nothing
        asked.append(name)
    return asked


def _same(value: Any, harmless: Any) -> bool:
    # 0 == False in Python; compare the JSON forms so `logprobs: 0` is not taken for false.
    return msgspec.json.encode(value) == msgspec.json.encode(harmless) or (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and isinstance(harmless, int)
        and not isinstance(harmless, bool)
        and value == harmless
    )


def sampling_params(request: Sampling, max_tokens: int | None) -> JobParams:
    """The job params a completion request asks for (the node's defaults where it is silent)."""
    stop = request.stop
    return JobParams(
        max_tokens=max_tokens,
        temperature=_PARAMS.temperature if request.temperature is None else request.temperature,
        top_p=_PARAMS.top_p if request.top_p is None else request.top_p,
        seed=request.seed,
        stop=[] if stop is None else [s for s in ([stop] if isinstance(stop, str) else stop) if s],
        ignore_eos=request.ignore_eos,
        min_tokens=request.min_tokens,
    )
