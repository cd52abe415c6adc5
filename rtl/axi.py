"""AXI4 and AXI4-Lite signatures with Vitis port names, and the response and burst codes.

Both signatures are flat: their members carry the AXI signal names in lower case (``awvalid``,
``araddr``, ...), so a member named ``m_axi_hbm0`` of the top-level component becomes the Vitis
ports ``m_axi_hbm0_awvalid``, ``m_axi_hbm0_araddr``, ... once :func:`vitis_ports` names them
(Amaranth itself would join the path with ``__``). They are written from the manager's side:
``Out`` is what the manager drives. A subordinate takes them flipped (``In(...)``).

The AXI4 signal set is the one Vitis RTL kernels need plus what the memory models need: IDs
(one bit, always 0: every transfer is in order), ``*size`` and ``*burst`` (always the full bus
width, INCR), and the responses. Cache, protection, lock, QoS and region signals are left out;
Vitis ties them off.
"""

# No `from __future__ import annotations`: the enum shapes below are read at class creation.

# verilog.convert names its default ports with this enum too; there is no public alias in 0.5.
from amaranth.hdl._ir import PortDirection
from amaranth.lib import enum, wiring
from amaranth.lib.wiring import In, Out

from tandem.checks import check_int

__all__ = [
    "AXI4LiteSignature",
    "AXI4Signature",
    "Burst",
    "Resp",
    "burst_limit",
    "vitis_ports",
]

FOUR_KB = 4096
"""An AXI4 burst must not cross a 4 KiB address boundary (AXI4 A3.4.1)."""

MAX_BURST_BEATS = 256
"""An AXI4 INCR burst carries at most 256 beats (``len`` is 8 bits)."""


class Resp(enum.Enum, shape=2):
    """``bresp`` / ``rresp``. Only OKAY counts as success here (no exclusive accesses)."""

    OKAY = 0
    EXOKAY = 1
    SLVERR = 2
    DECERR = 3


class Burst(enum.Enum, shape=2):
    """``awburst`` / ``arburst``; the core issues INCR only (Vitis forbids WRAP on kernels)."""

    FIXED = 0
    INCR = 1
    WRAP = 2


