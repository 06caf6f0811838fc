"""Entry point of the one-file `aitbc-node` executable (see packaging/aitbc-node.spec).

PyInstaller's one-file bootloader unpacks its whole archive into a fresh temporary directory
(`sys._MEIPASS`) at every start, inflating what it compressed. The embedded model is kept out
of that archive: build/executable.sh stores it, uncompressed, in an ELF section of its own
(`.aitbc.model`, 4 KiB aligned) placed before PyInstaller's `pydata` section. Here, before the
node starts, it is copied into `sys._MEIPASS/models/` with `copy_file_range`/`sendfile`, which
copy inside the kernel (a reflink where the file system can share blocks). That is where
`aitbc_node.models.embedded_model()` looks for it in a frozen build, and the bootloader deletes
it with the rest of that directory when the process ends.
"""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

MODEL_SECTION = b".aitbc.model"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def elf_section(path: str, wanted: bytes) -> tuple[int, int] | None:
    """(file offset, size) of the named section of a 64-bit little-endian ELF file."""
    with open(path, "rb") as f:
        header = f.read(64)
        if header[:4] != b"\x7fELF" or header[4] != 2 or header[5] != 1:
            return None
        (shoff,) = struct.unpack_from("<Q", header, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", header, 0x3A)
        f.seek(shoff)
        table = f.read(shentsize * shnum)
        sections = [
            struct.unpack_from("<IIQQQQ", table, i * shentsize) for i in range(shnum)
        ]  # name, type, flags, addr, offset, size
        _, _, _, _, names_offset, names_size = sections[shstrndx]
        f.seek(names_offset)
        names = f.read(names_size)
        for name, _, _, _, offset, size in sections:
            if names[name : names.index(b"\0", name)] == wanted:
                return offset, size
    return None


def copy_range(src: int, dst: int, offset: int, size: int) -> None:
    """Copy `size` bytes at `offset` of `src` to the start of `dst`, inside the kernel."""
    done = 0
    try:
        while done < size:
            n = os.copy_file_range(src, dst, size - done, offset + done, done)
            if n == 0:
                raise OSError("copy_file_range copied nothing")
            done += n
        return
    except OSError:
        pass  # another file system (EXDEV on Linux >= 5.19), an old kernel, a seccomp filter
    os.lseek(dst, done, os.SEEK_SET)
    while done < size:
        n = os.sendfile(dst, src, offset + done, size - done)
        if n == 0:
            raise OSError(f"{sys.executable} is shorter than its {MODEL_SECTION.decode()} section")
        done += n


def unpack_model() -> None:
    """Put the embedded model where `embedded_model()` looks for it (no-op in -nomodel)."""
    bundle = getattr(sys, "_MEIPASS", None)
    if not bundle or os.path.isfile(os.environ.get("AITBC_DEFAULT_MODEL", "")):
        return  # not frozen, or $AITBC_DEFAULT_MODEL (which embedded_model() prefers) is set
    section = elf_section(sys.executable, MODEL_SECTION)
    if section is None:
        return
    offset, size = section
    target = Path(bundle) / "models" / MODEL_FILE
    try:
        target.parent.mkdir(exist_ok=True)
        src = os.open(sys.executable, os.O_RDONLY)
        try:
            dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                copy_range(src, dst, offset, size)
            finally:
                os.close(dst)
        finally:
            os.close(src)
    except OSError as e:
        # The node still runs with --model PATH or --no-miner; say why the default is missing.
        target.unlink(missing_ok=True)
        print(
            f"aitbc-node: warning: cannot unpack the embedded model to {target}: {e}",
            file=sys.stderr,
        )


if __name__ == "__main__":
    unpack_model()

    from aitbc_node.cli import main

    sys.exit(main())
