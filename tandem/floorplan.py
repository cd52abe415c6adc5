"""The decode core's floorplan: which super logic region (SLR) each block of rtl/core.py goes in,
and how many registered stages every stream between two blocks gets.

One definition, read by the RTL (:class:`tandem.rtl.core.DecodeCore` inserts the stages), the
Vitis flow (scripts/bitstream.py writes the pblock constraints from it), the resource estimate
(scripts/estimate.py sums each SLR's blocks against its budget) and docs/floorplan.md.

The Alveo U55C's xcu55c has three SLRs stacked bottom to top, SLR0 to SLR2. The HBM stacks and
the 32 pseudo-channel ports sit at the bottom of SLR0. A net between two SLRs crosses on a
super long line (SLL), about 1 ns on its own, so every stream that crosses gets registered
stages on both sides of each boundary it passes (AMD UG1393, "Quality of Results
Considerations"; UG949): ``stages_per_boundary`` per boundary, two by default.

A :class:`Floorplan` is independent of the geometry: the u55c plan applied to the tiny test
geometry gives a small core with the same stage counts, which is how the tests run it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = [
    "BLOCKS",
    "FLAT",
    "FLOORPLANS",
    "SLR_BUDGETS",
    "U55C",
    "Floorplan",
    "SlrBudget",
    "floorplan",
    "for_geometry",
]

BLOCKS = (
    "shell",
    "ctrl",
    "dma",
    "fetch",
    "store_feeder",
    "mpu_feeder",
    "mpu",
    "sampler",
    "vpu_queue",
    "vpu",
    "vbuf",
    "vbuf_shared_read",
    "vbuf_write",
)
"""The blocks of the core, by their instance names in rtl/core.py (``m.submodules.<name>``)."""


@dataclass(frozen=True)
class SlrBudget:
    """What the platform's dynamic region offers the kernel in one SLR."""

    lut: int
    ff: int
    dsp: int
    bram36: int
    uram: int

    def as_dict(self) -> dict[str, int]:
        """The budget under the resource-class names of scripts/estimate.py."""
        return {
            "LUT": self.lut,
            "FF": self.ff,
            "DSP": self.dsp,
            "BRAM36": self.bram36,
            "URAM": self.uram,
        }


SLR_BUDGETS: tuple[SlrBudget, ...] = (
    # xilinx_u55c_gen3x16_xdma_3_202210_1, dynamic region per SLR, as TAPA's tests use them
    # (rapidstream-org/rapidstream-tapa, tests/functional/graphir/u55c_device_config.json;
    # planning figures, not a vendor table). BRAM36 = BRAM18 / 2.
    SlrBudget(lut=288_800, ff=657_600, dsp=2_664, bram36=600, uram=320),
    SlrBudget(lut=364_800, ff=729_600, dsp=2_684, bram36=576, uram=320),
    SlrBudget(lut=382_080, ff=764_160, dsp=2_856, bram36=600, uram=320),
)
"""The U55C's dynamic region, SLR0 (HBM side) to SLR2."""


