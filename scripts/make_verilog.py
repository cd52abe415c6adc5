"""Write build/<geometry>/tandem_decode_core.v (and the register map as JSON) for each geometry.

Usage: python scripts/make_verilog.py [geometry ...]   (default: tiny u55c)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tandem import regmap
from tandem.geometry import geometry
from tandem.rtl.core import TOPLEVEL, verilog

ROOT = Path(__file__).resolve().parent.parent


def main(names: list[str]) -> None:
    for name in names or ["tiny", "u55c"]:
        geom = geometry(name)
        out = ROOT / "build" / name
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        text = verilog(geom)
        (out / f"{TOPLEVEL}.v").write_text(text)
        (out / "regmap.json").write_text(regmap.to_json(geom.channels))
        print(
            f"{out / (TOPLEVEL + '.v')}: {len(text) / 1e6:.1f} MB, "
            f"{geom.channels} x m_axi_hbm<ch> at {geom.port_bits} bits, "
            f"{time.monotonic() - t0:.0f} s"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
