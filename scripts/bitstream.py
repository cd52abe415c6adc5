"""`make bitstream` / `make hw_emu`: every input of the Vitis RTL-kernel flow, then the tools.

From one geometry (default ``u55c``) this writes, under ``build/<geometry>/``:

- ``tandem_decode_core.v``  the kernel's Verilog (``tandem.rtl.core.verilog``);
- ``kernel.xml``            the kernel description: arguments, offsets and sizes from
                            :func:`tandem.regmap.arguments`, one ``m_axi`` port per HBM pointer;
- ``package_kernel.tcl``    Vivado: package the Verilog as an IP (``ipx::package_project``), check
                            the inferred bus interfaces against the Verilog ports, associate each
                            with ``ap_clk``, set the register map from the regmap, mark it an RTL
                            kernel, then ``package_xo``;
- ``link.cfg``              ``v++ --link`` connectivity: one ``sp=`` per ``m_axi`` port, each on its
                            own HBM pseudo-channel, and the post-system-link hook;
- ``post_sys_link.tcl``     that hook: forces each ``m_axi_hbm<ch>`` onto HBM switch port ``<ch>``,
                            the switch port of its own pseudo-channel (``sp=`` alone does not);
- ``impl.cfg``, ``impl_pre.tcl``, ``constraints/``  the placement hook from ``constraints/``, run
                            before ``opt_design`` (``-t hw`` only);
- ``build.sh``              the exact commands (``vivado``, ``v++``), the same list this script
                            runs.

It checks the generated files against each other and the register map (:func:`check_inputs`),
then runs the commands if ``vivado`` and ``v++`` are on PATH. If they are not, it stops with exit
code 3 and says what is missing; it never writes or claims an ``.xo`` or ``.xclbin`` itself.

Usage::

    python scripts/bitstream.py [--geometry u55c] [--platform NAME] [--target hw|hw_emu]
                                [--verilog-only] [--force-verilog]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python scripts/bitstream.py` from a checkout without install
    sys.path.insert(0, str(ROOT))

from tandem import regmap  # noqa: E402
from tandem.geometry import CoreGeometry, geometry  # noqa: E402

DEFAULT_PLATFORM = "xilinx_u55c_gen3x16_xdma_3_202210_1"
TOOL_RELEASE = "2022.2"
"""The Vitis/Vivado release paired with the 202210 platform; the flow is written for it. It has
not been run here: no machine of this project has the vendor tools."""

PART = "xcu55c-fsvh2892-2L-e"
HBM_PSEUDO_CHANNELS = 32
"""The U55C's HBM: 2 stacks x 16 pseudo-channels, ``HBM[0]`` .. ``HBM[31]`` in ``sp=``."""

VENDOR = "tandem.org"
LIBRARY = "RTLKernel"
VERSION = "1.0"

EXIT_TOOLS_MISSING = 3

MIN_CONTROL_RANGE = 0x1000
"""Address range declared for ``s_axi_control``. Vitis kernels (RTL wizard and HLS alike)
declare 4 KiB, the smallest segment Vivado's address editor assigns, even when the slave decodes
fewer bits; the RTL decodes the low log2(regmap.address_space_bytes) bits of it."""


def control_range(channels: int) -> int:
    return max(MIN_CONTROL_RANGE, regmap.address_space_bytes(channels))


POST_SYS_LINK = "post_sys_link.tcl"
KERNEL_FILES = (
    "kernel.xml",
    "package_kernel.tcl",
    "link.cfg",
    POST_SYS_LINK,
    "impl.cfg",
    "impl_pre.tcl",
)

POST_SYS_LINK_PARAM = "compiler.userPostSysLinkOverlayTcl"
"""The ``v++ --link`` parameter that runs a Tcl file on the block design after the system link
(``[advanced]`` ``param=`` in link.cfg); Vitis_Accel_Examples and the Vitis-AI DPU flows load
their ``hbm_memory_subsystem::force_kernel_port`` scripts through it."""
HMSS_CELL = "hmss_0"
"""The HBM memory subsystem's cell in the platform's block design, as the vendor scripts name it."""

SINGLE_PORTS = ("ap_clk", "ap_rst_n", "interrupt")
"""Top-level ports outside any AXI bus, named as Vitis requires."""

CONTROL_BUS = "s_axi_control"
_HBM_BUS = re.compile(r"m_axi_hbm(\d+)$")


class BuildError(RuntimeError):
    """The flow cannot produce consistent inputs (the message says why)."""


def _rel(path: Path) -> Path:
    """``path`` relative to the repository when inside it, for messages."""
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def _tcl_word(text: str) -> str:
    """``text`` as one Tcl word, with no substitution."""
    if "{" in text or "}" in text or "\\" in text:
        raise BuildError(f"cannot quote {text!r} for Tcl")
    return "{" + text + "}"


# ---- the top level --------------------------------------------------------------------------


def load_top():
    """``tandem.rtl.core``: the one place the flow finds the kernel's top level.

    It must provide ``DecodeCore``, ``TOPLEVEL`` (the module name, ``tandem_decode_core``) and
    ``verilog(geom)`` (the Verilog text with the Vitis port names)."""
    try:
        from tandem.rtl import core
    except ModuleNotFoundError as err:
        if err.name in ("tandem.rtl.core", "tandem.rtl"):
            raise BuildError(
                "rtl/core.py DecodeCore not available yet: the bitstream flow needs the kernel's "
                "top level (tandem.rtl.core.DecodeCore, TOPLEVEL and verilog(geom))"
            ) from err
        raise BuildError(f"rtl/core.py could not be imported: {err}") from err
    missing = [n for n in ("DecodeCore", "TOPLEVEL", "verilog") if not hasattr(core, n)]
    if missing:
        raise BuildError(
            f"rtl/core.py DecodeCore not available yet: tandem.rtl.core lacks {', '.join(missing)}"
        )
    return core


