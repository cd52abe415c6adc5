"""The decode core's top level: the Vitis kernel ``tandem_decode_core``, built from the shell,
the controller, the DMA, the MPU, the VPU, the vector buffer and the blocks between them."""

# No `from __future__ import annotations`: data.Struct reads its annotations as shapes.

from amaranth import ClockDomain, Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out, connect, flipped

from tandem import regmap
from tandem.geometry import CoreGeometry, check_geometry

from .axi import AXI4LiteSignature, AXI4Signature, vitis_ports
from .component import GeometryComponent
from .controller import Controller, UnitBusy
from .dma import DMAEngine, StoreCommand
from .feeders import CommandQueue, MpuFeeder, ReadPortShare, StoreFeeder, VbufWriteArbiter
from .fetch import ProgramFetch
from .mpu import MatrixUnit
from .shell import KernelShell
from .vbuf import VectorBuffer
from .vpu import VectorCommand, VectorUnit

__all__ = ["TOPLEVEL", "VPU_QUEUE", "DecodeCore", "PerfSignature", "verilog"]

TOPLEVEL = "tandem_decode_core"
VPU_QUEUE = 64
"""Vector commands the core holds between the controller and the vector unit: enough for a
head group's softmax (5 ops per head), so the controller reaches the next MATVEC and starts its
weight read while the vector unit still works."""


class PerfSignature(wiring.Signature):
    """Read-only taps on the core's internals for performance monitors (``Out`` from the core).

    Members
    -------
    start, done : Out(1)
        The shell's one-cycle ``ap_start`` pulse to the controller, and the controller's done.
    busy : Out(UnitBusy)
        The busy flags the controller sees (:class:`tandem.rtl.controller.UnitBusy`).
    tile_valid, tile_ready : Out(1)
        The MPU's weight-tile stream (``valid & ready``: one tile taken).
    store_issued : Out(1)
        The controller issued ``store`` in this cycle (the DMA store command handshake at the
        store feeder's input).
    store : Out(StoreCommand)
    """

    def __init__(self):
        super().__init__(
            {
                "start": Out(1),
                "done": Out(1),
                "busy": Out(UnitBusy),
                "tile_valid": Out(1),
                "tile_ready": Out(1),
                "store_issued": Out(1),
                "store": Out(StoreCommand),
            }
        )


