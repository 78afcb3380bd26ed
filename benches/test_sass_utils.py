"""The SASS counting of benches/sass_budget.py on a hand-written listing: loops from back edges, markers
and tags by line info, the item loop around a marked loop, and which compiled variant a plan runs."""

from __future__ import annotations

import sass_budget
import sass_utils as su

SOURCE = {10: "setup();", 20: "for (item...) {", 21: "acc += x;  // SASS_TAG(item-tag)",
          30: "for (r...) {  // SASS_LOOP(rows, V)", 31: "e = exp2(x);  // SASS_TAG(exp)"}

# nvdisasm -sass style: an item loop (.L_x_0) around a row loop (.L_x_1), with line info.
LISTING = """
.text.kern:
        //## File "/src/k.cuh", line 10
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        //## File "/src/k.cuh", line 20
        /*0010*/                   IADD3 R2, R2, 0x1, RZ ;
.L_x_1:
        //## File "/src/k.cuh", line 30
        /*0020*/                   FFMA R3, R3, R4, R5 ;
        //## File "/other/device_math.cuh", line 5
        //## inlined at "/src/k.cuh", line 31
        /*0030*/                   MUFU.EX2 R3, R3 ;
        //## File "/src/k.cuh", line 30
        /*0040*/              @P0  BRA `(.L_x_1) ;
        //## File "/src/k.cuh", line 21
        /*0050*/                   LD.E R6, desc[UR4][R8.64] ;
        /*0060*/              @P1  BRA `(.L_x_0) ;
        /*0070*/                   EXIT ;
"""


def _source(tmp_path):
    path = tmp_path / "k.cuh"
    path.write_text("\n".join(SOURCE.get(n, "") for n in range(1, 41)) + "\n")
    return path


def test_loops_markers_tags_and_the_enclosing_item_loop(tmp_path):
    source = _source(tmp_path)
    (func,) = su.parse_sass(LISTING).values()
    assert [(len(loop.instructions), loop.innermost) for loop in func.loops] == [(6, False), (3, True)]

    (found,) = su.find_marked_loops(func, source)
    name, elements, rows = found
    assert (name, elements, len(rows.instructions), rows.exp2) == ("rows", "V", 3, 1)
    assert rows.per_element(8)["per_element"] == 3 / 256

    item = su.enclosing_loop(func, rows)
    assert item is not None and len(item.instructions) == 6
    assert su.enclosing_loop(func, item) is None
    tags = su.source_tags(source)
    assert su.loop_tags(rows, source, tags) == {"exp"}  # through the inlined frame of line 31
    assert su.loop_tags(item, source, tags) == {"exp", "item-tag"}


SHARED_LISTING = """
.text.shared:
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDS.128 R4, [R2] ;
        /*0020*/                   LDS.U16 R8, [R3] ;
        /*0030*/                   LDS R9, [R3+0x4] ;
        /*0040*/                   STS.64 [R2+0x10], R4 ;
        /*0050*/                   LDG.E.128 R12, desc[UR4][R10.64] ;
        /*0060*/                   ATOMS.ADD RZ, [R3], R9 ;
        /*0070*/              @P0  BRA `(.L_x_0) ;
        /*0080*/                   EXIT ;
"""


def test_shared_memory_wavefronts():
    (func,) = su.parse_sass(SHARED_LISTING).values()
    (loop,) = func.loops
    # 16 bytes per lane: 4 wavefronts; 2 and 4 bytes (a broadcast too): 1; 8 bytes: 2; atomics on
    # shared: 1; global loads go through the L1 and are not counted as shared-memory traffic.
    assert [i.shared_wavefronts for i in loop.instructions] == [4, 1, 1, 2, 0, 1, 0]
    counts = loop.per_element(8)
    assert counts["shared_wavefronts"] == 9 and counts["shared_wavefronts_per_element"] == 9 / 256
    # One wavefront per SM-clock against 4 issued warp-instructions: the budget is a quarter of the
    # instruction budget, per element size.
    assert su.BUDGET_SHARED_WAVEFRONTS_PER_ELEMENT == {2: 0.125, 4: 0.25, 8: 0.5}
    assert sass_budget.tile_copy_wavefronts(2, grad=False) == 2 / 128
    assert sass_budget.tile_copy_wavefronts(4, grad=True) == 8 / 128
    # The model cap is the tighter of the two budgets, at most 1.
    assert sass_budget.model_cap(0.25, 0.0625, 2) == 1.0
    assert sass_budget.model_cap(1.0, 0.0625, 2) == 0.5
    assert sass_budget.model_cap(0.25, 0.5, 2) == 0.25
    assert sass_budget.model_cap(0.25, 0.5, 2, grad=True) == 0.5  # full mode moves twice the bytes


