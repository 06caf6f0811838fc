"""`serve`'s settings from flags, AITBC_* environment variables and a TOML config file.

Precedence is flag > env > file > default for every flag of the serve parser; `--print-config`
shows each effective value and its source. The unit tests run `cli.main` in this process with a
monkeypatched environment (every setting is printed, nothing is started); the last tests start
real nodes whose port and flags come from env and file, and nodes behind `--trust-proxy`.
"""

from __future__ import annotations

import argparse
import os
import re
import tomllib
from pathlib import Path

import httpx
import pytest

from aitbc_node import cli, settings_sources
from aitbc_node.models import EMBEDDED_NAME
from tests.conftest import NodeProcess, free_port


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No AITBC_* settings and an empty config home; returns the default config path."""
    for name in list(os.environ):
        if name.startswith("AITBC_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "aitbc-node" / "config.toml"


def print_config(capsys: pytest.CaptureFixture[str], *flags: str) -> dict[str, tuple[str, str]]:
    """`serve --print-config` run in-process: {option: (value as printed, source)}."""
    assert cli.main(["serve", *flags, "--print-config"]) == 0
    out = capsys.readouterr().out
    shown: dict[str, tuple[str, str]] = {}
    for line in out.splitlines():
        if line.startswith("# config file:"):
            shown["#config"] = (line.split(":", 1)[1].strip(), "")
            continue
        m = re.fullmatch(r"(?:# )?([a-z0-9-]+)(?: = (.*?)| \(not set\))\s+# (.+)", line)
        if m:
            shown[m[1]] = (m[2] if m[2] is not None else "(not set)", m[3])
    return shown


def serve_error(capsys: pytest.CaptureFixture[str], *flags: str) -> str:
    """Run serve with settings that must be refused; returns the one-line error."""
    assert cli.main(["serve", *flags]) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert err.startswith("aitbc-node: error: "), err
    assert "\n" not in err, err
    return err.removeprefix("aitbc-node: error: ")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# -- precedence, pair by pair --------------------------------------------------------------


def test_defaults_only(capsys: pytest.CaptureFixture[str], clean_env: Path) -> None:
    shown = print_config(capsys)
    assert shown["port"] == ("8080", "default")
    assert shown["host"] == ('"127.0.0.1"', "default")
    assert shown["no-miner"] == ("false", "default")
    assert shown["model"] == ("[]", "default")
    assert shown["threads"] == ("(not set)", "default")
    assert shown["#config"][0] == f"none ({clean_env} does not exist)"
    # Options that read or show the configuration are not settings themselves.
    assert "config" not in shown and "print-config" not in shown


def test_every_serve_flag_is_shown_with_its_env_name() -> None:
    serve = settings_sources.subparser(cli.build_parser(), "serve")
    opts = {o.name: o.env for o in settings_sources.options(serve)}
    flags = {
        s[2:]
        for a in serve._actions
        for s in a.option_strings
        if s.startswith("--") and a.dest not in settings_sources.NOT_CONFIGURABLE
    }
    assert set(opts) == flags
    assert opts["port"] == "AITBC_PORT"
    assert opts["max-pending-per-client"] == "AITBC_MAX_PENDING_PER_CLIENT"
    assert opts["data-dir"] == "AITBC_DATA_DIR"


def test_env_beats_default(capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.setenv("AITBC_PORT", "9001")
    monkeypatch.setenv("AITBC_MAX_PENDING_PER_CLIENT", "7")
    monkeypatch.setenv("AITBC_NO_MINER", "yes")
    monkeypatch.setenv("AITBC_DURABILITY", "normal")
    shown = print_config(capsys)
    assert shown["port"] == ("9001", "env AITBC_PORT")
    assert shown["max-pending-per-client"] == ("7", "env AITBC_MAX_PENDING_PER_CLIENT")
    assert shown["no-miner"] == ("true", "env AITBC_NO_MINER")
    assert shown["durability"] == ('"normal"', "env AITBC_DURABILITY")


def test_file_beats_default(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = write(
        tmp_path / "c.toml",
        'port = 8081\nmax-pending = 10\nno_miner = true\nmodel = ["a=/x.gguf"]\n'
        'lease-seconds = 5\nhost = "0.0.0.0"\n',
    )
    shown = print_config(capsys, "--config", str(config))
    source = f"file {config}"
    assert shown["port"] == ("8081", source)
    assert shown["max-pending"] == ("10", source)
    assert shown["no-miner"] == ("true", source)
    assert shown["model"] == ('["a=/x.gguf"]', source)
    assert shown["lease-seconds"] == ("5.0", source)  # through the flag's type=float
    assert shown["host"] == ('"0.0.0.0"', source)
    assert shown["ctx-size"] == ("4096", "default")
    assert shown["#config"][0] == str(config)


def test_env_beats_file(capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch) -> None:
    config = write(tmp_path / "c.toml", 'port = 8081\nmodel = ["a=/x.gguf"]\nno-miner = true\n')
    monkeypatch.setenv("AITBC_PORT", "9001")
    monkeypatch.setenv("AITBC_MODEL", "b=/y.gguf, c=/z.gguf")
    monkeypatch.setenv("AITBC_NO_MINER", "off")
    shown = print_config(capsys, "--config", str(config))
    assert shown["port"] == ("9001", "env AITBC_PORT")
    assert shown["model"] == ('["b=/y.gguf", "c=/z.gguf"]', "env AITBC_MODEL")
    assert shown["no-miner"] == ("false", "env AITBC_NO_MINER")


def test_flag_beats_env(capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.setenv("AITBC_PORT", "9001")
    monkeypatch.setenv("AITBC_ALIAS", "a=b,c=d")
    shown = print_config(capsys, "--port", "9002", "--alias", "x=y")
    assert shown["port"] == ("9002", "flag")
    # A repeatable flag on the command line replaces the env list, not adds to it.
    assert shown["alias"] == ('["x=y"]', "flag")


def test_flag_beats_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = write(tmp_path / "c.toml", 'port = 8081\nrate = ["public=1/2"]\n')
    shown = print_config(capsys, "--config", str(config), "--port", "9003", "--rate", "client=1")
    assert shown["port"] == ("9003", "flag")
    assert shown["rate"] == ('["client=1"]', "flag")


def test_the_parsed_namespace_gets_the_values(monkeypatch, tmp_path: Path) -> None:
    """What cmd_serve receives, typed as a flag's value would be."""
    config = write(tmp_path / "c.toml", 'webhook-allow = ["127.0.0.1/32"]\nblock-interval = 3\n')
    monkeypatch.setenv("AITBC_THREADS", "2")
    monkeypatch.setenv("AITBC_DATA_DIR", str(tmp_path / "d"))
    parser = cli.build_parser()
    argv = ["serve", "--config", str(config), "--ctx-size", "512"]
    args = parser.parse_args(argv)
    settings_sources.resolve(settings_sources.subparser(parser, "serve"), argv[1:], args)
    assert args.threads == 2
    assert args.data_dir == tmp_path / "d"
    assert args.block_interval == 3.0 and isinstance(args.block_interval, float)
    assert args.webhook_allow == ["127.0.0.1/32"]
    assert args.ctx_size == 512
    assert args.port == 8080


