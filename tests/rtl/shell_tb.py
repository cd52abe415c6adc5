"""cocotb testbench for rtl/shell.py (KernelShell), run from test_shell.py.

The host side is a cocotbext-axi ``AxiLiteMaster`` using the offsets of ``tandem.regmap``, as the
host driver does; the core side is :class:`CoreModel`, which answers ``start`` with ``done`` a
few cycles later. Every test runs once with plain handshakes and once with random stalls on all
five AXI4-Lite channels (cocotbext-axi pause generators), so AW and W also arrive in both
orders and responses meet backpressure.
"""

from __future__ import annotations

import itertools
import random

import cocotb
from cocotb.triggers import ClockCycles, RisingEdge
from cocotbext.axi import AxiLiteBus, AxiLiteMaster

from tandem import regmap, seeds
from tandem.sim import streams
from tandem.sim.runner import tb_params


class CoreModel:
    """Stands in for the core: counts ``start`` pulses and answers each with ``done`` after
    ``run_cycles`` cycles, with the status inputs set just before."""

    def __init__(self, dut, channels: int):
        self.dut = dut
        self.run_cycles = 20
        self.starts = 0
        self.running = False
        self.status_fields = [r.name.lower() for r in regmap.status_registers(channels)]
        self.status = dict.fromkeys(self.status_fields, 0)
        dut.done.value = 0
        self.set_status(self.status)
        cocotb.start_soon(self._run())

    def set_status(self, values: dict) -> None:
        self.status.update(values)
        word = 0
        for k, name in enumerate(self.status_fields):  # 32-bit fields in order from the LSB
            word |= (self.status[name] & 0xFFFFFFFF) << (32 * k)
        self.dut.status.value = word

    async def _run(self):
        clk = self.dut.clk
        while True:
            await RisingEdge(clk)
            if int(self.dut.start.value):
                if self.running:
                    raise AssertionError("start pulsed while the core was running")
                self.starts += 1
                self.running = True
                await ClockCycles(clk, self.run_cycles - 1)
                self.dut.done.value = 1
                await RisingEdge(clk)
                self.dut.done.value = 0
                self.running = False


class ShellTB(streams.ClockedTB):
    def __init__(self, dut, *, stalled: bool, seed: int):
        super().__init__(dut)
        self.channels = tb_params()["channels"]
        self.host = AxiLiteMaster(AxiLiteBus.from_prefix(dut, "s_axi_control"), dut.clk, dut.rst)
        if stalled:
            for k, channel in enumerate(
                (
                    self.host.write_if.aw_channel,
                    self.host.write_if.w_channel,
                    self.host.write_if.b_channel,
                    self.host.read_if.ar_channel,
                    self.host.read_if.r_channel,
                )
            ):
                channel.set_pause_generator(streams.bernoulli(0.4, seed + k))
        self.core = CoreModel(dut, self.channels)
        self.rng = random.Random(seeds.seed(seed))

    async def read(self, offset: int) -> int:
        return await self.host.read_dword(offset)

    async def write(self, offset: int, value: int) -> None:
        await self.host.write_dword(offset, value)

    def args(self) -> dict[str, int]:
        """The ``args`` output, by argument name."""
        word = int(self.dut.args.value)
        out, pos = {}, 0
        for a in regmap.arguments(self.channels):
            out[a.name] = (word >> pos) & ((1 << (8 * a.size)) - 1)
            pos += 8 * a.size
        return out

    async def ctrl(self) -> dict[str, int]:
        word = await self.read(regmap.CTRL.offset)
        return {name: (word >> lsb) & 1 for name, lsb, _ in regmap.CTRL.fields}


def ctrl_bits(**values) -> int:
    word = 0
    for name, v in values.items():
        word |= v << regmap.CTRL.field(name)[0]
    return word


async def setup(dut, stalled: bool, seed: int) -> ShellTB:
    tb = ShellTB(dut, stalled=stalled, seed=seed)
    await tb.reset()
    return tb


