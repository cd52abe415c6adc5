"""Core geometry: the one definition of the decode core's shape, shared by RTL, compiler and host.

A geometry fixes how many HBM pseudo-channels the core reads, how wide each AXI port is, and how
the matrix unit (MPU) consumes one beat from every channel per cycle: ``lanes`` output rows, each
a ``tree`` of 64 products. One beat across all channels is exactly one weight tile, so

    channels * port_bits / 16 == lanes * tree

and ``tree`` equals the numeric contract's block size (tandem.numerics.BLOCK), because a lane's
64 products form one block-floating-point block.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .numerics import BLOCK


def is_pow2(v) -> bool:
    """``v`` is an ``int`` power of two (1, 2, 4, ...)."""
    return isinstance(v, int) and v > 0 and v & (v - 1) == 0


@dataclass(frozen=True)
class CoreGeometry:
    """Shape of one decode core.

    Parameters
    ----------
    name : str
    channels : int
        HBM pseudo-channels, one AXI4 master each.
    port_bits : int
        AXI data width per channel (64..512, a power of two).
    lanes : int
        MPU output rows per cycle (a power of two).
    tree : int
        Products per lane per cycle; must equal the numeric block size, 64.
    vpu_lanes : int
        binary16 elements the vector unit adds or multiplies per cycle (VADD, VSUB, VMUL).
    table_lanes : int
        binary16 elements per cycle of the vector unit's exp and GELU tables (VEXP, VGELU; every
        two lanes share one block-RAM table, so this sets the tables' block RAM).
    vbuf_elems : int
        On-chip vector buffer capacity in binary16 elements.
    imem_words : int
        On-chip instruction buffer capacity in 128-bit instructions.
    channel_bytes : int
        Capacity of one HBM pseudo-channel.
    clock_mhz : float
        Kernel clock the build targets and projections assume.
    channel_gbps : float
        Peak bandwidth of one pseudo-channel, GB/s (10**9 bytes).
    """

    name: str
    channels: int
    port_bits: int
    lanes: int
    tree: int = BLOCK
    vpu_lanes: int = 16
    table_lanes: int = 16
    vbuf_elems: int = 32768
    imem_words: int = 4096
    channel_bytes: int = 512 << 20
    clock_mhz: float = 250.0
    channel_gbps: float = 14.375

    def __post_init__(self):
        self.check_rules()

    def check_rules(self) -> None:
        """Raise ``ValueError`` naming the first rule this geometry breaks (construction runs
        it; a unit may run it again on an object built some other way)."""
        for field in (
            "channels",
            "port_bits",
            "lanes",
            "tree",
            "vpu_lanes",
            "table_lanes",
            "vbuf_elems",
        ):
            v = getattr(self, field)
            if not is_pow2(v):
                raise ValueError(f"{field} must be a power of two, not {v!r}")
        if not 64 <= self.port_bits <= 512:
            raise ValueError(f"port_bits must be 64..512 (AXI4 to HBM), not {self.port_bits}")
        if self.tree != BLOCK:
            raise ValueError(
                f"tree must equal the numeric block size {BLOCK}, not {self.tree}: a lane's "
                "products form one block-floating-point block"
            )
        if self.beat_elems > self.tree:
            raise ValueError(
                f"a {self.port_bits}-bit port carries {self.beat_elems} values, wider than the "
                f"tree ({self.tree}); a lane must span whole beats"
            )
        if self.channels * self.beat_elems != self.lanes * self.tree:
            raise ValueError(
                f"{self.channels} channels x {self.beat_elems} values per beat = "
                f"{self.channels * self.beat_elems} values per cycle, but lanes x tree = "
                f"{self.lanes} x {self.tree} = {self.lanes * self.tree}; they must be equal "
                "(a weight tile is one beat of every channel)"
            )
        for field in ("vpu_lanes", "table_lanes"):
            if getattr(self, field) > BLOCK:
                raise ValueError(f"{field} must be at most {BLOCK}, not {getattr(self, field)}")
        if self.vbuf_elems < 4 * BLOCK:
            raise ValueError(f"vbuf_elems must be at least {4 * BLOCK}, not {self.vbuf_elems}")
        if self.channel_bytes % 4096:
            raise ValueError(f"channel_bytes must be a multiple of 4 KiB, not {self.channel_bytes}")

    # derived quantities -------------------------------------------------------------------

    @property
    def beat_bytes(self) -> int:
        """Bytes one AXI beat carries on one channel."""
        return self.port_bits // 8

    @property
    def beat_elems(self) -> int:
        """binary16 values per beat per channel."""
        return self.port_bits // 16

    @property
    def channels_per_lane(self) -> int:
        """Channels that together carry one lane's 64 weights."""
        return self.tree // self.beat_elems

    @property
    def tile_elems(self) -> int:
        """Values in one weight tile (lanes x tree), i.e. one beat across all channels."""
        return self.lanes * self.tree

    @property
    def macs_per_cycle(self) -> int:
        return self.lanes * self.tree

    @property
    def peak_gbps(self) -> float:
        """Aggregate HBM bandwidth of the channels this core uses."""
        return self.channels * self.channel_gbps

    @property
    def port_gbps(self) -> float:
        """What one port can move at the kernel clock (a beat per cycle)."""
        return self.beat_bytes * self.clock_mhz * 1e6 / 1e9

    def replace(self, **changes) -> CoreGeometry:
        return dataclasses.replace(self, **changes)


GEOMETRIES: dict[str, CoreGeometry] = {
    # The Alveo U55C build: 32 pseudo-channels x 512 bits = 1,024 values per cycle = 16 x 64.
    "u55c": CoreGeometry(
        name="u55c",
        channels=32,
        port_bits=512,
        lanes=16,
        vpu_lanes=64,
        table_lanes=32,
        vbuf_elems=32768,
        imem_words=8192,
    ),
    # Test geometries: small enough for quick RTL simulation, same structure.
    "tiny": CoreGeometry(
        name="tiny",
        channels=4,
        port_bits=512,
        lanes=2,
        vpu_lanes=4,
        table_lanes=4,
        vbuf_elems=4096,
        imem_words=2048,
        channel_bytes=64 << 20,
    ),
    "small": CoreGeometry(
        name="small",
        channels=8,
        port_bits=256,
        lanes=2,
        vpu_lanes=8,
        table_lanes=8,
        vbuf_elems=8192,
        imem_words=2048,
        channel_bytes=128 << 20,
    ),
}


def geometry(name: str) -> CoreGeometry:
    """Look a preset up by name, with the valid names in the error."""
    try:
        return GEOMETRIES[name]
    except KeyError:
        raise ValueError(f"unknown geometry {name!r}; choose one of {sorted(GEOMETRIES)}") from None


def check_geometry(geom) -> CoreGeometry:
    """``geom`` if it is a :class:`CoreGeometry`, else TypeError (use :func:`geometry` for a
    name)."""
    if not isinstance(geom, CoreGeometry):
        hint = f"; geometry({geom!r}) gives the named one" if isinstance(geom, str) else ""
        raise TypeError(f"geom must be a tandem.geometry.CoreGeometry, not {geom!r}{hint}")
    return geom
