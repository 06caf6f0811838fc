"""Inference with llama.cpp (through llama-cpp-python's low-level API): the only module that
imports it.

An `Engine` holds one loaded GGUF model and one llama.cpp context with room for `parallel`
sequences, each with its own `context` tokens of KV cache. Jobs are decoded together
(continuous batching, as llama-server and vLLM do): `admit` gives a job a free sequence,
and each `step` builds one `llama_batch` with the next token of every sequence that is
generating plus a chunk of any prompt still being read (chunked prefill, so a long prompt never
stalls the others), calls `llama_decode` once, and samples each sequence with its own sampler
chain (its own temperature, top_p and seed). A sequence that finishes, or is aborted, frees its
KV cells at once, so a waiting job can take its place at the next step.

A chat model gets the prompt through the chat template stored in its GGUF file, a base model
gets it as plain text. Text is handed out as it is produced, holding back only a tail that
could still become a stop string.

An `Engine` is not thread-safe: one thread (the miner loop) drives it. llama.cpp releases the
GIL while it computes (ctypes calls do), so the API stays responsive meanwhile.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import heapq
import logging
import os
import platform
import re
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
# llama.cpp's own messages (model loading, graph details) go through llama-cpp-python's logger;
# only its errors are worth a user's terminal.
logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)

DEFAULT_CONTEXT = 4096


def _llama_lib_dir() -> Path:
    return Path(llama_cpp.__file__).parent / "lib"


def _ggml_library() -> ctypes.CDLL:
    """ggml as libllama links it: by its soname, libggml.so.0. A wheel carries copies rather
    than symlinks (libggml.so, .so.0, .so.0.x), and a copy loaded under another name is a second
    ggml with its own backend registry, empty in a build that loads its backends at run time."""
    soname = _llama_lib_dir() / "libggml.so.0"
    return ctypes.CDLL(str(soname)) if soname.exists() else _ggml.libggml


def _load_cpu_backends(ggml: ctypes.CDLL) -> None:
    """In a build with llama.cpp's run-time CPU dispatch (GGML_BACKEND_DL with
    GGML_CPU_ALL_VARIANTS, as the release executable has), the CPU backend is one
    libggml-cpu-<variant>.so per x86-64 level, and nothing computes until one is loaded: ggml
    scores each against this CPU and loads the best. They lie beside libllama in the
    executable, in site-packages/bin/ where the wheel installs them. Other builds have the CPU
    backend built in, and no such files."""
    for folder in (_llama_lib_dir(), Path(llama_cpp.__file__).parents[1] / "bin"):
        if any(folder.glob("libggml-cpu-*.so")):
            ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
            ggml.ggml_backend_load_all_from_path.restype = None
            ggml.ggml_backend_load_all_from_path(os.fsencode(folder))
            return


_GGML = _ggml_library()
_load_cpu_backends(_GGML)


class _DlPhdrInfo(ctypes.Structure):
    """The head of glibc's `struct dl_phdr_info`: all that is read of it."""

    _fields_ = (("dlpi_addr", ctypes.c_void_p), ("dlpi_name", ctypes.c_char_p))


_DL_ITERATE_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(_DlPhdrInfo), ctypes.c_size_t, ctypes.c_void_p
)


def _loaded_libraries() -> list[str]:
    """The shared objects loaded in this process, from the dynamic loader itself
    (`dl_iterate_phdr`), which needs no /proc (a chroot or sandbox may have none)."""
    names: list[str] = []

    def collect(info: Any, _size: int, _data: Any) -> int:
        if info.contents.dlpi_name:
            names.append(os.fsdecode(info.contents.dlpi_name))
        return 0

    with contextlib.suppress(AttributeError):  # a C library without it: nothing to report
        ctypes.CDLL(None).dl_iterate_phdr(_DL_ITERATE_CALLBACK(collect), None)
    return names


def cpu_variant() -> str:
    """The build of llama.cpp's CPU backend in use: the variant ggml picked for this CPU
    ("sse42", "haswell", "skylakex", "zen4", "sapphirerapids"...) in a build with run-time
    dispatch, "built-in" in one without (then it is whatever the build targeted)."""
    for name in _loaded_libraries():
        found = re.fullmatch(r"libggml-cpu-([A-Za-z0-9_]+)\.so", Path(name).name)
        if found:
            return found.group(1)
    return "built-in"


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


