"""Decoding requests at the edge: bodies into their typed structs, errors into the API's shape.

Litestar would decode a JSON body into plain Python values and then convert them, in lax
mode, to the handler's `data` type. The node decodes the bytes once, strictly, straight into
that type (`EdgeRequest.json`), so:

- nesting is bounded before any recursive code sees the value (`INVALID_JSON`);
- a lone UTF-16 surrogate or invalid UTF-8 is refused as `INVALID_TEXT`, never stored;
- every constraint of `schemas.py` (lengths, ranges, patterns, unknown fields) is checked, and
  a failure names the field and the rule, with the field's own error code.

A UTF-8 byte order mark before a body is refused (`INVALID_JSON`), as RFC 8259 allows and as
most JSON APIs do: a client that sends one is misconfigured, and silently accepting it would
make the bytes a client hashed differ from the ones the node read.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
import msgspec.inspect

from aitbc_node.errors import BadRequest
from aitbc_node.schemas import (
    ADDRESS_PATTERN,
    CURSOR_PATTERN,
    HEX64_PATTERN,
    ID_PATTERN,
    IDEMPOTENCY_KEY_PATTERN,
    NAME_PATTERN,
    TEXT_PATTERN,
)

# Deeper JSON than this is refused before decoding. The API's own bodies nest at most four
# levels (gpu_info's device list); a receipt to verify, six.
MAX_JSON_DEPTH = 32

# The error code for a failure at each top-level field of a body; the rest fall back to
# INVALID_BODY. Unknown fields get UNKNOWN_FIELDS (UNKNOWN_PARAMS inside `params`).
FIELD_CODES = {
    "prompt": "INVALID_PROMPT",
    "messages": "INVALID_MESSAGES",
    "model": "INVALID_MODEL",
    "params": "INVALID_PARAMS",
    "miner_id": "INVALID_MINER_ID",
    "capabilities": "INVALID_CAPABILITIES",
    "gpu_info": "INVALID_GPU_INFO",
    "public_key": "INVALID_PUBLIC_KEY",
    "result": "INVALID_RESULT",
    "text": "INVALID_TEXT",
    "error": "INVALID_ERROR",
    "usage": "INVALID_USAGE",
    "model_sha256": "INVALID_MODEL_SHA256",
    "miner_signature": "INVALID_MINER_SIGNATURE",
    "completed_at": "INVALID_COMPLETED_AT",
    "url": "INVALID_URL",
    "events": "INVALID_EVENTS",
    "receipt": "INVALID_RECEIPT",
}

# Over-long text gets a code of its own where clients have long known one.
TOO_LONG_CODES = {
    "prompt": "PROMPT_TOO_LONG",
    "messages": "PROMPT_TOO_LONG",
    "result": "RESULT_TOO_LONG",
}

# The error code for a bad query or path parameter, by its name.
PARAMETER_CODES = {
    "limit": "INVALID_LIMIT",
    "cursor": "INVALID_CURSOR",
    "status": "INVALID_STATUS",
    "wait": "INVALID_WAIT",
    "miner_id": "INVALID_MINER_ID",
    "client": "INVALID_ADDRESS",
    "address": "INVALID_ADDRESS",
    "height": "INVALID_HEIGHT",
    "window": "INVALID_WINDOW",
    "job_id": "INVALID_JOB_ID",
    "receipt_id": "INVALID_RECEIPT_ID",
    "webhook_id": "INVALID_WEBHOOK_ID",
    "idempotency_key": "INVALID_IDEMPOTENCY_KEY",
    "Idempotency-Key": "INVALID_IDEMPOTENCY_KEY",
    "idempotency-key": "INVALID_IDEMPOTENCY_KEY",
}

# Rules of schemas.py in words, for the messages a client reads.
_PATTERN_WORDS = {
    TEXT_PATTERN: "text without NUL or other control characters (tab, CR and LF are fine)",
    NAME_PATTERN: "one line of text without control characters",
    HEX64_PATTERN: "64 hexadecimal characters",
    ID_PATTERN: "letters, digits, '.', '_', ':' or '-'",
    CURSOR_PATTERN: "a next_cursor the node gave out",
    ADDRESS_PATTERN: "an ait1... address",
    IDEMPOTENCY_KEY_PATTERN: "printable ASCII without spaces",
}
# A \uD800-\uDFFF escape: msgspec refuses one that is not half of a pair, and says only that
# the input was truncated or malformed.
_LONE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_PATTERN = re.compile(r"^Expected `str` matching regex '(.*)'$")
# For the nesting check: a JSON string, and the bytes that are not brackets ({} read as []).
_STRING = re.compile(rb'"[^"\\\\]*(?:\\\\.[^"\\\\]*)*"')
_SQUARE = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
_PATH = re.compile(r" - at `\$((?:\.[^`.\[]+|\[[^\]]*\])*)`$")
_UNKNOWN = re.compile(r"^Object contains unknown field `(.*)`")


def nests_deeper_than(raw: bytes, bound: int) -> bool:
    """Whether `raw` JSON nests arrays and objects more than `bound` levels deep.

    No recursion and no Python loop over the bytes: strings are cut out and everything but
    brackets dropped (both in C), then each pass removes every innermost pair; what is left
    after `bound` passes nests deeper. A hostile megabyte of brackets costs a few
    milliseconds and is refused before any decoder recurses into it.
    """
    if raw.count(b"[") + raw.count(b"{") <= bound:
        return False  # too few brackets to nest past the bound
    brackets = _STRING.sub(b"", raw).translate(_SQUARE, _NOT_BRACKETS)
    for _ in range(bound):
        shorter = brackets.replace(b"[]", b"")
        if len(shorter) == len(brackets):
            # No pair left: unbalanced, so not JSON. Its unclosed openings nest at least as
            # deep as their number.
            return brackets.count(b"[") > bound
        brackets = shorter
    return b"[]" in brackets  # a pair still inside `bound` levels of others


def encode_body(value: Any) -> bytes:
    """An answer's JSON body, as Litestar's msgspec encoder writes one."""
    return msgspec.json.encode(value)


def decode_body(raw: bytes, target: Any) -> Any:
    """Decode a JSON body strictly into `target`; BadRequest names what is wrong."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raise BadRequest(
            "the body starts with a UTF-8 byte order mark; send plain UTF-8 JSON",
            error_code="INVALID_JSON",
        )
    if nests_deeper_than(raw, MAX_JSON_DEPTH):
        raise BadRequest(
            f"the body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep",
            error_code="INVALID_JSON",
        )
    try:
        return msgspec.json.decode(raw, type=target, strict=True)
    except msgspec.ValidationError as e:
        error = validation_error(str(e))
        if error.error_code in ("UNKNOWN_FIELDS", "UNKNOWN_PARAMS"):
            error.detail = unknown_fields_detail(raw, target, error.detail)
        raise error from None
    except UnicodeDecodeError:
        raise BadRequest("the body is not UTF-8 text", error_code="INVALID_TEXT") from None
    except msgspec.DecodeError as e:
        message = str(e)
        if _LONE_SURROGATE.search(raw) or "utf-8" in message.lower() or "surrogate" in message:
            raise BadRequest(
                "the body holds text that is not valid Unicode (a lone UTF-16 surrogate escape"
                " or bytes that are not UTF-8)",
                error_code="INVALID_TEXT",
            ) from None
        raise BadRequest(
            f"the body is not valid JSON: {message}", error_code="INVALID_JSON"
        ) from None
    except RecursionError:  # only past MAX_JSON_DEPTH's check, but never a 500
        raise BadRequest("the body nests too deeply", error_code="INVALID_JSON") from None