@cocotb.test()
@cocotb.parametrize(stalled=[False, True])
async def every_register(dut, stalled):
    """Each argument word takes full and byte-strobed writes and reads back; scalars' upper
    words read 0; status registers read the core's values; unmapped words read 0."""
    tb = await setup(dut, stalled, seed=1)
    rng = tb.rng
    expected = {}
    for a in regmap.arguments(tb.channels):
        value = rng.getrandbits(8 * a.size)
        for k in range(a.size // 4):
            await tb.write(a.offset + 4 * k, (value >> (32 * k)) & 0xFFFFFFFF)
        if a.kind == "scalar":
            await tb.write(a.offset + 4, 0xFFFFFFFF)  # the reserved upper word ignores it
        expected[a.name] = value
    # byte-strobed writes: one random byte of every word
    for a in regmap.arguments(tb.channels):
        for k in range(a.size // 4):
            byte = rng.randrange(4)
            new = rng.getrandbits(8)
            await tb.host.write(a.offset + 4 * k + byte, bytes([new]))
            shift = 32 * k + 8 * byte
            expected[a.name] = (expected[a.name] & ~(0xFF << shift)) | (new << shift)
    for a in regmap.arguments(tb.channels):
        got = 0
        for k in range(a.size // 4):
            got |= await tb.read(a.offset + 4 * k) << (32 * k)
        assert got == expected[a.name], f"{a.name}: read {got:#x}, wrote {expected[a.name]:#x}"
        if a.kind == "scalar":
            assert await tb.read(a.offset + 4) == 0, f"{a.name}: upper word is not reserved"
    assert tb.args() == expected, f"args port {tb.args()} != {expected}"

    values = {r.name.lower(): rng.getrandbits(32) for r in regmap.status_registers(tb.channels)}
    tb.core.set_status(values)
    for r in regmap.status_registers(tb.channels):
        got = await tb.read(r.offset)
        assert got == values[r.name.lower()], f"{r.name}: {got:#x} != {values[r.name.lower()]:#x}"
        await tb.write(r.offset, ~got & 0xFFFFFFFF)  # read-only
        assert await tb.read(r.offset) == got, f"{r.name} is read-only but changed"

    end = regmap.status_registers(tb.channels)[-1].offset + 4
    for offset in range(end, regmap.address_space_bytes(tb.channels), 4):
        await tb.write(offset, 0xFFFFFFFF)
        assert await tb.read(offset) == 0, f"unmapped {offset:#x} does not read 0"
    for r in (regmap.GIER, regmap.IER):
        mask = sum(1 << lsb for _, lsb, _ in r.fields)
        await tb.write(r.offset, 0xFFFFFFFF)
        assert await tb.read(r.offset) == mask, f"{r.name} does not hold its bits"
        await tb.write(r.offset, 0)
        assert await tb.read(r.offset) == 0
    assert tb.core.starts == 0, "a register write started the core"


@cocotb.test()
@cocotb.parametrize(stalled=[False, True])
async def ap_ctrl_hs_sequence(dut, stalled):
    """idle after reset; ap_start starts one run; done sets ap_done/ap_ready/ap_idle, clears
    ap_start, and a read of CTRL clears ap_done/ap_ready; auto_restart runs again."""
    tb = await setup(dut, stalled, seed=2)
    assert await tb.ctrl() == {
        "ap_start": 0,
        "ap_done": 0,
        "ap_idle": 1,
        "ap_ready": 0,
        "auto_restart": 0,
    }
    tb.core.run_cycles = 400  # long enough to read CTRL mid-run even with stalls
    await tb.write(regmap.CTRL.offset, ctrl_bits(ap_start=1))
    mid = await tb.ctrl()
    assert (mid["ap_start"], mid["ap_idle"], mid["ap_done"]) == (1, 0, 0), mid
    assert tb.core.starts == 1
    await tb.write(regmap.CTRL.offset, ctrl_bits(ap_start=1))  # while running: no new start
    while tb.core.running:
        await RisingEdge(dut.clk)
    await ClockCycles(dut.clk, 2)
    done = await tb.ctrl()
    assert done == {"ap_start": 0, "ap_done": 1, "ap_idle": 1, "ap_ready": 1, "auto_restart": 0}
    after = await tb.ctrl()
    assert (after["ap_done"], after["ap_ready"], after["ap_idle"]) == (0, 0, 1), after
    assert tb.core.starts == 1, f"{tb.core.starts} starts for one ap_start"

    # a write of 0 to CTRL neither starts nor clears anything
    await tb.write(regmap.CTRL.offset, 0)
    await ClockCycles(dut.clk, 10)
    assert tb.core.starts == 1

    # auto_restart: runs back to back until it is cleared
    tb.core.run_cycles = 30
    await tb.write(regmap.CTRL.offset, ctrl_bits(ap_start=1, auto_restart=1))
    while tb.core.starts < 3:
        await RisingEdge(dut.clk)
    await tb.write(regmap.CTRL.offset, 0)  # auto_restart off; ap_start stays until done
    settled = tb.core.starts
    for _ in range(200):
        await RisingEdge(dut.clk)
    assert tb.core.starts <= settled + 1, "auto_restart did not stop"
    final = await tb.ctrl()
    assert (final["ap_start"], final["ap_idle"], final["auto_restart"]) == (0, 1, 0), final


@cocotb.test()
@cocotb.parametrize(stalled=[False, True])
async def interrupts(dut, stalled):
    """ISR bits follow IER at done; writes toggle them; interrupt = GIER & any ISR bit."""
    tb = await setup(dut, stalled, seed=3)
    done_bit = regmap.ISR.mask("done")
    ready_bit = regmap.ISR.mask("ready")

    async def run_once():
        starts = tb.core.starts
        await tb.write(regmap.CTRL.offset, ctrl_bits(ap_start=1))
        while tb.core.starts == starts or tb.core.running:
            await RisingEdge(dut.clk)
        await ClockCycles(dut.clk, 2)

    await run_once()  # IER = 0: nothing latched
    assert await tb.read(regmap.ISR.offset) == 0
    assert int(dut.interrupt.value) == 0

    await tb.write(regmap.IER.offset, regmap.IER.mask("done"))
    await run_once()
    assert await tb.read(regmap.ISR.offset) == done_bit
    assert int(dut.interrupt.value) == 0, "interrupt without GIER"
    await tb.write(regmap.GIER.offset, 1)
    await ClockCycles(dut.clk, 1)
    assert int(dut.interrupt.value) == 1, "no interrupt with GIER and ISR.done"
    await tb.write(regmap.ISR.offset, done_bit)  # toggle: clears
    assert await tb.read(regmap.ISR.offset) == 0
    await ClockCycles(dut.clk, 1)
    assert int(dut.interrupt.value) == 0
    await tb.write(regmap.ISR.offset, ready_bit)  # toggle: sets (Vitis "toggle on write")
    assert await tb.read(regmap.ISR.offset) == ready_bit
    await ClockCycles(dut.clk, 1)
    assert int(dut.interrupt.value) == 1
    await tb.write(regmap.ISR.offset, ready_bit)
    await tb.write(regmap.IER.offset, regmap.IER.mask("done") | regmap.IER.mask("ready"))
    await run_once()
    assert await tb.read(regmap.ISR.offset) == done_bit | ready_bit
    assert await tb.read(regmap.ISR.offset) == done_bit | ready_bit, "ISR is not clear-on-read"
    await tb.write(regmap.GIER.offset, 0)
    await ClockCycles(dut.clk, 1)
    assert int(dut.interrupt.value) == 0, "interrupt with GIER off"


@cocotb.test()
async def overlapping_traffic(dut):
    """Many writes and reads in flight at once under heavy stalls: every read sees the last
    completed write to its word, and every write gets its response."""
    tb = await setup(dut, True, seed=4)
    rng = tb.rng
    words = [a.offset + 4 * k for a in regmap.arguments(tb.channels) for k in range(a.size // 4)]
    shadow = dict.fromkeys(words, 0)
    for round_no in range(6):
        batch = rng.sample(words, k=min(len(words), 8))
        events = []
        for w in batch:
            v = rng.getrandbits(32)
            shadow[w] = v
            events.append(tb.host.init_write(w, v.to_bytes(4, "little")))
        for e in events:
            await e.wait()
        reads = [(w, tb.host.init_read(w, 4)) for w in rng.sample(words, k=min(len(words), 8))]
        for w, e in reads:
            await e.wait()
            got = int.from_bytes(e.data.data, "little")
            assert got == shadow[w], f"round {round_no}: {w:#x} read {got:#x}, not {shadow[w]:#x}"
    assert tb.core.starts == 0
    for _ in itertools.repeat(None, 4):
        await RisingEdge(dut.clk)
