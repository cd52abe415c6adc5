"""The decode core's glue between the controller, the units and the vector buffer: the MPU
feeder, the store feeder, the sharing of the VBUF's read and write ports, and the VPU's command
queue."""

# No `from __future__ import annotations`: data.Struct reads its annotations as shapes.

from amaranth import Cat, Module, Mux, Shape, Signal
from amaranth.lib import fifo, stream, wiring
from amaranth.lib.wiring import In, Out

from tandem.geometry import CoreGeometry, check_geometry
from tandem.numerics import BLOCK

from .component import GeometryComponent
from .controller import MpuIssue, StoreIssue
from .dma import StoreCommand, StoreKind, row_write_layout
from .mpu import Block, MatvecCommand
from .vbuf import ReadPortSignature, WritePortSignature

__all__ = ["CommandQueue", "MpuFeeder", "ReadPortShare", "StoreFeeder", "VbufWriteArbiter"]

_ROW_SHIFT = BLOCK.bit_length() - 1  # elements -> VBUF rows

if 1 << _ROW_SHIFT != BLOCK:
    raise AssertionError(f"a VBUF row of {BLOCK} elements is not a power of two")


def _rows_of(elems):
    """``ceil(elems / 64)``: the VBUF rows that hold ``elems`` elements."""
    return (elems + BLOCK - 1) >> _ROW_SHIFT


def _vbuf_rows(geom) -> int:
    if not isinstance(geom, CoreGeometry):
        raise TypeError(f"geom must be a tandem.geometry.CoreGeometry, not {geom!r}")
    return geom.vbuf_elems // BLOCK


