"""Facts about the architectures whose libraries tvm-compress runs here with the deploy runner.

Per architecture: the qemu-user emulator and the sysroot it runs guests against, the cross
compiler, the TVM target test models are compiled for, the PyPI wheel platform of its TVM runtime
and the ELF header fields of its libraries; each tool with the Debian package that provides it, so
that errors can name it.
"""

from __future__ import annotations

from tvm_compress.errors import TargetError

__all__ = ["QEMU_ARCHES", "arch_facts"]

# "target" is the TVM target (JSON dict) we compile test models for; "elf_machine" is the
# e_machine field of the ELF header of a library for that architecture.
QEMU_ARCHES: dict[str, dict] = {
    "aarch64": {
        "qemu": "qemu-aarch64",
        "qemu_package": "qemu-user",
        "sysroot": "/usr/aarch64-linux-gnu",
        "loader": "lib/ld-linux-aarch64.so.1",
        "sysroot_package": "libc6-arm64-cross",
        "cxx": "aarch64-linux-gnu-g++",
        "cxx_package": "g++-aarch64-linux-gnu",
        "mtriple": "aarch64-linux-gnu",
        "target": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]},
        "wheel_platform": "manylinux_2_28_aarch64",
        "elf_machine": 183,  # EM_AARCH64
        "elf_class": 2,  # 64-bit
    },
    "armv7": {
        "qemu": "qemu-arm",
        "qemu_package": "qemu-user",
        "sysroot": "/usr/arm-linux-gnueabihf",
        "loader": "lib/ld-linux-armhf.so.3",
        "sysroot_package": "libc6-armhf-cross",
        "cxx": "arm-linux-gnueabihf-g++",
        "cxx_package": "g++-arm-linux-gnueabihf",
        "mtriple": "armv7a-linux-gnueabihf",
        "target": {
            "kind": "llvm",
            "mtriple": "armv7a-linux-gnueabihf",
            "mattr": ["+neon"],
            "mfloat-abi": "hard",
        },
        # No armv7 wheel of apache-tvm / apache-tvm-ffi exists: the runtime is built from source.
        "wheel_platform": None,
        "elf_machine": 40,  # EM_ARM
        "elf_class": 1,  # 32-bit
    },
    "x86_64": {
        "qemu": None,  # runs natively
        "qemu_package": None,
        "sysroot": None,
        "loader": None,
        "sysroot_package": None,
        "cxx": "g++",
        "cxx_package": "g++",
        "mtriple": "x86_64-linux-gnu",
        "target": {"kind": "llvm", "mtriple": "x86_64-linux-gnu"},
        "wheel_platform": None,  # uses the installed (host) wheels
        "elf_machine": 62,  # EM_X86_64
        "elf_class": 2,
    },
}


def arch_facts(arch: str) -> dict:
    """The facts of ``arch``; TargetError naming the known ones for any other."""
    facts = QEMU_ARCHES.get(arch)
    if facts is None:
        raise TargetError(f"unknown architecture {arch!r}: expected one of {', '.join(QEMU_ARCHES)}")
    return facts
