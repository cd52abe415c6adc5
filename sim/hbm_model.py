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

import dataclasses
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from amaranth import Cat, ClockSignal, Const, Instance, Module, Mux, Signal
from amaranth.lib import data, fifo, wiring
from amaranth.lib.wiring import In, Out

from tandem import regmap
from tandem.checks import check_int
from tandem.geometry import CoreGeometry, check_geometry
from tandem.rtl.axi import AXI4Signature, Resp
from tandem.rtl.component import GeometryComponent

__all__ = [
    "CALIBRATED",
    "HBM_TIMINGS",
    "MEMORY_MODULE",
    "MEMORY_VERILOG",
    "TIMING_LAYOUT",
    "Backdoor",
    "HBMChannelModel",
    "HBMModel",
    "HBMTiming",
    "hbm_timing",
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


# ---------------------------------------------------------------------------------------------
# run-time timing


TIMING_LAYOUT = data.StructLayout(
    {
        "read_latency": 16,
        "read_jitter": 16,
        "write_latency": 16,
        "gain": 16,
        "cost": 16,
        "refresh_interval": 16,
        "refresh_cycles": 16,
        "seed": 16,
    }
)
"""The ``hbm_cfg`` port: every timing parameter of the simulated HBM is an input, set by the
testbench before reset is released, so one simulator build serves every memory model (a u55c
build takes about 20 minutes). :meth:`HBMTiming.registers` gives the field values; the rate is
``gain / cost`` of a beat per cycle (``gain >= cost``: not limited)."""


@dataclass(frozen=True)
class HBMTiming:
    """How the simulated HBM behaves, in kernel cycles; what :data:`TIMING_LAYOUT` carries.

    ``read_latency``: cycles from a burst's AR handshake to its first R beat on an idle,
    unthrottled channel (at least 3, the model's own pipeline). ``read_jitter``: each burst
    waits a further ``0..read_jitter`` cycles, uniform, drawn per burst from a counter-based
    hash of (``seed``, channel, burst number); bursts still return in order, so a late burst
    also delays the ones queued behind it. ``write_latency``: cycles from a burst's last W beat
    to its B response. ``rate``: bytes per cycle the link moves while the channel is not
    refreshing (a token bucket; a whole beat or more per cycle is not limited).
    ``refresh_interval`` / ``refresh_cycles``: every ``refresh_interval`` cycles the channel
    moves no R or W beat for ``refresh_cycles`` cycles (0: no refresh); each channel's refresh
    has its own phase, a hash of (``seed``, channel), so channels are not synchronised.
    ``sources``: where each value comes from (:func:`hbm_timing`), for reports.
    """

    name: str
    read_latency: int
    rate: Fraction
    read_jitter: int = 0
    write_latency: int = 16
    refresh_interval: int = 0
    refresh_cycles: int = 0
    seed: int = 1
    sources: tuple = ()

    def __post_init__(self):
        check_int("read_latency", self.read_latency, 3, 30000)
        check_int("read_jitter", self.read_jitter, 0, 30000)
        check_int("write_latency", self.write_latency, 1, 65535)
        check_int("refresh_interval", self.refresh_interval, 0, 65535)
        check_int("refresh_cycles", self.refresh_cycles, 0, 65535)
        check_int("seed", self.seed, 0, 65535)
        if self.refresh_cycles and not self.refresh_cycles < self.refresh_interval:
            raise ValueError(
                f"refresh_cycles ({self.refresh_cycles}) must be below refresh_interval "
                f"({self.refresh_interval})"
            )
        rate = Fraction(self.rate)
        if rate <= 0:
            raise ValueError(f"rate must be positive bytes per cycle, not {self.rate}")
        object.__setattr__(self, "rate", rate)

    @property
    def refresh(self) -> bool:
        return bool(self.refresh_cycles)

    @property
    def refresh_share(self) -> Fraction:
        """The share of cycles a channel spends refreshing."""
        return Fraction(self.refresh_cycles, self.refresh_interval) if self.refresh else Fraction(0)

    def beats_per_cycle(self, geom: CoreGeometry) -> Fraction:
        """The link's rate while not refreshing, in beats per cycle (at most 1)."""
        return min(Fraction(1), self.rate / geom.beat_bytes)

    def sustained(self, geom: CoreGeometry) -> Fraction:
        """Bytes per cycle a channel moves on average over a long stream: the rate, less the
        refresh share."""
        return self.beats_per_cycle(geom) * geom.beat_bytes * (1 - self.refresh_share)

    def link_gbps(self, geom: CoreGeometry) -> float:
        """The link's rate while not refreshing, in GB/s."""
        return float(self.beats_per_cycle(geom) * geom.beat_bytes) * geom.clock_mhz / 1000

    def sustained_gbps(self, geom: CoreGeometry) -> float:
        return float(self.sustained(geom)) * geom.clock_mhz / 1000

    def registers(self, geom: CoreGeometry) -> dict[str, int]:
        """The :data:`TIMING_LAYOUT` field values."""
        bpc = self.beats_per_cycle(geom)
        if bpc >= 1:
            gain = cost = 1
        else:
            bpc = bpc.limit_denominator(65535)
            gain, cost = bpc.numerator, bpc.denominator
        return {
            "read_latency": self.read_latency,
            "read_jitter": self.read_jitter,
            "write_latency": self.write_latency,
            "gain": gain,
            "cost": cost,
            "refresh_interval": self.refresh_interval,
            "refresh_cycles": self.refresh_cycles,
            "seed": self.seed,
        }

    def pack(self, geom: CoreGeometry) -> int:
        """:meth:`registers` as the integer value of an ``hbm_cfg`` port."""
        regs = self.registers(geom)
        value = 0
        for name, field in TIMING_LAYOUT:
            value |= regs[name] << field.offset
        return value

    def replace(self, **changes) -> HBMTiming:
        return dataclasses.replace(self, **changes)

    def describe(self, geom: CoreGeometry) -> str:
        """One line: latency, rate, refresh."""
        lat = f"read latency {self.read_latency}"
        if self.read_jitter:
            lat += f"-{self.read_latency + self.read_jitter}"
        gbps = self.link_gbps(geom)
        ref = (
            f"refresh {self.refresh_cycles} of every {self.refresh_interval} cycles"
            if self.refresh
            else "no refresh"
        )
        return (
            f"{self.name} HBM model: {lat} cycles, {gbps:.2f} GB/s per channel link, {ref}, "
            f"{self.sustained_gbps(geom):.2f} GB/s sustained per channel "
            f"({self.sustained_gbps(geom) * geom.channels:.0f} GB/s over {geom.channels})"
        )

    def as_dict(self, geom: CoreGeometry) -> dict:
        return {
            "name": self.name,
            "read_latency": self.read_latency,
            "read_jitter": self.read_jitter,
            "write_latency": self.write_latency,
            "link_gbps": self.link_gbps(geom),
            "refresh_interval": self.refresh_interval,
            "refresh_cycles": self.refresh_cycles,
            "seed": self.seed,
            "sustained_gbps_per_channel": self.sustained_gbps(geom),
            "sustained_gbps": self.sustained_gbps(geom) * geom.channels,
            "sources": dict(self.sources),
        }


CALIBRATED = {
    "measured_gbps": (
        13.1,
        "one 512-bit master reading a pseudo-channel sequentially, 64 B to 1 KB transactions: "
        "13.04-13.15 GB/s on a U50 (Xilinx Vitis-Tutorials, 07-using-hbm/3_BW_Explorations.md); "
        "13.17 GB/s per port in the vendor's hbm_bandwidth example on a U280 (421.3 GB/s over "
        "32 ports); docs/hbm-sources.md sections 1-2",
    ),
    "measured_refresh_ns": (
        260,
        "the refresh those measurements paid: all-bank tRFC of a 4 Gb channel (U50/U280 4-high "
        "stacks; JESD235 values as in Ramulator2's HBM2 model); docs/hbm-sources.md section 4",
    ),
    "refresh_interval_ns": (
        3900,
        "tREFI 3.9 us (PG276, AXI High Bandwidth Memory Controller, Raw Throughput Evaluation)",
    ),
    "refresh_ns": (
        350,
        "all-bank tRFC of an 8 Gb channel: the U55C's 8-high stacks (16 GB in 512 MB "
        "pseudo-channels, UG1393; density per PG276's topology); which refresh mode the U55C "
        "platform enables (per-bank refresh would hide most of it) is not published: swept",
    ),
    "read_latency_ns": (
        600,
        "assumed: no published latency for a 512-bit kernel port through the memory "
        "subsystem's width and clock conversion, switch and controller (idle estimates "
        "240-400 ns; 600 ns = 150 cycles allows for queueing in the controller); swept 80-250 "
        "cycles",
    ),
    "read_jitter_ns": (100, "assumed: page misses and controller reordering (0-25 cycles)"),
    "write_latency_ns": (240, "assumed: 60 cycles; writes are a small share of a token"),
}
"""The calibrated model's physical parameters: (value, source); docs/hbm-sources.md has the
sources in full. :func:`hbm_timing` converts them to cycles at a geometry's clock.

The link rate between refreshes comes from the measurements: 13.1 GB/s sustained with 260 ns of
every 3.9 us refreshing is 14.04 GB/s while not refreshing (97.6% of the 14.375 GB/s peak). The
U55C refreshes for 350 ns, so it sustains 14.04 x (1 - 350 / 3900) = 12.8 GB/s per channel,
409 GB/s in all: below the measured cards' 13.1, because its denser stacks refresh longer."""

HBM_TIMINGS = ("ideal", "calibrated")


def hbm_timing(name: str | HBMTiming, geom: CoreGeometry, **overrides) -> HBMTiming:
    """A named model at ``geom``'s clock, with fields replaced by ``overrides``. ``refresh=False``
    turns refresh off (the link rate stays: the channel then sustains it), ``refresh=True``
    turns the calibrated refresh on (350 ns of every 3.9 us) where the model has none.

    ``ideal``: every channel at exactly its link rate (14.375 GB/s, 57.5 bytes per cycle at
    250 MHz), a fixed 80-cycle read latency, 16-cycle write response, no refresh -- the model
    every benchmark before the calibrated one used. ``calibrated``: :data:`CALIBRATED` (at
    250 MHz: 150-175 cycles of read latency, a 14.04 GB/s link, refresh 88 of every 975
    cycles, 12.77 GB/s sustained per channel).
    """
    if isinstance(name, HBMTiming):
        base = name
    elif name == "ideal":
        base = HBMTiming(
            "ideal",
            read_latency=80,
            rate=link_rate(geom),
            write_latency=16,
            sources=(("all", "the datasheet link rate; latencies assumed (no refresh)"),),
        )
    elif name == "calibrated":
        c = {k: v for k, (v, _) in CALIBRATED.items()}
        cyc = Fraction(str(geom.clock_mhz)) / 1000  # cycles per ns
        interval = round(c["refresh_interval_ns"] * cyc)
        measured = Fraction(str(c["measured_gbps"])) * 1000 / Fraction(str(geom.clock_mhz))
        free = 1 - Fraction(c["measured_refresh_ns"], c["refresh_interval_ns"])
        base = HBMTiming(
            "calibrated",
            read_latency=round(c["read_latency_ns"] * cyc),
            read_jitter=round(c["read_jitter_ns"] * cyc),
            write_latency=round(c["write_latency_ns"] * cyc),
            rate=measured / free,
            refresh_interval=interval,
            refresh_cycles=round(c["refresh_ns"] * cyc),
            sources=tuple((k, s) for k, (_, s) in CALIBRATED.items()),
        )
    else:
        raise ValueError(f"unknown HBM model {name!r}; one of {', '.join(HBM_TIMINGS)}")
    refresh = overrides.pop("refresh", None)
    if refresh is False:
        overrides.update(refresh_interval=0, refresh_cycles=0)
    elif refresh is True and not base.refresh:
        cal = hbm_timing("calibrated", geom)
        overrides.setdefault("refresh_interval", cal.refresh_interval)
        overrides.setdefault("refresh_cycles", cal.refresh_cycles)
    return base.replace(**overrides) if overrides else base


def _mix32(x):
    """A 32-bit integer hash (lowbias32) of an Amaranth value, for simulation-only randomness."""
    x = x[:32]
    x = (x ^ (x >> 16))[:32]
    x = (x * 0x7FEB352D)[:32]
    x = (x ^ (x >> 15))[:32]
    x = (x * 0x846CA68B)[:32]
    return (x ^ (x >> 16))[:32]


class HBMChannelModel(GeometryComponent):
    """One simulated HBM pseudo-channel: an AXI4 subordinate over ``size_bytes`` of memory,
    timed at run time by its ``cfg`` input (:class:`HBMTiming`, :data:`TIMING_LAYOUT`).

    Bursts are served in order, each beat from its own address (INCR), up to
    ``max_outstanding`` reads and as many writes waiting. Read data starts
    ``cfg.read_latency`` cycles (plus a per-burst draw of ``0..cfg.read_jitter``) after the
    burst's address was accepted -- counted from the AR handshake edge to the edge that moves
    its first R beat, when nothing else is queued, the link is not throttled and the channel
    not refreshing -- and a burst queued behind another starts as soon as the one before it
    ends (no bubble between bursts). A write's response comes ``cfg.write_latency`` cycles
    after its last W beat. Reads and writes share one token bucket that lets ``gain / cost`` of
    a beat through per cycle on average and holds at most ``bucket_beats`` beats of credit, so
    a long run of beats moves at exactly the configured rate. While the channel refreshes (the
    first ``refresh_cycles`` of every ``refresh_interval`` cycles, at the channel's own phase)
    no R or W beat moves. Beats outside ``[base, base + size_bytes)`` answer DECERR (a read
    returns undefined data, a write changes nothing). ``cfg`` must hold still while bursts are
    in flight; set it before reset is released.

    Parameters
    ----------
    geom : CoreGeometry
        ``port_bits`` (data width).
    size_bytes : int
        Memory size, a multiple of the beat size.
    bucket_beats : int
        Credit the bucket can hold, in beats (a short burst after idling moves this much faster
        than the rate).
    max_outstanding : int
        Read and write bursts queued (``arready``/``awready`` fall beyond).
    base : int
        Address of byte 0.
    index : int
        The channel's number: with ``cfg.seed``, it keys the channel's refresh phase and
        latency draws.
    name : str
        Backdoor file stem: ``<name>.hex``, ``<name>.dump.hex``.

    Members
    -------
    axi : In(AXI4Signature(addr_width=64, data_width=port_bits))
    cfg : In(TIMING_LAYOUT)
    load, dump : In(1)
    dump_lo, dump_hi : In(word_bits)
        Word range of a dump (inclusive).
    refreshing : Out(1)
        The channel is refreshing this cycle (for tests and monitors).
    """

    def __init__(
        self,
        geom: CoreGeometry,
        *,
        size_bytes: int,
        bucket_beats: int = 2,
        max_outstanding: int = 64,
        base: int = 0,
        index: int = 0,
        name: str = "hbm0",
    ):
        beat = check_geometry(geom).beat_bytes
        check_int("size_bytes", size_bytes, beat)
        if size_bytes % beat:
            raise ValueError(
                f"size_bytes must be a multiple of the {beat}-byte beat, not {size_bytes}"
            )
        check_int("bucket_beats", bucket_beats, 1, 8)
        check_int("max_outstanding", max_outstanding, 2, 4096)
        check_int("base", base, 0, (1 << 64) - size_bytes)
        check_int("index", index, 0, 255)
        if base % 4096:
            raise ValueError(f"base must be 4 KiB aligned, not {base:#x}")
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"name must be an identifier (it names files), not {name!r}")
        self._size = size_bytes
        self._depth = size_bytes // beat
        self._bucket_beats = bucket_beats
        self._max_outstanding = max_outstanding
        self._base = base
        self._index = index
        self._name = name
        self._word_bits = max(1, (self._depth - 1).bit_length())
        super().__init__(
            geom,
            {
                "axi": In(AXI4Signature(addr_width=64, data_width=geom.port_bits)),
                "cfg": In(TIMING_LAYOUT),
                "load": In(1),
                "dump": In(1),
                "dump_lo": In(self._word_bits),
                "dump_hi": In(self._word_bits),
                "refreshing": Out(1),
            },
        )

    @property
    def size_bytes(self) -> int:
        return self._size

    @property
    def depth(self) -> int:
        """Words (beats) of memory."""
        return self._depth

    @property
    def bucket_beats(self) -> int:
        return self._bucket_beats

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
        cfg = self.cfg
        beat = g.beat_bytes
        lb = beat.bit_length() - 1
        wb = self._word_bits

        now = Signal(32)
        m.d.sync += now.eq(now + 1)

        def due(t):
            return (now - t)[31] == 0  # now >= t, modulo 2**32

        # ---- refresh: the first refresh_cycles of every refresh_interval, own phase ---------
        phase = Signal(32)
        offset = Signal(32)
        m.d.comb += offset.eq(_mix32(Cat(Const(self._index, 8), cfg.seed, Const(0x5A, 8))))
        interval = Mux(cfg.refresh_interval == 0, 1, cfg.refresh_interval)
        m.d.comb += phase.eq((now + offset)[:32] % interval)
        refreshing = Signal()
        m.d.comb += [
            refreshing.eq((cfg.refresh_cycles != 0) & (phase < cfg.refresh_cycles)),
            self.refreshing.eq(refreshing),
        ]

        # ---- token bucket, kept as a deficit: 0 is a full bucket of bucket_beats beats -------
        # gain per cycle, a beat costs `cost` (units of 1 / cost beat)
        deficit = Signal(range((self._bucket_beats + 2) * 65536))
        r_go = Signal()  # an R beat is issued at this edge
        w_go = Signal()  # a W beat is accepted at this edge
        r_ok = Signal()
        w_ok = Signal()
        slack = cfg.cost * (self._bucket_beats - 1)  # deficit at which one more beat fits
        spent = Mux(r_go, cfg.cost, 0) + Mux(w_go, cfg.cost, 0)
        after = deficit + spent
        # the bucket holds still while refreshing (no beat moves, no credit builds up), so the
        # rate over a long stream is exactly gain / cost of a beat per non-refresh cycle
        with m.If(~refreshing):
            m.d.sync += deficit.eq(Mux(after > cfg.gain, after - cfg.gain, 0))
        unlimited = cfg.gain >= cfg.cost
        m.d.comb += [
            r_ok.eq(~refreshing & (unlimited | (deficit <= slack))),
            w_ok.eq(~refreshing & (unlimited | (deficit + Mux(r_go, cfg.cost, 0) <= slack))),
        ]

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
        ar_count = Signal(32)  # bursts accepted: the latency draw's key
        draw = Signal(32)
        m.d.comb += draw.eq(
            _mix32(Cat(ar_count[:16], cfg.seed) ^ (self._index * 0x9E3779B1 & 0xFFFFFFFF))
            % (cfg.read_jitter + 1)
        )
        with m.If(axi.arvalid & axi.arready):
            m.d.sync += ar_count.eq(ar_count + 1)
        m.d.comb += [
            axi.arready.eq(ar_q.w_rdy),
            ar_q.w_en.eq(axi.arvalid),
            ar_in.addr.eq(axi.araddr),
            ar_in.len.eq(axi.arlen),
            ar_in.id.eq(axi.arid),
            # due at the edge that issues the first beat; it moves one edge later
            ar_in.due.eq(now + cfg.read_latency - 1 + draw),
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
            b_in.due.eq(now + cfg.write_latency),
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
        Passed to every :class:`HBMChannelModel` (``bucket_beats``, ``max_outstanding``).

    Members
    -------
    m_axi_hbm<ch> : In(AXI4Signature(addr_width=64, data_width=port_bits))
    hbm_cfg : In(TIMING_LAYOUT)
        Every channel's timing (:meth:`HBMTiming.pack`); set before reset is released.
    hbm_refreshing : Out(channels)
        Bit ``ch``: channel ``ch`` is refreshing.
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
                geom,
                size_bytes=size_bytes,
                base=ch * channel_stride,
                index=ch,
                name=a.name,
                **kwargs,
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
                "hbm_cfg": In(TIMING_LAYOUT),
                "hbm_refreshing": Out(len(pointers)),
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
        for ch, (port, model) in enumerate(zip(self._ports, self._channels, strict=True)):
            m.submodules[model.name] = model
            wiring.connect(m, wiring.flipped(getattr(self, port)), model.axi)
            m.d.comb += [
                model.cfg.eq(self.hbm_cfg),
                self.hbm_refreshing[ch].eq(model.refreshing),
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
