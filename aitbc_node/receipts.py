"""Signed job receipts: build, sign and verify them without any server.

A receipt is one JSON object:

    {
      "receipt_id": str, "job_id": str, "client_address": str, "miner_id": str,
      "model": {"name": str, "sha256": str},
      "request_sha256": hex64, "result_sha256": hex64,
      "prompt_tokens": int, "completion_tokens": int, "units": int,
      "unit_price": decimal str | int, "amount": decimal str | int,
      "started_at": RFC 3339 str, "completed_at": RFC 3339 str,
      "node_key_id": "ed25519:<16 hex>",
      "miner_signature": {"alg": "ed25519", "public_key": hex64, "value": hex128},   # optional
      "signature": {"alg": "ed25519", "key_id": "ed25519:<16 hex>", "value": hex128}
    }

Signing rule: the node signs `canonical_bytes(body)` where body is the receipt minus its
`"signature"` member, i.e. every SIGNED_FIELDS member plus `miner_signature` when present. The
optional `miner_signature` is the miner's Ed25519 signature over the ASCII bytes of
`result_sha256` (the lowercase hex text, not the raw digest); because it sits in the body, the
node's signature also covers the miner's co-signature. No other top-level members are allowed.

A verifier must check the node signature with a public key it already trusts, never with a key
the receipt names for itself; `node_key_id` and `signature.key_id` only help pick the right key.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from functools import lru_cache
from typing import Any

from aitbc_node.canonical import CanonicalError, canonical_bytes, canonical_hash, sha256_hex
from aitbc_node.signing import NodeKey, key_id_for, verify_signature

__all__ = [
    "SIGNED_FIELDS",
    "Verdict",
    "decimal_string",
    "hash_request",
    "hash_result",
    "receipt_body",
    "sign_receipt",
    "verify_receipt",
]

SIGNED_FIELDS: tuple[str, ...] = (
    "receipt_id",
    "job_id",
    "client_address",
    "miner_id",
    "model",
    "request_sha256",
    "result_sha256",
    "prompt_tokens",
    "completion_tokens",
    "units",
    "unit_price",
    "amount",
    "started_at",
    "completed_at",
    "node_key_id",
)
OPTIONAL_SIGNED_FIELDS: tuple[str, ...] = ("miner_signature",)
ALG = "ed25519"

_SHA256 = re.compile(r"[0-9a-f]{64}")
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_HEX128 = re.compile(r"[0-9a-fA-F]{128}")
_KEY_ID = re.compile(r"ed25519:[0-9a-f]{16}")
_DECIMAL = re.compile(r"(0|[1-9][0-9]*)(\.[0-9]+)?")
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)


@dataclass
class Verdict:
    """The outcome of verifying a receipt: valid, or a list of short reasons why not."""

    valid: bool
    reasons: list[str] = field(default_factory=list)


# --- field checks: each returns None if fine, or what is wrong --------------------------------


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _str(v: object) -> str | None:
    return None if isinstance(v, str) and v else "must be a non-empty string"


def _sha(v: object) -> str | None:
    ok = isinstance(v, str) and _SHA256.fullmatch(v)
    return None if ok else "must be 64 lowercase hex characters"


def _count(v: object) -> str | None:
    return None if _is_int(v) and v >= 0 else "must be a non-negative integer"


def _money(v: object) -> str | None:
    if _is_int(v) and v >= 0:
        return None
    if isinstance(v, str) and _DECIMAL.fullmatch(v):
        return None
    return 'must be a non-negative integer or decimal string like "0.002"'


def _timestamp(v: object) -> str | None:
    if isinstance(v, str) and _RFC3339.fullmatch(v):
        try:
            datetime.fromisoformat(v.upper())  # catches month 13, hour 25, ...
            return None
        except ValueError:
            pass
    return "must be an RFC 3339 timestamp"


def _model(v: object) -> str | None:
    if (
        isinstance(v, dict)
        and set(v) == {"name", "sha256"}
        and isinstance(v["name"], str)
        and isinstance(v["sha256"], str)
    ):
        return None
    return 'must be {"name": str, "sha256": str}'


def _key_id(v: object) -> str | None:
    return (
        None if isinstance(v, str) and _KEY_ID.fullmatch(v) else "must look like ed25519:<16 hex>"
    )


def _miner_signature(v: object) -> str | None:
    if (
        isinstance(v, dict)
        and set(v) == {"alg", "public_key", "value"}
        and v["alg"] == ALG
        and isinstance(v["public_key"], str)
        and _HEX64.fullmatch(v["public_key"])
        and isinstance(v["value"], str)
        and _HEX128.fullmatch(v["value"])
    ):
        return None
    return 'must be {"alg": "ed25519", "public_key": 64 hex, "value": 128 hex}'


_CHECKS: dict[str, Callable[[object], str | None]] = {
    "receipt_id": _str,
    "job_id": _str,
    "client_address": _str,
    "miner_id": _str,
    "model": _model,
    "request_sha256": _sha,
    "result_sha256": _sha,
    "prompt_tokens": _count,
    "completion_tokens": _count,
    "units": _count,
    "unit_price": _money,
    "amount": _money,
    "started_at": _timestamp,
    "completed_at": _timestamp,
    "node_key_id": _key_id,
    "miner_signature": _miner_signature,
}


def _body_problems(body: dict[str, Any]) -> list[str]:
    """Everything wrong with the shape of a receipt body (no signatures checked)."""
    problems = [f"missing field {name}" for name in SIGNED_FIELDS if name not in body]
    for name, value in body.items():
        check = _CHECKS.get(name)
        if check is None:
            problems.append(f"unknown field {name!r}")
        elif (what := check(value)) is not None:
            problems.append(f"field {name} {what}")
    return problems


def _miner_signature_ok(body: dict[str, Any]) -> bool:
    ms = body["miner_signature"]
    message = body["result_sha256"].encode("ascii")
    return verify_signature(ms["public_key"], message, ms["value"])


# --- public API -------------------------------------------------------------------------------


def receipt_body(receipt: dict[str, Any]) -> dict[str, Any]:
    """The signed part of a receipt: everything except `"signature"`."""
    return {k: v for k, v in receipt.items() if k != "signature"}


def sign_receipt(body: dict[str, Any], key: NodeKey) -> dict[str, Any]:
    """Return a copy of `body` with the node's `signature` added.

    Raises ValueError naming every missing, mistyped or unknown field, if `node_key_id` is not
    this key's id, or if a `miner_signature` is present but does not verify.
    """
    if "signature" in body:
        raise ValueError("body already has a signature; pass receipt_body(receipt)")
    problems = _body_problems(body)
    if not problems and body["node_key_id"] != key.key_id:
        problems.append(f"node_key_id {body['node_key_id']} is not this key's id {key.key_id}")
    if not problems and "miner_signature" in body and not _miner_signature_ok(body):
        problems.append("miner_signature does not verify over result_sha256")
    if problems:
        raise ValueError("cannot sign receipt: " + "; ".join(problems))
    # The checks above leave only strings, numbers and flat dicts of strings: copying one
    # level down is a deep copy.
    receipt = {k: dict(v) if isinstance(v, dict) else v for k, v in body.items()}
    value = key.sign(canonical_bytes(receipt, root="receipt"))
    receipt["signature"] = {"alg": ALG, "key_id": key.key_id, "value": value}
    return receipt


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Parsers disagree on which duplicate wins, so a duplicated key could show a person one
    # value while the signature covers another.
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse(receipt: dict[str, Any] | str | bytes) -> tuple[dict[str, Any] | None, str | None]:
    if isinstance(receipt, dict):
        return receipt, None
    if isinstance(receipt, bytes | bytearray):
        try:
            receipt = bytes(receipt).decode("utf-8")
        except UnicodeDecodeError:
            return None, "receipt is not valid UTF-8"
    if not isinstance(receipt, str):
        return None, f"receipt must be a dict or JSON text, not {type(receipt).__name__}"
    try:
        parsed = json.loads(
            receipt, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant
        )
    except (ValueError, RecursionError) as exc:
        return None, f"receipt is not valid JSON ({exc})"
    if not isinstance(parsed, dict):
        return None, "receipt must be a JSON object"
    return parsed, None


def _check_signature(
    receipt: dict[str, Any], body: dict[str, Any], trusted_public_key_hex: str
) -> list[str]:
    sig = receipt.get("signature")
    if sig is None:
        return ["receipt has no signature"]
    if not (
        isinstance(sig, dict)
        and set(sig) == {"alg", "key_id", "value"}
        and sig["alg"] == ALG
        and isinstance(sig["key_id"], str)
        and isinstance(sig["value"], str)
        and _HEX128.fullmatch(sig["value"])
    ):
        return ['signature must be {"alg": "ed25519", "key_id": str, "value": 128 hex}']
    try:
        trusted_id = key_id_for(trusted_public_key_hex)
    except ValueError:
        return ["trusted public key is not 64 hex characters"]
    reasons = []
    if sig["key_id"] != trusted_id:
        reasons.append(f"signed by a different key ({sig['key_id']}, trusted key is {trusted_id})")
    if body.get("node_key_id") not in (None, trusted_id):
        reasons.append(f"node_key_id {body['node_key_id']!r} is not the trusted key {trusted_id}")
    try:
        message = canonical_bytes(body, root="receipt")
    except CanonicalError as exc:
        return [*reasons, f"receipt cannot be canonicalised: {exc}"]
    # Always the trusted key: a receipt that names its own key proves nothing.
    if not verify_signature(trusted_public_key_hex, message, sig["value"]):
        reasons.append("signature does not verify with the trusted key")
    return reasons


def verify_receipt(
    receipt: dict[str, Any] | str | bytes,
    trusted_public_key_hex: str,
    *,
    expected_miner_public_key_hex: str | None = None,
) -> Verdict:
    """Check a receipt (dict or JSON text in any key order/whitespace) against a trusted node key.

    Never raises; any problem becomes a reason in the returned Verdict.
    """
    try:
        parsed, error = _parse(receipt)
        if parsed is None:
            return Verdict(False, [error or "receipt could not be read"])
        body = receipt_body(parsed)
        reasons = _body_problems(body)
        reasons += _check_signature(parsed, body, trusted_public_key_hex)
        if (
            "miner_signature" in body
            and _miner_signature(body["miner_signature"]) is None
            and _sha(body.get("result_sha256")) is None
            and not _miner_signature_ok(body)
        ):
            reasons.append("miner signature does not verify over result_sha256")
        if expected_miner_public_key_hex is not None:
            ms = body.get("miner_signature")
            stated = ms.get("public_key") if isinstance(ms, dict) else None
            if not isinstance(stated, str):
                reasons.append("receipt has no miner signature but one was expected")
            elif stated.lower() != str(expected_miner_public_key_hex).lower():
                reasons.append("miner signature is from a different miner key than expected")
        return Verdict(not reasons, reasons)
    except Exception as exc:  # a verifier must answer, whatever it is handed
        return Verdict(False, [f"receipt could not be verified ({type(exc).__name__})"])


def decimal_string(x: float | int) -> str:
    """Plain decimal text of a number, from the shortest round-trip repr: 0.7 -> "0.7", 1.0 -> "1".

    Never uses an exponent (1e-07 -> "0.0000001"), so every language can reproduce it.
    """
    if isinstance(x, bool) or not isinstance(x, int | float):
        raise TypeError(f"expected an int or float, got {type(x).__name__}")
    if isinstance(x, int):
        return str(x)
    if not math.isfinite(x):
        raise ValueError(f"{x!r} has no decimal form")
    text = format(Decimal(repr(x)), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


@lru_cache(maxsize=1024)
def _float_decimal(x: float) -> str:
    """`decimal_string` of a float, kept: a request's floats (its temperature, top_p) are
    few values asked again and again, and each takes a Decimal to render. (Floats only: the
    cache would take True for 1.)"""
    return decimal_string(x)


def _floats_to_strings(value: Any) -> Any:
    if isinstance(value, float):
        return _float_decimal(value)
    if isinstance(value, dict):
        return {k: _floats_to_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_floats_to_strings(v) for v in value]
    return value


def hash_request(
    prompt: str, params: dict[str, Any], messages: list[dict[str, str]] | None = None
) -> str:
    """Canonical hash of a request: `{prompt, params}`, or `{messages, params}` for a job asked
    as a conversation (whichever the client sent); float params (at any depth) become decimal
    strings first."""
    asked: dict[str, Any] = {"prompt": prompt} if messages is None else {"messages": messages}
    return canonical_hash({**asked, "params": _floats_to_strings(params)}, root="request")


def hash_result(text: str) -> str:
    """SHA-256 hex of the UTF-8 result text."""
    return sha256_hex(text.encode("utf-8"))
