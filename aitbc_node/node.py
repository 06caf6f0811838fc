"""The node: the store, the job rules, the built-in miner and the lease reaper, wired together.

`Node` is what the HTTP layer and the CLI hold. It owns start-up order (migrations, keys,
requeue of jobs interrupted by a crash, model loading) and a clean shutdown.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from aitbc_node import __version__, keys
from aitbc_node.config import DEFAULT_HOST, DEFAULT_PORT, JobRules, Limits
from aitbc_node.delivery import Dispatcher, RetryPolicy
from aitbc_node.destinations import DestinationPolicy
from aitbc_node.explorer import Explorer
from aitbc_node.jobs import Jobs
from aitbc_node.leases import LeaseReaper
from aitbc_node.ledger import BlockSealer, Ledger, Pricing
from aitbc_node.metrics import Metrics
from aitbc_node.miners import Miners
from aitbc_node.models import ModelFile
from aitbc_node.ratelimit import DEFAULT_RATES, Rate, RateLimiter
from aitbc_node.signals import Signals
from aitbc_node.signing import NodeKey
from aitbc_node.store import Store
from aitbc_node.webhooks import Webhooks

log = logging.getLogger("aitbc_node.node")

DATABASE_FILE = "node.db"


class StartupError(Exception):
    """The node cannot start as configured (a model that does not load, say)."""


NODE_KEY_FILE = "node.key"


@dataclass
class NodeSettings:
    """Everything `aitbc-node serve` can be told."""

    data_dir: Path
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    models: list[ModelFile] = field(default_factory=list)
    run_miner: bool = True
    gpu_layers: int | None = None
    context: int = 4096
    threads: int | None = None
    parallel: int | None = None  # sequences per model; None: chosen from device and memory
    rules: JobRules = field(default_factory=JobRules)
    limits: Limits = field(default_factory=Limits)
    pricing: Pricing = field(default_factory=Pricing)
    block_interval: float = 2.0
    block_max_items: int = 500
    rates: dict[str, Rate | None] = field(default_factory=lambda: dict(DEFAULT_RATES))
    webhook_retry: RetryPolicy = field(default_factory=RetryPolicy)
    # `--webhook-allow` values: networks and host names webhooks may reach beyond public ones.
    webhook_allow: list[str] = field(default_factory=list)
    cors_origins: list[str] = field(default_factory=list)
    # FULL: a commit survives a power cut, not only a crash (~0.3 ms more per write here).
    synchronous: str = "FULL"
    metrics: bool = True  # serve GET /metrics (`--no-metrics`: not at all)
    metrics_key: str | None = None  # `--metrics-key`: /metrics wants it; None: public
    # `--trust-proxy` networks: only peers inside them may name the client in X-Forwarded-For.
    trusted_proxies: list[str] = field(default_factory=list)


class Node:
    """One aitbc-node: open it, `start()` it, serve its app, `stop()` it."""

    def __init__(self, settings: NodeSettings) -> None:
        self.settings = settings
        self.limits = settings.limits
        self.data_dir = settings.data_dir
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        self.key = NodeKey.load_or_create(self.data_dir / NODE_KEY_FILE)
        self.store = Store(self.data_dir / DATABASE_FILE, synchronous=settings.synchronous)
        self.signals = Signals(after_commit=self.store.after_commit)
        self.metrics = Metrics()
        self.miners = Miners(self.store, settings.rules)
        self.metrics.watch(self.store, self.miners)
        self.ledger = Ledger(self.store, self.key, settings.pricing)
        self.ledger.ensure_genesis()
        self.webhooks = Webhooks(
            self.store, settings.limits, DestinationPolicy(settings.webhook_allow)
        )
        self.jobs = Jobs(
            self.store,
            self.miners,
            self.signals,
            self.ledger,
            self.webhooks,
            settings.rules,
            settings.limits,
            self.metrics,
        )
        self.rate_limiter = RateLimiter(settings.rates)
        self.explorer = Explorer(self.store, settings.limits, settings.block_interval)
        self.credentials = keys.ensure_initial_keys(
            self.store, self.data_dir, credit=settings.pricing.grant
        )
        self.reaper = LeaseReaper(self.jobs, self.metrics)
        self.sealer = BlockSealer(
            self.ledger, settings.block_interval, settings.block_max_items, self.metrics
        )
        self.dispatcher = Dispatcher(
            self.store, self.webhooks, settings.webhook_retry, self.metrics
        )
        self.miner: Any = None  # a BuiltinMiner once started with models

    def start(self) -> None:
        """Requeue what a crash interrupted, load the models, start the miner and the reaper."""
        outcome = self.jobs.requeue_interrupted(keys.BUILTIN_MINER_ID)
        # It also expires remote miners' leases that ran out while the node was down: tell
        # those apart from the built-in miner's own interrupted jobs.
        own = set(outcome["interrupted"])
        for what, mine, level in (
            ("built-in miner's interrupted jobs", True, logging.WARNING),
            (
                "remote miners' jobs whose lease ran out while the node was down",
                False,
                logging.INFO,
            ),
        ):
            requeued = [j for j in outcome["requeued"] if (j in own) == mine]
            failed = [j for j in outcome["failed"] if (j in own) == mine]
            if requeued or failed:
                log.log(level, "%s: %d requeued, %d failed", what, len(requeued), len(failed))
        for problem in keys.identity_role_conflicts(self.store.read()):
            log.warning("%s", problem)
        if self.settings.run_miner and self.settings.models:
            self.miner = self._start_miner()
        self.reaper.start()
        self.sealer.start()
        self.dispatcher.start()

    def _start_miner(self) -> Any:
        # The engine (llama.cpp) is imported only when a miner runs, so `--no-miner`
        # coordinators and the CLI's other commands start without loading it.
        from aitbc_node.builtin_miner import BuiltinMiner
        from aitbc_node.engine import Engine, EngineError, default_gpu_layers, device_info

        gpu_layers = self.settings.gpu_layers
        if gpu_layers is None:
            gpu_layers = default_gpu_layers()
        # Ask for the devices before loading any model: the order checked on a CUDA machine
        # (after a load there, the node once crashed at start; see the README's GPU section).
        gpu_info = device_info(gpu_layers)
        try:
            engines = {
                m.name: Engine(
                    m,
                    gpu_layers=gpu_layers,
                    context=self.settings.context,
                    threads=self.settings.threads,
                    parallel=self.settings.parallel,
                )
                for m in self.settings.models
            }
        except EngineError as e:
            raise StartupError(str(e)) from e
        miner = BuiltinMiner(
            keys.BUILTIN_MINER_ID,
            engines,
            gpu_info,
            self.jobs,
            self.miners,
            self.signals,
        )
        miner.start()
        return miner

    def stop(self) -> None:
        """Stop the miner (its job goes back to the queue), the reaper, seal what is left, and
        close the store."""
        if self.miner is not None:
            self.miner.stop()
        self.reaper.stop()
        self.sealer.stop()
        self.dispatcher.stop()
        self.store.close()

    def health(self) -> dict[str, Any]:
        """What `GET /api/health` shows."""
        miner: dict[str, Any] = {"state": "disabled"}
        loops = {
            "lease_reaper": self.reaper.status(),
            "block_sealer": self.sealer.status(),
            "webhook_dispatcher": self.dispatcher.status(),
        }
        if self.miner is not None:
            loops["miner"] = self.miner.status()
            current_jobs = self.miner.current_jobs
            miner = {
                "state": self.miner.state,
                "miner_id": self.miner.miner_id,
                "models": sorted(self.miner.engines),
                "current_job": next(iter(current_jobs), None),
                "current_jobs": current_jobs,
                "parallel": {name: e.parallel for name, e in self.miner.engines.items()},
                "gpu_info": self.miner.gpu_info,
            }
            if miner["state"] == "stopped":
                miner["reason"] = loops["miner"].get("reason")
        served = self.miners.served_models()
        return {
            "status": "ok",
            "version": __version__,
            "models": served,
            # What clients use when they name no model: this node's own first model, which
            # cannot vanish with a remote miner.
            "default_model": self.jobs.default_model(),
            "aliases": dict(self.settings.rules.aliases),
            "miner": miner,
            # Each background loop: running, retrying (its last pass failed) or stopped (its
            # thread died and is restarted after a backoff), with its last error.
            "loops": loops,
            "node": self.identity(),
        }

    def identity(self) -> dict[str, Any]:
        """The node's public key: what verifiers pin to check its receipts and blocks."""
        return {
            "public_key": self.key.public_key_hex,
            "key_id": self.key.key_id,
            "address": self.key.address,
        }

    def describe(self) -> dict[str, Any]:
        """What `GET /api/v1/node` shows: identity, version, chain and pricing settings."""
        height = self.store.read().one("SELECT max(height) AS h FROM blocks")
        pricing = self.settings.pricing
        return {
            **self.identity(),
            "version": __version__,
            "height": height["h"] if height else None,
            "block_interval_seconds": self.settings.block_interval,
            "block_max_items": self.settings.block_max_items,
            "unit": "nAIT (1 AIT = 1,000,000,000 nAIT)",
            "price_per_token": {
                "default": pricing.default_per_token,
                **pricing.per_model,
            },
            "client_grant": pricing.grant,
            "require_funds": self.settings.rules.require_funds,
        }

    def explorer_html(self) -> str:
        """The page served at `/`: one self-contained file shipped inside the package."""
        return (resources.files("aitbc_node") / "static" / "explorer.html").read_text()
