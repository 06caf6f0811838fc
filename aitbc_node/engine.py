"""Inference with llama.cpp (through llama-cpp-python): the only module that imports it.

An `Engine` holds one loaded GGUF model. `generate` runs one job: a chat model gets the prompt
through the chat template stored in its GGUF file, a base model gets it as plain text. Text is
streamed out as it is produced, and `should_stop` is asked after every token, so a cancel or a
shutdown stops the work within one token.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import os
import platform
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp
from llama_cpp import _ggml
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from aitbc_node.models import ModelFile

log = logging.getLogger("aitbc_node.engine")

DEFAULT_CONTEXT = 4096


class EngineError(Exception):
    """A job this engine cannot run (prompt too long for the context, a broken model...)."""


@dataclass
class Generation:
    """What one job produced."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop", "length" or "aborted"


def gpu_offload_supported() -> bool:
    """True when this llama.cpp build has a GPU backend (CUDA, Metal, Vulkan...)."""
    return bool(llama_cpp.llama_supports_gpu_offload())


def device_info(gpu_layers: int) -> dict[str, Any]:
    """What the miner runs on, for `gpu_info` and `/api/health`: the backend in use ("gpu"
    when layers are offloaded to a GPU device, else "cpu"), the device's name and memory, and
    every device llama.cpp sees."""
    devices = _devices()
    gpus = [d for d in devices if d["type"] == "gpu"]
    on_gpu = gpu_layers != 0 and bool(gpus) and gpu_offload_supported()
    main = gpus[0] if on_gpu else {"description": _cpu_name(), "memory_total": None}
    info: dict[str, Any] = {
        "backend": "gpu" if on_gpu else "cpu",
        "name": main["description"],
        "gpu_offload_supported": gpu_offload_supported(),
        "gpu_layers": gpu_layers if on_gpu else 0,
        "devices": devices,
        "llama_cpp_version": llama_cpp.__version__,
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        "cpu": _cpu_name(),
        "cpu_threads": os.cpu_count() or 1,
    }
    if main.get("memory_total"):
        info["memory"] = f"{main['memory_total'] / 2**30:.0f}GB"
    return info


# ggml's device types (ggml-backend.h): CPU, GPU, integrated GPU, accelerator.
_DEVICE_TYPES = {0: "cpu", 1: "gpu", 2: "gpu", 3: "accel"}


def _devices() -> list[dict[str, Any]]:
    """The compute devices llama.cpp's backends see, through ggml's C API (not wrapped by
    llama-cpp-python, hence ctypes); [] if this build lacks it."""
    try:
        lib = _ggml.libggml
        lib.ggml_backend_dev_count.restype = ctypes.c_size_t
        lib.ggml_backend_dev_get.restype = ctypes.c_void_p
        lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
        for name in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
            getattr(lib, name).restype = ctypes.c_char_p
            getattr(lib, name).argtypes = [ctypes.c_void_p]
        lib.ggml_backend_dev_type.restype = ctypes.c_int
        lib.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
        lib.ggml_backend_dev_memory.restype = None
        lib.ggml_backend_dev_memory.argtypes = [
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_size_t),
            ctypes.POINTER(ctypes.c_size_t),
        ]
        llama_cpp.llama_backend_init()
        devices = []
        for i in range(lib.ggml_backend_dev_count()):
            dev = lib.ggml_backend_dev_get(i)
            free, total = ctypes.c_size_t(), ctypes.c_size_t()
            lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
            devices.append(
                {
                    "name": lib.ggml_backend_dev_name(dev).decode(errors="replace"),
                    "description": lib.ggml_backend_dev_description(dev).decode(errors="replace"),
                    "type": _DEVICE_TYPES.get(lib.ggml_backend_dev_type(dev), "other"),
                    "memory_total": total.value,
                }
            )
        return devices
    except (AttributeError, OSError):
        return []


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def default_gpu_layers() -> int:
    """Everything on the GPU where llama.cpp has a GPU backend, else the CPU."""
    return -1 if gpu_offload_supported() else 0


