"""The device backends by name: the one place that knows them all.

``BACKENDS`` maps a name to a :class:`~tandem.host.device.Device` class; :func:`open_device`
picks one, with no platform tests. This module imports the base and every backend module; the
backends import only the base (``device``), so there is no import cycle. Importing a backend
module is cheap: ``fpga`` imports pyopencl when a device is opened, ``rtldevice`` the simulator
harness when a run starts.
"""

from __future__ import annotations

from tandem.geometry import CoreGeometry

from .device import Device
from .fpga import FpgaDevice
from .model import ModelDevice
from .rtldevice import RtlDevice

BACKENDS: dict[str, type[Device]] = {cls.name: cls for cls in (ModelDevice, RtlDevice, FpgaDevice)}
"""Device backends by name: ``model`` (ISA simulator), ``rtl`` (Verilator), ``fpga`` (XRT)."""


def register(cls: type[Device]) -> type[Device]:
    """Class decorator: make another backend (a test double, say) available under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no backend name")
    BACKENDS[cls.name] = cls
    return cls


def open_device(backend: str, geom: CoreGeometry, **options) -> Device:
    """A new device of the named backend; ``options`` go to its constructor."""
    try:
        cls = BACKENDS[backend]
    except KeyError:
        raise ValueError(
            f"unknown device backend {backend!r}; available: {', '.join(sorted(BACKENDS))}"
        ) from None
    return cls(geom, **options)