def _source_key(geom: CoreGeometry) -> str:
    """What the Verilog depends on: our Python sources, the geometry and the Amaranth version."""
    import amaranth

    h = hashlib.sha256(f"{geom!r} amaranth {amaranth.__version__}".encode())
    for folder in ("rtl", "tandem"):
        for path in sorted((ROOT / folder).glob("*.py")):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def write_verilog(geom: CoreGeometry, out: Path, *, force: bool = False) -> Path:
    """``out/<TOPLEVEL>.v``, regenerated unless the sources are unchanged since the last run."""
    core = load_top()
    path = out / f"{core.TOPLEVEL}.v"
    key_path = out / f"{core.TOPLEVEL}.v.key"
    key = _source_key(geom)
    if not force and path.is_file() and key_path.is_file() and key_path.read_text() == key:
        print(f"bitstream: {_rel(path)} is up to date")
        return path
    t0 = time.monotonic()
    text = core.verilog(geom)
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    key_path.write_text(key)
    print(
        f"bitstream: wrote {_rel(path)} ({len(text) / 1e6:.1f} MB, {time.monotonic() - t0:.0f} s)"
    )
    return path


# ---- ports ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Port:
    name: str
    direction: str  # "input" or "output"
    width: int


_PORT_DECL = re.compile(
    r"^\s*(input|output|inout)\s+(?:wire\s+|reg\s+)?(?:\[(\d+):(\d+)\]\s*)?(\w+)\s*;"
)


def parse_ports(verilog: str, module: str) -> list[Port]:
    """The ports of ``module`` as declared in ``verilog`` (Amaranth's one-declaration-per-line
    style: ``input [63:0] m_axi_hbm0_rdata;``)."""
    start = re.search(rf"^module\s+{re.escape(module)}\s*\(", verilog, re.M)
    if start is None:
        raise BuildError(f"no module {module!r} in the generated Verilog")
    end = verilog.find("\nendmodule", start.end())
    ports = []
    for line in verilog[start.end() : end].splitlines():
        m = _PORT_DECL.match(line)
        if m:
            direction, msb, lsb, name = m.groups()
            width = int(msb) - int(lsb) + 1 if msb is not None else 1
            ports.append(Port(name, direction, width))
    if not ports:
        raise BuildError(f"module {module!r} declares no ports")
    return ports


def group_ports(ports: list[Port]) -> dict[str, list[Port]]:
    """Ports by interface: ``ap_clk``, ``ap_rst_n``, ``interrupt``, ``s_axi_control`` and
    ``m_axi_hbm<ch>`` (AXI buses in Vitis's ``<bus>_<signal>`` naming). Any other port is an
    error: Vitis links only clock, reset, interrupt and bus interfaces."""
    groups: dict[str, list[Port]] = {}
    stray = []
    for p in ports:
        if p.name in SINGLE_PORTS:
            bus = p.name
        else:
            m = re.match(r"(s_axi_control|m_axi_hbm\d+)_[a-z]+$", p.name)
            if m is None:
                stray.append(p.name)
                continue
            bus = m.group(1)
        groups.setdefault(bus, []).append(p)
    if stray:
        raise BuildError(
            f"top-level ports outside any Vitis interface: {', '.join(stray)}; every port must "
            "be ap_clk, ap_rst_n, interrupt, s_axi_control_* or m_axi_hbm<ch>_*"
        )
    return groups


def hbm_buses(groups) -> list[str]:
    """``m_axi_hbm<ch>`` bus names in channel order."""
    buses = [b for b in groups if _HBM_BUS.match(b)]
    return sorted(buses, key=lambda b: int(_HBM_BUS.match(b).group(1)))


def hbm_channels(groups) -> list[tuple[str, int]]:
    """``(bus, pseudo-channel)`` for every ``m_axi`` port, in channel order: ``m_axi_hbm<ch>`` on
    ``HBM[<ch>]``. The one port-to-channel mapping of the flow: link.cfg's ``sp=`` lines and
    post_sys_link.tcl's switch ports are both written from it."""
    return [(bus, int(_HBM_BUS.match(bus).group(1))) for bus in hbm_buses(groups)]


def _width(groups, bus: str, signal: str) -> int:
    for p in groups[bus]:
        if p.name == f"{bus}_{signal}":
            return p.width
    raise BuildError(f"bus {bus} has no {signal} port")


# ---- kernel.xml -------------------------------------------------------------------------------


def cu_name(kernel: str) -> str:
    """The compute unit's instance name (``nk=`` in link.cfg); ``sp=`` lines refer to it."""
    return f"{kernel}_1"


def kernel_xml(geom: CoreGeometry, kernel: str, groups) -> str:
    """The kernel description ``package_xo -kernel_xml`` puts in the .xo, from the regmap."""
    root = ET.Element("root", versionMajor="1", versionMinor="6")
    k = ET.SubElement(
        root,
        "kernel",
        name=kernel,
        language="ip_c",
        vlnv=f"{VENDOR}:{LIBRARY}:{kernel}:{VERSION}",
        attributes="",
        preferredWorkGroupSizeMultiple="0",
        workGroupSize="1",
        interrupt="true",
        hwControlProtocol="ap_ctrl_hs",
    )
    ports = ET.SubElement(k, "ports")
    ET.SubElement(
        ports,
        "port",
        name=CONTROL_BUS,
        mode="slave",
        range=hex(control_range(geom.channels)),
        dataWidth="32",
        portType="addressable",
        base="0x0",
    )
    for bus in hbm_buses(groups):
        ET.SubElement(
            ports,
            "port",
            name=bus,
            mode="master",
            range="0xFFFFFFFFFFFFFFFF",
            dataWidth=str(_width(groups, bus, "rdata")),
            portType="addressable",
            base="0x0",
        )
    args = ET.SubElement(k, "args")
    for i, a in enumerate(regmap.arguments(geom.channels)):
        pointer = a.kind == "pointer"
        ET.SubElement(
            args,
            "arg",
            name=a.name,
            addressQualifier="1" if pointer else "0",
            id=str(i),
            port=a.port if pointer else CONTROL_BUS,
            size=hex(a.size),
            offset=hex(a.offset),
            hostOffset="0x0",
            hostSize=hex(a.size),
            type="void*" if pointer else "uint",
        )
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


# ---- package_kernel.tcl -----------------------------------------------------------------------


