"""GPT-2 to decode core: one program and one HBM image per (model, geometry).

:func:`compile_model` places every weight with :mod:`tandem.layout`, allocates the vector buffer
(VBUF) and emits the instruction stream that decodes position after position. The arguments of a
run (``start_pos``, ``prompt_len``, ``n_new``) arrive through ``LDARG``, so one program serves
every prompt. The arithmetic is the normative decode step that ``tandem.golden.faithful``
implements, in the same order, so the ISA simulator and the RTL running this program equal that
model bit for bit.

Program
-------
``T`` is ``pos + 1``; ``E`` = n_embd, ``P`` = n_head * 64 (heads padded to one block), ``F`` = 4E.
Scalars live in their own 64-element VBUF row; ``[s]`` marks a ``B_SCALAR`` (broadcast) operand::

    prologue   LDARG start_pos, prompt_len, n_new, sampling, seed; k = 0
               koff = P  (q_h + koff: head h's K part of qkv, the score products' forwarded row)
               voff = 3P  (att_h + voff: head h's V part of qkv, the value products' forwarded
                          column; att lies just before qkv)
               start_pos >= prompt_len (also prompt_len == 0) -> HALT BAD_ARGS
               n_new == 0 -> HALT 0
               VSET c_n = 1/E, eps, scale = 1/sqrt(head_dim), one = 1.0  (binary16)
    loop       pos >= n_ctx -> HALT CONTEXT_FULL
               tok = LDW prompt[pos] if pos < prompt_len (tok >= n_vocab -> HALT BAD_ARGS)
                     else the last argmax
    embedding  x = LOADV wte[tok]; y = LOADV wpe[pos]
               layer 0's vectors: LOADV ln1_g, ln1_b = ln_1; qkv = c_attn.bias;
                 a = attn.c_proj.bias; ln2_g, ln2_b = ln_2; hm = c_fc.bias; mo = mlp.c_proj.bias
                 (one run of loads: the core overlaps their read latencies)
    per layer  first layer only: x = VADD(x, y)
               layer_norm(x; ln1_g, ln1_b) -> y
               qkv = MATVEC(c_attn, y, BIAS)                                 [3P]
               not the first layer: LOADV hm = c_fc.bias; mo = mlp.c_proj.bias
                 (beside c_attn: the core runs a LOADV beside the MATVECs whose rows it
                 does not meet, so these read latencies hide behind the weights' stream)
               q = VMUL(q, scale[s]) len n_head * 64                          (in place)
               STROW k -> K row pos (every head's: the heads' K side by side are one matrix)
               for every head h: STCOL v_h -> V^T_h column pos
      group    for the heads h of each group (i = h's place in it; head_groups):
               s_i = MATVEC(K_h, q_h, LIVE_ROWS T,                 each h     [T]
                            row T-1 from k_h: sreg = R_KOFF)
               sc_i = VMAX(s_i) len T                              each h
               s_i = VSUB(s_i, sc_i[s]) len T                      each h
               s_i = VEXP(s_i) len T                               each h
               sc_i = VDOT(s_i, one[s]) len T                      each h
               sc_i = VRECIP(sc_i) len 1                           each h
               att_h = MATVEC(V^T_h, s_i, LIVE_COLS T,             each h     [64]
                              column T-1 from v_h: sreg = R_VOFF)
               att_h = VMUL(att_h, sc_i[s]) len 64                 each h
               a = MATVEC(attn.c_proj, att, BIAS); x = VADD(x, a)
               layer_norm(x; ln2_g, ln2_b) -> y
               hm = MATVEC(c_fc, y, BIAS)                                     [F]
               LOADV the next layer's ln1_g, ln1_b, qkv, a, ln2_g, ln2_b (beside c_fc);
                 after the last layer ln1_g, ln1_b = ln_f
               hm = VGELU(hm)
               mo = MATVEC(mlp.c_proj, hm, BIAS); x = VADD(x, mo)
    lm_head    only if T >= prompt_len: layer_norm(x; ln1_g, ln1_b) -> y (ln_f)
               spos = pos; next = MATVEC(lm_head, y, ARGMAX, sreg = sampling)
                      (greedy, or sampled when the sampling argument has a temperature:
                      seed and position in the two registers after it)
               STW next -> output[k]; k += 1
               k == n_new -> HALT 0
               pos += 1; JMP loop

    with logits=True (teacher-forced evaluation, ``tandem eval``), at every position instead:
    logits     layer_norm(x; ln1_g, ln1_b) -> y (ln_f)
               for each chunk of lm_head rows [r0, r1):  (as many as the free VBUF holds)
                 lg = MATVEC(lm_head[r0:r1], y); STOREV lg -> logits[pos][r0:r1]
               then, if T >= prompt_len: next = MATVEC(lm_head, y, ARGMAX) and on as above

    layer_norm(x; g, b) -> y:
               mu = VDOT(x, c_n[s]); d = VSUB(x, mu[s]); ds = VMUL(d, c_n[s])
               var = VDOT(d, ds); var = VADD(var, eps[s]) len 1; rstd = VRSQRT(var) len 1
               y = VMUL(d, rstd[s]); y = VMUL(y, g); y = VADD(y, b)

The score products forward their last live row (tandem.isa): row T-1 of K_h, the row the STROW
just stored, comes from k_h = VBUF[q_h + P] (``R_KOFF`` holds P), so their HBM reads of K need not
wait for the store. The value products likewise forward their last live column: column T-1 of
V^T_h, the column the STCOL just stored, comes from v_h = VBUF[att_h + R_VOFF] (a forwarded
column counts from the product's ``dst``, att_h; ``att`` is allocated just before ``qkv``, so
``R_VOFF`` = qkv + 2P - att = 3P is one offset for every head), so their HBM reads of V need not
wait for the stores either. The q scaling comes before the stores: it writes only q, the stores
read only k and v, and the core's look-ahead then starts from a waiting vector op.

VDOT's ``a`` operand is the weight side of the block-floating-point dot product, as in
``tandem.numerics.dot_fp16(a, b)``. Every ``STW`` writes one output token (the core counts
``STW``\\ s as the TOKENS it reports).

Registers: see the ``R_*`` constants. R0 reads as zero.

Quantized weights (issue 17): any of a block's four matrices and the LM head may be a
``tandem.qweights.QuantizedMatrix``; it is placed in the layout's quantized tiled form
(``tandem.layout.core_tensors``) and its MATVECs carry ``wfmt``/``wgroup``. The program is
otherwise the same; a logits chunk of a quantized LM head starts on a scale beat.

The logits chunk ``lg`` reuses the attention scratch (``s``, ``sc``) and the free VBUF after it:
nothing there is live once the last layer's attention is done. The ``logits`` region
(:class:`tandem.layout.HBMLayout` with ``logits=True``) holds row ``pos`` = the binary16 logits
``matvec_fp16(lm_head, y)`` of position ``pos`` (those of ``FaithfulModel``'s
``StepResult.logits16``); the argmax still reads the raw accumulators.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from . import isa
from .config import GPT2Config
from .geometry import CoreGeometry
from .isa import LINE, WFMT_BITS, Instr, MatFlag, Op, VecFlag, WFmt
from .layout import (
    HBMImage,
    HBMLayout,
    LayoutError,
    Region,
    StatusRecord,
    build_image,
    core_tensors,
    dense_stride,
    pack_tokens,
    padded_heads,
    quant_scale_offset,
    quant_tiles,
    scale_run,
    unpack_rows,
    unpack_tokens,
)
from .numerics import BLOCK, to_bits
from .regmap import HaltCode, scalar_arg_index
from .sampling import GREEDY, Sampling

# Scalar registers of the compiled program.
R_POS = 1  # position being processed
R_T = 2  # live positions, pos + 1
R_PLEN = 3  # prompt_len argument
R_NNEW = 4  # n_new argument
R_K = 5  # tokens generated so far (index into the output area)
R_TOK = 6  # token at this position
R_NEXT = 7  # the last argmax
R_CTX = 8  # n_ctx
R_VOCAB = 9  # n_vocab
R_START = 10  # start_pos argument
R_SAMP = 11  # sampling argument (temperature, top-k; tandem.sampling)
R_SEED = 12  # seed argument: R_SAMP + 1, as MATVEC's sreg field requires
R_SPOS = 13  # copy of R_POS at the LM head: R_SAMP + 2, the position keying the sampling stream
R_KOFF = 14  # P = padded_heads: head h's K part of qkv is q_h + R_KOFF (the forwarded K row)
R_VOFF = 15  # qkv + 2P - att = 3P: head h's V part of qkv is att_h + R_VOFF (the forwarded V
# column; vbuf_plan puts att just before qkv)

LAYER_VECTORS_EARLY = (
    ("ln1_g", "ln_1.weight"),
    ("ln1_b", "ln_1.bias"),
    ("qkv", "attn.c_attn.bias"),
    ("a", "attn.c_proj.bias"),
    ("ln2_g", "ln_2.weight"),
    ("ln2_b", "ln_2.bias"),
)
"""A layer's vectors loaded while the layer before runs its MLP (behind ``c_fc``): the
operands they go to are free by then."""
LAYER_VECTORS_LATE = (("hm", "mlp.c_fc.bias"), ("mo", "mlp.c_proj.bias"))
"""A layer's vectors loaded behind its own ``c_attn`` (the MLP operands of the layer before
are free by then)."""
LAYER_VECTORS = LAYER_VECTORS_EARLY + LAYER_VECTORS_LATE

B = VecFlag.B_SCALAR


@dataclass(frozen=True)
class VbufSlot:
    """One operand's place in the vector buffer (element address, elements reserved)."""

    addr: int
    length: int

    @property
    def end(self) -> int:
        return self.addr + self.length