def repacking_allowed() -> bool:
    """Whether llama.cpp may repack weights into its extra buffer types (`use_extra_bufts`).

    Not where its CPU backend uses AMX (Sapphire Rapids and later Xeons): its AMX matrix
    multiply crashes the process (SIGSEGV in `ggml_backend_amx_mul_mat`, llama.cpp issue
    20824) on the first job. Without repacking the weights stay in plain CPU buffers, where
    the AVX-512 kernels run them. Call after `llama_backend_init`.
    """
    system_info = llama_cpp.llama_print_system_info().decode(errors="replace")
    return "AMX_INT8 = 1" not in system_info


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
        "cpu_variant": cpu_variant(),
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
        lib = _GGML
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
                    "memory_free": free.value,
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


# The most sequences one context holds: the largest --parallel accepted (llama.cpp's own
# bound is higher; each sequence adds a sampling call in Python to every step).
MAX_PARALLEL = 64
# Tokens per `llama_decode`: every generating sequence's next token, then prompt chunks.
BATCH_TOKENS = 512
# min_p as llama.cpp's own samplers default it, top_k as llama-cpp-python's generate did.
TOP_K = 40
MIN_P = 0.05
FLASH_ATTENTION = llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO


def choose_parallel(kv_bytes_per_token: int, context: int, on_gpu: bool, free_bytes: int) -> int:
    """The default number of sequences served at once: 8 on a GPU (a GPU decodes 8 sequences
    in about the time of one), 4 on a CPU (where aggregate tokens/s levels off past 4 to 8),
    halved until the KV cache (`context` tokens per sequence) takes at most a quarter of the
    memory that is free now, and never below 1."""
    parallel = 8 if on_gpu else 4
    while parallel > 1 and parallel * context * kv_bytes_per_token > free_bytes // 4:
        parallel //= 2
    return parallel


def _free_memory(on_gpu: bool) -> int:
    """Memory free now where the KV cache will live: the first GPU's, or the host's."""
    if on_gpu:
        for device in _devices():
            if device["type"] == "gpu" and device.get("memory_free"):
                return int(device["memory_free"])
    return _free_host_memory()


def _free_host_memory() -> int:
    """MemAvailable from /proc/meminfo, in bytes (a generous guess where it cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 8 * 2**30


class Sequence:
    """One job inside the batch: its prompt, its sampler, and the text it has produced."""

    def __init__(
        self,
        seq_id: int,
        tokens: list[int],
        params: dict[str, Any],
        stops: list[str],
        max_tokens: int,
        sampler: Any,
        on_text: Callable[[str], None] | None,
    ) -> None:
        self.seq_id = seq_id
        self.tokens = tokens
        self.stops = stops
        self.max_tokens = max_tokens
        self.min_tokens = min(int(params.get("min_tokens") or 0), max_tokens)
        self.ignore_eos = bool(params.get("ignore_eos"))
        self.sampler = sampler
        self.on_text = on_text
        self.read = 0  # prompt tokens already in the KV cache
        self.next_token: int | None = None  # sampled, to be decoded at the next step
        self.output_index = -1  # where this sequence's logits are in the last batch
        self.text = ""
        self.emitted = 0  # characters of `text` already given to on_text
        self.completion = 0
        self.finish_reason: str | None = None
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def prefilling(self) -> bool:
        return self.read < len(self.tokens)

    def generation(self) -> Generation:
        """What the sequence produced (so far, if it has not finished)."""
        return Generation(
            self.text, len(self.tokens), self.completion, self.finish_reason or "aborted"
        )

    def add_text(self, piece: bytes) -> bool:
        """Append one token's bytes; True when a stop string ended the text."""
        self.text += self._decoder.decode(piece)
        cut = _first_stop(self.text, self.stops, self.emitted)
        if cut is not None:
            self.text = self.text[:cut]
            return True
        if self.on_text is not None:
            # Hold back a tail that could still become a stop string.
            safe = len(self.text) - _stop_prefix_len(self.text, self.stops)
            if safe > self.emitted:
                self.on_text(self.text[self.emitted : safe])
                self.emitted = safe
        return False

    def flush(self) -> None:
        """Hand out the text held back (the sequence ended without a stop string there).
        An incomplete UTF-8 sequence left at a length cut is dropped, not shown as U+FFFD."""
        if self.on_text is not None and len(self.text) > self.emitted:
            self.on_text(self.text[self.emitted :])
            self.emitted = len(self.text)


