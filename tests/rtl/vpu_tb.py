# amaranth: UnusedElaboratable=no
"""cocotb testbench for the vector unit (rtl/vpu.py) on the vector buffer (rtl/vbuf.py), run from
test_vpu.py through tandem.sim.runner.

The design under test is :class:`VpuHarness`: a ``VectorBuffer`` with the ``VectorUnit`` on
two read ports and a write port, plus one read and one write port for the testbench (standing in
for the DMA). Every command is also executed by the ISA simulator (``tandem.golden.isasim``) on a
copy of the buffer, and after each run of commands the whole buffer is read back and compared
bit for bit, so wrong results and writes outside ``dst[:length]`` both fail. The measured cycles
of every command are compared with ``VectorUnit.cycles``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import arith_cases
import cocotb
import numpy as np
from amaranth import Module
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out
from cocotb.triggers import RisingEdge

from tandem import isa, seeds
from tandem import numerics as nm
from tandem.checkpoint import random_weights
from tandem.compiler import R_T, compile_model, head_groups
from tandem.config import GPT2Config
from tandem.geometry import geometry
from tandem.golden.faithful import FaithfulCache, FaithfulModel, layer_norm
from tandem.golden.isasim import IsaSim
from tandem.layout import PROGRAM_BASE, HBMImage
from tandem.rtl.vbuf import ROW_ELEMS, ReadPortSignature, VectorBuffer, WritePortSignature
from tandem.rtl.vpu import TABLE_OPS, VectorCommand, VectorOp, VectorUnit
from tandem.sim import streams
from tandem.sim.runner import tb_params

# --------------------------------------------------------------------------------------------
# the design


class VpuHarness(wiring.Component):
    """``VectorUnit`` + ``VectorBuffer`` (3 read, 2 write ports), with ``cmd`` and ``done``
    passed through and the buffer's third read port and second write port as ``tb_read`` and
    ``tb_write``."""

    def __init__(self, geom, **vpu_options):
        self.geom = geom
        self.vpu = VectorUnit(geom, **vpu_options)
        rows = self.vpu.rows
        super().__init__(
            {
                "cmd": In(stream.Signature(VectorCommand)),
                "done": Out(stream.Signature(VectorOp, payload_init=VectorOp.VADD)),
                "tb_read": In(ReadPortSignature(rows)),
                "tb_write": In(WritePortSignature(rows)),
            }
        )

    def elaborate(self, platform):
        m = Module()
        m.submodules.vpu = vpu = self.vpu
        m.submodules.vbuf = vbuf = VectorBuffer(self.geom, read_ports=3, write_ports=2)
        wiring.connect(m, vpu.read_a, vbuf.read[0])
        wiring.connect(m, vpu.read_b, vbuf.read[1])
        wiring.connect(m, vpu.write, vbuf.write[0])
        wiring.connect(m, wiring.flipped(self.tb_read), vbuf.read[2])
        wiring.connect(m, wiring.flipped(self.tb_write), vbuf.write[1])
        wiring.connect(m, wiring.flipped(self.cmd), vpu.cmd)
        wiring.connect(m, vpu.done, wiring.flipped(self.done))
        return m


def build(params: dict) -> VpuHarness:
    """The harness for the test parameters (shared by the pytest and the cocotb side)."""
    return VpuHarness(geometry(params["geom"]), **params.get("vpu", {}))


# --------------------------------------------------------------------------------------------
# commands


@dataclass(frozen=True)
class Command:
    """One VPU command with its length resolved."""

    op: VectorOp
    dst: int
    a: int = 0
    b: int = 0
    length: int = 0
    b_scalar: bool = False
    imm: int = 0

    @classmethod
    def from_instr(cls, ins: isa.Instr, regs: dict[int, int]) -> Command:
        """A compiled instruction, ``R[lreg]`` taken from ``regs``."""
        length = regs[ins["lreg"]] if ins.get("lreg") else ins["len"]
        return cls(
            VectorOp(ins.op.value),
            ins["dst"],
            ins.get("a"),
            ins.get("b"),
            length,
            bool(ins.get("flags") & isa.VecFlag.B_SCALAR),
            ins.get("imm"),
        )

    def instr(self) -> isa.Instr:
        op = isa.Op(self.op.value)
        names = {f.name for f in isa.FORMATS[op]}
        fields = {"dst": self.dst, "len": self.length}
        for name, value in (("a", self.a), ("b", self.b), ("imm", self.imm)):
            if name in names:
                fields[name] = value
        if "flags" in names:
            fields["flags"] = isa.VecFlag.B_SCALAR if self.b_scalar else 0
        return isa.make(op, **fields)

    def __str__(self) -> str:
        return str(self.instr())


class Reference:
    """The ISA simulator running one command at a time on its own VBUF."""

    def __init__(self, geom):
        self.sim = IsaSim(geom, HBMImage(geom, PROGRAM_BASE + geom.imem_words * isa.WORD_BYTES))

    @property
    def vbuf(self) -> np.ndarray:
        return self.sim.vbuf

    def run(self, cmd: Command) -> None:
        program = isa.encode_program([cmd.instr(), isa.make(isa.Op.HALT)])
        self.sim.image.data[0, PROGRAM_BASE : PROGRAM_BASE + len(program)] = np.frombuffer(
            program, np.uint8
        )
        result = self.sim.run()
        if not result.ok:
            raise AssertionError(f"the ISA simulator rejected {cmd}: {result.message}")


# --------------------------------------------------------------------------------------------
# the testbench


def _row_int(values) -> int:
    return int.from_bytes(np.asarray(values, dtype="<u2").tobytes(), "little")


def _int_row(word: int) -> np.ndarray:
    return np.frombuffer(int(word).to_bytes(2 * ROW_ELEMS, "little"), dtype="<u2").astype(np.uint16)


class VpuTB(streams.ClockedTB):
    """Clock, reset, the command and done streams, the testbench's VBUF ports and the
    reference."""

    def __init__(self, dut, harness: VpuHarness):
        super().__init__(dut)
        self.vpu = harness.vpu
        self.rows = harness.vpu.rows
        self.source = streams.StreamSource(dut, "cmd")
        self.sink = streams.StreamSink(dut, "done")
        self.pack = streams.Packer(VectorCommand)
        self.ref = Reference(harness.geom)
        self.commands = 0
        self.checked_cycles = 0
        self.exact_cycles = 0  # commands whose cycles were checked equal to the formula
        self.overlapped = 0  # commands accepted before the one before them was done
        dut.tb_read__en.value = 0
        dut.tb_write__mask.value = 0

    # VBUF access through the testbench ports --------------------------------------------

    async def write(self, addr: int, values) -> None:
        """Write ``values`` at element ``addr`` (any alignment) into VBUF and the reference."""
        values = np.asarray(values, dtype=np.uint16)
        self.ref.vbuf[addr : addr + len(values)] = values
        first, end = addr // ROW_ELEMS, -(-(addr + len(values)) // ROW_ELEMS)
        padded = np.zeros((end - first) * ROW_ELEMS, np.uint16)
        mask = np.zeros_like(padded, dtype=bool)
        lo = addr - first * ROW_ELEMS
        padded[lo : lo + len(values)] = values
        mask[lo : lo + len(values)] = True
        for k in range(end - first):
            bits = mask[k * ROW_ELEMS : (k + 1) * ROW_ELEMS]
            self.dut.tb_write__addr.value = first + k
            self.dut.tb_write__data.value = _row_int(padded[k * ROW_ELEMS : (k + 1) * ROW_ELEMS])
            self.dut.tb_write__mask.value = int(np.packbits(bits, bitorder="little").view("<u8")[0])
            await RisingEdge(self.clk)
        self.dut.tb_write__mask.value = 0

    async def dump(self) -> np.ndarray:
        """The whole VBUF, one row per cycle."""
        out = np.zeros(self.rows * ROW_ELEMS, np.uint16)
        for r in range(self.rows + 1):
            self.dut.tb_read__en.value = int(r < self.rows)
            self.dut.tb_read__addr.value = r % self.rows
            await RisingEdge(self.clk)
            if r:  # the row read at the previous edge
                out[(r - 1) * ROW_ELEMS : r * ROW_ELEMS] = _int_row(self.dut.tb_read__data.value)
        self.dut.tb_read__en.value = 0
        return out

    async def check(self, what: str) -> np.ndarray:
        got = await self.dump()
        want = self.ref.vbuf
        bad = np.flatnonzero(got != want)
        if bad.size:
            lines = [f"  VBUF[{i}]: got {got[i]:#06x}, expected {want[i]:#06x}" for i in bad[:12]]
            raise AssertionError(
                f"after {what}: {bad.size} elements differ from the ISA simulator:\n"
                + "\n".join(lines)
            )
        return got

    # commands -------------------------------------------------------------------------------

    async def run(self, cmds: list[Command], *, valid="always", ready="always", seed=0) -> None:
        """Send ``cmds`` back to back under the named handshake patterns, apply them to the
        reference, and check every command's cycles against the formula."""
        for cmd in cmds:
            self.ref.run(cmd)
        self.source.pattern = streams.PATTERNS[valid](seed)
        self.sink.pattern = streams.PATTERNS[ready](seed + 1)
        self.sink.items.clear()
        sent0 = self.source.sent
        accepted, finished = [], []

        def on_edge(cycle):
            if self.source.sent - sent0 > len(accepted):
                accepted.append(cycle)
            if len(self.sink.items) > len(finished):
                finished.append(cycle)

        budget = sum(self.vpu.cycles(c.op, c.length, b_scalar=c.b_scalar) for c in cmds)
        self.source.send(self.pack.pack(**self._fields(c)) for c in cmds)
        await streams.pump(
            self.clk,
            [self.source],
            [self.sink],
            until=lambda: len(self.sink.items) >= len(cmds),
            timeout=8 * budget + 200,
            on_edge=on_edge,
        )
        self.sink.pattern = None
        await streams.pump(self.clk, [], [self.sink], until=None, timeout=8)
        ops = [VectorOp(int(w)) for w in self.sink.items]
        if ops != [c.op for c in cmds]:
            raise AssertionError(f"done reported {ops}, expected {[c.op for c in cmds]}")
        # with done always taken, a command accepted into an idle unit (every command before
        # it reported on done) takes the formula's cycles from its accept to its done, any
        # other at least those (it may wait in the input buffer); with both streams always
        # ready the accepts follow VectorUnit.schedule (the overlap rules) cycle for cycle
        exact = 0
        for k, (cmd, t0, t1) in enumerate(zip(cmds, accepted, finished, strict=True)):
            want = self.vpu.cycles(cmd.op, cmd.length, b_scalar=cmd.b_scalar)
            idle = k == 0 or finished[k - 1] < t0
            if t1 - t0 != want and ((ready == "always" and idle) or t1 - t0 < want):
                raise AssertionError(f"{cmd} took {t1 - t0} cycles, the formula says {want}")
            exact += ready == "always" and idle
        self.exact_cycles += exact
        if valid == ready == "always":
            plan = self.vpu.schedule(cmds)
            got = [
                (t0 - accepted[0], t1 - accepted[0])
                for t0, t1 in zip(accepted, finished, strict=True)
            ]
            if got != plan:
                raise AssertionError(
                    "accept/done cycles differ from VectorUnit.schedule:\n  "
                    + "\n  ".join(
                        f"{c}: {g} vs {p}" for c, g, p in zip(cmds, got, plan, strict=True)
                    )
                )
            self.overlapped += sum(
                t0 < t1p for (t0, _), (_, t1p) in zip(got[1:], got[:-1], strict=True)
            )
        self.commands += len(cmds)
        self.checked_cycles += len(cmds)

    @staticmethod
    def _fields(c: Command) -> dict:
        return {
            "op": c.op.value,
            "dst": c.dst,
            "a": c.a,
            "b": c.b,
            "length": c.length,
            "b_scalar": int(c.b_scalar),
            "imm": c.imm,
        }


