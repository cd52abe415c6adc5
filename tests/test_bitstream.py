"""The `make bitstream` flow without vendor tools: generated inputs, their consistency, the stop.

One run of scripts/bitstream.py on the tiny geometry (a subprocess with no vendor tools on PATH)
produces the inputs every test here reads. Nothing here runs Vivado or v++.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tandem import regmap
from tandem.geometry import geometry

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "bitstream.py"
GEOM = geometry("tiny")
KERNEL = "tandem_decode_core"


def _load_script():
    spec = importlib.util.spec_from_file_location("tandem_bitstream", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bs = _load_script()

# elaborates the whole kernel (tiny) for the vendor flow: the whole-core tier
pytestmark = pytest.mark.core


def _env_without_tools() -> dict:
    """The environment with PATH cut down to Python's folder and the system's, no XRT."""
    env = {k: v for k, v in os.environ.items() if k not in ("XILINX_XRT", "XILINX_VIVADO")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), "/usr/bin", "/bin"])
    for tool in ("vivado", "v++"):
        assert shutil.which(tool, path=env["PATH"]) is None, f"{tool} found in {env['PATH']}"
    return env


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The entry point on the tiny geometry, without the tools: (CompletedProcess, folder)."""
    out = tmp_path_factory.mktemp("bitstream") / "tiny"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--geometry", "tiny", "--out", str(out)],
        env=_env_without_tools(),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    return proc, out


@pytest.fixture
def out(run):
    return run[1]


@pytest.fixture
def copy(out, tmp_path):
    """A private copy of the generated inputs, for tests that break them on purpose. The config
    files' absolute paths are moved to the copy, so the copy as it is passes the checker."""
    dst = tmp_path / "tiny"
    shutil.copytree(out, dst)
    for name in ("link.cfg", "impl.cfg"):
        text = (dst / name).read_text()
        (dst / name).write_text(text.replace(str(out.resolve()), str(dst.resolve())))
    return dst


def _ports(folder: Path):
    return bs.parse_ports((folder / f"{KERNEL}.v").read_text(), KERNEL)


# ---- the entry point ------------------------------------------------------------------------


def test_stops_without_tools_and_says_what_to_do(run):
    proc, out = run
    assert proc.returncode == bs.EXIT_TOOLS_MISSING, proc.stderr
    err = proc.stderr
    for needle in (
        "`vivado`",
        "`v++`",
        "not found on PATH",
        "nothing was built",
        "2022.2",
        "source /tools/Xilinx/Vitis/2022.2/settings64.sh",
        "source /opt/xilinx/xrt/setup.sh",
        "XILINX_XRT",
        "make bitstream GEOMETRY=tiny",
        str(out),
    ):
        assert needle in err, f"{needle!r} missing from:\n{err}"
    assert "consistent with tandem.regmap" in proc.stdout


def test_leaves_every_input_and_no_output(out):
    for name in (f"{KERNEL}.v", *bs.KERNEL_FILES, "build.sh", "regmap.json"):
        assert (out / name).is_file(), name
    for name in bs.CONSTRAINT_FILES:
        assert (out / "constraints" / name).read_bytes() == (
            ROOT / "constraints" / name
        ).read_bytes()
    assert not list(out.glob("*.xo")) and not list(out.glob("*.xclbin"))


def test_missing_core_is_a_clear_error(monkeypatch):
    import tandem.rtl

    monkeypatch.setitem(sys.modules, "tandem.rtl.core", None)
    monkeypatch.delattr(tandem.rtl, "core", raising=False)
    with pytest.raises(bs.BuildError, match=r"rtl/core\.py DecodeCore not available yet"):
        bs.load_top()


def test_kernel_name_is_the_host_backends():
    from tandem.host.fpga import KERNEL_NAME
    from tandem.rtl.core import TOPLEVEL

    assert TOPLEVEL == KERNEL_NAME == KERNEL


