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


def _variant(instructions, exp2=0, tags=(), generic=0, overhead=0):
    return {"instructions": instructions, "exp2": exp2, "elements_per_iteration": 256,
            "per_element": instructions / 256, "exp2_per_element": exp2 / 8, "tags": list(tags),
            "generic_memory": generic, "item_overhead": overhead}


def test_the_planned_sweep_variant_and_its_item_overhead():
    walk = _variant(59, tags=["dot"], overhead=54)
    one_slice = _variant(59, tags=["dot", "one-slice"], overhead=37)
    workspace = _variant(59, tags=["dot"], generic=8, overhead=90)
    no_dot = _variant(42, overhead=49)
    recompute = _variant(113, exp2=8, generic=8, overhead=87)
    variants = [walk, one_slice, workspace, no_dot, recompute]

    got = sass_budget.steady_state(variants, "sweep-classes", True, True, rows_per_item=1, slices=1)
    assert got["item_overhead"] == 37 and got["per_element"] == (59 + 37) / 256
    got = sass_budget.steady_state(variants, "sweep-classes", True, True, rows_per_item=4, slices=2)
    assert got["item_overhead"] == 54 and got["per_element"] == (59 + 54 / 4) / 256
    got = sass_budget.steady_state(variants, "sweep-classes", True, False, rows_per_item=4, slices=2)
    assert got["item_overhead"] == 90
    got = sass_budget.steady_state(variants, "sweep-classes", False, False, rows_per_item=4, slices=2)
    assert got["exp2"] == 8

    # The cached exponential pass: the variant without the dot (it moved to the sweep).
    exp_variants = [_variant(67, exp2=8, tags=["dot"]), _variant(33, exp2=8)]
    assert sass_budget.steady_state(exp_variants, "ce-classes-exp", True)["instructions"] == 33
