"""Webhook destinations: the node posts only where it may, to the address it checked, and never
follows a redirect. Every request in these tests goes to 127.0.0.1; other addresses are only
classified, never sent to."""

from __future__ import annotations

import socket
import time

import pytest

from aitbc_node.destinations import DestinationPolicy, NotAllowed, parse_ipv4
from tests.conftest import db_snapshot, free_port
from tests.test_jobs_api import assert_error
from tests.test_webhooks import ALLOW_LOOPBACK, Receiver, only_delivery, register, run_as_miner

# Each host a client tried to aim the node at, as written in a URL, and the rule that refuses it.
REFUSED = {
    "127.0.0.1": "loopback",
    "[::1]": "loopback",
    "localhost": "loopback",
    "2130706433": "loopback",
    "0x7f000001": "loopback",
    "0": "unspecified",
    "127.1": "loopback",
    "[::ffff:127.0.0.1]": "loopback",
    "169.254.169.254": "link-local",
    "10.0.0.1": "private",
    "metadata.google.internal": "metadata",
}


def url_host(host: str) -> str:
    """The host as the policy gets it from a URL: IPv6 without its brackets."""
    return host.strip("[]")


@pytest.mark.parametrize("host", list(REFUSED))
def test_each_spelling_of_a_local_address_is_refused(host: str) -> None:
    with pytest.raises(NotAllowed) as refused:
        DestinationPolicy().check(url_host(host), 80)
    message = str(refused.value)
    assert REFUSED[host] in message and "--webhook-allow" in message