def _tcl_list(items) -> str:
    return "{" + " ".join(items) + "}"


def package_tcl(geom: CoreGeometry, kernel: str, groups) -> str:
    """The Vivado packaging script. Paths are relative to the script's own folder."""
    ctrl = regmap.CTRL
    hbm = hbm_buses(groups)
    axi_buses = [CONTROL_BUS, *hbm]
    freq_hz = round(geom.clock_mhz * 1e6)
    lines = [
        f"# Package {kernel} as a Vitis RTL kernel (.xo) for {DEFAULT_PLATFORM}-class platforms.",
        "# Generated by scripts/bitstream.py from the generated Verilog and tandem.regmap: do not",
        "# edit, run `make bitstream` again. Written for Vivado "
        f"{TOOL_RELEASE}; run: vivado -mode batch -source package_kernel.tcl",
        "",
        "set here [file normalize [file dirname [info script]]]",
        f"set kernel {kernel}",
        f"set part {PART}",
        "set ip_dir [file join $here ip]",
        "set xo_path [file join $here $kernel.xo]",
        "set kernel_xml [file join $here kernel.xml]",
        "",
        "# Every top-level port of the Verilog, by the bus interface Vivado must infer for it.",
        "set tandem_bus_ports [dict create]",
    ]
    for bus in axi_buses:
        names = sorted(p.name for p in groups[bus])
        lines.append(f"dict set tandem_bus_ports {bus} {_tcl_list(names)}")
    lines += [
        f"set tandem_single_ports {_tcl_list(SINGLE_PORTS)}",
        "",
        "create_project -force kernel_pack [file join $here vivado_pack] -part $part",
        "add_files -norecurse [file join $here $kernel.v]",
        "set_property top $kernel [current_fileset]",
        "update_compile_order -fileset sources_1",
        f"ipx::package_project -root_dir $ip_dir -vendor {VENDOR} -library {LIBRARY} "
        "-taxonomy /KernelIP -import_files -set_current false",
        "ipx::unload_core [file join $ip_dir component.xml]",
        "ipx::edit_ip_in_project -upgrade true -name kernel_edit "
        "-directory [file join $here vivado_edit] [file join $ip_dir component.xml]",
        "set core [ipx::current_core]",
        f"set_property version {VERSION} $core",
        "set_property core_revision 1 $core",
        "",
        "# Vivado infers the buses from the port names; stop here if it mapped any port elsewhere.",
        "dict for {bus ports} $tandem_bus_ports {",
        "    set bif [ipx::get_bus_interfaces -quiet $bus -of_objects $core]",
        '    if {$bif eq ""} { error "tandem: Vivado inferred no bus interface $bus" }',
        "    set mapped {}",
        "    foreach pm [ipx::get_port_maps -of_objects $bif] {",
        "        lappend mapped [get_property PHYSICAL_NAME $pm]",
        "    }",
        "    if {[lsort $mapped] ne [lsort $ports]} {",
        '        error "tandem: bus $bus maps ports {[lsort $mapped]}, expected {[lsort $ports]}"',
        "    }",
        "}",
        "foreach port $tandem_single_ports {",
        '    if {[ipx::get_ports -quiet $port -of_objects $core] eq ""} {',
        '        error "tandem: the IP has no port $port"',
        "    }",
        "}",
        "",
        "# Every AXI interface runs on ap_clk; ap_rst_n is its active-low reset.",
    ]
    for bus in axi_buses:
        lines.append(f"ipx::associate_bus_interfaces -busif {bus} -clock ap_clk $core")
    lines += [
        "ipx::associate_bus_interfaces -clock ap_clk -reset ap_rst_n $core",
        "# A bus parameter Vivado may already have inferred (POLARITY from the _n suffix): take",
        "# it if it is there, else add it (adding an existing one is an error in Vivado).",
        "proc tandem_bus_parameter {name bif} {",
        "    set p [ipx::get_bus_parameters -quiet $name -of_objects $bif]",
        '    if {$p eq ""} { set p [ipx::add_bus_parameter $name $bif] }',
        "    return $p",
        "}",
        "set rst_bif [ipx::get_bus_interfaces ap_rst_n -of_objects $core]",
        "set_property value ACTIVE_LOW [tandem_bus_parameter POLARITY $rst_bif]",
        "# The kernel clock the geometry targets; v++ --kernel_frequency sets the real one.",
        "set clk_freq [tandem_bus_parameter FREQ_HZ "
        "[ipx::get_bus_interfaces ap_clk -of_objects $core]]",
        f"set_property value {freq_hz} $clk_freq",
        "set_property value_resolve_type user $clk_freq",
        "",
        "# The control register map, offsets from tandem.regmap: the ap_ctrl_hs registers and the",
        "# arguments. The status registers after the arguments stay out: package_xo would turn",
        "# every register but CTRL, GIER, IP_IER and IP_ISR into a kernel argument.",
        f"set mem_map [ipx::add_memory_map -quiet {CONTROL_BUS} $core]",
        "set block [ipx::add_address_block -quiet reg0 $mem_map]",
        f"set_property range {control_range(geom.channels)} $block",
        "",
        "proc add_register {block name offset bits description} {",
        "    set reg [ipx::add_register -quiet $name $block]",
        "    set_property address_offset $offset $reg",
        "    set_property size $bits $reg",
        "    set_property description $description $reg",
        "    return $reg",
        "}",
        "proc add_field {reg name lsb width access} {",
        "    set field [ipx::add_field $name $reg]",
        "    set_property bit_offset $lsb $field",
        "    set_property bit_width $width $field",
        "    set_property access $access $field",
        "}",
        "proc add_arg_register {block name offset bits busif} {",
        '    set reg [add_register $block $name $offset $bits "kernel argument $name"]',
        '    if {$busif ne ""} {',
        "        set param [ipx::add_register_parameter -quiet ASSOCIATED_BUSIF $reg]",
        "        set_property value $busif $param",
        "    }",
        "}",
        "",
        f"set reg [add_register $block CTRL {ctrl.offset:#04x} 32 {_tcl_word(ctrl.doc)}]",
    ]
    for name, lsb, width in ctrl.fields:
        access = "read-write" if name in ("ap_start", "auto_restart") else "read-only"
        lines.append(f"add_field $reg {name.upper()} {lsb} {width} {access}")
    # The names Vitis's ap_ctrl_hs template gives GIER, IER and ISR; offsets from the regmap.
    for ip_name, reg in (("GIER", regmap.GIER), ("IP_IER", regmap.IER), ("IP_ISR", regmap.ISR)):
        lines.append(f"add_register $block {ip_name} {reg.offset:#04x} 32 {_tcl_word(reg.doc)}")
    for a in regmap.arguments(geom.channels):
        busif = a.port if a.kind == "pointer" else '""'
        lines.append(f"add_arg_register $block {a.name} {a.offset:#05x} {8 * a.size} {busif}")
    lines += [
        f"set_property slave_memory_map_ref {CONTROL_BUS} "
        f"[ipx::get_bus_interfaces {CONTROL_BUS} -of_objects $core]",
        "",
        "set_property sdx_kernel true $core",
        "set_property sdx_kernel_type rtl $core",
        "set_property supported_families { } $core",
        "set_property auto_family_support_level level_2 $core",
        "ipx::create_xgui_files $core",
        "ipx::update_checksums $core",
        "ipx::check_integrity -kernel $core",
        "ipx::save_core $core",
        "close_project -delete",
        "",
        "# kernel.xml carries the same offsets (generated from tandem.regmap); use it as is.",
        "package_xo -force -xo_path $xo_path -kernel_name $kernel -ip_directory $ip_dir "
        "-kernel_xml $kernel_xml",
        'puts "tandem: wrote $xo_path"',
        "",
    ]
    return "\n".join(lines)


