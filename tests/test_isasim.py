"""Compiled program on the ISA simulator == the hardware-faithful model, bit for bit.

Tokens, the LM head's input (read from VBUF after the run), its accumulators (the logits) and the
KV cache the program left in HBM are all compared. Then the ways a run can stop: context full, bad
arguments, illegal instructions, HBM and VBUF range, the watchdog.
"""

import functools
import threading

import numpy as np
import pytest

from tandem import isa
from tandem import layout as L
from tandem import numerics as nm
from tandem.checkpoint import lively_weights
from tandem.compiler import compile_model, head_groups
from tandem.config import preset
from tandem.geometry import geometry
from tandem.golden.faithful import FaithfulModel
from tandem.golden.isasim import IsaSim
from tandem.host.backends import open_device
from tandem.host.device import DeviceError
from tandem.host.model import ModelDevice
from tandem.host.runtime import RunError, Session, generate
from tandem.regmap import HaltCode, Status

CONFIGS = ["test-tiny", "test-odd"]
GEOMS = ["tiny", "small"]


@functools.cache
def model(name):
    cfg = preset(name)
    w = lively_weights(cfg)
    return cfg, w, FaithfulModel(cfg, w)


@functools.cache
def compiled(name, geom):
    cfg, w, _ = model(name)
    return compile_model(cfg, w, geometry(geom))


def fresh_image(c):
    img = L.HBMImage(c.geom, c.image.nbytes)
    img.data[:] = c.image.data
    return img


def run_sim(c, ids, n_new, **args):
    img = fresh_image(c)
    c.write_prompt(img, ids)
    sim = IsaSim(c.geom, img)
    result = sim.run({**c.args(len(ids), n_new), **args})
    return sim, result


def faithful(fm, ids, n_new):
    """Greedy decoding on the faithful model: (tokens, last StepResult, cache)."""
    cache = fm.new_cache()
    res = fm.prefill(ids, cache)
    tokens = [res.token]
    while len(tokens) < n_new:
        res = fm.step(tokens[-1], cache.n_tokens, cache)
        tokens.append(res.token)
    return tokens, res, cache


def check_kv(c, img, cache):
    """Every layer's K and V^T prefix in HBM equals the faithful cache placed by the layout."""
    t_len = cache.n_tokens
    for layer in range(c.cfg.n_layer):
        k = cache.k[layer, :, :t_len]  # [H, T, 64]
        v = cache.vt[layer, :, :, :t_len].transpose(0, 2, 1)  # [H, T, 64]
        kb, vb = L.pack_kv_prefix(c.geom, k, v)
        for part, want in (("k", kb), ("v", vb)):
            got = img.read_striped(c.layout[f"h.{layer}.{part}"].base, want.shape[1])
            assert np.array_equal(got, want), f"layer {layer} {part}"


@pytest.mark.parametrize("geom", GEOMS)
@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("prompt", [[7], [3, 1, 4, 1, 5, 9, 2, 6]], ids=["len1", "len8"])
def test_bit_exact_with_faithful_model(name, geom, prompt):
    cfg, _, fm = model(name)
    c = compiled(name, geom)
    n_new = 12
    sim, r = run_sim(c, prompt, n_new)
    assert r.ok, r.message
    assert r.halt_code == HaltCode.OK and r.tokens == n_new
    want, last, cache = faithful(fm, prompt, n_new)
    assert c.read_output(sim.image, n_new) == want
    assert len(set(want)) > 3  # the test weights keep decoding lively
    y = c.vbuf_map["y"]
    assert np.array_equal(sim.vbuf[y.addr : y.addr + cfg.n_embd], last.hidden16)
    acc, lam = sim.last_argmax
    assert lam == last.lam and np.array_equal(acc, last.acc)
    check_kv(c, sim.image, cache)
    rec = c.read_status(sim.image)
    assert rec == L.StatusRecord(0, r.pc, n_new, 0, 0)
    assert r.pc == c.labels["done"]
    # every position streamed every weight matrix once; the LM head ran once per new token
    positions = len(prompt) + n_new - 1
    assert r.op_counts["MATVEC"] == positions * cfg.n_layer * (4 + 2 * cfg.n_head) + n_new

    def streamed_bytes(region):  # whole tiles of `lanes` rows x 64 columns
        g = c.geom
        return -(-region.rows // g.lanes) * -(-region.cols // 64) * g.channels * g.beat_bytes

    per_position = sum(
        streamed_bytes(reg)
        for name, reg in c.layout.regions.items()
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))
    )
    streamed = positions * per_position + n_new * streamed_bytes(c.layout["lm_head"])
    assert streamed <= r.hbm_read < 1.2 * streamed


