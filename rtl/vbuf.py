"""The vector buffer (VBUF): the decode core's on-chip binary16 vectors, one 64-element row per
numeric block."""

# No `from __future__ import annotations`: data.Struct reads its annotations as shapes.

from amaranth import Module, unsigned
from amaranth.lib import data, memory, wiring
from amaranth.lib.wiring import In, Out

from tandem.checks import check_int
from tandem.geometry import CoreGeometry, check_geometry
from tandem.isa import VBUF_ALIGN
from tandem.numerics import BLOCK

from .component import GeometryComponent

__all__ = [
    "ROW_ELEMS",
    "ReadPortSignature",
    "Row",
    "VectorBuffer",
    "WritePortSignature",
    "row_addr_bits",
]

ROW_ELEMS = BLOCK
"""Elements per VBUF row: one numeric block, and the ISA's operand alignment."""

if VBUF_ALIGN != ROW_ELEMS:
    raise AssertionError(f"the ISA aligns VBUF operands to {VBUF_ALIGN}, a row holds {ROW_ELEMS}")

Row = data.ArrayLayout(unsigned(16), ROW_ELEMS)
"""One VBUF row: 64 binary16 bit patterns, element 0 in the low bits."""


def row_addr_bits(rows: int) -> int:
    """Width of a row address into a VBUF of ``rows`` rows (at least 1)."""
    return max(1, (rows - 1).bit_length())


class _RowPortSignature(wiring.Signature):
    """A port signature sized by the VBUF's row count: equal when the kind and ``rows`` are."""

    def __init__(self, rows: int, members: dict):
        self._rows = rows
        super().__init__(members)

    @property
    def rows(self) -> int:
        return self._rows

    def __eq__(self, other):
        return type(other) is type(self) and other.rows == self.rows

    def __hash__(self):
        return hash((type(self), self._rows))

    def __repr__(self):
        return f"{type(self).__name__}({self._rows})"


class ReadPortSignature(_RowPortSignature):
    """A VBUF read port, as its user sees it (``Out`` towards the buffer).

    Members
    -------
    addr : Out(row_bits)
        Row address (element address // 64).
    en : Out(1)
        Read ``addr`` at this clock edge.
    data : In(Row)
        The row read at the last edge with ``en`` high; valid the cycle after it (latency 1) and
        held unchanged while ``en`` stays low.
    """

    def __init__(self, rows: int):
        super().__init__(rows, {"addr": Out(row_addr_bits(rows)), "en": Out(1), "data": In(Row)})


class WritePortSignature(_RowPortSignature):
    """A VBUF write port, as its user sees it (``Out`` towards the buffer).

    Members
    -------
    addr : Out(row_bits)
        Row address.
    data : Out(Row)
    mask : Out(64)
        Bit ``i`` writes element ``i`` of the row at this clock edge; an all-zero mask writes
        nothing (there is no separate enable).
    """

    def __init__(self, rows: int):
        super().__init__(
            rows,
            {"addr": Out(row_addr_bits(rows)), "data": Out(Row), "mask": Out(ROW_ELEMS)},
        )


class VectorBuffer(GeometryComponent):
    """The vector buffer: ``geom.vbuf_elems`` binary16 elements as ``vbuf_elems / 64`` rows of
    64, one ``amaranth.lib.memory.Memory`` with a 16-bit write granularity.

    Every unit reads and writes whole rows (the ISA aligns VBUF operands to 64 elements); a
    per-element mask leaves the rest of a partly written row untouched. The ports are plain
    address/data ports with fixed timing and no handshake: each port has one owner, and sharing
    a port between units (for example the DMA and the MPU) is the job of an arbiter in front of
    it. The intended core has ``read_ports=3`` (VPU a and b, and one shared by the MPU's input
    reads and the DMA's stores) and ``write_ports=1`` shared by the VPU, the MPU's results and
    the DMA's loads, which only one unit uses at a time under the controller's scoreboard; the
    tests add a port of each kind for the testbench.

    Parameters
    ----------
    geom : CoreGeometry
        ``vbuf_elems`` sets the size.
    read_ports, write_ports : int
        How many ports of each kind (at least 1, at most 8).

    Members
    -------
    read : In(ReadPortSignature(rows)).array(read_ports)
        ``read[k].addr``, ``.en`` in, ``.data`` out.
    write : In(WritePortSignature(rows)).array(write_ports)
        ``write[k].addr``, ``.data``, ``.mask`` in.

    Timing
    ------
    A read takes one cycle: ``data`` shows the row at ``addr`` as it was before the edge at
    which ``en`` was high (a write to the same row at that edge is not seen: no
    read-during-write forwarding), and holds it while ``en`` is low. A write takes effect at the
    edge; a read one cycle later sees it. Two write ports writing the same element at the same
    edge is undefined. Contents start as +0 (all zero bits).

    Resources: one row is 1,024 bits, so the u55c buffer (512 rows) is 15 RAMB36 wide (72-bit
    primitives, 512 deep). A block RAM has two ports, so each read port beyond the first is
    served by another copy of the memory with the same writes (a simple-dual-port RAMB36
    column per read port; 3 read ports: 45 RAMB36 of the U55C's 2,016). More than one write
    port does not map to block RAM; use one and arbitrate.
    """

    def __init__(self, geom: CoreGeometry, *, read_ports: int = 2, write_ports: int = 1):
        check_geometry(geom)
        # (vbuf_elems is whole rows: the geometry makes it a power of two of at least 256)
        check_int("read_ports", read_ports, 1, 8)
        check_int("write_ports", write_ports, 1, 8)
        self._rows = geom.vbuf_elems // ROW_ELEMS
        self._read_ports = read_ports
        self._write_ports = write_ports
        super().__init__(
            geom,
            {
                "read": In(ReadPortSignature(self._rows)).array(read_ports),
                "write": In(WritePortSignature(self._rows)).array(write_ports),
            }
        )

    @property
    def rows(self) -> int:
        """Rows of 64 elements."""
        return self._rows

    @property
    def read_ports(self) -> int:
        return self._read_ports

    @property
    def write_ports(self) -> int:
        return self._write_ports

    READ_LATENCY = 1
    """Cycles from ``en`` to ``data``."""

    def elaborate(self, platform):
        m = Module()
        m.submodules.mem = mem = memory.Memory(shape=Row, depth=self._rows, init=[])
        for port in self.write:
            wp = mem.write_port(granularity=1)
            m.d.comb += [
                wp.addr.eq(port.addr),
                wp.data.eq(port.data),
                wp.en.eq(port.mask),
            ]
        for port in self.read:
            rp = mem.read_port(domain="sync")
            m.d.comb += [
                rp.addr.eq(port.addr),
                rp.en.eq(port.en),
                port.data.eq(rp.data),
            ]
        return m
