"""The crypto core: canonical JSON, Ed25519 keys and addresses, Merkle proofs, signed receipts."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aitbc_node.canonical import (
    CanonicalError,
    canonical_bytes,
    canonical_hash,
    sha256_hex,
    stored_json,
    stored_text,
)
from aitbc_node.merkle import merkle_proof, merkle_root, verify_proof
from aitbc_node.receipts import (
    SIGNED_FIELDS,
    decimal_string,
    hash_request,
    hash_result,
    receipt_body,
    sign_receipt,
    verify_receipt,
)
from aitbc_node.signing import (
    KeyFileError,
    NodeKey,
    address_for,
    address_for_identity,
    is_address,
    key_id_for,
    verify_signature,
)

NODE = NodeKey.from_seed_hex("11" * 32)
OTHER = NodeKey.from_seed_hex("22" * 32)
MINER = NodeKey.from_seed_hex("33" * 32)
ADDRESS_RE = re.compile(r"^ait1[a-z2-7]{32}$")


def make_body(key: NodeKey = NODE, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "receipt_id": "rcpt_01",
        "job_id": "job_01",
        "client_address": address_for_identity("apikey", "alice"),
        "miner_id": "builtin",
        "model": {"name": "smol-135m", "sha256": "ab" * 32},
        "request_sha256": hash_request("Hello", {"temperature": 0.7, "max_tokens": 16}),
        "result_sha256": hash_result("Hi there ✓"),
        "prompt_tokens": 5,
        "completion_tokens": 11,
        "units": 16,
        "unit_price": "0.002",
        "amount": "0.032",
        "started_at": "2026-01-24T15:00:05.123Z",
        "completed_at": "2026-01-24T15:00:06.456Z",
        "node_key_id": key.key_id,
    }
    body.update(overrides)
    return body


def with_miner(body: dict[str, Any], miner: NodeKey = MINER) -> dict[str, Any]:
    sig = miner.sign(body["result_sha256"].encode("ascii"))
    return {
        **body,
        "miner_signature": {"alg": "ed25519", "public_key": miner.public_key_hex, "value": sig},
    }


def flip_hex(h: str) -> str:
    return ("1" if h[0] == "0" else "0") + h[1:]


# --- canonical JSON ---------------------------------------------------------------------------


def test_canonical_bytes_sorted_compact_utf8() -> None:
    assert (
        canonical_bytes({"b": 1, "a": [True, None, "é"]}) == '{"a":[true,null,"é"],"b":1}'.encode()
    )
    assert canonical_hash({"x": 1}) == sha256_hex(b'{"x":1}')
    assert sha256_hex(b"") == hashlib.sha256(b"").hexdigest()


@pytest.mark.parametrize(
    ("obj", "path"),
    [
        ({"amount": 0.5}, "receipt.amount"),
        ({"model": {"temp": 1.0}}, "receipt.model.temp"),
        ({"items": [1, 2, {"x": float("nan")}]}, "receipt.items[2].x"),
        ({"odd key": 1e3}, 'receipt["odd key"]'),
        (2.5, "receipt"),
    ],
)
def test_floats_rejected_with_path(obj: Any, path: str) -> None:
    with pytest.raises(CanonicalError) as exc:
        canonical_bytes(obj, root="receipt")
    assert str(exc.value).startswith(path + ":")
    assert isinstance(exc.value, ValueError)


@pytest.mark.parametrize("obj", [{1: "a"}, {"ok": {None: 1}}, {("t",): 1}, {"s": {1, 2}}, b"x"])
def test_non_str_keys_and_other_types_rejected(obj: Any) -> None:
    with pytest.raises(CanonicalError):
        canonical_bytes(obj)


def test_lone_surrogate_rejected() -> None:
    with pytest.raises(CanonicalError):
        canonical_bytes({"s": "\ud800"})


def test_the_checks_name_where_the_unfit_value_is_past_the_fast_path() -> None:
    """Plain values skip the path-building checks; whatever is not plain still gets them."""
    with pytest.raises(CanonicalError, match=r"^receipt\.model\.name: string is not valid"):
        canonical_bytes({"model": {"name": "\udfff"}}, root="receipt")
    with pytest.raises(CanonicalError, match=r"^value\.pair: values of type tuple"):
        canonical_bytes({"pair": (1, 2)})  # json.dumps alone would write a list

    class Count(int):
        pass

    assert canonical_bytes({"n": Count(3), "s": [True]}) == b'{"n":3,"s":[true]}'


def _shuffled(value: Any, data: st.DataObject) -> Any:
    """The same JSON value with every dict's keys in a random order."""
    if isinstance(value, dict):
        keys = data.draw(st.permutations(list(value)))
        return {k: _shuffled(value[k], data) for k in keys}
    if isinstance(value, list):
        return [_shuffled(v, data) for v in value]
    return value


