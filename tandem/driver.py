"""The kernel's register-level driver, bus-agnostic: the same code drives the RTL simulation
(cocotbext-axi AXI4-Lite master) and, later, hardware (an XRT register window).

Every offset comes from :mod:`tandem.regmap`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from tandem import regmap
from tandem.regmap import CTRL, SCALAR_ARGS, describe_status

Read32 = Callable[[int], Awaitable[int]]
Write32 = Callable[[int, int], Awaitable[None]]


class KernelError(RuntimeError):
    """The kernel stopped with error bits set; ``status`` says which."""

    def __init__(self, status: KernelStatus):
        text = describe_status(status.status, status.error_pc, status.error_code, status.tokens)
        super().__init__(f"kernel stopped with status {status.status:#x}: {text}")
        self.status = status


@dataclass(frozen=True)
class KernelStatus:
    status: int
    error_pc: int
    error_code: int
    tokens: int
    cycles: int

    @property
    def ok(self) -> bool:
        return self.status == 0

    def check(self) -> KernelStatus:
        """Raise :class:`KernelError` unless the run was clean."""
        if not self.ok:
            raise KernelError(self)
        return self


class KernelDriver:
    """Start the kernel and wait for it through ``read32(offset)`` / ``write32(offset, value)``
    coroutines on the ``s_axi_control`` space."""

    def __init__(self, channels: int, read32: Read32, write32: Write32):
        self.channels = channels
        self.read32 = read32
        self.write32 = write32
        self.args = {a.name: a for a in regmap.arguments(channels)}
        self.regs = {r.name: r for r in regmap.status_registers(channels)}

    async def set_args(self, scalars: Mapping[str, int], pointers: Mapping[int, int]) -> None:
        known = {n for n, _ in SCALAR_ARGS}
        unknown = set(scalars) - known
        if unknown:
            raise ValueError(f"unknown scalar arguments {sorted(unknown)}; known {sorted(known)}")
        for name, _ in SCALAR_ARGS:
            await self.write32(self.args[name].offset, int(scalars.get(name, 0)) & 0xFFFFFFFF)
        for ch in range(self.channels):
            addr = int(pointers.get(ch, 0))
            off = self.args[f"hbm{ch}"].offset
            await self.write32(off, addr & 0xFFFFFFFF)
            await self.write32(off + 4, addr >> 32)

    async def start(self) -> None:
        await self.write32(CTRL.offset, CTRL.mask("ap_start"))

    async def wait(
        self, *, poll: Callable[[], Awaitable[None]] | None = None, max_polls: int = 1 << 30
    ) -> KernelStatus:
        """Poll CTRL until ap_done, then read the status registers."""
        for _ in range(max_polls):
            if await self.read32(CTRL.offset) & CTRL.mask("ap_done"):
                return await self.status()
            if poll is not None:
                await poll()
        raise TimeoutError(f"ap_done not seen after {max_polls} polls of CTRL")

    async def status(self) -> KernelStatus:
        r = {name: await self.read32(reg.offset) for name, reg in self.regs.items()}
        return KernelStatus(
            r["STATUS"],
            r["ERROR_PC"],
            r["ERROR_CODE"],
            r["TOKENS"],
            r["CYCLES_LO"] | r["CYCLES_HI"] << 32,
        )

    async def run(self, scalars, pointers, **kw) -> KernelStatus:
        await self.set_args(scalars, pointers)
        await self.start()
        return await self.wait(**kw)
