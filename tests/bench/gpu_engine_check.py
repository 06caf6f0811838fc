"""GPU check of the miner's engine: is llama.cpp's GPU backend found, does `--gpu-layers`
default to offloading everything, what does `gpu_info` report, and how fast is it against the
same machine's CPU?

    python tests/bench/gpu_engine_check.py MODEL.gguf

Run it where llama-cpp-python was built with CUDA (see the README's GPU section). Not
collected by pytest.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from aitbc_node.engine import Engine, default_gpu_layers, device_info, gpu_offload_supported
from aitbc_node.models import ModelFile, name_for

PARAMS = {"max_tokens": 256, "temperature": 0, "top_p": 0.95, "seed": 1, "stop": []}


def main() -> None:
    path = Path(sys.argv[1])
    model = ModelFile(name_for(path), path)
    print(
        "gpu_offload_supported:",
        gpu_offload_supported(),
        "default --gpu-layers:",
        default_gpu_layers(),
    )
    info = device_info(default_gpu_layers())
    print("gpu_info:", json.dumps({k: v for k, v in info.items() if k != "system_info"}))
    for layers in (-1, 0):
        engine = Engine(model, gpu_layers=layers)
        engine.generate("Hello", {**PARAMS, "max_tokens": 8})  # warm-up
        rates = []
        for _ in range(3):
            started = time.perf_counter()
            out = engine.generate("Count from 1 to 500, one per line.", PARAMS)
            rates.append(out.completion_tokens / (time.perf_counter() - started))
        print(
            f"gpu_layers={layers}: {out.completion_tokens} tokens, "
            f"{sorted(rates)[1]:.0f} tokens/s (median of 3)"
        )
        del engine


if __name__ == "__main__":
    main()