def _variant(instructions, exp2=0, tags=(), generic=0, overhead=0, wavefronts=0, overhead_wavefronts=0):
    return {"instructions": instructions, "exp2": exp2, "elements_per_iteration": 256,
            "per_element": instructions / 256, "exp2_per_element": exp2 / 8, "tags": list(tags),
            "generic_memory": generic, "item_overhead": overhead, "shared_wavefronts": wavefronts,
            "shared_wavefronts_per_element": wavefronts / 256, "item_overhead_wavefronts": overhead_wavefronts}


def test_the_planned_sweep_variant_and_its_item_overhead():
    walk = _variant(59, tags=["dot"], overhead=54, wavefronts=13, overhead_wavefronts=48)
    one_slice = _variant(59, tags=["dot", "one-slice"], overhead=37)
    workspace = _variant(59, tags=["dot"], generic=8, overhead=90)
    no_dot = _variant(42, overhead=49)
    recompute = _variant(113, exp2=8, generic=8, overhead=87)
    variants = [walk, one_slice, workspace, no_dot, recompute]

    got = sass_budget.steady_state(variants, "sweep-classes", True, True, rows_per_item=1, slices=1)
    assert got["item_overhead"] == 37 and got["per_element"] == (59 + 37) / 256
    got = sass_budget.steady_state(variants, "sweep-classes", True, True, rows_per_item=4, slices=2)
    assert got["item_overhead"] == 54 and got["per_element"] == (59 + 54 / 4) / 256
    # The item loop's shared-memory traffic (accumulators, alpha / beta) is shared by its rows too.
    assert got["shared_wavefronts_per_element"] == (13 + 48 / 4) / 256
    got = sass_budget.steady_state(variants, "sweep-classes", True, False, rows_per_item=4, slices=2)
    assert got["item_overhead"] == 90
    got = sass_budget.steady_state(variants, "sweep-classes", False, False, rows_per_item=4, slices=2)
    assert got["exp2"] == 8

    # The cached exponential pass: the variant without the dot (it moved to the sweep).
    exp_variants = [_variant(67, exp2=8, tags=["dot"]), _variant(33, exp2=8)]
    assert sass_budget.steady_state(exp_variants, "ce-classes-exp", True)["instructions"] == 33


# Three unrolled copies of a marked row loop (REG_ACC items): 2 instructions between copies.
UNROLLED_LISTING = """
.text.unrolled:
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   LDS.128 R4, [R2] ;
        /*0020*/              @P0  BRA `(.L_x_0) ;
        /*0030*/                   LDS.128 R8, [R3] ;
        /*0040*/                   FADD R9, R9, R8 ;
.L_x_1:
        /*0050*/                   LDS.128 R4, [R2+0x10] ;
        /*0060*/              @P0  BRA `(.L_x_1) ;
        /*0070*/                   LDS.128 R8, [R3+0x10] ;
        /*0080*/                   FADD R9, R9, R8 ;
.L_x_2:
        /*0090*/                   LDS.128 R4, [R2+0x20] ;
        /*00a0*/              @P0  BRA `(.L_x_2) ;
        /*00b0*/                   EXIT ;
"""


def test_unrolled_items_count_the_stride_between_copies():
    (func,) = su.parse_sass(UNROLLED_LISTING).values()
    copies = func.innermost_loops
    assert len(copies) == 3
    counts = sass_budget.unrolled_item_counts(func, list(reversed(copies)), 8)
    # Per item: the row loop (2 instructions, 4 wavefronts) and the 2 instructions (4 wavefronts)
    # before the next copy.
    assert counts["instructions"] == 2 and counts["item_overhead"] == 2
    assert counts["shared_wavefronts"] == 4 and counts["item_overhead_wavefronts"] == 4
    assert counts["unrolled_items"] == 3
    variant = dict(counts, tags=["dot", "reg-acc"])
    shared = _variant(59, tags=["dot", "one-slice"], overhead=37)
    got = sass_budget.steady_state([variant, shared], "sweep-classes", True, True, rows_per_item=1, slices=1,
                                   reg_acc=True)
    assert got["per_element"] == (2 + 2) / 256 and got["shared_wavefronts_per_element"] == (4 + 4) / 256
    got = sass_budget.steady_state([variant, shared], "sweep-classes", True, True, rows_per_item=1, slices=1)
    assert got["instructions"] == 59  # plans without register accumulators: the shared-accumulator loop


