"""The kernel's register map: the one definition the RTL, the host driver, the build and docs read.

The control slave follows the Vitis ``ap_ctrl_hs`` contract (CTRL at 0x00 with ap_start, ap_done,
ap_idle, ap_ready; GIER, IER, ISR), followed by the kernel arguments from 0x10 and then read-only
status registers. Every argument slot is 8 bytes wide; scalars use the low 4 bytes, pointers all 8.
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass


class Access(enum.Enum):
    RW = "rw"
    RO = "ro"
    W1C = "w1c"  # also "toggle on write" for ISR, as Vitis defines it


@dataclass(frozen=True)
class Register:
    name: str
    offset: int
    access: Access
    doc: str
    fields: tuple[tuple[str, int, int], ...] = ()  # (name, lsb, width)

    def field(self, name: str) -> tuple[int, int]:
        for n, lsb, width in self.fields:
            if n == name:
                return lsb, width
        raise KeyError(f"register {self.name} has no field {name!r}")

    def mask(self, name: str) -> int:
        lsb, width = self.field(name)
        return ((1 << width) - 1) << lsb


@dataclass(frozen=True)
class Argument:
    """A kernel argument as Vitis sees it (``kernel.xml``) and the host sets it."""

    name: str
    offset: int
    size: int  # bytes: 4 for scalars, 8 for pointers
    kind: str  # "scalar" or "pointer"
    doc: str
    port: str = ""  # m_axi interface of a pointer


CTRL = Register(
    "CTRL",
    0x00,
    Access.RW,
    "Vitis ap_ctrl_hs control",
    (
        ("ap_start", 0, 1),
        ("ap_done", 1, 1),
        ("ap_idle", 2, 1),
        ("ap_ready", 3, 1),
        ("auto_restart", 7, 1),
    ),
)
GIER = Register("GIER", 0x04, Access.RW, "global interrupt enable", (("enable", 0, 1),))
IER = Register("IER", 0x08, Access.RW, "interrupt enable", (("done", 0, 1), ("ready", 1, 1)))
ISR = Register("ISR", 0x0C, Access.W1C, "interrupt status", (("done", 0, 1), ("ready", 1, 1)))

ARG_BASE = 0x10
ARG_STRIDE = 8


class Status(enum.IntFlag):
    """Bits of the STATUS register (and of the status record in HBM)."""

    ILLEGAL_INSTRUCTION = 1 << 0
    HBM_RANGE = 1 << 1  # an access beyond hbm_bytes
    VBUF_RANGE = 1 << 2  # a vector operand beyond the vector buffer, or a partial dst overlap
    WATCHDOG = 1 << 3  # no progress for watchdog cycles
    PROGRAM_ERROR = 1 << 4  # HALT with a non-zero code (e.g. context full)
    AXI_ERROR = 1 << 5  # SLVERR/DECERR on an AXI response


STATUS_DOCS = {
    "ILLEGAL_INSTRUCTION": "unknown opcode or reserved bits set",
    "HBM_RANGE": "an HBM access fell outside the hbm_bytes buffer",
    "VBUF_RANGE": "a vector operand fell outside the vector buffer, or an element-wise op's "
    "dst partly overlapped an operand",
    "WATCHDOG": "no unit made progress for `watchdog` cycles",
    "PROGRAM_ERROR": "the program stopped with a non-zero HALT code (see ERROR_CODE)",
    "AXI_ERROR": "an AXI read or write returned SLVERR or DECERR",
}


def status_names(status: int) -> list[str]:
    """Names of the :class:`Status` bits set in ``status`` (lowest bit first)."""
    return [s.name for s in Status if status & s]


def describe_status(status: int, pc: int, halt_code: int, tokens: int) -> str:
    """The one text for a status word, for users and logs alike: each bit set with what it means
    (:data:`STATUS_DOCS`), the HALT code by name for ``PROGRAM_ERROR``, where the core stopped
    and how many tokens it wrote; ``"ok (<n> tokens)"`` for a clean run. Always one line."""
    if status == 0:
        return f"ok ({tokens} tokens)"
    parts = []
    for name in status_names(status):
        text = f"{name} ({STATUS_DOCS[name]})"
        if name == "PROGRAM_ERROR":
            try:
                code = HaltCode(halt_code).name
            except ValueError:
                code = str(halt_code)
            text += f", HALT code {code}"
        parts.append(text)
    unknown = status & ~sum(Status)
    if unknown:
        parts.append(f"undefined status bits {unknown:#x}")
    text = f"{'; '.join(parts)} at instruction {pc}, after {tokens} tokens"
    if status == Status.PROGRAM_ERROR and halt_code == HaltCode.CONTEXT_FULL:
        text += " (the context is full: use a shorter prompt or fewer new tokens)"
    return text


SCALAR_ARGS = (
    ("start_pos", "first position the program processes"),
    ("prompt_len", "positions below this take their token from the prompt area"),
    ("n_new", "tokens to generate"),
    ("hbm_bytes", "bytes of every channel's buffer; accesses beyond are errors"),
    ("watchdog", "cycles without progress before WATCHDOG (0: default 2**24)"),
    ("sampling", "temperature T_q (bits 15:0; 0: greedy) and top-k (bits 22:16); tandem.sampling"),
    ("seed", "seed of the sampling stream (tandem.sampling)"),
)
"""Scalar arguments in order; ``LDARG`` numbers them from 0."""


def scalar_arg_index(name: str) -> int:
    for i, (n, _) in enumerate(SCALAR_ARGS):
        if n == name:
            return i
    raise KeyError(f"no scalar argument {name!r}; known: {[n for n, _ in SCALAR_ARGS]}")


class HaltCode(enum.IntEnum):
    """Codes a compiled program passes to ``HALT`` (0 is success)."""

    OK = 0
    CONTEXT_FULL = 1  # a position reached n_ctx
    BAD_ARGS = 2  # arguments inconsistent (e.g. start_pos > prompt_len)


def arguments(channels: int) -> list[Argument]:
    """All kernel arguments for a core with ``channels`` HBM ports, with their offsets."""
    args = []
    off = ARG_BASE
    for name, doc in SCALAR_ARGS:
        args.append(Argument(name, off, 4, "scalar", doc))
        off += ARG_STRIDE
    for ch in range(channels):
        args.append(
            Argument(
                f"hbm{ch}",
                off,
                8,
                "pointer",
                f"base of HBM pseudo-channel buffer {ch}",
                port=f"m_axi_hbm{ch}",
            )
        )
        off += ARG_STRIDE
    return args


def status_registers(channels: int) -> list[Register]:
    """Read-only registers after the arguments."""
    off = ARG_BASE + ARG_STRIDE * (len(SCALAR_ARGS) + channels)
    names = [
        (
            "STATUS",
            "error bits (Status); zero after a clean run",
            tuple((s.name.lower(), s.value.bit_length() - 1, 1) for s in Status),
        ),
        ("ERROR_PC", "instruction index at the first error", ()),
        ("ERROR_CODE", "HALT code (HaltCode)", ()),
        ("TOKENS", "tokens written to the output area in this run", ()),
        ("CYCLES_LO", "cycles from ap_start to ap_done, low word", ()),
        ("CYCLES_HI", "cycles from ap_start to ap_done, high word", ()),
    ]
    return [Register(n, off + 4 * i, Access.RO, d, f) for i, (n, d, f) in enumerate(names)]


def registers(channels: int) -> list[Register]:
    return [CTRL, GIER, IER, ISR, *status_registers(channels)]


def address_space_bytes(channels: int) -> int:
    """Size of the s_axi_control address space (a power of two)."""
    end = status_registers(channels)[-1].offset + 4
    return 1 << (end - 1).bit_length()


def to_json(channels: int) -> str:
    """The register map for tools outside Python (build scripts, docs)."""

    def reg(r: Register):
        d = asdict(r)
        d["access"] = r.access.value
        return d

    return json.dumps(
        {
            "registers": [reg(r) for r in registers(channels)],
            "arguments": [asdict(a) for a in arguments(channels)],
            "status_bits": {s.name: int(s) for s in Status},
            "address_bytes": address_space_bytes(channels),
        },
        indent=2,
    )