@settings(max_examples=60, deadline=None)
@given(data=st.data(), miner=st.booleans(), indent=st.one_of(st.none(), st.integers(0, 8)))
def test_key_order_and_whitespace_do_not_matter(
    data: st.DataObject, miner: bool, indent: int | None
) -> None:
    body = with_miner(make_body()) if miner else make_body()
    receipt = sign_receipt(body, NODE)
    reference = canonical_bytes(receipt)

    shuffled = _shuffled(receipt, data)
    assert canonical_bytes(shuffled) == reference
    assert verify_receipt(shuffled, NODE.public_key_hex).valid

    sep_item = data.draw(st.sampled_from([",", ", ", " ,\n ", ",\t"]))
    sep_key = data.draw(st.sampled_from([":", ": ", " : ", ":\n"]))
    text = json.dumps(
        shuffled,
        indent=indent,
        separators=(sep_item, sep_key),
        ensure_ascii=data.draw(st.booleans()),
    )
    text = data.draw(st.sampled_from(["", " ", "\n", "\t\r\n"])) + text + "\n "
    assert canonical_bytes(json.loads(text)) == reference
    assert verify_receipt(text, NODE.public_key_hex) == verify_receipt(receipt, NODE.public_key_hex)
    assert verify_receipt(text.encode(), NODE.public_key_hex).valid


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(value=json_values, data=st.data())
def test_canonical_bytes_roundtrip_any_order(value: Any, data: st.DataObject) -> None:
    out = canonical_bytes(value)
    assert canonical_bytes(_shuffled(value, data)) == out
    assert canonical_bytes(json.loads(json.dumps(value, indent=2))) == out
    assert json.loads(out.decode()) == value


@settings(max_examples=300, deadline=None)
@given(value=json_values)
def test_canonical_bytes_are_json_dumps_sorted_compact(value: Any) -> None:
    # The definition, byte for byte, whichever encoder writes them: every escape, key order
    # by code point (non-BMP keys after U+FFFF ones), integers of any size.
    reference = json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()
    assert canonical_bytes(value) == reference


def test_canonical_bytes_edge_values_match_the_definition() -> None:
    value = {
        "\U0001f600": '\x00\x1f\x7f\u2028\u2029\ufeff"\\/',
        "\uffff": [2**64, -(2**70), 0, True, False, None],
        "Z": {"é": "\t\r\n\b\f"},
        "": "",
    }
    reference = json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()
    assert canonical_bytes(value) == reference


stored_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(value=stored_values, ensure_ascii=st.booleans())
def test_stored_json_reads_what_json_loads_reads(value: Any, ensure_ascii: bool) -> None:
    # Written as the node writes its columns (json.dumps), read back the same, floats and
    # integers of any size included.
    text = json.dumps(value, ensure_ascii=ensure_ascii)
    assert stored_json(text) == json.loads(text)
    assert type(stored_json(text)) is type(value)


finite_stored_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(value=finite_stored_values)
def test_stored_text_is_read_back_as_written(value: Any) -> None:
    # What the node writes to its columns (a job's params and messages), read back by
    # `stored_json` and by any JSON reader as the same value, its keys in their order.
    text = stored_text(value)
    assert stored_json(text) == value
    assert json.loads(text) == value
    assert json.dumps(stored_json(text)) == json.dumps(value)  # order, and int vs float