def test_default_location_and_aitbc_config(
    capsys: pytest.CaptureFixture[str], clean_env: Path, tmp_path: Path, monkeypatch
) -> None:
    write(clean_env, "port = 8082\n")
    assert print_config(capsys)["port"] == ("8082", f"file {clean_env}")
    other = write(tmp_path / "other.toml", "port = 8083\n")
    monkeypatch.setenv("AITBC_CONFIG", str(other))
    assert print_config(capsys)["port"] == ("8083", f"file {other}")
    # --config beats $AITBC_CONFIG.
    third = write(tmp_path / "third.toml", "port = 8084\n")
    assert print_config(capsys, "--config", str(third))["port"] == ("8084", f"file {third}")


def test_print_config_output_is_a_config_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch
) -> None:
    """What --print-config prints reads back as a config file giving the same settings."""
    monkeypatch.setenv("AITBC_MODEL", "a=/x.gguf")
    monkeypatch.setenv("AITBC_LEASE_SECONDS", "7.5")
    monkeypatch.setenv("AITBC_ACCESS_LOG", "1")
    assert cli.main(["serve", "--print-config", "--host", "::1"]) == 0
    first = capsys.readouterr().out
    config = write(tmp_path / "again.toml", first)
    assert tomllib.loads(first)["lease-seconds"] == 7.5
    for name in ("AITBC_MODEL", "AITBC_LEASE_SECONDS", "AITBC_ACCESS_LOG"):
        monkeypatch.delenv(name)
    assert cli.main(["serve", "--print-config", "--config", str(config)]) == 0
    second = capsys.readouterr().out

    def values(text: str) -> list[str]:
        return [line.split("  #")[0].rstrip() for line in text.splitlines()[2:]]

    assert values(second) == values(first)