class Engine:
    """One loaded model."""

    def __init__(
        self,
        model: ModelFile,
        *,
        gpu_layers: int = 0,
        context: int = DEFAULT_CONTEXT,
        threads: int | None = None,
    ) -> None:
        self.model = model
        threads = threads or os.cpu_count() or 1
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(model.path),
                n_gpu_layers=gpu_layers,
                n_ctx=context,
                n_threads=threads,
                n_threads_batch=threads,
                verbose=False,
            )
        except (ValueError, RuntimeError) as e:
            raise EngineError(f"cannot load model {model.path}: {e}") from e
        self.context = self.llm.n_ctx()
        self._vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self._chat = self._chat_formatter()

    def _chat_formatter(self) -> Jinja2ChatFormatter | None:
        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            return None
        eos_id, bos_id = self.llm.token_eos(), self.llm.token_bos()
        eos = self.llm.detokenize([eos_id], special=True).decode() if eos_id != -1 else ""
        bos = self.llm.detokenize([bos_id], special=True).decode() if bos_id != -1 else ""
        return Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)

    @property
    def is_chat(self) -> bool:
        return self._chat is not None

    def prompt_tokens(self, prompt: str) -> tuple[list[int], list[str]]:
        """The tokens the model is given for `prompt`, and the stop strings its format adds."""
        if self._chat is not None:
            formatted = self._chat(messages=[{"role": "user", "content": prompt}])
            stops = formatted.stop if isinstance(formatted.stop, list) else [formatted.stop or ""]
            tokens = self.llm.tokenize(
                formatted.prompt.encode(), add_bos=not formatted.added_special, special=True
            )
            return tokens, [s for s in stops if s]
        return self.llm.tokenize(prompt.encode(), add_bos=True, special=False), []

    def generate(
        self,
        prompt: str,
        params: dict[str, Any],
        should_stop: Callable[[], bool] = lambda: False,
        on_text: Callable[[str], None] | None = None,
    ) -> Generation:
        """Run one prompt with the job's params; `on_text` receives the text as it grows.

        The loop is ours rather than `create_completion`'s: it decodes each token once
        (create_completion re-decodes the whole completion at every token), counts tokens
        exactly, and checks `should_stop` between tokens.
        """
        tokens, format_stops = self.prompt_tokens(prompt)
        room = self.context - len(tokens)
        if room < 1:
            raise EngineError(
                f"the prompt is {len(tokens)} tokens; this model's context holds {self.context}"
            )
        max_tokens = min(params["max_tokens"], room)
        stops = [*params.get("stop", []), *format_stops]
        seed = params.get("seed")
        self.llm.set_seed(seed if seed is not None else secrets.randbits(32))
        # Read the whole prompt afresh: reusing the cache of a shared prefix gives slightly
        # different logits (other batch shapes), so the same seeded request would not always
        # give the same text.
        self.llm.reset()
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text = ""
        emitted = 0  # characters of `text` already given to on_text
        completion = 0
        finish_reason = "length"
        for token in self.llm.generate(
            tokens,
            top_k=40,
            top_p=params["top_p"],
            min_p=0.05,
            temp=params["temperature"],
            repeat_penalty=1.0,
        ):
            if llama_cpp.llama_vocab_is_eog(self._vocab, token):
                finish_reason = "stop"
                break
            completion += 1
            text += decoder.decode(self.llm.detokenize([token]))
            cut = _first_stop(text, stops, emitted)
            if cut is not None:
                text = text[:cut]
                finish_reason = "stop"
                decoder.reset()
                break
            if on_text is not None:
                # Hold back a tail that could still become a stop string.
                safe = len(text) - _stop_prefix_len(text, stops)
                if safe > emitted:
                    on_text(text[emitted:safe])
                    emitted = safe
            if completion >= max_tokens:
                break
            if should_stop():
                finish_reason = "aborted"
                break
        # An incomplete UTF-8 sequence left at a length cut is dropped, not shown as U+FFFD.
        if on_text is not None and len(text) > emitted:
            on_text(text[emitted:])
        return Generation(text, len(tokens), completion, finish_reason)


def _first_stop(text: str, stops: list[str], start: int) -> int | None:
    """Where the earliest stop string begins in `text` (looking from near `start`), or None."""
    found = None
    for stop in stops:
        at = text.find(stop, max(start - len(stop), 0))
        if at != -1 and (found is None or at < found):
            found = at
    return found


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """The length of the longest tail of `text` that begins some stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest
