"""The decode core's top level: the Vitis kernel ``tandem_decode_core``, built from the shell,
the controller, the DMA, the MPU, the VPU, the vector buffer and the blocks between them."""

# No `from __future__ import annotations`: data.Struct reads its annotations as shapes.

from amaranth import ClockDomain, DomainRenamer, Module, Signal, Value
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out, connect, flipped

from tandem import regmap
from tandem.floorplan import BLOCKS, Floorplan, for_geometry
from tandem.geometry import CoreGeometry, check_geometry

from .axi import AXI4LiteSignature, AXI4Signature, vitis_ports
from .component import GeometryComponent
from .controller import MAX_PENDING, Controller, UnitBusy
from .dma import DMAEngine, ReadKind, StoreCommand
from .feeders import CommandQueue, MpuFeeder, ReadPortShare, StoreFeeder, VbufWriteArbiter
from .fetch import ProgramFetch
from .mpu import MatrixUnit
from .relay import Delay, Relay
from .sampler import Sampler
from .shell import KernelShell
from .vbuf import VectorBuffer
from .vpu import VectorCommand, VectorUnit

__all__ = [
    "FIXED_LATENCY",
    "LEVELS",
    "STREAMS",
    "TOPLEVEL",
    "VPU_QUEUE",
    "DecodeCore",
    "PerfSignature",
    "check_floorplan",
    "placement",
    "sll_pairs",
    "verilog",
]

TOPLEVEL = "tandem_decode_core"
VPU_QUEUE = 64
"""Vector commands the core holds between the controller and the vector unit: enough for a
head group's softmax (5 ops per head), so the controller reaches the next MATVEC and starts its
weight read while the vector unit still works."""


STREAMS = {
    # name: (from block, to block); the relay is the instance ``xing_<name>``.
    "fetch_cmd": ("ctrl", "fetch"),
    "fetch_data": ("fetch", "ctrl"),
    "dma_read": ("ctrl", "fetch"),
    "fetch_read": ("fetch", "dma"),
    "rows": ("dma", "fetch"),
    "loadv": ("fetch", "vbuf_write"),
    "word": ("dma", "ctrl"),
    "store_issue": ("ctrl", "store_feeder"),
    "store_cmd": ("store_feeder", "dma"),
    "store_data": ("store_feeder", "dma"),
    "mpu_issue": ("ctrl", "mpu_feeder"),
    "mpu_cmd": ("mpu_feeder", "mpu"),
    "mpu_x": ("mpu_feeder", "mpu"),
    "mpu_bias": ("mpu_feeder", "mpu"),
    "tiles": ("dma", "mpu"),
    "mpu_result": ("mpu", "mpu_feeder"),
    "argmax": ("mpu", "ctrl"),
    "vpu_issue": ("ctrl", "vpu_queue"),
    "vpu_cmd": ("vpu_queue", "vpu"),
}
"""Every valid/ready stream between two blocks (:data:`tandem.floorplan.BLOCKS`): each goes
through a :class:`rtl.relay.Relay` of ``floorplan.stages(from, to)`` stages. The VBUF's read
and write ports are not streams (fixed latency); their users sit beside it, and
:func:`placement` keeps them in one SLR."""

LEVELS = {
    # name: (from block, to block); the delay is the instance ``delay_<name>``.
    "args_ctrl": ("shell", "ctrl"),
    "args_dma": ("shell", "dma"),
    "start_ctrl": ("shell", "ctrl"),
    "start_dma": ("shell", "dma"),
    "done": ("ctrl", "shell"),
    "status": ("ctrl", "shell"),
    "record": ("ctrl", "dma"),
    "dma_error": ("dma", "ctrl"),
    "dma_error_tag": ("dma", "ctrl"),
    "dma_error_read": ("dma", "ctrl"),
    "hold": ("mpu_feeder", "store_feeder"),
    "sample_feed": ("mpu", "sampler"),
    "sample_result": ("sampler", "mpu"),
    "busy_vpu": ("vpu", "ctrl"),
    "busy_mpu_feeder": ("mpu_feeder", "ctrl"),
    "busy_mpu": ("mpu", "ctrl"),
    "busy_read": ("dma", "ctrl"),
    "busy_fetch": ("fetch", "ctrl"),
    "busy_loadv": ("fetch", "ctrl"),
    "busy_store": ("store_feeder", "ctrl"),
    "busy_write_feeder": ("store_feeder", "ctrl"),
    "busy_write_dma": ("dma", "ctrl"),
}
"""Every other signal between two blocks (arguments, start, done, status, errors, busy flags):
each through a :class:`rtl.relay.Delay` of ``floorplan.stages(from, to)`` registers."""

FIXED_LATENCY = (("vbuf", "vpu"), ("vbuf", "vbuf_shared_read"), ("vbuf", "vbuf_write"),
                 ("vbuf_shared_read", "mpu_feeder"), ("vbuf_shared_read", "store_feeder"),
                 ("vbuf_write", "vpu"), ("vbuf_write", "mpu_feeder"),
                 ("vpu_queue", "vpu"), ("fetch", "ctrl"))  # fmt: skip
"""Pairs that must share an SLR: those joined by something other than a stream or a level
signal (the VBUF ports, the queue's level), and the program fetch with the controller (after a
watchdog stop the fetch drops the rows of the stopped fetch as they arrive; beats it had already
sent into stages towards the controller would be taken as the next run's program)."""


def check_floorplan(plan: Floorplan) -> Floorplan:
    """``plan`` if every pair in :data:`FIXED_LATENCY` shares an SLR, else ValueError."""
    if not isinstance(plan, Floorplan):
        raise TypeError(f"floorplan must be a tandem.floorplan.Floorplan, not {plan!r}")
    split = [(a, b) for a, b in FIXED_LATENCY if plan.slr[a] != plan.slr[b]]
    if split:
        raise ValueError(
            f"floorplan {plan.name!r} puts {split} in different SLRs; these blocks are joined "
            "by fixed-latency ports (no stages possible) and must share one"
        )
    return plan


def placement(plan: Floorplan) -> list[tuple[str, int]]:
    """(instance path under the kernel, SLR) for every block, relay stage and far-end FIFO,
    delay register and reset-tree register of a core built with ``plan``: what the Vitis flow's
    pblock constraints place (scripts/bitstream.py)."""
    check_floorplan(plan)
    out = [(b, plan.slr[b]) for b in BLOCKS]
    for kind, table in (("xing", STREAMS), ("delay", LEVELS)):
        for name, (a, b) in table.items():
            slrs = plan.stage_slrs(a, b)
            for k, slr in enumerate(slrs):
                out.append((f"{kind}_{name}/stage{k}", slr))
            if kind == "xing" and slrs:
                out.append((f"{kind}_{name}/fifo", slrs[-1]))
    root = plan.slr["shell"]
    out += [(f"rst_root/stage{k}", root) for k in range(plan.reset_stages)]
    for s in plan.slrs:
        out += [(f"rst_slr{s}/stage{k}", r) for k, r in enumerate(plan.reset_branch_slrs(s))]
    return out


def sll_pairs(plan: Floorplan) -> list[tuple[str, str]]:
    """(from, to) instance paths of the register hops of ``plan`` that cross an SLR boundary:
    consecutive stages of a :class:`rtl.relay.Relay` (its items one way, its acknowledgements
    the other), of a :class:`rtl.relay.Delay` or of a reset branch, in two SLRs. Nothing but
    wires joins them, so both can sit in Laguna sites (``USER_SLL_REG``)."""
    check_floorplan(plan)
    chains = [(f"xing_{name}", plan.stage_slrs(a, b)) for name, (a, b) in STREAMS.items()]
    chains += [(f"delay_{name}", plan.stage_slrs(a, b)) for name, (a, b) in LEVELS.items()]
    chains += [(f"rst_slr{s}", plan.reset_branch_slrs(s)) for s in plan.slrs]
    return [
        (f"{inst}/stage{k}", f"{inst}/stage{k + 1}")
        for inst, slrs in chains
        for k in range(len(slrs) - 1)
        if slrs[k] != slrs[k + 1]
    ]


