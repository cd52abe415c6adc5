"""The kernel shell: the Vitis ``s_axi_control`` slave with ``ap_ctrl_hs`` semantics."""

# No `from __future__ import annotations`: layouts are built from the register map at run time.

from amaranth import Cat, Const, Module, Mux, Signal
from amaranth.lib import data
from amaranth.lib.wiring import In, Out

from tandem import regmap
from tandem.geometry import CoreGeometry, check_geometry

from .axi import AXI4LiteSignature, Resp
from .component import GeometryComponent

__all__ = ["KernelShell", "args_layout", "status_layout"]


def args_layout(channels: int) -> data.StructLayout:
    """The kernel arguments as the core reads them: one field per :func:`tandem.regmap.arguments`
    entry, by name (``start_pos`` ... ``watchdog``, ``hbm0`` ...), 32 bits for scalars and 64
    for pointers."""
    return data.StructLayout({a.name: 8 * a.size for a in regmap.arguments(channels)})


def status_layout(channels: int) -> data.StructLayout:
    """What the core reports: one 32-bit field per :func:`tandem.regmap.status_registers` entry,
    named in lower case (``status``, ``error_pc``, ``error_code``, ``tokens``, ``cycles_lo``,
    ``cycles_hi``)."""
    return data.StructLayout({r.name.lower(): 32 for r in regmap.status_registers(channels)})