def test_stored_json_reads_what_only_json_loads_reads() -> None:
    for text in ('"\\ud800"', "1e400", '{"x": [NaN]}'):
        assert repr(stored_json(text)) == repr(json.loads(text))


# --- keys, signatures, addresses --------------------------------------------------------------


def test_key_ids_and_signatures() -> None:
    key = NodeKey.generate()
    assert re.fullmatch(r"[0-9a-f]{64}", key.public_key_hex)
    assert re.fullmatch(r"ed25519:[0-9a-f]{16}", key.key_id)
    assert key.key_id == key_id_for(key.public_key_hex) == key_id_for(key.public_key_hex.upper())
    sig = key.sign(b"msg")
    assert re.fullmatch(r"[0-9a-f]{128}", sig)
    assert verify_signature(key.public_key_hex, b"msg", sig)
    assert not verify_signature(key.public_key_hex, b"msg2", sig)
    assert not verify_signature(OTHER.public_key_hex, b"msg", sig)
    assert not verify_signature(key.public_key_hex, b"msg", flip_hex(sig))
    assert key.seed_hex not in repr(key)


@pytest.mark.parametrize(
    ("pk", "msg", "sig"),
    [
        ("zz" * 32, b"m", "00" * 64),
        ("00" * 31, b"m", "00" * 64),
        (None, b"m", "00" * 64),
        ("11" * 32, b"m", "00" * 63),
        ("11" * 32, b"m", "0g" * 64),
        ("11" * 32, "m", "00" * 64),
        ("11" * 32, b"m", None),
    ],
)
def test_verify_signature_malformed_is_false(pk: Any, msg: Any, sig: Any) -> None:
    assert verify_signature(pk, msg, sig) is False


