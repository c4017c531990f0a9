"""Fail when an ELF file needs a glibc symbol version newer than the floor.

Usage: check_glibc.py FLOOR FILE...   (FILE: an ELF binary or shared object, or a wheel whose
.so files are checked). Reads the symbol version requirements (.gnu.version_r) and the dynamic
symbols that use them, and names every symbol that needs GLIBC_X.Y > FLOOR.
"""

from __future__ import annotations

import io
import sys
import zipfile
from typing import BinaryIO

from elftools.elf.elffile import ELFFile
from elftools.elf.gnuversions import GNUVerNeedSection


def version_tuple(name: str) -> tuple[int, ...]:
    return tuple(int(p) for p in name.split("_", 1)[1].split("."))


def too_new(stream: BinaryIO, floor: tuple[int, ...]) -> tuple[str, list[str]]:
    """(the newest GLIBC version needed, the symbols that need a version above the floor)."""
    elf = ELFFile(stream)
    versions: dict[int, str] = {}  # version index -> GLIBC_x.y
    for section in elf.iter_sections():
        if isinstance(section, GNUVerNeedSection):
            for _needed, aux in section.iter_versions():
                for a in aux:
                    if a.name.startswith("GLIBC_") and a.name[6:7].isdigit():
                        versions[a["vna_other"]] = a.name
    newest = max(versions.values(), key=version_tuple, default="none")
    offenders: list[str] = []
    dynsym = elf.get_section_by_name(".dynsym")
    versym = elf.get_section_by_name(".gnu.version")
    if dynsym is None or versym is None:
        return newest, offenders
    for i, sym in enumerate(dynsym.iter_symbols()):
        index = versym.get_symbol(i)["ndx"]
        if not isinstance(index, int):
            continue
        name = versions.get(index & 0x7FFF)
        if name is not None and version_tuple(name) > floor:
            offenders.append(f"{sym.name}@{name}")
    return newest, offenders


def main() -> int:
    floor_text, *files = sys.argv[1:]
    floor = tuple(int(p) for p in floor_text.split("."))
    failed = False
    for path in files:
        objects: list[tuple[str, BinaryIO]] = []
        if path.endswith(".whl"):
            with zipfile.ZipFile(path) as whl:
                for member in whl.namelist():
                    if member.endswith(".so"):
                        objects.append((f"{path}!{member}", io.BytesIO(whl.read(member))))
            if not objects:
                print(f"{path}: no extension module in the wheel", file=sys.stderr)
                failed = True
        else:
            objects.append((path, open(path, "rb")))
        for name, stream in objects:
            newest, offenders = too_new(stream, floor)
            if offenders:
                failed = True
                print(f"{name}: needs glibc newer than {floor_text}: {', '.join(offenders)}", file=sys.stderr)
            else:
                print(f"{name}: ok (newest glibc symbol version: {newest})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