class DecodeCore(GeometryComponent):
    """The Vitis RTL kernel ``tandem_decode_core``.

    Ports: ``ap_clk``, ``ap_rst_n`` (active low, synchronous), ``interrupt``,
    ``s_axi_control_*`` (:class:`rtl.shell.KernelShell`) and one AXI4 manager
    ``m_axi_hbm<ch>_*`` per channel at ``geom.port_bits`` (:class:`rtl.dma.DMAEngine`).
    With ``perf=True`` (simulation tops only, see :mod:`tandem.sim.rtljob`) there is also a
    ``perf`` member (:class:`PerfSignature`); the Vitis kernel (:func:`verilog`) has none.

    Inside, the :class:`Controller` issues to:

    - the :class:`DMAEngine` through :class:`rtl.fetch.ProgramFetch`, which owns the DMA's read
      command port and row stream: it runs the program fetch (``ROWS`` reads of the program
      region, of which channel 0's beats go to the controller), passes the controller's reads
      through otherwise, sends LOADV rows to the VBUF write port and counts those still to come;
      and through :class:`rtl.feeders.StoreFeeder` for stores (it reads their rows from the
      VBUF). LDW words go straight to the controller.
    - the :class:`MatrixUnit` through :class:`rtl.feeders.MpuFeeder` (x and bias rows from the
      VBUF, result rows back); the weight tiles go from the DMA straight into the MPU and the
      ARGMAX index straight to the controller.
    - the :class:`VectorUnit` through a :class:`rtl.feeders.CommandQueue` of :data:`VPU_QUEUE`
      commands, so the controller runs ahead.

    The :class:`VectorBuffer` has three read ports (VPU a, VPU b, and one shared by the MPU
    feeder and the store feeder: :class:`rtl.feeders.ReadPortShare`) and one write port
    shared by the LOADV rows, the MPU feeder and the VPU
    (:class:`rtl.feeders.VbufWriteArbiter`); the controller's scoreboard lets only one of each
    group use the VBUF at a time, so the sharing is a plain multiplexer (the store feeder also
    waits while the MPU feeder loads).
    """

    def __init__(self, geom: CoreGeometry, *, perf: bool = False):
        check_geometry(geom)
        self._perf = bool(perf)
        addr_width = (regmap.address_space_bytes(geom.channels) - 1).bit_length()
        members = {
            "ap_clk": In(1),
            "ap_rst_n": In(1),
            "interrupt": Out(1),
            "s_axi_control": In(AXI4LiteSignature(addr_width=addr_width)),
        }
        for ch in range(geom.channels):
            members[f"m_axi_hbm{ch}"] = Out(AXI4Signature(addr_width=64, data_width=geom.port_bits))
        if self._perf:
            members["perf"] = Out(PerfSignature())
        super().__init__(geom, members)

    @property
    def has_perf(self) -> bool:
        """Whether the core has the ``perf`` member."""
        return self._perf

    def elaborate(self, platform):
        m = Module()
        g = self._geom
        m.domains.sync = cd = ClockDomain("sync")
        m.d.comb += [cd.clk.eq(self.ap_clk), cd.rst.eq(~self.ap_rst_n)]

        m.submodules.shell = shell = KernelShell(g)
        m.submodules.ctrl = ctrl = Controller(g)
        m.submodules.dma = dma = DMAEngine(g)
        m.submodules.fetch = fetch = ProgramFetch(g)
        m.submodules.store_feeder = stores = StoreFeeder(g)
        m.submodules.mpu_feeder = feeder = MpuFeeder(g)
        m.submodules.mpu = mpu = MatrixUnit(g)
        m.submodules.vpu_queue = vq = CommandQueue(VectorCommand, VPU_QUEUE)
        m.submodules.vpu = vpu = VectorUnit(g)
        m.submodules.vbuf = vbuf = VectorBuffer(g, read_ports=3, write_ports=1)
        m.submodules.vbuf_shared_read = shared_rd = ReadPortShare(vbuf.rows, users=2)
        m.submodules.vbuf_write = vbuf_wr = VbufWriteArbiter(g)

        # ---- host side: control registers, HBM ports --------------------------------------
        connect(m, flipped(self.s_axi_control), shell.s_axi_control)
        for ch in range(g.channels):
            name = f"m_axi_hbm{ch}"
            connect(m, getattr(dma, name), flipped(getattr(self, name)))
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

        # ---- DMA reads: program fetch, LOADV rows, LDW words --------------------------------
        connect(m, ctrl.fetch_cmd, fetch.cmd)
        connect(m, fetch.data, ctrl.fetch_data)
        connect(m, ctrl.dma_read, fetch.issue)
        connect(m, fetch.read, dma.read)
        connect(m, dma.rows, fetch.rows)
        connect(m, fetch.loadv, vbuf_wr.loadv)
        connect(m, dma.word, ctrl.dma_word)

        # ---- stores ---------------------------------------------------------------------------
        connect(m, ctrl.dma_store, stores.issue)
        connect(m, stores.cmd, dma.store)
        connect(m, stores.data, dma.store_data)
        connect(m, stores.read, shared_rd.users[1])
        m.d.comb += stores.hold.eq(feeder.loading)

        # ---- MPU: commands, x and bias through the feeder, weights straight from the DMA -----
        connect(m, ctrl.mpu, feeder.issue)
        connect(m, feeder.cmd, mpu.cmd)
        connect(m, feeder.x, mpu.x)
        connect(m, feeder.bias, mpu.bias)
        connect(m, dma.tiles, mpu.weights)
        connect(m, mpu.result, feeder.result)
        connect(m, mpu.argmax, ctrl.mpu_argmax)
        connect(m, feeder.read, shared_rd.users[0])
        connect(m, feeder.write, vbuf_wr.mpu)

        # ---- VPU --------------------------------------------------------------------------
        connect(m, ctrl.vpu, vq.i)
        connect(m, vq.o, vpu.cmd)
        connect(m, vpu.read_a, vbuf.read[0])
        connect(m, vpu.read_b, vbuf.read[1])
        connect(m, vpu.write, vbuf_wr.vpu)
        m.d.comb += vpu.done.ready.eq(1)

        # ---- VBUF: the shared read port and the write port ----------------------------------
        connect(m, shared_rd.port, vbuf.read[2])
        connect(m, vbuf_wr.write, vbuf.write[0])

        m.d.comb += [
            ctrl.busy.vpu.eq(vpu.busy | (vq.level != 0) | ctrl.vpu.valid),
            ctrl.busy.mpu.eq(feeder.busy | mpu.busy),
            ctrl.busy.dma_read.eq(~dma.read_idle | fetch.fetching),
            ctrl.busy.loadv.eq(fetch.loadv_busy),
            ctrl.busy.store.eq(stores.busy),
            ctrl.busy.dma_write.eq(~dma.write_idle | stores.busy),
        ]

        if self._perf:
            m.d.comb += [
                self.perf.start.eq(shell.start),
                self.perf.done.eq(ctrl.done),
                self.perf.busy.eq(ctrl.busy),
                self.perf.tile_valid.eq(mpu.weights.valid),
                self.perf.tile_ready.eq(mpu.weights.ready),
                self.perf.store_issued.eq(ctrl.dma_store.valid & ctrl.dma_store.ready),
                self.perf.store.eq(ctrl.dma_store.payload.cmd),
            ]
        return m


def verilog(geom: CoreGeometry) -> str:
    """Verilog of ``tandem_decode_core`` for ``geom``, with the Vitis port names."""
    from amaranth.back import verilog as back

    core = DecodeCore(geom)
    return back.convert(core, name=TOPLEVEL, ports=vitis_ports(core), emit_src=False)