def test_makefile_targets_call_the_script():
    for target, flow in (("bitstream", "hw"), ("hw_emu", "hw_emu")):
        proc = subprocess.run(
            ["make", "-n", target, "GEOMETRY=tiny", "PLATFORM=p"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        assert f"scripts/bitstream.py --geometry tiny --platform p --target {flow}" in proc.stdout


# ---- consistency --------------------------------------------------------------------------------


def test_generated_inputs_are_consistent(out):
    assert bs.check_inputs(GEOM, out, KERNEL) == []


def test_every_port_is_in_the_tcl_and_every_master_in_the_link_config(out):
    ports = _ports(out)
    names = {p.name for p in ports}
    assert {"ap_clk", "ap_rst_n", "interrupt"} <= names
    tcl_words = set(re.findall(r"[\w+]+", (out / "package_kernel.tcl").read_text()))
    assert names <= tcl_words, names - tcl_words
    masters = {p.name.rsplit("_", 1)[0] for p in ports if p.name.startswith("m_axi_")}
    assert masters == {f"m_axi_hbm{ch}" for ch in range(GEOM.channels)}
    cfg = (out / "link.cfg").read_text()
    for bus in masters:
        assert re.search(rf"^sp={KERNEL}_1\.{bus}:HBM\[\d+\]$", cfg, re.M), bus


def test_each_master_on_its_own_pseudo_channel(out):
    sp = re.findall(r"^sp=\S+\.(m_axi_hbm\d+):HBM\[(\d+)\]$", (out / "link.cfg").read_text(), re.M)
    assert len(sp) == GEOM.channels
    banks = [int(b) for _, b in sp]
    assert len(set(banks)) == len(banks)
    assert {p for p, _ in sp} == {f"m_axi_hbm{ch}" for ch in range(GEOM.channels)}


def test_kernel_xml_arguments_equal_the_regmap(out):
    k = ET.parse(out / "kernel.xml").getroot().find("kernel")
    assert k.get("name") == KERNEL and k.get("hwControlProtocol") == "ap_ctrl_hs"
    got = [
        (a.get("name"), int(a.get("offset"), 16), int(a.get("size"), 16), a.get("port"))
        for a in k.iter("arg")
    ]
    want = [
        (a.name, a.offset, a.size, a.port if a.kind == "pointer" else "s_axi_control")
        for a in regmap.arguments(GEOM.channels)
    ]
    assert got == want
    ports = {p.get("name"): p for p in k.iter("port")}
    control_range = int(ports["s_axi_control"].get("range"), 16)
    assert control_range == max(0x1000, regmap.address_space_bytes(GEOM.channels))
    for ch in range(GEOM.channels):
        assert ports[f"m_axi_hbm{ch}"].get("dataWidth") == str(GEOM.port_bits)


def _replace(path: Path, old: str, new: str, count: int = 1):
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, count))


def test_checker_catches_a_wrong_kernel_xml_offset(copy):
    arg = regmap.arguments(GEOM.channels)[-1]
    _replace(copy / "kernel.xml", f'offset="{arg.offset:#x}"', f'offset="{arg.offset + 8:#x}"')
    problems = bs.check_inputs(GEOM, copy, KERNEL)
    assert any(
        f"kernel.xml argument {len(regmap.arguments(GEOM.channels)) - 1}" in p for p in problems
    )


def test_checker_catches_a_wrong_tcl_register(copy):
    arg = regmap.arguments(GEOM.channels)[0]
    _replace(copy / "package_kernel.tcl", f" {arg.name} {arg.offset:#05x} ", f" {arg.name} 0x100 ")
    assert any(f"register {arg.name}" in p for p in bs.check_inputs(GEOM, copy, KERNEL))


def test_checker_catches_a_shared_pseudo_channel(copy):
    _replace(copy / "link.cfg", "m_axi_hbm1:HBM[1]", "m_axi_hbm1:HBM[0]")
    assert any("same HBM[0]" in p for p in bs.check_inputs(GEOM, copy, KERNEL))


def test_checker_catches_a_port_without_sp(copy):
    _replace(copy / "link.cfg", f"sp={KERNEL}_1.m_axi_hbm2:HBM[2]\n", "")
    assert any("0 sp= lines for m_axi_hbm2" in p for p in bs.check_inputs(GEOM, copy, KERNEL))


def test_a_copy_is_consistent(copy):
    """The negative tests below break one thing in a copy; unbroken, the copy has no problem."""
    assert bs.check_inputs(GEOM, copy, KERNEL) == []


# ---- HBM switch ports (post_sys_link.tcl) -------------------------------------------------------

CU = f"{KERNEL}_1"