@pytest.mark.parametrize("geom", GEOMS)
@pytest.mark.parametrize("name", CONFIGS)
def test_generation_up_to_and_past_the_context(name, geom):
    cfg, _, fm = model(name)
    c = compiled(name, geom)
    prompt = list(range(5, 5 + cfg.n_ctx - 6))
    fit = cfg.n_ctx - len(prompt) + 1  # the last position processed is n_ctx - 1
    want, _, cache = faithful(fm, prompt, fit)
    sim, r = run_sim(c, prompt, fit)
    assert r.ok and c.read_output(sim.image, r.tokens) == want
    check_kv(c, sim.image, cache)
    assert cache.n_tokens == cfg.n_ctx
    # one token more would need position n_ctx: the core stops cleanly with what it has
    sim, r = run_sim(c, prompt, fit + 3)
    assert r.status == Status.PROGRAM_ERROR and r.halt_code == HaltCode.CONTEXT_FULL
    assert r.pc == c.labels["context_full"]
    assert r.tokens == fit and c.read_output(sim.image, r.tokens) == want
    rec = c.read_status(sim.image)
    assert (rec.status, rec.halt_code, rec.tokens) == (Status.PROGRAM_ERROR, 1, fit)


def test_hybrid_start_from_a_host_written_kv_prefix():
    """Positions below start_pos come from HBM (as the GPU prefill leaves them): the run
    continues exactly as if the core had processed them itself."""
    cfg, _, fm = model("test-odd")
    c = compiled("test-odd", "small")
    prompt = [11, 22, 33, 44, 55]
    want, _, _ = faithful(fm, prompt, 8)
    cache = fm.new_cache()
    first = fm.prefill(prompt, cache).token
    prefix = {}  # region base -> the prefix bytes of positions 0..4
    for layer in range(cfg.n_layer):
        kb, vb = L.pack_kv_prefix(
            c.geom, cache.k[layer, :, :5], cache.vt[layer, :, :, :5].transpose(0, 2, 1)
        )
        prefix[c.layout[f"h.{layer}.k"].base] = kb
        prefix[c.layout[f"h.{layer}.v"].base] = vb
    img = fresh_image(c)
    for base, chunk in prefix.items():
        img.write_striped(base, chunk)
    c.write_prompt(img, [*prompt, first])
    r = IsaSim(c.geom, img).run(c.args(prompt_len=6, n_new=7, start_pos=5))
    assert r.ok and c.read_output(img, 7) == want[1:]
    # the same through the runtime, on a device whose KV prefix the host wrote
    with Session(cfg, None, compiled=c) as s:
        for base, chunk in prefix.items():
            s.device.write_striped(base, chunk)
        res = s.generate([*prompt, first], 7, start_pos=5)
        assert res.tokens == want[1:] and res.positions == 7


@pytest.mark.parametrize(
    "args",
    [
        {"start_pos": 3, "prompt_len": 3},
        {"start_pos": 0, "prompt_len": 0},
        {"start_pos": 9, "prompt_len": 2},
    ],
)
def test_bad_arguments_halt(args):
    c = compiled("test-tiny", "tiny")
    _, r = run_sim(c, [1, 2, 3], 4, **args)
    assert r.status == Status.PROGRAM_ERROR and r.halt_code == HaltCode.BAD_ARGS
    assert r.tokens == 0 and r.pc == c.labels["bad_args"]


def test_token_out_of_vocabulary_halts():
    c = compiled("test-tiny", "tiny")
    _, r = run_sim(c, [1, c.cfg.n_vocab, 3], 4)
    assert r.halt_code == HaltCode.BAD_ARGS and r.tokens == 0


def test_zero_new_tokens_halts_at_once():
    c = compiled("test-tiny", "tiny")
    _, r = run_sim(c, [1, 2], 0)
    assert r.ok and r.tokens == 0 and r.op_counts.get("MATVEC", 0) == 0


def test_illegal_instruction_stops_with_its_pc():
    c = compiled("test-tiny", "tiny")
    img = fresh_image(c)
    c.write_prompt(img, [1, 2])
    pc = c.labels["step"] + 5
    img.write_channel(0, L.PROGRAM_BASE + pc * isa.WORD_BYTES, bytes(isa.WORD_BYTES))
    r = IsaSim(c.geom, img).run(c.args(2, 3))
    assert r.status == Status.ILLEGAL_INSTRUCTION and r.pc == pc and r.tokens == 0
    assert "unknown opcode 0x00" in r.message
    rec = c.read_status(img)
    assert (rec.status, rec.pc) == (Status.ILLEGAL_INSTRUCTION, pc)
    # reserved bits set in an otherwise legal word
    word = isa.encode(c.program[pc]) | (1 << 127)
    img.write_channel(0, L.PROGRAM_BASE + pc * isa.WORD_BYTES, word.to_bytes(16, "little"))
    r = IsaSim(c.geom, img).run(c.args(2, 3))
    assert r.status == Status.ILLEGAL_INSTRUCTION and r.pc == pc