def test_load_or_create(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "node.key"
    key = NodeKey.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert re.fullmatch(r"[0-9a-f]{64}\n", path.read_text())
    again = NodeKey.load_or_create(path)
    assert again.public_key_hex == key.public_key_hex
    assert again.sign(b"x") == key.sign(b"x")
    assert [p.name for p in path.parent.iterdir()] == ["node.key"]  # no temp file left

    os.chmod(path, 0o644)  # looser permissions still load
    assert NodeKey.load_or_create(path).key_id == key.key_id


@pytest.mark.parametrize(
    "content", [b"", b"abc", b"11" * 31, b"11" * 33, b"zz" * 32, b"11" * 32 + b" extra", b"\xff"]
)
def test_load_or_create_refuses_malformed_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "node.key"
    path.write_bytes(content)
    with pytest.raises(KeyFileError):
        NodeKey.load_or_create(path)
    assert path.read_bytes() == content  # never overwritten


def test_addresses() -> None:
    a = address_for(NODE.public_key_hex)
    assert ADDRESS_RE.match(a)
    assert a == address_for(NODE.public_key_hex) == NODE.address
    assert a != address_for(OTHER.public_key_hex)
    digest = hashlib.sha256(bytes.fromhex(NODE.public_key_hex)).digest()[:20]
    assert a == "ait1" + base64.b32encode(digest).decode().lower()

    ids = {
        address_for_identity("apikey", "alice"),
        address_for_identity("apikey", "bob"),
        address_for_identity("other", "alice"),
        address_for_identity("apikey", "al:ice"),
    }
    assert len(ids) == 4
    material = b"aitbc-identity:apikey:alice"
    expected = base64.b32encode(hashlib.sha256(material).digest()[:20]).decode().lower()
    assert address_for_identity("apikey", "alice") == "ait1" + expected
    # A ':' in the namespace would let ("a:b", "c") collide with ("a", "b:c").
    with pytest.raises(ValueError):
        address_for_identity("apikey:al", "ice")
    assert all(ADDRESS_RE.match(x) for x in ids)
    assert address_for_identity("apikey", "alice") == address_for_identity("apikey", "alice")
    assert is_address(a) and all(is_address(x) for x in ids)
    for bad in ["", a.upper(), a[:-1], a + "a", a + "\n", "ait2" + a[4:], a[:-1] + "1", None, 5]:
        assert not is_address(bad)


@settings(max_examples=50, deadline=None)
@given(
    ns=st.text(max_size=10).filter(lambda s: ":" not in s),
    ident=st.text(max_size=10),
    ident2=st.text(max_size=10),
)
def test_identity_addresses_property(ns: str, ident: str, ident2: str) -> None:
    a = address_for_identity(ns, ident)
    assert ADDRESS_RE.match(a)
    assert (a == address_for_identity(ns, ident2)) == (ident == ident2)


# --- Merkle -----------------------------------------------------------------------------------


def leaves_of(n: int) -> list[str]:
    return [hashlib.sha256(f"leaf-{i}".encode()).hexdigest() for i in range(n)]


def test_merkle_empty_and_single() -> None:
    assert merkle_root([]) == hashlib.sha256(b"").hexdigest()
    (leaf,) = leaves_of(1)
    assert merkle_root([leaf]) == hashlib.sha256(b"\x00" + bytes.fromhex(leaf)).hexdigest()
    assert merkle_proof([leaf], 0) == []
    assert verify_proof(leaf, [], merkle_root([leaf]))


def test_merkle_two_leaves_by_hand() -> None:
    a, b = leaves_of(2)
    ha = hashlib.sha256(b"\x00" + bytes.fromhex(a)).digest()
    hb = hashlib.sha256(b"\x00" + bytes.fromhex(b)).digest()
    assert merkle_root([a, b]) == hashlib.sha256(b"\x01" + ha + hb).hexdigest()
    assert merkle_proof([a, b], 0) == [{"side": "right", "hash": hb.hex()}]
    assert merkle_proof([a, b], 1) == [{"side": "left", "hash": ha.hex()}]


@pytest.mark.parametrize("n", range(1, 18))
def test_merkle_every_index_verifies(n: int) -> None:
    leaves = leaves_of(n)
    root = merkle_root(leaves)
    other_root = merkle_root(leaves_of(n + 1))
    for i, leaf in enumerate(leaves):
        proof = merkle_proof(leaves, i)
        assert verify_proof(leaf, proof, root)
        assert verify_proof(leaf.upper(), proof, root.upper())
        assert not verify_proof(leaves[(i + 1) % n], proof, root) or n == 1
        assert not verify_proof(flip_hex(leaf), proof, root)
        assert not verify_proof(leaf, proof, flip_hex(root))
        assert not verify_proof(leaf, proof, other_root)
        for j, step in enumerate(proof):
            tampered = copy.deepcopy(proof)
            tampered[j]["hash"] = flip_hex(step["hash"])
            assert not verify_proof(leaf, tampered, root)
            swapped = copy.deepcopy(proof)
            swapped[j]["side"] = "left" if step["side"] == "right" else "right"
            assert not verify_proof(leaf, swapped, root)
        if proof:
            assert not verify_proof(leaf, proof[:-1], root)
            assert not verify_proof(leaf, [*proof, proof[-1]], root)


def test_merkle_odd_node_promoted_not_duplicated() -> None:
    three = leaves_of(3)
    assert merkle_root(three) != merkle_root([*three, three[-1]])
    # Promotion: the third leaf's node goes up unchanged, so its proof is one step long.
    h = [hashlib.sha256(b"\x00" + bytes.fromhex(x)).digest() for x in three]
    ab = hashlib.sha256(b"\x01" + h[0] + h[1]).digest()
    assert merkle_root(three) == hashlib.sha256(b"\x01" + ab + h[2]).hexdigest()
    assert merkle_proof(three, 2) == [{"side": "left", "hash": ab.hex()}]


@pytest.mark.parametrize(
    ("leaf", "proof", "root"),
    [
        ("zz", [], "00" * 32),
        (None, [], "00" * 32),
        ("00" * 32, None, "00" * 32),
        ("00" * 32, [{"side": "up", "hash": "00" * 32}], "00" * 32),
        ("00" * 32, [{"side": "left"}], "00" * 32),
        ("00" * 32, [{"side": "left", "hash": 5}], "00" * 32),
        ("00" * 32, ["x"], "00" * 32),
        ("00" * 32, [], 7),
    ],
)
def test_verify_proof_malformed_is_false(leaf: Any, proof: Any, root: Any) -> None:
    assert verify_proof(leaf, proof, root) is False


def test_merkle_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        merkle_root(["not hex"])
    with pytest.raises(IndexError):
        merkle_proof(leaves_of(3), 3)


# --- receipts ---------------------------------------------------------------------------------


def test_sign_then_verify() -> None:
    receipt = sign_receipt(make_body(), NODE)
    assert receipt["signature"]["alg"] == "ed25519"
    assert receipt["signature"]["key_id"] == NODE.key_id
    assert receipt_body(receipt) == make_body()
    verdict = verify_receipt(receipt, NODE.public_key_hex)
    assert verdict.valid and verdict.reasons == []
    assert verify_receipt(json.dumps(receipt), NODE.public_key_hex).valid


def _changed(value: Any) -> Any:
    """A different value of the same type and shape, so only the signature can catch it."""
    if isinstance(value, dict):
        return {**value, "name": value["name"] + "x"}
    if isinstance(value, int):
        return value + 1
    if re.fullmatch(r"[0-9a-f]{64}", value):
        return flip_hex(value)
    if value.startswith("ed25519:"):
        return value[:-1] + ("0" if value[-1] != "0" else "1")
    if value.endswith("Z"):
        return value.replace("15:00", "16:00")
    if re.fullmatch(r"[0-9.]+", value):
        return value + "1"
    return value + "x"


@pytest.mark.parametrize("name", SIGNED_FIELDS)
def test_changing_any_signed_field_fails(name: str) -> None:
    receipt = sign_receipt(make_body(), NODE)
    tampered = {**receipt, name: _changed(receipt[name])}
    verdict = verify_receipt(tampered, NODE.public_key_hex)
    assert not verdict.valid
    assert "signature does not verify with the trusted key" in verdict.reasons

    removed = {k: v for k, v in receipt.items() if k != name}
    verdict = verify_receipt(removed, NODE.public_key_hex)
    assert not verdict.valid and f"missing field {name}" in verdict.reasons


@pytest.mark.parametrize(
    ("name", "bad"),
    [
        ("units", 1.0),
        ("units", "16"),
        ("units", True),
        ("prompt_tokens", -1),
        ("amount", 0.032),
        ("amount", "-1"),
        ("amount", "1e3"),
        ("model", {"name": "m"}),
        ("model", "smol"),
        ("request_sha256", "AB" * 32),
        ("started_at", "yesterday"),
        ("completed_at", "2026-13-01T00:00:00Z"),
        ("receipt_id", ""),
        ("node_key_id", "rsa:1234"),
    ],
)
def test_wrong_types_are_reasons(name: str, bad: Any) -> None:
    with pytest.raises(ValueError, match=name):
        sign_receipt(make_body(**{name: bad}), NODE)
    receipt = {**sign_receipt(make_body(), NODE), name: bad}
    verdict = verify_receipt(receipt, NODE.public_key_hex)
    assert not verdict.valid
    assert any(r.startswith(f"field {name} ") for r in verdict.reasons)


def test_sign_receipt_rejects_missing_unknown_and_foreign_key_id() -> None:
    body = make_body()
    del body["units"], body["amount"]
    with pytest.raises(ValueError, match=r"missing field units.*missing field amount"):
        sign_receipt(body, NODE)
    with pytest.raises(ValueError, match="unknown field 'tip'"):
        sign_receipt(make_body(tip="1"), NODE)
    with pytest.raises(ValueError, match="node_key_id"):
        sign_receipt(make_body(key=OTHER), NODE)
    with pytest.raises(ValueError, match="already has a signature"):
        sign_receipt(sign_receipt(make_body(), NODE), NODE)
    body = make_body()
    sign_receipt(body, NODE)
    assert body == make_body()  # input not mutated


def test_unknown_field_added_after_signing_fails() -> None:
    receipt = {**sign_receipt(make_body(), NODE), "note": "free"}
    verdict = verify_receipt(receipt, NODE.public_key_hex)
    assert not verdict.valid and "unknown field 'note'" in verdict.reasons


def test_altered_signature_fails() -> None:
    receipt = sign_receipt(make_body(), NODE)
    bad = copy.deepcopy(receipt)
    bad["signature"]["value"] = flip_hex(bad["signature"]["value"])
    assert verify_receipt(bad, NODE.public_key_hex).reasons == [
        "signature does not verify with the trusted key"
    ]
    for sig in [None, "abc", {"alg": "rsa", "key_id": NODE.key_id, "value": "00" * 64}, {}]:
        broken = {**receipt, "signature": sig}
        verdict = verify_receipt(broken, NODE.public_key_hex)
        assert not verdict.valid and verdict.reasons
    unsigned = receipt_body(receipt)
    assert verify_receipt(unsigned, NODE.public_key_hex).reasons == ["receipt has no signature"]


def test_other_trusted_key_fails() -> None:
    receipt = sign_receipt(make_body(), NODE)
    verdict = verify_receipt(receipt, OTHER.public_key_hex)
    assert not verdict.valid
    assert any(r.startswith("signed by a different key") for r in verdict.reasons)
    assert "signature does not verify with the trusted key" in verdict.reasons


def test_attacker_resigned_receipt_fails() -> None:
    receipt = sign_receipt(make_body(), NODE)
    forged_body = {**receipt_body(receipt), "amount": "0", "node_key_id": OTHER.key_id}
    forged = sign_receipt(forged_body, OTHER)
    assert verify_receipt(forged, OTHER.public_key_hex).valid  # valid only for its own key
    verdict = verify_receipt(forged, NODE.public_key_hex)
    assert not verdict.valid
    assert any(r.startswith("signed by a different key") for r in verdict.reasons)
    assert "signature does not verify with the trusted key" in verdict.reasons
    # Even claiming the trusted key's id does not help: the trusted key is what verifies.
    forged["signature"]["key_id"] = NODE.key_id
    verdict = verify_receipt(forged, NODE.public_key_hex)
    assert not verdict.valid
    assert "signature does not verify with the trusted key" in verdict.reasons


def test_miner_cosignature() -> None:
    body = with_miner(make_body())
    receipt = sign_receipt(body, NODE)
    assert verify_receipt(receipt, NODE.public_key_hex).valid
    assert verify_receipt(
        receipt, NODE.public_key_hex, expected_miner_public_key_hex=MINER.public_key_hex
    ).valid

    verdict = verify_receipt(
        receipt, NODE.public_key_hex, expected_miner_public_key_hex=OTHER.public_key_hex
    )
    assert verdict.reasons == ["miner signature is from a different miner key than expected"]

    # The node signature covers the miner signature: swapping it in breaks the node signature.
    tampered = copy.deepcopy(receipt)
    tampered["miner_signature"]["value"] = flip_hex(tampered["miner_signature"]["value"])
    verdict = verify_receipt(tampered, NODE.public_key_hex)
    assert "miner signature does not verify over result_sha256" in verdict.reasons
    assert "signature does not verify with the trusted key" in verdict.reasons

    # A node that signs over a bad miner signature still produces an invalid receipt.
    bad_body = copy.deepcopy(body)
    bad_body["miner_signature"]["value"] = flip_hex(bad_body["miner_signature"]["value"])
    with pytest.raises(ValueError, match="miner_signature does not verify"):
        sign_receipt(bad_body, NODE)
    # ...and a miner signature over a different result does not transfer.
    moved = with_miner(make_body(result_sha256=hash_result("other")))
    bad_body["miner_signature"] = moved["miner_signature"]
    with pytest.raises(ValueError):
        sign_receipt(bad_body, NODE)

    no_miner = sign_receipt(make_body(), NODE)
    verdict = verify_receipt(
        no_miner, NODE.public_key_hex, expected_miner_public_key_hex=MINER.public_key_hex
    )
    assert verdict.reasons == ["receipt has no miner signature but one was expected"]


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "not json",
        "[1, 2]",
        b"\xff\xfe",
        '{"a": NaN}',
        '{"units": 1, "units": 2}',
        "[" * 100_000,
        None,
        42,
    ],
)
def test_verify_never_raises_on_garbage(bad: Any) -> None:
    verdict = verify_receipt(bad, NODE.public_key_hex)
    assert not verdict.valid and verdict.reasons