def _force_line(port: str, switch_port: int) -> str:
    return (
        f"hbm_memory_subsystem::force_kernel_port [tandem_pin /{CU}/{port}] {switch_port} 1 "
        "$tandem_hmss\n"
    )


def _sp_channels(folder: Path) -> dict[str, int]:
    cfg = (folder / "link.cfg").read_text()
    return {p: int(c) for p, c in re.findall(rf"^sp={CU}\.(\S+):HBM\[(\d+)\]$", cfg, re.M)}


def test_switch_ports_are_the_sp_pseudo_channels(out):
    """post_sys_link.tcl forces every m_axi port once, to the switch port of its sp= channel."""
    forced = re.findall(
        rf"^hbm_memory_subsystem::force_kernel_port \[tandem_pin /{CU}/(\S+)\] (\d+) 1 "
        r"\$tandem_hmss$",
        (out / "post_sys_link.tcl").read_text(),
        re.M,
    )
    sp = _sp_channels(out)
    assert len(sp) == GEOM.channels
    assert sorted((p, int(n)) for p, n in forced) == sorted(sp.items())
    assert "force_host_port" not in re.sub(
        r"(?m)^#.*$", "", (out / "post_sys_link.tcl").read_text()
    )


def test_link_config_loads_the_switch_port_tcl_by_absolute_path(out):
    cfg = (out / "link.cfg").read_text()
    advanced = cfg.split("[advanced]\n", 1)[1]
    hook = re.search(r"^param=compiler\.userPostSysLinkOverlayTcl=(.+)$", advanced, re.M).group(1)
    assert Path(hook).is_absolute() and Path(hook) == (out / "post_sys_link.tcl").resolve()
    assert "[" not in advanced  # no section after [advanced] takes the line away from it


TCL = "post_sys_link.tcl"


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        pytest.param(
            _force_line("m_axi_hbm1", 1),
            _force_line("m_axi_hbm1", 2),
            {
                f"{TCL} forces m_axi_hbm1 and m_axi_hbm2 to the same HBM switch port 2",
                f"{TCL} forces m_axi_hbm1 to HBM switch port 2, but link.cfg puts it on HBM[1]: "
                "a port must enter the switch at its own pseudo-channel",
            },
            id="wrong-switch-port",
        ),
        pytest.param(
            _force_line("m_axi_hbm2", 2),
            "",
            {f"{TCL} forces m_axi_hbm2 0 times, expected once"},
            id="missing-port",
        ),
        pytest.param(
            _force_line("m_axi_hbm3", 3),
            _force_line("m_axi_hbm3", 3) * 2,
            {f"{TCL} forces m_axi_hbm3 2 times, expected once"},
            id="duplicate-port",
        ),
        pytest.param(
            _force_line("m_axi_hbm3", 3),
            _force_line("m_axi_hbm3", 32),
            {
                f"{TCL} forces m_axi_hbm3 to HBM switch port 32, the U55C's switch has ports 0..31",
                f"{TCL} forces m_axi_hbm3 to HBM switch port 32, but link.cfg puts it on HBM[3]: "
                "a port must enter the switch at its own pseudo-channel",
            },
            id="port-out-of-range",
        ),
        pytest.param(
            _force_line("m_axi_hbm0", 0),
            _force_line("m_axi_hbm0", 0).replace(f"/{CU}/", "/other_kernel_1/"),
            {
                f"{TCL} line {{line}} forces a port of other_kernel_1, the compute unit is {CU}",
                f"{TCL} forces m_axi_hbm0 0 times, expected once",
            },
            id="other-compute-unit",
        ),
        pytest.param(
            _force_line("m_axi_hbm0", 0),
            _force_line("m_axi_hbm0", 0).replace("] 0 1 $", "] 0 0 $"),
            {
                f"{TCL} line {{line}} is not of the form `hbm_memory_subsystem::force_kernel_port "
                "[tandem_pin /<cu>/<port>] <switch port> 1 $tandem_hmss`: "
                + repr(_force_line("m_axi_hbm0", 0).replace("] 0 1 $", "] 0 0 $").strip()),
                f"{TCL} forces m_axi_hbm0 0 times, expected once",
            },
            id="malformed-line",
        ),
        pytest.param(
            "validate_bd_design -force\n",
            "",
            {f"{TCL} does not end with validate_bd_design -force"},
            id="no-validate",
        ),
    ],
)
def test_checker_catches_a_wrong_switch_port_tcl(copy, old, new, expected):
    """Each corruption of post_sys_link.tcl gives exactly its own problems (the copy unbroken
    has none: test_a_copy_is_consistent)."""
    text = (copy / TCL).read_text()
    assert text.count(old) == 1, old
    line = text[: text.index(old)].count("\n") + 1
    (copy / TCL).write_text(text.replace(old, new))
    problems = bs.check_inputs(GEOM, copy, KERNEL)
    assert sorted(problems) == sorted(p.replace("{line}", str(line)) for p in expected)


