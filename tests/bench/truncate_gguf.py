"""Write a copy of a GGUF model that keeps only its first N transformer blocks.

    pip install gguf
    python tests/bench/truncate_gguf.py IN.gguf OUT.gguf 4

For a GPU smoke test on a machine the full file cannot be copied to: the copy's text is
nonsense, but it loads, offloads and runs the same kernels. Not collected by pytest.
"""

from __future__ import annotations

import sys

from gguf import GGUFReader, GGUFValueType, GGUFWriter


def _string(field, index: int) -> str:
    return bytes(field.parts[index]).decode("utf-8", errors="replace")


def main() -> None:
    src, dst, keep = sys.argv[1], sys.argv[2], int(sys.argv[3])
    reader = GGUFReader(src)
    arch = _string(
        reader.fields["general.architecture"], reader.fields["general.architecture"].data[0]
    )
    writer = GGUFWriter(dst, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        kind = field.types[0]
        if name == f"{arch}.block_count":
            writer.add_uint32(name, keep)
        elif kind == GGUFValueType.ARRAY and field.types[1] == GGUFValueType.STRING:
            writer.add_array(name, [_string(field, i) for i in field.data])
        elif kind == GGUFValueType.ARRAY:
            writer.add_array(name, [field.parts[i].tolist()[0] for i in field.data])
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
        writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(f"wrote {dst}: {len(kept)} tensors, {keep} blocks")


if __name__ == "__main__":
    main()