STRAIGHT_SOURCE = {5: "for (k...) {  // SASS_TAG(reg-max)", 6: "max_vector(...);  // SASS_TAG(reg-max)", 7: "x = f(z);"}
# Two unrolled copies of a vector's work (lines 6 and 7 inlined at 6), with untagged code around.
STRAIGHT_LISTING = """
.text.straight:
        //## File "/src/s.cuh", line 2
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        //## File "/src/s.cuh", line 6
        /*0010*/                   LDS.128 R4, [R2] ;
        //## File "/src/s.cuh", line 7
        //## inlined at "/src/s.cuh", line 6
        /*0020*/                   MUFU.EX2 R4, R4 ;
        //## File "/src/s.cuh", line 5
        /*0030*/                   ISETP.GE.AND P0, PT, R3, R5, PT ;
        //## File "/src/s.cuh", line 6
        /*0040*/                   LDS.128 R8, [R2+0x10] ;
        //## File "/src/s.cuh", line 7
        //## inlined at "/src/s.cuh", line 6
        /*0050*/                   MUFU.EX2 R8, R8 ;
        //## File "/src/s.cuh", line 2
        /*0060*/                   EXIT ;
"""


def test_straight_line_copies_by_tag(tmp_path):
    source = tmp_path / "s.cuh"
    source.write_text("\n".join(STRAIGHT_SOURCE.get(n, "") for n in range(1, 11)) + "\n")
    (func,) = su.parse_sass(STRAIGHT_LISTING).values()
    tagged = su.tagged_instructions(func, source, su.source_tags(source), "reg-max")
    assert [i.offset for i in tagged] == [0x10, 0x20, 0x30, 0x40, 0x50]  # untagged MOV / EXIT left out
    counts = sass_budget.straight_line_counts(tagged, copies=2, per_lane=8)
    assert counts["instructions"] == 2.5 and counts["exp2"] == 1 and counts["shared_wavefronts"] == 4
    assert counts["per_element"] == 2.5 / 256 and counts["exp2_per_element"] == 1 / 8
    # kRegAccClasses comes from csrc/cuda/plan.h, the kernel's constant.
    assert sass_budget.REG_ACC_CLASSES > 0 and sass_budget.REG_ACC_CLASSES % 8 == 0  # whole bf16 vectors


ARITH_LISTING = """
.text.arith:
.L_x_0:
        //## File "/src/math.cuh", line 3
        //## inlined at "/src/k.cuh", line 30
        /*0000*/                   SHF.L.U32 R5, R4, 0x10, RZ ;
        //## File "/src/math.cuh", line 4
        //## inlined at "/src/k.cuh", line 30
        /*0010*/                   LOP3.LUT R4, R4, 0xffff0000, RZ, 0xc0, !PT ;
        /*0018*/                   LEA R14, R7, R8, 0x2 ;
        //## File "/src/k.cuh", line 30
        /*0020*/                   IMAD R6, R7, 0x4, R8 ;
        /*0030*/                   LDS.128 R8, [R6] ;
        /*0040*/                   FFMA R5, R5, R9, R10 ;
        /*0050*/                   FMNMX R11, R11, R5, !PT ;
        /*0060*/                   MUFU.EX2 R5, R5 ;
        /*0070*/                   FSETP.GT.AND P1, PT, R5, RZ, PT ;
        /*0080*/                   HADD2.F32 R12, -RZ, R13.H0_H0 ;
        /*0090*/                   ISETP.GE.AND P0, PT, R7, R3, PT ;
        /*00a0*/              @!P0  BRA `(.L_x_0) ;
        /*00b0*/                   EXIT ;
"""


def test_arithmetic_counts_math_pipes_and_tagged_conversions(tmp_path):
    math = tmp_path / "math.cuh"
    math.write_text("\n\nlo = w << 16;  // SASS_TAG(convert)\nhi = w & 0xffff0000u;  // SASS_TAG(convert)\n")
    convert = su.conversion_lines(math)
    assert convert == {("math.cuh", 3), ("math.cuh", 4)}
    (func,) = su.parse_sass(ARITH_LISTING).values()
    (loop,) = func.loops
    # The bf16 unpack on the integer pipe (by line info), FFMA, FMNMX, MUFU and the fp16 conversion;
    # not the address LEA that line info puts on the unpack's line, the address IMAD, the shared
    # load, the compares or the branch.
    assert su.arithmetic_count(loop.instructions, convert) == 6
    assert su.arithmetic_count(loop.instructions) == 4  # without the tagged lines: the pipes' ops only
    counts = loop.per_element(8, convert)
    assert counts["arithmetic"] == 6 and counts["arithmetic_per_element"] == 6 / 256
    # The straight-line copies and the item loop's overhead count it too, per copy and per row.
    straight = sass_budget.straight_line_counts(loop.instructions, 2, 8)
    # (with the tree's conversion lines, which the listing's /src/math.cuh is not: the 4 pipe ops)
    assert straight["arithmetic"] == 4 / 2 and straight["arithmetic_per_element"] == 2 / 256
    best = sass_budget.steady_state([{**_variant(11, overhead=4), "arithmetic": 6, "item_overhead_arithmetic": 2}],
                                    "ce-classes-max", True, rows_per_item=2)
    assert best["arithmetic_per_element"] == (6 + 2 / 2) / 256


