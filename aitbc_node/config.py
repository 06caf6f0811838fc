"""The node's settings, with the defaults the `serve` command starts from."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080


def default_data_dir() -> Path:
    """`$AITBC_DATA_DIR`, else `$XDG_DATA_HOME/aitbc-node`, else `~/.local/share/aitbc-node`."""
    if os.environ.get("AITBC_DATA_DIR"):
        return Path(os.environ["AITBC_DATA_DIR"]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "aitbc-node"


@dataclass
class Limits:
    """Bounds on what a request may ask for."""

    max_body_bytes: int = 1 << 20
    max_prompt_chars: int = 65_536
    max_result_chars: int = 1 << 20
    max_tokens: int = 4096
    default_max_tokens: int = 256
    max_list_limit: int = 100
    default_list_limit: int = 20
    max_pending_per_client: int = 1000
    max_pending: int = 10_000
    max_wait_seconds: float = 60.0


@dataclass
class JobRules:
    """How long a claim lasts and how often a job may be tried."""

    lease_seconds: float = 60.0
    max_attempts: int = 3
    miner_timeout_seconds: float = 300.0
    accept_unserved_models: bool = False
    require_funds: bool = False
    aliases: dict[str, str] = field(default_factory=dict)

    @property
    def lease_ms(self) -> int:
        return int(self.lease_seconds * 1000)


@dataclass(frozen=True)
class ConnectionLimits:
    """How long a client may take, and how many connections may be open at once."""

    header_timeout: float = 10.0  # connect (or a later request's first byte) to a full head
    keep_alive_timeout: float = 5.0  # idle time allowed between two requests
    max_connections: int = 4096