def test_duplicate_keys_in_json_rejected() -> None:
    receipt = sign_receipt(make_body(), NODE)
    text = json.dumps(receipt)
    dup = text[:-1] + ', "amount": "999"}'
    verdict = verify_receipt(dup, NODE.public_key_hex)
    assert not verdict.valid and "duplicate key" in verdict.reasons[0]


def test_bad_trusted_key_is_a_reason() -> None:
    receipt = sign_receipt(make_body(), NODE)
    for bad in ["", "zz" * 32, None]:
        verdict = verify_receipt(receipt, bad)  # type: ignore[arg-type]
        assert not verdict.valid and verdict.reasons


def test_decimal_string_and_hashes() -> None:
    assert decimal_string(0.7) == "0.7"
    assert decimal_string(1.0) == "1"
    assert decimal_string(100.0) == "100"
    assert decimal_string(-0.0) == "0"
    assert decimal_string(1e-7) == "0.0000001"
    assert decimal_string(1e20) == "100000000000000000000"
    assert decimal_string(0.1 + 0.2) == "0.30000000000000004"
    assert decimal_string(3) == "3"
    with pytest.raises(ValueError):
        decimal_string(float("inf"))
    with pytest.raises(TypeError):
        decimal_string(True)

    h = hash_request("p", {"temperature": 0.7, "n": 1, "stop": ["x"], "nested": {"top_p": 1.0}})
    expected = {"params": {"n": 1, "nested": {"top_p": "1"}, "stop": ["x"], "temperature": "0.7"}}
    assert h == canonical_hash({"prompt": "p", **expected})
    assert h == hash_request(
        "p", {"nested": {"top_p": 1.0}, "stop": ["x"], "n": 1, "temperature": 0.7}
    )
    assert h != hash_request(
        "q", {"temperature": 0.7, "n": 1, "stop": ["x"], "nested": {"top_p": 1.0}}
    )
    assert hash_result("é") == hashlib.sha256("é".encode()).hexdigest()


@settings(max_examples=200, deadline=None)
@given(x=st.floats(allow_nan=False, allow_infinity=False))
def test_decimal_string_round_trips(x: float) -> None:
    s = decimal_string(x)
    assert re.fullmatch(r"-?(0|[1-9][0-9]*)(\.[0-9]*[1-9])?", s)
    assert float(s) == x


def test_signature_checks_are_kept_only_for_short_messages() -> None:
    """A co-signature's check is remembered (it is made twice per completion); a long
    document's, which anyone may send to the verify route, never is, so the cache stays small."""
    from aitbc_node import signing

    key = NODE
    short, long = b"a" * 64, os.urandom(64 * 1024)
    kept = signing._verified_short.cache_info().currsize
    assert verify_signature(key.public_key_hex, short, key.sign(short))
    assert verify_signature(key.public_key_hex, short, key.sign(short))
    assert signing._verified_short.cache_info().currsize == kept + 1
    assert verify_signature(key.public_key_hex, long, key.sign(long))
    assert not verify_signature(key.public_key_hex, long, key.sign(short))
    assert signing._verified_short.cache_info().currsize == kept + 1
    assert not verify_signature(key.public_key_hex, short, key.sign(b"b" * 64))