class MpuFeeder(GeometryComponent):
    """Feeds the :class:`tandem.rtl.mpu.MatrixUnit` from the vector buffer and writes its result
    rows back.

    A reader and a writer. The reader takes a ``MATVEC`` from the controller (``issue``), hands
    its command to the MPU (``cmd``) and reads the command's input rows from the VBUF: the
    ``n_cb = ceil(live_cols / 64)`` x rows from ``src_row`` onto ``x`` (with ``fwd``, a
    forwarding product, then row ``fwd_row`` onto ``x``: the row the MPU puts in place of matrix
    row ``fwd_index``, or with ``fwd_col`` of column ``fwd_index``), then, with the ``bias`` flag,
    the ``n_groups = ceil(live_rows / 64)`` bias rows from ``dst_row`` onto ``bias``. A
    command with no live column reads no x row (the MPU computes on zeros), one with no live row
    is a command only. Then the reader may take the next command while the MPU still works on
    the previous one.

    The writer writes the MPU's ``result`` rows to ``write`` (row ``dst_row + g`` for row group
    ``g``, with a mask of the live elements) for a queue of up to :attr:`WQ` commands, in order; a
    command with ``argmax`` (its index goes from the MPU straight to the controller) or with no
    live row has none. A command whose x rows, bias rows or forwarded row meet result rows still
    to be written waits (read after write through the VBUF).

    Parameters
    ----------
    geom : CoreGeometry
        ``vbuf_elems`` sets the row address width.

    Members
    -------
    issue : In(stream.Signature(MpuIssue))
        From the controller.
    cmd : Out(stream.Signature(MatvecCommand))
        To the MPU's ``cmd``.
    x, bias : Out(stream.Signature(Block))
        To the MPU's ``x`` and ``bias``.
    result : In(stream.Signature(Block))
        From the MPU's ``result``; ready when ``write`` is.
    write : Out(stream.Signature(row_write_layout(geom)))
        Result rows for the VBUF write port (``addr``, ``data``, ``mask``).
    read : Out(ReadPortSignature(rows))
        A VBUF read port (latency 1, data held while ``en`` is low).
    loading : Out(1)
        The reader holds a command (it owns the read port; the store feeder waits).
    busy : Out(1)
        ``loading``, or result rows still to be written.

    Timing
    ------
    Latency: a command is taken in the cycle ``issue`` is valid and ready; the next cycle
    offers it on ``cmd`` and reads the first input row, which is valid on ``x`` (or ``bias``)
    one cycle later. A result row is written in the cycle it is valid on ``result`` (no
    register: ``result.valid`` is ``write.valid``).

    Throughput: an input row every second cycle (a read, then the transfer; the next read is
    made after the row is taken). ``issue`` is ready again two cycles after the last input row
    is taken (and the command handed over), so with ``n`` input rows (``n_cb``, plus one with
    ``fwd``, plus ``n_groups`` with ``bias``) and streams that never stall, commands are taken every
    ``max(3, 2 * n + 2)`` cycles. One result row per cycle. The queue holds :attr:`WQ` commands
    with result rows: one more waits until the first one's last row is written. A command's
    result rows come about 50 cycles after it is taken at u55c (the MPU's x latency, tiles and
    drain, and the floorplan's stages both ways), so the queue must hold the products of that
    long for short ones (an attention head's: about 14 MPU cycles each) to follow each other
    at the MPU's pace (issue 17: 2 before; with 16 pending MATVECs a layer's 12 score products
    now take about 209 cycles, docs/performance.md).

    Logic depth (an estimate from the structure, not a timing report): the deepest path is
    ``issue.payload`` to ``issue.ready``, combinational (the controller sees it in the same
    cycle): ``min(live, allocated)`` (a 16-bit compare and a multiplexer), the row counts and
    range ends (16-bit adds), the range compares (16-bit) and the hazard OR, about four short
    carry chains in series and 4 LUT levels. The result mask is a 32-bit subtract and compare
    beside a 7-bit shift decode.
    """

    WQ = 8
    """Commands whose result rows the writer can have outstanding (docstring, *Throughput*)."""

    def __init__(self, geom: CoreGeometry):
        check_geometry(geom)
        rows = _vbuf_rows(geom)
        super().__init__(
            geom,
            {
                "issue": In(stream.Signature(MpuIssue)),
                "cmd": Out(stream.Signature(MatvecCommand)),
                "x": Out(stream.Signature(Block)),
                "bias": Out(stream.Signature(Block)),
                "result": In(stream.Signature(Block)),
                "write": Out(stream.Signature(row_write_layout(geom))),
                "read": Out(ReadPortSignature(rows)),
                "loading": Out(1),
                "busy": Out(1),
            },
        )

    def elaborate(self, platform):
        m = Module()
        WQ = self.WQ
        issue = Signal(MpuIssue)  # the command being loaded
        rd_active = self.loading
        n_cb = Signal(16)
        n_groups = Signal(16)
        rd_i = Signal(16)  # x or bias rows read so far
        rd_phase = Signal(2)  # 0 x rows, 3 the forwarded row, 1 bias rows, 2 done
        rd_wait = Signal()  # a read is in flight (data next cycle)
        held = Signal()  # read data waiting for the stream
        cmd_sent = Signal()
        # the queue of commands with result rows to write, oldest first: the first row, the
        # row after the last (for the hazard compares, registered at push) and the live rows
        wq_dst = [Signal(16, name=f"wq_dst{i}") for i in range(WQ)]
        wq_end = [Signal(17, name=f"wq_end{i}") for i in range(WQ)]
        wq_rows = [Signal(32, name=f"wq_rows{i}") for i in range(WQ)]  # live result rows
        wq_n = Signal(range(WQ + 1))
        res_i = Signal(16)  # result rows of wq[0] written

        inc = self.issue.payload
        c = inc.cmd
        lr = Signal(16)
        lc = Signal(16)
        m.d.comb += [lr.eq(c.eff_rows()), lc.eq(c.eff_cols())]
        inc_cb = _rows_of(lc)
        inc_groups = _rows_of(lr)

        def overlaps(lo, n, i):
            """VBUF rows [lo, lo + n) meet wq[i]'s result rows still to come."""
            return (i < wq_n) & (n != 0) & (lo < wq_end[i]) & (wq_dst[i] < lo + n)

        hazard = Signal()
        m.d.comb += hazard.eq(
            Cat(
                *(
                    overlaps(inc.src_row, inc_cb, i)
                    | (c.flags.bias & overlaps(inc.dst_row, inc_groups, i))
                    | (c.fwd & overlaps(inc.fwd_row, 1, i))
                    for i in range(WQ)
                )
            ).any()
        )
        makes_rows = ~c.flags.argmax & (inc_groups != 0)
        accept = Signal()
        m.d.comb += [
            self.issue.ready.eq(~rd_active & ~hazard & ((wq_n < WQ) | ~makes_rows)),
            accept.eq(self.issue.valid & self.issue.ready),
        ]
        with m.If(accept):
            m.d.sync += [
                issue.eq(inc),
                rd_active.eq(1),
                n_cb.eq(inc_cb),
                n_groups.eq(inc_groups),
                rd_i.eq(0),
                # no live column: no x rows (the MPU computes on zeros), bias rows only if any
                rd_phase.eq(Mux(lc == 0, Mux(c.flags.bias, 1, 2), 0)),
                rd_wait.eq(0),
                held.eq(0),
                cmd_sent.eq(0),
            ]
        m.d.comb += [self.cmd.payload.eq(issue.cmd), self.cmd.valid.eq(rd_active & ~cmd_sent)]
        with m.If(self.cmd.valid & self.cmd.ready):
            m.d.sync += cmd_sent.eq(1)

        # reader: x rows, then bias rows, one read at a time through the read port
        nothing = n_groups == 0  # no live row: the MPU takes only the command
        use_bias = issue.cmd.flags.bias
        with m.If(rd_active & ~nothing & (rd_phase != 2) & ~rd_wait & ~held):
            m.d.comb += [
                self.read.en.eq(1),
                self.read.addr.eq(
                    Mux(
                        rd_phase == 3,
                        issue.fwd_row,
                        Mux(rd_phase == 0, issue.src_row, issue.dst_row) + rd_i,
                    )
                ),
            ]
            m.d.sync += rd_wait.eq(1)
        with m.If(rd_active & (rd_wait | held)):
            is_x = (rd_phase == 0) | (rd_phase == 3)  # the forwarded row goes on x too
            m.d.comb += [
                self.x.payload.eq(self.read.data),
                self.bias.payload.eq(self.read.data),
                self.x.valid.eq(is_x),
                self.bias.valid.eq(~is_x),
            ]
            took = Mux(is_x, self.x.ready, self.bias.ready)
            m.d.sync += [rd_wait.eq(0), held.eq(~took)]
            with m.If(took):
                last = (rd_phase == 3) | (rd_i + 1 == Mux(is_x, n_cb, n_groups))
                after_x = Mux(use_bias, 1, 2)
                m.d.sync += rd_i.eq(Mux(last, 0, rd_i + 1))
                with m.If(last):
                    m.d.sync += rd_phase.eq(
                        Mux(rd_phase == 0, Mux(issue.cmd.fwd, 3, after_x), Mux(is_x, after_x, 2))
                    )
        # the reader is done when the MPU has the command and every x and bias row
        with m.If(rd_active & cmd_sent & (nothing | (rd_phase == 2)) & ~rd_wait & ~held):
            m.d.sync += rd_active.eq(0)

        # writer: result rows of wq[0] to its dst + g, live elements only
        rem = Signal(32)
        m.d.comb += rem.eq(wq_rows[0] - (res_i << _ROW_SHIFT))
        res_mask = Signal(BLOCK)
        m.d.comb += res_mask.eq(
            Mux(rem >= BLOCK, (1 << BLOCK) - 1, (1 << rem[: _ROW_SHIFT + 1]) - 1)
        )
        m.d.comb += [
            self.write.valid.eq(self.result.valid),
            self.write.payload.addr.eq(wq_dst[0] + res_i),
            self.write.payload.data.eq(self.result.payload),
            self.write.payload.mask.eq(res_mask),
            self.result.ready.eq(self.write.ready),
        ]
        wrote = Signal()
        m.d.comb += wrote.eq(self.result.valid & self.result.ready)
        res_last = Signal()
        m.d.comb += res_last.eq(wrote & (rem <= BLOCK))
        with m.If(wrote):
            m.d.sync += res_i.eq(Mux(res_last, 0, res_i + 1))
        push = accept & makes_rows
        # wq: pop on the last result row of wq[0], push at the tail
        with m.If(res_last):
            for i in range(WQ - 1):
                m.d.sync += [
                    wq_dst[i].eq(wq_dst[i + 1]),
                    wq_end[i].eq(wq_end[i + 1]),
                    wq_rows[i].eq(wq_rows[i + 1]),
                ]
        with m.If(push):
            slot = Mux(res_last, wq_n - 1, wq_n)
            for i in range(WQ):
                with m.If(slot == i):
                    m.d.sync += [
                        wq_dst[i].eq(inc.dst_row),
                        wq_end[i].eq(inc.dst_row + inc_groups),
                        wq_rows[i].eq(lr),
                    ]
        m.d.sync += wq_n.eq(wq_n + push - res_last)
        m.d.comb += self.busy.eq(rd_active | (wq_n != 0))
        return m


