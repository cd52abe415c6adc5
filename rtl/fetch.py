"""The decode core's DMA read path: the program fetch, and the LOADV rows on their way to the
vector buffer."""

# No `from __future__ import annotations`: data.Struct reads its annotations as shapes.

from amaranth import Module, Mux, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from tandem.geometry import CoreGeometry, check_geometry
from tandem.numerics import BLOCK

from .component import GeometryComponent
from .dma import ChannelRun, ReadCommand, ReadKind, row_write_layout

__all__ = ["FETCH_CHUNK", "ProgramFetch"]

FETCH_CHUNK = 1 << 15
"""Elements per ``ROWS`` read of the program fetch (the read command's length is 16 bits)."""

_ROW_SHIFT = BLOCK.bit_length() - 1  # elements -> VBUF rows

if 1 << _ROW_SHIFT != BLOCK:
    raise AssertionError(f"a VBUF row of {BLOCK} elements is not a power of two")


class ProgramFetch(GeometryComponent):
    """The DMA's read command port and row stream, shared by the program fetch and the
    controller's reads.

    The controller fetches its program through ``cmd`` (a channel-0 byte offset and a count of
    beats, :class:`tandem.rtl.dma.ChannelRun`). The DMA has no channel-0-only read, so the fetch
    issues ``ROWS`` reads of the program region, at most :data:`FETCH_CHUNK` elements each (a
    striped read touches every channel at the same offsets), and of the rows that come back
    keeps channel 0's beats only: the low ``port_bits`` of the first row of every stripe
    (``channels * beat_elems / 64`` rows). The others are taken and dropped.

    While no fetch runs, the block is a wire: the controller's reads (``issue``) go to the DMA
    (``read``) and the DMA's rows (LOADV data) go to the VBUF write port (``loadv``). It also
    counts the LOADV rows still to arrive: a ``ROWS`` read of ``length`` elements adds
    ``ceil(length / 64)`` when it is issued, each row on ``loadv`` takes one.

    Parameters
    ----------
    geom : CoreGeometry
        ``channels``, ``beat_elems``, ``beat_bytes``, ``port_bits`` and ``vbuf_elems``.

    Members
    -------
    cmd : In(stream.Signature(ChannelRun))
        A program fetch: ``beats`` channel-0 beats from byte ``offset``. Always ready; a command
        taken while a fetch runs restarts the fetch (the controller sends one per run): the
        earlier fetch's reads not yet issued are forgotten, and its rows still to come (reads
        the DMA has taken: a fetch the watchdog stopped, its rows held by the memory) are taken
        and dropped when they arrive, before the new fetch's rows (the DMA delivers in order).
    data : Out(stream.Signature(port_bits))
        The fetched channel-0 beats, in order.
    issue : In(stream.Signature(ReadCommand))
        The controller's reads; not ready while a fetch runs.
    read : Out(stream.Signature(ReadCommand))
        To the DMA's ``read``.
    rows : In(stream.Signature(row_write_layout(geom)))
        From the DMA's ``rows``.
    loadv : Out(stream.Signature(row_write_layout(geom)))
        LOADV rows for the VBUF write port (``rows`` while no fetch runs).
    fetching : Out(1)
        A fetch is in progress: reads still to issue or rows still to come.
    loadv_busy : Out(1)
        LOADV rows are still to arrive (the controller's ``busy.loadv``).

    Timing
    ------
    Latency: ``cmd`` is taken in the cycle it is valid; the first ``ROWS`` read is valid the
    next cycle, the next one in the cycle after the DMA takes one. Rows pass without a
    register (``rows.valid`` to ``data.valid``, ``data.ready`` to ``rows.ready``: one gate
    each), and so do ``issue`` to ``read`` and ``rows`` to ``loadv`` while no fetch runs (a 2:1
    multiplexer). ``fetching`` falls in the cycle after the last row is taken.

    Throughput: one row per cycle, so one program beat every ``channels * beat_elems / 64``
    cycles (tiny 2, u55c 16) when the DMA keeps up; a ``ROWS`` read of up to
    :data:`FETCH_CHUNK` elements per DMA command handshake.

    Logic depth (an estimate from the structure): the deepest paths end at the 32-bit fetch
    counters (stripes left, offset, rows outstanding): a 32-bit compare for the chunk size, a
    multiplexer, a shift by a constant and a 32-bit add or three-operand add/subtract (with
    ``read.ready`` from the DMA in the select), about 4 LUT levels plus a carry chain. The
    LOADV count is a 16-bit add/subtract.
    """

    def __init__(self, geom: CoreGeometry):
        check_geometry(geom)
        stripe = geom.channels * geom.beat_elems
        if stripe % BLOCK or FETCH_CHUNK % stripe:
            raise ValueError(
                f"a stripe of {stripe} elements must be a whole number of {BLOCK}-element rows "
                f"and divide the {FETCH_CHUNK}-element fetch chunk"
            )
        rows = row_write_layout(geom)
        super().__init__(
            geom,
            {
                "cmd": In(stream.Signature(ChannelRun)),
                "data": Out(stream.Signature(geom.port_bits)),
                "issue": In(stream.Signature(ReadCommand)),
                "read": Out(stream.Signature(ReadCommand)),
                "rows": In(stream.Signature(rows)),
                "loadv": Out(stream.Signature(rows)),
                "fetching": Out(1),
                "loadv_busy": Out(1),
            }
        )

    def elaborate(self, platform):
        m = Module()
        g = self._geom
        stripe_elems = g.channels * g.beat_elems
        rows_per_stripe = stripe_elems // BLOCK
        chunk_stripes = FETCH_CHUNK // stripe_elems

        fetching = self.fetching
        fetch_left = Signal(32)  # stripes not yet requested
        fetch_off = Signal(32)
        fetch_rows_left = Signal(32)  # rows requested and not yet taken
        stale = Signal(32)  # rows of an earlier fetch still to come: taken and dropped
        row_phase = Signal(range(max(2, rows_per_stripe)))
        rows_next = Signal(32)
        m.d.sync += fetch_rows_left.eq(rows_next)
        m.d.comb += rows_next.eq(fetch_rows_left)
        fetch_n = Signal(32)
        m.d.comb += fetch_n.eq(Mux(fetch_left < chunk_stripes, fetch_left, chunk_stripes))
        with m.If(fetching):
            m.d.comb += [
                self.read.valid.eq(fetch_left != 0),
                self.read.payload.kind.eq(ReadKind.ROWS),
                self.read.payload.offset.eq(fetch_off),
                self.read.payload.length.eq(fetch_n * stripe_elems),
            ]
            fetch_issue = self.read.ready & (fetch_left != 0)
            with m.If(fetch_issue):
                m.d.sync += [
                    fetch_left.eq(fetch_left - fetch_n),
                    fetch_off.eq(fetch_off + fetch_n * g.beat_bytes),
                ]
            # channel 0's beat is the low part of the first row of every stripe
            m.d.comb += [
                # a row in the cycle a new fetch command is taken is the old fetch's
                self.data.valid.eq(
                    self.rows.valid & (row_phase == 0) & (stale == 0) & ~self.cmd.valid
                ),
                self.data.payload.eq(self.rows.payload.data.as_value()[: g.port_bits]),
                self.rows.ready.eq((stale != 0) | (row_phase != 0) | self.data.ready),
            ]
            taken = self.rows.valid & self.rows.ready
            with m.If(taken & (stale != 0)):
                m.d.sync += stale.eq(stale - 1)
            with m.Elif(taken):
                m.d.sync += row_phase.eq(
                    Mux(row_phase == rows_per_stripe - 1, 0, row_phase + 1)
                    if rows_per_stripe > 1
                    else 0
                )
                with m.If((fetch_left == 0) & (fetch_rows_left == 1)):
                    m.d.sync += fetching.eq(0)
            # a chunk can be issued in the cycle a row of the previous chunk is taken, so both
            # updates go into one assignment
            m.d.comb += rows_next.eq(
                fetch_rows_left + Mux(fetch_issue, fetch_n * rows_per_stripe, 0) - taken
            )
        with m.Else():
            wiring.connect(m, wiring.flipped(self.issue), wiring.flipped(self.read))
            wiring.connect(m, wiring.flipped(self.rows), wiring.flipped(self.loadv))
        # A new fetch (after last) restarts: the rows of the previous one still on their way
        # (a fetch stopped by the watchdog) are dropped as they arrive, and its reads not yet
        # issued are forgotten.
        with m.If(self.cmd.valid):
            m.d.comb += self.cmd.ready.eq(1)
            m.d.sync += [
                fetching.eq(1),
                fetch_left.eq(self.cmd.payload.beats),
                fetch_off.eq(self.cmd.payload.offset),
                row_phase.eq(0),
                stale.eq(rows_next),
            ]

        # LOADV rows still to arrive
        loadv_rows = Signal(16)
        loadv_add = Signal(16)
        issued = self.issue.valid & self.issue.ready & (self.issue.payload.kind == ReadKind.ROWS)
        m.d.comb += loadv_add.eq(
            Mux(issued, (self.issue.payload.length + BLOCK - 1) >> _ROW_SHIFT, 0)
        )
        arrived = self.loadv.valid & self.loadv.ready
        m.d.sync += loadv_rows.eq(loadv_rows + loadv_add - arrived)
        m.d.comb += self.loadv_busy.eq(loadv_rows != 0)
        return m