def test_checker_catches_a_missing_switch_port_tcl(copy):
    (copy / TCL).unlink()
    problems = bs.check_inputs(GEOM, copy, KERNEL)
    assert (
        len(problems) == 1 and problems[0].startswith(f"{TCL}: ") and "No such file" in problems[0]
    )


PARAM = "param=compiler.userPostSysLinkOverlayTcl="


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        pytest.param(
            lambda cfg, folder: re.sub(rf"^{re.escape(PARAM)}.*\n", "", cfg, flags=re.M),
            "link.cfg does not load post_sys_link.tcl: no [advanced] "
            "param=compiler.userPostSysLinkOverlayTcl=<path>, so sp= alone would leave the HBM "
            "switch ports to the tools",
            id="no-param",
        ),
        pytest.param(
            lambda cfg, folder: cfg.replace(f"{PARAM}{folder.resolve()}/", PARAM),
            "link.cfg loads 'post_sys_link.tcl' as the post-system-link Tcl, expected the "
            "absolute path {tcl}",
            id="relative-path",
        ),
        pytest.param(
            lambda cfg, folder: cfg.replace(str(folder.resolve()), "/elsewhere"),
            "link.cfg loads '/elsewhere/post_sys_link.tcl' as the post-system-link Tcl, expected "
            "the absolute path {tcl}",
            id="other-folder",
        ),
        pytest.param(
            lambda cfg, folder: cfg.replace("[advanced]\n", ""),
            "link.cfg sets compiler.userPostSysLinkOverlayTcl in [connectivity], it belongs in "
            "[advanced]",
            id="outside-advanced",
        ),
    ],
)
def test_checker_catches_a_link_config_without_the_switch_port_tcl(copy, edit, expected):
    cfg = (copy / "link.cfg").read_text()
    edited = edit(cfg, copy)
    assert edited != cfg
    (copy / "link.cfg").write_text(edited)
    problems = bs.check_inputs(GEOM, copy, KERNEL)
    assert problems == [expected.format(tcl=(copy / TCL).resolve())]


def test_checker_catches_a_port_missing_from_the_tcl(copy):
    _replace(copy / "package_kernel.tcl", " m_axi_hbm3_rlast", "")
    problems = bs.check_inputs(GEOM, copy, KERNEL)
    assert "Verilog port m_axi_hbm3_rlast is not in package_kernel.tcl" in problems


def test_checker_catches_a_bus_not_on_ap_clk(copy):
    _replace(
        copy / "package_kernel.tcl",
        "-busif m_axi_hbm0 -clock ap_clk",
        "-busif m_axi_hbm0 -clock clk2",
    )
    assert "package_kernel.tcl does not associate m_axi_hbm0 with ap_clk" in bs.check_inputs(
        GEOM, copy, KERNEL
    )


def test_checker_catches_a_stray_verilog_port(copy):
    _replace(copy / f"{KERNEL}.v", "  input ap_rst_n;", "  input ap_rst_n;\n  input debug_pin;")
    assert any("debug_pin" in p for p in bs.check_inputs(GEOM, copy, KERNEL))


# ---- Tcl ---------------------------------------------------------------------------------------

TCLSH = shutil.which("tclsh")
needs_tclsh = pytest.mark.skipif(TCLSH is None, reason="tclsh not installed (apt-get install tcl)")