class StoreFeeder(GeometryComponent):
    """Hands the controller's stores to the DMA and reads their data rows from the vector
    buffer.

    A store (``issue``) is taken when none is in progress. Its command goes to the DMA
    (``cmd``); for ``VECTOR``, ``ROW`` and ``COL`` stores the ``ceil(length / 64)`` rows from
    ``src_row`` are read from the VBUF and sent on ``data``, in order. The store is done when
    the DMA has the command and every row. The read port is shared with the MPU feeder: while
    ``hold`` is high (the MPU feeder's reader owns the port) the feeder reads nothing, offers no
    row and does not finish (the command handshake still runs).

    Parameters
    ----------
    geom : CoreGeometry
        ``vbuf_elems`` sets the row address width.

    Members
    -------
    issue : In(stream.Signature(StoreIssue))
        From the controller; ready while no store is in progress.
    cmd : Out(stream.Signature(StoreCommand))
        To the DMA's ``store``.
    data : Out(stream.Signature(Block))
        To the DMA's ``store_data``.
    read : Out(ReadPortSignature(rows))
        A VBUF read port.
    hold : In(1)
        Leave the read port alone this cycle.
    busy : Out(1)
        A store is in progress.

    Timing
    ------
    Latency: a store is taken in the cycle ``issue`` is valid and ready; its command is valid
    the next cycle, and so is the first row's read, whose data is valid on ``data`` one cycle
    later. ``busy`` falls (and ``issue`` is ready again) two cycles after the last row is taken
    (and the command: a store with no rows ends two cycles after its command is taken).

    Throughput: a row every second cycle (read, then transfer), so stores of ``n`` rows whose
    streams never stall are taken every ``max(3, 2 * n + 2)`` cycles.

    Logic depth (an estimate from the structure): a 16-bit compare (rows read against rows to
    read) into the read enable and a 16-bit add for the address; about 3 LUT levels plus a
    carry chain. ``data`` and ``cmd`` come from registers and the read port.
    """

    def __init__(self, geom: CoreGeometry):
        check_geometry(geom)
        rows = _vbuf_rows(geom)
        super().__init__(
            geom,
            {
                "issue": In(stream.Signature(StoreIssue)),
                "cmd": Out(stream.Signature(StoreCommand)),
                "data": Out(stream.Signature(Block)),
                "read": Out(ReadPortSignature(rows)),
                "hold": In(1),
                "busy": Out(1),
            },
        )

    def elaborate(self, platform):
        m = Module()
        active = self.busy
        st = Signal(StoreIssue)
        st_rows = Signal(16)
        st_i = Signal(16)
        cmd_sent = Signal()
        st_wait = Signal()  # a read is in flight (data next cycle)
        st_held = Signal()  # read data waiting for the stream
        m.d.comb += self.issue.ready.eq(~active)
        with m.If(self.issue.valid & ~active):
            kind = self.issue.payload.cmd.kind
            has_rows = (
                (kind == StoreKind.VECTOR) | (kind == StoreKind.ROW) | (kind == StoreKind.COL)
            )
            m.d.sync += [
                st.eq(self.issue.payload),
                active.eq(1),
                st_rows.eq(Mux(has_rows, _rows_of(self.issue.payload.cmd.length), 0)),
                st_i.eq(0),
                cmd_sent.eq(0),
                st_wait.eq(0),
                st_held.eq(0),
            ]
        m.d.comb += [self.cmd.payload.eq(st.cmd), self.cmd.valid.eq(active & ~cmd_sent)]
        with m.If(self.cmd.valid & self.cmd.ready):
            m.d.sync += cmd_sent.eq(1)
        with m.If(active & ~self.hold):
            with m.If((st_i < st_rows) & ~st_wait & ~st_held):
                m.d.comb += [self.read.en.eq(1), self.read.addr.eq(st.src_row + st_i)]
                m.d.sync += st_wait.eq(1)
            with m.If(st_wait | st_held):
                m.d.comb += [self.data.valid.eq(1), self.data.payload.eq(self.read.data)]
                m.d.sync += [st_wait.eq(0), st_held.eq(~self.data.ready)]
                with m.If(self.data.ready):
                    m.d.sync += st_i.eq(st_i + 1)
            with m.If(cmd_sent & (st_i == st_rows) & ~st_wait & ~st_held):
                m.d.sync += active.eq(0)
        return m


