"""The ``model`` backend: the ISA simulator (``tandem.golden.isasim``) as a device."""

from __future__ import annotations

from tandem.geometry import CoreGeometry
from tandem.layout import HBMImage

from .device import HostImageDevice, TokenCallback


class ModelDevice(HostImageDevice):
    """The ISA simulator as a device, bit-exact with the core.

    ``start`` runs the simulator on a worker thread, so ``wait(timeout)`` behaves as with
    hardware. Static weight matrices are aligned at ``load`` (that is where the time goes), so
    runs measure decoding only. The :class:`~tandem.golden.isasim.SimResult` of the last run
    (instruction counts, HBM bytes) is kept in ``last_result`` and summarised by
    :meth:`run_stats`.

    Parameters
    ----------
    geom : CoreGeometry
    max_steps : int, optional
        Instruction budget of one run (the simulator's watchdog: a run past it stops with
        ``Status.WATCHDOG``; the ``watchdog`` argument counts cycles, which the simulator has not).
    """

    name = "model"
    what = "the ISA simulator"

    def __init__(self, geom: CoreGeometry, max_steps: int | None = None):
        super().__init__(geom)
        self.max_steps = max_steps
        self.sim = None
        self.last_result = None

    def _loaded_image(self) -> None:
        from tandem.golden.isasim import DEFAULT_MAX_STEPS, IsaSim

        self.sim = IsaSim(self.geom, self.image, max_steps=self.max_steps or DEFAULT_MAX_STEPS)
        self.sim.prepare()

    def _written(self, lo: int, hi: int) -> None:
        self.sim.invalidate(lo, hi)

    def start(self, on_token: TokenCallback | None = None) -> None:
        self.last_result = None
        super().start(on_token)

    def _run(self, image: HBMImage, args: dict, on_token: TokenCallback | None) -> None:
        self.last_result = self.sim.run(args, on_token)

    def run_stats(self) -> dict:
        r = self.last_result
        if r is None:
            return {}
        stats = {
            "instructions": r.steps,
            "units": dict(r.unit_counts),
            "hbm_read": r.hbm_read,
            "hbm_written": r.hbm_written,
        }
        if r.message and not r.ok:
            stats["message"] = r.message
        return stats

    def close(self) -> None:
        super().close()
        self.sim = None