@pytest.mark.parametrize(
    "host, rule",
    [
        ("0177.0.0.1", "loopback"),  # octal
        ("0x7f.1", "loopback"),
        ("100.64.0.1", "shared"),
        ("fc00::1", "unique-local"),
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("::", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("2002:7f00:1::", "loopback"),  # 6to4 wrapping 127.0.0.1
        ("192.168.1.1", "private"),
        ("sub.localhost", "loopback"),
        ("LOCALHOST.", "loopback"),
    ],
)
def test_other_non_public_destinations_are_refused(host: str, rule: str) -> None:
    with pytest.raises(NotAllowed, match=rule):
        DestinationPolicy().check(host, 443)


@pytest.mark.parametrize("host", ["93.184.216.34", "2606:4700:4700::1111"])
def test_a_public_address_is_allowed_and_dialled_as_checked(host: str) -> None:
    # Only classified: nothing is sent to it.
    destination = DestinationPolicy().check(host, 443)
    assert destination is not None and str(destination.address) == host


def test_ipv4_spellings_read_as_a_resolver_reads_them() -> None:
    for spelling in ("2130706433", "0x7f000001", "127.1", "0177.0.0.1", "0x7f.0.0.1"):
        assert str(parse_ipv4(spelling)) == "127.0.0.1"
    assert str(parse_ipv4("0")) == "0.0.0.0"
    assert str(parse_ipv4("10.1")) == "10.0.0.1"
    for not_an_address in ("256.0.0.1", "1.2.3.4.5", "08.0.0.1", "0x", "example.com", "1.2.3.x"):
        assert parse_ipv4(not_an_address) is None


def test_the_allow_list_permits_networks_and_host_names() -> None:
    policy = DestinationPolicy(["127.0.0.1/32", "10.1.0.0/16", "hooks.internal"])
    for host in ("127.0.0.1", "127.1", "2130706433", "::ffff:127.0.0.1", "localhost", "10.1.2.3"):
        destination = policy.check(host, 80)
        assert destination is not None and str(destination.address) in ("127.0.0.1", "10.1.2.3")
    # An allowed name is taken as it is at registration (resolved at delivery).
    assert policy.check("hooks.internal", 80, resolve=False) is None
    for host in ("127.0.0.2", "::1", "10.2.0.1", "169.254.169.254"):
        with pytest.raises(NotAllowed):
            policy.check(host, 80)
    for bad in ("not a host", "10.0.0.0/33", ""):
        with pytest.raises(ValueError):
            DestinationPolicy([bad])


def test_every_spelling_is_refused_at_registration_and_the_store_is_unchanged(
    start_node,
) -> None:
    node = start_node("--no-miner")
    port = free_port()  # nothing is sent: every registration is refused
    before = db_snapshot(node.data_dir)
    for host in REFUSED:
        r = node.request(
            "POST", "/v1/webhooks", node.client_key, json={"url": f"http://{host}:{port}/hook"}
        )
        body = assert_error(r, 400, "WEBHOOK_URL_NOT_ALLOWED")
        assert REFUSED[host] in body["detail"] and "--webhook-allow" in body["detail"], body
    assert node.request("GET", "/v1/webhooks", node.client_key).json()["webhooks"] == []
    assert db_snapshot(node.data_dir) == before


def test_a_loopback_receiver_the_operator_allowed_gets_its_deliveries(start_node) -> None:
    receiver = Receiver()
    try:
        node = start_node("--no-miner", *ALLOW_LOOPBACK)
        port = receiver.server.server_address[1]
        # The same receiver by address and by name: both are 127.0.0.1, which is allowed.
        hooks = [register(node, receiver.url), register(node, f"http://localhost:{port}/hook")]
        key = node.register_miner("m")
        job_id = node.submit("deliver me")["job_id"]
        run_as_miner(node, key, "m", job_id, "complete")
        requests = receiver.wait_for(2)
        # Dialled at the checked address, with the URL's own host in the Host header.
        assert sorted(r["headers"]["host"] for r in requests) == [
            f"127.0.0.1:{port}",
            f"localhost:{port}",
        ]
        for hook in hooks:
            delivery = only_delivery(node, hook["webhook_id"], lambda d: d["state"] != "pending")
            assert delivery["state"] == "delivered"
            assert [a["status_code"] for a in delivery["attempts"]] == [200]
    finally:
        receiver.server.shutdown()


def test_a_destination_no_longer_allowed_is_refused_at_delivery(start_node) -> None:
    receiver = Receiver()
    try:
        node = start_node("--no-miner", *ALLOW_LOOPBACK)
        hook = register(node, receiver.url)
        node.stop()
        # The operator drops the allowance: the webhook stays, but nothing is sent to it.
        node = start_node(
            "--no-miner", "--webhook-retry-base", "0.1", "--webhook-max-attempts", "2",
            data_dir=node.data_dir,
        )  # fmt: skip
        key = node.register_miner("m")
        job_id = node.submit("not for loopback")["job_id"]
        run_as_miner(node, key, "m", job_id, "complete")
        delivery = only_delivery(node, hook["webhook_id"], lambda d: d["state"] == "failed")
        assert [(a["status_code"], a["error"]) for a in delivery["attempts"]] == [
            (None, "destination not allowed")
        ] * 2
        assert receiver.received == []
    finally:
        receiver.server.shutdown()


def test_a_redirect_is_a_failed_attempt_retried_and_never_followed(start_node) -> None:
    receiver = Receiver()
    receiver.statuses = [302]
    receiver.location = "/new"
    try:
        node = start_node("--no-miner", *ALLOW_LOOPBACK, "--webhook-retry-base", "0.2")
        hook = register(node, receiver.url)
        key = node.register_miner("m")
        job_id = node.submit("redirect me")["job_id"]
        run_as_miner(node, key, "m", job_id, "complete")
        first, second = receiver.wait_for(2)
        assert first["headers"]["aitbc-event-id"] == second["headers"]["aitbc-event-id"]
        assert second["body"] == first["body"]  # the event itself, posted again
        delivery = only_delivery(node, hook["webhook_id"], lambda d: d["state"] == "delivered")
        assert [a["status_code"] for a in delivery["attempts"]] == [302, 200]
        assert delivery["attempts"][0]["error"] is None
        time.sleep(0.5)
        assert receiver.gets == [] and len(receiver.received) == 2
    finally:
        receiver.server.shutdown()


def test_connection_failures_read_alike_in_the_delivery_log(start_node) -> None:
    # A closed port (refused) and a port that accepts but never answers (a timeout) must not
    # be told apart by their error text: that would map which ports are open.
    closed = free_port()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        node = start_node(
            "--no-miner", *ALLOW_LOOPBACK, "--webhook-timeout", "1",
            "--webhook-max-attempts", "1",
        )  # fmt: skip
        hooks = [
            register(node, f"http://127.0.0.1:{closed}/hook"),
            register(node, f"http://127.0.0.1:{silent.getsockname()[1]}/hook"),
        ]
        key = node.register_miner("m")
        job_id = node.submit("nowhere")["job_id"]
        run_as_miner(node, key, "m", job_id, "complete")
        errors = []
        for hook in hooks:
            delivery = only_delivery(node, hook["webhook_id"], lambda d: d["state"] == "failed")
            ((attempt),) = delivery["attempts"]
            assert attempt["status_code"] is None
            errors.append(attempt["error"])
        assert errors == ["connection failed", "connection failed"]
    finally:
        silent.close()