def burst_limit(data_bytes: int) -> int:
    """Most beats one INCR burst of full-width beats may carry: 256, or fewer if 256 beats would
    span more than 4 KiB (64 beats at 512 bits, 128 at 256 bits)."""
    return min(MAX_BURST_BEATS, FOUR_KB // data_bytes)


class AXI4Signature(wiring.Signature):
    """An AXI4 (full) manager port, as the manager sees it.

    Parameters
    ----------
    addr_width : int
        ``awaddr``/``araddr`` width; Vitis kernel pointers are 64-bit.
    data_width : int
        ``wdata``/``rdata`` width, a power of two from 32 to 1024.
    id_width : int
        ``*id`` width (at least 1: the memory models need the signals).

    Members
    -------
    aw* : ``awvalid``, ``awready`` (In), ``awaddr``, ``awlen``, ``awsize``, ``awburst``, ``awid``
    w* : ``wvalid``, ``wready`` (In), ``wdata``, ``wstrb``, ``wlast``
    b* : ``bvalid`` (In), ``bready``, ``bresp`` (In, :class:`Resp`), ``bid`` (In)
    ar* : ``arvalid``, ``arready`` (In), ``araddr``, ``arlen``, ``arsize``, ``arburst``, ``arid``
    r* : ``rvalid`` (In), ``rready``, ``rdata``, ``rresp`` (:class:`Resp`), ``rlast``, ``rid``
        (all In but ``rready``)
    """

    def __init__(self, *, addr_width: int = 64, data_width: int = 512, id_width: int = 1):
        check_int("addr_width", addr_width, 12, 64)
        if data_width not in (32, 64, 128, 256, 512, 1024):
            raise ValueError(f"data_width must be a power of two in 32..1024, not {data_width!r}")
        check_int("id_width", id_width, 1, 16)
        self._addr_width = addr_width
        self._data_width = data_width
        self._id_width = id_width
        super().__init__(
            {
                "awvalid": Out(1),
                "awready": In(1),
                "awaddr": Out(addr_width),
                "awlen": Out(8),
                "awsize": Out(3),
                "awburst": Out(Burst),
                "awid": Out(id_width),
                "wvalid": Out(1),
                "wready": In(1),
                "wdata": Out(data_width),
                "wstrb": Out(data_width // 8),
                "wlast": Out(1),
                "bvalid": In(1),
                "bready": Out(1),
                "bresp": In(Resp),
                "bid": In(id_width),
                "arvalid": Out(1),
                "arready": In(1),
                "araddr": Out(addr_width),
                "arlen": Out(8),
                "arsize": Out(3),
                "arburst": Out(Burst),
                "arid": Out(id_width),
                "rvalid": In(1),
                "rready": Out(1),
                "rdata": In(data_width),
                "rresp": In(Resp),
                "rlast": In(1),
                "rid": In(id_width),
            }
        )

    @property
    def addr_width(self) -> int:
        return self._addr_width

    @property
    def data_width(self) -> int:
        return self._data_width

    @property
    def id_width(self) -> int:
        return self._id_width

    @property
    def data_bytes(self) -> int:
        return self._data_width // 8

    @property
    def size_code(self) -> int:
        """``*size`` for full-width beats: log2 of the bytes per beat."""
        return (self.data_bytes - 1).bit_length()

    def __eq__(self, other):
        return isinstance(other, AXI4Signature) and (
            other.addr_width,
            other.data_width,
            other.id_width,
        ) == (self.addr_width, self.data_width, self.id_width)

    def __hash__(self):
        return hash((AXI4Signature, self._addr_width, self._data_width, self._id_width))

    def __repr__(self):
        return (
            f"AXI4Signature(addr_width={self._addr_width}, data_width={self._data_width}, "
            f"id_width={self._id_width})"
        )


class AXI4LiteSignature(wiring.Signature):
    """An AXI4-Lite manager port (32-bit data), as the manager sees it; the control slave takes
    it flipped.

    Members
    -------
    ``awvalid``, ``awready`` (In), ``awaddr``; ``wvalid``, ``wready`` (In), ``wdata``, ``wstrb``;
    ``bvalid`` (In), ``bready``, ``bresp`` (In); ``arvalid``, ``arready`` (In), ``araddr``;
    ``rvalid`` (In), ``rready``, ``rdata`` (In), ``rresp`` (In).
    """

    DATA_WIDTH = 32

    def __init__(self, *, addr_width: int):
        check_int("addr_width", addr_width, 2, 64)
        self._addr_width = addr_width
        super().__init__(
            {
                "awvalid": Out(1),
                "awready": In(1),
                "awaddr": Out(addr_width),
                "wvalid": Out(1),
                "wready": In(1),
                "wdata": Out(32),
                "wstrb": Out(4),
                "bvalid": In(1),
                "bready": Out(1),
                "bresp": In(Resp),
                "arvalid": Out(1),
                "arready": In(1),
                "araddr": Out(addr_width),
                "rvalid": In(1),
                "rready": Out(1),
                "rdata": In(32),
                "rresp": In(Resp),
            }
        )

    @property
    def addr_width(self) -> int:
        return self._addr_width

    def __eq__(self, other):
        return isinstance(other, AXI4LiteSignature) and other.addr_width == self.addr_width

    def __hash__(self):
        return hash((AXI4LiteSignature, self._addr_width))

    def __repr__(self):
        return f"AXI4LiteSignature(addr_width={self._addr_width})"


def vitis_ports(component: wiring.Component) -> list[tuple[str, object, PortDirection]]:
    """Top-level ports of ``component`` named as Vitis expects them.

    Members whose signature is an :class:`AXI4Signature` or :class:`AXI4LiteSignature` (at any
    depth, flipped or not) are joined to their signal with one underscore
    (``m_axi_hbm0_awvalid``); everything else keeps Amaranth's ``__`` joins. Pass the result as
    ``ports=`` to ``amaranth.back.verilog.convert`` (or to ``tandem.sim.runner.run``), so that
    cocotbext-axi finds the buses with ``AxiBus.from_prefix(dut, "m_axi_hbm0")``.
    """
    axi_paths = set()

    def collect(signature: wiring.Signature, prefix: tuple):
        for name, member in signature.members.items():
            if not member.is_signature:
                continue
            sig = member.signature
            if isinstance(sig, wiring.FlippedSignature):
                sig = sig.flip()
            if isinstance(sig, (AXI4Signature, AXI4LiteSignature)):
                axi_paths.add((*prefix, name))
            else:
                collect(sig, (*prefix, name))

    collect(component.signature, ())
    ports = []
    for path, member, value in component.signature.flatten(component):
        value = value.as_value() if hasattr(value, "as_value") else value
        direction = PortDirection.Input if member.flow == In else PortDirection.Output
        head = next((p for p in axi_paths if path[: len(p)] == p), None)
        if head is None:
            name = "__".join(map(str, path))
        else:
            name = "__".join(map(str, head)) + "_" + "__".join(map(str, path[len(head) :]))
        ports.append((name, value, direction))
    return ports
