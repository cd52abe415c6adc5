"""Simulation-only HBM: an AXI4 subordinate per pseudo-channel with the U55C's bandwidth and a
read latency, its memory inside the simulator and loaded by a backdoor.

This is what the cycle benchmark of the whole core reads from. Nothing runs in Python per beat:
the AXI logic is Amaranth, the storage a small behavioural Verilog module (:data:`MEMORY_VERILOG`,
module ``tandem_hbm_mem``) that Amaranth instantiates, because an Amaranth ``Memory`` writes its
initial contents into the Verilog text word by word (megabytes per channel) and has no way to
load a file.

**Backdoor.** Each channel's memory loads ``<name>.hex`` (``$readmemh``) at a clock edge where
``load`` is high, and writes words ``dump_lo..dump_hi`` to ``<name>.dump.hex``
(``$writememh``) at an edge where ``dump`` is high; both file names are relative to the
simulator's working directory (the cocotb test folder). This works the same on Verilator and
Icarus, and is fast: Verilator parses hex at tens of MB/s, against microseconds per word for
VPI writes. :func:`write_hex` and :func:`read_hex` convert between byte images and the files;
:class:`Backdoor` does both from a cocotb test. Contents start as zero.

Tests that want random stalls use cocotbext-axi's ``AxiRam`` instead: this model's only
irregularity is its bandwidth limit.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np
from amaranth import ClockSignal, Instance, Module, Mux, Signal
from amaranth.lib import data, fifo, wiring
from amaranth.lib.wiring import In

from tandem import regmap
from tandem.checks import check_int
from tandem.geometry import CoreGeometry, check_geometry
from tandem.rtl.axi import AXI4Signature, Resp
from tandem.rtl.component import GeometryComponent

__all__ = [
    "MEMORY_MODULE",
    "MEMORY_VERILOG",
    "Backdoor",
    "HBMChannelModel",
    "HBMModel",
    "link_rate",
    "memory_verilog_file",
    "read_hex",
    "write_hex",
]

MEMORY_MODULE = "tandem_hbm_mem"

MEMORY_VERILOG = """\
// Behavioural memory of one simulated HBM pseudo-channel (sim/hbm_model.py). Simulation only.
module tandem_hbm_mem #(
    parameter WIDTH = 512,
    parameter DEPTH = 1024,
    parameter ABITS = 10,
    parameter LOAD_FILE = "hbm.hex",
    parameter DUMP_FILE = "hbm.dump.hex"
) (
    input clk,
    input [ABITS-1:0] raddr,
    input ren,
    output reg [WIDTH-1:0] rdata,
    input [ABITS-1:0] waddr,
    input [WIDTH-1:0] wdata,
    input [WIDTH/8-1:0] wstrb,
    input load,
    input dump,
    input [ABITS-1:0] dump_lo,
    input [ABITS-1:0] dump_hi
);
    reg [WIDTH-1:0] mem [0:DEPTH-1];
    wire [WIDTH-1:0] bits;
    genvar b;
    generate
        for (b = 0; b < WIDTH / 8; b = b + 1) begin : strobe
            assign bits[b*8 +: 8] = {8{wstrb[b]}};
        end
    endgenerate
    integer i;
    initial begin
        for (i = 0; i < DEPTH; i = i + 1) mem[i] = {WIDTH{1'b0}};
        rdata = {WIDTH{1'b0}};
    end
    always @(posedge clk) begin
        if (ren) rdata <= mem[raddr];
        if (|wstrb) mem[waddr] <= (mem[waddr] & ~bits) | (wdata & bits);
        if (load) $readmemh(LOAD_FILE, mem);
        if (dump) $writememh(DUMP_FILE, mem, dump_lo, dump_hi);
    end
endmodule
"""


def memory_verilog_file(folder: os.PathLike) -> Path:
    """Write :data:`MEMORY_VERILOG` to ``folder/tandem_hbm_mem.v`` (if changed) and return the
    path, for the simulator's source list (``tandem.sim.runner.run(verilog_sources=...)``)."""
    path = Path(folder) / f"{MEMORY_MODULE}.v"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_text() != MEMORY_VERILOG:
        path.write_text(MEMORY_VERILOG)
    return path


def link_rate(geom: CoreGeometry) -> Fraction:
    """A channel's peak bandwidth in bytes per kernel cycle, exactly: 14.375 GB/s at 250 MHz is
    57.5 bytes per cycle, 115/128 of a 64-byte beat."""
    return Fraction(str(geom.channel_gbps)) * 1000 / Fraction(str(geom.clock_mhz))


def write_hex(path: os.PathLike, data: np.ndarray, beat_bytes: int, *, word: int = 0) -> None:
    """Write bytes as a ``$readmemh`` file of ``beat_bytes``-byte words (byte 0 of a word is its
    least significant byte) starting at word ``word``; a partial last word is zero padded."""
    raw = np.ascontiguousarray(np.asarray(data, dtype=np.uint8).ravel())
    pad = -raw.size % beat_bytes
    if pad:
        raw = np.concatenate([raw, np.zeros(pad, np.uint8)])
    words = raw.reshape(-1, beat_bytes)[:, ::-1]
    digits = np.frombuffer(words.tobytes().hex().encode(), np.uint8).reshape(words.shape[0], -1)
    lines = np.concatenate([digits, np.full((words.shape[0], 1), ord("\n"), np.uint8)], axis=1)
    with open(path, "wb") as f:
        f.write(f"@{word:x}\n".encode())
        f.write(lines.tobytes())


def read_hex(path: os.PathLike, beat_bytes: int) -> np.ndarray:
    """Bytes of the words in a ``$writememh`` file, in file order (comments and ``@`` address
    lines are skipped; both simulators write the words in order from ``dump_lo``)."""
    words = []
    for line in Path(path).read_text().split("\n"):
        line = line.split("//")[0].strip()
        if not line or line.startswith("@"):
            continue
        words.append(bytes.fromhex(line.zfill(2 * beat_bytes))[::-1])
    return np.frombuffer(b"".join(words), np.uint8).copy()


class HBMChannelModel(GeometryComponent):
    """One simulated HBM pseudo-channel: an AXI4 subordinate over ``size_bytes`` of memory.

    Bursts are served in order, each beat from its own address (INCR), up to
    ``max_outstanding`` reads and as many writes waiting. Read data starts ``read_latency``
    cycles after the burst's address was accepted -- counted from the AR handshake edge to the
    edge that moves its first R beat, when nothing else is queued and the link is not
    throttled -- and a burst queued behind another starts as soon as the one before it ends
    (no bubble between bursts). A write's response comes ``write_latency`` cycles after its
    last W beat. Reads and writes share one token bucket that lets ``bytes_per_cycle`` bytes
    through per cycle on average (default the geometry's channel bandwidth at its clock) and
    holds at most ``bucket_beats`` beats of credit, so a long run of beats moves at exactly the
    configured rate. Beats outside ``[base, base + size_bytes)`` answer DECERR (a read returns
    undefined data, a write changes nothing).

    Parameters
    ----------
    geom : CoreGeometry
        ``port_bits`` (data width), ``channel_gbps`` and ``clock_mhz`` (the default rate).
    size_bytes : int
        Memory size, a multiple of the beat size.
    read_latency : int
        At least 3 (the model's own pipeline); HBM at 250 MHz is about 60-100 cycles.
    write_latency : int
        At least 1.
    bytes_per_cycle : Fraction or None
        Override of the rate; ``None`` means :func:`link_rate` of ``geom``. A rate of a
        whole beat or more per cycle is not limited.
    bucket_beats : int
        Credit the bucket can hold, in beats (a short burst after idling moves this much faster
        than the rate).
    max_outstanding : int
        Read and write bursts queued (``arready``/``awready`` fall beyond).
    base : int
        Address of byte 0.
    name : str
        Backdoor file stem: ``<name>.hex``, ``<name>.dump.hex``.

    Members
    -------
    axi : In(AXI4Signature(addr_width=64, data_width=port_bits))
    load, dump : In(1)
    dump_lo, dump_hi : In(word_bits)
        Word range of a dump (inclusive).
    """

    def __init__(
        self,
        geom: CoreGeometry,
        *,
        size_bytes: int,
        read_latency: int = 80,
        write_latency: int = 16,
        bytes_per_cycle: Fraction | None = None,
        bucket_beats: int = 2,
        max_outstanding: int = 64,
        base: int = 0,
        name: str = "hbm0",
    ):
        beat = check_geometry(geom).beat_bytes
        check_int("size_bytes", size_bytes, beat)
        if size_bytes % beat:
            raise ValueError(
                f"size_bytes must be a multiple of the {beat}-byte beat, not {size_bytes}"
            )
        check_int("read_latency", read_latency, 3, 1 << 20)
        check_int("write_latency", write_latency, 1, 1 << 20)
        check_int("bucket_beats", bucket_beats, 1, 1024)
        check_int("max_outstanding", max_outstanding, 2, 4096)
        check_int("base", base, 0, (1 << 64) - size_bytes)
        if base % 4096:
            raise ValueError(f"base must be 4 KiB aligned, not {base:#x}")
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"name must be an identifier (it names files), not {name!r}")
        rate = link_rate(geom) if bytes_per_cycle is None else Fraction(bytes_per_cycle)
        if rate <= 0:
            raise ValueError(f"bytes_per_cycle must be positive, not {rate}")
        self._size = size_bytes
        self._depth = size_bytes // beat
        self._read_latency = read_latency
        self._write_latency = write_latency
        self._rate = rate
        self._bucket_beats = bucket_beats
        self._max_outstanding = max_outstanding
        self._base = base
        self._name = name
        self._word_bits = max(1, (self._depth - 1).bit_length())
        super().__init__(
            geom,
            {
                "axi": In(AXI4Signature(addr_width=64, data_width=geom.port_bits)),
                "load": In(1),
                "dump": In(1),
                "dump_lo": In(self._word_bits),
                "dump_hi": In(self._word_bits),
            }
        )

    @property
    def size_bytes(self) -> int:
        return self._size

    @property
    def depth(self) -> int:
        """Words (beats) of memory."""
        return self._depth

    @property
    def read_latency(self) -> int:
        return self._read_latency

    @property
    def write_latency(self) -> int:
        return self._write_latency

    @property
    def rate(self) -> Fraction:
        """Bytes per cycle the link moves on average."""
        return self._rate

    @property
    def beats_per_cycle(self) -> Fraction:
        """The sustained rate in beats per cycle (at most 1)."""
        return min(Fraction(1), self._rate / self._geom.beat_bytes)

    @property
    def name(self) -> str:
        return self._name

    @property
    def word_bits(self) -> int:
        """Width of word addresses (``dump_lo``, ``dump_hi``)."""
        return self._word_bits

    def elaborate(self, platform):
        m = Module()
        g = self._geom
        axi = self.axi
        beat = g.beat_bytes
        lb = beat.bit_length() - 1
        wb = self._word_bits

        now = Signal(32)
        m.d.sync += now.eq(now + 1)

        def due(t):
            return (now - t)[31] == 0  # now >= t, modulo 2**32

        # ---- token bucket: `gain` per cycle (units of 1/den byte), a beat costs `cost` -------
        limited = self._rate < beat
        gain = self._rate.numerator
        cost = beat * self._rate.denominator
        cap = cost * self._bucket_beats
        tokens = Signal(range(cap + gain + 1), init=cap)
        r_go = Signal()  # an R beat is issued at this edge
        w_go = Signal()  # a W beat is accepted at this edge
        r_ok = Signal()
        w_ok = Signal()
        if limited:
            spent = Mux(r_go, cost, 0) + Mux(w_go, cost, 0)
            fill = tokens + gain - spent
            m.d.sync += tokens.eq(Mux(fill > cap, cap, fill))
            m.d.comb += [r_ok.eq(tokens >= cost), w_ok.eq(tokens >= Mux(r_go, 2 * cost, cost))]
        else:
            m.d.comb += [r_ok.eq(1), w_ok.eq(1)]

        # ---- memory ---------------------------------------------------------------------------
        raddr = Signal(wb)
        ren = Signal()
        rdata = Signal(g.port_bits)
        waddr = Signal(wb)
        wdata = Signal(g.port_bits)
        wstrb = Signal(beat)
        m.submodules.mem = Instance(
            MEMORY_MODULE,
            p_WIDTH=g.port_bits,
            p_DEPTH=self._depth,
            p_ABITS=wb,
            p_LOAD_FILE=f"{self._name}.hex",
            p_DUMP_FILE=f"{self._name}.dump.hex",
            i_clk=ClockSignal(),
            i_raddr=raddr,
            i_ren=ren,
            o_rdata=rdata,
            i_waddr=waddr,
            i_wdata=wdata,
            i_wstrb=wstrb,
            i_load=self.load,
            i_dump=self.dump,
            i_dump_lo=self.dump_lo,
            i_dump_hi=self.dump_hi,
        )

        def word_of(addr):
            """(word index, out of range) of a byte address."""
            offset = Signal(65)
            m.d.comb += offset.eq(addr - self._base)
            return offset[lb : lb + wb], offset >= self._size

        # ---- reads ----------------------------------------------------------------------------
        id_width = len(axi.arid)
        burst = data.StructLayout({"addr": 64, "len": 8, "due": 32, "id": id_width})
        m.submodules.ar_q = ar_q = fifo.SyncFIFO(width=burst.size, depth=self._max_outstanding)
        ar_in = burst(ar_q.w_data)
        m.d.comb += [
            axi.arready.eq(ar_q.w_rdy),
            ar_q.w_en.eq(axi.arvalid),
            ar_in.addr.eq(axi.araddr),
            ar_in.len.eq(axi.arlen),
            ar_in.id.eq(axi.arid),
            # due at the edge that issues the first beat; it moves one edge later
            ar_in.due.eq(now + (self._read_latency - 1)),
        ]
        head = burst(ar_q.r_data)
        r_active = Signal()
        r_addr = Signal(64)
        r_left = Signal(9)  # beats left to issue
        r_due = Signal(32)
        r_id = Signal(id_width)
        out_free = ~axi.rvalid | axi.rready
        m.d.comb += r_go.eq(r_active & due(r_due) & r_ok & out_free)
        r_word, r_oob = word_of(r_addr)
        m.d.comb += [raddr.eq(r_word), ren.eq(r_go), axi.rdata.eq(rdata)]
        finishing = r_go & (r_left == 1)
        m.d.comb += ar_q.r_en.eq(~r_active | finishing)
        with m.If(r_go):
            m.d.sync += [
                axi.rvalid.eq(1),
                axi.rlast.eq(r_left == 1),
                axi.rresp.eq(Mux(r_oob, Resp.DECERR, Resp.OKAY)),
                axi.rid.eq(r_id),
                r_addr.eq(r_addr + beat),
                r_left.eq(r_left - 1),
            ]
            with m.If(finishing):
                m.d.sync += r_active.eq(0)
        with m.Elif(axi.rready):
            m.d.sync += axi.rvalid.eq(0)
        with m.If(ar_q.r_en & ar_q.r_rdy):
            m.d.sync += [
                r_active.eq(1),
                r_addr.eq(head.addr),
                r_left.eq(head.len + 1),
                r_due.eq(head.due),
                r_id.eq(head.id),
            ]

        # ---- writes ---------------------------------------------------------------------------
        aw = data.StructLayout({"addr": 64, "len": 8, "id": id_width})
        m.submodules.aw_q = aw_q = fifo.SyncFIFO(width=aw.size, depth=self._max_outstanding)
        aw_in = aw(aw_q.w_data)
        m.d.comb += [
            axi.awready.eq(aw_q.w_rdy),
            aw_q.w_en.eq(axi.awvalid),
            aw_in.addr.eq(axi.awaddr),
            aw_in.len.eq(axi.awlen),
            aw_in.id.eq(axi.awid),
        ]
        resp = data.StructLayout({"resp": Resp, "due": 32, "id": id_width})
        m.submodules.b_q = b_q = fifo.SyncFIFO(width=resp.size, depth=self._max_outstanding)
        w_head = aw(aw_q.r_data)
        w_count = Signal(8)
        w_bad = Signal()  # an earlier beat of this burst was out of range
        w_word, w_oob = word_of(w_head.addr + (w_count << lb))
        w_last = w_count == w_head.len
        m.d.comb += [
            axi.wready.eq(aw_q.r_rdy & b_q.w_rdy & w_ok),
            w_go.eq(axi.wvalid & axi.wready),
            waddr.eq(w_word),
            wdata.eq(axi.wdata),
            wstrb.eq(Mux(w_go & ~w_oob, axi.wstrb, 0)),
            aw_q.r_en.eq(w_go & w_last),
            b_q.w_en.eq(w_go & w_last),
        ]
        b_in = resp(b_q.w_data)
        m.d.comb += [
            b_in.resp.eq(Mux(w_bad | w_oob, Resp.DECERR, Resp.OKAY)),
            b_in.due.eq(now + self._write_latency),
            b_in.id.eq(w_head.id),
        ]
        with m.If(w_go):
            m.d.sync += [
                w_count.eq(Mux(w_last, 0, w_count + 1)),
                w_bad.eq(~w_last & (w_bad | w_oob)),
            ]
        b_head = resp(b_q.r_data)
        m.d.comb += [
            axi.bvalid.eq(b_q.r_rdy & due(b_head.due)),
            axi.bresp.eq(b_head.resp),
            axi.bid.eq(b_head.id),
            b_q.r_en.eq(axi.bvalid & axi.bready),
        ]
        return m


class HBMModel(GeometryComponent):
    """Every pseudo-channel of a geometry as a :class:`HBMChannelModel`, with subordinate ports
    named like the core's managers, so a simulation top connects each ``m_axi_hbm<ch>`` of the
    core to the member of the same name here.

    Parameters
    ----------
    geom : CoreGeometry
    size_bytes : int
        Memory of every channel (each at ``base = ch * channel_stride``).
    channel_stride : int or None
        Address distance between channels' memories (default: ``size_bytes`` rounded up to
        4 KiB), so a test can tell channels apart by their kernel pointers.
    **kwargs
        Passed to every :class:`HBMChannelModel` (``read_latency``, ``bytes_per_cycle``, ...).

    Members
    -------
    m_axi_hbm<ch> : In(AXI4Signature(addr_width=64, data_width=port_bits))
    hbm_load, hbm_dump : In(1)
        Backdoor strobes for all channels (files ``hbm<ch>.hex`` / ``hbm<ch>.dump.hex``).
    hbm_dump_lo, hbm_dump_hi : In(word_bits)
    """

    def __init__(
        self,
        geom: CoreGeometry,
        *,
        size_bytes: int,
        channel_stride: int | None = None,
        **kwargs,
    ):
        if channel_stride is None:
            channel_stride = -(-size_bytes // 4096) * 4096
        pointers = [a for a in regmap.arguments(geom.channels) if a.kind == "pointer"]
        self._ports = [a.port for a in pointers]
        self._channels = [
            HBMChannelModel(
                geom, size_bytes=size_bytes, base=ch * channel_stride, name=a.name, **kwargs
            )
            for ch, a in enumerate(pointers)
        ]
        self._stride = channel_stride
        word_bits = self._channels[0].word_bits
        members = {
            port: In(AXI4Signature(addr_width=64, data_width=geom.port_bits))
            for port in self._ports
        }
        members.update(
            {
                "hbm_load": In(1),
                "hbm_dump": In(1),
                "hbm_dump_lo": In(word_bits),
                "hbm_dump_hi": In(word_bits),
            }
        )
        super().__init__(geom, members)

    @property
    def channels(self) -> list[HBMChannelModel]:
        return list(self._channels)

    @property
    def ports(self) -> list[str]:
        return list(self._ports)

    def base(self, channel: int) -> int:
        """Byte address of ``channel``'s memory (the kernel pointer to pass)."""
        return channel * self._stride

    def elaborate(self, platform):
        m = Module()
        for port, model in zip(self._ports, self._channels, strict=True):
            m.submodules[model.name] = model
            wiring.connect(m, wiring.flipped(getattr(self, port)), model.axi)
            m.d.comb += [
                model.load.eq(self.hbm_load),
                model.dump.eq(self.hbm_dump),
                model.dump_lo.eq(self.hbm_dump_lo),
                model.dump_hi.eq(self.hbm_dump_hi),
            ]
        return m


class Backdoor:
    """Loads and dumps the memories of an :class:`HBMModel` from a cocotb test.

    ``dut`` must expose the model's ``hbm_load``, ``hbm_dump``, ``hbm_dump_lo``,
    ``hbm_dump_hi`` ports (under those names, or with ``prefix``) and a clock ``clk``. Files go
    to the simulator's working directory.
    """

    def __init__(self, dut, model: HBMModel, *, prefix: str = "", clk=None):
        self.dut = dut
        self.clk = clk if clk is not None else dut.clk
        self.names = [c.name for c in model.channels]
        self.beat = model.channels[0].geom.beat_bytes
        self.size = model.channels[0].size_bytes
        self._load = getattr(dut, f"{prefix}hbm_load")
        self._dump = getattr(dut, f"{prefix}hbm_dump")
        self._lo = getattr(dut, f"{prefix}hbm_dump_lo")
        self._hi = getattr(dut, f"{prefix}hbm_dump_hi")
        self._load.value = 0
        self._dump.value = 0

    async def load(self, images, *, offset: int = 0) -> None:
        """Write ``images[ch]`` (bytes or uint8 arrays, beat aligned ``offset``) into every
        channel at once; other words keep their contents."""
        from cocotb.triggers import RisingEdge

        if offset % self.beat:
            raise ValueError(f"offset {offset:#x} is not a multiple of the {self.beat}-byte beat")
        for name, image in zip(self.names, images, strict=True):
            raw = (
                np.frombuffer(bytes(image), np.uint8)
                if not isinstance(image, np.ndarray)
                else image
            )
            if offset + raw.size > self.size:
                raise ValueError(
                    f"{raw.size} bytes at {offset:#x} overrun the {self.size}-byte memory"
                )
            write_hex(f"{name}.hex", raw, self.beat, word=offset // self.beat)
        self._load.value = 1
        await RisingEdge(self.clk)
        self._load.value = 0
        await RisingEdge(self.clk)

    async def dump(self, offset: int, nbytes: int) -> np.ndarray:
        """Bytes ``[offset, offset + nbytes)`` of every channel: uint8 [channels, nbytes]."""
        from cocotb.triggers import RisingEdge

        lo = offset // self.beat
        hi = -(-(offset + nbytes) // self.beat) - 1
        if hi * self.beat >= self.size or nbytes <= 0:
            raise ValueError(f"dump of {nbytes} bytes at {offset:#x} is outside the memory")
        self._lo.value = lo
        self._hi.value = hi
        self._dump.value = 1
        await RisingEdge(self.clk)
        self._dump.value = 0
        await RisingEdge(self.clk)
        skip = offset - lo * self.beat
        return np.stack(
            [read_hex(f"{n}.dump.hex", self.beat)[skip : skip + nbytes] for n in self.names]
        )