def test_hbm_range():
    c = compiled("test-tiny", "tiny")
    limit = c.layout["wte"].base  # the control area only: the first embedding load is outside
    _, r = run_sim(c, [1, 2], 3, hbm_bytes=limit)
    first_loadv = next(pc for pc, i in enumerate(c.program) if i.op is isa.Op.LOADV)
    assert r.status == Status.HBM_RANGE and r.pc == first_loadv
    assert "hbm_bytes" in r.message
    # an hbm_bytes larger than the buffer: the memory answers DECERR
    _, r = run_sim(c, [1, 2], 3, hbm_bytes=c.image.nbytes + 4096)
    assert r.ok
    img = L.HBMImage(c.geom, c.layout["wte"].base)
    img.data[:] = c.image.data[:, : img.nbytes]
    r = IsaSim(c.geom, img).run({**c.args(1, 1), "hbm_bytes": c.image.nbytes})
    assert r.status == Status.AXI_ERROR


def small_program(text, geom="tiny", **kw):
    g = geometry(geom)
    img = L.HBMImage(g, 1 << 16)
    img.write_channel(0, L.PROGRAM_BASE, isa.encode_program(isa.assemble(text)))
    return IsaSim(g, img, **kw), img


def test_vbuf_range_and_watchdog():
    g = geometry("tiny")
    sim, _ = small_program(f"vset dst={g.vbuf_elems - 64} imm=1 len=65\nhalt")
    r = sim.run()
    assert r.status == Status.VBUF_RANGE and r.pc == 0
    sim, _ = small_program("seti rd=1 imm=1\nloop:\njmp target=loop", max_steps=1000)
    r = sim.run()
    assert r.status == Status.WATCHDOG and r.steps == 1000
    sim, _ = small_program("seti rd=1 imm=5\njmp target=9")  # off the end: erased memory
    r = sim.run()
    assert r.status == Status.ILLEGAL_INSTRUCTION and r.pc == 9


def test_scalar_semantics():
    sim, img = small_program(
        """
            ldarg rd=1 arg=2         # n_new
            seti rd=0 imm=5          # R0 stays 0
            addi rd=2 ra=0 imm=-1    # wraps to 0xFFFFFFFF
            blt ra=1 rb=2 target=big # unsigned compare: taken
            halt code=9
        big:
            seti rd=3 imm=0x40
            stw rs=2 line=0 ri=3     # byte 64*0 + 4*64 = 256
            ldw rd=4 line=4          # read it back from line 4
            stw rs=4 line=4 ri=1     # byte 256 + 4*n_new
            halt
        """
    )
    r = sim.run({"n_new": 3})
    assert r.ok and r.tokens == 2
    assert sim.regs[:5] == [0, 3, 0xFFFFFFFF, 0x40, 0xFFFFFFFF]
    assert img.read_channel(0, 256 + 12, 4) == b"\xff\xff\xff\xff"
    assert r.unit_counts == {"control": 6, "dma": 3, "mpu": 0, "vpu": 0}


def test_host_writes_invalidate_cached_weights():
    fm = model("test-tiny")[2]
    c = compiled("test-tiny", "tiny")
    dev = open_device("model", c.geom)
    dev.load(c.image)
    dev.write_tokens(c.layout, "prompt", [4, 5])
    dev.set_args(**c.args(2, 3))
    assert dev.run(timeout=60).status == 0
    assert dev.read_tokens(c.layout, 3) == fm.generate([4, 5], 3)
    lm = c.layout["lm_head"]
    dev.write_striped(lm.base, np.zeros((c.geom.channels, lm.nbytes), np.uint8))
    assert dev.run(timeout=60).tokens == 3
    assert dev.read_tokens(c.layout, 3) == [0, 0, 0]  # all logits +0: the lowest index wins
    with pytest.raises(DeviceError, match="no scalar argument"):
        dev.set_args(n_tokens=3)


def test_runtime_generate_and_errors():
    cfg, w, fm = model("test-odd")
    got = []
    res = generate(cfg, w, [1, 2, 3], 6, "tiny", progress=lambda i, t: got.append((i, t)))
    assert res.tokens == fm.generate([1, 2, 3], 6)
    assert got == list(enumerate(res.tokens))
    assert set(res.timings) >= {"compile", "load", "decode"} and res.status.tokens == 6
    with pytest.raises(ValueError, match="exceeds the context of 48"):
        generate(cfg, w, [1] * 40, 10, "tiny")
    with pytest.raises(ValueError, match="out of range"):
        generate(cfg, w, [1, 97], 1, "tiny")
    c = compiled("test-odd", "tiny")
    with Session(cfg, None, compiled=c) as s:
        assert s.generate([1, 2, 3], 2).tokens == res.tokens[:2]
        pc = c.labels["next"] - 1  # after the first token's STW
        s.device.write_channel(0, L.PROGRAM_BASE + pc * isa.WORD_BYTES, bytes(isa.WORD_BYTES))
        with pytest.raises(RunError, match="ILLEGAL_INSTRUCTION") as err:
            s.generate([1, 2, 3], 2)
        assert err.value.tokens == res.tokens[:1]
        assert f"at instruction {pc}, after 1 tokens" in str(err.value)