# ---- v++ configuration --------------------------------------------------------------------------


def link_cfg(kernel: str, groups, out: Path) -> str:
    """Connectivity: one compute unit; port ``m_axi_hbm<ch>`` on pseudo-channel ``HBM[<ch>]``;
    and the post-system-link hook (``out/post_sys_link.tcl``, absolute) that pins each port to
    the HBM switch port of its pseudo-channel."""
    cu = cu_name(kernel)
    hook = (out / POST_SYS_LINK).resolve()
    lines = [
        "# v++ --link connectivity for the decode core. Generated by scripts/bitstream.py.",
        "# One sp= per AXI master, each on its own HBM pseudo-channel: channel ch of the HBM",
        "# image (tandem.layout) lives in HBM[ch]. sp= chooses the pseudo-channel, not the HBM",
        f"# switch port the master enters by; {POST_SYS_LINK} (loaded below) forces each port onto",
        "# the switch port of its own pseudo-channel, so the kernel's accesses stay off the",
        "# switch's lateral links.",
        "[connectivity]",
        f"nk={kernel}:1:{cu}",
    ]
    for bus, ch in hbm_channels(groups):
        lines.append(f"sp={cu}.{bus}:HBM[{ch}]")
    lines += [
        "",
        "# Runs on the block design after the system link; an absolute path, as v++ runs it from",
        "# its own folder.",
        "[advanced]",
        f"param={POST_SYS_LINK_PARAM}={hook}",
    ]
    return "\n".join(lines) + "\n"


def post_sys_link_tcl(kernel: str, groups) -> str:
    """The post-system-link hook: ``hbm_memory_subsystem::force_kernel_port`` for every
    ``m_axi_hbm<ch>``, to HBM switch port ``<ch>`` (:func:`hbm_channels`, as link.cfg's ``sp=``).
    Stops the link if ``hmss_0`` or a port's pin is not in the block design."""
    cu = cu_name(kernel)
    channels = hbm_channels(groups)
    if len(channels) == HBM_PSEUDO_CHANNELS:
        host_note = "# all 32 switch ports carry kernel masters here, so the host shares one."
    else:
        host_note = f"# {len(channels)} of the 32 switch ports carry kernel masters here."
    lines = [
        "# Runs on the block design after v++'s system link (link.cfg: [advanced]",
        f"# param={POST_SYS_LINK_PARAM}). Generated by scripts/bitstream.py from",
        "# the port-to-channel list of link.cfg's sp= lines: do not edit, run `make bitstream`.",
        "#",
        "# Why. sp=<cu>.m_axi_hbm<ch>:HBM[<ch>] chooses the pseudo-channel a port's buffer",
        "# lives in, not the port of the HBM's AXI switch the master enters by: the HBM memory",
        f"# subsystem ({HMSS_CELL}) picks a switch port for each master itself unless one is",
        "# forced. A master that enters at switch port M and reads pseudo-channel N in another",
        "# segment crosses the switch laterally, and lateral traffic loses up to 50% of its",
        '# throughput (PG276, "Lateral AXI Switch Access Throughput Loss"). So each',
        "# m_axi_hbm<ch> is forced here to switch port <ch>, the pseudo-channel of its sp= line",
        "# (the third argument, 1, keeps the port in the subsystem's traffic calculation, as in",
        "# the vendor examples).",
        "#",
        "# Left to the tools: the host's (PCIe DMA) master. hbm_memory_subsystem::force_host_port",
        "# is not called: which switch port the U55C shell's host uses is not published, and",
        host_note,
        "#",
        "# Check after linking, in the build folder:",
        "#   grep -r 'Forced kernel port' logs.hw _x.hw/link",
        '# shows one hbm_memory_subsystem INFO line per port, "Forced kernel port <the pin',
        f"# /{cu}/m_axi_hbm<ch>> through <{HMSS_CELL}> port <its S<nn>_AXI> to connect to",
        "# HBM port <ch> - traffic calculation = 1\": <ch> must be the port's own channel",
        "# (S<nn> is the subsystem's own slave port, not the switch port). In the implemented",
        f"# design each m_axi_hbm<ch> must drive {HMSS_CELL}/inst/path_<ch>.",
        "",
        f"set tandem_hmss [get_bd_cells -quiet {HMSS_CELL}]",
        "if {[llength $tandem_hmss] != 1} {",
        f'    error "tandem: no HBM memory subsystem {HMSS_CELL} in the block design; the '
        'platform is not the U55C HBM platform this hook is written for"',
        "}",
        "# The interface pin at path, or stop: forcing a pin that is not there would leave the",
        "# port to the tools' choice with only a message in the log.",
        "proc tandem_pin {path} {",
        "    set pin [get_bd_intf_pins -quiet $path]",
        "    if {[llength $pin] != 1} {",
        '        error "tandem: no interface pin $path in the block design; the compute unit and '
        'its ports must be named as in link.cfg"',
        "    }",
        "    return $pin",
        "}",
        "",
    ]
    for bus, ch in channels:
        lines.append(
            f"hbm_memory_subsystem::force_kernel_port [tandem_pin /{cu}/{bus}] {ch} 1 $tandem_hmss"
        )
    lines += [
        "",
        "validate_bd_design -force",
        f'puts "INFO: \\[tandem\\] forced {len(channels)} kernel ports of {cu} onto their HBM '
        'switch ports"',
        "",
    ]
    return "\n".join(lines)