HANDSHAKES = [
    ("always", "always"),
    ("three-of-four", "every-other"),
    ("random-half", "always"),
    ("always", "random-bursts"),
    ("random-bursts", "random-half"),
]
"""(cmd valid, done ready) patterns, taken in turn by the command runs."""


# --------------------------------------------------------------------------------------------
# stimulus


def random_rows(rng, n_rows: int) -> np.ndarray:
    """``n_rows`` x 64 binary16 patterns, each row from one profile: Gaussian values of a random
    scale (some with a few special values mixed in), uniform bit patterns, or special values
    only. Rows of finite values keep dot products and maxima from being NaN all the time."""
    out = np.empty((n_rows, ROW_ELEMS), np.uint16)
    for r in range(n_rows):
        kind = rng.choice(["normal", "sprinkled", "bits", "special"], p=[0.45, 0.25, 0.15, 0.15])
        scale = 10.0 ** rng.uniform(-4, 4)
        row = nm.to_bits(rng.normal(0, scale, ROW_ELEMS))
        if kind == "sprinkled":
            pick = rng.random(ROW_ELEMS) < 0.05
            row = np.where(pick, rng.choice(arith_cases.SPECIALS, ROW_ELEMS), row)
        elif kind == "bits":
            row = rng.integers(0, 1 << 16, ROW_ELEMS, dtype=np.uint16)
        elif kind == "special":
            row = rng.choice(arith_cases.SPECIALS, ROW_ELEMS)
        out[r] = row
    return out.ravel()