def test_device_contract():
    c = compiled("test-tiny", "tiny")
    dev = ModelDevice(c.geom)
    with pytest.raises(DeviceError, match="no image"):
        dev.read_status()
    with pytest.raises(ValueError, match="unknown device backend 'gpu'"):
        open_device("gpu", c.geom)
    dev.load(c.image)
    assert dev.read_striped(0, 64).shape == (c.geom.channels, 64)
    dev.write_tokens(c.layout, "prompt", [1])
    dev.set_args(**c.args(1, 30))
    release = threading.Event()
    run = dev.sim.run
    dev.sim.run = lambda *a: release.wait() and run(*a)
    dev.start()
    with pytest.raises(DeviceError, match="running"):
        dev.write_channel(0, 0, b"x")
    with pytest.raises(TimeoutError):
        dev.wait(timeout=0.01)
    release.set()
    rec = dev.wait(timeout=60)
    assert rec.status == 0 and rec.tokens == 30
    assert dev.last_result.tokens == 30


def run_both_ways(c, ids, n_new):
    """The program with attention heads batched and one instruction at a time."""
    out = []
    for batch in (True, False):
        img = fresh_image(c)
        c.write_prompt(img, ids)
        sim = IsaSim(c.geom, img, batch_heads=batch)
        out.append((sim, sim.run(c.args(len(ids), n_new)), img))
    return out


@pytest.mark.parametrize("geom", GEOMS)
def test_batched_heads_equal_one_instruction_at_a_time(geom):
    c = compiled("test-odd", geom)
    (a, ra, ia), (b, rb, ib) = run_both_ways(c, [3, 1, 4], 9)
    assert a.batched_groups == 11 * c.cfg.n_layer and b.batched_groups == 0
    assert ra == rb and a.regs == b.regs
    assert np.array_equal(a.vbuf, b.vbuf) and np.array_equal(ia.data, ib.data)


@pytest.mark.parametrize(
    "name, n_ctx, groups",
    [("test-odd", 1024, [1, 1, 1]), ("test-odd", 512, [2, 1]), ("test-tiny", 1280, [1, 1])],
)
def test_heads_in_groups_when_the_vbuf_is_short(name, n_ctx, groups):
    """A context too long for every head's scores in the VBUF splits the heads into groups;
    bit-exact with the faithful model, batched or not."""
    cfg = preset(name).replace(n_ctx=n_ctx)
    w = lively_weights(cfg)
    c = compile_model(cfg, w, geometry("tiny"))
    assert [len(g) for g in head_groups(cfg, c.vbuf_map)] == groups
    prompt, n_new = [3, 1, 4], 9
    (a, ra, ia), (b, rb, ib) = run_both_ways(c, prompt, n_new)
    assert ra.ok and ra == rb and a.regs == b.regs
    assert a.batched_groups == len(groups) * cfg.n_layer * (len(prompt) + n_new - 1)
    assert np.array_equal(a.vbuf, b.vbuf) and np.array_equal(ia.data, ib.data)
    want, _, cache = faithful(FaithfulModel(cfg, w), prompt, n_new)
    assert c.read_output(ia, n_new) == want
    check_kv(c, ia, cache)


def test_non_finite_values_propagate_alike():
    """An embedding that overflows binary16 turns the residual stream to Inf/NaN: both ways of
    running the program and the faithful model agree on every bit (NaN is canonical)."""
    cfg = preset("test-odd")
    w = lively_weights(cfg)
    w["wpe.weight"] = w["wpe.weight"].copy()
    w["wpe.weight"][2, 5] = 1e6  # position 2: +Inf in binary16
    c = compile_model(cfg, w, geometry("tiny"))
    (a, ra, ia), (b, rb, ib) = run_both_ways(c, [3, 1, 4, 1], 4)
    assert ra.ok and ra == rb and np.array_equal(a.vbuf, b.vbuf)
    assert np.array_equal(ia.data, ib.data)
    tokens, last, cache = faithful(FaithfulModel(cfg, w), [3, 1, 4, 1], 4)
    assert c.read_output(ia, 4) == tokens
    y = c.vbuf_map["y"]
    assert np.array_equal(a.vbuf[y.addr : y.addr + cfg.n_embd], last.hidden16)
    check_kv(c, ia, cache)
    kv = ia.read_striped(c.layout["h.0.v"].base, c.layout["h.0.v"].nbytes)
    assert (kv.view(np.uint16) == 0x7E00).any()  # NaN reached the V cache