def impl_cfg(out: Path) -> str:
    """Implementation-only settings (``-t hw``): the placement hook before opt_design."""
    hook = (out / "impl_pre.tcl").resolve()
    return (
        "# v++ --link settings for -t hw only. Generated by scripts/bitstream.py.\n"
        "# The hook needs an absolute path: Vivado runs it from its own run folder.\n"
        "[vivado]\n"
        f"prop=run.impl_1.STEPS.OPT_DESIGN.TCL.PRE={hook}\n"
    )


CONSTRAINT_FILES = ("floorplan.tcl",)


def _tcl_pairs(pairs) -> str:
    return "\n".join(f"    {{{a} {b}}}" for a, b in pairs)


def impl_pre_tcl(out: Path, kernel: str, geom: CoreGeometry) -> str:
    """The hook before opt_design: the compute unit's name, the floorplan's placement of every
    instance (``tandem.rtl.core.placement``) and its Laguna pairs (``sll_pairs``), then the
    constraint files. With a plan of one SLR (the test geometries) there is nothing to place."""
    from tandem.floorplan import for_geometry

    core = load_top()
    plan = for_geometry(geom)
    lines = [
        "# Runs before opt_design in the v++ implementation run (impl.cfg). Generated by",
        "# scripts/bitstream.py from tandem.floorplan and rtl/core.py (placement, sll_pairs):",
        f"# floorplan {plan.name!r}, {plan.stages_per_boundary} stages per SLR boundary.",
        f"set tandem_cu {cu_name(kernel)}",
    ]
    if plan.flat:
        lines.append(f"# floorplan {plan.name!r} has one SLR: nothing to place.")
        return "\n".join(lines) + "\n"
    lines += [
        "set tandem_placement {",
        _tcl_pairs(core.placement(plan)),
        "}",
        "set tandem_sll_pairs {",
        _tcl_pairs(core.sll_pairs(plan)),
        "}",
    ]
    for name in CONSTRAINT_FILES:
        lines.append(f"source {(out / 'constraints' / name).resolve()}")
    return "\n".join(lines) + "\n"


# ---- commands -----------------------------------------------------------------------------------


def kernel_frequency(geom: CoreGeometry) -> str:
    mhz = geom.clock_mhz
    return str(int(mhz)) if float(mhz).is_integer() else f"{mhz:g}"


def xclbin_name(target: str) -> str:
    return "tandem.xclbin" if target == "hw" else f"tandem.{target}.xclbin"


def commands(geom: CoreGeometry, kernel: str, platform: str, target: str) -> list[list[str]]:
    """The vendor commands, run in the build folder, in order."""
    cmds = [
        [
            "vivado",
            "-mode",
            "batch",
            "-nojournal",
            "-log",
            "package_kernel.log",
            "-source",
            "package_kernel.tcl",
        ]
    ]
    if target == "hw_emu":
        cmds.append(["emconfigutil", "--platform", platform, "--od", "."])
    link = [
        "v++",
        "--link",
        "-t",
        target,
        "--platform",
        platform,
        "--kernel_frequency",
        kernel_frequency(geom),
        "--config",
        "link.cfg",
    ]
    if target == "hw":
        link += ["--config", "impl.cfg"]
    link += [
        "--save-temps",
        "--temp_dir",
        f"_x.{target}",
        "--log_dir",
        f"logs.{target}",
        "--report_dir",
        f"reports.{target}",
        "-o",
        xclbin_name(target),
        f"{kernel}.xo",
    ]
    cmds.append(link)
    return cmds


def build_sh(cmds: list[list[str]], target: str) -> str:
    lines = [
        "#!/usr/bin/env bash",
        f"# The vendor steps of `make {'bitstream' if target == 'hw' else target}`, as "
        "scripts/bitstream.py runs them.",
        f"# Needs Vivado/Vitis {TOOL_RELEASE} and XRT sourced (see docs/build.md).",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        *(shlex.join(c) for c in cmds),
    ]
    return "\n".join(lines) + "\n"


def tool_names(target: str) -> list[str]:
    return ["vivado", "v++", *(["emconfigutil"] if target == "hw_emu" else [])]


def missing_tools_message(
    missing: list[str], out: Path, target: str, platform: str, geom_name: str = "u55c"
) -> str:
    rel = _rel(out)
    make_target = "bitstream" if target == "hw" else target
    if geom_name != "u55c":
        make_target += f" GEOMETRY={geom_name}"
    return "\n".join(
        [
            f"bitstream: {' and '.join(f'`{t}`' for t in missing)} not found on PATH, so nothing "
            "was built: no .xo, no .xclbin.",
            f"  The generated inputs are in {rel}/ (Verilog, kernel.xml, package_kernel.tcl, "
            "link.cfg, post_sys_link.tcl, impl.cfg, constraints/, build.sh).",
            f"  The flow is written for Vitis/Vivado {TOOL_RELEASE} with XRT (the release paired "
            f"with {platform}); it has not been run on this machine.",
            "  To build, on a machine with the tools:",
            f"    source /tools/Xilinx/Vitis/{TOOL_RELEASE}/settings64.sh   # vivado, v++, "
            "emconfigutil on PATH",
            "    source /opt/xilinx/xrt/setup.sh                    # sets XILINX_XRT",
            f"    make {make_target}        (or: bash {rel}/build.sh)",
        ]
    )