class Engine:
    """One loaded model, serving up to `parallel` sequences at once."""

    def __init__(
        self,
        model: ModelFile,
        *,
        gpu_layers: int = 0,
        context: int = DEFAULT_CONTEXT,
        threads: int | None = None,
        parallel: int | None = None,
    ) -> None:
        self.model = model
        threads = threads or os.cpu_count() or 1
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = gpu_layers
        model_params.use_extra_bufts = repacking_allowed()
        self._model = llama_cpp.llama_model_load_from_file(str(model.path).encode(), model_params)
        if not self._model:
            raise EngineError(f"cannot load model {model.path}: llama.cpp could not read it")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        if parallel is None:
            on_gpu = gpu_layers != 0 and gpu_offload_supported()
            parallel = choose_parallel(
                self.kv_bytes_per_token(), context, on_gpu, _free_memory(on_gpu)
            )
        self.parallel = max(1, min(parallel, MAX_PARALLEL))
        context_params = llama_cpp.llama_context_default_params()
        context_params.n_ctx = context * self.parallel
        context_params.n_seq_max = self.parallel
        # Each sequence owns `context` cells: a job never runs out of room because of others.
        context_params.kv_unified = False
        context_params.n_batch = BATCH_TOKENS
        context_params.n_ubatch = BATCH_TOKENS
        context_params.n_threads = threads
        context_params.n_threads_batch = threads
        context_params.no_perf = True
        context_params.flash_attn_type = FLASH_ATTENTION
        self._ctx = llama_cpp.llama_init_from_model(self._model, context_params)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            raise EngineError(
                f"cannot load model {model.path}: no room for a context of"
                f" {context} tokens x {self.parallel} sequences"
            )
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self.context = llama_cpp.llama_n_ctx_seq(self._ctx)
        self._batch = llama_cpp.llama_batch_init(BATCH_TOKENS, 0, 1)
        self._free_ids = list(range(self.parallel))  # a heap: the lowest id is taken first
        self._running: list[Sequence] = []
        self._pieces: dict[int, bytes] = {}
        self._piece_buffer = ctypes.create_string_buffer(256)
        n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self._end_tokens = [
            t for t in range(n_vocab) if llama_cpp.llama_vocab_is_eog(self._vocab, t)
        ]
        self._chat = self._chat_formatter()

    def kv_bytes_per_token(self) -> int:
        """Bytes of KV cache one token of one sequence takes (keys and values in f16)."""
        n_layer = llama_cpp.llama_model_n_layer(self._model)
        n_embd = llama_cpp.llama_model_n_embd(self._model)
        n_head = max(llama_cpp.llama_model_n_head(self._model), 1)
        n_head_kv = llama_cpp.llama_model_n_head_kv(self._model) or n_head
        return 2 * n_layer * (n_embd // n_head * n_head_kv) * 2

    def close(self) -> None:
        """Free the context and the model (the engine cannot be used afterwards)."""
        for seq in list(self._running):
            self.abort(seq)
        if self._ctx:
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            llama_cpp.llama_model_free(self._model)
            self._ctx = None

    # -- text and tokens -------------------------------------------------------------------

    def _chat_formatter(self) -> Jinja2ChatFormatter | None:
        template = llama_cpp.llama_model_chat_template(self._model, None)
        if not template:
            return None
        eos = llama_cpp.llama_vocab_eos(self._vocab)
        bos = llama_cpp.llama_vocab_bos(self._vocab)
        return Jinja2ChatFormatter(
            template=template.decode(errors="replace"),
            eos_token=self._piece(eos, special=True).decode(errors="replace") if eos != -1 else "",
            bos_token=self._piece(bos, special=True).decode(errors="replace") if bos != -1 else "",
        )

    @property
    def is_chat(self) -> bool:
        return self._chat is not None

    def _tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode()
        room = len(data) + 8
        while True:
            buffer = (llama_cpp.llama_token * room)()
            n = llama_cpp.llama_tokenize(
                self._vocab, data, len(data), buffer, room, add_special, parse_special
            )
            if n >= 0:
                return list(buffer[:n])
            room = -n

    def _piece(self, token: int, *, special: bool = False) -> bytes:
        buffer = self._piece_buffer
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, special)
        if n < 0:
            buffer = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, -n, 0, special)
        return buffer.raw[:n]

    def prompt_tokens(
        self, prompt: str, messages: list[dict[str, str]] | None = None
    ) -> tuple[list[int], list[str]]:
        """The tokens the model is given for `prompt` (or for the conversation `messages`,
        whose plain transcript `prompt` then is), and the stop strings its format adds.

        A chat model gets the conversation, or the prompt as one user turn, through its chat
        template; a model without one gets the plain text."""
        if self._chat is not None:
            formatted = self._chat(messages=messages or [{"role": "user", "content": prompt}])
            stops = formatted.stop if isinstance(formatted.stop, list) else [formatted.stop or ""]
            tokens = self._tokenize(
                formatted.prompt, add_special=not formatted.added_special, parse_special=True
            )
            return tokens, [s for s in stops if s]
        return self._tokenize(prompt, add_special=True, parse_special=False), []

    # -- the batch -------------------------------------------------------------------------

    @property
    def free_slots(self) -> int:
        """How many more sequences `admit` takes now."""
        return len(self._free_ids)

    @property
    def running(self) -> int:
        """How many sequences are in the batch (reading their prompt or generating)."""
        return len(self._running)

    def admit(
        self,
        prompt: str,
        params: dict[str, Any],
        on_text: Callable[[str], None] | None = None,
        messages: list[dict[str, str]] | None = None,
    ) -> Sequence:
        """Give a job a free sequence; it starts at the next `step`.

        Raises EngineError when the prompt does not fit the context, and RuntimeError when
        every sequence is taken (ask `free_slots` first).
        """
        if not self._free_ids:
            raise RuntimeError("every sequence of this engine is taken")
        tokens, format_stops = self.prompt_tokens(prompt, messages)
        room = self.context - len(tokens)
        if room < 1:
            raise EngineError(
                f"the prompt is {len(tokens)} tokens; this model's context holds {self.context}"
            )
        seq = Sequence(
            heapq.heappop(self._free_ids),
            tokens,
            params,
            [*params.get("stop", []), *format_stops],
            min(params["max_tokens"], room),
            self._sampler(params),
            on_text,
        )
        self._running.append(seq)
        return seq

    def _sampler(self, params: dict[str, Any]) -> Any:
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        temperature = params["temperature"]
        if temperature <= 0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
            return chain
        seed = params.get("seed")
        if seed is None:
            seed = secrets.randbelow(2**32 - 1)  # 2**32 - 1 means "random" to llama.cpp
        for sampler in (
            llama_cpp.llama_sampler_init_top_k(TOP_K),
            llama_cpp.llama_sampler_init_top_p(params["top_p"], 1),
            llama_cpp.llama_sampler_init_min_p(MIN_P, 1),
            llama_cpp.llama_sampler_init_temp(temperature),
            llama_cpp.llama_sampler_init_dist(seed),
        ):
            llama_cpp.llama_sampler_chain_add(chain, sampler)
        return chain

    def step(self) -> list[Sequence]:
        """Decode one token of every generating sequence and a chunk of prompts; returns the
        sequences that finished (their KV cells are free again).

        Raises EngineError when llama.cpp fails the decode; the sequences in the batch are
        then in an unknown state and the caller should `abort` them all.
        """
        batch = self._batch
        # Prompt chunks are handed out in the order jobs joined (first come, first read),
        # from what the generating sequences leave of the batch.
        room = BATCH_TOKENS - sum(1 for seq in self._running if seq.next_token is not None)
        chunks: dict[int, int] = {}
        for seq in self._running:
            if room == 0:
                break
            if seq.next_token is None and seq.prefilling:
                chunks[seq.seq_id] = min(len(seq.tokens) - seq.read, room)
                room -= chunks[seq.seq_id]
        # The batch lists sequences by ascending id: llama.cpp splits a batch for a KV cache
        # of one stream per sequence into runs of consecutive ids, so this order (and the
        # lowest free id for each new job) keeps a step to one computation, two when a
        # prompt chunk is longer than a token.
        n = 0
        sampled: list[Sequence] = []
        for seq in sorted(self._running, key=lambda seq: seq.seq_id):
            if seq.next_token is not None:
                n = self._add(n, seq.next_token, len(seq.tokens) + seq.completion - 1, seq, True)
                seq.next_token = None
            elif seq.seq_id in chunks:
                chunk = seq.tokens[seq.read : seq.read + chunks[seq.seq_id]]
                for offset, token in enumerate(chunk):
                    n = self._add(n, token, seq.read + offset, seq, False)
                seq.read += len(chunk)
                if seq.prefilling:
                    continue
                batch.logits[n - 1] = 1
            else:
                continue
            seq.output_index = n - 1
            sampled.append(seq)
        if n == 0:
            return []
        batch.n_tokens = n
        status = llama_cpp.llama_decode(self._ctx, batch)
        if status != 0:
            raise EngineError(f"llama_decode failed ({status}) on a batch of {n} tokens")
        finished = []
        for seq in sampled:
            self._advance(seq)
            if seq.finished:
                finished.append(seq)
        for seq in finished:
            self._free(seq)
        return finished

    def _add(self, n: int, token: int, position: int, seq: Sequence, logits: bool) -> int:
        batch = self._batch
        batch.token[n] = token
        batch.pos[n] = position
        batch.n_seq_id[n] = 1
        batch.seq_id[n][0] = seq.seq_id
        batch.logits[n] = logits
        return n + 1

    def _advance(self, seq: Sequence) -> None:
        """Sample the sequence's next token and take it (or end the sequence)."""
        if seq.ignore_eos or seq.completion < seq.min_tokens:
            logits = llama_cpp.llama_get_logits_ith(self._ctx, seq.output_index)
            for token in self._end_tokens:
                logits[token] = -float("inf")
        token = llama_cpp.llama_sampler_sample(seq.sampler, self._ctx, seq.output_index)
        if llama_cpp.llama_vocab_is_eog(self._vocab, token):
            seq.finish_reason = "stop"
            seq.flush()
            return
        seq.completion += 1
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self._piece(token)
        if seq.add_text(piece):
            seq.finish_reason = "stop"
        elif seq.completion >= seq.max_tokens:
            seq.finish_reason = "length"
            seq.flush()
        else:
            seq.next_token = token

    def abort(self, seq: Sequence) -> Generation:
        """Take a sequence out of the batch now (cancelled, shut down, or a failed step)."""
        if seq in self._running:
            seq.finish_reason = seq.finish_reason or "aborted"
            self._free(seq)
        return seq.generation()

    def _free(self, seq: Sequence) -> None:
        self._running.remove(seq)
        llama_cpp.llama_memory_seq_rm(self._memory, seq.seq_id, -1, -1)
        llama_cpp.llama_sampler_free(seq.sampler)
        heapq.heappush(self._free_ids, seq.seq_id)

    def generate(
        self,
        prompt: str,
        params: dict[str, Any],
        should_stop: Callable[[], bool] = lambda: False,
        on_text: Callable[[str], None] | None = None,
        messages: list[dict[str, str]] | None = None,
    ) -> Generation:
        """Run one prompt to its end on its own (for tools and checks; the miner loop batches
        jobs with `admit` and `step`). `should_stop` is asked before every step."""
        seq = self.admit(prompt, params, on_text, messages)
        while not seq.finished:
            if should_stop():
                return self.abort(seq)
            try:
                self.step()
            except EngineError:
                self.abort(seq)
                raise
        return seq.generation()


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
