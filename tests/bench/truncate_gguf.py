"""Write a copy of a GGUF model that keeps only its first N transformer blocks, and
optionally only the first V tokens of its vocabulary.

    pip install gguf
    python tests/bench/truncate_gguf.py IN.gguf OUT.gguf 4 [4096]

For a GPU smoke test on a machine the full file cannot be copied to: the copy's text is
nonsense, but it loads, offloads and runs the same kernels. The token embedding is most of a
small model (30 MB of SmolLM2-135M's 98), so a cut vocabulary is what makes the copy small; V
must keep the special and single-byte tokens at the start of the vocabulary, and only the BPE
merges whose parts and result are kept stay. Not collected by pytest.
"""

from __future__ import annotations

import sys

from gguf import GGUFReader, GGUFValueType, GGUFWriter

_PER_TOKEN_TENSORS = ("token_embd.weight", "output.weight")


def _string(field, index: int) -> str:
    return bytes(field.parts[index]).decode("utf-8", errors="replace")


def _merge_kept(merge: str, kept_tokens: set[str]) -> bool:
    """Whether a BPE merge ("a b") joins two kept tokens into a kept token."""
    first, _, second = merge.partition(" ")
    return first in kept_tokens and second in kept_tokens and first + second in kept_tokens


def main() -> None:
    src, dst, keep = sys.argv[1], sys.argv[2], int(sys.argv[3])
    reader = GGUFReader(src)
    arch = _string(
        reader.fields["general.architecture"], reader.fields["general.architecture"].data[0]
    )
    tokens_field = reader.fields["tokenizer.ggml.tokens"]
    n_vocab = len(tokens_field.data)
    vocab = int(sys.argv[4]) if len(sys.argv) > 4 else n_vocab
    kept_tokens = {_string(tokens_field, i) for i in tokens_field.data[:vocab]}
    writer = GGUFWriter(dst, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        kind = field.types[0]
        # Per-token arrays (tokens, types, scores) are cut to the kept vocabulary.
        per_token = name.startswith("tokenizer.ggml.") and len(field.data) == n_vocab
        items = field.data[:vocab] if per_token else field.data
        if name.endswith("_token_id") and field.parts[field.data[0]].tolist()[0] >= vocab:
            sys.exit(f"{name} is outside the first {vocab} tokens")
        if name == f"{arch}.block_count":
            writer.add_uint32(name, keep)
        elif name == f"{arch}.vocab_size":
            writer.add_uint32(name, vocab)
        elif name == "tokenizer.ggml.merges":
            merges = [_string(field, i) for i in field.data]
            writer.add_array(name, [m for m in merges if _merge_kept(m, kept_tokens)])
        elif kind == GGUFValueType.ARRAY and field.types[1] == GGUFValueType.STRING:
            writer.add_array(name, [_string(field, i) for i in items])
        elif kind == GGUFValueType.ARRAY:
            writer.add_array(name, [field.parts[i].tolist()[0] for i in items])
        elif kind == GGUFValueType.STRING:
            writer.add_string(name, _string(field, field.data[0]))
        else:
            writer.add_key_value(name, field.parts[field.data[0]].tolist()[0], kind)
    kept = [
        t
        for t in reader.tensors
        if not t.name.startswith("blk.") or int(t.name.split(".")[1]) < keep
    ]
    for tensor in kept:
        # The reader gives a tensor's rows first: one row per token for these two.
        data = tensor.data[:vocab] if tensor.name in _PER_TOKEN_TENSORS else tensor.data
        writer.add_tensor(tensor.name, data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(f"wrote {dst}: {len(kept)} tensors, {keep} blocks, {vocab} tokens")


if __name__ == "__main__":
    main()
