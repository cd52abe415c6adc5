# amaranth: UnusedElaboratable=no
"""The decode core's glue blocks (rtl/fetch.py ProgramFetch, rtl/feeders.py MpuFeeder,
StoreFeeder, ReadPortShare, VbufWriteArbiter, CommandQueue) on Amaranth's simulator, each
against a small Python model, with random stalls on both sides of every stream (valid gaps on
the inputs, ready gaps on the outputs; ``tandem.sim.streams.bernoulli``). Every output stream is
also checked for the stream rule: once valid, it stays valid with the same payload until
taken."""

from __future__ import annotations

import itertools
import random

import pytest
from amaranth import Module
from amaranth.lib import data
from stream_models import Sink, Source, _value, run

from tandem.geometry import geometry
from tandem.numerics import BLOCK
from tandem.rtl.controller import MpuIssue, StoreIssue
from tandem.rtl.dma import ChannelRun, ReadCommand, ReadKind, StoreKind, row_write_layout
from tandem.rtl.feeders import (
    CommandQueue,
    MpuFeeder,
    ReadPortShare,
    StoreFeeder,
    VbufWriteArbiter,
)
from tandem.rtl.fetch import FETCH_CHUNK, ProgramFetch
from tandem.rtl.vpu import VectorCommand
from tandem.sim.streams import bernoulli

GEOM = geometry("tiny")
ROWS = GEOM.vbuf_elems // BLOCK  # 64 VBUF rows
FULL = (1 << BLOCK) - 1
STALLS = [0.0, 0.4]  # probability of a stall cycle on every stream (0: never)


class ReadPortModel:
    """A VBUF read port: ``data`` is the row at ``addr`` as of the last edge with ``en``."""

    def __init__(self, port, mem):
        self.port, self.mem = port, mem
        self.next = None

    def sample(self, ctx):
        self.next = self.mem[ctx.get(self.port.addr)] if ctx.get(self.port.en) else None

    def update(self, ctx):
        if self.next is not None:
            ctx.set(_value(self.port.data), self.next)