def test_the_tree_tags_the_16_bit_unpacking():
    """The conversion lines that sass_budget counts as arithmetic exist in the CUDA sources."""
    lines = sass_budget.CONVERT_LINES
    assert {name for name, _ in lines} == {"device_math.cuh"} and len(lines) >= 2


RUNS_LISTING = """
.text.runs:
        //## File "/src/k.cuh", line 21
        /*0000*/                   FFMA R1, R1, R2, R3 ;
        /*0010*/                   FFMA R1, R1, R2, R3 ;
        //## File "/src/k.cuh", line 10
        /*0020*/                   MOV R4, R5 ;
        //## File "/src/k.cuh", line 21
        /*0030*/                   FFMA R1, R1, R2, R3 ;
        //## File "/src/k.cuh", line 10
        /*0040*/                   MOV R4, R5 ;
        /*0050*/                   MOV R4, R5 ;
        /*0060*/                   MOV R4, R5 ;
        //## File "/src/k.cuh", line 21
        //## inlined at "/src/k.cuh", line 31
        /*0070*/                   MUFU.EX2 R1, R1 ;
        //## File "/src/k.cuh", line 10
        /*0080*/                   EXIT ;
"""


def test_instruction_runs_split_separate_instances(tmp_path):
    source = _source(tmp_path)
    tags = su.source_tags(source)
    (func,) = su.parse_sass(RUNS_LISTING).values()
    tagged = su.tagged_instructions(func, source, tags, "item-tag")
    assert len(tagged) == 4
    # A gap of one untagged instruction stays in the run; one of three starts a new run.
    runs = su.instruction_runs(func, tagged, max_gap=2)
    assert [len(r) for r in runs] == [3, 1]
    assert [len(r) for r in su.instruction_runs(func, tagged, max_gap=0)] == [2, 1, 1]
    assert su.instruction_tags(runs[0], source, tags) == {"item-tag"}
    assert su.instruction_tags(runs[1], source, tags) == {"item-tag", "exp"}  # through the inlined frame


def test_pixel_register_passes_are_chosen_where_the_plan_has_them():
    values = sass_budget.PIXEL_REG_VALUES
    plan = {"vec": 8, "e_cached": True, "chunk_classes": values // 8 * 64, "group": 64}
    assert sass_budget.pixel_regs(plan, pixels=True, elem=2)
    assert not sass_budget.pixel_regs({**plan, "chunk_classes": plan["chunk_classes"] + 1}, pixels=True, elem=2)
    assert not sass_budget.pixel_regs(plan, pixels=False, elem=2)
    assert not sass_budget.pixel_regs({**plan, "vec": 4}, pixels=True, elem=4)  # float logits: not compiled
    assert not sass_budget.pixel_regs({**plan, "e_cached": False}, pixels=True, elem=2)
    loop = _variant(60)
    unrolled = _variant(50, tags=["px-reg-max"])
    exp_loop, exp_dot = _variant(32), _variant(63, tags=["dot", "px-reg-exp"])
    exp_unrolled = _variant(30, tags=["px-reg-exp"])
    pick = sass_budget.steady_state
    assert pick([loop, unrolled], "ce-pixels-max", True, px_regs=True)["instructions"] == 50
    assert pick([loop, unrolled], "ce-pixels-max", True, px_regs=False)["instructions"] == 60
    # The exponential pass without the dot (dconfidence's dot is taken in the sweep).
    assert pick([exp_loop, exp_dot, exp_unrolled], "ce-pixels-exp", True, px_regs=True)["instructions"] == 30
    assert pick([exp_loop, exp_dot, exp_unrolled], "ce-pixels-exp", True, px_regs=False)["instructions"] == 32


def test_row_register_passes_only_for_one_row_reg_acc_plans():
    pick = sass_budget.steady_state
    for marker, tag in (("ce-classes-max", "reg-max"), ("ce-classes-exp", "reg-exp")):
        loop, unrolled = _variant(40), _variant(30, tags=[tag])
        assert pick([loop, unrolled], marker, True, reg_acc=True, tile_rows=1)["instructions"] == 30
        assert pick([loop, unrolled], marker, True, reg_acc=True, tile_rows=2)["instructions"] == 40
        assert pick([loop, unrolled], marker, True, reg_acc=False, tile_rows=1)["instructions"] == 40
    assert set(sass_budget.STRAIGHT_LINE) == {"reg-max", "reg-exp", "px-reg-max", "px-reg-exp"}
