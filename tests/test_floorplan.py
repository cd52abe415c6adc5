# amaranth: UnusedElaboratable=no
"""tandem/floorplan.py and what rtl/core.py derives from it: stage counts, the reset tree, the
placement the Vitis flow constrains, and the rule that fixed-latency neighbours share an SLR."""

from __future__ import annotations

import functools
import itertools

import pytest

from tandem.floorplan import BLOCKS, FLAT, U55C, Floorplan, floorplan, for_geometry
from tandem.geometry import geometry


def test_u55c_plan():
    """The HBM side (DMA, shell) in SLR0, the MPU, controller and program fetch in SLR1, the
    VBUF and its fixed-latency users in SLR2; two stages per boundary, one on each side."""
    assert {b for b in BLOCKS if U55C.slr[b] == 0} == {"shell", "dma"}
    assert {b for b in BLOCKS if U55C.slr[b] == 1} == {"ctrl", "mpu", "fetch"}
    assert U55C.stages("dma", "mpu") == 2 and U55C.stage_slrs("dma", "mpu") == (0, 1)
    assert U55C.stages("store_feeder", "dma") == 4
    assert U55C.stage_slrs("store_feeder", "dma") == (2, 1, 1, 0)
    assert U55C.stages("vpu", "vbuf") == 0 and U55C.stage_slrs("vpu", "vbuf") == ()
    assert for_geometry(geometry("u55c")) is U55C
    assert for_geometry(geometry("tiny")) is FLAT and FLAT.flat and not U55C.flat


def test_reset_tree_depth_is_equal_everywhere():
    """Every SLR's branch has the same length, crossing from the shell's SLR with the stream
    stage rule, so every block leaves reset in the same cycle."""
    for plan in (U55C, FLAT, U55C_3):
        lengths = {len(plan.reset_branch_slrs(s)) for s in plan.slrs}
        assert lengths == {plan.reset_depth - plan.reset_stages}
        for s in plan.slrs:
            branch = plan.reset_branch_slrs(s)
            assert branch[-1] == s and branch[0] == plan.slr["shell"]
            assert all(abs(a - b) <= 1 for a, b in itertools.pairwise(branch))
    assert U55C.reset_depth == 7 and FLAT.reset_depth == 2


U55C_3 = Floorplan(name="three", slr=dict(U55C.slr), stages_per_boundary=3, reset_stages=1)


def test_stage_split_and_triangle_rule():
    """Stages split with the extra one on the near side; for every three blocks the stages
    from a to c are at most those from a to b plus b to c (DecodeCore's busy flags rely on
    it: docs/floorplan.md)."""
    assert U55C_3.stage_slrs("dma", "vpu") == (0, 0, 1, 1, 1, 2)
    for plan in (U55C, U55C_3):
        for a in BLOCKS:
            for b in BLOCKS:
                for c in BLOCKS:
                    assert plan.stages(a, c) <= plan.stages(a, b) + plan.stages(b, c)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"slr": {**U55C.slr, "mpu": 3}}, "block 'mpu' in SLR 3"),
        ({"slr": {k: v for k, v in U55C.slr.items() if k != "vpu"}}, "missing \\['vpu'\\]"),
        ({"slr": {**U55C.slr, "gpu": 0}}, "unknown \\['gpu'\\]"),
        ({"stages_per_boundary": -1}, "stages_per_boundary must be an int >= 0"),
        ({"reset_stages": 0}, "reset_stages must be at least 1"),
    ],
)
def test_bad_plans_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        Floorplan(**{"name": "bad", "slr": dict(U55C.slr), **change})
    with pytest.raises(ValueError, match="unknown floorplan 'nope'"):
        floorplan("nope")


def test_fixed_latency_neighbours_must_share_an_slr():
    from tandem.rtl.core import DecodeCore, check_floorplan

    split = Floorplan(name="split", slr={**U55C.slr, "vpu": 1})
    with pytest.raises(ValueError, match=r"\('vbuf', 'vpu'\).*fixed-latency"):
        check_floorplan(split)
    with pytest.raises(ValueError, match="fixed-latency"):
        DecodeCore(geometry("tiny"), floorplan=split)
    with pytest.raises(TypeError, match=r"tandem\.floorplan\.Floorplan"):
        DecodeCore(geometry("tiny"), floorplan="u55c")