def find_platform(platform: str) -> Path | None:
    """The platform's .xpfm, as v++ would find it (a path, PLATFORM_REPO_PATHS, /opt/xilinx)."""
    p = Path(platform)
    if p.suffix == ".xpfm":
        return p if p.is_file() else None
    roots = [r for r in os.environ.get("PLATFORM_REPO_PATHS", "").split(":") if r]
    roots.append("/opt/xilinx/platforms")
    for root in roots:
        cand = Path(root) / platform / f"{platform}.xpfm"
        if cand.is_file():
            return cand
    return None


# ---- checks -------------------------------------------------------------------------------------


def check_inputs(geom: CoreGeometry, out: Path, kernel: str) -> list[str]:
    """Cross-check the generated files; returns the problems found (empty: consistent).

    - the Verilog has exactly ap_clk, ap_rst_n, interrupt, s_axi_control_* and one
      m_axi_hbm<ch>_* bus per channel, with 64-bit addresses and port_bits data;
    - every Verilog port is listed in package_kernel.tcl under its bus, and every AXI bus is
      associated with ap_clk there;
    - kernel.xml's arguments (name, offset, size, port, kind, order) and the TCL's registers equal
      tandem.regmap; kernel.xml lists each m_axi port once, as the port of exactly one pointer;
    - link.cfg has one sp= per m_axi port, each on a distinct existing HBM pseudo-channel;
    - post_sys_link.tcl forces every m_axi port once, to the HBM switch port equal to its sp=
      pseudo-channel, and link.cfg loads it (:func:`_check_switch_ports`).
    """
    problems: list[str] = []
    try:
        ports = parse_ports((out / f"{kernel}.v").read_text(), kernel)
        groups = group_ports(ports)
    except (BuildError, OSError) as err:
        return [str(err)]
    hbm = hbm_buses(groups)
    want_hbm = [f"m_axi_hbm{ch}" for ch in range(geom.channels)]
    if hbm != want_hbm:
        problems.append(f"Verilog m_axi buses {hbm} != one per channel {want_hbm}")
    for name in (*SINGLE_PORTS, CONTROL_BUS):
        if name not in groups:
            problems.append(f"Verilog has no {name} port(s)")
    for bus in hbm:
        for sig, want in (("araddr", 64), ("awaddr", 64), ("rdata", geom.port_bits)):
            try:
                w = _width(groups, bus, sig)
            except BuildError as err:
                problems.append(str(err))
                continue
            if w != want:
                problems.append(f"{bus}_{sig} is {w} bits, expected {want}")

    # package_kernel.tcl
    tcl = (out / "package_kernel.tcl").read_text()
    listed = {}
    for m in re.finditer(r"^dict set tandem_bus_ports (\S+) \{([^}]*)\}", tcl, re.M):
        listed[m.group(1)] = set(m.group(2).split())
    single = re.search(r"^set tandem_single_ports \{([^}]*)\}", tcl, re.M)
    single_ports = set(single.group(1).split()) if single else set()
    for p in ports:
        bus = p.name if p.name in SINGLE_PORTS else p.name.rsplit("_", 1)[0]
        where = single_ports if p.name in SINGLE_PORTS else listed.get(bus, set())
        if p.name not in where:
            problems.append(f"Verilog port {p.name} is not in package_kernel.tcl")
    for bus, names in listed.items():
        extra = names - {p.name for p in groups.get(bus, [])}
        if extra:
            problems.append(f"package_kernel.tcl lists ports of {bus} not in the Verilog: {extra}")
    associated = set(
        re.findall(r"^ipx::associate_bus_interfaces -busif (\S+) -clock ap_clk", tcl, re.M)
    )
    for bus in [CONTROL_BUS, *hbm]:
        if bus not in associated:
            problems.append(f"package_kernel.tcl does not associate {bus} with ap_clk")
    if not re.search(r"^ipx::associate_bus_interfaces -clock ap_clk -reset ap_rst_n", tcl, re.M):
        problems.append("package_kernel.tcl does not associate ap_rst_n with ap_clk")
    for prop in ("sdx_kernel true", "sdx_kernel_type rtl"):
        if not re.search(rf"^set_property {prop} \$core", tcl, re.M):
            problems.append(f"package_kernel.tcl does not set {prop}")
    tcl_regs = {
        m.group(1): (int(m.group(2), 16), int(m.group(3)), m.group(4))
        for m in re.finditer(
            r"^add_arg_register \$block (\S+) (0x[0-9a-f]+) (\d+) (\S+)", tcl, re.M
        )
    }
    args = regmap.arguments(geom.channels)
    for a in args:
        want = (a.offset, 8 * a.size, a.port if a.kind == "pointer" else '""')
        if tcl_regs.get(a.name) != want:
            problems.append(
                f"package_kernel.tcl register {a.name} is {tcl_regs.get(a.name)}, regmap {want}"
            )
    for name in set(tcl_regs) - {a.name for a in args}:
        problems.append(f"package_kernel.tcl has a register {name} that is not a regmap argument")

    # kernel.xml
    try:
        k = ET.parse(out / "kernel.xml").getroot().find("kernel")
    except (ET.ParseError, OSError) as err:
        return [*problems, f"kernel.xml: {err}"]
    if k is None or k.get("name") != kernel:
        problems.append(f"kernel.xml does not describe kernel {kernel}")
        return problems
    xml_ports = {p.get("name"): p for p in k.iter("port")}
    ctrl = xml_ports.get(CONTROL_BUS)
    if ctrl is None or ctrl.get("mode") != "slave":
        problems.append("kernel.xml has no slave s_axi_control port")
    elif int(ctrl.get("range"), 16) != control_range(geom.channels):
        problems.append(
            f"kernel.xml s_axi_control range {ctrl.get('range')} != "
            f"{control_range(geom.channels):#x}"
        )
    for bus in hbm:
        p = xml_ports.get(bus)
        if p is None or p.get("mode") != "master":
            problems.append(f"kernel.xml has no master port {bus}")
        elif int(p.get("dataWidth")) != _width(groups, bus, "rdata"):
            problems.append(f"kernel.xml {bus} dataWidth {p.get('dataWidth')} != Verilog")
    for name in set(xml_ports) - {CONTROL_BUS, *hbm}:
        problems.append(f"kernel.xml port {name} is not a Verilog bus")
    xml_args = list(k.iter("arg"))
    if len(xml_args) != len(args):
        problems.append(f"kernel.xml has {len(xml_args)} arguments, regmap {len(args)}")
    for i, (x, a) in enumerate(zip(xml_args, args, strict=False)):
        got = (
            x.get("name"),
            int(x.get("id")),
            int(x.get("offset"), 16),
            int(x.get("size"), 16),
            x.get("addressQualifier"),
            x.get("port"),
        )
        pointer = a.kind == "pointer"
        want = (
            a.name,
            i,
            a.offset,
            a.size,
            "1" if pointer else "0",
            a.port if pointer else CONTROL_BUS,
        )
        if got != want:
            problems.append(f"kernel.xml argument {i} is {got}, regmap {want}")
    pointer_ports = [x.get("port") for x in xml_args if x.get("addressQualifier") == "1"]
    for bus in hbm:
        if pointer_ports.count(bus) != 1:
            problems.append(
                f"kernel.xml: {pointer_ports.count(bus)} pointer arguments on {bus}, expected 1"
            )

    # link.cfg
    cfg = (out / "link.cfg").read_text()
    cu = cu_name(kernel)
    if not re.search(rf"^nk={re.escape(kernel)}:1:{re.escape(cu)}$", cfg, re.M):
        problems.append(f"link.cfg has no nk={kernel}:1:{cu}")
    sp = re.findall(r"^sp=([^.\s]+)\.(\S+):HBM\[(\d+)\]$", cfg, re.M)
    other_sp = [line for line in cfg.splitlines() if line.startswith("sp=")]
    if len(other_sp) != len(sp):
        problems.append("link.cfg has sp= lines that do not map a port to one HBM[n]")
    banks: dict[int, str] = {}
    mapped_ports = []
    for cu_got, port, bank in sp:
        bank = int(bank)
        if cu_got != cu:
            problems.append(f"link.cfg sp= names compute unit {cu_got}, expected {cu}")
        if not 0 <= bank < HBM_PSEUDO_CHANNELS:
            problems.append(f"link.cfg maps {port} to HBM[{bank}], the U55C has HBM[0..31]")
        if bank in banks:
            problems.append(f"link.cfg maps {port} and {banks[bank]} to the same HBM[{bank}]")
        banks[bank] = port
        mapped_ports.append(port)
    for bus in hbm:
        if mapped_ports.count(bus) != 1:
            problems.append(
                f"link.cfg has {mapped_ports.count(bus)} sp= lines for {bus}, expected 1"
            )
    for port in set(mapped_ports) - set(hbm):
        problems.append(f"link.cfg maps {port}, which is not an m_axi port of the Verilog")

    # post_sys_link.tcl, and link.cfg loading it
    sp_channel = {port: int(bank) for cu_got, port, bank in sp if cu_got == cu}
    problems += _check_switch_ports(out, kernel, hbm, sp_channel, cfg)
    return problems