# Stand-ins for the Vivado commands package_kernel.tcl uses; every call is printed. Anything else
# is an error, so a misspelt command fails here as it would in Vivado.
VIVADO_STUBS = r"""
proc unknown {args} { error "not a stubbed Vivado command: $args" }
proc record {args} { puts "CALL $args" }
proc positional {arglist} {
    set out {}
    set skip 0
    foreach a $arglist {
        if {$skip} { set skip 0; continue }
        if {$a eq "-of_objects"} { set skip 1; continue }
        if {[string match -* $a]} { continue }
        lappend out $a
    }
    return $out
}
namespace eval ipx {}
foreach cmd {create_project add_files update_compile_order close_project package_xo
             ipx::package_project ipx::unload_core ipx::edit_ip_in_project
             ipx::associate_bus_interfaces ipx::add_field ipx::create_xgui_files
             ipx::update_checksums ipx::check_integrity ipx::save_core} {
    proc $cmd {args} "record $cmd {*}\$args; return obj:$cmd"
}
# As Vivado: set_property on no object is an error ("expects at least one object").
proc set_property {args} {
    if {[lindex $args end] eq ""} { error "set_property [lrange $args 0 end-1]: no object" }
    record set_property {*}$args
}
proc current_fileset {args} { return sources_1 }
proc ipx::current_core {args} { return core }
proc ipx::get_bus_interfaces {args} { return "bif:[lindex [positional $args] 0]" }
proc ipx::get_port_maps {args} {
    set bif [lindex $args end]
    set ports [dict get $::tandem_bus_ports [string range $bif 4 end]]
    if {[info exists ::drop_port] && [lsearch $ports $::drop_port] >= 0} {
        set ports [lsearch -all -inline -not $ports $::drop_port]
    }
    return $ports
}
proc get_property {name obj} { return $obj }
proc ipx::get_ports {args} { return [lindex [positional $args] 0] }
# Bus parameters per interface; Vivado infers POLARITY on an _n reset (::inferred_params), and
# adding a parameter that exists is an error (with -quiet: an empty result instead).
if {![info exists ::inferred_params]} { set ::inferred_params {bif:ap_rst_n POLARITY} }
set ::bus_params $::inferred_params
proc ipx::get_bus_parameters {args} {
    set p [positional $args]
    set name [lindex $p 0]
    set bif [lindex $args end]
    foreach {b n} $::bus_params { if {$b eq $bif && $n eq $name} { return "param:$bif:$name" } }
    return {}
}
proc ipx::add_bus_parameter {args} {
    set p [positional $args]
    lassign $p name bif
    foreach {b n} $::bus_params {
        if {$b eq $bif && $n eq $name} {
            if {[lsearch $args -quiet] >= 0} { return {} }
            error "bus parameter $name exists on $bif"
        }
    }
    lappend ::bus_params $bif $name
    return "param:$bif:$name"
}
proc ipx::add_memory_map {args} { return map }
proc ipx::add_address_block {args} { return block }
proc ipx::add_register {args} { record ipx::add_register {*}$args; return "reg" }
proc ipx::add_register_parameter {args} { return regparam }
"""