def _rows_of(n: int) -> int:
    return -(-n // BLOCK)


def _merge(old: int, new: int, mask: int) -> int:
    """A VBUF row after a write of ``new`` under the element ``mask``."""
    keep = sum(0xFFFF << (16 * i) for i in range(BLOCK) if not mask >> i & 1)
    return (old & keep) | (new & ~keep & ((1 << 16 * BLOCK) - 1))


def _rand_row(rng) -> int:
    return rng.getrandbits(16 * BLOCK)


# ---- MPU feeder -------------------------------------------------------------------------------


def _mpu_commands(rng, n):
    """Random MATVECs over the 64-row VBUF; later ones often read earlier ones' results."""
    cmds = []
    last_dst = 0
    for k in range(n):
        rows = rng.choice([1, 40, 64, 65, 130, 200])
        cols = rng.choice([1, 64, 100, 128, 256])
        live_rows = rng.choice([rows, rows, rng.randint(0, rows), 0]) if k % 7 else rows
        live_cols = rng.choice([cols, cols, rng.randint(0, cols), 0])
        bias, argmax = rng.random() < 0.5, rng.random() < 0.15
        n_cb, n_groups = _rows_of(min(live_cols, cols)), _rows_of(min(live_rows, rows))
        src = last_dst if rng.random() < 0.4 else rng.randint(0, ROWS - max(n_cb, 1))
        src = min(src, ROWS - n_cb)
        dst = rng.randint(0, ROWS - max(n_groups, 1))
        # a forwarding product (its row after the x rows; often the last results' rows)
        fwd = not argmax and n_groups and n_cb and rng.random() < 0.3
        fwd_row = last_dst if rng.random() < 0.5 else rng.randint(0, ROWS - 1)
        if not argmax and n_groups:
            last_dst = dst
        cmds.append(
            {
                "cmd": {
                    "rows": rows,
                    "cols": cols,
                    "live_rows": live_rows,
                    "live_cols": live_cols,
                    "flags": {"bias": bias, "argmax": argmax},
                    "fwd": int(bool(fwd)),
                    "fwd_index": max(min(live_rows, rows) - 1, 0),
                },
                "src_row": src,
                "dst_row": dst,
                "fwd_row": fwd_row if fwd else 0,
            }
        )
    return cmds


def _mpu_reference(cmds, mem, result_row):
    """Sequential model: each command reads its x and bias rows, then writes its results."""
    mem = list(mem)
    xs, biases, writes = [], [], []
    for k, issue in enumerate(cmds):
        c = issue["cmd"]
        lr, lc = min(c["live_rows"], c["rows"]), min(c["live_cols"], c["cols"])
        n_cb, n_groups = _rows_of(lc), _rows_of(lr)
        if n_groups == 0:
            continue
        xs += [mem[issue["src_row"] + i] for i in range(n_cb)]
        if c.get("fwd") and n_cb:
            xs.append(mem[issue["fwd_row"]])
        if c["flags"]["bias"]:
            biases += [mem[issue["dst_row"] + g] for g in range(n_groups)]
        if c["flags"]["argmax"]:
            continue
        for g in range(n_groups):
            rem = lr - g * BLOCK
            mask = FULL if rem >= BLOCK else (1 << rem) - 1
            addr, data = issue["dst_row"] + g, result_row(k, g)
            writes.append((addr, mask, data))
            mem[addr] = _merge(mem[addr], data, mask)
    return xs, biases, writes, mem


@pytest.mark.parametrize("stall", STALLS)
@pytest.mark.parametrize("seed", [1, 2])
def test_mpu_feeder(stall, seed):
    """Commands, x rows (a forwarding product's row after them), bias rows and result writes
    (address, mask, data, order) equal the sequential model, so reads after results still to
    come waited for them; a fake MPU takes
    the inputs and answers each command's result rows after a random delay."""
    rng = random.Random(seed)
    cmds = _mpu_commands(rng, 40)
    mem = [_rand_row(rng) for _ in range(ROWS)]

    def result_row(k, g):
        return random.Random(1000 * seed + 64 * k + g).getrandbits(16 * BLOCK)

    want_x, want_bias, want_writes, want_mem = _mpu_reference(cmds, mem, result_row)
    dut = MpuFeeder(GEOM)
    layout = row_write_layout(GEOM)
    issue = Source(dut.issue, [MpuIssue.const(c).as_bits() for c in cmds], stall=stall, seed=seed)
    cmd = Sink(dut.cmd, stall=stall, seed=seed + 10, name="cmd")
    x = Sink(dut.x, stall=stall, seed=seed + 20, name="x")
    bias = Sink(dut.bias, stall=stall, seed=seed + 30, name="bias")
    write = Sink(dut.write, stall=stall, seed=seed + 40, name="write")
    result = Source(dut.result, stall=stall, seed=seed + 50)
    vmem = list(mem)
    rd = ReadPortModel(dut.read, vmem)
    streams = [issue, cmd, x, bias, write, result]
    state = {"done": False}

    async def bench(ctx):
        # the fake MPU: command k's result rows are due a few cycles after its command and all
        # its x and bias rows are taken
        pending = []  # [k, x rows, bias rows, result rows] in command order, inputs not all in
        due = []  # (cycle, k, result rows)
        x_used = b_used = applied = 0
        for cyc in range(20_000):
            for s in streams:
                s.drive(ctx)
            for s in streams:
                s.sample(ctx)
            rd.sample(ctx)
            await ctx.tick()
            for s in streams:
                s.update()
            rd.update(ctx)
            for w in write.got[applied:]:  # the write taken at this edge
                v = data.Const(layout, w)
                vmem[v.addr] = _merge(vmem[v.addr], v.data.as_bits(), v.mask)
            applied = len(write.got)
            while len(cmd.got) > state.get("seen", 0):
                k = state.get("seen", 0)
                c = MpuIssue.const(cmds[k]).cmd
                assert cmd.got[k] == c.as_bits(), f"command {k}"
                n_groups = _rows_of(min(c.live_rows, c.rows))
                n_x = _rows_of(min(c.live_cols, c.cols)) if n_groups else 0
                n_x += bool(n_x and c.fwd)  # a forwarding product's row
                n_b = n_groups if c.flags.bias else 0
                pending.append((k, n_x, n_b, 0 if c.flags.argmax else n_groups))
                state["seen"] = k + 1
            while pending:
                k, n_x, n_b, res = pending[0]
                if len(x.got) - x_used < n_x or len(bias.got) - b_used < n_b:
                    break
                x_used, b_used = x_used + n_x, b_used + n_b
                pending.pop(0)
                if res:  # in command order, as the MPU answers
                    at = max([cyc + rng.randint(1, 12)] + [d[0] for d in due[-1:]])
                    due.append((at, k, res))
            while due and due[0][0] <= cyc:
                _, k, res = due.pop(0)
                result.items += [result_row(k, g) for g in range(res)]
            idle = not (issue.items or pending or due or result.items)
            if idle and not ctx.get(dut.busy):
                state["done"] = True
                break

    run(dut, bench)
    assert state["done"], "the feeder did not finish"
    assert len(cmd.got) == len(cmds)
    assert x.got == want_x
    assert bias.got == want_bias
    got_writes = [
        (v.addr, v.mask, v.data.as_bits()) for v in (data.Const(layout, w) for w in write.got)
    ]
    assert got_writes == want_writes
    assert vmem == want_mem


def _run_feeder_unstalled(cmds, cycles, each_cycle=None):
    """An MpuFeeder taking ``cmds`` with every stream always ready, for ``cycles`` cycles;
    ``each_cycle(ctx, cyc, dut, result)`` runs before each clock edge. Returns the cycles in
    which a command was taken."""
    dut = MpuFeeder(GEOM)
    issue = Source(dut.issue, [MpuIssue.const(c).as_bits() for c in cmds])
    sinks = [Sink(p) for p in (dut.cmd, dut.x, dut.bias, dut.write)]
    result = Source(dut.result)
    rd = ReadPortModel(dut.read, [0] * ROWS)
    taken = []

    async def bench(ctx):
        for cyc in range(cycles):
            for s in (issue, result, *sinks):
                s.drive(ctx)
            for s in (issue, result, *sinks):
                s.sample(ctx)
            rd.sample(ctx)
            if issue.fire:
                taken.append(cyc)
            if each_cycle is not None:
                each_cycle(ctx, cyc, dut, result)
            await ctx.tick()
            for s in (issue, result, *sinks):
                s.update()
            rd.update(ctx)

    run(dut, bench)
    return taken


def test_mpu_feeder_timing():
    """Without stalls, commands with ``n`` input rows are taken every ``max(3, 2n + 2)``
    cycles, and a result row is written in the cycle it is valid (as the docstring says)."""
    cmds = [
        {"cmd": {"rows": 64, "cols": 128, "live_rows": 64, "live_cols": 128,
                 "flags": {"bias": 1}}, "src_row": 0, "dst_row": 10},  # 2 x + 1 bias
        {"cmd": {"rows": 64, "cols": 64, "live_rows": 64, "live_cols": 0,
                 "flags": {"argmax": 1}}, "src_row": 0, "dst_row": 20},  # no input rows
        {"cmd": {"rows": 64, "cols": 256, "live_rows": 64, "live_cols": 256,
                 "flags": {"argmax": 1}}, "src_row": 30, "dst_row": 0},  # 4 x
        {"cmd": {"rows": 0, "cols": 64, "live_rows": 0, "live_cols": 64,
                 "flags": {}}, "src_row": 0, "dst_row": 0},  # command only
    ]  # fmt: skip

    def at_40(ctx, cyc, dut, result):
        if cyc == 40:
            assert ctx.get(dut.write.valid) == 0
            ctx.set(dut.result.valid, 1)
            assert ctx.get(dut.write.valid) == 1

    taken = _run_feeder_unstalled(cmds, 60, at_40)
    gaps = [b - a for a, b in itertools.pairwise(taken)]
    assert gaps == [2 * 3 + 2, 3, 2 * 4 + 2], taken


def test_mpu_feeder_result_queue():
    """``WQ`` commands with result rows are taken back to back while none of their results has
    come (short products follow each other at the MPU's pace); one more waits until the first
    command's result row is written, and is taken in the next cycle."""
    n = MpuFeeder.WQ + 1
    cmds = [
        {"cmd": {"rows": 64, "cols": 64, "live_rows": 64, "live_cols": 64, "flags": {}},
         "src_row": 40 + i, "dst_row": i}
        for i in range(n)
    ]  # fmt: skip
    answer = 100  # the first result row comes long after the queue has filled
    wrote = []

    def answer_late(ctx, cyc, dut, result):
        if cyc == answer - 1:  # offered from cycle `answer` on
            result.items.append(0)
        if ctx.get(dut.write.valid) and ctx.get(dut.write.ready):
            wrote.append(cyc)

    taken = _run_feeder_unstalled(cmds, answer + 20, answer_late)
    gaps = [b - a for a, b in itertools.pairwise(taken)]
    assert gaps[: n - 2] == [4] * (n - 2), taken  # max(3, 2 * 1 + 2): one x row each
    assert wrote == [answer], wrote
    assert taken[-1] == answer + 1, taken


# ---- store feeder -----------------------------------------------------------------------------


def _store_issues(rng, n):
    out = []
    for _ in range(n):
        kind = rng.choice(list(StoreKind))
        length = rng.choice([0, 1, 63, 64, 65, 200, rng.randint(0, 300)])
        src = rng.randint(0, ROWS - max(_rows_of(length), 1))
        cmd = {
            "kind": kind,
            "offset": rng.getrandbits(32),
            "length": length,
            "index": rng.getrandbits(32),
            "cols": rng.getrandbits(16),
            "stride": rng.getrandbits(12),
            "value": rng.getrandbits(32),
            "tag": rng.getrandbits(16),
        }
        out.append({"cmd": cmd, "src_row": src})
    return out


@pytest.mark.parametrize("stall", STALLS)
@pytest.mark.parametrize("seed", [1, 2])
def test_store_feeder(stall, seed):
    """Commands in order, and for VECTOR, ROW and COL stores their ``ceil(length / 64)`` rows
    from ``src_row``, in order; no read while ``hold`` is high; ``busy`` until the command and
    every row are taken."""
    rng = random.Random(seed)
    issues = _store_issues(rng, 40)
    mem = [_rand_row(rng) for _ in range(ROWS)]
    want_rows = []
    for st in issues:
        if st["cmd"]["kind"] in (StoreKind.VECTOR, StoreKind.ROW, StoreKind.COL):
            want_rows += [mem[st["src_row"] + i] for i in range(_rows_of(st["cmd"]["length"]))]
    dut = StoreFeeder(GEOM)
    issue = Source(dut.issue, [StoreIssue.const(s).as_bits() for s in issues], stall=stall,
                   seed=seed)  # fmt: skip
    cmd = Sink(dut.cmd, stall=stall, seed=seed + 10, name="cmd")
    rows = Sink(dut.data, stall=stall, seed=seed + 20, name="data")
    rd = ReadPortModel(dut.read, mem)
    hold = bernoulli(stall / 2, seed + 30)
    streams = [issue, cmd, rows]
    done = []

    async def bench(ctx):
        for _ in range(20_000):
            h = next(hold)
            ctx.set(dut.hold, h)
            for s in streams:
                s.drive(ctx)
            if h:  # the feeder withdraws its row while held (the core never holds it then)
                rows.waiting = None
            for s in streams:
                s.sample(ctx)
            rd.sample(ctx)
            if h:
                assert not ctx.get(dut.read.en), "read while held"
            await ctx.tick()
            for s in streams:
                s.update()
            rd.update(ctx)
            if not issue.items and not ctx.get(dut.busy):
                done.append(True)
                break

    run(dut, bench)
    assert done, "the store feeder did not finish"
    assert cmd.got == [StoreIssue.const(s).cmd.as_bits() for s in issues]
    assert rows.got == want_rows


def test_store_feeder_timing():
    """Without stalls, stores of ``n`` rows are taken every ``max(3, 2n + 2)`` cycles."""
    lengths = [130, 0, 64, 1]  # 3, 0, 1, 1 rows (the second is a WORD store: no rows)
    kinds = [StoreKind.VECTOR, StoreKind.WORD, StoreKind.ROW, StoreKind.COL]
    issues = [{"cmd": {"kind": k, "length": n}, "src_row": 5} for k, n in zip(kinds, lengths,
              strict=True)]  # fmt: skip
    dut = StoreFeeder(GEOM)
    issue = Source(dut.issue, [StoreIssue.const(s).as_bits() for s in issues])
    sinks = [Sink(dut.cmd), Sink(dut.data)]
    rd = ReadPortModel(dut.read, [0] * ROWS)
    taken = []

    async def bench(ctx):
        for cyc in range(40):
            for s in (issue, *sinks):
                s.drive(ctx)
            for s in (issue, *sinks):
                s.sample(ctx)
            rd.sample(ctx)
            if issue.fire:
                taken.append(cyc)
            await ctx.tick()
            for s in (issue, *sinks):
                s.update()
            rd.update(ctx)

    run(dut, bench)
    gaps = [b - a for a, b in itertools.pairwise(taken)]
    assert gaps == [2 * 3 + 2, 3, 2 * 1 + 2], taken


# ---- program fetch ----------------------------------------------------------------------------


def _row_bits(layout, **fields) -> int:
    return sum(int(v) << layout[k].offset for k, v in fields.items())


@pytest.mark.parametrize("stall", STALLS)
def test_program_fetch(stall):
    """Fetches of 3, 300 (two chunks) and 1 beats between runs of controller reads: the fetch's
    ROWS reads (chunks of FETCH_CHUNK elements), only channel 0's beat of every stripe to
    ``data``; the controller's reads and their rows pass through untouched, not while a fetch
    runs; ``loadv_busy`` and ``fetching`` follow the model every cycle."""
    g = GEOM
    stripe = g.channels * g.beat_elems
    per_stripe = stripe // BLOCK
    rng = random.Random(7)
    layout = row_write_layout(g)
    dut = ProgramFetch(g)

    def dma_row(cmd_no, r):
        h = random.Random(cmd_no * 100_000 + r)
        return _row_bits(
            layout,
            addr=h.randrange(ROWS),
            data=h.getrandbits(16 * BLOCK),
            mask=h.getrandbits(BLOCK),
        )

    def reads(n):
        out = []
        for _ in range(n):
            kind = rng.choice([ReadKind.ROWS, ReadKind.ROWS, ReadKind.TILES, ReadKind.WORD])
            fields = {"kind": kind, "offset": rng.getrandbits(32), "rows": rng.getrandbits(16),
                      "cols": rng.getrandbits(16), "length": rng.randint(1, 300),
                      "vbuf_row": rng.getrandbits(16), "tag": rng.getrandbits(16)}  # fmt: skip
            out.append(ReadCommand.const(fields).as_bits())
        return out

    phases = [("fetch", 0x1000, 3), ("reads", reads(6)), ("fetch", 0x40, 300),
              ("reads", reads(10)), ("fetch", 0x200, 1)]  # fmt: skip
    want_reads, want_data, want_loadv = [], [], []
    n_cmd = 0
    for phase in phases:
        if phase[0] == "fetch":
            _, off, left = phase
            while left:
                n = min(left, FETCH_CHUNK // stripe)
                want_reads.append(
                    ReadCommand.const({"kind": ReadKind.ROWS, "offset": off, "length": n * stripe})
                )
                want_data += [
                    dma_row(n_cmd, r) >> layout["data"].offset & ((1 << g.port_bits) - 1)
                    for r in range(0, n * per_stripe, per_stripe)
                ]
                n_cmd, left, off = n_cmd + 1, left - n, off + n * g.beat_bytes
        else:
            for bits in phase[1]:
                cmd = data.Const(ReadCommand, bits)
                want_reads.append(cmd)
                if cmd.kind == ReadKind.ROWS:
                    want_loadv += [dma_row(n_cmd, r) for r in range(_rows_of(cmd.length))]
                n_cmd += 1
    want_reads = [c.as_bits() for c in want_reads]

    cmd = Source(dut.cmd, stall=stall, seed=1)
    issue = Source(dut.issue, stall=stall, seed=2)
    rows = Source(dut.rows, stall=stall, seed=3)
    read = Sink(dut.read, stall=stall, seed=4, name="read")
    out = Sink(dut.data, stall=stall, seed=5, name="data")
    loadv = Sink(dut.loadv, name="loadv")  # the VBUF write port: always ready
    streams = [cmd, issue, rows, read, out, loadv]
    finished = []

    async def bench(ctx):
        phase_no, seen = -1, 0
        fetching, fetch_left = False, 0  # model: a fetch runs, its rows not yet taken
        loadv_rows = 0  # model: LOADV rows still to arrive
        for _ in range(20_000):
            if not (cmd.items or issue.items or rows.items or fetching or loadv_rows):
                phase_no += 1
                if phase_no == len(phases):
                    finished.append(True)
                    break
                phase = phases[phase_no]
                if phase[0] == "fetch":
                    run_ = ChannelRun.const({"offset": phase[1], "beats": phase[2]})
                    cmd.items.append(run_.as_bits())
                else:
                    issue.items += phase[1]
            for s in streams:
                s.drive(ctx)
            for s in streams:
                s.sample(ctx)
            assert ctx.get(dut.fetching) == fetching
            assert ctx.get(dut.loadv_busy) == (loadv_rows != 0)
            if fetching:
                assert not ctx.get(dut.issue.ready), "a controller read taken during a fetch"
                assert not ctx.get(dut.loadv.valid)
            if cmd.fire:
                fetching, fetch_left = True, data.Const(ChannelRun, cmd.items[0]).beats
                fetch_left *= per_stripe
            elif fetching and rows.fire:
                fetch_left -= 1
                fetching = fetch_left != 0
            if issue.fire:
                c = data.Const(ReadCommand, issue.items[0])
                loadv_rows += _rows_of(c.length) if c.kind == ReadKind.ROWS else 0
            loadv_rows -= bool(ctx.get(dut.loadv.valid))  # always ready
            await ctx.tick()
            for s in streams:
                s.update()
            # the DMA: rows for each ROWS read it takes, in order
            for k in range(seen, len(read.got)):
                c = data.Const(ReadCommand, read.got[k])
                if c.kind == ReadKind.ROWS:
                    rows.items += [dma_row(k, r) for r in range(_rows_of(c.length))]
            seen = len(read.got)

    run(dut, bench)
    assert finished, "the fetch test did not finish"
    assert read.got == want_reads
    assert out.got == want_data
    assert loadv.got == want_loadv


# ---- VBUF port sharing, the VPU command queue --------------------------------------------------


def test_read_port_share_and_write_arbiter():
    """ReadPortShare: ``en`` is any user's, ``addr`` the enabled user's, ``data`` reaches every
    user. VbufWriteArbiter: a valid MPU row, else a valid LOADV row, else the VPU's port; the
    MPU's stream always ready, the LOADV's while no MPU row is there."""
    rng = random.Random(3)
    share = ReadPortShare(ROWS, users=2)
    arb = VbufWriteArbiter(GEOM)
    layout = row_write_layout(GEOM)

    async def bench(ctx):
        for _ in range(300):
            en = [rng.random() < 0.5 for _ in range(2)]
            if all(en):
                en[rng.randrange(2)] = False  # the users never read in the same cycle
            addr = [rng.randrange(ROWS) for _ in range(2)]
            for u, e, a in zip(share.users, en, addr, strict=True):
                ctx.set(u.en, e)
                ctx.set(u.addr, a)
            row = _rand_row(rng)
            ctx.set(share.port.data.as_value(), row)
            assert ctx.get(share.port.en) == any(en)
            if any(en):
                assert ctx.get(share.port.addr) == addr[en.index(True)]
            assert all(ctx.get(u.data.as_value()) == row for u in share.users)

            rows = {}
            for name in ("loadv", "mpu"):
                valid = rng.random() < 0.4
                bits = _row_bits(layout, addr=rng.randrange(ROWS), data=_rand_row(rng),
                                 mask=rng.getrandbits(BLOCK))  # fmt: skip
                port = getattr(arb, name)
                ctx.set(port.valid, valid)
                ctx.set(port.payload.as_value(), bits)
                rows[name] = data.Const(layout, bits) if valid else None
            assert ctx.get(arb.mpu.ready) == 1
            assert ctx.get(arb.loadv.ready) == (rows["mpu"] is None)
            vpu = {"addr": rng.randrange(ROWS), "data": _rand_row(rng), "mask": rng.getrandbits(64)}
            ctx.set(arb.vpu.addr, vpu["addr"])
            ctx.set(arb.vpu.data.as_value(), vpu["data"])
            ctx.set(arb.vpu.mask, vpu["mask"])
            pick = rows["mpu"] if rows["mpu"] is not None else rows["loadv"]
            want = tuple(vpu.values())
            if pick is not None:
                want = (pick.addr, pick.data.as_bits(), pick.mask)
            got = (ctx.get(arb.write.addr), ctx.get(arb.write.data.as_value()),
                   ctx.get(arb.write.mask))  # fmt: skip
            assert got == want
            await ctx.delay(1e-8)

    m = Module()
    m.submodules.share, m.submodules.arb = share, arb
    run(m, bench, clock=False)


@pytest.mark.parametrize("stall", STALLS)
def test_command_queue(stall):
    """Every command out once, in order; ``level`` counts those held; a full queue is not
    ready; a command is on ``o`` two cycles after it entered an empty queue."""
    depth = 4
    rng = random.Random(5)
    cmds = [rng.getrandbits(data.Layout.cast(VectorCommand).size) for _ in range(60)]
    dut = CommandQueue(VectorCommand, depth)
    src = Source(dut.i, cmds, stall=stall, seed=11)
    out = Sink(dut.o, stall=stall, seed=12, name="o")

    async def bench(ctx):
        held = 0
        first = None
        for cyc in range(2000):
            src.drive(ctx)
            out.drive(ctx)
            src.sample(ctx)
            out.sample(ctx)
            assert ctx.get(dut.level) == held
            assert ctx.get(dut.i.ready) == (held < depth)
            if first is None and src.fire:
                first = cyc
            if first is not None and first + 2 == cyc and stall == 0:
                assert ctx.get(dut.o.valid)
            took = out.r and ctx.get(dut.o.valid)
            held += src.fire - took
            await ctx.tick()
            src.update()
            if not src.items and held == 0:
                break

    run(dut, bench)
    assert out.got == cmds


# ---- the core's perf port -----------------------------------------------------------------------


def test_perf_port_only_on_request():
    """The kernel's ports (what ``rtl.core.verilog`` converts) have no ``perf`` member;
    ``DecodeCore(geom, perf=True)`` adds it and nothing else."""
    from tandem.rtl.axi import vitis_ports
    from tandem.rtl.core import DecodeCore, PerfSignature

    plain, tapped = DecodeCore(GEOM), DecodeCore(GEOM, perf=True)
    names = [n for n, _, _ in vitis_ports(plain)]
    assert not any("perf" in n for n in names)
    assert not plain.has_perf and tapped.has_perf
    extra = set(tapped.signature.members) - set(plain.signature.members)
    assert extra == {"perf"}
    assert set(tapped.signature.members["perf"].signature.members) == set(PerfSignature().members)