_FORCE_LINE = re.compile(
    r"^hbm_memory_subsystem::force_kernel_port \[tandem_pin /([^/\s\]]+)/([^\s\]]+)\] (\d+) 1 "
    r"\$tandem_hmss$"
)


def _check_switch_ports(
    out: Path, kernel: str, hbm: list[str], sp_channel: dict[str, int], cfg: str
) -> list[str]:
    """post_sys_link.tcl forces every m_axi port exactly once, each to the HBM switch port equal
    to its ``sp=`` pseudo-channel (``sp_channel``), within 0..31 and no two ports on one; and
    link.cfg loads it by absolute path from its ``[advanced]`` section."""
    problems: list[str] = []
    cu = cu_name(kernel)

    # link.cfg: [advanced] param=compiler.userPostSysLinkOverlayTcl=<absolute path of the file>
    want_path = (out / POST_SYS_LINK).resolve()
    section = None
    hooks = []
    for line in cfg.splitlines():
        head = re.match(r"^\[(\w+)\]\s*$", line)
        if head:
            section = head.group(1)
        elif m := re.match(rf"^param={re.escape(POST_SYS_LINK_PARAM)}=(.*)$", line):
            hooks.append((section, m.group(1).strip()))
    if not hooks:
        problems.append(
            f"link.cfg does not load {POST_SYS_LINK}: no [advanced] "
            f"param={POST_SYS_LINK_PARAM}=<path>, so sp= alone would leave the HBM switch ports "
            "to the tools"
        )
    elif len(hooks) > 1:
        problems.append(f"link.cfg sets {POST_SYS_LINK_PARAM} {len(hooks)} times, expected once")
    for sec, path in hooks:
        if sec != "advanced":
            problems.append(
                f"link.cfg sets {POST_SYS_LINK_PARAM} in [{sec}], it belongs in [advanced]"
            )
        if not Path(path).is_absolute() or Path(path).resolve() != want_path:
            problems.append(
                f"link.cfg loads {path!r} as the post-system-link Tcl, expected the absolute "
                f"path {want_path}"
            )

    # post_sys_link.tcl
    try:
        tcl = (out / POST_SYS_LINK).read_text()
    except OSError as err:
        return [*problems, f"{POST_SYS_LINK}: {err}"]
    forced: dict[str, list[int]] = {}
    for number, line in enumerate(tcl.splitlines(), 1):
        if line.lstrip().startswith("#") or "force_kernel_port" not in line:
            continue
        m = _FORCE_LINE.match(line)
        if m is None:
            problems.append(
                f"{POST_SYS_LINK} line {number} is not of the form "
                "`hbm_memory_subsystem::force_kernel_port [tandem_pin /<cu>/<port>] "
                f"<switch port> 1 $tandem_hmss`: {line.strip()!r}"
            )
            continue
        cu_got, port, switch_port = m.group(1), m.group(2), int(m.group(3))
        if cu_got != cu:
            problems.append(
                f"{POST_SYS_LINK} line {number} forces a port of {cu_got}, the compute unit is {cu}"
            )
            continue
        if not 0 <= switch_port < HBM_PSEUDO_CHANNELS:
            problems.append(
                f"{POST_SYS_LINK} forces {port} to HBM switch port {switch_port}, the U55C's "
                f"switch has ports 0..{HBM_PSEUDO_CHANNELS - 1}"
            )
        forced.setdefault(port, []).append(switch_port)
    for bus in hbm:
        n = len(forced.get(bus, []))
        if n != 1:
            problems.append(f"{POST_SYS_LINK} forces {bus} {n} times, expected once")
    for port in forced:
        if port not in hbm:
            problems.append(
                f"{POST_SYS_LINK} forces {port}, which is not an m_axi port of the Verilog"
            )
    owner: dict[int, str] = {}
    for port, switch_ports in forced.items():
        for switch_port in dict.fromkeys(switch_ports):
            if owner.setdefault(switch_port, port) != port:
                problems.append(
                    f"{POST_SYS_LINK} forces {owner[switch_port]} and {port} to the same HBM "
                    f"switch port {switch_port}"
                )
            want = sp_channel.get(port)
            if want is not None and switch_port != want:
                problems.append(
                    f"{POST_SYS_LINK} forces {port} to HBM switch port {switch_port}, but link.cfg "
                    f"puts it on HBM[{want}]: a port must enter the switch at its own "
                    "pseudo-channel"
                )
    if not re.search(r"^validate_bd_design -force$", tcl, re.M):
        problems.append(f"{POST_SYS_LINK} does not end with validate_bd_design -force")
    return problems


