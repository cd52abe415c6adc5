# amaranth: UnusedElaboratable=no
"""The kernel shell (rtl/shell.py): AXI4-Lite control slave with the ap_ctrl_hs register map,
under cocotb on Verilator and Icarus (shell_tb.py), plus construction checks."""

from __future__ import annotations

from pathlib import Path

import pytest
from amaranth.back import verilog

from tandem import regmap
from tandem.geometry import geometry
from tandem.rtl.axi import vitis_ports
from tandem.rtl.shell import KernelShell, args_layout, status_layout
from tandem.sim import runner

TB = Path(__file__).with_name("shell_tb.py")


@pytest.mark.parametrize("sim", runner.simulators())
def test_shell(sim):
    geom = geometry("tiny")
    shell = KernelShell(geom)
    runner.run(
        shell,
        TB,
        name="shell-tiny",
        sim=sim,
        ports=vitis_ports(shell),
        params={"channels": geom.channels},
    )


@pytest.mark.parametrize("name", ["tiny", "u55c"])
def test_layouts_follow_regmap(name):
    geom = geometry(name)
    args = args_layout(geom.channels)
    assert [n for n, _ in args] == [a.name for a in regmap.arguments(geom.channels)]
    assert args.size == sum(8 * a.size for a in regmap.arguments(geom.channels))
    status = status_layout(geom.channels)
    assert [n for n, _ in status] == [
        r.name.lower() for r in regmap.status_registers(geom.channels)
    ]
    shell = KernelShell(geom)
    assert 1 << shell.addr_width == regmap.address_space_bytes(geom.channels)


def test_vitis_port_names():
    shell = KernelShell(geometry("tiny"))
    names = [n for n, _, _ in vitis_ports(shell)]
    for sig in ("awvalid", "awaddr", "wstrb", "bresp", "araddr", "rdata", "rresp"):
        assert f"s_axi_control_{sig}" in names
    text = verilog.convert(shell, ports=vitis_ports(shell), emit_src=False)
    assert "input [6:0] s_axi_control_awaddr" in text or "s_axi_control_awaddr;" in text


def test_rejects_non_geometry():
    with pytest.raises(TypeError, match="CoreGeometry"):
        KernelShell("tiny")