def unknown_fields_detail(raw: bytes, target: Any, detail: str) -> str:
    """Every unknown field of the object that had one (msgspec names only the first), with
    the fields that object knows: `unknown params: beam, top_k (known: max_tokens, ...)`."""
    path = detail.removeprefix("unknown field: ").rpartition(".")[0]
    try:
        value: Any = msgspec.json.decode(raw)
    except (msgspec.DecodeError, RecursionError):  # the typed decoder stopped before this
        return detail
    kind: Any = msgspec.inspect.type_info(target)
    for name in path.split(".") if path else []:
        value = value.get(name) if isinstance(value, dict) else None
        kind = _struct_in(kind)
        field = next((f for f in kind.fields if f.encode_name == name), None) if kind else None
        kind = field.type if field else None
    kind = _struct_in(kind)
    if not isinstance(value, dict) or kind is None:
        return detail
    known = sorted(f.encode_name for f in kind.fields)
    unknown = sorted(set(value) - set(known))
    what = f"{path} fields" if path and path != "params" else path or "fields"
    return f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})"


def _struct_in(kind: Any) -> Any:
    """The struct type inside `kind` (itself, or one member of an optional union), or None."""
    if isinstance(kind, msgspec.inspect.StructType):
        return kind
    if isinstance(kind, msgspec.inspect.UnionType):
        return next((t for t in kind.types if isinstance(t, msgspec.inspect.StructType)), None)
    return None


def validation_error(message: str) -> BadRequest:
    """A BadRequest for one of msgspec's validation messages, naming the field and the rule."""
    match = _PATH.search(message)
    path = match.group(1).lstrip(".") if match else ""
    rule = message[: match.start()] if match else message
    unknown = _UNKNOWN.match(rule)
    top = re.split(r"[.\[]", path, maxsplit=1)[0] if path else ""
    if unknown:
        code = "UNKNOWN_PARAMS" if top == "params" else "UNKNOWN_FIELDS"
        where = f"{path}." if path else ""
        error = BadRequest(f"unknown field: {where}{unknown.group(1)}", error_code=code)
        error.param = f"{where}{unknown.group(1)}"
        return error
    if rule.startswith("Expected `object`") and not path:
        return BadRequest("the body must be a JSON object", error_code="INVALID_BODY")
    missing = re.match(r"^Object missing required field `(.*)`", rule)
    if missing and not path:
        field = missing.group(1)
        error = BadRequest(
            f"{field} is required", error_code=FIELD_CODES.get(field, "INVALID_BODY")
        )
        error.param = field
        return error
    code = FIELD_CODES.get(top, "INVALID_BODY")
    if top in TOO_LONG_CODES and rule.startswith("Expected `str` of length <="):
        code = TOO_LONG_CODES[top]
    error = BadRequest(f"{path or 'body'}: {in_words(rule)}", error_code=code)
    error.param = path or None
    return error


def in_words(rule: str) -> str:
    """msgspec's rule, with a regular expression of `schemas.py` said in words."""
    pattern = _PATTERN.match(rule)
    if pattern:
        words = _PATTERN_WORDS.get(pattern.group(1).encode().decode("unicode_escape"))
        if words:
            return f"must be {words}"
    return rule