@pytest.mark.long
def test_gpt2_on_u55c_bit_exact_with_faithful_model():
    """The real shapes: gpt2 (124M, 12 layers, vocab 50,257) compiled for the u55c geometry
    (32 channels, 16,384-bit tiles) and run by the ISA simulator for a few positions equals the
    faithful model in tokens, the final hidden state and every layer's KV bytes."""
    cfg = preset("gpt2")
    w = lively_weights(cfg, seed=2)
    c = compile_model(cfg, w, geometry("u55c"))
    prompt, n_new = [464, 3290, 318], 3
    sim, r = run_sim(c, prompt, n_new)
    assert r.ok, r.message
    fm = FaithfulModel(cfg, w)
    want, last, cache = faithful(fm, prompt, n_new)
    assert c.read_output(sim.image, n_new) == want
    y = c.vbuf_map["y"]
    assert np.array_equal(sim.vbuf[y.addr : y.addr + cfg.n_embd], last.hidden16)
    check_kv(c, sim.image, cache)


# ----------------------------------------------------------------------------------------------
# forwarding MATVEC: the last live row from the VBUF (tandem.isa)

FWD_LINE = 1024  # matrices after the instruction memory's words (tiny: 32 KiB from PROGRAM_BASE)


def fwd_sim(text, mats=(), vbuf=None, **kw):
    """The tiny core with ``text`` in its program, dense matrices ``mats`` ((line, bits) pairs)
    in HBM and ``vbuf`` ((address, bits) pairs) in its vector buffer."""
    g = geometry("tiny")
    img = L.HBMImage(g, 1 << 19)
    img.write_channel(0, L.PROGRAM_BASE, isa.encode_program(isa.assemble(text)))
    for line, bits in mats:
        img.write_striped(line * isa.LINE, L.pack_tiled(g, bits))
    sim = IsaSim(g, img, **kw)
    for addr, bits in vbuf or ():
        sim.vbuf[addr : addr + len(bits)] = bits
    return sim


def fp16_values(rng, shape, scale=1.0):
    return nm.to_bits((rng.standard_normal(shape) * scale).astype(np.float32))


def product(k_bits, x_bits):
    """matvec_fp16 of a whole matrix (the reference for a live product)."""
    return nm.matvec_fp16(nm.PreparedMatrix(k_bits), x_bits)


