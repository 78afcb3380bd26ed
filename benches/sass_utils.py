"""SASS analysis without a GPU: compile, disassemble, find the steady-state loops, count them.

Used by benches/sass_budget.py for the CUDA kernels (csrc/cuda) and for the Triton kernels compiled
ahead of time. Everything works on files (cubins) and text, so it runs wherever the CUDA tools run
(nvcc for the .cu files; nvdisasm / cuobjdump, which Triton's wheel also ships, for any cubin).

Vocabulary:
  * an instruction is one SASS line (`/*0a30*/ @!P0 FFMA R4, R5, R6, R4 ;`); executed by a warp it
    is one warp-instruction;
  * a loop is the range [target, branch] of a backward branch; an innermost loop contains no other
    loop: that is the steady state a kernel spends its time in;
  * per element: a loop's instructions / (32 lanes x elements each lane handles per iteration),
    i.e. warp-instructions per logit element (issue 9's budget: <= 0.5 for bf16, <= 1.0 for fp32)
    and likewise MUFU.EX2 per element (budget: 1);
  * a shared-memory wavefront is one 128-byte pass of the shared-memory pipe (32 banks x 4 bytes),
    which serves one per SM-clock: a warp's LDS / STS of 4 bytes or less per lane (a broadcast too)
    is one, of 8 bytes two, of 16 bytes four, with no bank conflict (the kernels pad their lines).

Loops are tied to the source by line info (compile with -lineinfo): a loop "is" the loop whose
source lines carry a marker comment `SASS_LOOP(name, elements)` (see find_marked_loops), so the
normalisation comes from the source, not from a guess about the loads. Where one marked loop compiles
to variants that differ by an optional part (a template flag), a `SASS_TAG(tag)` comment on a line
of that part tags the variants whose line info reaches it (loop_tags).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from pathlib import Path

WARP = 32

# Issue 9's budget for a bandwidth-bound stage-2 kernel on an H200 (4.3 TB/s copy bandwidth, 132
# SMs at 1.98 GHz, 4 warp-instructions issued per SM-clock): warp-instructions per logit element
# summed over a kernel's passes, by the logits' element size; and exponentials per element.
BUDGET_PER_ELEMENT = {2: 0.5, 4: 1.0, 8: 2.0}
BUDGET_EXP2_PER_ELEMENT = 1.0
# The same elements per SM-clock against the shared-memory pipe: one wavefront per SM-clock where the
# budget above counts 4 issued warp-instructions, so 1/4 of it (0.125 per bf16 element, 0.25 fp32).
ISSUE_PER_CLOCK = 4
WAVEFRONT_BYTES = 128
BUDGET_SHARED_WAVEFRONTS_PER_ELEMENT = {k: v / ISSUE_PER_CLOCK for k, v in BUDGET_PER_ELEMENT.items()}
SHARED_MEMORY_OPS = ("LDS", "STS", "ATOMS")
# The arithmetic of a loop: the floating-point pipes' math (fp32, fp64, fp16x2), the MUFU (exp2,
# reciprocal), conversions, and the integer-pipe unpacking of 16-bit logits to fp32 (found by line
# info: instructions whose inline frames reach a line tagged SASS_TAG(convert)). What a loop issues
# beyond it is overhead: loads and stores, addresses, loop control, predicates and selects. With the
# math in fp32 and one exponential per element, the arithmetic per element is a floor for the loop's
# instruction count that no scheduling of the same math removes.
ARITHMETIC_OPS = frozenset({"FFMA", "FMUL", "FADD", "FMNMX", "MUFU", "F2F", "F2FP", "HADD2", "HMUL2", "HFMA2",
                            "DFMA", "DMUL", "DADD", "DMNMX"})
CONVERT_TAG = "convert"

_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:(@!?U?P[T0-9]+)\s+)?([A-Z][A-Z0-9_.]*)\s*(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_FUNC = re.compile(r"^\s*(?:Function\s*:\s*(\S+)|\.text\.(\S+):)\s*$")
_LINE = re.compile(r'(?:File|inlined at) "([^"]*)", line (\d+)')
_TARGET = re.compile(r"`\((\.L_x_\d+)\)|\b0x([0-9a-f]+)\b")
_MARKER = re.compile(r"SASS_LOOP\(\s*([\w\-]+)\s*,\s*(\w+)\s*\)")
_TAG = re.compile(r"SASS_TAG\(\s*([\w\-]+)\s*\)")


@dataclasses.dataclass
class Instruction:
    offset: int
    predicate: str | None
    opcode: str  # with modifiers, e.g. "LDS.U.128"
    operands: str
    lines: tuple[tuple[str, int], ...] = ()  # (file, line), innermost inline frame first

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def shared_wavefronts(self) -> int:
        """Wavefronts of a shared-memory access by a full warp without bank conflicts (0 otherwise)."""
        if self.base not in SHARED_MEMORY_OPS:
            return 0
        modifiers = self.opcode.split(".")[1:]
        width = 16 if "128" in modifiers else 8 if "64" in modifiers else 4
        return max(1, width * WARP // WAVEFRONT_BYTES)


@dataclasses.dataclass
class Loop:
    start: int  # index into Function.instructions of the branch target
    end: int  # index of the backward branch
    instructions: list[Instruction]
    innermost: bool = True

    def count(self, opcode_prefix: str) -> int:
        return sum(1 for i in self.instructions if i.opcode.startswith(opcode_prefix))

    @property
    def exp2(self) -> int:
        return self.count("MUFU.EX2")

    @property
    def source_lines(self) -> set[tuple[str, int]]:
        return {frame for i in self.instructions for frame in i.lines}

    @property
    def shared_wavefronts(self) -> int:
        return sum(i.shared_wavefronts for i in self.instructions)

    def per_element(self, elements_per_lane: float, convert_lines: frozenset = frozenset()) -> dict:
        """Warp-instructions, exponentials, shared-memory wavefronts and arithmetic (see
        arithmetic_count; convert_lines from conversion_lines) per element for elements_per_lane
        per iteration."""
        n = len(self.instructions)
        arithmetic = arithmetic_count(self.instructions, convert_lines)
        return {
            "instructions": n,
            "exp2": self.exp2,
            "shared_wavefronts": self.shared_wavefronts,
            "arithmetic": arithmetic,
            "elements_per_iteration": elements_per_lane * WARP,
            "per_element": n / (elements_per_lane * WARP),
            "exp2_per_element": self.exp2 / elements_per_lane,
            "shared_wavefronts_per_element": self.shared_wavefronts / (elements_per_lane * WARP),
            "arithmetic_per_element": arithmetic / (elements_per_lane * WARP),
        }


@dataclasses.dataclass
class Function:
    name: str
    instructions: list[Instruction]
    loops: list[Loop]

    @property
    def innermost_loops(self) -> list[Loop]:
        return [loop for loop in self.loops if loop.innermost]


def find_tool(name: str) -> str | None:
    """A CUDA binary tool: $PATH, $CUDA_HOME/bin, /usr/local/cuda/bin, then Triton's bundled copy."""
    found = shutil.which(name)
    if found:
        return found
    candidates = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", name)]
    try:
        import importlib.util

        spec = importlib.util.find_spec("triton")
        if spec and spec.submodule_search_locations:
            for root in spec.submodule_search_locations:
                candidates.append(os.path.join(root, "backends", "nvidia", "bin", name))
    except (ImportError, ValueError):
        pass
    return next((c for c in candidates if os.path.isfile(c) and os.access(c, os.X_OK)), None)


def demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return list(names)
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
    return out[: len(names)] if len(out) >= len(names) else list(names)


def compile_cubin(source: str | Path, out: str | Path, arch: str = "sm_90", flags: list[str] | None = None,
                  nvcc: str | None = None, timeout: float = 900) -> str:
    """nvcc -cubin with -lineinfo and -Xptxas -v; returns ptxas' log (for parse_ptxas_log)."""
    nvcc = nvcc or find_tool("nvcc")
    if nvcc is None:
        raise FileNotFoundError("nvcc not found")
    cmd = [nvcc, "-cubin", f"-arch={arch}", "-lineinfo", "-Xptxas", "-v", *(flags or []), str(source), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout + proc.stderr


def parse_ptxas_log(text: str) -> dict[tuple[str, str], dict]:
    """{(mangled name, arch): {registers, stack, spill_stores, spill_loads, smem, barriers}} from -Xptxas -v."""
    result: dict[tuple[str, str], dict] = {}
    current = None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for '(sm_\w+)'", line)
        if m:
            current = (m.group(1), m.group(2))
            result[current] = {"registers": 0, "stack": 0, "spill_stores": 0, "spill_loads": 0, "smem": 0, "barriers": 0}
            continue
        if current is None:
            continue
        info = result[current]
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            info["stack"], info["spill_stores"], info["spill_loads"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            info["registers"] = int(m.group(1))
            b = re.search(r"used (\d+) barriers", line)
            info["barriers"] = int(b.group(1)) if b else 0
            s = re.search(r"(\d+) bytes smem", line)
            info["smem"] = int(s.group(1)) if s else 0
    return result


def resource_usage(cubin: str | Path) -> dict[str, dict]:
    """{mangled name: {registers, stack, smem, local}} from `cuobjdump -res-usage` (any cubin, e.g. Triton's)."""
    tool = find_tool("cuobjdump")
    if tool is None:
        raise FileNotFoundError("cuobjdump not found")
    text = subprocess.run([tool, "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
    result = {}
    for name, body in re.findall(r"Function (\S+):\s*\n\s*(REG:.*)", text):
        fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", body))
        result[name] = {"registers": int(fields.get("REG", 0)), "stack": int(fields.get("STACK", 0)),
                        "smem": int(fields.get("SHARED", 0)), "local": int(fields.get("LOCAL", 0))}
    return result


def disassemble(cubin: str | Path) -> str:
    """SASS of every function in the cubin, with labels and (inlined) line info where compiled with -lineinfo."""
    tool = find_tool("nvdisasm")
    if tool is not None:
        return subprocess.run([tool, "-c", "-gi", str(cubin)], capture_output=True, text=True, check=True).stdout
    tool = find_tool("cuobjdump")
    if tool is None:
        raise FileNotFoundError("neither nvdisasm nor cuobjdump found")
    return subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout


def parse_sass(text: str) -> dict[str, Function]:
    """Functions of nvdisasm (labels, `(.L_x_N)` targets) or cuobjdump -sass (hex targets) output."""
    raw: dict[str, tuple[list[Instruction], dict[str, int]]] = {}
    name = None
    lines: tuple[tuple[str, int], ...] = ()
    pending_labels: list[str] = []
    fresh_lines = True  # the next //## line starts a new chain (an instruction came in between)
    for line in text.splitlines():
        m = _FUNC.match(line)
        if m:
            name = m.group(1) or m.group(2)
            raw[name] = ([], {})
            lines, pending_labels, fresh_lines = (), [], True
            continue
        if name is None:
            continue
        if "//##" in line:
            # An inline chain spans consecutive comment lines, innermost frame first.
            if fresh_lines:
                lines, fresh_lines = (), False
            lines += tuple((f, int(n)) for f, n in _LINE.findall(line))
            continue
        m = _LABEL.match(line)
        if m:
            pending_labels.append(m.group(1))
            continue
        m = _INSTR.match(line)
        if m:
            instrs, labels = raw[name]
            for label in pending_labels:
                labels[label] = len(instrs)
            pending_labels = []
            instrs.append(Instruction(int(m.group(1), 16), m.group(2), m.group(3), m.group(4), lines))
            fresh_lines = True
    return {n: Function(n, instrs, find_loops(instrs, labels)) for n, (instrs, labels) in raw.items()}


def _branch_target(instr: Instruction, labels: dict[str, int], by_offset: dict[int, int]) -> int | None:
    if instr.base not in ("BRA", "JMP", "BRX"):
        return None
    m = _TARGET.search(instr.operands)
    if not m:
        return None
    if m.group(1):
        return labels.get(m.group(1))
    return by_offset.get(int(m.group(2), 16))


def find_loops(instrs: list[Instruction], labels: dict[str, int]) -> list[Loop]:
    """Backward branches as loops; a loop is innermost when no other loop lies strictly inside it."""
    by_offset = {i.offset: k for k, i in enumerate(instrs)}
    spans = []
    for k, instr in enumerate(instrs):
        target = _branch_target(instr, labels, by_offset)
        if target is not None and target <= k:
            spans.append((target, k))
    # One loop per header: several back edges to one target (continue paths) form one loop.
    merged: dict[int, int] = {}
    for start, end in spans:
        merged[start] = max(end, merged.get(start, end))
    # A lone `BRA self` is the trap loop after EXIT, not work.
    loops = [Loop(s, e, instrs[s : e + 1]) for s, e in sorted(merged.items()) if e > s]
    for loop in loops:
        loop.innermost = not any(
            o is not loop and loop.start <= o.start and o.end <= loop.end and (o.start, o.end) != (loop.start, loop.end)
            for o in loops
        )
    return loops


def enclosing_loop(func: Function, loop: Loop) -> Loop | None:
    """The smallest loop of func that strictly contains `loop` (None at the top level)."""
    outer = [o for o in func.loops
             if o.start <= loop.start and loop.end <= o.end and (o.start, o.end) != (loop.start, loop.end)]
    return min(outer, key=lambda o: o.end - o.start, default=None)


def find_marked_loops(func: Function, source: str | Path, markers: dict[int, tuple[str, str]] | None = None):
    """[(marker name, elements expression, Loop)]: each innermost loop whose line info reaches a
    source line carrying `SASS_LOOP(name, elements)` in `source` (matched by file name)."""
    markers = markers if markers is not None else source_markers(source)
    base = os.path.basename(str(source))
    found = []
    for loop in func.innermost_loops:
        hit = {markers[n] for f, n in loop.source_lines if os.path.basename(f) == base and n in markers}
        for name, elements in sorted(hit):
            found.append((name, elements, loop))
    return found


def source_markers(source: str | Path) -> dict[int, tuple[str, str]]:
    """{line number: (name, elements)} of the SASS_LOOP markers in a source file."""
    result = {}
    for number, text in enumerate(Path(source).read_text().splitlines(), start=1):
        m = _MARKER.search(text)
        if m:
            result[number] = (m.group(1), m.group(2))
    return result


def source_tags(source: str | Path) -> dict[int, str]:
    """{line number: tag} of the SASS_TAG markers in a source file."""
    result = {}
    for number, text in enumerate(Path(source).read_text().splitlines(), start=1):
        m = _TAG.search(text)
        if m:
            result[number] = m.group(1)
    return result


def loop_tags(loop: Loop, source: str | Path, tags: dict[int, str]) -> set[str]:
    """The SASS_TAG tags of `source` (matched by file name) whose lines the loop's line info reaches."""
    base = os.path.basename(str(source))
    return {tags[n] for f, n in loop.source_lines if os.path.basename(f) == base and n in tags}


def instruction_runs(func: Function, instrs: list[Instruction], max_gap: int = 8) -> list[list[Instruction]]:
    """instrs (a subset of func's, e.g. tagged_instructions) split into runs of nearby instructions:
    where more than max_gap other instructions of func lie between two of them, a new run starts.
    Separately compiled instances of the same source lines (template or lambda variants) are runs."""
    index = {id(i): n for n, i in enumerate(func.instructions)}
    runs: list[list[Instruction]] = []
    last = None
    for instr in sorted(instrs, key=lambda i: index[id(i)]):
        n = index[id(instr)]
        if last is None or n - last > max_gap + 1:
            runs.append([])
        runs[-1].append(instr)
        last = n
    return runs


def instruction_tags(instrs: list[Instruction], source: str | Path, tags: dict[int, str]) -> set[str]:
    """The SASS_TAG tags of `source` whose lines the instructions' line info reaches (as loop_tags)."""
    base = os.path.basename(str(source))
    return {tags[n] for i in instrs for f, n in i.lines if os.path.basename(f) == base and n in tags}


def conversion_lines(*sources: str | Path) -> frozenset[tuple[str, int]]:
    """(file name, line) of the SASS_TAG(convert) lines of the sources: the 16-bit unpacking."""
    return frozenset((os.path.basename(str(source)), n)
                     for source in sources for n, tag in source_tags(source).items() if tag == CONVERT_TAG)


def is_unpack(instr: Instruction, convert_lines: frozenset) -> bool:
    """A 16-bit -> fp32 unpacking step: a shift, mask or byte permute (or the shift as a multiply by
    2^16) whose line info reaches a SASS_TAG(convert) line. (Address arithmetic that nvcc attributes
    to those lines, LEA / IMAD of an offset, is not.)"""
    if not (instr.base in ("SHF", "LOP3", "PRMT") or (instr.base == "IMAD" and "0x10000" in instr.operands)):
        return False
    return any((os.path.basename(f), n) in convert_lines for f, n in instr.lines)


def arithmetic_count(instrs: list[Instruction], convert_lines: frozenset = frozenset()) -> int:
    """The instructions of instrs that are arithmetic (ARITHMETIC_OPS, or 16-bit unpacking)."""
    return sum(1 for i in instrs if i.base in ARITHMETIC_OPS or is_unpack(i, convert_lines))


def tagged_instructions(func: Function, source: str | Path, tags: dict[int, str], tag: str) -> list[Instruction]:
    """The instructions of func whose line info reaches a line of `source` tagged `tag`: straight-line
    code such as fully unrolled items, which no loop delimits."""
    base = os.path.basename(str(source))
    lines = {n for n, t in tags.items() if t == tag}
    return [i for i in func.instructions if any(os.path.basename(f) == base and n in lines for f, n in i.lines)]


# Per-SM limits used for blocks-per-SM (the CUDA occupancy calculator's rules).
ARCH_LIMITS = {
    "sm_80": {"regs": 65536, "smem": 167936, "smem_per_block_reserved": 1024, "threads": 2048, "blocks": 32},
    "sm_90": {"regs": 65536, "smem": 233472, "smem_per_block_reserved": 1024, "threads": 2048, "blocks": 32},
}


def blocks_per_sm(registers: int, threads: int, smem_bytes: int, arch: str = "sm_90") -> int:
    """Resident blocks per SM for a kernel's registers/thread, block size and shared bytes/block."""
    lim = ARCH_LIMITS.get(arch, ARCH_LIMITS["sm_90"])
    warps = -(-threads // WARP)
    by_threads = lim["threads"] // (warps * WARP)
    regs_per_warp = -(-max(registers, 1) * WARP // 256) * 256
    by_regs = (lim["regs"] // regs_per_warp) // warps
    by_smem = lim["smem"] // (smem_bytes + lim["smem_per_block_reserved"]) if smem_bytes else lim["blocks"]
    return max(0, min(by_threads, by_regs, by_smem, lim["blocks"]))
