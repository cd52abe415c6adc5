"""The vector unit (VPU): the ISA's element-wise, reduction and table operations over VBUF rows."""

# No `from __future__ import annotations`: data.Struct reads its annotations as shapes.

from collections.abc import Mapping
from types import SimpleNamespace

from amaranth import Array, Cat, Const, Module, Mux, Signal, unsigned
from amaranth.lib import data, enum, stream
from amaranth.lib.wiring import In, Out

from tandem import isa, numerics
from tandem.geometry import CoreGeometry, check_geometry, is_pow2

from .arith import (
    NO_TAG,
    AccToFP16,
    Accumulator,
    AccumulatorShift,
    AddOp,
    BlockAlign,
    BlockDot,
    FP16Add,
    FP16Mul,
    FP16Table,
    StreamUnit,
    stream_pipe,
)
from .component import GeometryComponent
from .vbuf import ROW_ELEMS, ReadPortSignature, Row, WritePortSignature

__all__ = ["RowMax", "VectorCommand", "VectorOp", "VectorUnit"]


class VectorOp(enum.Enum, shape=8):
    """The VPU's operations, with their ISA opcodes as values (so an instruction's opcode byte
    casts to it unchanged)."""

    VADD = isa.Op.VADD.value
    VSUB = isa.Op.VSUB.value
    VMUL = isa.Op.VMUL.value
    VMAX = isa.Op.VMAX.value
    VDOT = isa.Op.VDOT.value
    VEXP = isa.Op.VEXP.value
    VRECIP = isa.Op.VRECIP.value
    VRSQRT = isa.Op.VRSQRT.value
    VGELU = isa.Op.VGELU.value
    VSET = isa.Op.VSET.value


_ISA_VPU_OPS = {op.name: op.value for op, unit in isa.UNITS.items() if unit is isa.Unit.VPU}
if {op.name: op.value for op in VectorOp} != _ISA_VPU_OPS:
    raise AssertionError(f"VectorOp does not match the ISA's VPU operations {_ISA_VPU_OPS}")

TABLE_OPS = {
    VectorOp.VEXP: "exp",
    VectorOp.VRECIP: "recip",
    VectorOp.VRSQRT: "rsqrt",
    VectorOp.VGELU: "gelu",
}
"""Table operations and the ``numerics.table`` each looks up."""

_BINARY_OPS = (VectorOp.VADD, VectorOp.VSUB, VectorOp.VMUL)
_READS_B = (*_BINARY_OPS, VectorOp.VDOT)
_POINT_OPS = (VectorOp.VMAX, VectorOp.VDOT)
"""Ops that write one element, after reading all their rows."""


class VectorCommand(data.Struct):
    """One VPU instruction as the controller hands it over.

    ``dst``, ``a`` and ``b`` are VBUF element addresses (the ISA makes them multiples of 64;
    the VPU ignores their low 6 bits). ``length`` is resolved (``R[lreg]`` or ``len``) and
    range-checked by the controller: every operand lies inside the VBUF. ``b_scalar`` is
    :attr:`tandem.isa.VecFlag.B_SCALAR`; ``imm`` is ``VSET``'s bit pattern. Fields an op does
    not use are ignored.
    """

    op: VectorOp
    dst: unsigned(16)
    a: unsigned(16)
    b: unsigned(16)
    length: unsigned(17)
    b_scalar: unsigned(1)
    imm: unsigned(16)


def _probe(unit):
    """A unit built only to read its latency: never elaborated, so silence the warning."""
    unit._MustUse__silence = True
    return unit


def _table_ports(lanes: int) -> tuple[int, int]:
    """(ROMs, ports per ROM) of a function with ``lanes`` lookups per cycle: a block RAM's two
    read ports serve two lanes; a single lane keeps a one-port table."""
    ports = FP16Table.MAX_PORTS if lanes % FP16Table.MAX_PORTS == 0 else 1
    return lanes // ports, ports


_ONES = Const((1 << ROW_ELEMS) - 1, ROW_ELEMS)
"""Every element of a row."""


def _widen(mask):
    """A 64-bit element mask as a 1,024-bit row mask (one wide AND, not 64 muxes)."""
    return Cat(*(mask[e].replicate(16) for e in range(ROW_ELEMS)))


def _broadcast(value):
    """A 16-bit value in every element of a row."""
    return value.replicate(ROW_ELEMS)


def _isolate(value, valid):
    """Operand isolation: a unit sees zeros unless its op is running, so idle units do not
    toggle (less power; and Icarus re-evaluates a wide unit for every input change, which made
    simulation 30x slower)."""
    return Mux(valid, value, 0)


def _order_key(x):
    """``numerics.order_key`` of a 16-bit pattern: unsigned order is the numeric order."""
    return Mux(x[15], ~x, x | 0x8000)[:16]


class RowMax(StreamUnit):
    """The largest of 64 binary16 values under ``numerics.order_key`` (-0 < +0), and whether any
    is a NaN: one row of ``numerics.fp16_max``.

    Members
    -------
    i : In(stream.Signature(...))
        ``x`` (:data:`~tandem.rtl.vbuf.Row`), ``tag``.
    o : Out(stream.Signature(...))
        ``key`` (the order key of the maximum; :meth:`from_key` gives its bits), ``nan``,
        ``tag``.

    Latency 3 cycles (keys and two levels of the comparison tree; two more levels; the last
    two), throughput one row per cycle. Each level is a 16-bit comparison and a multiplexer (two
    LUT levels), so no path has more than 7 LUT levels (Yosys, the unit alone: see
    ``scripts/timing.py --unit RowMax``).
    """

    LATENCY = 3

    def __init__(self, *, tag=NO_TAG):
        super().__init__({"x": Row}, {"key": unsigned(16), "nan": unsigned(1)}, tag=tag)

    @staticmethod
    def from_key(key):
        """The bit pattern whose order key is ``key``."""
        return Mux(key[15], key ^ 0x8000, ~key)[:16]

    def elaborate(self, platform):
        m = Module()
        p = stream_pipe(m, self.i, self.o, name="rowmax")
        xs = [self.i.payload.x[k] for k in range(ROW_ELEMS)]

        def levels(values, n, name):
            # Each level is a Signal: a Mux tree of expressions would repeat its inputs at every
            # level (2**n copies in the generated Verilog, slow to convert and simulate).
            for lv in range(n):
                pairs = list(zip(values[0::2], values[1::2], strict=True))
                values = [Signal(16, name=f"{name}{lv}_{k}") for k in range(len(pairs))]
                for v, (a, b) in zip(values, pairs, strict=True):
                    m.d.comb += v.eq(Mux(a > b, a, b))
            return values

        keys = [Signal(16, name=f"key{k}") for k in range(ROW_ELEMS)]
        m.d.comb += [key.eq(_order_key(x)) for key, x in zip(keys, xs, strict=True)]
        # NaNs: one flag per four elements in stage 1, their OR in stage 2
        nans = [Cat(*(x[:15] > 0x7C00 for x in xs[k : k + 4])).any() for k in range(0, 64, 4)]
        s1 = [p.reg(v, 16, name=f"s1_key{k}") for k, v in enumerate(levels(keys, 2, "max_a"))]
        s1_nan = p.reg(Cat(*nans), len(nans), name="s1_nan")
        s1_tag = p.reg(self.i.payload.tag, self._tag, name="s1_tag")
        v1 = p.valid_chain(self.i.valid, 1, name="rowmax_valid")
        s2 = [p.reg(v, 16, name=f"s2_key{k}") for k, v in enumerate(levels(s1, 2, "max_b"))]
        s2_nan = p.reg(s1_nan.any(), 1, name="s2_nan")
        s2_tag = p.reg(s1_tag, self._tag, name="s2_tag")
        v2 = p.valid_chain(v1, 1, name="rowmax_valid2_")
        (top,) = levels(s2, 2, "max_c")
        with m.If(p.en):
            m.d.sync += [
                self.o.payload.key.eq(top),
                self.o.payload.nan.eq(s2_nan),
                self.o.payload.tag.eq(s2_tag),
                self.o.valid.eq(v2),
            ]
        return m