class KernelShell(GeometryComponent):
    """AXI4-Lite control slave with the Vitis ``ap_ctrl_hs`` register map of
    :mod:`tandem.regmap`, as the Vitis RTL kernel template implements it.

    Every offset comes from :mod:`tandem.regmap`:

    * ``CTRL`` -- ``ap_start`` (read/write; set by a host write of 1, cleared when the core
      finishes, unless ``auto_restart`` is set), ``ap_done`` (read-only, set when the core
      finishes, cleared by reading CTRL), ``ap_idle`` (read-only, 1 from reset and after the core
      finishes, 0 while it runs), ``ap_ready`` (read-only, set together with ``ap_done`` -- the
      core uses its arguments for the whole run, so it is ready for new ones only when it is
      done -- cleared by reading CTRL), ``auto_restart`` (read/write).
    * ``GIER`` bit 0, ``IER`` bits 0 (done) and 1 (ready): read/write.
    * ``ISR``: bit 0 is set when the core finishes with ``IER.done`` set, bit 1 likewise with
      ``IER.ready``; a write toggles the bits written as 1 (the host clears a bit by writing 1).
      ``interrupt`` is ``GIER & (ISR != 0)``.
    * the arguments (read/write), 32-bit words; a pointer is a low word at its offset and a high
      word 4 bytes above, a scalar's upper word reads as 0 and ignores writes.
    * the status registers (read-only): the :attr:`status` inputs, read live.

    Unmapped addresses read as 0 and ignore writes; every response is OKAY. ``wstrb`` selects
    the bytes a write changes; for the single-bit controls, byte 0 must be strobed.

    The core starts when ``ap_start`` is 1 and the shell is idle: :attr:`start` is high for
    that one cycle, and ``ap_idle`` falls on the next. When the core raises :attr:`done` for a
    cycle, ``ap_done``, ``ap_ready`` and ``ap_idle`` are set and ``ap_start`` is cleared on the
    next edge (or kept with ``auto_restart``, which starts the next run a cycle later).

    Parameters
    ----------
    geom : CoreGeometry
        ``channels`` sets the number of pointer arguments and so the register offsets.

    Members
    -------
    s_axi_control : In(AXI4LiteSignature(addr_width))
        ``addr_width`` = log2 of :func:`tandem.regmap.address_space_bytes`; address bits below
        2 are ignored.
    args : Out(args_layout(channels))
        The argument registers (see :func:`args_layout`).
    start : Out(1)
        One-cycle pulse: start a run.
    done : In(1)
        One-cycle pulse from the core: the run has finished (the status inputs are final).
    status : In(status_layout(channels))
        The status register values (see :func:`status_layout`).
    idle : Out(1)
        ``ap_idle``.
    interrupt : Out(1)
        The kernel interrupt (level).

    Timing
    ------
    A write completes in 2 cycles after both its address and data are accepted (the response is
    valid on the second edge); ``awready`` and ``wready`` are high whenever the previous write's
    address or data has been used. A read returns its data one cycle after the address is
    accepted; ``arready`` is low while a read response waits for ``rready``. AW and W may come
    in either order or together.
    """

    def __init__(self, geom: CoreGeometry):
        check_geometry(geom)
        self._addr_width = (regmap.address_space_bytes(geom.channels) - 1).bit_length()
        super().__init__(
            geom,
            {
                "s_axi_control": In(AXI4LiteSignature(addr_width=self._addr_width)),
                "args": Out(args_layout(geom.channels)),
                "start": Out(1),
                "done": In(1),
                "status": In(status_layout(geom.channels)),
                "idle": Out(1),
                "interrupt": Out(1),
            }
        )

    @property
    def addr_width(self) -> int:
        return self._addr_width

    def elaborate(self, platform):
        m = Module()
        bus = self.s_axi_control
        channels = self._geom.channels

        # ---- AXI4-Lite handshakes -----------------------------------------------------------
        aw_full = Signal()
        aw_addr = Signal(self._addr_width)
        w_full = Signal()
        w_data = Signal(32)
        w_strb = Signal(4)
        m.d.comb += [
            bus.awready.eq(~aw_full),
            bus.wready.eq(~w_full),
            bus.bresp.eq(Resp.OKAY),
            bus.rresp.eq(Resp.OKAY),
        ]
        with m.If(bus.awvalid & ~aw_full):
            m.d.sync += [aw_full.eq(1), aw_addr.eq(bus.awaddr)]
        with m.If(bus.wvalid & ~w_full):
            m.d.sync += [w_full.eq(1), w_data.eq(bus.wdata), w_strb.eq(bus.wstrb)]
        write = Signal()  # the latched write happens at this edge
        m.d.comb += write.eq(aw_full & w_full & ~bus.bvalid)
        with m.If(write):
            m.d.sync += [aw_full.eq(0), w_full.eq(0), bus.bvalid.eq(1)]
        with m.Elif(bus.bready):
            m.d.sync += bus.bvalid.eq(0)

        read = Signal()  # an address is accepted at this edge
        m.d.comb += [bus.arready.eq(~bus.rvalid), read.eq(bus.arvalid & ~bus.rvalid)]
        with m.If(read):
            m.d.sync += bus.rvalid.eq(1)
        with m.Elif(bus.rready):
            m.d.sync += bus.rvalid.eq(0)

        def word_index(offset: int) -> int:
            return offset >> 2

        w_word = aw_addr[2:]
        r_word = bus.araddr[2:]

        def writes(offset: int):
            return write & (w_word == word_index(offset))

        def merged(old):
            """``old`` (32 bits) with the strobed bytes of the write data."""
            return Cat(
                *(
                    Mux(w_strb[k], w_data[8 * k : 8 * k + 8], old[8 * k : 8 * k + 8])
                    for k in range(4)
                )
            )

        # ---- ap_ctrl_hs -----------------------------------------------------------------------
        ctrl = regmap.CTRL
        ap_start = Signal()
        ap_done = Signal()
        ap_idle = Signal(init=1)
        ap_ready = Signal()
        auto_restart = Signal()
        gie = Signal()
        ier = Signal(2)
        isr = Signal(2)
        ctrl_read = read & (r_word == word_index(ctrl.offset))
        ctrl_write = writes(ctrl.offset) & w_strb[0]

        def bit(reg, field):
            return w_data[reg.field(field)[0]]

        m.d.comb += [self.start.eq(ap_start & ap_idle), self.idle.eq(ap_idle)]
        with m.If(ctrl_write & bit(ctrl, "ap_start")):
            m.d.sync += ap_start.eq(1)
        with m.Elif(self.done):
            m.d.sync += ap_start.eq(auto_restart)
        with m.If(ctrl_write):
            m.d.sync += auto_restart.eq(bit(ctrl, "auto_restart"))
        with m.If(self.done):
            m.d.sync += [ap_done.eq(1), ap_ready.eq(1), ap_idle.eq(1)]
        with m.Else():
            with m.If(ctrl_read):
                m.d.sync += [ap_done.eq(0), ap_ready.eq(0)]
            with m.If(self.start):
                m.d.sync += ap_idle.eq(0)

        with m.If(writes(regmap.GIER.offset) & w_strb[0]):
            m.d.sync += gie.eq(bit(regmap.GIER, "enable"))
        with m.If(writes(regmap.IER.offset) & w_strb[0]):
            m.d.sync += ier.eq(Cat(bit(regmap.IER, "done"), bit(regmap.IER, "ready")))
        isr_toggle = Signal(2)
        isr_set = Signal(2)
        with m.If(writes(regmap.ISR.offset) & w_strb[0]):
            m.d.comb += isr_toggle.eq(Cat(bit(regmap.ISR, "done"), bit(regmap.ISR, "ready")))
        m.d.comb += isr_set.eq(Cat(ier[0] & self.done, ier[1] & self.done))
        m.d.sync += isr.eq((isr ^ isr_toggle) | isr_set)
        m.d.comb += self.interrupt.eq(gie & isr.any())

        def place(reg, values: dict):
            """A register word from field values by the register's field positions."""
            word = Const(0, 32)
            for field, value in values.items():
                lsb, _ = reg.field(field)
                word = word | (value.as_unsigned() << lsb)[:32]
            return word

        readable: dict[int, object] = {
            ctrl.offset: place(
                ctrl,
                {
                    "ap_start": ap_start,
                    "ap_done": ap_done,
                    "ap_idle": ap_idle,
                    "ap_ready": ap_ready,
                    "auto_restart": auto_restart,
                },
            ),
            regmap.GIER.offset: place(regmap.GIER, {"enable": gie}),
            regmap.IER.offset: place(regmap.IER, {"done": ier[0], "ready": ier[1]}),
            regmap.ISR.offset: place(regmap.ISR, {"done": isr[0], "ready": isr[1]}),
        }

        # ---- arguments: 32-bit words, written byte by byte ------------------------------------
        for arg in regmap.arguments(channels):
            value = getattr(self.args, arg.name)
            for k in range(arg.size // 4):
                word = Signal(32, name=f"{arg.name}_w{k}")
                offset = arg.offset + 4 * k
                with m.If(writes(offset)):
                    m.d.sync += word.eq(merged(word))
                m.d.comb += value[32 * k : 32 * k + 32].eq(word)
                readable[offset] = word

        for reg in regmap.status_registers(channels):
            readable[reg.offset] = getattr(self.status, reg.name.lower())

        rdata = Signal(32)
        with m.Switch(r_word):
            for offset, value in readable.items():
                with m.Case(word_index(offset)):
                    m.d.comb += rdata.eq(value)
        with m.If(read):
            m.d.sync += bus.rdata.eq(rdata)
        return m
