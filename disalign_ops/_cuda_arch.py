"""The CUDA targets of the extension build: pure Python, imported by setup.py before torch is used
(and by tests without nvcc).

Default: SASS for sm_80 (A100) and sm_90 (H100/H200), plus PTX for compute_90 so that newer GPUs
(sm_100, sm_120, ...) JIT-compile the kernels instead of failing with "no kernel image".
TORCH_CUDA_ARCH_LIST, when set and not empty, replaces the default with torch's syntax:
entries separated by ';' or spaces, each "MAJOR.MINOR" with an optional arch suffix ("9.0a",
"10.0f") and an optional "+PTX" (also embed PTX for that arch), e.g. "8.0;8.6;9.0+PTX".
"""

from __future__ import annotations

import re

DEFAULT_ARCH_LIST = "8.0;9.0+PTX"

_ENTRY = re.compile(r"(\d+)\.(\d)([af]?)(\+PTX)?")


def parse_arch_list(arch_list: str | None) -> list[str]:
    """nvcc -gencode flags for a TORCH_CUDA_ARCH_LIST value (None or blank: the default list).

    Raises ValueError naming the variable and the entry for anything else (named architectures such as
    "Ampere" included: the numbers say exactly what is built)."""
    text = arch_list if arch_list is not None and arch_list.strip() else DEFAULT_ARCH_LIST
    flags: list[str] = []
    for entry in text.replace(" ", ";").split(";"):
        if not entry:
            continue
        match = _ENTRY.fullmatch(entry)
        if match is None:
            raise ValueError(
                f"TORCH_CUDA_ARCH_LIST entry {entry!r} (in {arch_list!r}) is not MAJOR.MINOR[a|f][+PTX], "
                f"e.g. {DEFAULT_ARCH_LIST!r}"
            )
        major, minor, suffix, ptx = match.groups()
        arch = f"{major}{minor}{suffix}"
        codes = [f"sm_{arch}"] + ([f"compute_{arch}"] if ptx else [])
        for code in codes:
            flag = f"-gencode=arch=compute_{arch},code={code}"
            if flag not in flags:
                flags.append(flag)
    if not flags:
        raise ValueError(f"TORCH_CUDA_ARCH_LIST={arch_list!r} names no architecture")
    return flags


def embedded_targets(flags: list[str]) -> tuple[set[str], set[str]]:
    """(SASS targets, PTX targets) that `flags` embed, e.g. ({"sm_80", "sm_90"}, {"compute_90"}):
    what `cuobjdump --list-elf / --list-ptx` of the built library must show."""
    codes = [flag.rsplit("code=", 1)[1] for flag in flags]
    return {c for c in codes if c.startswith("sm_")}, {c for c in codes if c.startswith("compute_")}