class VectorUnit(GeometryComponent):
    """The vector unit: ``VectorCommand``\\ s in order over the vector buffer, several in flight
    (see Timing), bit-exact with ``tandem.isa.SEMANTICS`` as ``tandem.golden.isasim`` executes
    them one after another.

    The code follows the datapath: :meth:`_in_flight` (the ring of commands in flight),
    :meth:`_decode` (the incoming command, decoded), :meth:`_input_buffer` (the decode register
    and two decoded commands, with the read-after-write hazard), :meth:`_issue` (the start of
    the buffer's head and one read beat per cycle), :meth:`_operands` (stages 1 and 2), the units
    (:meth:`_lane_groups`, :meth:`_vmax`, :meth:`_vdot`) and :meth:`_write_back` (the write
    port and ``done``).

    Datapath, all from rtl/arith.py except :class:`RowMax`:

    * ``VADD``/``VSUB``: ``lanes`` :class:`FP16Add`; ``VMUL``: ``lanes`` :class:`FP16Mul`. With
      ``b_scalar`` the element ``VBUF[b]`` is read once, at the start, and broadcast.
    * Tables (``VEXP``, ``VRECIP``, ``VRSQRT``, ``VGELU``): ``table_lanes[f]`` lookups per
      cycle from :class:`FP16Table` ROMs, each read by two lanes through its two ports
      (``ports=2``); a function with one lane has a one-port ROM.
    * ``VMAX`` (a row per cycle): :class:`RowMax` and a running maximum; elements past
      ``length`` count as -Inf (``length`` 0 gives -Inf), a NaN anywhere gives the canonical
      NaN.
    * ``VDOT`` (a row per cycle): ``numerics.dot_fp16(a, b)``. Without ``b_scalar`` a first
      pass reads b's rows through b's :class:`BlockAlign` to find ``xe_max``; the second pass
      streams both operands through :class:`BlockAlign` x2, :class:`BlockDot`,
      :class:`AccumulatorShift`, :class:`Accumulator` and :class:`AccToFP16` (one rounding;
      canonical NaN if any live element of a or b is non-finite). With ``b_scalar``,
      ``xe_max`` is the scalar's exponent and there is no first pass. Elements past
      ``length`` count as +0 (``length`` 0 gives +0).
    * ``VSET`` (a row per cycle): writes ``imm``.

    An op narrower than a row reads each row once and takes it ``n`` elements per cycle. Results
    go to ``VBUF[dst]`` under an element mask: elements at or past ``length`` are never written;
    ``VMAX`` and ``VDOT`` write element ``dst`` only.

    Operand overlap: rows are read in increasing order, each before it is written; a scalar
    ``b``, and all inputs of ``VMAX``/``VDOT``, are read before any result is written. So a
    ``dst`` equal to ``a`` or ``b`` (in place, as the compiler emits) or disjoint from them is
    exact. A ``dst`` that overlaps a vector operand at a different start is not supported: a
    row may then be read after an earlier result overwrote it, unlike the ISA's read-all-first
    semantics. The controller checks operand ranges (``VBUF_RANGE``) before issuing.

    Parameters
    ----------
    geom : CoreGeometry
        ``vbuf_elems`` sets the address widths, ``vpu_lanes`` and ``table_lanes`` the default
        lanes.
    lanes : int, optional
        Elements per cycle of ``VADD``, ``VSUB`` and ``VMUL`` (a power of two, 1..64; default
        ``geom.vpu_lanes``).
    table_lanes : mapping of str to int, optional
        Lookups per cycle of each function (a power of two, 1..64), overriding the default
        ``{"exp": table_lanes, "gelu": table_lanes, "recip": 1, "rsqrt": 1}`` (``geom``'s).
        Every two lanes share one two-port :class:`FP16Table` ROM (:attr:`table_roms`). The
        compiled program applies exp (softmax) and GELU (MLP) to whole vectors, but recip and
        rsqrt only to single elements, hence one lane each.

    Members
    -------
    cmd : In(stream.Signature(VectorCommand))
        Taken into the decode register (then a two-entry buffer) while fewer than three
        commands are held not started (``ready`` is one LUT after a register); the buffer's
        head starts in the last issue cycle of the command before it (or when none is
        issuing), under the overlap rules below.
    done : Out(stream.Signature(VectorOp))
        One transfer per command, in order, after its last VBUF write (the op, for checking).
        Holding ``ready`` low delays the reports; with :attr:`MAX_IN_FLIGHT` commands started
        and not yet reported the unit starts no more (and holds three more).
    read_a, read_b : Out(ReadPortSignature(rows))
        Two VBUF read ports of its own (``VectorBuffer.read[k]``): no arbitration, no stall.
    write : Out(WritePortSignature(rows))
        A VBUF write port; ``mask`` is zero whenever the unit does not write.
    busy : Out(1)
        A command is accepted (held or started) and not yet reported on ``done``;
        high from the cycle after the accept.

    Timing
    ------
    Nothing inside the unit stalls. An op reads ``beats = max(1, ceil(length / n))`` times,
    one per cycle, with ``n`` = :meth:`op_lanes` (``lanes`` for add/sub/mul, the table's lanes,
    else 64). From the cycle ``cmd`` is accepted into an idle unit to the first cycle
    ``done.valid`` is high::

        cycles = pass1 + beats + 5 + U

        U = 5   VADD, VSUB (FP16Add)          U = 4   VMUL (FP16Mul)
        U = 2   table ops (FP16Table)         U = 0   VSET
        U = 4   VMAX (RowMax 3, running maximum 1)
        U = 15  VDOT (BlockAlign 3, BlockDot 4, AccumulatorShift 2, Accumulator 1, AccToFP16 5)
        pass1 = max(1, ceil(length / 64)) for VDOT without b_scalar, else 0

    (5 = decode register, input buffer, command register, VBUF read, operand register; ``U``
    comes from the units' ``LATENCY`` in rtl/arith.py and :class:`RowMax`,
    :meth:`unit_latency`.) A command starts (leaves the input buffer) two cycles after its
    accept at the earliest; its last beat is issued ``pass1 + beats`` cycles after its start
    and its result written ``2 + U`` cycles later.

    Commands overlap: the head of the buffer starts in the cycle the previous command issues
    its last beat (so a run of one-beat commands is accepted and started one per cycle) unless

    * its first result would be written no later than a result already scheduled (the write
      port takes one command's results at a time, in order): it waits while a command with a
      larger ``U`` drains;
    * a row it reads (``a``, ``b``, or the scalar ``b``) is the destination of a command whose
      results are not all written (read after write): it waits until they are, unless it
      *follows* that command's writes and the command has written its first row (chaining:
      the command is row-rate, a whole row per cycle in order, and each operand of the head
      that meets its rows starts at or before their first row, so the head reads each row at
      least a cycle after it is written);
    * it is a ``VDOT`` with a first pass (its ``xe_max`` is one register) and a ``VDOT`` has
      results still to write;
    * :attr:`MAX_IN_FLIGHT` commands are started and not yet reported on ``done``.

    The unit accepts a command while it holds fewer than three not started (the decode
    register and the two-entry buffer). A command that waits in them takes longer than
    :meth:`cycles` from its accept to its ``done`` by its wait; :meth:`schedule` gives the
    accept and ``done`` cycles of a run (with both streams always ready). Writes of later
    commands never overtake earlier ones, and reads never see a row before an earlier
    command's write to it, so a run gives exactly the ISA's sequential results. For GPT-2 on
    u55c a LayerNorm over 768 elements (a chain, each op reading the one before) takes 158
    cycles (186 without chaining, ``schedule(cmds, chain=False)``); the softmax of 12 heads
    at T = 5, issued op by op over the heads, 83 cycles (:meth:`schedule`; 696 one by one).

    Logic depth: a decode register and the buffer sit between ``cmd`` and the start of a
    command, so the start and issue logic work from registers (the read-after-write check is
    an AND-OR of the head's ``meets`` flags and the ring's unwritten flags), and ``cmd.ready``
    is one LUT after a register; stage 2 carries each unit's valid as a flag of its own (no op
    comparison before a unit's operand isolation). The tiny VPU synthesized alone (Yosys
    ``synth_xilinx``, ``scripts/timing.py --unit "VectorUnit(tiny)"``) has at most 7 LUT levels
    between registers and from its ports (before: 17 from ``cmd`` through the decode into the
    issue state, 12 into :class:`RowMax`, 8-9 from the op register into the table
    comparators).

    Resources: ``lanes`` FP16Add and FP16Mul (one DSP each), two BlockAlign, a BlockDot (64
    12x12 products), RowMax, and the table ROMs (:attr:`table_roms`; :attr:`table_entries` x
    16 bits): one reduced :class:`FP16Table` per two lanes of a function, read through the
    block RAM's two ports (``ports=2``), and a one-port ROM for a function with one lane (exp
    31,201, recip 31,484, rsqrt 31,742, gelu 34,825 entries). Yosys (``synth_xilinx -family
    xcup``) maps a two-port ROM to one set of block RAMs: exp 14 RAMB36 (13 with one port),
    gelu 16 (16), recip and rsqrt 13 each. Default lanes: tiny 6 ROMs (2 exp, 2 GELU, recip,
    rsqrt; 3.0 Mibit, 86 RAMB36), u55c 34 ROMs (16 exp, 16 GELU, recip, rsqrt; 17.1 Mibit,
    506 RAMB36 of the U55C's 2,016, against 954 with one ROM per lane).
    """

    MAX_IN_FLIGHT = 16
    """Commands started and not yet reported on ``done``. One-beat ``VDOT``\\ s with a scalar
    ``b`` (21 cycles from accept to ``done``) start 16 back to back, then wait 4 cycles (the
    unit accepts 19 back to back, then waits 4); every other one-beat op starts one per
    cycle."""

    DEFAULT_SCALAR_TABLES = ("recip", "rsqrt")
    """Functions that get one lane by default: the compiled program applies them to one
    element at a time."""

    def __init__(
        self,
        geom: CoreGeometry,
        *,
        lanes: int | None = None,
        table_lanes: Mapping[str, int] | None = None,
    ):
        check_geometry(geom)
        if geom.vbuf_elems > 1 << 16:
            raise ValueError(
                f"vbuf_elems must be at most 65536 (16-bit ISA addresses), not {geom.vbuf_elems}"
            )
        if lanes is None:
            lanes = geom.vpu_lanes
        if not is_pow2(lanes) or lanes > ROW_ELEMS:
            raise ValueError(f"lanes must be a power of two from 1 to {ROW_ELEMS}, not {lanes!r}")
        tables = {
            f: 1 if f in self.DEFAULT_SCALAR_TABLES else geom.table_lanes
            for f in TABLE_OPS.values()
        }
        if table_lanes is not None:
            unknown = set(table_lanes) - set(tables)
            if unknown:
                raise ValueError(
                    f"table_lanes names unknown functions {sorted(unknown)}; "
                    f"the tables are {sorted(tables)}"
                )
            tables.update(table_lanes)
        for f, n in tables.items():
            if not is_pow2(n) or n > ROW_ELEMS:
                raise ValueError(
                    f"table_lanes[{f!r}] must be a power of two from 1 to {ROW_ELEMS}, not {n!r}"
                )
        self._rows = geom.vbuf_elems // ROW_ELEMS
        self._lanes = lanes
        self._table_lanes = tables
        self._op_lanes = dict.fromkeys(VectorOp, ROW_ELEMS)
        self._op_lanes.update(dict.fromkeys(_BINARY_OPS, lanes))
        self._op_lanes.update({op: tables[f] for op, f in TABLE_OPS.items()})
        dot = _probe(BlockDot())
        self._lat = {
            VectorOp.VADD: FP16Add.LATENCY,
            VectorOp.VSUB: FP16Add.LATENCY,
            VectorOp.VMUL: FP16Mul.LATENCY,
            VectorOp.VMAX: RowMax.LATENCY + 1,  # and the running maximum
            VectorOp.VDOT: BlockAlign.LATENCY
            + dot.latency
            + AccumulatorShift.LATENCY
            + Accumulator.LATENCY
            + AccToFP16.LATENCY,
            VectorOp.VSET: 0,
            **dict.fromkeys(TABLE_OPS, FP16Table.LATENCY),
        }
        super().__init__(
            geom,
            {
                "cmd": In(stream.Signature(VectorCommand)),
                "done": Out(stream.Signature(VectorOp, payload_init=VectorOp.VADD)),
                "read_a": Out(ReadPortSignature(self._rows)),
                "read_b": Out(ReadPortSignature(self._rows)),
                "write": Out(WritePortSignature(self._rows)),
                "busy": Out(1),
            }
        )

    # read-only parameters -------------------------------------------------------------------

    @property
    def rows(self) -> int:
        """VBUF rows."""
        return self._rows

    @property
    def lanes(self) -> int:
        """Elements per cycle of ``VADD``, ``VSUB`` and ``VMUL``."""
        return self._lanes

    @property
    def table_lanes(self) -> dict[str, int]:
        """Lookups per cycle of each function."""
        return dict(self._table_lanes)

    @property
    def table_roms(self) -> dict[str, int]:
        """:class:`FP16Table` ROMs of each function: one per two lanes (a two-port table), one
        for a single lane."""
        return {f: _table_ports(n)[0] for f, n in self._table_lanes.items()}

    @property
    def table_entries(self) -> int:
        """ROM entries (16 bits each) of all table ROMs together."""
        return sum(n * _probe(FP16Table(f)).depth for f, n in self.table_roms.items())

    def op_lanes(self, op) -> int:
        """Elements per read cycle of ``op``: :attr:`lanes`, a table's lanes, or 64."""
        return self._op_lanes[VectorOp(op)]

    def unit_latency(self, op) -> int:
        """``U`` of the cycle formula: the latency of ``op``'s arithmetic."""
        return self._lat[VectorOp(op)]

    def cycles(self, op, length: int, *, b_scalar: bool = False) -> int:
        """Cycles from accepting a command into an idle unit to ``done.valid`` (the docstring's
        formula; a command that waits in the input buffer takes longer by its wait)."""
        op = VectorOp(op)
        if not isinstance(length, int) or not 0 <= length <= self._geom.vbuf_elems:
            raise ValueError(f"length must be 0..{self._geom.vbuf_elems}, not {length!r}")
        beats = max(1, -(-length // self.op_lanes(op)))
        pass1 = max(1, -(-length // ROW_ELEMS)) if op is VectorOp.VDOT and not b_scalar else 0
        return pass1 + beats + 5 + self.unit_latency(op)

    def schedule(self, cmds, *, chain: bool = True) -> list[tuple[int, int]]:
        """``(accept, done)`` cycles of each of ``cmds`` (objects with ``op``, ``dst``, ``a``,
        ``b``, ``length`` and ``b_scalar``) sent back to back with ``cmd.valid`` and
        ``done.ready`` always high, counted from the first accept: the input buffer and the
        overlap rules of the class docstring, cycle for cycle. ``chain=False`` gives the cycles
        of a unit that never chains (every read waits for the last write of the rows it reads,
        and a first pass for every write), to measure what chaining saves."""
        flight = []  # (dst rows lo, hi, last write cycle, first write cycle, row rate, VDOT)
        starts = []  # the cycle each command started (left the input buffer)
        accept = -1
        t = 0
        issue_end = horizon = -(1 << 30)
        out = []
        for k, c in enumerate(cmds):
            op = VectorOp(c.op)
            u = self.unit_latency(op)
            n = self.cycles(op, c.length, b_scalar=c.b_scalar) - 5 - u  # pass1 + beats
            # the unit accepts a command while it holds fewer than three not started (in the
            # decode register and the buffer; cmd.ready is registered): once the command three
            # ahead has started. It can start two cycles after its accept.
            accept = max(accept + 1, starts[k - 3] + 1 if k >= 3 else 0)
            t = max(t, accept + 2)
            rows = max(1, -(-c.length // ROW_ELEMS))
            reads = []  # (first row, end row)
            if op is not VectorOp.VSET:
                reads.append((c.a // ROW_ELEMS, c.a // ROW_ELEMS + rows))
            if op in _READS_B:
                b = c.b // ROW_ELEMS
                reads.append((b, b + (1 if c.b_scalar else rows)))
            pass1 = op is VectorOp.VDOT and not c.b_scalar
            while True:
                t0 = t
                t = max(t, issue_end, horizon - 2 - u)
                for lo, hi, w, w1, row_rate, dot in flight:
                    if w < t:
                        continue
                    if pass1 and (dot or not chain):  # the first pass's xe_max register
                        t = w + 1
                        continue
                    met = [a for a, b in reads if a < hi and lo < b]
                    if not met:
                        continue
                    # chaining: reads that follow a row-rate command's writes, row by row
                    follows = chain and row_rate and all(a <= lo for a in met)
                    t = max(t, (w1 if follows else w) + 1)
                busy = sorted(w for _, _, w, *_ in flight if w + 1 >= t)
                if len(busy) >= self.MAX_IN_FLIGHT:
                    t = max(t, busy[len(busy) - self.MAX_IN_FLIGHT] + 2)
                if t == t0:
                    break
            w = t + n + 2 + u
            d = c.dst // ROW_ELEMS
            point = op in _POINT_OPS
            row_rate = self.op_lanes(op) == ROW_ELEMS and not point
            flight.append(
                (d, d + (1 if point else rows), w, w - n + 1, row_rate, op is VectorOp.VDOT)
            )
            issue_end, horizon = t + n, w
            starts.append(t)
            out.append((accept, w + 1))
            t += 1
        return out

    # ----------------------------------------------------------------------------------------

    def elaborate(self, platform):
        m = Module()
        ring = self._in_flight(m)
        head = self._input_buffer(m, self._decode(m), ring)
        issue = self._issue(m, head, ring)
        s2 = self._operands(m, issue)
        # Every unit's output is always ready: nothing in the VPU stalls. Each result source
        # appends (valid, row, row data, mask, last) to ``writes``.
        writes = []
        self._lane_groups(m, s2, writes)
        self._vmax(m, s2, writes)
        self._vdot(m, head, s2, writes)
        self._write_back(m, head.take, ring, writes)
        return m

    def _lane_classes(self) -> list[int]:
        """The distinct elements per cycle of the ops (each a class of ops for the decode)."""
        return sorted(set(self._op_lanes.values()))

    def _decoded_layout(self, *, buffered: bool):
        """A command as the decode register holds it (``buffered=False``: its fields and what
        derives from them with at most one adder), or as the input buffer holds it (also the
        last beat and ``meets``, the ring entries its operand rows meet)."""
        row_bits = len(self.read_a.addr)
        max_u = max(self._lat.values())
        fields = {
            "op": VectorOp,
            "dst_row": row_bits,
            "dst_hi": row_bits + 1,  # dst rows [dst_row, dst_hi)
            "a_row": row_bits,
            "a_hi": row_bits + 1,  # rows read through a: [a_row, a_hi), empty (0) if none
            "b_row": row_bits,
            "b_hi": row_bits + 1,
            "scalar": 1,
            "imm": 16,
            "pass1": 1,  # VDOT's first pass over b
            "reads_a": 1,
            "reads_b": 1,
            "last_row": row_bits,  # of the operand rows
            "first_last": 1,  # the first beat is the last of its pass
            "p1_beats": row_bits + 1,  # beats of the first pass (0: none)
            "chunk_bits": range(7),  # log2(64 / lanes)
            "last_mask": ROW_ELEMS,  # live elements of the last row
            "u2": range(max_u + 3),  # 2 + U
            "u3": range(max_u + 4),  # 3 + U
            "row_rate": 1,  # writes a whole row per cycle, rows in order (may be chained)
        }
        if buffered:
            fields["last_beat"] = range(self._geom.vbuf_elems)  # of the main pass
            fields["meets"] = self.MAX_IN_FLIGHT
            # ring entries whose writes its reads may follow row by row (row-rate entries
            # whose first row its operands reach first: chaining, in the class docstring)
            fields["chains"] = self.MAX_IN_FLIGHT
        else:
            fields["empty"] = 1
            fields["length_m1"] = 16
            fields["lanes"] = len(self._lane_classes())  # one-hot: the op's elements per cycle
        return data.StructLayout(fields)

    def _decode(self, m):
        """The incoming command, decoded (combinational, from ``cmd.payload`` only) into
        ``_decoded_layout(buffered=False)``: what the decode register holds. Row ranges come
        from one adder each: ``a`` is a multiple of 64 in the ISA but its low 6 bits are
        ignored, so ``ceil((a + length) / 64)`` is ``((a_row, 63) + length) >> 6``."""
        cmd = self.cmd.payload
        dec = Signal(self._decoded_layout(buffered=False))
        length = cmd.length
        empty = length == 0

        def row_end(addr):  # first row past [addr, addr + max(1, length))
            row = addr[6:]
            return Mux(empty, row + 1, (Cat(Const(ROW_ELEMS - 1, 6), row) + length) >> 6)

        is_ = {o: cmd.op == o for o in VectorOp}
        reads_a = ~is_[VectorOp.VSET]
        reads_b = Cat(*(is_[o] for o in _READS_B)).any()
        point = Cat(*(is_[o] for o in _POINT_OPS)).any()  # writes one element
        pass1 = is_[VectorOp.VDOT] & ~cmd.b_scalar
        rem = length[:6]
        rows = Mux(empty, 1, (length + (ROW_ELEMS - 1)) >> 6)  # max(1, ceil(length / 64))
        classes = self._lane_classes()
        single = Signal()  # the main pass has one beat: length <= lanes
        log_lanes = Signal(range(7))
        u = Signal(range(max(self._lat.values()) + 1))
        with m.Switch(cmd.op):
            for o in VectorOp:
                with m.Case(o):
                    n = self._op_lanes[o]
                    m.d.comb += [
                        dec.row_rate.eq(int(n == ROW_ELEMS and o not in _POINT_OPS)),
                        dec.lanes.eq(1 << classes.index(n)),
                        single.eq(length <= n),
                        log_lanes.eq(n.bit_length() - 1),
                        u.eq(self._lat[o]),
                    ]
        m.d.comb += [
            dec.op.eq(cmd.op),
            dec.dst_row.eq(cmd.dst[6:]),
            dec.dst_hi.eq(Mux(point, cmd.dst[6:] + 1, row_end(cmd.dst))),
            dec.a_row.eq(cmd.a[6:]),
            dec.a_hi.eq(Mux(reads_a, row_end(cmd.a), 0)),
            dec.b_row.eq(cmd.b[6:]),
            dec.b_hi.eq(Mux(reads_b, Mux(cmd.b_scalar, cmd.b[6:] + 1, row_end(cmd.b)), 0)),
            dec.scalar.eq(cmd.b_scalar),
            dec.imm.eq(cmd.imm),
            dec.pass1.eq(pass1),
            dec.reads_a.eq(reads_a),
            dec.reads_b.eq(reads_b),
            dec.last_row.eq(Mux(empty, 0, (length - 1) >> 6)),
            dec.first_last.eq(Mux(pass1, length <= ROW_ELEMS, single)),
            dec.p1_beats.eq(Mux(pass1, rows, 0)),
            dec.chunk_bits.eq(6 - log_lanes),
            # element e is live in the last row when e < rem (all of them when rem is 0), by
            # comparison: no shifter and no carry chain
            dec.last_mask.eq(
                Cat(*(~empty & ((rem == 0) | (rem > e)) for e in range(ROW_ELEMS)))
            ),
            dec.u2.eq(u + 2),
            dec.u3.eq(u + 3),
            dec.empty.eq(empty),
            dec.length_m1.eq(length - 1),
        ]
        return dec

    def _input_buffer(self, m, dec, ring):
        """The decode register and a two-entry input buffer between ``cmd`` and the start of a
        command. ``cmd.ready`` is registered (fewer than three commands held), the buffer's
        head is a register, and with one start per cycle a command moves in every cycle.

        Each buffered command keeps ``meets``: which ring entries its operand rows meet. It is
        computed as the command enters the buffer (against the ring, and against the command
        starting in that cycle, which takes the entry at ``alloc_ptr``) and updated when the
        command ahead of it starts; ring ranges change only on a start. So the head's
        read-after-write ``hazard`` is one AND-OR of registers.

        Returns the head (``e``, valid ``valid``), ``take`` (the head starts this cycle; set by
        :meth:`_issue`) and ``hazard``."""
        K = self.MAX_IN_FLIGHT
        layout = self._decoded_layout(buffered=True)
        p = Signal(self._decoded_layout(buffered=False))  # the decode register
        pv = Signal()
        e0 = Signal(layout)  # the head
        e1 = Signal(layout)
        v0 = Signal()
        v1 = Signal()
        take = Signal()
        xfer = Signal()
        pmove = Signal()  # the decode register's command enters the buffer
        m.d.comb += [
            self.cmd.ready.eq(~(pv & v1)),
            xfer.eq(self.cmd.valid & ~(pv & v1)),
            pmove.eq(pv & (~v1 | take)),
        ]
        with m.If(xfer):
            m.d.sync += p.eq(dec)
        m.d.sync += pv.eq(xfer | (pv & ~pmove))

        def meets(x, lo, hi):  # whether x's a and b operand rows meet the rows [lo, hi)
            return (x.a_row < hi) & (lo < x.a_hi), (x.b_row < hi) & (lo < x.b_hi)

        def touches(x, lo, hi):  # the operand rows of x meet the rows [lo, hi)
            a, b = meets(x, lo, hi)
            return a | b

        def follows(x, lo, hi, row_rate):
            # x may read the rows [lo, hi) of a row-rate command as they are written: each of
            # its operands that meets them starts at or before lo, so x reads row lo + k no
            # earlier than k cycles after its first read (a scalar b that meets them is row lo)
            a, b = meets(x, lo, hi)
            return row_rate & (~a | (x.a_row <= lo)) & (~b | (x.b_row <= lo))

        alloc = [ring.alloc_ptr[: ring.ptr_bits - 1] == j for j in range(K)]
        h = e0
        inc = Signal(layout)  # the decode register's command as the buffer takes it
        for name in self._decoded_layout(buffered=False).members:
            if name in layout.members:
                m.d.comb += getattr(inc, name).eq(getattr(p, name))
        shifts = [n.bit_length() - 1 for n in self._lane_classes()]
        last_beat = 0  # length_m1 >> log2(lanes), by the one-hot class: an OR of ANDs
        for c, s in enumerate(shifts):
            last_beat = last_beat | Mux(p.lanes[c], p.length_m1 >> s, 0)
        m.d.comb += inc.last_beat.eq(Mux(p.empty, 0, last_beat))
        p_meets_head = touches(p, h.dst_row, h.dst_hi)
        e1_meets_head = touches(e1, h.dst_row, h.dst_hi)
        p_follows_head = follows(p, h.dst_row, h.dst_hi, h.row_rate)
        e1_follows_head = follows(e1, h.dst_row, h.dst_hi, h.row_rate)
        m.d.comb += [
            inc.meets.eq(
                Cat(
                    *(
                        Mux(take & alloc[j], p_meets_head, touches(p, ring.e_lo[j], ring.e_hi[j]))
                        for j in range(K)
                    )
                )
            ),
            inc.chains.eq(
                Cat(
                    *(
                        Mux(
                            take & alloc[j],
                            p_follows_head,
                            follows(p, ring.e_lo[j], ring.e_hi[j], ring.e_row_rate[j]),
                        )
                        for j in range(K)
                    )
                )
            ),
        ]
        moved = Signal(K)  # e1's meets once the head has started (it moves to e0)
        moved_chains = Signal(K)
        m.d.comb += [
            moved.eq(Cat(*(Mux(alloc[j], e1_meets_head, e1.meets[j]) for j in range(K)))),
            moved_chains.eq(Cat(*(Mux(alloc[j], e1_follows_head, e1.chains[j]) for j in range(K)))),
        ]
        with m.If(~v0 | take):
            with m.If(v1):
                m.d.sync += [e0.eq(e1), e0.meets.eq(moved), e0.chains.eq(moved_chains)]
            with m.Else():
                m.d.sync += e0.eq(inc)
        with m.If(pmove):
            m.d.sync += e1.eq(inc)
        m.d.sync += [
            v0.eq(v1 | pmove | (v0 & ~take)),
            v1.eq(Mux(v1, ~take | pmove, pmove & v0 & ~take)),
        ]
        hazard = Signal()  # an operand row of the head still to be written by a command
        m.d.comb += hazard.eq(
            (ring.e_unwritten & h.meets & ~(h.chains & ring.e_first)).any()
        )
        return SimpleNamespace(e=e0, valid=v0, take=take, hazard=hazard, pending=pv)

    def _in_flight(self, m):
        """The commands in flight (started, not yet reported on ``done``): a ring of
        :attr:`MAX_IN_FLIGHT` entries in start order, each with its op and destination rows.

        [wr_ptr, alloc_ptr) have results still to write, [done_ptr, wr_ptr) wait for ``done``.
        Pointers count modulo 2K. The entries are written on a start (:meth:`_issue`) and
        retired on the last result write (:meth:`_write_back`)."""
        K = self.MAX_IN_FLIGHT
        ptr_bits = K.bit_length()
        row_bits = len(self.read_a.addr)
        return SimpleNamespace(
            K=K,
            ptr_bits=ptr_bits,
            alloc_ptr=Signal(ptr_bits),
            wr_ptr=Signal(ptr_bits),
            done_ptr=Signal(ptr_bits),
            e_op=[Signal(VectorOp, name=f"fl{j}_op", init=VectorOp.VADD) for j in range(K)],
            e_lo=[Signal(row_bits, name=f"fl{j}_lo") for j in range(K)],  # dst rows [lo, hi)
            e_hi=[Signal(row_bits + 1, name=f"fl{j}_hi") for j in range(K)],
            e_unwritten=Signal(K),
            e_row_rate=Signal(K),  # writes a whole row per cycle, in order
            e_dot=Signal(K),  # a VDOT (its second pass uses the first pass's xe_max)
            e_first=Signal(K),  # has written its first row
        )

    def _issue(self, m, head, ring):
        """Acceptance (the head of the input buffer starts: the overlap rules) and issue: one
        beat (a row, or a chunk of it for a narrower op) per cycle, driving the read ports.
        Returns the issue stage's registers for the operand stages."""
        row_bits = len(self.read_a.addr)
        h = head.e
        K, ptr_bits = ring.K, ring.ptr_bits
        # cycles from now to the last result write scheduled (0: none ahead)
        max_u = max(self._lat.values())
        wr_horizon = Signal(range(self._geom.vbuf_elems + self._rows + 3 + max_u))
        issuing = Signal()
        op = Signal(VectorOp, init=VectorOp.VADD)
        dst_row = Signal(row_bits)
        a_row = Signal(row_bits)
        b_row = Signal(row_bits)
        scalar = Signal()
        imm = Signal(16)
        last_row = Signal(row_bits)
        last_beat = Signal.like(h.last_beat)
        chunk_bits = Signal(range(7))  # log2(64 / lanes)
        last_mask = Signal(ROW_ELEMS)  # live elements of the last row
        beat = Signal(17)
        pass1 = Signal()  # VDOT's first pass over b
        i_last = Signal()  # this beat is the last of its pass (a register)
        reads_a = Signal()
        reads_b = Signal()

        i_row = Signal(17)
        i_chunk = Signal(6)
        m.d.comb += [
            i_row.eq(Mux(pass1, beat, beat >> chunk_bits)),
            i_chunk.eq(Mux(pass1, 0, beat & ((Const(1, 7) << chunk_bits) - 1))),
        ]
        # The head starts in the last beat of the command issuing (or when none is), if its
        # first result comes after every write already scheduled (the write port serves one
        # command at a time, in order), none of its operand rows is still to be written, the
        # ring has room, and, for a VDOT with a first pass (it keeps xe_max in one register),
        # nothing is in flight.
        slot_free = ~issuing | (i_last & ~pass1)
        in_order = wr_horizon < h.u3
        n_flight = Signal(ptr_bits)
        m.d.comb += [
            n_flight.eq(ring.alloc_ptr - ring.done_ptr),
            self.busy.eq(head.pending | head.valid | (ring.alloc_ptr != ring.done_ptr)),
        ]
        m.d.comb += head.take.eq(
            head.valid
            & slot_free
            & in_order
            & ~head.hazard
            & (n_flight < K)
            & (~h.pass1 | ~(ring.e_unwritten & ring.e_dot).any())
        )
        take = head.take
        with m.If(take):
            m.d.sync += wr_horizon.eq(h.p1_beats + h.last_beat + h.u2)
        with m.Elif(wr_horizon != 0):
            m.d.sync += wr_horizon.eq(wr_horizon - 1)

        with m.If(issuing):
            with m.If(i_last & pass1):
                m.d.sync += [beat.eq(0), pass1.eq(0), i_last.eq(last_beat == 0)]
            with m.Elif(i_last):
                m.d.sync += issuing.eq(0)
            with m.Else():
                m.d.sync += [
                    beat.eq(beat + 1),
                    i_last.eq(beat + 1 == Mux(pass1, last_row, last_beat)),
                ]
        with m.If(take):
            m.d.sync += [
                issuing.eq(1),
                beat.eq(0),
                pass1.eq(h.pass1),
                i_last.eq(h.first_last),
                op.eq(h.op),
                dst_row.eq(h.dst_row),
                a_row.eq(h.a_row),
                b_row.eq(h.b_row),
                scalar.eq(h.scalar),
                imm.eq(h.imm),
                last_row.eq(h.last_row),
                last_beat.eq(h.last_beat),
                chunk_bits.eq(h.chunk_bits),
                last_mask.eq(h.last_mask),
                reads_a.eq(h.reads_a),
                reads_b.eq(h.reads_b),
            ]
            for j in range(K):
                with m.If(ring.alloc_ptr[: ptr_bits - 1] == j):
                    m.d.sync += [
                        ring.e_op[j].eq(h.op),
                        ring.e_lo[j].eq(h.dst_row),
                        ring.e_hi[j].eq(h.dst_hi),
                        ring.e_row_rate[j].eq(h.row_rate),
                        ring.e_dot[j].eq(h.op == VectorOp.VDOT),
                    ]
            m.d.sync += ring.alloc_ptr.eq(ring.alloc_ptr + 1)

        m.d.comb += [
            self.read_a.addr.eq(a_row + i_row),
            self.read_a.en.eq(issuing & reads_a & ~pass1 & (i_chunk == 0)),
            self.read_b.addr.eq(b_row + Mux(scalar, 0, i_row)),
            self.read_b.en.eq(issuing & reads_b & Mux(scalar, ~pass1 & (beat == 0), i_chunk == 0)),
        ]
        return SimpleNamespace(
            issuing=issuing,
            op=op,
            dst_row=dst_row,
            scalar=scalar,
            imm=imm,
            last_row=last_row,
            last_mask=last_mask,
            beat=beat,
            pass1=pass1,
            i_row=i_row,
            i_chunk=i_chunk,
            i_last=i_last,
        )

    def _operands(self, m, s0):
        """Stage 1 (the rows arrive from the read ports: mask, broadcast and select) and stage 2
        (the operand registers that feed the units). Returns stage 2.

        The op is decoded once, at stage 1's registers, into flags (which chunk width, VMAX,
        VDOT, and each unit's valid at stage 2), so no 8-bit op comparison sits in front of
        the multiplexers or the units' operand isolation."""
        row_bits = len(self.read_a.addr)
        narrow = sorted({n for n in self._op_lanes.values() if n < ROW_ELEMS})
        units = {
            "add": (VectorOp.VADD, VectorOp.VSUB),
            "sub": (VectorOp.VSUB,),
            "mul": (VectorOp.VMUL,),
            **{f: (o,) for o, f in TABLE_OPS.items()},
            "max": (VectorOp.VMAX,),
            "dot": (VectorOp.VDOT,),
            "set": (VectorOp.VSET,),
        }
        op = s0.op
        # Each stage has its own copy of the command's fields: the next command may be issuing.
        s1_valid = Signal()
        s1_row = Signal(row_bits)
        s1_chunk = Signal(6)
        s1_first = Signal()
        s1_last = Signal()
        s1_pass1 = Signal()
        s1_last_row = Signal()  # the operand row is the last (its elements past length are dead)
        s1_width = {n: Signal(name=f"s1_width{n}") for n in narrow}  # the op takes n per cycle
        s1_go = {u: Signal(name=f"s1_go_{u}") for u in units}  # the op's unit, valid or not
        scalar1 = Signal()
        last_mask1 = Signal(ROW_ELEMS)
        dst1 = Signal(row_bits)
        imm1 = Signal(16)
        m.d.sync += [
            s1_valid.eq(s0.issuing),
            s1_row.eq(s0.i_row),
            s1_chunk.eq(s0.i_chunk),
            s1_first.eq(s0.beat == 0),
            s1_last.eq(s0.i_last & ~s0.pass1),
            s1_pass1.eq(s0.pass1),
            s1_last_row.eq(s0.i_row[:row_bits] == s0.last_row),
            scalar1.eq(s0.scalar),
            last_mask1.eq(s0.last_mask),
            dst1.eq(s0.dst_row),
            imm1.eq(s0.imm),
        ]
        for n, flag in s1_width.items():
            m.d.sync += flag.eq(Cat(*(op == o for o, k in self._op_lanes.items() if k == n)).any())
        for u, ops in units.items():
            m.d.sync += s1_go[u].eq(Cat(*(op == o for o in ops)).any())
        live = Signal(ROW_ELEMS)  # elements of this row below length
        m.d.comb += live.eq(Mux(s1_last_row, last_mask1, _ONES))
        # Ops narrower than a row take a chunk of it per cycle, moved to element 0 up.
        chunk_mask = Signal(ROW_ELEMS)
        a_in = self.read_a.data.as_value()
        b_row_in = Mux(scalar1, _broadcast(self.read_b.data[0]), self.read_b.data.as_value())
        a_sel = Signal(len(a_in))
        b_sel = Signal(len(a_in))
        m.d.comb += [chunk_mask.eq(_ONES), a_sel.eq(a_in), b_sel.eq(b_row_in)]
        for n, flag in s1_width.items():
            chunk = s1_chunk[: 6 - (n.bit_length() - 1)]
            with m.If(flag):
                m.d.comb += [
                    a_sel.eq(a_in.word_select(chunk, 16 * n)),
                    b_sel.eq(b_row_in.word_select(chunk, 16 * n)),
                    chunk_mask.eq(Cat(*(chunk == (e // n) for e in range(ROW_ELEMS)))),
                ]
        keep = _widen(live)
        neg_inf = _broadcast(Const(numerics.NEG_INF, 16))
        a_op = Signal(len(a_in))
        with m.If(s1_go["max"]):  # past the length: -Inf, the identity of max
            m.d.comb += a_op.eq((a_in & keep) | (neg_inf & ~keep))
        with m.Elif(s1_go["dot"]):  # past the length: +0
            m.d.comb += a_op.eq(a_in & keep)
        with m.Else():
            m.d.comb += a_op.eq(a_sel)
        # VDOT with a scalar b: xe_max is the scalar's exponent (the port holds the row read at
        # the first beat)
        b_exp = self.read_b.data[0][10:15]

        s2_valid = Signal()
        s2_a = Signal(Row)
        s2_b = Signal(Row)
        s2_row = Signal(row_bits)  # the result row: dst + the operand row
        s2_mask = Signal(ROW_ELEMS)
        s2_first = Signal()
        s2_last = Signal()
        s2_pass1 = Signal()
        s2_go = {u: Signal(name=f"s2_go_{u}") for u in units}  # valid & the op's unit
        dst2 = Signal(row_bits)
        imm2 = Signal(16)
        scalar2 = Signal()
        xe2 = Signal(5)
        m.d.sync += [
            s2_valid.eq(s1_valid),
            s2_a.as_value().eq(a_op),
            s2_b.as_value().eq(Mux(s1_go["dot"], b_sel & keep, b_sel)),
            s2_row.eq(dst1 + s1_row),
            s2_mask.eq(live & chunk_mask),
            s2_first.eq(s1_first),
            s2_last.eq(s1_last),
            s2_pass1.eq(s1_pass1),
            dst2.eq(dst1),
            imm2.eq(imm1),
            scalar2.eq(scalar1),
            xe2.eq(Mux(b_exp == 0, 1, b_exp)),
        ]
        m.d.sync += [s2_go[u].eq(s1_valid & s1_go[u]) for u in units]
        # the adders' operands isolated in registers of their own (zeros unless an add or a
        # subtraction runs), so no AND with the valid flag sits in front of their exponent
        # compare (7 LUT levels to its register, 8 with the AND in some mappings)
        s2_add_a = Signal(Row)
        s2_add_b = Signal(Row)
        add_go = s1_valid & s1_go["add"]
        m.d.sync += [
            s2_add_a.as_value().eq(_isolate(a_op, add_go)),
            s2_add_b.as_value().eq(_isolate(b_sel, add_go)),
        ]
        return SimpleNamespace(
            valid=s2_valid,
            a=s2_a,
            b=s2_b,
            row=s2_row,
            mask=s2_mask,
            first=s2_first,
            last=s2_last,
            pass1=s2_pass1,
            go=s2_go,
            add_a=s2_add_a,
            add_b=s2_add_b,
            dst=dst2,
            imm=imm2,
            scalar=scalar2,
            xe=xe2,
        )

    def _lane_groups(self, m, s2, writes):
        """The element-wise units, ``n`` lanes per op in lockstep (only lane 0 of a group
        carries the write tag), and ``VSET``, which writes from the operand stage."""
        row_bits = len(self.read_a.addr)
        wtag = data.StructLayout({"row": row_bits, "mask": ROW_ELEMS, "last": 1})

        def set_tag(i):
            t = i.payload.tag
            return [t.row.eq(s2.row), t.mask.eq(s2.mask), t.last.eq(s2.last)]

        def lane_group(name, n, make, operands, valid, *, ports=1, isolated=False):
            """``n`` lanes from ``n // ports`` units ``make(tag)`` of ``ports`` stream pairs
            each (a two-port table serves two lanes); returns the lanes' (i, o) streams.
            ``isolated``: the operands are already zero unless ``valid``."""
            lanes = []
            for k in range(n // ports):
                u = make(wtag if k == 0 else unsigned(0))
                m.submodules[f"{name}{k}"] = u
                lanes += u.stream_pairs
            for k, (i, o) in enumerate(lanes):
                m.d.comb += [i.valid.eq(valid), o.ready.eq(1)]
                m.d.comb += [
                    getattr(i.payload, port).eq(row[k] if isolated else _isolate(row[k], valid))
                    for port, row in operands.items()
                ]
            i, o = lanes[0]
            m.d.comb += set_tag(i)
            values = Cat(*(o.payload.value.as_value() for _, o in lanes))
            writes.append(
                (
                    o.valid,
                    o.payload.tag.row,
                    values.replicate(ROW_ELEMS // n),
                    o.payload.tag.mask,
                    o.payload.tag.last,
                )
            )
            return lanes

        adders = lane_group(
            "add",
            self._lanes,
            lambda tag: FP16Add(tag=tag),
            {"a": s2.add_a, "b": s2.add_b},
            s2.go["add"],
            isolated=True,
        )
        m.d.comb += [i.payload.op.eq(Mux(s2.go["sub"], AddOp.SUB, AddOp.ADD)) for i, _ in adders]
        lane_group(
            "mul",
            self._lanes,
            lambda tag: FP16Mul(tag=tag),
            {"a": s2.a, "b": s2.b},
            s2.go["mul"],
        )
        for f in TABLE_OPS.values():
            _, ports = _table_ports(self._table_lanes[f])
            lane_group(
                f,
                self._table_lanes[f],
                lambda tag, f=f, ports=ports: FP16Table(f, ports=ports, tag=tag),
                {"x": s2.a},
                s2.go[f],
                ports=ports,
            )

        # VSET writes from the operand stage.
        writes.append(
            (s2.go["set"], s2.row, _broadcast(s2.imm), s2.mask, s2.last)
        )

    def _vmax(self, m, s2, writes):
        """``VMAX``: row maxima (:class:`RowMax`), then the running maximum over the rows."""
        row_bits = len(self.read_a.addr)
        flags = data.StructLayout({"first": 1, "last": 1, "dst": row_bits})
        m.submodules.rowmax = rowmax = RowMax(tag=flags)
        max_valid = s2.go["max"]
        m.d.comb += [
            rowmax.i.valid.eq(max_valid),
            rowmax.i.payload.x.eq(_isolate(s2.a.as_value(), max_valid)),
            rowmax.i.payload.tag.first.eq(s2.first),
            rowmax.i.payload.tag.last.eq(s2.last),
            rowmax.i.payload.tag.dst.eq(s2.dst),
            rowmax.o.ready.eq(1),
        ]
        run_key = Signal(16)
        run_nan = Signal()
        max_done = Signal()
        max_dst = Signal(row_bits)
        r = rowmax.o.payload
        m.d.sync += [max_done.eq(rowmax.o.valid & r.tag.last), max_dst.eq(r.tag.dst)]
        with m.If(rowmax.o.valid):
            m.d.sync += [
                run_key.eq(Mux(r.tag.first | (r.key > run_key), r.key, run_key)),
                run_nan.eq(r.nan | (run_nan & ~r.tag.first)),
            ]
        max_value = Mux(run_nan, numerics.CANONICAL_NAN, RowMax.from_key(run_key))
        writes.append((max_done, max_dst, max_value, Const(1, ROW_ELEMS), 1))

    def _vdot(self, m, c, s2, writes):
        """``VDOT``: a is the weight side, b the input side (``numerics.dot_fp16``), through
        :class:`BlockAlign` x2, :class:`BlockDot`, :class:`AccumulatorShift`,
        :class:`Accumulator` and :class:`AccToFP16`.

        xe_max travels with the rows: a scalar b's exponent from stage 2, else the first pass's
        maximum, final by the time the second pass's rows leave the aligners."""
        row_bits = len(self.read_a.addr)
        a_flags = data.StructLayout({"first": 1, "last": 1, "dst": row_bits, "scalar": 1, "xe": 5})
        m.submodules.align_a = align_a = BlockAlign(tag=a_flags)
        m.submodules.align_b = align_b = BlockAlign(tag=unsigned(1))  # pass 1
        dot_a_valid = s2.go["dot"] & ~s2.pass1
        dot_b_valid = s2.go["dot"]
        m.d.comb += [
            align_a.i.valid.eq(dot_a_valid),
            align_a.i.payload.x.eq(_isolate(s2.a.as_value(), dot_a_valid)),
            align_a.i.payload.tag.first.eq(s2.first),
            align_a.i.payload.tag.last.eq(s2.last),
            align_a.i.payload.tag.dst.eq(s2.dst),
            align_a.i.payload.tag.scalar.eq(s2.scalar),
            align_a.i.payload.tag.xe.eq(s2.xe),
            align_a.o.ready.eq(1),
            align_b.i.valid.eq(dot_b_valid),
            align_b.i.payload.x.eq(_isolate(s2.b.as_value(), dot_b_valid)),
            align_b.i.payload.tag.eq(s2.pass1),
            align_b.o.ready.eq(1),
        ]
        xe_run = Signal(5)  # the first pass's largest block exponent of b
        with m.If(c.take & c.e.pass1):
            m.d.sync += xe_run.eq(1)
        with m.Elif(align_b.o.valid & align_b.o.payload.tag & (align_b.o.payload.exp > xe_run)):
            m.d.sync += xe_run.eq(align_b.o.payload.exp)

        term = data.StructLayout({"first": 1, "last": 1, "nonfinite": 1})
        carry = data.StructLayout({"xe": 5, "dst": row_bits})
        dot_tag = data.StructLayout({"term": term, "w_exp": 5, "x_exp": 5, "carry": carry})
        m.submodules.dot = dot = BlockDot(tag=dot_tag)
        wa, xb = align_a.o.payload, align_b.o.payload
        m.d.comb += [
            dot.i.valid.eq(align_a.o.valid),
            dot.i.payload.w.eq(wa.q),
            dot.i.payload.x.eq(xb.q),
            dot.i.payload.tag.term.first.eq(wa.tag.first),
            dot.i.payload.tag.term.last.eq(wa.tag.last),
            dot.i.payload.tag.term.nonfinite.eq(wa.nonfinite | xb.nonfinite),
            dot.i.payload.tag.w_exp.eq(wa.exp),
            dot.i.payload.tag.x_exp.eq(xb.exp),
            dot.i.payload.tag.carry.xe.eq(Mux(wa.tag.scalar, wa.tag.xe, xe_run)),
            dot.i.payload.tag.carry.dst.eq(wa.tag.dst),
            dot.o.ready.eq(1),
        ]
        shift_tag = data.StructLayout({"term": term, "carry": carry})
        m.submodules.shift = shift = AccumulatorShift(sum_shape=dot.sum_shape, tag=shift_tag)
        d = dot.o.payload
        m.d.comb += [
            shift.i.valid.eq(dot.o.valid),
            shift.i.payload.sum.eq(d.sum),
            shift.i.payload.w_exp.eq(d.tag.w_exp),
            shift.i.payload.x_exp.eq(d.tag.x_exp),
            shift.i.payload.xe_max.eq(d.tag.carry.xe),
            shift.i.payload.tag.term.eq(d.tag.term),
            shift.i.payload.tag.carry.eq(d.tag.carry),
            shift.o.ready.eq(1),
        ]
        acc_tag = data.StructLayout({"carry": carry, "nonfinite": 1})
        m.submodules.acc = acc = Accumulator(tag=acc_tag)
        s = shift.o.payload
        nonfinite = Signal()  # any live element of a or b in this row's earlier terms
        nonfinite_now = Signal()
        m.d.comb += nonfinite_now.eq(s.tag.term.nonfinite | (nonfinite & ~s.tag.term.first))
        with m.If(shift.o.valid):
            m.d.sync += nonfinite.eq(nonfinite_now)
        m.d.comb += [
            acc.i.valid.eq(shift.o.valid),
            acc.i.payload.value.eq(s.value),
            acc.i.payload.first.eq(s.tag.term.first),
            acc.i.payload.last.eq(s.tag.term.last),
            acc.i.payload.tag.carry.eq(s.tag.carry),
            acc.i.payload.tag.nonfinite.eq(nonfinite_now),
            acc.o.ready.eq(1),
        ]
        m.submodules.round = rnd = AccToFP16(tag=unsigned(row_bits))
        at = acc.o.payload.tag
        m.d.comb += [
            rnd.i.valid.eq(acc.o.valid),
            rnd.i.payload.acc.eq(acc.o.payload.acc),
            rnd.i.payload.lam.eq(at.carry.xe + int(numerics.acc_lsb_exponent(0))),
            rnd.i.payload.nonfinite.eq(at.nonfinite),
            rnd.i.payload.tag.eq(at.carry.dst),
            rnd.o.ready.eq(1),
        ]
        writes.append(
            (rnd.o.valid, rnd.o.payload.tag, rnd.o.payload.value.as_value(), Const(1, ROW_ELEMS), 1)
        )

    def _write_back(self, m, accept, ring, writes):
        """The write port (one source at a time: the overlap rules keep them apart) and
        completion: a command is written with its last result row, then reported on
        ``done``."""
        w_valid = Signal()
        w_last = Signal()
        for valid, row, value, mask, last in writes:
            with m.If(valid):
                m.d.comb += [
                    w_valid.eq(1),
                    w_last.eq(last),
                    self.write.addr.eq(row),
                    self.write.data.as_value().eq(value),
                    self.write.mask.eq(mask),
                ]

        K, ptr_bits = ring.K, ring.ptr_bits
        wrote = w_valid & w_last
        with m.If(wrote):
            m.d.sync += ring.wr_ptr.eq(ring.wr_ptr + 1)
        for j in range(K):
            with m.If(accept & (ring.alloc_ptr[: ptr_bits - 1] == j)):
                m.d.sync += [ring.e_unwritten[j].eq(1), ring.e_first[j].eq(0)]
            with m.Elif(w_valid & (ring.wr_ptr[: ptr_bits - 1] == j)):
                m.d.sync += ring.e_first[j].eq(1)
                with m.If(w_last):
                    m.d.sync += ring.e_unwritten[j].eq(0)
        m.d.comb += [
            self.done.valid.eq(ring.done_ptr != ring.wr_ptr),
            self.done.payload.eq(Array(ring.e_op)[ring.done_ptr[: ptr_bits - 1]]),
        ]
        with m.If(self.done.valid & self.done.ready):
            m.d.sync += ring.done_ptr.eq(ring.done_ptr + 1)