class PerfSignature(wiring.Signature):
    """Read-only taps on the core's internals for performance monitors (``Out`` from the core).

    Members
    -------
    start, done : Out(1)
        The shell's one-cycle ``ap_start`` pulse to the controller, and the controller's done.
    pc : Out(16)
        The pc of the instruction in the controller's Exec stage (``Controller.exec_pc``).
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
                "pc": Out(16),
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
      ARGMAX index straight to the controller. The MPU's :class:`rtl.sampler.Sampler` is a
      block of its own (``sampler``), fed the rounded rows through level-signal stages.
    - the :class:`VectorUnit` through a :class:`rtl.feeders.CommandQueue` of :data:`VPU_QUEUE`
      commands, so the controller runs ahead.

    The :class:`VectorBuffer` has three read ports (VPU a, VPU b, and one shared by the MPU
    feeder and the store feeder: :class:`rtl.feeders.ReadPortShare`) and one write port
    shared by the LOADV rows, the MPU feeder and the VPU
    (:class:`rtl.feeders.VbufWriteArbiter`); the controller's scoreboard lets only one of each
    group use the VBUF at a time, so the sharing is a plain multiplexer (the store feeder also
    waits while the MPU feeder loads).

    ``dma_queue``: the DMA's read commands planned ahead and each channel's run FIFO depth
    (:class:`DMAEngine` ``queue_depth``, ``cmd_depth``); by default the controller's
    :data:`rtl.controller.MAX_PENDING`, so every pending MATVEC's read is with the channels. A
    test builds the core with less (tests/rtl/test_core.py) to fill the read relays.
    """

    def __init__(
        self,
        geom: CoreGeometry,
        *,
        perf: bool = False,
        floorplan: Floorplan | None = None,
        dma_queue: int = MAX_PENDING,
    ):
        check_geometry(geom)
        self._perf = bool(perf)
        self._dma_queue = dma_queue
        if floorplan is None:
            floorplan = for_geometry(geom)
        self._plan = check_floorplan(floorplan)
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
    def floorplan(self) -> Floorplan:
        """Where the blocks go and how many stages each stream between them has."""
        return self._plan

    @property
    def has_perf(self) -> bool:
        """Whether the core has the ``perf`` member."""
        return self._perf

    def elaborate(self, platform):
        m = Module()
        g, plan = self._geom, self._plan
        reset_gate = self._reset_tree(m)

        def place(name, block):
            """Add ``block`` as ``name``, clocked and reset in its SLR's domain."""
            m.submodules[name] = DomainRenamer({"sync": _domain(plan.slr[name])})(block)
            return block

        shell = place("shell", KernelShell(g))
        ctrl = place("ctrl", Controller(g))
        # the DMA holds as many read commands as the controller keeps MATVECs pending
        q = self._dma_queue
        dma = place("dma", DMAEngine(g, queue_depth=q, cmd_depth=q))
        fetch = place("fetch", ProgramFetch(g))
        stores = place("store_feeder", StoreFeeder(g))
        feeder = place("mpu_feeder", MpuFeeder(g))
        mpu = place("mpu", MatrixUnit(g, external_sampler=True))
        sampler = place("sampler", Sampler(g))
        vq = place("vpu_queue", CommandQueue(VectorCommand, VPU_QUEUE))
        vpu = place("vpu", VectorUnit(g))
        vbuf = place("vbuf", VectorBuffer(g, read_ports=3, write_ports=1))
        shared_rd = place("vbuf_shared_read", ReadPortShare(vbuf.rows, users=2))
        vbuf_wr = place("vbuf_write", VbufWriteArbiter(g))

        def relay(name, src, dst, mark=None):
            """Stream ``src`` to ``dst`` through the stages the floorplan gives the pair of
            blocks :data:`STREAMS` names."""
            a, b = STREAMS[name]
            r = Relay(
                src.payload.shape(),
                plan.stages(a, b),
                domains=_stage_domains(plan, a, b),
                mark=mark,
            )
            m.submodules[f"xing_{name}"] = r
            connect(m, src, r.i)
            connect(m, r.o, dst)
            return r

        def delay(name, value):
            """``value`` (a level signal) as the receiving block of :data:`LEVELS` sees it."""
            a, b = LEVELS[name]
            d = Delay(
                Value.cast(value).shape(), plan.stages(a, b), domains=_stage_domains(plan, a, b)
            )
            m.submodules[f"delay_{name}"] = d
            m.d.comb += d.i.eq(value)
            return d.o

        # ---- host side: control registers, HBM ports --------------------------------------
        self._control_port(m, shell, reset_gate)
        for ch in range(g.channels):
            name = f"m_axi_hbm{ch}"
            connect(m, getattr(dma, name), flipped(getattr(self, name)))
        m.d.comb += [
            self.interrupt.eq(shell.interrupt),
            ctrl.args.eq(delay("args_ctrl", shell.args.as_value())),
            dma.args.eq(delay("args_dma", shell.args.as_value())),
            ctrl.start.eq(delay("start_ctrl", shell.start)),
            dma.clear.eq(delay("start_dma", shell.start)),
            shell.done.eq(delay("done", ctrl.done)),
            shell.status.eq(delay("status", ctrl.status.as_value())),
            dma.record.eq(delay("record", ctrl.record.as_value())),
            ctrl.dma_error.eq(delay("dma_error", dma.error.as_value())),
            ctrl.dma_error_tag.eq(delay("dma_error_tag", dma.error_tag)),
            ctrl.dma_error_read.eq(delay("dma_error_read", dma.error_read)),
        ]

        # ---- DMA reads: program fetch, LOADV rows, LDW words --------------------------------
        x_fetch_cmd = relay("fetch_cmd", ctrl.fetch_cmd, fetch.cmd)
        relay("fetch_data", fetch.data, ctrl.fetch_data)

        # busy.loadv counts the ROWS reads in these relays only: a weight (TILES) read held
        # there by a full DMA must not stop the MPU commands whose tiles would free the DMA
        def rows_read(p):
            return p.kind == ReadKind.ROWS

        x_read = relay("dma_read", ctrl.dma_read, fetch.issue, mark=rows_read)
        x_fetch_read = relay("fetch_read", fetch.read, dma.read, mark=rows_read)
        relay("rows", dma.rows, fetch.rows)
        x_loadv = relay("loadv", fetch.loadv, vbuf_wr.loadv)
        relay("word", dma.word, ctrl.dma_word)

        # ---- stores ---------------------------------------------------------------------------
        x_store = relay("store_issue", ctrl.dma_store, stores.issue)
        x_store_cmd = relay("store_cmd", stores.cmd, dma.store)
        x_store_data = relay("store_data", stores.data, dma.store_data)
        connect(m, stores.read, shared_rd.users[1])
        m.d.comb += stores.hold.eq(delay("hold", feeder.loading))

        # ---- MPU: commands, x and bias through the feeder, weights straight from the DMA -----
        x_mpu = relay("mpu_issue", ctrl.mpu, feeder.issue)
        relay("mpu_cmd", feeder.cmd, mpu.cmd)
        relay("mpu_x", feeder.x, mpu.x)
        relay("mpu_bias", feeder.bias, mpu.bias)
        relay("tiles", dma.tiles, mpu.weights)
        relay("mpu_result", mpu.result, feeder.result)
        relay("argmax", mpu.argmax, ctrl.mpu_argmax)
        m.d.comb += [
            sampler.feed.eq(delay("sample_feed", mpu.sample_feed.as_value())),
            mpu.sample_result.eq(delay("sample_result", sampler.result.as_value())),
        ]
        connect(m, feeder.read, shared_rd.users[0])
        connect(m, feeder.write, vbuf_wr.mpu)

        # ---- VPU --------------------------------------------------------------------------
        x_vpu = relay("vpu_issue", ctrl.vpu, vq.i)
        relay("vpu_cmd", vq.o, vpu.cmd)
        connect(m, vpu.read_a, vbuf.read[0])
        connect(m, vpu.read_b, vbuf.read[1])
        connect(m, vpu.write, vbuf_wr.vpu)
        m.d.comb += vpu.done.ready.eq(1)

        # ---- VBUF: the shared read port and the write port ----------------------------------
        connect(m, shared_rd.port, vbuf.read[2])
        connect(m, vbuf_wr.write, vbuf.write[0])

        # ---- what the controller's scoreboard sees ------------------------------------------
        # Each unit's busy flag comes back through as many registers as the relay that carries
        # its commands has stages, and that relay's own `busy` covers a command from the cycle
        # after the controller issued it until the unit's flag, raised the cycle after it took
        # the command, has had time to come back: no gap, only a few conservative cycles at the
        # end (rtl/relay.py; the stage counts obey the triangle inequality, docs/floorplan.md).
        vpu_far = delay("busy_vpu", vpu.busy | (vq.level != 0))
        feeder_far = delay("busy_mpu_feeder", feeder.busy)
        mpu_far = delay("busy_mpu", mpu.busy)
        read_far = delay("busy_read", ~dma.read_idle) | delay("busy_fetch", fetch.fetching)
        loadv_far = delay("busy_loadv", fetch.loadv_busy | x_loadv.busy)
        store_far = delay("busy_store", stores.busy)
        write_far = delay(
            "busy_write_feeder",
            stores.busy | x_store_cmd.busy | x_store_data.busy,
        )
        write_dma = delay("busy_write_dma", ~dma.write_idle)
        m.d.comb += [
            ctrl.busy.vpu.eq(vpu_far | x_vpu.busy | ctrl.vpu.valid),
            ctrl.busy.mpu.eq(feeder_far | mpu_far | x_mpu.busy),
            ctrl.busy.dma_read.eq(read_far | x_read.busy | x_fetch_cmd.busy | x_fetch_read.busy),
            ctrl.busy.loadv.eq(loadv_far | x_read.busy_mark | x_fetch_read.busy_mark),
            ctrl.busy.store.eq(store_far | x_store.busy),
            ctrl.busy.dma_write.eq(write_far | write_dma | x_store.busy),
        ]

        if self._perf:
            m.d.comb += [
                self.perf.start.eq(ctrl.start),
                self.perf.done.eq(ctrl.done),
                self.perf.pc.eq(ctrl.exec_pc),
                self.perf.busy.eq(ctrl.busy),
                self.perf.tile_valid.eq(mpu.weights.valid),
                self.perf.tile_ready.eq(mpu.weights.ready),
                self.perf.store_issued.eq(ctrl.dma_store.valid & ctrl.dma_store.ready),
                self.perf.store.eq(ctrl.dma_store.payload.cmd),
            ]
        return m

    def _reset_tree(self, m):
        """``ap_rst_n`` through :attr:`Floorplan.reset_stages` registers to the root, then one
        branch per SLR, all of :attr:`Floorplan.reset_depth` registers, into the domain
        ``slr<k>`` (clock ``ap_clk``) of every block in SLR k: each block leaves reset in the
        same cycle. The registers start in reset and keep their names (``keep``) so synthesis
        does not merge the branches back into one net."""
        plan = self._plan
        m.domains.reset_tree = tree = ClockDomain("reset_tree", reset_less=True)
        m.d.comb += tree.clk.eq(self.ap_clk)

        def chain(name, value, n, domains):
            d = Delay(1, n, domains=domains, init=1, keep=True)
            m.submodules[name] = d
            m.d.comb += d.i.eq(value)
            return d.o

        # The host must not reach the shell while any block is still in reset: a write the
        # shell took in reset would never get its response. `gate` is 1 from the cycle after
        # ap_rst_n is seen low until the cycle every block leaves reset (reset_depth cycles
        # after ap_rst_n rises), from registers only.
        quiet = Signal(range(plan.reset_depth + 1), init=plan.reset_depth)
        with m.If(~self.ap_rst_n):
            m.d.reset_tree += quiet.eq(plan.reset_depth)
        with m.Elif(quiet != 0):
            m.d.reset_tree += quiet.eq(quiet - 1)

        root = chain(
            "rst_root", ~self.ap_rst_n, plan.reset_stages, ("reset_tree",) * plan.reset_stages
        )
        for s in plan.slrs:
            cd = ClockDomain(_domain(s))
            m.domains += cd
            n = len(plan.reset_branch_slrs(s))
            leaf = chain(f"rst_slr{s}", root, n, ("reset_tree",) * n)
            m.d.comb += [cd.clk.eq(self.ap_clk), cd.rst.eq(leaf)]
        return quiet != 0

    def _control_port(self, m, shell, gate):
        """``s_axi_control`` to the shell, with no handshake while ``gate`` (the reset tree
        still running): the shell sees no valid and the host no ready."""
        port, sh = self.s_axi_control, shell.s_axi_control
        for name, member in port.signature.members.items():
            outer, inner = getattr(port, name), getattr(sh, name)
            if member.flow == In:  # host -> shell (In of the core)
                value = outer & ~gate if name in ("awvalid", "wvalid", "arvalid") else outer
                m.d.comb += inner.eq(value)
            else:
                value = inner & ~gate if name in ("awready", "wready", "arready") else inner
                m.d.comb += outer.eq(value)


def _domain(slr: int) -> str:
    """The clock domain of the blocks in SLR ``slr``."""
    return f"slr{slr}"


def _stage_domains(plan: Floorplan, a: str, b: str) -> tuple[str, ...]:
    """The clock domain of each stage between blocks ``a`` and ``b``."""
    return tuple(_domain(s) for s in plan.stage_slrs(a, b))


def verilog(geom: CoreGeometry, floorplan: Floorplan | None = None) -> str:
    """Verilog of ``tandem_decode_core`` for ``geom`` (and ``floorplan``, default the
    geometry's: :func:`tandem.floorplan.for_geometry`), with the Vitis port names."""
    from amaranth.back import verilog as back

    core = DecodeCore(geom, floorplan=floorplan)
    return back.convert(core, name=TOPLEVEL, ports=vitis_ports(core), emit_src=False)