class ReadPortShare(wiring.Component):
    """One VBUF read port shared by ``users`` units that never read in the same cycle.

    The port reads for the user whose ``en`` is high (the lowest-numbered one if, against the
    contract, several are); every user sees the port's ``data``.

    Members
    -------
    users : In(ReadPortSignature(rows)).array(users)
    port : Out(ReadPortSignature(rows))
        To the VBUF.

    Timing
    ------
    No register: ``en`` is an OR, ``addr`` a priority multiplexer (1-2 LUT levels for two
    users); the read latency is the VBUF's.
    """

    def __init__(self, rows: int, users: int = 2):
        if not isinstance(users, int) or users < 1:
            raise ValueError(f"users must be a positive integer, not {users!r}")
        super().__init__(
            {
                "users": In(ReadPortSignature(rows)).array(users),
                "port": Out(ReadPortSignature(rows)),
            }
        )

    def elaborate(self, platform):
        m = Module()
        m.d.comb += self.port.en.eq(Cat(u.en for u in self.users).any())
        with m.Switch(Cat(u.en for u in self.users)):
            for i, u in enumerate(self.users):
                with m.Case("-" * (len(self.users) - 1 - i) + "1" + "0" * i):
                    m.d.comb += self.port.addr.eq(u.addr)
        for u in self.users:
            m.d.comb += u.data.eq(self.port.data)
        return m