@pytest.mark.parametrize("t", [1, 2, 37, 64, 65, 128])
@pytest.mark.parametrize("cols", [64, 40])
def test_forwarding_matvec_takes_the_last_live_row_from_the_vbuf(t, cols):
    """Row T-1 comes from VBUF[src + R[sreg]], the other live rows from HBM; the HBM row T-1
    differs, so the product differs from the same one without forwarding exactly in row T-1.
    Columns past ``cols`` of the forwarded VBUF row do not count."""
    rng = np.random.default_rng(t * 100 + cols)
    k = fp16_values(rng, (128, cols))
    q, row = fp16_values(rng, 64), fp16_values(rng, 64)  # row[cols:] is not zero: ignored
    src, off, dst = 192, 1024, 2048
    text = f"""
        seti rd=2 imm={t}
        seti rd=14 imm={off}
        matvec dst={dst} src={src} line={FWD_LINE} rows=128 cols={cols} flags=LIVE_ROWS lreg=2 sreg=SREG
        halt
    """  # noqa: E501
    out = {}
    for sreg in (14, 0):
        sim = fwd_sim(
            text.replace("SREG", str(sreg)), [(FWD_LINE, k)], [(src, q), (src + off, row)]
        )
        r = sim.run()
        assert r.ok, r.message
        out[sreg] = sim.vbuf[dst : dst + t].copy()
        assert r.hbm_read == -(-t // 2) * sim.geom.channels * sim.geom.beat_bytes  # every tile
    patched = k[:t].copy()
    patched[t - 1] = row[:cols]
    assert np.array_equal(out[14], product(patched, q[:cols]))
    assert np.array_equal(out[0], product(k[:t], q[:cols]))
    assert np.array_equal(out[14][:-1], out[0][:-1]) and out[14][-1] != out[0][-1]


@pytest.mark.parametrize("axis", ["row", "column"])
def test_forwarding_matvec_operand_errors(axis):
    """R[sreg] not a multiple of 64, or the forwarded row VBUF[src + R[sreg]:][:64] (LIVE_ROWS)
    or column VBUF[dst + R[sreg]:][:64] (LIVE_COLS) past the VBUF, is VBUF_RANGE at the MATVEC's
    pc, checked only when a row or column is live; the last row of the VBUF may be forwarded. A
    column counts from dst: src + R[sreg] past the VBUF does not matter."""
    g = geometry("tiny")
    row = axis == "row"
    src, dst = (128, 1024) if row else (1024, 128)
    m = fp16_values(np.random.default_rng(3), (64, 64))
    x = fp16_values(np.random.default_rng(5), 64)
    flags = "LIVE_ROWS" if row else "LIVE_COLS"

    def run(t, off):
        text = f"""
            seti rd=3 imm={t}
            seti rd=5 imm={off}
            vset dst={dst} imm=0x1234 len=64
            matvec dst={dst} src={src} line={FWD_LINE} rows=64 cols=64 flags={flags} lreg=3 sreg=5
            halt
        """
        sim = fwd_sim(text, [(FWD_LINE, m)], [(src, x)])
        return sim, sim.run()

    base = src if row else dst
    last = g.vbuf_elems - 64 - base
    for off in (32, 1, last + 64, last + 32, (1 << 32) - 64):
        _, r = run(5, off)
        assert r.status == Status.VBUF_RANGE and r.pc == 3, (off, r.message)
        assert f"forwarded {axis}" in r.message
    sim, r = run(5, last)
    assert r.ok
    fwd = sim.vbuf[base + last : base + last + 64]
    live = m[:5].copy() if row else m[:, :5].copy()
    want = product(live, x) if row else product(live, x[:5])
    patched = live.copy()
    if row:
        patched[4] = fwd
    else:
        patched[:, 4] = fwd
    got = sim.vbuf[dst : dst + len(want)]
    assert np.array_equal(got, product(patched, x if row else x[:5]))
    assert not np.array_equal(got, want)  # the HBM row or column would give another product
    # none live: nothing forwarded, nothing checked; no row is written, no column gives +0
    for off in (32, last + 64):
        sim, r = run(0, off)
        assert r.ok and (sim.vbuf[dst : dst + 64] == (0x1234 if row else 0)).all()


@pytest.mark.parametrize("t", [1, 2, 37, 64, 65, 128])
@pytest.mark.parametrize("rows, bias", [(64, False), (40, True)])
def test_forwarding_matvec_takes_the_last_live_column_from_the_vbuf(t, rows, bias):
    """LIVE_COLS: column T-1 comes from VBUF[dst + R[sreg]] (dst, not src: a decoy at
    src + R[sreg] is not used), the other live columns from HBM; the HBM column T-1 differs, so
    the product differs from the same one without forwarding. Rows past ``rows`` of the
    forwarded VBUF row do not count; the bias at dst is read as without forwarding."""
    rng = np.random.default_rng(t * 100 + rows)
    v = fp16_values(rng, (rows, 128))
    x, col, decoy = fp16_values(rng, 128), fp16_values(rng, 64), fp16_values(rng, 64)
    b = fp16_values(rng, rows)
    src, off, dst = 256, 1024, 2048
    flags = "LIVE_COLS|BIAS" if bias else "LIVE_COLS"
    text = f"""
        seti rd=2 imm={t}
        seti rd=15 imm={off}
        matvec dst={dst} src={src} line={FWD_LINE} rows={rows} cols=128 flags={flags} lreg=2 sreg=SREG
        halt
    """  # noqa: E501
    out = {}
    for sreg in (15, 0):
        vb = [(src, x), (dst, b), (dst + off, col), (src + off, decoy)]
        sim = fwd_sim(text.replace("SREG", str(sreg)), [(FWD_LINE, v)], vb)
        r = sim.run()
        assert r.ok, r.message
        out[sreg] = sim.vbuf[dst : dst + rows].copy()
        g = sim.geom
        assert r.hbm_read == -(-rows // g.lanes) * -(-t // 64) * g.channels * g.beat_bytes
    patched = v[:, :t].copy()
    patched[:, t - 1] = col[:rows]
    bias_bits = b if bias else None
    assert np.array_equal(out[15], nm.matvec_fp16(nm.PreparedMatrix(patched), x[:t], bias_bits))
    assert np.array_equal(out[0], nm.matvec_fp16(nm.PreparedMatrix(v[:, :t]), x[:t], bias_bits))
    assert not np.array_equal(out[15], out[0])  # the stale HBM column gives another product
    from_src = patched.copy()
    from_src[:, t - 1] = decoy[:rows]
    assert not np.array_equal(
        out[15], nm.matvec_fp16(nm.PreparedMatrix(from_src), x[:t], bias_bits)
    )


@pytest.mark.parametrize(
    "flags, rows, cols, wfmt",
    [
        (0, 64, 64, 0),  # neither LIVE_ROWS nor LIVE_COLS
        (isa.MatFlag.BIAS, 64, 64, 0),
        (isa.MatFlag.LIVE_ROWS | isa.MatFlag.LIVE_COLS, 64, 64, 0),
        (isa.MatFlag.LIVE_ROWS, 64, 0, 0),
        (isa.MatFlag.LIVE_ROWS, 64, 65, 0),
        (isa.MatFlag.LIVE_COLS, 0, 64, 0),  # a forwarded column of no rows
        (isa.MatFlag.LIVE_COLS, 65, 64, 0),
        (isa.MatFlag.LIVE_COLS, 128, 64, 0),
        (0, 64, 64, 1),  # a quantized one, legal without sreg
        (0, 64, 64, 2),
    ],
)
def test_illegal_forwarding_matvec_stops_the_run(flags, rows, cols, wfmt):
    """A word that would be a forwarding MATVEC of an illegal form is ILLEGAL_INSTRUCTION at its
    pc; with ARGMAX the same sreg is the sampling register and the word is legal."""
    g = geometry("tiny")
    base = isa.make(  # legal: sreg = 0
        isa.Op.MATVEC,
        src=64,
        line=FWD_LINE,
        rows=rows,
        cols=cols,
        flags=flags,
        lreg=2,
        wfmt=wfmt,
    )

    def shift(name):
        fmt = isa.FORMATS[isa.Op.MATVEC]
        return 8 + sum(f.width for f in fmt[: [f.name for f in fmt].index(name)])

    for argmax, status in ((0, Status.ILLEGAL_INSTRUCTION), (isa.MatFlag.ARGMAX, Status(0))):
        word = isa.encode(base) | 14 << shift("sreg") | int(argmax) << shift("flags")
        img = L.HBMImage(g, 1 << 19)
        prog = [isa.make(isa.Op.SETI, rd=2, imm=3), isa.make(isa.Op.HALT)]
        raw = isa.encode_program(prog[:1]) + word.to_bytes(16, "little")
        img.write_channel(0, L.PROGRAM_BASE, raw + isa.encode_program(prog[1:]))
        r = IsaSim(g, img).run()
        assert r.status == status and (status == 0 or r.pc == 1), r.message


H_FWD = 3
V_OFF = 1024  # the value products' forwarded columns: att_h + V_OFF


def head_group_text(sregs, t, off, c=128, v_sregs=(0,) * H_FWD, v_off=V_OFF):
    """One attention head group in the compiler's normative form (the batched path's), H_FWD
    heads: q_h at 64h, k_h at 64h + off, scores at 1024 + c*i, scalars at 1600 + 64i, outputs at
    2048 + 64h, v_h at 2048 + 64h + v_off, one at 2560; K_h and V^T_h dense in HBM. The score
    products' sreg of head h is ``sregs[h]`` (R14 = off), the value products' ``v_sregs[h]``
    (R15 = v_off)."""
    ds = L.dense_stride(geometry("tiny"))
    kb = L.tiled_bytes(geometry("tiny"), c, 64) // isa.LINE
    k_line = [FWD_LINE + 2 * h * kb for h in range(H_FWD)]
    v_line = [FWD_LINE + (2 * h + 1) * kb for h in range(H_FWD)]
    s = [1024 + c * i for i in range(H_FWD)]
    sc = [1600 + 64 * i for i in range(H_FWD)]
    att = [2048 + 64 * i for i in range(H_FWD)]
    one, hs = 2560, range(H_FWD)
    lines = [f"seti rd=2 imm={t}", f"seti rd=14 imm={off}", f"seti rd=15 imm={v_off}"]
    lines += [f"vset dst={one} imm=0x3c00 len=1"]
    lines += [
        f"matvec dst={s[h]} src={64 * h} line={k_line[h]} rows={c} cols=64 stride={ds} "
        f"flags=LIVE_ROWS lreg=2 sreg={sregs[h]}"
        for h in hs
    ]
    lines += [f"vmax dst={sc[h]} a={s[h]} lreg=2" for h in hs]
    lines += [f"vsub dst={s[h]} a={s[h]} b={sc[h]} flags=B_SCALAR lreg=2" for h in hs]
    lines += [f"vexp dst={s[h]} a={s[h]} lreg=2" for h in hs]
    lines += [f"vdot dst={sc[h]} a={s[h]} b={one} flags=B_SCALAR lreg=2" for h in hs]
    lines += [f"vrecip dst={sc[h]} a={sc[h]} len=1" for h in hs]
    lines += [
        f"matvec dst={att[h]} src={s[h]} line={v_line[h]} rows=64 cols={c} stride={ds} "
        f"flags=LIVE_COLS lreg=2 sreg={v_sregs[h]}"
        for h in hs
    ]
    lines += [f"vmul dst={att[h]} a={att[h]} b={sc[h]} len=64 flags=B_SCALAR" for h in hs]
    return "\n".join([*lines, "halt"]), k_line, v_line, att


V_PC = 4 + 6 * H_FWD  # head_group_text's first value product (its first score product: 4)


def head_group_run(
    sregs,
    t,
    off=192,
    batch=True,
    patch_hbm=(),
    seed=5,
    v_sregs=(0,) * H_FWD,
    v_off=V_OFF,
):
    """Run :func:`head_group_text` on random K, V, q, k rows and v columns whose HBM row or
    column t-1 differs from the VBUF's (``patch_hbm``: "k" makes the HBM rows equal to the VBUF
    rows, "v" the HBM columns to the VBUF columns). Returns (sim, result, att)."""
    rng = np.random.default_rng(seed)
    text, k_line, v_line, att = head_group_text(sregs, t, off, v_sregs=v_sregs, v_off=v_off)
    ks = [fp16_values(rng, (128, 64)) for _ in range(H_FWD)]
    vs = [fp16_values(rng, (64, 128)) for _ in range(H_FWD)]
    q, rows = fp16_values(rng, 64 * H_FWD, 0.3), fp16_values(rng, (H_FWD, 64))
    cols = fp16_values(rng, (H_FWD, 64))
    if "k" in patch_hbm:
        for k, row in zip(ks, rows, strict=True):
            k[t - 1] = row
    if "v" in patch_hbm:
        for v, col in zip(vs, cols, strict=True):
            v[:, t - 1] = col
    mats = list(zip(k_line, ks, strict=True)) + list(zip(v_line, vs, strict=True))
    vb = [(0, q)] + [(64 * h + off, rows[h]) for h in range(H_FWD) if 64 * h + off < 4096]
    vb += [(a + v_off, cols[h]) for h, a in enumerate(att) if a + v_off < 4096]
    sim = fwd_sim(text, mats, vb, batch_heads=batch)
    r = sim.run()
    return sim, r, np.concatenate([sim.vbuf[a : a + 64] for a in att])


@pytest.mark.parametrize("t", [1, 2, 64, 100, 128])
@pytest.mark.parametrize("parts", ["k", "v", "kv"])
def test_forwarding_head_group_batched_equals_one_instruction_at_a_time(t, parts):
    """The batched head group forwards row T-1 of every head's K ("k": the score products) and
    column T-1 of every head's V^T ("v": the value products) as the instructions do: same VBUF,
    registers and status both ways; the same as the non-forwarding group over an HBM whose row
    or column T-1 is the VBUF's; not the same as the non-forwarding group over the HBM as it
    is."""
    fwd = {"sregs": [14 if "k" in parts else 0] * H_FWD}
    fwd["v_sregs"] = [15 if "v" in parts else 0] * H_FWD
    a, ra, att_a = head_group_run(t=t, batch=True, **fwd)
    b, rb, _ = head_group_run(t=t, batch=False, **fwd)
    assert ra.ok and ra == rb and a.regs == b.regs
    assert a.batched_groups == 1 and b.batched_groups == 0
    assert np.array_equal(a.vbuf, b.vbuf)
    for batch in (True, False):
        c, rc, att_c = head_group_run([0] * H_FWD, t, batch=batch, patch_hbm=parts)
        assert rc.ok and c.batched_groups == int(batch) and np.array_equal(att_c, att_a)
        _, _, att_d = head_group_run([0] * H_FWD, t, batch=batch)
        # forwarding was not ignored (one position's softmax is 1 whatever its score, but its
        # output is V's column 0)
        assert np.array_equal(att_d, att_a) == (t == 1 and parts == "k")


def test_forwarding_head_group_mixed_or_out_of_range_runs_one_by_one():
    """Score products, or value products, that do not all forward with one sreg are not
    batched (and give what the instructions give); a bad forwarding offset stops at the first
    product it concerns, batched or not."""
    ok = [14] * H_FWD
    for sregs, v_sregs in (
        ([14, 0, 14], ok),
        ([14, 13, 14], ok),
        (ok, [15, 0, 15]),
        (ok, [0, 0, 15]),
        (ok, [15, 13, 15]),
    ):
        a, ra, _ = head_group_run(sregs, 50, batch=True, v_sregs=v_sregs)
        b, rb, _ = head_group_run(sregs, 50, batch=False, v_sregs=v_sregs)
        assert ra.ok and ra == rb and a.batched_groups == 0 and np.array_equal(a.vbuf, b.vbuf)
    # one sreg for the score and the value products (R14 = 192 = both offsets): batched, equal
    one_reg = {"v_sregs": ok, "v_off": 192}
    a, ra, _ = head_group_run(ok, 50, batch=True, **one_reg)
    b, rb, _ = head_group_run(ok, 50, batch=False, **one_reg)
    assert ra.ok and ra == rb and a.batched_groups == 1 and np.array_equal(a.vbuf, b.vbuf)
    for off in (96, 4096 - 128):  # not a multiple of 64; head 2's row past the VBUF
        for batch in (True, False):
            sim, r, _ = head_group_run(ok, 50, off=off, batch=batch)
            first = 4 + (2 if off == 4096 - 128 else 0)
            assert r.status == Status.VBUF_RANGE and r.pc == first, (off, batch, r.message)
            assert "forwarded row" in r.message and sim.batched_groups == 0
    # not a multiple of 64; head 2's column past the VBUF (att_2 = 2176)
    for v_off in (96, 4096 - 2176):
        for batch in (True, False):
            sim, r, _ = head_group_run(ok, 50, batch=batch, v_sregs=[15] * H_FWD, v_off=v_off)
            first = V_PC + (2 if v_off == 4096 - 2176 else 0)
            assert r.status == Status.VBUF_RANGE and r.pc == first, (v_off, batch, r.message)
            assert "forwarded column" in r.message and sim.batched_groups == 0