LENGTHS = (0, 1, 2, 63, 64, 65, 127, 128, 129, 130, 191, 256)


def random_length(rng, max_rows: int) -> int:
    if rng.random() < 0.6:
        choices = [n for n in LENGTHS if n <= max_rows * ROW_ELEMS]
        return int(rng.choice(choices))
    return int(rng.integers(1, max_rows * ROW_ELEMS + 1))


def random_command(rng, rows: int) -> Command:
    """A random legal command: ``dst`` equal to or disjoint from each vector operand (see the
    VectorUnit docstring), except for VMAX and VDOT whose one result may land anywhere."""
    op = VectorOp(int(rng.choice([o.value for o in VectorOp])))
    length = random_length(rng, max_rows=rows // 3)
    n = max(1, -(-length // ROW_ELEMS))

    def start(span=n):
        return int(rng.integers(0, rows - span + 1)) * ROW_ELEMS

    a = start()
    if op is VectorOp.VSET:
        imm = int(rng.choice([*arith_cases.SPECIALS, rng.integers(0, 1 << 16)]))
        return Command(op, start(), length=length, imm=imm)
    if op in (VectorOp.VMAX, VectorOp.VDOT) or op in TABLE_OPS:
        b_scalar = op is VectorOp.VDOT and rng.random() < 0.4
        b = start(1 if b_scalar else n) if op is VectorOp.VDOT else 0
        if op in TABLE_OPS:
            dst = a if rng.random() < 0.4 else _disjoint(rng, rows, n, [a])
        else:
            dst = start(1)
        return Command(op, dst, a, b, length, b_scalar)
    b_scalar = rng.random() < 0.35
    b = start(1) if b_scalar else start()
    vectors = [a] if b_scalar else [a, b]
    mode = rng.random()
    dst = a if mode < 0.25 else b if mode < 0.4 and not b_scalar else None
    if dst is None or not all(_equal_or_disjoint(dst, v, n) for v in vectors):
        dst = _disjoint(rng, rows, n, vectors)
    if dst is None:  # a and b overlap and leave no room: b in place of a
        b, dst = a, _disjoint(rng, rows, n, [a])
    return Command(op, dst, a, b, length, b_scalar)


READS_B = (VectorOp.VADD, VectorOp.VSUB, VectorOp.VMUL, VectorOp.VDOT)


def chained_command(rng, rows: int, prev: Command, row_rate: list[VectorOp]) -> Command:
    """A random legal command that reads the rows ``prev`` writes, through ``a`` or ``b``
    (vector or scalar), from their first row, a row before it, or a row after it (which may
    not follow the writes); half the time one of the ``row_rate`` ops (a row per cycle: the
    ones whose writes a reader may follow)."""
    for _ in range(100):
        c = random_command(rng, rows)
        if rng.random() < 0.5:
            op = VectorOp(int(rng.choice([o.value for o in row_rate])))
            c = replace(c, op=op, b_scalar=c.b_scalar and op in READS_B)
        if c.op is VectorOp.VSET:
            return c
        n = max(1, -(-c.length // ROW_ELEMS))
        shift = int(rng.choice([0, 0, -1, 1, 2, 3])) * ROW_ELEMS  # the first row, before, after
        src = prev.dst + shift
        if src < 0 or src + n * ROW_ELEMS > rows * ROW_ELEMS:
            continue
        if c.op in READS_B and rng.random() < 0.4:
            c = replace(c, b=src)
        else:
            c = replace(c, a=src)
        if c.op in (VectorOp.VMAX, VectorOp.VDOT):
            return c
        vectors = [c.a] if c.b_scalar or c.op not in READS_B else [c.a, c.b]
        if len(vectors) == 2 and not _equal_or_disjoint(c.a, c.b, n):
            continue
        if not all(_equal_or_disjoint(c.dst, v, n) for v in vectors):
            c = replace(c, dst=_disjoint(rng, rows, n, vectors))
        if c.dst is not None:
            return c
    return random_command(rng, rows)


def _equal_or_disjoint(x: int, y: int, n: int) -> bool:
    return x == y or x + n * ROW_ELEMS <= y or y + n * ROW_ELEMS <= x


def _disjoint(rng, rows: int, n: int, taken: list[int]) -> int | None:
    """A start row for ``n`` rows equal to or disjoint from each ``n``-row operand at ``taken``,
    preferring disjoint ones (in place on an operand if nothing else fits); None if neither
    exists."""
    for _ in range(100):
        d = int(rng.integers(0, rows - n + 1)) * ROW_ELEMS
        if all(d + n * ROW_ELEMS <= t or t + n * ROW_ELEMS <= d for t in taken):
            return d
    for d in taken:
        if all(_equal_or_disjoint(d, t, n) for t in taken):
            return d
    return None


# --------------------------------------------------------------------------------------------
# tests


async def setup(dut):
    params = tb_params()
    harness = build(params)
    tb = VpuTB(dut, harness)
    await tb.reset()
    return tb, params, np.random.default_rng(seeds.seed(params.get("seed", 1)))


@cocotb.test()
async def vbuf_ports(dut):
    """The testbench ports themselves: masked writes of odd spans, then a full read-back."""
    tb, _, rng = await setup(dut)
    await tb.write(0, random_rows(rng, tb.rows))
    for _ in range(20):
        n = int(rng.integers(1, 3 * ROW_ELEMS))
        addr = int(rng.integers(0, tb.rows * ROW_ELEMS - n))
        await tb.write(addr, rng.integers(0, 1 << 16, n, dtype=np.uint16))
    await tb.check("testbench writes")


@cocotb.test()
async def vpu_special_pairs(dut):
    """Every pair of special values (and boundary pairs from the arithmetic tests) through
    VADD, VSUB and VMUL, with b as a vector and as a broadcast scalar."""
    tb, _, rng = await setup(dut)
    a0, b0 = arith_cases.special_pairs()
    n = len(a0)
    rows = -(-n // ROW_ELEMS)
    a, b, dst = 0, rows * ROW_ELEMS, 2 * rows * ROW_ELEMS
    if 3 * rows > tb.rows:
        raise AssertionError(f"{3 * rows} rows of special pairs do not fit {tb.rows}")
    await tb.write(0, random_rows(rng, tb.rows))
    await tb.write(a, a0)
    await tb.write(b, b0)
    for k, op in enumerate((VectorOp.VADD, VectorOp.VSUB, VectorOp.VMUL)):
        await tb.run([Command(op, dst, a, b, n)], valid=HANDSHAKES[k][0], ready=HANDSHAKES[k][1])
        await tb.check(f"{op.name} of special pairs")
    # each special as a broadcast scalar against all of them
    for k, s in enumerate(arith_cases.SPECIALS[:: max(1, len(arith_cases.SPECIALS) // 6)]):
        await tb.write(b, [s])
        op = (VectorOp.VADD, VectorOp.VSUB, VectorOp.VMUL)[k % 3]
        await tb.run([Command(op, dst, a, b, n, b_scalar=True)])
    await tb.check("scalar special operands")
    for op in ("add", "mul"):
        pa, pb = arith_cases.binary_pairs(op, min(n, 1000), rng)
        m = len(pa)
        await tb.write(a, pa)
        await tb.write(b, pb)
        ops = [VectorOp.VADD, VectorOp.VSUB] if op == "add" else [VectorOp.VMUL]
        await tb.run([Command(o, dst, a, b, m) for o in ops])
        await tb.check(f"boundary pairs for {op}")
    tb.log.info(f"{tb.commands} commands bit-exact, cycles as documented")


@cocotb.test()
async def vpu_random(dut):
    """Random runs of commands back to back under idle and backpressure patterns; the buffer is
    refilled and compared with the ISA simulator after every run."""
    tb, params, rng = await setup(dut)
    t0 = time.perf_counter()
    for k in range(params.get("runs", 30)):
        await tb.write(0, random_rows(rng, tb.rows))
        cmds = [random_command(rng, tb.rows) for _ in range(int(rng.integers(1, 7)))]
        valid, ready = HANDSHAKES[k % len(HANDSHAKES)]
        await tb.run(cmds, valid=valid, ready=ready, seed=k)
        await tb.check("\n  ".join(["commands", *map(str, cmds)]))
    if tb.exact_cycles == 0:
        raise AssertionError("no command's cycles were checked equal to the formula")
    tb.log.info(
        f"{tb.commands} random commands bit-exact, cycles as documented "
        f"({tb.exact_cycles} exactly; {time.perf_counter() - t0:.1f} s)"
    )


@cocotb.test()
async def vpu_overlap(dut):
    """Long runs of short commands over a few rows, so that consecutive commands overlap and
    often read rows the one before still has to write: results bit-exact, and with both streams
    always ready every accept and done on the cycle ``VectorUnit.schedule`` gives."""
    tb, params, rng = await setup(dut)
    for k in range(params.get("runs", 30) // 2):
        await tb.write(0, random_rows(rng, tb.rows))
        cmds = [random_command(rng, 6) for _ in range(int(rng.integers(8, 20)))]
        valid, ready = HANDSHAKES[k % len(HANDSHAKES)] if k % 2 else ("always", "always")
        await tb.run(cmds, valid=valid, ready=ready, seed=k)
        await tb.check("\n  ".join(["commands", *map(str, cmds)]))
    if tb.overlapped == 0:
        raise AssertionError("no command overlapped the one before it")
    tb.log.info(f"{tb.commands} commands bit-exact, {tb.overlapped} overlapped their predecessor")


@cocotb.test()
async def vpu_chains(dut):
    """Runs of commands that each read the rows the one before writes, so that reads follow a
    row-rate command's writes row by row (chaining), next to reads that may not (a scalar b,
    a later first row, a narrower writer): bit-exact, and with both streams always ready on
    the cycles ``VectorUnit.schedule`` gives, fewer than without chaining."""
    tb, params, rng = await setup(dut)
    row_rate = [o for o in VectorOp if tb.vpu.op_lanes(o) == ROW_ELEMS]
    row_rate = [o for o in row_rate if o not in (VectorOp.VMAX, VectorOp.VDOT)]
    # directed: a VSET of rows 2..5 and a VMAX of row 4 alone, which may not follow it (its
    # row is written two cycles after the first): -Inf, not the 1.0s row 4 held before
    await tb.write(0, random_rows(rng, tb.rows))
    await tb.write(4 * ROW_ELEMS, np.full(ROW_ELEMS, nm.to_bits(1.0), np.uint16))
    directed = [
        Command(VectorOp.VSET, 2 * ROW_ELEMS, length=4 * ROW_ELEMS, imm=int(nm.NEG_INF)),
        Command(VectorOp.VMAX, 10 * ROW_ELEMS, 4 * ROW_ELEMS, length=ROW_ELEMS),
    ]
    await tb.run(directed)
    await tb.check("a VMAX of the VSET's third row")
    saved = 0
    for k in range(params.get("runs", 30) // 2):
        await tb.write(0, random_rows(rng, tb.rows))
        cmds = [random_command(rng, 24)]  # up to 8 rows each, over 24
        for _ in range(int(rng.integers(6, 14))):
            cmds.append(chained_command(rng, 24, cmds[-1], row_rate))
        valid, ready = HANDSHAKES[k % len(HANDSHAKES)] if k % 2 else ("always", "always")
        await tb.run(cmds, valid=valid, ready=ready, seed=k)
        await tb.check("\n  ".join(["commands", *map(str, cmds)]))
        if valid == ready == "always":
            saved += tb.vpu.schedule(cmds, chain=False)[-1][1] - tb.vpu.schedule(cmds)[-1][1]
    if saved <= 0:
        raise AssertionError("no run finished earlier by chaining")
    tb.log.info(f"{tb.commands} commands bit-exact; chaining saved {saved} cycles in all")


def _find(program, ops, start=0) -> int:
    """Index of the first run of instructions with the opcodes ``ops``."""
    ops = list(ops)
    for i in range(start, len(program) - len(ops) + 1):
        if [ins.op for ins in program[i : i + len(ops)]] == ops:
            return i
    raise AssertionError(f"the compiled program has no sequence {[o.name for o in ops]}")


LN_OPS = [isa.Op[n] for n in ("VDOT", "VSUB", "VMUL", "VDOT", "VADD", "VRSQRT", "VMUL", "VMUL")]
LN_OPS += [isa.Op.VADD]
SOFTMAX_OPS = [isa.Op[n] for n in ("VMAX", "VSUB", "VEXP", "VDOT", "VRECIP")]


def head_zero(program, n_head: int) -> list:
    """Head 0's instructions in the compiler's head-group form (one group of every head): the
    q scaling of all heads (before the layer's K store, every head's, and its n_head V stores),
    head 0's score product, its softmax (op by op over the heads: every n_head-th
    instruction), its output product and its normalisation."""
    j = _find(program, [isa.Op.VMUL, isa.Op.STROW, isa.Op.STCOL])
    k0 = j + 2 + n_head
    head = [program[j], program[k0]]
    head += [program[k0 + n_head * (1 + i)] for i in range(5)]
    head += [program[k0 + 6 * n_head], program[k0 + 7 * n_head]]
    want = [isa.Op.VMUL, isa.Op.MATVEC, *SOFTMAX_OPS, isa.Op.MATVEC, isa.Op.VMUL]
    assert [ins.op for ins in head] == want, [ins.op.name for ins in head]
    return head


@cocotb.test()
async def vpu_layer_norm_and_attention(dut):
    """LayerNorm and one attention head as the compiler emits them: the VPU runs the vector
    instructions, the testbench stands in for LOADV and the MPU's MATVECs (with numerics), and
    every intermediate equals the faithful model's computation."""
    tb, params, rng = await setup(dut)
    cfg = GPT2Config(n_vocab=32, n_ctx=params.get("n_ctx", 160), n_embd=96, n_head=3, n_layer=1)
    weights = random_weights(cfg, seed=3)
    compiled = compile_model(cfg, weights, tb.vpu.geom)
    program, slots = compiled.program, compiled.vbuf_map
    fm = FaithfulModel(cfg, weights)
    layer = fm.weights.layers[0]

    def at(name, n):
        return tb.ref.vbuf[slots[name].addr : slots[name].addr + n].copy()

    await tb.write(0, random_rows(rng, tb.rows))
    # the prologue's constants
    loop = compiled.labels["loop"]
    consts = [ins for ins in program[:loop] if ins.op is isa.Op.VSET]
    await tb.run([Command.from_instr(ins, {}) for ins in consts])

    # LayerNorm: ln_1 of layer 0 (its LOADVs ran at the layer start; the testbench writes g, b)
    i = _find(program, LN_OPS)
    E = cfg.n_embd
    x = nm.to_bits(rng.normal(0, 2.0, E))
    await tb.write(slots["x"].addr, x)
    await tb.write(program[i + 7]["b"], layer.ln_1_g)
    await tb.write(program[i + 8]["b"], layer.ln_1_b)
    ln = [Command.from_instr(ins, {}) for ins in program[i : i + len(LN_OPS)]]
    await tb.run(ln, valid="three-of-four", ready="random-half")
    await tb.check("LayerNorm")
    c_n = np.full(E, nm.to_bits(1.0 / E), np.uint16)
    mu = nm.dot_fp16(x, c_n)
    d = nm.fp16_sub(x, mu)
    ds = nm.fp16_mul(d, c_n)
    var = nm.fp16_add(nm.dot_fp16(d, ds), fm.eps16)
    rstd = nm.lookup("rsqrt", var)
    want = {"mu": [mu], "d": d, "ds": ds, "var": [var], "rstd": [rstd]}
    want["y"] = layer_norm(x, layer.ln_1_g, layer.ln_1_b, fm.eps16)
    for name, value in want.items():
        got = at(name, len(value))
        if not np.array_equal(got, np.asarray(value, np.uint16)):
            raise AssertionError(f"LayerNorm {name}: VPU {got[:8]}..., faithful {value[:8]}...")

    # Attention head 0 at a few context lengths
    assert [len(g) for g in head_groups(cfg, slots)] == [cfg.n_head]
    head = head_zero(program, cfg.n_head)
    P = 3 * ROW_ELEMS
    for T in params.get("contexts", (1, 64, 130)):
        cache = FaithfulCache(cfg)
        for pos in range(T):
            kv = nm.to_bits(rng.normal(0, 1.0, (2, cfg.n_head, ROW_ELEMS)))
            kv[:, :, cfg.head_dim :] = 0
            cache.write(0, pos, kv[0], kv[1])
            cache.n_tokens = pos + 1
        q = nm.to_bits(rng.normal(0, 1.0, P))
        await tb.write(slots["qkv"].addr, q)
        s = nm.matvec_fp16(
            nm.PreparedMatrix(cache.k[0, 0, :T]), nm.fp16_mul(q[:ROW_ELEMS], fm.q_scale)
        )
        m = nm.fp16_max(s)
        e = nm.lookup("exp", nm.fp16_sub(s, m))
        z = nm.dot_fp16(e, np.full(T, nm.to_bits(1.0), np.uint16))
        r = nm.lookup("recip", z)
        # after each softmax op, head 0's scores and its scalar row (max, then sum, then 1/sum)
        after = {isa.Op.VMAX: ("sc", [m]), isa.Op.VEXP: ("s", e), isa.Op.VDOT: ("sc", [z])}
        after[isa.Op.VRECIP] = ("sc", [r])
        regs = {R_T: T}
        for ins in head:
            if ins.unit is isa.Unit.VPU:
                await tb.run([Command.from_instr(ins, regs)])
            elif ins.op is isa.Op.MATVEC:  # the MPU's part, with numerics
                k_side = ins["flags"] & isa.MatFlag.LIVE_ROWS
                mat = cache.k[0, 0, :T] if k_side else cache.vt[0, 0, :, :T]
                src = tb.ref.vbuf[ins["src"] : ins["src"] + mat.shape[1]]
                await tb.write(ins["dst"], nm.matvec_fp16(nm.PreparedMatrix(mat), src))
            if ins.op in after:
                await tb.check(f"T = {T}, after {ins.op.name}")
                name, value = after.pop(ins.op)
                got = at(name, len(value))
                if not np.array_equal(got, np.asarray(value, np.uint16)):
                    raise AssertionError(
                        f"T = {T}, softmax {name} after {ins.op.name}: VPU {got[:8]}, "
                        f"model {value[:8]}"
                    )
        assert not after
        await tb.check(f"attention head with T = {T}")
        att = at("att", ROW_ELEMS)
        faithful = fm.attention_per_head(0, q, cache, T)[:ROW_ELEMS]
        if not np.array_equal(att, faithful):
            raise AssertionError(f"T = {T}: head output differs from the faithful model")
    tb.log.info("LayerNorm and attention heads equal the faithful model")
