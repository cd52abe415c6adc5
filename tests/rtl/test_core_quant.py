# amaranth: UnusedElaboratable=no
"""Quantized weights on the whole kernel (issue 17): W4 and W8 GPT-2 test models on the tiny
core, bit-exact with the ISA simulator, which is bit-exact with the faithful model
(tests/test_quant_isasim.py).

The cases run through core_tb.py's harness (AXI memory models, KernelDriver, every byte of
every channel, the status registers and the status record compared with IsaSim, AXI stalls on
every channel), with this file as the cocotb test module: :func:`core_quant_cases` gives
core_tb a ``compiled`` that also knows quantized models, named ``"<preset>/<format>"``
(``test-tiny/w4g64``, ``test-odd/w4g128``, ``test-tiny/w8``: :func:`quant_compiled`), then runs
the cases as core_tb's own test does. The Verilog and the build are test_core.py's
(``core-tiny``), so no extra build.

Coverage (the issue's verification list): W4 in groups of 64 and 128, W8 per channel, the odd
model (3 heads of 32 padded to 64, vocabulary 97) in W4, random AXI stalls, a quantized model
followed by an FP16 one with no reset in between (one core runs every format), on Verilator;
one short W4 case on Icarus in the default suite, the others on Icarus marked ``slow``, as
test_core.py does. And ``tandem generate --backend rtl`` on a W4 checkpoint folder (the rtl
device backend, sim/rtljob.py, Verilator).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import cocotb
import pytest
from test_core import _sims, _verilog

from tandem import isa
from tandem.checkpoint import lively_weights
from tandem.compiler import compile_model
from tandem.config import preset
from tandem.geometry import geometry
from tandem.qweights import PER_CHANNEL, quantize_weights
from tandem.rtl.core import TOPLEVEL
from tandem.sim import runner

pytestmark = pytest.mark.core

GEOM = geometry("tiny")
FORMAT = re.compile(r"w(?P<bits>[48])(?:g(?P<group>\d+))?")


def quant_spec(name: str) -> tuple[str, int | None, int | None]:
    """``"test-tiny/w4g64"`` -> (preset, bits, group); ``w8`` alone is per channel; a name
    without ``/`` is the FP16 model (bits and group None)."""
    base, _, fmt = name.partition("/")
    if not fmt:
        return base, None, None
    m = FORMAT.fullmatch(fmt)
    if m is None:
        raise ValueError(f"unknown weight format {fmt!r} in {name!r} (w4g64, w4g128, w8)")
    group = m["group"]
    return base, int(m["bits"]), PER_CHANNEL if group is None else int(group)


@functools.cache
def quant_weights(name: str):
    """(config, weights) of a case's model: core_tb's weights (``lively_weights`` seed 0),
    quantized by round to nearest (LM head included) when the name has a format."""
    base, bits, group = quant_spec(name)
    cfg = preset(base)
    w = lively_weights(cfg)
    if bits is not None:
        w = quantize_weights(w, cfg, bits=bits, group=group)
    return cfg, w


@functools.cache
def quant_compiled(name: str):
    """core_tb's ``compiled`` for quantized models too."""
    cfg, w = quant_weights(name)
    return compile_model(cfg, w, GEOM)


def run_quant_cases(sim, cases):
    """core_tb's cases with this module as the cocotb test module, on test_core's build."""
    runner.run(
        _verilog(),
        Path(__file__),
        name="core-tiny",
        sim=sim,
        toplevel=TOPLEVEL,
        params={"cases": cases},
        testcase="core_quant_cases",
        extra_env={"PYTHONUNBUFFERED": "1"},
    )


@cocotb.test()
async def core_quant_cases(dut):
    """core_tb's ``core_cases`` over :func:`quant_compiled` (inside the simulator)."""
    import core_tb

    core_tb.compiled = quant_compiled
    tb = core_tb.CoreTB(dut)
    await tb.reset()
    await tb.enable_interrupt()
    for k, case in enumerate(runner.tb_params()["cases"]):
        await tb.run_case(case, k)


# --------------------------------------------------------------------------------------------
# the cases

W4_TINY = [{"cfg": "test-tiny/w4g64", "prompt": [7], "n_new": 2, "want": "ok"}]
GROUPS = [
    {"cfg": "test-tiny/w4g64", "prompt": [1, 2], "n_new": 4, "stall": 0.3, "want": "ok"},
    {"cfg": "test-tiny/w4g128", "prompt": [5, 9], "n_new": 4, "want": "ok"},
    {"cfg": "test-tiny/w4g128", "prompt": [30], "n_new": 3, "stall": 0.3, "want": "ok"},
]
W8 = [
    {"cfg": "test-tiny/w8", "prompt": [4, 8], "n_new": 4, "want": "ok"},
    {"cfg": "test-tiny/w8", "prompt": [60], "n_new": 2, "stall": 0.3, "want": "ok"},
    # the FP16 model on the same core with no reset: the formats do not leak into each other
    {"cfg": "test-tiny", "prompt": [4, 8], "n_new": 2, "want": "ok"},
]
ODD = [
    {"cfg": "test-odd/w4g64", "prompt": [3, 14, 15], "n_new": 5, "stall": 0.3, "want": "ok"},
    {"cfg": "test-odd/w4g128", "prompt": [9, 2], "n_new": 3, "want": "ok"},
]
ALL = W4_TINY + GROUPS + W8 + ODD