class VbufWriteArbiter(GeometryComponent):
    """The VBUF's one write port, shared by the DMA's LOADV rows, the MPU feeder's result rows
    and the VPU.

    The controller's scoreboard never lets the VPU write beside another writer, but a LOADV may
    run beside a MATVEC whose VBUF rows it does not meet (rtl/controller.py), so a result row
    goes first: a valid result row, else a valid LOADV row, else the VPU's port (whose mask is
    zero when it does not write). The MPU's result rows cannot wait: ``mpu.ready`` is always
    high; ``loadv.ready`` is low while a result row is written (the LOADV row waits in the
    DMA's stream, which keeps its order).

    Parameters
    ----------
    geom : CoreGeometry
        ``vbuf_elems`` sets the row address width.

    Members
    -------
    loadv, mpu : In(stream.Signature(row_write_layout(geom)))
    vpu : In(WritePortSignature(rows))
    write : Out(WritePortSignature(rows))
        To the VBUF.

    Timing
    ------
    No register: a 3:1 multiplexer on 1,024 data, 64 mask and the address bits, selected by
    the two ``valid`` bits (1-2 LUT levels); writes take effect at the VBUF's clock edge.
    """

    def __init__(self, geom: CoreGeometry):
        check_geometry(geom)
        rows = _vbuf_rows(geom)
        layout = row_write_layout(geom)
        super().__init__(
            geom,
            {
                "loadv": In(stream.Signature(layout)),
                "mpu": In(stream.Signature(layout)),
                "vpu": In(WritePortSignature(rows)),
                "write": Out(WritePortSignature(rows)),
            },
        )

    def elaborate(self, platform):
        m = Module()
        wr = self.write
        m.d.comb += [self.loadv.ready.eq(~self.mpu.valid), self.mpu.ready.eq(1)]
        with m.If(self.mpu.valid):
            row = self.mpu.payload
            m.d.comb += [wr.addr.eq(row.addr), wr.data.eq(row.data), wr.mask.eq(row.mask)]
        with m.Elif(self.loadv.valid):
            row = self.loadv.payload
            m.d.comb += [wr.addr.eq(row.addr), wr.data.eq(row.data), wr.mask.eq(row.mask)]
        with m.Else():
            vpu = self.vpu
            m.d.comb += [wr.addr.eq(vpu.addr), wr.data.eq(vpu.data), wr.mask.eq(vpu.mask)]
        return m


class CommandQueue(wiring.Component):
    """A first-in first-out queue of ``depth`` stream transfers of ``shape``
    (``amaranth.lib.fifo.SyncFIFOBuffered`` with stream ports).

    Members
    -------
    i : In(stream.Signature(shape))
    o : Out(stream.Signature(shape))
    level : Out(range(depth + 1))
        Transfers held, including the one on ``o``.

    Timing
    ------
    A transfer taken on ``i`` is valid on ``o`` 2 cycles later when the queue was empty
    (SyncFIFOBuffered's registered output); one transfer per cycle in and out; ``i.ready`` is
    low while ``depth`` transfers are held. Logic depth: the FIFO's pointer and level counters
    (``log2(depth) + 1`` bits).
    """

    def __init__(self, shape, depth: int):
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive integer, not {depth!r}")
        self._shape = shape
        self._depth = depth
        super().__init__(
            {
                "i": In(stream.Signature(shape)),
                "o": Out(stream.Signature(shape)),
                "level": Out(range(depth + 1)),
            }
        )

    @property
    def depth(self) -> int:
        return self._depth

    def elaborate(self, platform):
        m = Module()
        width = Shape.cast(self._shape).width
        m.submodules.fifo = q = fifo.SyncFIFOBuffered(width=width, depth=self._depth)
        m.d.comb += [
            q.w_data.eq(self.i.payload),
            q.w_en.eq(self.i.valid),
            self.i.ready.eq(q.w_rdy),
            self.o.payload.eq(q.r_data),
            self.o.valid.eq(q.r_rdy),
            q.r_en.eq(self.o.ready),
            self.level.eq(q.level),
        ]
        return m