def _tclsh(script: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``script`` as a file: tclsh exits non-zero on an uncaught error only then (reading
    stdin it reports the error and carries on)."""
    with tempfile.NamedTemporaryFile("w", suffix=".tcl", delete=False) as f:
        f.write(script)
    try:
        return subprocess.run([TCLSH, f.name], cwd=cwd, capture_output=True, text=True)
    finally:
        os.unlink(f.name)


@needs_tclsh
def test_tcl_is_complete_and_runs_against_stubbed_vivado(out):
    check = _tclsh(
        f"set f [open {{{out / 'package_kernel.tcl'}}}]; puts [info complete [read $f]]", out
    )
    assert check.stdout.strip() == "1", check.stderr
    proc = _tclsh(VIVADO_STUBS + f"source {{{out / 'package_kernel.tcl'}}}\n", out)
    assert proc.returncode == 0, proc.stderr
    calls = proc.stdout.splitlines()
    for bus in ["s_axi_control", *(f"m_axi_hbm{ch}" for ch in range(GEOM.channels))]:
        assert f"CALL ipx::associate_bus_interfaces -busif {bus} -clock ap_clk core" in calls
    assert "CALL set_property sdx_kernel true core" in calls
    assert "CALL set_property sdx_kernel_type rtl core" in calls
    xo = [c for c in calls if c.startswith("CALL package_xo")]
    assert len(xo) == 1 and f"-kernel_name {KERNEL}" in xo[0]
    assert f"-kernel_xml {out / 'kernel.xml'}" in xo[0]
    regs = [
        next(t for t in c.split()[2:] if not t.startswith("-"))
        for c in calls
        if c.startswith("CALL ipx::add_register ")
    ]
    assert regs == [
        "CTRL",
        "GIER",
        "IP_IER",
        "IP_ISR",
        *(a.name for a in regmap.arguments(GEOM.channels)),
    ]


@needs_tclsh
@pytest.mark.parametrize("inferred", ["", "bif:ap_rst_n POLARITY bif:ap_clk FREQ_HZ"])
def test_tcl_sets_bus_parameters_whether_or_not_vivado_inferred_them(out, inferred):
    """POLARITY and FREQ_HZ are set once each, on the parameter Vivado inferred or on a new one
    (the stubs fail on a duplicate parameter and on set_property with no object, as Vivado)."""
    stub = VIVADO_STUBS.replace(
        "if {![info exists ::inferred_params]}", f"set ::inferred_params {{{inferred}}}\nif {{0}}"
    )
    proc = _tclsh(stub + f"source {{{out / 'package_kernel.tcl'}}}\n", out)
    assert proc.returncode == 0, proc.stderr
    calls = proc.stdout.splitlines()
    assert "CALL set_property value ACTIVE_LOW param:bif:ap_rst_n:POLARITY" in calls
    assert "CALL set_property value 250000000 param:bif:ap_clk:FREQ_HZ" in calls


@needs_tclsh
def test_tcl_stops_when_vivado_maps_a_port_elsewhere(out):
    stub = VIVADO_STUBS + "set ::drop_port m_axi_hbm1_rdata\n"
    proc = _tclsh(stub + f"source {{{out / 'package_kernel.tcl'}}}\n", out)
    assert proc.returncode != 0
    assert "tandem: bus m_axi_hbm1 maps ports" in proc.stderr
    assert "CALL package_xo" not in proc.stdout


# Stand-ins for the placement commands, strict as Vivado: get_* with no match warns and returns
# nothing (no error with -quiet), and add_cells_to_pblock / set_property on nothing is an error.
# ::cells is the netlist: every instance of the placement and one register inside each.
PBLOCK_STUBS = r"""
proc unknown {args} { error "not a stubbed Vivado command: $args" }
proc get_pblocks {args} {
    set name [lindex $args end]
    if {[lsearch $::pblocks $name] >= 0} { return $name }
    if {[lsearch $args -quiet] < 0} {
        puts "WARNING: \[Vivado 12-1008\] No pblocks matched '$name'"
    }
    return {}
}
proc get_cells {args} {
    set i [lsearch $args -filter]
    if {$i < 0} { return [lindex $args end] }
    set filter [lindex $args [expr {$i + 1}]]
    if {[regexp {^NAME =~ (\S+) && PRIMITIVE_GROUP == REGISTER$} $filter -> glob]} {
        set found {}
        foreach c $::cells {
            if {[string match $glob $c] && [string match *_reg* $c]} { lappend found $c }
        }
    } elseif {[regexp {^NAME =~ (.*)$} $filter -> pattern] && [lsearch $args -regexp] >= 0} {
        set found [lsearch -all -inline -regexp $::cells "^${pattern}\$"]
    } else {
        error "get_cells stub: unsupported filter $filter"
    }
    if {$found eq {} && [lsearch $args -quiet] < 0} {
        puts "WARNING: \[Vivado 12-180\] No cells matched"
    }
    return $found
}
proc add_cells_to_pblock {pblock cells} {
    if {$pblock eq {} || $cells eq {}} { error "add_cells_to_pblock: expects at least one object" }
    puts "ADD $pblock $cells"
}
proc set_property {name value objects} {
    if {$objects eq {}} { error "set_property $name: no object" }
    foreach o $objects { puts "PROP $name $value $o" }
}
"""

CU_PATH = "level0_i/ulp/tandem_decode_core_1/inst"


@pytest.fixture(scope="module")
def u55c_hook(tmp_path_factory):
    """impl_pre.tcl for the u55c geometry (its floorplan), with the constraints beside it, and
    the placement it encodes."""
    from tandem.floorplan import U55C
    from tandem.rtl.core import placement, sll_pairs

    out = tmp_path_factory.mktemp("u55c")
    (out / "constraints").mkdir()
    for name in bs.CONSTRAINT_FILES:
        shutil.copyfile(ROOT / "constraints" / name, out / "constraints" / name)
    (out / "impl_pre.tcl").write_text(bs.impl_pre_tcl(out, KERNEL, geometry("u55c")))
    return out, placement(U55C), sll_pairs(U55C)


def _netlist(placed, *, drop=()):
    """A Tcl list of cells: every placed instance under the compute unit, a register in each,
    an unrelated kernel's namesake, and nested namesakes that must not be picked."""
    cells = []
    for path, _ in placed:
        if path in drop:
            continue
        cells += [f"{CU_PATH}/{path}", f"{CU_PATH}/{path}/q_reg"]
    cells += [f"{CU_PATH}/dma/ch0/dma", "level0_i/ulp/other_kernel_1/inst/dma"]
    return "{" + " ".join(cells) + "}"


def _run_floorplan(folder, placed, *, pblocks=(0, 1, 2), drop=()):
    script = PBLOCK_STUBS + (
        f"set ::pblocks {{{' '.join(f'pblock_dynamic_SLR{k}' for k in pblocks)}}}\n"
        f"set ::cells {_netlist(placed, drop=drop)}\n"
        f"source {{{folder / 'impl_pre.tcl'}}}\n"
    )
    return _tclsh(script, folder)


@needs_tclsh
def test_floorplan_places_every_instance_in_its_slr(u55c_hook):
    """Every block, relay stage, delay register and reset-tree register goes into the pblock of
    its SLR exactly once (the shallowest match: never the nested namesake), and each crossing
    pair of plain registers gets USER_SLL_REG on both ends."""
    folder, placed, pairs = u55c_hook
    proc = _run_floorplan(folder, placed)
    assert proc.returncode == 0, proc.stderr
    adds = [line.split(" ", 2)[1:] for line in proc.stdout.splitlines() if line.startswith("ADD")]
    assert adds == [[f"pblock_dynamic_SLR{slr}", f"{CU_PATH}/{path}"] for path, slr in placed]
    assert {path for path, _ in placed} >= {"dma", "mpu", "vpu", "xing_tiles/stage1"}
    sll = [
        line.split()[3]
        for line in proc.stdout.splitlines()
        if line.startswith("PROP USER_SLL_REG TRUE")
    ]
    assert sll == [f"{CU_PATH}/{p}/q_reg" for pair in pairs for p in pair]
    assert pairs and "INFO: [tandem] floorplan:" in proc.stdout


@needs_tclsh
def test_floorplan_stops_without_the_platforms_pblock(u55c_hook):
    folder, placed, _ = u55c_hook
    proc = _run_floorplan(folder, placed, pblocks=(0, 1))
    assert proc.returncode != 0
    assert "tandem: the platform has no pblock_dynamic_SLR2" in proc.stderr
    assert "ADD" not in proc.stdout  # nothing placed before the check


@needs_tclsh
def test_floorplan_stops_on_an_instance_it_cannot_find(u55c_hook):
    folder, placed, _ = u55c_hook
    proc = _run_floorplan(folder, placed, drop=("xing_tiles/stage1",))
    assert proc.returncode != 0
    assert "tandem: no cell xing_tiles/stage1 under tandem_decode_core_1" in proc.stderr


def test_floorplan_hook_for_one_slr_places_nothing(out):
    """The tiny geometry builds flat: the hook names the compute unit and sources nothing."""
    pre = (out / "impl_pre.tcl").read_text()
    assert f"set tandem_cu {KERNEL}_1" in pre
    assert "source" not in pre and "nothing to place" in pre


# Stand-ins for the block-design commands post_sys_link.tcl uses: get_bd_* find what ::bd_cells
# and ::bd_pins hold (nothing otherwise, as Vivado with -quiet); the HMSS helper prints each call.
HMSS_STUBS = r"""
proc unknown {args} { error "not a stubbed Vivado command: $args" }
proc get_bd_cells {args} {
    set name [lindex $args end]
    if {[lsearch -exact $::bd_cells $name] >= 0} { return "/$name" }
    return {}
}
proc get_bd_intf_pins {args} {
    set path [lindex $args end]
    if {[lsearch -exact $::bd_pins $path] >= 0} { return $path }
    return {}
}
namespace eval hbm_memory_subsystem {}
proc hbm_memory_subsystem::force_kernel_port {pin port traffic cell} {
    puts "FORCE $pin $port $traffic $cell"
}
proc validate_bd_design {args} { puts "VALIDATE $args" }
"""


def _run_switch_tcl(folder: Path, *, cells=("hmss_0",), drop=()):
    pins = [f"/{CU}/m_axi_hbm{ch}" for ch in range(GEOM.channels) if ch not in drop]
    script = HMSS_STUBS + (
        f"set ::bd_cells {{{' '.join(cells)}}}\n"
        f"set ::bd_pins {{{' '.join(pins)}}}\n"
        f"source {{{folder / 'post_sys_link.tcl'}}}\n"
    )
    return _tclsh(script, folder)


@needs_tclsh
def test_switch_port_tcl_forces_every_port_against_stubbed_vivado(out):
    proc = _run_switch_tcl(out)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    sp = _sp_channels(out)
    forces = [line for line in lines if line.startswith("FORCE")]
    assert forces == [f"FORCE /{CU}/{port} {ch} 1 /hmss_0" for port, ch in sp.items()]
    assert lines[len(forces)] == "VALIDATE -force"  # after every force
    assert (
        lines[-1]
        == f"INFO: [tandem] forced {GEOM.channels} kernel ports of {CU} onto their HBM switch ports"
    )


@needs_tclsh
def test_switch_port_tcl_stops_without_the_hbm_subsystem(out):
    proc = _run_switch_tcl(out, cells=("hmss_1",))
    assert proc.returncode != 0
    assert "tandem: no HBM memory subsystem hmss_0 in the block design" in proc.stderr
    assert "FORCE" not in proc.stdout


@needs_tclsh
def test_switch_port_tcl_stops_on_a_pin_it_cannot_find(out):
    proc = _run_switch_tcl(out, drop=(2,))
    assert proc.returncode != 0
    assert f"tandem: no interface pin /{CU}/m_axi_hbm2 in the block design" in proc.stderr
    assert "VALIDATE" not in proc.stdout


# ---- commands ----------------------------------------------------------------------------------


def test_link_commands_use_the_geometry_and_config(out):
    hw = bs.commands(GEOM, KERNEL, bs.DEFAULT_PLATFORM, "hw")
    assert hw[0][:3] == ["vivado", "-mode", "batch"] and "package_kernel.tcl" in hw[0]
    link = hw[-1]
    assert link[:4] == ["v++", "--link", "-t", "hw"]
    assert link[link.index("--kernel_frequency") + 1] == "250"
    assert link[link.index("--platform") + 1] == "xilinx_u55c_gen3x16_xdma_3_202210_1"
    configs = [link[i + 1] for i, a in enumerate(link) if a == "--config"]
    assert configs == ["link.cfg", "impl.cfg"]
    assert link[link.index("-o") + 1] == "tandem.xclbin" and link[-1] == f"{KERNEL}.xo"
    script = (out / "build.sh").read_text()
    assert "v++ --link -t hw " in script and "vivado -mode batch" in script
    emu = bs.commands(GEOM.replace(clock_mhz=300.0), KERNEL, "p", "hw_emu")
    assert [c[0] for c in emu] == ["vivado", "emconfigutil", "v++"]
    assert "impl.cfg" not in emu[-1] and emu[-1][emu[-1].index("-o") + 1] == "tandem.hw_emu.xclbin"
    assert emu[-1][emu[-1].index("--kernel_frequency") + 1] == "300"


def test_impl_hook_is_absolute_and_sources_the_constraints(out):
    cfg = (out / "impl.cfg").read_text()
    hook = re.search(r"^prop=run\.impl_1\.STEPS\.OPT_DESIGN\.TCL\.PRE=(.+)$", cfg, re.M).group(1)
    assert Path(hook).is_absolute() and Path(hook) == (out / "impl_pre.tcl").resolve()
    pre = out.parent / "u55c-hook" / "impl_pre.tcl"
    pre.parent.mkdir(exist_ok=True)
    pre.write_text(bs.impl_pre_tcl(pre.parent, KERNEL, geometry("u55c")))
    text = pre.read_text()
    assert f"set tandem_cu {KERNEL}_1" in text
    assert f"source {(pre.parent / 'constraints' / 'floorplan.tcl').resolve()}" in text