@dataclass(frozen=True)
class Floorplan:
    """Block -> SLR, and the registered stages a stream gets per SLR boundary it crosses.

    Parameters
    ----------
    name : str
    slr : mapping of block name to SLR index
        Every name in :data:`BLOCKS`, each to ``0 .. len(budgets) - 1``.
    stages_per_boundary : int
        Registered valid/ready stages a stream gets for each SLR boundary between its two ends
        (0 gives plain wires everywhere).
    reset_stages : int
        Registers from ``ap_rst_n`` to the root of the reset tree; each SLR's branch adds
        ``stages_per_boundary`` per boundary from SLR0 and its leaves one more, padded so that
        every block leaves reset in the same cycle (:meth:`reset_depth`).
    budgets : tuple of SlrBudget
        The dynamic region of each SLR.
    """

    name: str
    slr: MappingProxyType = field(repr=False, hash=False)
    stages_per_boundary: int = 2
    reset_stages: int = 2
    budgets: tuple[SlrBudget, ...] = SLR_BUDGETS

    def __post_init__(self):
        slr = dict(self.slr)
        missing = sorted(set(BLOCKS) - set(slr))
        unknown = sorted(set(slr) - set(BLOCKS))
        if missing or unknown:
            raise ValueError(
                f"floorplan {self.name!r} must place exactly the core's blocks: "
                f"missing {missing}, unknown {unknown}"
            )
        for block, s in slr.items():
            if not isinstance(s, int) or not 0 <= s < len(self.budgets):
                raise ValueError(
                    f"floorplan {self.name!r}: block {block!r} in SLR {s!r}, but the device "
                    f"has SLRs 0..{len(self.budgets) - 1}"
                )
        for what in ("stages_per_boundary", "reset_stages"):
            v = getattr(self, what)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"floorplan {self.name!r}: {what} must be an int >= 0, not {v!r}")
        if self.reset_stages < 1:
            raise ValueError(f"floorplan {self.name!r}: reset_stages must be at least 1")
        object.__setattr__(self, "slr", MappingProxyType(slr))

    def boundaries(self, a: str, b: str) -> int:
        """SLR boundaries between blocks ``a`` and ``b``."""
        return abs(self.slr[a] - self.slr[b])

    def stages(self, a: str, b: str) -> int:
        """Registered stages on a stream between blocks ``a`` and ``b``."""
        return self.stages_per_boundary * self.boundaries(a, b)

    def stage_slrs(self, a: str, b: str) -> tuple[int, ...]:
        """The SLR of each stage from ``a`` to ``b`` (:meth:`path_slrs`)."""
        return self.path_slrs(self.slr[a], self.slr[b])

    def path_slrs(self, sa: int, sb: int) -> tuple[int, ...]:
        """The SLR of each stage of a path from SLR ``sa`` to SLR ``sb``: each boundary's
        stages split evenly, the first half on the near side, the rest on the far side (with
        two per boundary, one register on each side of it)."""
        step = 1 if sb >= sa else -1
        out = []
        n = self.stages_per_boundary
        for k in range(abs(sb - sa)):
            near = sa + step * k
            out += [near] * ((n + 1) // 2) + [near + step] * (n // 2)
        return tuple(out)

    def reset_branch_slrs(self, slr: int) -> tuple[int, ...]:
        """The SLR of each register of the reset branch to ``slr``: the crossing from the
        root's SLR (the shell's), then padding and the leaf in ``slr``."""
        path = self.path_slrs(self.slr["shell"], slr)
        return path + (slr,) * (self.reset_depth - self.reset_stages - len(path))

    @property
    def slrs(self) -> tuple[int, ...]:
        """The SLRs that hold at least one block, lowest first."""
        return tuple(sorted(set(self.slr.values())))

    def blocks_in(self, slr: int) -> tuple[str, ...]:
        return tuple(b for b in BLOCKS if self.slr[b] == slr)

    def reset_branch(self, slr: int) -> int:
        """Registers from the reset root to the leaf of ``slr`` (before padding)."""
        return self.stages_per_boundary * abs(slr - self.slr["shell"]) + 1

    @property
    def reset_depth(self) -> int:
        """Cycles from ``ap_rst_n`` to every block's reset: the root's registers plus the
        longest branch (shorter branches are padded to it)."""
        return self.reset_stages + max(self.reset_branch(s) for s in self.slrs)

    @property
    def flat(self) -> bool:
        """No stage anywhere (one SLR, or no stages per boundary)."""
        return self.stages_per_boundary == 0 or len(self.slrs) == 1


U55C = Floorplan(
    name="u55c",
    slr={
        # SLR0: everything that talks to HBM or the host (the HBM ports and s_axi_control
        # enter here): the 32-channel DMA and the control registers.
        "shell": 0,
        "dma": 0,
        # SLR1: the matrix unit (1,024 DSP products) and the controller between the DMA
        # below and the vector side above, with the DMA's read front end (the program fetch
        # must sit beside the controller: after a watchdog it drops the rows of a stopped
        # fetch, which it cannot do for beats already in stages towards the controller).
        "ctrl": 1,
        "mpu": 1,
        "fetch": 1,
        # SLR2: the vector buffer with everything that reads it at a fixed latency of one cycle
        # (VBUF ports are not streams, so their users stay beside it), and the vector unit.
        "vpu": 2,
        "vpu_queue": 2,
        "vbuf": 2,
        "vbuf_shared_read": 2,
        "vbuf_write": 2,
        "mpu_feeder": 2,
        "store_feeder": 2,
        # The MPU's sampling lists (about 75K LUTs): SLR1 cannot hold them beside the MPU's
        # DSP array, and their ports are a registered feed of rounded rows and a one-cycle
        # answer (rtl/sampler.py), so they cross as level signals.
        "sampler": 2,
    },
)
"""The U55C build's plan (docs/floorplan.md gives the resource arithmetic behind it)."""

FLAT = Floorplan(name="flat", slr=dict.fromkeys(BLOCKS, 0), stages_per_boundary=0, reset_stages=1)
"""Every block in one SLR and no stages: the core as it was before floorplanning."""

FLOORPLANS = MappingProxyType({"u55c": U55C, "flat": FLAT})


def floorplan(name: str) -> Floorplan:
    """A floorplan by name, with the valid names in the error."""
    try:
        return FLOORPLANS[name]
    except KeyError:
        raise ValueError(
            f"unknown floorplan {name!r}; choose one of {sorted(FLOORPLANS)}"
        ) from None


def for_geometry(geom) -> Floorplan:
    """The floorplan a geometry builds with by default: the plan of the same name (u55c), else
    :data:`FLAT` (the test geometries; tests pass :data:`U55C` to run them staged)."""
    return FLOORPLANS.get(geom.name, FLAT)