class _VbufAllocator:
    """Bump allocation of 64-aligned VBUF slots; the total is checked against the geometry."""

    def __init__(self):
        self.slots: dict[str, VbufSlot] = {}
        self.cursor = 0

    def alloc(self, name: str, n: int) -> VbufSlot:
        slot = VbufSlot(self.cursor, n)
        self.slots[name] = slot
        self.cursor += -(-n // isa.VBUF_ALIGN) * isa.VBUF_ALIGN
        return slot


def vbuf_plan(cfg: GPT2Config, geom: CoreGeometry) -> dict[str, VbufSlot]:
    """The VBUF allocation of the compiled program; raises LayoutError if it does not fit.

    After the fixed operands, the rest of the buffer holds the attention scratch of a group of
    heads: per head a score vector of ``n_ctx`` elements (``s``) and a scalar row (``sc``: the
    row max, then the softmax sum, then its reciprocal). The group is as large as fits, up to
    every head; the heads are then split into the fewest groups of that size or less, their sizes
    differing by at most one (:func:`head_groups`).
    """
    e, p, f = cfg.n_embd, padded_heads(cfg), 4 * cfg.n_embd
    v = _VbufAllocator()
    for name, n in [
        ("x", e),  # residual stream
        ("y", e),  # LayerNorm output (and the position embedding)
        ("d", e),  # LayerNorm: x - mean
        ("ds", e),  # LayerNorm: d / n
        ("ln1_g", e),  # ln_1 (and ln_f) weight and bias
        ("ln1_b", e),
        ("ln2_g", e),  # ln_2 weight and bias
        ("ln2_b", e),
        # the attention output just before qkv: v_h = att_h + 3P, one offset for every head's
        # forwarded V column (R_VOFF)
        ("att", p),  # attention output, heads side by side
        ("qkv", 3 * p),  # q (scaled in place), k, v of every head
        ("a", e),  # attention projection output
        ("hm", f),  # MLP hidden
        ("mo", e),  # MLP projection output
    ]:
        v.alloc(name, n)
    for name in ("c_n", "eps", "scale", "one", "mu", "var", "rstd"):
        v.alloc(name, 1)
    seg = _score_segment(cfg)
    per_head = seg + isa.VBUF_ALIGN
    free = geom.vbuf_elems - v.cursor
    if free < per_head:
        raise LayoutError(
            f"{cfg.name} needs {v.cursor + per_head} VBUF elements, more than vbuf_elems = "
            f"{geom.vbuf_elems} of geometry {geom.name!r}"
        )
    most = min(cfg.n_head, free // per_head)
    size = -(-cfg.n_head // -(-cfg.n_head // most))  # the fewest groups, as equal as may be
    v.alloc("s", size * seg)  # head i of a group: scores at s + i * n_ctx (rounded up to 64)
    v.alloc("sc", size * isa.VBUF_ALIGN)  # head i of a group: its scalar row
    return v.slots


def _score_segment(cfg: GPT2Config) -> int:
    """VBUF elements of one head's scores: n_ctx rounded up to a VBUF row."""
    return -(-cfg.n_ctx // isa.VBUF_ALIGN) * isa.VBUF_ALIGN


def head_groups(cfg: GPT2Config, vbuf: Mapping[str, VbufSlot]) -> list[range]:
    """The heads of a layer in the groups the program runs them in (see :func:`vbuf_plan`)."""
    size = vbuf["sc"].length // isa.VBUF_ALIGN  # the largest group
    n = -(-cfg.n_head // size)
    base, extra = divmod(cfg.n_head, n)  # sizes differ by at most one
    starts = [i * base + min(i, extra) for i in range(n + 1)]
    return [range(a, b) for a, b in itertools.pairwise(starts)]


def logits_chunks(
    cfg: GPT2Config, geom: CoreGeometry, vbuf: Mapping[str, VbufSlot], head: Region | None = None
) -> list[tuple[int, int, int, int, int]]:
    """How a ``logits=True`` program computes the LM head's binary16 output: chunks of rows
    ``[r0, r1)`` as ``(r0, r1, VBUF address, line offset in lm_head, line offset in a logits
    row)``. A chunk lives from the attention scratch (``s``) to the end of the VBUF, free once
    the last layer's attention is done; it starts on a 64-row group of the tiled LM head and on
    a whole line of the striped logits row, and, for a quantized LM head (``head``, the layout's
    region; default FP16), on a run of tiles after a scale beat (tandem.layout), so that its rows
    are a quantized matrix of their own. Raises LayoutError if not one chunk fits."""
    per_line = geom.channels * (LINE // 2)  # striped elements per line across the channels
    unit = max(BLOCK, per_line)
    quant = head is not None and head.wfmt != WFmt.FP16
    if quant:
        bits = WFMT_BITS[WFmt(head.wfmt)]
        per_group = quant_tiles(geom, BLOCK, cfg.n_embd, bits)  # tiles per 64 rows
        run = scale_run(bits, head.wgroup)
        unit = math.lcm(unit, BLOCK * run // math.gcd(run, per_group))
    start = vbuf["s"].addr
    room = (geom.vbuf_elems - start) // unit * unit
    if room <= 0:
        raise LayoutError(
            f"{cfg.name} on {geom.name}: no room in the VBUF for the logits of tandem eval "
            f"(a chunk of {unit} elements from element {start}; vbuf_elems = {geom.vbuf_elems})"
        )
    head_group = -(-cfg.n_embd // BLOCK) * dense_stride(geom) * geom.beat_bytes  # bytes/64 rows
    out = []
    for r0 in range(0, cfg.n_vocab, room):
        r1 = min(cfg.n_vocab, r0 + room)
        head_bytes = r0 // BLOCK * head_group
        if quant:
            head_bytes = int(quant_scale_offset(geom, bits, head.wgroup, r0 // BLOCK * per_group))
        out_bytes = r0 // per_line * LINE
        if head_bytes % LINE:
            raise LayoutError(f"{cfg.name} on {geom.name}: LM head row {r0} is not on a line")
        out.append((r0, r1, start, head_bytes // LINE, out_bytes // LINE))
    return out


class _Program:
    """An instruction list with forward labels (branch targets are resolved at the end)."""

    def __init__(self):
        self.items: list[tuple[Op, dict]] = []
        self.labels: dict[str, int] = {}

    def __call__(self, op: Op, **fields) -> None:
        self.items.append((op, fields))

    def label(self, name: str) -> None:
        if name in self.labels:
            raise ValueError(f"label {name!r} defined twice")
        self.labels[name] = len(self.items)

    def finish(self) -> list[Instr]:
        out = []
        for op, fields in self.items:
            if isinstance(fields.get("target"), str):
                fields = {**fields, "target": self.labels[fields["target"]]}
            out.append(isa.make(op, **fields))
        return out


class _Emitter:
    """Emits the blocks of the decode step; one method per block of the module docstring."""

    def __init__(self, cfg: GPT2Config, geom: CoreGeometry, layout: HBMLayout, vbuf):
        self.cfg, self.geom, self.layout, self.v = cfg, geom, layout, vbuf
        self.logits = layout.logits
        self.p = _Program()
        self.E = cfg.n_embd
        self.P = padded_heads(cfg)

    # helpers ------------------------------------------------------------------------------

    def v_offset(self) -> int:
        """R_VOFF: the VBUF distance from att_h to v_h (qkv + 2P + h*64), the value products'
        forwarded column; a multiple of 64 and not negative, as the plan makes it."""
        off = self.addr("qkv", 2 * self.P) - self.addr("att")
        if off < 0 or off % isa.VBUF_ALIGN:
            raise LayoutError(f"VBUF: v is {off} elements after att, not a VBUF row at or after it")
        return off

    def addr(self, name: str, offset: int = 0) -> int:
        return self.v[name].addr + offset

    def load_vector(self, dst: str, region: str) -> None:
        r = self.layout[region]
        self.p(Op.LOADV, dst=self.addr(dst), len=r.cols, line=r.line)

    def matvec(self, dst: str, src: str, region: str, bias: bool = False, **extra) -> None:
        """dst = region . src (+ dst, the bias a LOADV put there, with ``bias``)."""
        r = self.layout[region]
        flags = MatFlag.BIAS if bias else 0
        self.p(
            Op.MATVEC,
            dst=self.addr(dst),
            src=self.addr(src),
            line=r.line,
            rows=r.rows,
            cols=r.cols,
            flags=flags | extra.pop("flags", 0),
            wfmt=r.wfmt,
            wgroup=r.wgroup,
            **extra,
        )

    def kv_product(self, dst: int, src: int, r: Region, live: MatFlag, sreg: int = 0) -> None:
        """dst = r . src over the live part of a KV matrix (T rows of K or T columns of V^T);
        a non-zero ``sreg`` forwards row T-1 of K from VBUF[src + R[sreg]] or column T-1 of V^T
        from VBUF[dst + R[sreg]] (tandem.isa)."""
        self.p(
            Op.MATVEC,
            dst=dst,
            src=src,
            line=r.line,
            rows=r.rows,
            cols=r.cols,
            stride=r.stride,
            flags=live,
            lreg=R_T,
            sreg=sreg,
        )

    def kv(self, layer: int, head: int, part: str) -> Region:
        r = self.layout.kv_head(layer, head, part)
        if r.base % LINE:
            raise LayoutError(
                f"head {head}'s {part} matrix starts at byte {r.base}, not on a {LINE}-byte line: "
                f"geometry {self.geom.name!r} has {dense_stride(self.geom)} tiles of "
                f"{self.geom.beat_bytes} bytes per head"
            )
        return r

    # blocks -------------------------------------------------------------------------------

    def embedding_loads(self) -> None:
        """x = wte[tok], y = wpe[pos] (added by the first layer, after its loads)."""
        for dst, name, reg in (("x", "wte", R_TOK), ("y", "wpe", R_POS)):
            r = self.layout[name]
            stride = r.row_bytes // LINE
            self.p(Op.LOADV, dst=self.addr(dst), len=self.E, line=r.line, ri=reg, stride=stride)

    def layer_loads(self, layer: int, vectors=LAYER_VECTORS) -> None:
        """Vectors a layer reads from HBM (``vectors``: (VBUF operand, tensor) pairs), in one run
        of LOADVs (the core overlaps their read latencies): the LayerNorm parameters and the
        biases, each product's into its output operand."""
        for dst, name in vectors:
            self.load_vector(dst, f"h.{layer}.{name}")

    def layer_norm(self, g: str, b: str) -> None:
        """y = LayerNorm(x; g, b), the parameters already in VBUF."""
        p, a, E = self.p, self.addr, self.E
        p(Op.VDOT, dst=a("mu"), a=a("x"), b=a("c_n"), len=E, flags=B)
        p(Op.VSUB, dst=a("d"), a=a("x"), b=a("mu"), len=E, flags=B)
        p(Op.VMUL, dst=a("ds"), a=a("d"), b=a("c_n"), len=E, flags=B)
        p(Op.VDOT, dst=a("var"), a=a("d"), b=a("ds"), len=E)
        p(Op.VADD, dst=a("var"), a=a("var"), b=a("eps"), len=1, flags=B)
        p(Op.VRSQRT, dst=a("rstd"), a=a("var"), len=1)
        p(Op.VMUL, dst=a("y"), a=a("d"), b=a("rstd"), len=E, flags=B)
        p(Op.VMUL, dst=a("y"), a=a("y"), b=a(g), len=E)
        p(Op.VADD, dst=a("y"), a=a("y"), b=a(b), len=E)

    def attention(self, layer: int) -> None:
        """x += attn.c_proj(attention(c_attn(y))), with y = ln_1(x) already in VBUF.

        The heads run in groups (:func:`head_groups`), each phase over the whole group, so that
        the group's matrix products follow each other (the core keeps two in flight and hides
        their HBM read latency) and a layer waits once for its K/V stores.
        """
        p, a, E, P = self.p, self.addr, self.E, self.P
        pre = f"h.{layer}.attn."
        self.matvec("qkv", "y", pre + "c_attn.weight", bias=True)
        if layer > 0:  # beside c_attn, which reads y and writes qkv (layer 0's came first)
            self.layer_loads(layer, LAYER_VECTORS_LATE)
        # q scaled in place before the stores (they read only k and v): the core's look-ahead
        # then starts from a vector op waiting for c_attn
        n_q = self.cfg.n_head * BLOCK
        p(Op.VMUL, dst=a("qkv"), a=a("qkv"), b=a("scale"), len=n_q, flags=B)
        kv = [(self.kv(layer, h, "k"), self.kv(layer, h, "v")) for h in range(self.cfg.n_head)]
        # every head's K row at once: the heads of a layer's K region side by side are one
        # dense [n_ctx, P] tiled matrix (tandem.layout: head h's 64 columns are its block h)
        p(Op.STROW, src=a("qkv", P), len=P, line=kv[0][0].line, ri=R_POS, cols=P, stride=0)
        for h, (_, v) in enumerate(kv):
            p(
                Op.STCOL,
                src=a("qkv", 2 * P + h * BLOCK),
                len=BLOCK,
                line=v.line,
                ri=R_POS,
                cols=v.cols,
                stride=v.stride,
            )
        seg = _score_segment(self.cfg)
        for group in head_groups(self.cfg, self.v):
            heads = [(h, a("s", i * seg), a("sc", i * BLOCK)) for i, h in enumerate(group)]
            for h, s, _ in heads:  # row T-1 of K_h forwarded from k_h = VBUF[q_h + P]
                self.kv_product(s, a("qkv", h * BLOCK), kv[h][0], MatFlag.LIVE_ROWS, R_KOFF)
            # op by op over the group: consecutive ops are independent, so the VPU overlaps them
            for _, s, sc in heads:
                p(Op.VMAX, dst=sc, a=s, lreg=R_T)
            for _, s, sc in heads:
                p(Op.VSUB, dst=s, a=s, b=sc, flags=B, lreg=R_T)
            for _, s, _ in heads:
                p(Op.VEXP, dst=s, a=s, lreg=R_T)
            for _, s, sc in heads:
                p(Op.VDOT, dst=sc, a=s, b=a("one"), flags=B, lreg=R_T)
            for _, _, sc in heads:
                p(Op.VRECIP, dst=sc, a=sc, len=1)
            for h, s, _ in heads:  # column T-1 of V^T_h forwarded from v_h = VBUF[att_h + voff]
                self.kv_product(a("att", h * BLOCK), s, kv[h][1], MatFlag.LIVE_COLS, R_VOFF)
            for h, _, sc in heads:
                o = a("att", h * BLOCK)
                p(Op.VMUL, dst=o, a=o, b=sc, len=BLOCK, flags=B)
        self.matvec("a", "att", pre + "c_proj.weight", bias=True)
        p(Op.VADD, dst=a("x"), a=a("x"), b=a("a"), len=E)

    def mlp(self, layer: int) -> None:
        """x += mlp.c_proj(gelu(mlp.c_fc(y))), with y = ln_2(x) already in VBUF."""
        p, a = self.p, self.addr
        pre = f"h.{layer}.mlp."
        self.matvec("hm", "y", pre + "c_fc.weight", bias=True)
        # beside c_fc, which reads y and writes hm: the next layer's first vectors, or ln_f's
        if layer + 1 < self.cfg.n_layer:
            self.layer_loads(layer + 1, LAYER_VECTORS_EARLY)
        else:
            self.load_vector("ln1_g", "ln_f.weight")
            self.load_vector("ln1_b", "ln_f.bias")
        p(Op.VGELU, dst=a("hm"), a=a("hm"), len=4 * self.E)
        self.matvec("mo", "hm", pre + "c_proj.weight", bias=True)
        p(Op.VADD, dst=a("x"), a=a("x"), b=a("mo"), len=self.E)

    def final_norm(self) -> None:
        """y = ln_f(x) (the last layer's MLP loaded ln_f into ``ln1_g``, ``ln1_b``)."""
        self.layer_norm("ln1_g", "ln1_b")

    def logits_out(self) -> None:
        """logits[pos] = lm_head . y in binary16, chunk by chunk (:func:`logits_chunks`)."""
        head, out = self.layout["lm_head"], self.layout["logits"]
        chunks = logits_chunks(self.cfg, self.geom, self.v, head)
        for r0, r1, slot, head_line, out_line in chunks:
            self.p(
                Op.MATVEC,
                dst=slot,
                src=self.addr("y"),
                line=head.line + head_line,
                rows=r1 - r0,
                cols=head.cols,
                wfmt=head.wfmt,
                wgroup=head.wgroup,
            )
            self.p(
                Op.STOREV,
                src=slot,
                len=r1 - r0,
                line=out.line + out_line,
                ri=R_POS,
                stride=out.row_bytes // LINE,
            )

    def lm_head(self) -> None:
        """next = argmax(lm_head(ln_f(x))), stored as output token k (with ``logits``, ln_f ran
        before)."""
        if not self.logits:
            self.final_norm()
        self.p(Op.ADDI, rd=R_SPOS, ra=R_POS, imm=0)
        self.matvec("y", "y", "lm_head", flags=MatFlag.ARGMAX, rd=R_NEXT, sreg=R_SAMP)
        self.p(Op.STW, rs=R_NEXT, line=self.layout["output"].line, ri=R_K)
        self.p(Op.ADDI, rd=R_K, ra=R_K, imm=1)

    # the whole program --------------------------------------------------------------------

    def program(self) -> list[Instr]:
        p, a, cfg = self.p, self.addr, self.cfg
        arg = scalar_arg_index
        p(Op.LDARG, rd=R_START, arg=arg("start_pos"))
        p(Op.LDARG, rd=R_PLEN, arg=arg("prompt_len"))
        p(Op.LDARG, rd=R_NNEW, arg=arg("n_new"))
        p(Op.LDARG, rd=R_SAMP, arg=arg("sampling"))
        p(Op.LDARG, rd=R_SEED, arg=arg("seed"))
        p(Op.SETI, rd=R_K, imm=0)
        p(Op.SETI, rd=R_CTX, imm=cfg.n_ctx)
        p(Op.SETI, rd=R_VOCAB, imm=cfg.n_vocab)
        p(Op.SETI, rd=R_KOFF, imm=self.P)
        p(Op.SETI, rd=R_VOFF, imm=self.v_offset())
        p(Op.BGE, ra=R_START, rb=R_PLEN, target="bad_args")
        p(Op.BGE, ra=R_K, rb=R_NNEW, target="done")
        constants = {
            "c_n": to_bits(1.0 / cfg.n_embd),
            "eps": to_bits(cfg.layer_norm_epsilon),
            "scale": to_bits(1.0 / np.sqrt(cfg.head_dim)),
            "one": to_bits(1.0),
        }
        for name, bits in constants.items():
            p(Op.VSET, dst=a(name), imm=int(bits), len=1)
        p(Op.ADDI, rd=R_POS, ra=R_START, imm=0)

        p.label("loop")
        p(Op.BGE, ra=R_POS, rb=R_CTX, target="context_full")
        p(Op.BGE, ra=R_POS, rb=R_PLEN, target="generated")
        p(Op.LDW, rd=R_TOK, line=self.layout["prompt"].line, ri=R_POS)
        p(Op.BGE, ra=R_TOK, rb=R_VOCAB, target="bad_args")
        p(Op.JMP, target="step")
        p.label("generated")
        p(Op.ADDI, rd=R_TOK, ra=R_NEXT, imm=0)
        p.label("step")
        p(Op.ADDI, rd=R_T, ra=R_POS, imm=1)
        self.embedding_loads()
        self.layer_loads(0)
        for layer in range(cfg.n_layer):
            if layer == 0:
                p(Op.VADD, dst=a("x"), a=a("x"), b=a("y"), len=self.E)
            self.layer_norm("ln1_g", "ln1_b")
            self.attention(layer)
            self.layer_norm("ln2_g", "ln2_b")
            self.mlp(layer)
        if self.logits:
            self.final_norm()
            self.logits_out()
        p(Op.BLT, ra=R_T, rb=R_PLEN, target="next")
        self.lm_head()
        p(Op.BGE, ra=R_K, rb=R_NNEW, target="done")
        p.label("next")
        p(Op.ADDI, rd=R_POS, ra=R_POS, imm=1)
        p(Op.JMP, target="loop")

        p.label("done")
        p(Op.HALT, code=HaltCode.OK)
        p.label("context_full")
        p(Op.HALT, code=HaltCode.CONTEXT_FULL)
        p.label("bad_args")
        p(Op.HALT, code=HaltCode.BAD_ARGS)
        return p.finish()


@dataclass
class Compiled:
    """One model compiled for one geometry.

    Attributes
    ----------
    program : list[Instr]
    layout : HBMLayout
    image : HBMImage
        Weights placed, the program in the ``program`` region, KV and token areas zero.
    vbuf_map : dict[str, VbufSlot]
        Where the program keeps each operand; ``y`` holds the final LayerNorm output (the LM
        head's input) after a run that generated a token, ``x`` the residual stream.
    labels : dict[str, int]
        Instruction index of each label of the program (``loop``, ``done``, ...).
    """

    cfg: GPT2Config
    geom: CoreGeometry
    program: list[Instr]
    layout: HBMLayout
    image: HBMImage
    vbuf_map: dict[str, VbufSlot]
    labels: dict[str, int]

    @property
    def vbuf_elems(self) -> int:
        """VBUF elements the program uses."""
        return max(s.addr + -(-s.length // BLOCK) * BLOCK for s in self.vbuf_map.values())

    def assembly(self) -> str:
        return isa.disassemble(self.program)

    def args(
        self, prompt_len: int, n_new: int, start_pos: int = 0, sampling: Sampling | None = None
    ) -> dict[str, int]:
        """Scalar arguments of a run (``hbm_bytes`` = the whole layout; ``sampling`` None:
        greedy)."""
        return {
            "start_pos": start_pos,
            "prompt_len": prompt_len,
            "n_new": n_new,
            "hbm_bytes": self.layout.channel_bytes,
            "watchdog": 0,
            **(sampling or GREEDY).args(),
        }

    # Token areas and the status record, on anything with read_channel/write_channel
    # (an HBMImage or a host Device).

    def write_prompt(self, target, ids: Sequence[int]) -> None:
        """Store prompt tokens from slot 0 of the prompt area."""
        if len(ids) > self.cfg.n_ctx + 1:
            raise ValueError(
                f"{len(ids)} prompt tokens do not fit the prompt area of n_ctx + 1 = "
                f"{self.cfg.n_ctx + 1} slots"
            )
        target.write_channel(0, self.layout["prompt"].base, pack_tokens(ids))

    def read_output(self, source, n: int) -> list[int]:
        """The first ``n`` tokens of the output area."""
        region = self.layout["output"]
        return unpack_tokens(source.read_channel(0, region.base, 4 * n))

    def read_logits(self, source, start: int, stop: int) -> np.ndarray:  # source: read_striped
        """Binary16 bits [stop - start, n_vocab] of the ``logits`` region's rows ``start ..
        stop - 1`` (a program compiled with ``logits=True`` wrote row ``pos`` at position
        ``pos``)."""
        if not self.layout.logits:
            raise ValueError("this program was compiled without logits=True: it stores none")
        r = self.layout["logits"]
        if not 0 <= start <= stop <= r.rows:
            raise ValueError(f"logits rows [{start}, {stop}) are outside [0, {r.rows})")
        base, n = r.base + start * r.row_bytes, (stop - start) * r.row_bytes
        return unpack_rows(
            self.geom, np.asarray(source.read_striped(base, n)), stop - start, r.cols
        )

    def read_status(self, source) -> StatusRecord:
        region = self.layout["status"]
        return StatusRecord.unpack(source.read_channel(0, region.base, region.nbytes))


def compile_model(
    cfg: GPT2Config, weights: Mapping[str, np.ndarray], geom: CoreGeometry, *, logits: bool = False
) -> Compiled:
    """Compile a GPT-2 model (float weights keyed as in tandem.checkpoint) for a core geometry.

    With ``logits``, the program also stores the binary16 logits of every position it processes
    in the layout's ``logits`` region (teacher-forced evaluation; module docstring); the tokens
    it generates are the same.

    Quantized weights (a :class:`tandem.qweights.QuantizedMatrix` for any of a block's four MPU
    matrices or ``lm_head.weight``) are placed in the layout's quantized tiled form and their
    MATVECs carry ``wfmt``/``wgroup`` (``tandem.layout.core_tensors``).

    Raises LayoutError naming the limit when the model does not fit the geometry (HBM channel
    size, VBUF elements, instruction memory, instruction field widths) or a quantized matrix
    cannot be mapped (a head straddling two groups, a group the tiles cannot map).
    """
    tensors, formats = core_tensors(cfg, weights)
    layout = HBMLayout(cfg, geom, logits=logits, formats=formats)
    vbuf = vbuf_plan(cfg, geom)
    em = _Emitter(cfg, geom, layout, vbuf)
    try:
        program = em.program()
    except isa.IllegalInstruction as err:
        raise LayoutError(f"{cfg.name} on {geom.name}: {err}") from err
    if len(program) > geom.imem_words:
        raise LayoutError(
            f"{cfg.name} compiles to {len(program)} instructions, more than imem_words = "
            f"{geom.imem_words} of geometry {geom.name!r}"
        )
    image = build_image(layout, tensors)
    image.write_channel(0, layout["program"].base, isa.encode_program(program))
    return Compiled(cfg, geom, program, layout, image, vbuf, dict(em.p.labels))


def program(
    cfg: GPT2Config, geom: CoreGeometry, *, logits: bool = False, formats=None
) -> list[Instr]:
    """The instruction stream :func:`compile_model` would emit for ``cfg`` on ``geom``, without
    weights or an image (it depends on the shapes only, and on the quantized matrices' formats:
    ``formats`` as :class:`~tandem.layout.HBMLayout` takes them)."""
    layout = HBMLayout(cfg, geom, logits=logits, formats=formats or {})
    return _Emitter(cfg, geom, layout, vbuf_plan(cfg, geom)).program()


def fits(cfg: GPT2Config, geom: CoreGeometry, *, logits: bool = False) -> str | None:
    """None if ``cfg`` compiles for ``geom`` (with ``logits``: the evaluation program), else the
    reason (without building the image)."""
    try:
        n = len(program(cfg, geom, logits=logits))
    except (LayoutError, isa.IllegalInstruction) as err:
        return str(err)
    if n > geom.imem_words:
        return f"{n} instructions exceed imem_words = {geom.imem_words}"
    return None