@functools.cache
def _instances(plan: Floorplan) -> frozenset[str]:
    """Every instance path of the tiny core built with ``plan``, from its elaborated design."""
    from amaranth.hdl import Fragment

    from tandem.rtl.core import DecodeCore

    paths = set()

    def walk(fragment, prefix):
        for sub, name, _ in fragment.subfragments:
            path = f"{prefix}{name}"
            paths.add(path)
            walk(sub, f"{path}/")

    walk(Fragment.get(DecodeCore(geometry("tiny"), floorplan=plan), None), "")
    return frozenset(paths)


@pytest.mark.core  # elaborates the whole (tiny) core: about a minute
def test_placement_names_every_stage_of_the_design():
    """What the flow places exists in the elaborated core, and every relay stage, delay
    register and reset register of the core is placed: the names cannot drift apart."""
    from tandem.rtl.core import placement, sll_pairs

    inst = _instances(U55C)
    placed = dict(placement(U55C))
    assert len(placed) == len(placement(U55C))  # each once
    assert set(placed) <= inst, sorted(set(placed) - inst)
    top = {p.split("/")[0] for p in inst}
    staged = {
        p for p in inst if p.count("/") == 1 and p.split("/")[0] in top
        and ("/stage" in p or p.endswith("/fifo"))
        and p.split("/")[0].startswith(("xing_", "delay_", "rst_"))
    }  # fmt: skip
    assert staged == {p for p in placed if "/" in p}
    assert set(BLOCKS) <= set(placed)
    for a, b in sll_pairs(U55C):
        assert placed[a] != placed[b] and abs(placed[a] - placed[b]) == 1
    assert ("xing_tiles/stage0", 0) in placement(U55C)
    assert ("xing_tiles/stage1", 1) in placement(U55C)
    assert ("xing_tiles/fifo", 1) in placement(U55C)  # the far end's buffer, beside the MPU
    # relay hops are plain register pairs too (items one way, acknowledgements the other)
    assert ("xing_tiles/stage0", "xing_tiles/stage1") in sll_pairs(U55C)


@pytest.mark.core  # elaborates the whole (tiny) core
def test_control_port_waits_for_the_reset_tree():
    """No s_axi_control handshake from the cycle after ap_rst_n is low until every block is
    out of reset (reset_depth cycles after it rises): a write the shell took in reset would
    never be answered. Then a write is taken and answered."""
    from amaranth.sim import Simulator

    from tandem.rtl.core import DecodeCore

    core = DecodeCore(geometry("tiny"), floorplan=U55C)
    bus = core.s_axi_control
    seen = []

    async def bench(ctx):
        ctx.set(core.ap_rst_n, 0)
        for cyc in range(30):
            if cyc == 8:
                ctx.set(core.ap_rst_n, 1)
            for name, value in (("awvalid", 1), ("awaddr", 8), ("wvalid", 1), ("wdata", 1),
                                ("wstrb", 0xF), ("bready", 1)):  # fmt: skip
                ctx.set(getattr(bus, name), value)
            seen.append((ctx.get(bus.awready), ctx.get(bus.wready), ctx.get(bus.arready),
                         ctx.get(bus.bvalid)))  # fmt: skip
            ctx.set(core.ap_clk, 1)
            await ctx.delay(2e-9)
            ctx.set(core.ap_clk, 0)
            await ctx.delay(2e-9)

    sim = Simulator(core)
    sim.add_testbench(bench)
    sim.run()
    open_at = 8 + U55C.reset_depth
    assert all(s[:3] == (0, 0, 0) and s[3] == 0 for s in seen[1:open_at])
    assert seen[open_at][:2] == (1, 1)  # the write is taken ...
    assert any(s[3] for s in seen[open_at + 1 : open_at + 4])  # ... and answered
