"""Benchmark: generation speed of the release executable (llama.cpp with run-time CPU dispatch,
built in the Debian 11 root) against .venv's native build (GGML_NATIVE, compiled for this CPU).

    .venv/bin/python tests/bench/portable_vs_native.py [--runs 5] [--tokens 256] [--threads 2]
        [--executable dist/aitbc-node]

Each run calls `selftest --tokens N --json` on both, the order swapped every other run, and
reads the tokens/s the engine measured (generation only; model loading is not counted). Both
load the same embedded model with the same threads. Prints each run, the medians and the
ratio portable / native, both of the medians and the median of each run's own ratio (aim:
0.97 or more). Run it on an idle machine; a shared one varies by 30% between runs. Not
collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def selftest(command: list[str], tokens: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        done = subprocess.run(
            [*command, "selftest", "--tokens", str(tokens), "--threads", str(threads), "--json"],
            capture_output=True,
            text=True,
            timeout=1800,
            env={"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch},
        )
    if done.returncode != 0:
        sys.exit(f"{command[0]} selftest failed:\n{done.stdout}{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="interleaved runs (5)")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per run (256)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for both (2)")
    parser.add_argument("--executable", type=Path, default=ROOT / "dist" / "aitbc-node")
    args = parser.parse_args()
    builds = {
        "portable": [str(args.executable)],
        "native": [str(ROOT / ".venv" / "bin" / "aitbc-node")],
    }
    speeds: dict[str, list[float]] = {name: [] for name in builds}
    variants = {}
    for run in range(args.runs):
        order = list(builds) if run % 2 == 0 else list(reversed(builds))
        for name in order:
            report = selftest(builds[name], args.tokens, args.threads)
            speeds[name].append(report["tokens_per_second"])
            variants[name] = report["cpu_variant"]
            print(
                f"run {run + 1} {name:8} {report['tokens_per_second']:7.1f} tokens/s "
                f"(variant {report['cpu_variant']})",
                flush=True,
            )
    portable = statistics.median(speeds["portable"])
    native = statistics.median(speeds["native"])
    # Each run measures both back to back: the ratio within a run cancels the machine's drift.
    paired = statistics.median(
        p / n for p, n in zip(speeds["portable"], speeds["native"], strict=True)
    )
    print(
        f"\n{args.tokens} tokens, {args.threads} threads, median of {args.runs} interleaved runs:"
    )
    print("| build | llama.cpp CPU backend | tokens/s |\n|---|---|---|")
    print(f"| release executable (run-time dispatch) | {variants['portable']} | {portable:.1f} |")
    print(f"| .venv (GGML_NATIVE) | {variants['native']} | {native:.1f} |")
    print(
        f"\nratio portable / native: {portable / native:.3f} of the medians, "
        f"{paired:.3f} the median of each run's ratio"
    )


if __name__ == "__main__":
    main()