# ---- the flow -----------------------------------------------------------------------------------


def generate(geom: CoreGeometry, out: Path, platform: str, target: str, *, force: bool) -> str:
    """Write every input into ``out``; returns the kernel name. Raises BuildError if the
    generated files disagree."""
    core = load_top()
    kernel = core.TOPLEVEL
    write_verilog(geom, out, force=force)
    groups = group_ports(parse_ports((out / f"{kernel}.v").read_text(), kernel))
    files = {
        "kernel.xml": kernel_xml(geom, kernel, groups),
        "package_kernel.tcl": package_tcl(geom, kernel, groups),
        "link.cfg": link_cfg(kernel, groups, out),
        POST_SYS_LINK: post_sys_link_tcl(kernel, groups),
        "impl.cfg": impl_cfg(out),
        "impl_pre.tcl": impl_pre_tcl(out, kernel, geom),
        "regmap.json": regmap.to_json(geom.channels),
        "build.sh": build_sh(commands(geom, kernel, platform, target), target),
    }
    for name, text in files.items():
        (out / name).write_text(text)
    (out / "build.sh").chmod(0o755)
    (out / "constraints").mkdir(exist_ok=True)
    for name in CONSTRAINT_FILES:
        shutil.copyfile(ROOT / "constraints" / name, out / "constraints" / name)
    problems = check_inputs(geom, out, kernel)
    if problems:
        raise BuildError("generated inputs are inconsistent:\n  " + "\n  ".join(problems))
    print(
        f"bitstream: inputs for {kernel} ({geom.name}: {geom.channels} x m_axi_hbm at "
        f"{geom.port_bits} bits, {kernel_frequency(geom)} MHz) in {_rel(out)}/, "
        "consistent with tandem.regmap"
    )
    return kernel


def run_tools(geom, out: Path, kernel: str, platform: str, target: str) -> int:
    missing = [t for t in tool_names(target) if shutil.which(t) is None]
    if missing:
        print(missing_tools_message(missing, out, target, platform, geom.name), file=sys.stderr)
        return EXIT_TOOLS_MISSING
    if not os.environ.get("XILINX_XRT"):
        print(
            "bitstream: XILINX_XRT is not set; source /opt/xilinx/xrt/setup.sh first "
            f"(inputs are in {out}/)",
            file=sys.stderr,
        )
        return EXIT_TOOLS_MISSING
    if find_platform(platform) is None:
        print(
            f"bitstream: platform {platform} not found in PLATFORM_REPO_PATHS or "
            "/opt/xilinx/platforms; install its development package (the .xpfm) or pass "
            f"PLATFORM=<path to .xpfm> (inputs are in {out}/)",
            file=sys.stderr,
        )
        return EXIT_TOOLS_MISSING
    for cmd in commands(geom, kernel, platform, target):
        print(f"bitstream: running {shlex.join(cmd)}", flush=True)
        t0 = time.monotonic()
        rc = subprocess.call(cmd, cwd=out)
        if rc != 0:
            print(
                f"bitstream: {cmd[0]} failed with exit code {rc}; see the logs in {out}/",
                file=sys.stderr,
            )
            return rc
        print(f"bitstream: {cmd[0]} finished in {(time.monotonic() - t0) / 60:.1f} min")
    print(f"bitstream: wrote {out / xclbin_name(target)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--geometry", default="u55c", help="core geometry (default u55c)")
    ap.add_argument("--platform", default=DEFAULT_PLATFORM, help="Vitis platform name or .xpfm")
    ap.add_argument("--target", choices=["hw", "hw_emu"], default="hw")
    ap.add_argument("--out", type=Path, help="build folder (default build/<geometry>)")
    ap.add_argument("--verilog-only", action="store_true", help="only write the Verilog")
    ap.add_argument("--force-verilog", action="store_true", help="regenerate the Verilog")
    args = ap.parse_args(argv)
    try:
        geom = geometry(args.geometry)
        out = (args.out or ROOT / "build" / geom.name).resolve()
        out.mkdir(parents=True, exist_ok=True)
        if args.verilog_only:
            write_verilog(geom, out, force=args.force_verilog)
            return 0
        kernel = generate(geom, out, args.platform, args.target, force=args.force_verilog)
    except (BuildError, ValueError) as err:
        print(f"bitstream: {err}", file=sys.stderr)
        return 1
    return run_tools(geom, out, kernel, args.platform, args.target)


if __name__ == "__main__":
    sys.exit(main())