def test_the_readme_config_example_is_accepted(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    example = re.search(r"```toml\n(# /etc/aitbc-node/config.toml\n.*?)```", readme, re.S)
    assert example, "the README's Configuration section has no config.toml example"
    config = write(tmp_path / "config.toml", example[1])
    shown = print_config(capsys, "--config", str(config))
    for key in tomllib.loads(example[1]):
        assert shown[key][1] == f"file {config}", key


# -- errors name their source ----------------------------------------------------------------


def test_bad_env_values(capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.setenv("AITBC_PORT", "x")
    assert serve_error(capsys) == "AITBC_PORT: invalid int value: 'x'"
    monkeypatch.delenv("AITBC_PORT")
    monkeypatch.setenv("AITBC_NO_MINER", "maybe")
    assert serve_error(capsys).startswith("AITBC_NO_MINER: expected one of 1/0, true/false")
    monkeypatch.delenv("AITBC_NO_MINER")
    monkeypatch.setenv("AITBC_DURABILITY", "fast")
    assert serve_error(capsys) == (
        "AITBC_DURABILITY: invalid choice: 'fast' (choose from 'full', 'normal')"
    )
    monkeypatch.delenv("AITBC_DURABILITY")
    monkeypatch.setenv("AITBC_PARALLEL", "99")  # the flag's own type function says why
    assert serve_error(capsys) == "AITBC_PARALLEL: 99 is not between 1 and 64"
    monkeypatch.delenv("AITBC_PARALLEL")
    monkeypatch.setenv("AITBC_TRUST_PROXY", "10.0.0.0/8,proxy.local")
    assert serve_error(capsys).startswith("AITBC_TRUST_PROXY: 'proxy.local' is not an IP")


def test_bad_file_values(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    def refused(text: str) -> str:
        config = write(tmp_path / "bad.toml", text)
        return serve_error(capsys, "--config", str(config)).removeprefix(f"{config}: ")

    assert refused('port = "x"\n') == "port: invalid int value: 'x'"
    assert refused("port = 80.5\n") == "port: invalid int value: '80.5'"
    assert refused('durability = "fast"\n').startswith("durability: invalid choice: 'fast'")
    assert refused('no-miner = "maybe"\n') == "no-miner: expected true or false, got 'maybe'"
    assert refused("host = true\n").startswith("host: expected a value for --host")
    assert refused("port = [1, 2]\n").startswith("port: --port takes one value")
    assert refused("prot = 8081\n") == "unknown option 'prot' (did you mean 'port'?)"
    assert refused("max_pendin = 1\n") == (
        "unknown option 'max_pendin' (did you mean 'max-pending'?)"
    )
    assert refused("zzz = 1\n") == "unknown option 'zzz' (see `aitbc-node serve --help`)"
    assert refused('config = "/x.toml"\n') == "'config' cannot be set in a config file"
    assert refused("port = 1\nport_ = 2\n").startswith("unknown option 'port_'")
    assert refused("max-pending = 1\nmax_pending = 2\n") == (
        "'max_pending' and 'max-pending' set the same option"
    )
    assert refused("port = \n").startswith("not valid TOML")


def test_missing_config_files(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch
) -> None:
    missing = tmp_path / "nope.toml"
    assert serve_error(capsys, "--config", str(missing)) == (
        f"config file {missing} does not exist"
    )
    monkeypatch.setenv("AITBC_CONFIG", str(missing))
    assert serve_error(capsys) == f"config file {missing} does not exist"


def test_other_commands_keep_their_env(monkeypatch, tmp_path: Path) -> None:
    """`miner` still reads AITBC_URL and AITBC_API_KEY; AITBC_DATA_DIR is the data dir."""
    monkeypatch.setenv("AITBC_URL", "http://10.0.0.5:8080/api")
    monkeypatch.setenv("AITBC_API_KEY", "k")
    args = cli.build_parser().parse_args(["miner"])
    assert (args.coordinator, args.api_key) == ("http://10.0.0.5:8080/api", "k")
    monkeypatch.setenv("AITBC_DATA_DIR", str(tmp_path / "d"))
    assert cli.default_data_dir() == tmp_path / "d"


def test_an_empty_variable_is_unset(capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    """As $AITBC_DATA_DIR always was: an empty one must not make the data dir '.'."""
    monkeypatch.setenv("AITBC_DATA_DIR", "")
    monkeypatch.setenv("AITBC_PORT", " ")
    shown = print_config(capsys)
    assert shown["data-dir"] == ("(not set)", "default")
    assert shown["port"] == ("8080", "default")


def test_flags_added_later_and_secrets() -> None:
    """Nothing lists the options: a new flag is configurable and a key is never printed."""
    parser = argparse.ArgumentParser(prog="x")
    parser.add_argument("--metrics-key", default=None)
    parser.add_argument("--no-metrics", action="store_true")
    parser.add_argument("--level", type=int, choices=[1, 2], default=1)
    env = {"AITBC_METRICS_KEY": "s3cret", "AITBC_NO_METRICS": "TRUE", "AITBC_LEVEL": "2"}
    args = parser.parse_args([])
    resolved = settings_sources.resolve(parser, [], args, env)
    assert (args.metrics_key, args.no_metrics, args.level) == ("s3cret", True, 2)
    text = resolved.render(args)
    assert "s3cret" not in text
    assert re.search(r'^metrics-key = "\*\*\*"\s+# env AITBC_METRICS_KEY$', text, re.M)
    with pytest.raises(settings_sources.ConfigError, match="AITBC_LEVEL: invalid choice: '3'"):
        settings_sources.resolve(parser, [], parser.parse_args([]), {"AITBC_LEVEL": "3"})


# -- real nodes ------------------------------------------------------------------------------


def test_a_node_listens_where_env_and_file_say(tmp_path: Path) -> None:
    """The port from AITBC_PORT (over the file's), the rest from the file, the data dir from
    the flag (over the file's)."""
    env_port, file_port = free_port(), free_port()
    config = write(
        tmp_path / "node.toml",
        f"port = {file_port}\nno-miner = true\n"
        f'alias = ["from-file={EMBEDDED_NAME}"]\ndata-dir = "{tmp_path / "not-this"}"\n',
    )
    node = NodeProcess(
        tmp_path / "data",
        "--config",
        str(config),
        port=env_port,
        env={"AITBC_PORT": str(env_port)},
        port_flag=False,
    )
    try:
        node.start()  # answers /api/health on env_port, and wrote its keys to the flag's dir
        health = node.request("GET", "/health").json()
        assert health["miner"]["state"] == "disabled"
        assert health["aliases"] == {"from-file": EMBEDDED_NAME}
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{file_port}/api/health", timeout=10)
        assert not (tmp_path / "not-this").exists()
    finally:
        node.stop()


def _public_statuses(node: NodeProcess, forwarded_for: list[str]) -> list[int]:
    return [
        node.request(
            "GET", "/health", headers={"X-Forwarded-For": f"203.0.113.9, {addr}"}
        ).status_code
        for addr in forwarded_for
    ]


# One public read per 100 s with a burst of 2: nothing refills while a test runs.
TIGHT = ("--no-miner", "--rate", "public=0.01/2", "--access-log")


def test_trusted_proxy_limits_per_forwarded_address(start_node) -> None:
    node = start_node(*TIGHT, "--trust-proxy", "127.0.0.1/32")
    # The right-most untrusted address is the client; the left one is the client's own claim.
    assert _public_statuses(node, ["10.1.1.1", "10.1.1.1", "10.1.1.1"]) == [200, 200, 429]
    assert _public_statuses(node, ["10.1.1.2", "10.1.1.2"]) == [200, 200]
    # A trusted hop on the right is skipped: the client is the address before it.
    r = node.request("GET", "/health", headers={"X-Forwarded-For": "10.1.1.3, 127.0.0.1"})
    assert r.status_code == 200
    assert _public_statuses(node, ["10.1.1.3"]) == [200]
    log = node.output()
    assert "client=10.1.1.1" in log and "client=10.1.1.2" in log


def test_untrusted_peers_cannot_spoof_past_the_limit(start_node) -> None:
    """Without --trust-proxy the header is ignored, even from 127.0.0.1: every request
    counts against the peer's own address."""
    node = start_node(*TIGHT)
    statuses = _public_statuses(node, ["10.2.2.1", "10.2.2.2", "10.2.2.3", "10.2.2.4"])
    # The start-up health check took one of the two; one more goes through, then 429s.
    assert statuses == [200, 429, 429, 429]
    assert "client=10.2.2." not in node.output()
    assert "client=127.0.0.1" in node.output()
