"""The decode core's top level: shell, controller, DMA, MPU, VPU and vector buffer."""

# No `from __future__ import annotations`: data.Struct reads its annotations as shapes.

from amaranth import Cat, ClockDomain, Module, Mux, Signal
from amaranth.lib import fifo, wiring
from amaranth.lib.wiring import In, Out, connect

from tandem import regmap
from tandem.geometry import CoreGeometry

from .axi import AXI4LiteSignature, AXI4Signature, vitis_ports
from .controller import Controller, MpuIssue, StoreIssue
from .dma import DMAEngine, ReadKind, StoreKind
from .mpu import MatrixUnit
from .shell import KernelShell
from .vbuf import VectorBuffer
from .vpu import VectorUnit

__all__ = ["TOPLEVEL", "DecodeCore", "verilog"]

TOPLEVEL = "tandem_decode_core"
BLOCK = 64
_FETCH_CHUNK = 1 << 15  # elements per ROWS command of the program fetch (16-bit length)
VPU_QUEUE = 64
"""Vector commands the core holds between the controller and the vector unit: enough for a
head group's softmax (5 ops per head), so the controller reaches the next MATVEC and starts its
weight read while the vector unit still works."""


class DecodeCore(wiring.Component):
    """The Vitis RTL kernel ``tandem_decode_core``.

    Ports: ``ap_clk``, ``ap_rst_n`` (active low, synchronous), ``interrupt``,
    ``s_axi_control_*`` (:class:`rtl.shell.KernelShell`) and one AXI4 manager
    ``m_axi_hbm<ch>_*`` per channel at ``geom.port_bits`` (:class:`rtl.dma.DMAEngine`).

    Inside: the :class:`Controller` issues to the :class:`DMAEngine`, the :class:`MatrixUnit`
    (through an MPU feeder that reads x and the bias from the VBUF and writes the results back)
    and the :class:`VectorUnit`. The :class:`VectorBuffer` has three read ports (VPU a, VPU b,
    and one shared by the MPU feeder and the store feeder) and one write port shared by the VPU,
    the MPU feeder and the DMA's LOADV rows; the controller's scoreboard lets only one of each
    group use the VBUF at a time, so the sharing is a plain multiplexer.

    The program fetch goes through the DMA read path: ``ROWS`` reads of the program region
    (striped reads touch every channel at the same offsets) of which only channel 0's beats,
    the first ``beat_elems`` elements of every ``channels*beat_elems/64``-th row, go to the
    controller's instruction memory.
    """

    def __init__(self, geom: CoreGeometry):
        if not isinstance(geom, CoreGeometry):
            raise TypeError(f"geom must be a tandem.geometry.CoreGeometry, not {geom!r}")
        self._geom = geom
        addr_width = (regmap.address_space_bytes(geom.channels) - 1).bit_length()
        members = {
            "ap_clk": In(1),
            "ap_rst_n": In(1),
            "interrupt": Out(1),
            "s_axi_control": In(AXI4LiteSignature(addr_width=addr_width)),
        }
        for ch in range(geom.channels):
            members[f"m_axi_hbm{ch}"] = Out(AXI4Signature(addr_width=64, data_width=geom.port_bits))
        super().__init__(members)

    @property
    def geom(self) -> CoreGeometry:
        return self._geom

    def elaborate(self, platform):
        m = Module()
        g = self._geom
        m.domains.sync = cd = ClockDomain("sync")
        m.d.comb += [cd.clk.eq(self.ap_clk), cd.rst.eq(~self.ap_rst_n)]

        m.submodules.shell = shell = KernelShell(g)
        m.submodules.ctrl = ctrl = Controller(g)
        m.submodules.dma = dma = DMAEngine(g)
        m.submodules.mpu = mpu = MatrixUnit(g)
        m.submodules.vpu = vpu = VectorUnit(g)
        m.submodules.vbuf = vbuf = VectorBuffer(g, read_ports=3, write_ports=1)

        wiring.connect(m, wiring.flipped(self.s_axi_control), shell.s_axi_control)
        for ch in range(g.channels):
            name = f"m_axi_hbm{ch}"
            wiring.connect(m, getattr(dma, name), wiring.flipped(getattr(self, name)))
        m.d.comb += [
            self.interrupt.eq(shell.interrupt),
            ctrl.args.eq(shell.args),
            dma.args.eq(shell.args),
            ctrl.start.eq(shell.start),
            dma.clear.eq(shell.start),
            shell.done.eq(ctrl.done),
            shell.status.eq(ctrl.status),
            dma.record.eq(ctrl.record),
            ctrl.dma_error.eq(dma.error),
            ctrl.dma_error_tag.eq(dma.error_tag),
        ]

        # ---- VPU ----------------------------------------------------------------------------
        # a command queue: the controller issues vector ops back to back and runs ahead
        m.submodules.vpu_queue = vq = fifo.SyncFIFOBuffered(
            width=len(ctrl.vpu.payload.as_value()), depth=VPU_QUEUE
        )
        m.d.comb += [
            vq.w_data.eq(ctrl.vpu.payload.as_value()),
            vq.w_en.eq(ctrl.vpu.valid),
            ctrl.vpu.ready.eq(vq.w_rdy),
            vpu.cmd.payload.eq(vq.r_data),
            vpu.cmd.valid.eq(vq.r_rdy),
            vq.r_en.eq(vpu.cmd.ready),
        ]
        connect(m, vpu.read_a, vbuf.read[0])
        connect(m, vpu.read_b, vbuf.read[1])
        m.d.comb += vpu.done.ready.eq(1)

        # ---- shared VBUF ports: read[2] (MPU feeder or store feeder), write[0] -----------------
        shared_rd = vbuf.read[2]
        wr = vbuf.write[0]

        # ---- program fetch through ROWS reads -------------------------------------------------
        stripe_elems = g.channels * g.beat_elems
        rows_per_stripe = stripe_elems // BLOCK
        chunk_stripes = _FETCH_CHUNK // stripe_elems
        fetching = Signal()
        fetch_left = Signal(32)  # stripes not yet requested
        fetch_off = Signal(32)
        row_phase = Signal(range(max(2, rows_per_stripe)))
        with m.If(ctrl.fetch_cmd.valid):
            m.d.comb += ctrl.fetch_cmd.ready.eq(1)
            m.d.sync += [
                fetching.eq(1),
                fetch_left.eq(ctrl.fetch_cmd.payload.beats),
                fetch_off.eq(ctrl.fetch_cmd.payload.offset),
                row_phase.eq(0),
            ]
        fetch_n = Signal(32)
        m.d.comb += fetch_n.eq(Mux(fetch_left < chunk_stripes, fetch_left, chunk_stripes))
        fetch_rows_left = Signal(32)
        with m.If(fetching):
            m.d.comb += dma.read.valid.eq(fetch_left != 0)
            m.d.comb += [
                dma.read.payload.kind.eq(ReadKind.ROWS),
                dma.read.payload.offset.eq(fetch_off),
                dma.read.payload.length.eq(fetch_n * stripe_elems),
            ]
            fetch_issue = dma.read.ready & (fetch_left != 0)
            with m.If(fetch_issue):
                m.d.sync += [
                    fetch_left.eq(fetch_left - fetch_n),
                    fetch_off.eq(fetch_off + fetch_n * g.beat_bytes),
                ]
            # channel 0's beat is the low part of the first row of every stripe
            m.d.comb += [
                ctrl.fetch_data.valid.eq(dma.rows.valid & (row_phase == 0)),
                ctrl.fetch_data.payload.eq(dma.rows.payload.data.as_value()[: g.port_bits]),
                dma.rows.ready.eq((row_phase != 0) | ctrl.fetch_data.ready),
            ]
            with m.If(dma.rows.valid & dma.rows.ready):
                m.d.sync += row_phase.eq(
                    Mux(row_phase == rows_per_stripe - 1, 0, row_phase + 1)
                    if rows_per_stripe > 1
                    else 0
                )
                with m.If((fetch_left == 0) & (fetch_rows_left == 1)):
                    m.d.sync += fetching.eq(0)
            # rows requested minus rows taken; a chunk can be issued in the cycle a row of the
            # previous chunk is taken, so both updates go into one assignment
            m.d.sync += fetch_rows_left.eq(
                fetch_rows_left
                + Mux(fetch_issue, fetch_n * rows_per_stripe, 0)
                - (dma.rows.valid & dma.rows.ready)
            )
        with m.Else():
            connect(m, ctrl.dma_read, dma.read)

        # ---- LOADV rows into the VBUF ---------------------------------------------------------
        loadv_rows = Signal(16)  # rows still to arrive
        loadv_add = Signal(16)
        loadv_sub = Signal()
        rows_to_vbuf = Signal()
        issue_rows = ctrl.dma_read.valid & ctrl.dma_read.ready
        issue_rows &= ctrl.dma_read.payload.kind == ReadKind.ROWS
        m.d.comb += loadv_add.eq(
            Mux(issue_rows, (ctrl.dma_read.payload.length + BLOCK - 1) >> 6, 0)
        )
        with m.If(~fetching):
            m.d.comb += [dma.rows.ready.eq(1), rows_to_vbuf.eq(dma.rows.valid)]
        m.d.comb += loadv_sub.eq(rows_to_vbuf)
        m.d.sync += loadv_rows.eq(loadv_rows + loadv_add - loadv_sub)
        m.d.comb += [
            dma.word.ready.eq(1),
            ctrl.dma_word.valid.eq(dma.word.valid),
            ctrl.dma_word.payload.eq(dma.word.payload),
        ]

        # ---- MATVEC weights: DMA tiles straight into the MPU --------------------------------
        m.d.comb += [
            mpu.weights.valid.eq(dma.tiles.valid),
            mpu.weights.payload.eq(dma.tiles.payload),
            dma.tiles.ready.eq(mpu.weights.ready),
        ]

        # ---- MPU feeder ---------------------------------------------------------------------
        # The reader takes a command from the controller, hands it to the MPU and reads its x
        # rows, then its bias rows, from the VBUF. The writer writes result rows to the VBUF for
        # the commands in `wq` (in order; at most 2), so the next command's x loads while the
        # previous one's results drain. A command whose x or bias rows overlap result rows
        # still to come waits for them (read after write through the VBUF).
        issue = Signal(MpuIssue)  # the command being loaded
        rd_active = Signal()
        n_cb = Signal(16)
        n_groups = Signal(16)
        rd_i = Signal(16)  # x or bias rows read so far
        rd_phase = Signal(2)  # 0 x rows, 1 bias rows, 2 done
        rd_wait = Signal()  # a read is in flight (data next cycle)
        held = Signal()  # read data waiting for the stream
        cmd_sent = Signal()
        WQ = 2
        wq_dst = [Signal(16, name=f"wq_dst{i}") for i in range(WQ)]
        wq_rows = [Signal(32, name=f"wq_rows{i}") for i in range(WQ)]  # live result rows
        wq_n = Signal(range(WQ + 1))
        res_i = Signal(16)  # result rows of wq[0] written

        inc = ctrl.mpu.payload
        c = inc.cmd
        lr = Signal(16)
        lc = Signal(16)
        m.d.comb += [lr.eq(c.eff_rows()), lc.eq(c.eff_cols())]
        inc_cb = (lc + BLOCK - 1) >> 6
        inc_groups = (lr + BLOCK - 1) >> 6

        def overlaps(lo, n, i):
            """VBUF rows [lo, lo + n) meet wq[i]'s result rows still to come."""
            hi = wq_dst[i] + ((wq_rows[i] + BLOCK - 1) >> 6)
            return (i < wq_n) & (n != 0) & (lo < hi) & (wq_dst[i] < lo + n)

        hazard = Signal()
        m.d.comb += hazard.eq(
            Cat(
                *(
                    overlaps(inc.src_row, inc_cb, i)
                    | (c.flags.bias & overlaps(inc.dst_row, inc_groups, i))
                    for i in range(WQ)
                )
            ).any()
        )
        makes_rows = ~c.flags.argmax & (inc_groups != 0)
        accept = Signal()
        m.d.comb += [
            ctrl.mpu.ready.eq(~rd_active & ~hazard & ((wq_n < WQ) | ~makes_rows)),
            accept.eq(ctrl.mpu.valid & ctrl.mpu.ready),
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
        m.d.comb += [mpu.cmd.payload.eq(issue.cmd), mpu.cmd.valid.eq(rd_active & ~cmd_sent)]
        with m.If(mpu.cmd.valid & mpu.cmd.ready):
            m.d.sync += cmd_sent.eq(1)
        nothing = n_groups == 0  # no live row: the MPU takes only the command
        use_bias = issue.cmd.flags.bias
        store_active = Signal()
        reading = rd_active & ~nothing & (rd_phase < 2) & ~rd_wait & ~held
        with m.If(reading):
            m.d.comb += [
                shared_rd.en.eq(1),
                shared_rd.addr.eq(Mux(rd_phase == 0, issue.src_row, issue.dst_row) + rd_i),
            ]
            m.d.sync += rd_wait.eq(1)
        with m.If(rd_active & (rd_wait | held)):
            is_x = rd_phase == 0
            m.d.comb += [
                mpu.x.payload.eq(shared_rd.data),
                mpu.bias.payload.eq(shared_rd.data),
                mpu.x.valid.eq(is_x),
                mpu.bias.valid.eq(~is_x),
            ]
            took = Mux(is_x, mpu.x.ready, mpu.bias.ready)
            m.d.sync += [rd_wait.eq(0), held.eq(~took)]
            with m.If(took):
                last = rd_i + 1 == Mux(is_x, n_cb, n_groups)
                m.d.sync += rd_i.eq(Mux(last, 0, rd_i + 1))
                with m.If(last):
                    m.d.sync += rd_phase.eq(Mux(is_x & use_bias, 1, 2))
        # the reader is done when the MPU has the command and every x and bias row
        with m.If(rd_active & cmd_sent & (nothing | (rd_phase == 2)) & ~rd_wait & ~held):
            m.d.sync += rd_active.eq(0)

        # writer: result rows of wq[0] to its dst + g, live elements only
        m.d.comb += [mpu.result.ready.eq(1), mpu.argmax.ready.eq(ctrl.mpu_argmax.ready)]
        m.d.comb += [
            ctrl.mpu_argmax.valid.eq(mpu.argmax.valid),
            ctrl.mpu_argmax.payload.eq(mpu.argmax.payload),
        ]
        rem = Signal(32)
        m.d.comb += rem.eq(wq_rows[0] - (res_i << 6))
        res_mask = Signal(BLOCK)
        m.d.comb += res_mask.eq(Mux(rem >= BLOCK, (1 << BLOCK) - 1, (1 << rem[:7]) - 1))
        mpu_write = Signal()
        m.d.comb += mpu_write.eq(mpu.result.valid)
        res_last = Signal()
        m.d.comb += res_last.eq(mpu_write & (rem <= BLOCK))
        with m.If(mpu_write):
            m.d.sync += res_i.eq(Mux(res_last, 0, res_i + 1))
        push = accept & makes_rows
        # wq: pop on the last result row of wq[0], push at the tail
        with m.If(res_last):
            m.d.sync += [wq_dst[0].eq(wq_dst[1]), wq_rows[0].eq(wq_rows[1])]
        with m.If(push):
            slot = Mux(res_last, wq_n - 1, wq_n)
            for i in range(WQ):
                with m.If(slot == i):
                    m.d.sync += [wq_dst[i].eq(inc.dst_row), wq_rows[i].eq(lr)]
        m.d.sync += wq_n.eq(wq_n + push - res_last)
        mpu_active = Signal()
        m.d.comb += mpu_active.eq(rd_active | (wq_n != 0) | mpu.busy)

        # ---- store feeder ---------------------------------------------------------------------
        st = Signal(StoreIssue)
        st_rows = Signal(16)
        st_i = Signal(16)
        st_cmd_sent = Signal()
        st_wait = Signal()
        st_held = Signal()
        m.d.comb += ctrl.dma_store.ready.eq(~store_active)
        with m.If(ctrl.dma_store.valid & ~store_active):
            kind = ctrl.dma_store.payload.cmd.kind
            has_rows = (
                (kind == StoreKind.VECTOR) | (kind == StoreKind.ROW) | (kind == StoreKind.COL)
            )
            m.d.sync += [
                st.eq(ctrl.dma_store.payload),
                store_active.eq(1),
                st_rows.eq(Mux(has_rows, (ctrl.dma_store.payload.cmd.length + BLOCK - 1) >> 6, 0)),
                st_i.eq(0),
                st_cmd_sent.eq(0),
                st_wait.eq(0),
                st_held.eq(0),
            ]
        m.d.comb += [dma.store.payload.eq(st.cmd), dma.store.valid.eq(store_active & ~st_cmd_sent)]
        with m.If(dma.store.valid & dma.store.ready):
            m.d.sync += st_cmd_sent.eq(1)
        with m.If(store_active & ~rd_active):
            with m.If((st_i < st_rows) & ~st_wait & ~st_held):
                m.d.comb += [shared_rd.en.eq(1), shared_rd.addr.eq(st.src_row + st_i)]
                m.d.sync += st_wait.eq(1)
            with m.If(st_wait | st_held):
                m.d.comb += [dma.store_data.valid.eq(1), dma.store_data.payload.eq(shared_rd.data)]
                m.d.sync += [st_wait.eq(0), st_held.eq(~dma.store_data.ready)]
                with m.If(dma.store_data.ready):
                    m.d.sync += st_i.eq(st_i + 1)
            with m.If(st_cmd_sent & (st_i == st_rows) & ~st_wait & ~st_held):
                m.d.sync += store_active.eq(0)

        # ---- the one VBUF write port --------------------------------------------------------
        with m.If(rows_to_vbuf):
            m.d.comb += [
                wr.addr.eq(dma.rows.payload.addr),
                wr.data.eq(dma.rows.payload.data),
                wr.mask.eq(dma.rows.payload.mask),
            ]
        with m.Elif(mpu_write):
            m.d.comb += [
                wr.addr.eq(wq_dst[0] + res_i),
                wr.data.eq(mpu.result.payload),
                wr.mask.eq(res_mask),
            ]
        with m.Else():
            m.d.comb += [
                wr.addr.eq(vpu.write.addr),
                wr.data.eq(vpu.write.data),
                wr.mask.eq(vpu.write.mask),
            ]

        m.d.comb += [
            ctrl.busy.vpu.eq(vpu.busy | (vq.level != 0) | ctrl.vpu.valid),
            ctrl.busy.mpu.eq(mpu_active),
            ctrl.busy.dma_read.eq(~dma.read_idle | fetching),
            ctrl.busy.loadv.eq(loadv_rows != 0),
            ctrl.busy.store.eq(store_active),
            ctrl.busy.dma_write.eq(~dma.write_idle | store_active),
        ]
        return m


def verilog(geom: CoreGeometry) -> str:
    """Verilog of ``tandem_decode_core`` for ``geom``, with the Vitis port names."""
    from amaranth.back import verilog as back

    core = DecodeCore(geom)
    return back.convert(core, name=TOPLEVEL, ports=vitis_ports(core), emit_src=False)
