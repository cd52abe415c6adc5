"""The base of every block built for one core geometry."""

from amaranth.lib import wiring

from tandem.geometry import CoreGeometry, check_geometry

__all__ = ["GeometryComponent"]


class GeometryComponent(wiring.Component):
    """A ``wiring.Component`` for one :class:`~tandem.geometry.CoreGeometry`: the geometry is
    type-checked, kept, and read back through :attr:`geom`; ``members`` is the signature."""

    def __init__(self, geom: CoreGeometry, members):
        self._geom = check_geometry(geom)
        super().__init__(members)

    @property
    def geom(self) -> CoreGeometry:
        return self._geom