def test_the_cases_are_quantized_and_lively():
    """No simulator: what makes the RTL cases tests of the quantized matrix unit. Every
    quantized model's program runs quantized MATVECs of its format (wfmt, wgroup), its image
    fits core_tb's memories (sized for the FP16 models), and on the ISA simulator each case
    ends ok with tokens that are not one repeated token (the whole prompt-and-generation path
    of a broken product would show)."""
    from tandem import layout as L
    from tandem.golden.isasim import IsaSim

    fp16 = max(quant_compiled(n).image.nbytes for n in ("test-tiny", "test-odd"))
    for name in sorted({c["cfg"] for c in ALL}):
        c = quant_compiled(name)
        _, bits, group = quant_spec(name)
        assert c.image.nbytes <= fp16 + 8192, name
        mats = [i for i in c.program if i.op is isa.Op.MATVEC]
        if bits is None:
            assert not any(i["wfmt"] for i in mats)
            continue
        # every weight matrix's product quantized (the attention products stay FP16)
        quant = [i for i in mats if i["wfmt"]]
        assert {i["wfmt"] for i in quant} == {L.wfmt_for(bits)}, name
        assert len(quant) >= 4 * preset(quant_spec(name)[0]).n_layer + 1, name
        groups = {isa.WGROUPS[i["wgroup"]] for i in quant}
        # the model's group where a row is wider than it; the whole row (None) elsewhere and
        # per channel (the attention c_proj of padded heads: groups of 64, one per head)
        assert (None if group == PER_CHANNEL else group) in groups, (name, groups)
    tokens = {}
    for case in ALL:
        c = quant_compiled(case["cfg"])
        image = L.HBMImage(GEOM, c.image.nbytes)
        image.data[:] = c.image.data
        c.write_prompt(image, case["prompt"])
        r = IsaSim(GEOM, image).run(c.args(len(case["prompt"]), case["n_new"]))
        assert r.ok, (case, r.message)
        tokens.setdefault(case["cfg"], []).extend(c.read_output(image, case["n_new"]))
    for name, toks in tokens.items():
        assert len(set(toks)) > 2 or "/" not in name, (name, toks)


def test_case_names():
    assert quant_spec("test-odd/w4g128") == ("test-odd", 4, 128)
    assert quant_spec("test-tiny/w8") == ("test-tiny", 8, PER_CHANNEL)
    assert quant_spec("test-tiny") == ("test-tiny", None, None)
    with pytest.raises(ValueError, match="unknown weight format 'w2'"):
        quant_spec("test-tiny/w2")


@pytest.mark.parametrize("sim", _sims(icarus_default=True))
def test_w4_tiny_prompt_1(sim):
    """test-tiny at W4 in groups of 64, one prompt token and two generated: the default suite's
    W4 case on each simulator."""
    run_quant_cases(sim, W4_TINY)


@pytest.mark.parametrize("sim", _sims())
def test_w4_groups_64_and_128_with_stalls(sim):
    """test-tiny at W4 in groups of 64 (8 tiles per scale beat) and of 128 (16), with and
    without random pauses on every AXI channel of all four memories and the control port."""
    run_quant_cases(sim, GROUPS)


@pytest.mark.parametrize("sim", _sims())
def test_w8_per_channel_then_fp16(sim):
    """test-tiny at W8 per output channel (32 tiles per scale beat), with and without stalls,
    then the FP16 model on the same core with no reset."""
    run_quant_cases(sim, W8)


@pytest.mark.parametrize("sim", _sims())
def test_odd_w4_with_stalls(sim):
    """The odd model (3 heads of 32 padded to 64, vocabulary 97: a last row block and a last
    scale run cut short) at W4 in groups of 64 under stalls, and in groups of 128."""
    run_quant_cases(sim, ODD)


# --------------------------------------------------------------------------------------------
# the rtl device backend (sim/rtljob.py in Verilator, the build of test_rtljob.py)


def test_cli_generate_backend_rtl_quantized(tmp_path, capsys):
    """``tandem generate --checkpoint W4_DIR --backend rtl``: the RTL core decodes the quantized
    folder to the faithful model's tokens (and the ISA simulator's)."""
    if "verilator" not in runner.simulators():
        pytest.skip("the rtl backend runs on Verilator; SIM selects another simulator")
    from tandem.checkpoint import load_checkpoint, save_quantized
    from tandem.golden.faithful import FaithfulModel
    from tandem.host.cli import main

    cfg, w = quant_weights("test-odd/w4g128")
    folder = save_quantized(tmp_path / "w4", cfg, w, bits=4, group=128)
    _, loaded = load_checkpoint(folder)
    want = FaithfulModel(cfg, loaded).generate([5, 6], 3)
    assert len(set(want)) > 1
    base = ["generate", "--checkpoint", str(folder), "--prompt-ids", "5,6", "--max-new-tokens", "3"]
    base += ["--geometry", "tiny"]
    assert main([*base, "--backend", "model"]) == 0
    model = capsys.readouterr().out.strip()
    assert model == ",".join(map(str, [5, 6, *want]))
    assert main([*base, "--backend", "rtl", "--progress"]) == 0, capsys.readouterr().err
    out, err = capsys.readouterr()
    assert out.strip() == model
    assert "[rtl] model" in err and "token 3/3" in err
