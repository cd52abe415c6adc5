"""On-chip sampling: the top-``K`` lists, the Simon32/64 stream and the Gumbel choice of
:mod:`tandem.sampling`, fed by the matrix unit's rounded rows.

A block of its own so that the floorplan can put it away from the MPU's DSP array
(:mod:`tandem.floorplan`): its input is one registered word per cycle (:func:`feed_layout`)
and its output one pulse per sampling command (:data:`SampleResult`), both plain level
signals that survive a fixed delay, so the core carries them through
:class:`rtl.relay.Delay` stages like its other level signals (rtl/core.py, ``LEVELS``)."""

# No `from __future__ import annotations`: data.Struct reads its annotations as shapes.

from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from tandem import sampling as S
from tandem.geometry import CoreGeometry, is_pow2
from tandem.numerics import BLOCK

from .component import GeometryComponent

__all__ = ["KEY_SCHEDULE", "MatvecSampling", "SampleResult", "Sampler", "feed_layout"]


class MatvecSampling(data.Struct):
    """The sampling registers of an ``ARGMAX`` (``MATVEC``'s ``sreg`` field): the ``sampling``
    word (``T_q`` in bits 15:0, 0 = greedy; ``K`` in bits 22:16), the seed and the position
    (:mod:`tandem.sampling`)."""

    word: unsigned(32)
    seed: unsigned(32)
    pos: unsigned(16)


class SampleResult(data.Struct):
    """The sampler's answer: ``done`` is high for one cycle per sampling command, with the
    drawn row ``index`` (valid in that cycle)."""

    done: 1
    index: unsigned(16)


KEY_SCHEDULE = S.SIMON_ROUNDS - 4 + 1
"""Cycles from a command's ``start`` to the first cycle the scan may start: the key words are
loaded with the command, then the other round keys come one per cycle."""


def feed_layout(lanes: int) -> data.StructLayout:
    """What the matrix unit sends the sampler each cycle.

    ``start``: a command was accepted (the sampler forgets the previous one), with its
    ``sampling`` registers. ``valid[l]``/``bits[l]``: lane ``l``'s rounded binary16 result is a
    candidate (a live row of a sampling command's last column block); its row index is
    ``row0 + l``. ``end``: these are the command's last rows (the merge starts after them)."""
    return data.StructLayout(
        {
            "start": 1,
            "sampling": MatvecSampling,
            "valid": lanes,
            "bits": data.ArrayLayout(unsigned(16), lanes),
            "row0": unsigned(16),
            "end": 1,
        }
    )


class Sampler(GeometryComponent):
    """The contract of :mod:`tandem.sampling` in four phases, one command at a time.

    1. *Lists*: each lane inserts its candidates into a sorted list of
       :data:`tandem.sampling.TOP_K_MAX` entries (value, then the lower index first), one row
       per lane per cycle, as the rows are rounded.
    2. *Merge*: the lanes' lists, one after the other, move their first ``K`` entries into one
       more such list, one entry per cycle: the global top ``K`` is within the union of every
       lane's top ``K``.
    3. *Scan*: the global list's first ``K`` entries, one per cycle, through the stream
       (Simon32/64, 4 rounds per stage, round keys expanded from ``start``), the Gumbel table,
       ``2 * T_q * g_q`` and the fixed-point logit.
    4. *Choice*: a running maximum of the score (then the lower index).

    Members
    -------
    feed : In(:func:`feed_layout`)
    result : Out(:class:`SampleResult`)

    Timing: fed by a :class:`rtl.mpu.MatrixUnit` directly (its own sampler), ``done`` is high in
    the cycle of the index transfer that :meth:`rtl.mpu.MatrixUnit.sample_tail` counts (the
    merge takes ``min(K, n_l) + 1`` cycles per lane, the scan ``min(K, rows)``, and the scan
    waits for the key schedule, :data:`KEY_SCHEDULE` cycles after ``start``); each register
    between the two (the core's ``Delay`` stages, each way) adds a cycle. A ``start`` while a
    command is under way abandons it.

    Cost (one list of K = 64 entries of 33 bits per lane, one more for the merge):
    ``(lanes + 1) * 64 * 33`` flip-flops and as many 32-bit comparators as entries, one
    Simon32/64 pipeline (32 rounds, 8 stages), one 4,096 x 16-bit table, one 16 x 16 multiply;
    every path is a compare, a few muxes, four cipher rounds (one LUT level each) or one add
    (docs/rtl.md).
    """

    def __init__(self, geom: CoreGeometry):
        if not is_pow2(geom.lanes) or geom.lanes > BLOCK:
            raise ValueError(f"lanes must be a power of two from 1 to {BLOCK}, not {geom.lanes!r}")
        self._lanes = geom.lanes
        super().__init__(
            geom, {"feed": In(feed_layout(geom.lanes)), "result": Out(SampleResult)}
        )

    def elaborate(self, platform):
        m = Module()
        lanes, K = self._lanes, S.TOP_K_MAX
        f = self.feed
        entry = data.StructLayout({"valid": 1, "bits": 16, "index": 16})

        # the command's parameters, taken with start
        word = f.sampling.word
        k_raw = word[16 : 16 + S.TOP_K_BITS]
        s_tq = Signal(16)
        s_k = Signal(range(K + 1))
        with m.If(f.start):
            m.d.sync += [
                s_tq.eq(word[:16]),
                s_k.eq(Mux((k_raw == 0) | (k_raw > K), K, k_raw)),
            ]

        def rank(e):
            """Unsigned order of entries: the binary16 value (IEEE order key; -0 was made +0),
            then the lower index."""
            b = e.bits
            okey = Mux(b[15], ~b, b | 0x8000)
            return Cat(~e.index, okey)

        def sorted_list(name, ins, pop):
            es = [Signal(entry, name=f"{name}{i}") for i in range(K)]
            gt = Signal(K, name=f"{name}_gt")
            for i, e in enumerate(es):
                m.d.comb += gt[i].eq(~e.valid | (rank(ins) > rank(e)))
            with m.If(f.start):
                m.d.sync += [e.valid.eq(0) for e in es]
            with m.Elif(pop):
                m.d.sync += [es[i].eq(es[i + 1]) for i in range(K - 1)]
                m.d.sync += es[K - 1].valid.eq(0)
            with m.Elif(ins.valid):
                for i in range(K):
                    with m.If(gt[i]):
                        if i == 0:
                            m.d.sync += es[0].eq(ins)
                        else:
                            m.d.sync += es[i].eq(
                                Mux(gt[i - 1], es[i - 1].as_value(), ins.as_value())
                            )
            return es

        # 1. candidates, one per lane, registered
        cands = []
        for lane in range(lanes):
            b = f.bits[lane]
            e = Signal(entry, name=f"smp_cand{lane}")
            m.d.sync += [
                e.valid.eq(f.valid[lane]),
                e.bits.eq(Mux(b[:15] == 0, 0, b)),  # -0 ranks as +0
                e.index.eq(f.row0 | lane),
            ]
            cands.append(e)
        cand_end = Signal()
        m.d.sync += cand_end.eq(f.end)

        # 2. merge
        merging = Signal()
        merged = Signal()
        m_lane = Signal(range(lanes))
        m_taken = Signal(range(K + 1))
        m_reg = Signal(entry)
        pops = Signal(lanes)
        lists = [sorted_list(f"smp_l{lane}_", cands[lane], pops[lane]) for lane in range(lanes)]
        head = Signal(entry)
        m.d.comb += head.eq(Array(lst[0].as_value() for lst in lists)[m_lane])
        m_take = merging & head.valid & (m_taken < s_k)
        for lane in range(lanes):
            m.d.comb += pops[lane].eq(m_take & (m_lane == lane))
        m.d.sync += m_reg.valid.eq(0)
        with m.If(f.start):
            m.d.sync += [merging.eq(0), merged.eq(0)]
        with m.Elif(cand_end):
            m.d.sync += [merging.eq(1), m_lane.eq(0), m_taken.eq(0)]
        with m.Elif(merging):
            with m.If(m_take):
                m.d.sync += [m_reg.eq(head), m_taken.eq(m_taken + 1)]
            with m.Elif(m_lane == lanes - 1):
                m.d.sync += [merging.eq(0), merged.eq(1)]
            with m.Else():
                m.d.sync += [m_lane.eq(m_lane + 1), m_taken.eq(0)]
        s_pop = Signal()
        glist = sorted_list("smp_g", m_reg, s_pop)

        # round keys: Simon32/64's schedule, one word per cycle from the command's start (28
        # cycles; the scan waits for it, though a command's tiles take longer)
        ks = [Signal(16, name=f"smp_rk{i}") for i in range(S.SIMON_ROUNDS)]
        ks_left = Signal(range(S.SIMON_ROUNDS))
        z_bits = int(S._SIMON_Z0[: S.SIMON_ROUNDS - 4][::-1], 2)  # bit j: step j's z
        z = Signal(S.SIMON_ROUNDS - 4)
        seed, pos = f.sampling.seed, f.sampling.pos

        def ror(v, r):
            return v.rotate_right(r)

        with m.If(f.start):
            m.d.sync += [
                ks[28].eq(seed[:16]),
                ks[29].eq(seed[16:]),
                ks[30].eq(pos),
                ks[31].eq(0),
                ks_left.eq(S.SIMON_ROUNDS - 4),
                z.eq(z_bits),
            ]
        with m.Elif(ks_left != 0):
            tmp = ror(ks[31], 3) ^ ks[29]
            nxt = Const(S._SIMON_C, 16) ^ z[0] ^ ks[28] ^ tmp ^ ror(tmp, 1)
            m.d.sync += [ks[i].eq(ks[i + 1]) for i in range(S.SIMON_ROUNDS - 1)]
            m.d.sync += [ks[31].eq(nxt), ks_left.eq(ks_left - 1), z.eq(z >> 1)]

        # 3. scan: the global list's first K entries, then an end marker
        stage = data.StructLayout({"valid": 1, "end": 1, "bits": 16, "index": 16})
        scanning = Signal()
        scanned = Signal()
        s_count = Signal(range(K + 1))
        g_head = glist[0]
        s_take = scanning & g_head.valid & (s_count < s_k)
        m.d.comb += s_pop.eq(s_take)
        p0 = Signal(stage, name="smp_p0")
        m.d.sync += p0.eq(0)
        with m.If(f.start):
            m.d.sync += [scanning.eq(0), scanned.eq(0)]
        with m.Elif(scanning):
            with m.If(s_take):
                m.d.sync += [
                    p0.valid.eq(1),
                    p0.bits.eq(g_head.bits),
                    p0.index.eq(g_head.index),
                    s_count.eq(s_count + 1),
                ]
            with m.Else():
                m.d.sync += [p0.end.eq(1), scanning.eq(0), scanned.eq(1)]
        with m.Elif(merged & (ks_left == 0) & ~scanned):
            m.d.sync += [scanning.eq(1), s_count.eq(0)]

        # the stream: (x, y) = (index, 0), ROUNDS_PER_STAGE rounds per register stage
        rps = 4
        meta, cx, cy = p0, p0.index, Const(0, 16)
        for j in range(S.SIMON_ROUNDS // rps):
            for r in range(rps):
                k = ks[j * rps + r]
                rx = Signal(16, name=f"smp_r{j * rps + r}")  # one name per round: no expression
                m.d.comb += rx.eq(  # trees that grow threefold per round in the Verilog
                    cy ^ ((cx.rotate_left(1) & cx.rotate_left(8)) ^ cx.rotate_left(2)) ^ k
                )
                cx, cy = rx, cx
            nm_ = Signal(stage, name=f"smp_c{j + 1}")
            nx = Signal(16, name=f"smp_x{j + 1}")
            ny = Signal(16, name=f"smp_y{j + 1}")
            m.d.sync += [nm_.eq(meta), nx.eq(cx), ny.eq(cy)]
            meta, cx, cy = nm_, nx, ny
        # Gumbel table (read at the next edge) and the logit's magnitude, 2**24 units
        m.submodules.smp_gumbel = gmem = Memory(
            shape=signed(16), depth=1 << S.GUMBEL_INDEX_BITS, init=S.gumbel_table().tolist()
        )
        g_rd = gmem.read_port(domain="sync")
        m.d.comb += g_rd.addr.eq(cx[16 - S.GUMBEL_INDEX_BITS :])
        field = meta.bits[10:15]
        sig = Cat(meta.bits[:10], field != 0)
        p9 = Signal(stage, name="smp_p9")
        mag9 = Signal(11 + 30)
        shamt = Signal(5, name="smp_shamt")  # exponent - 1; subnormals: exponent 1
        m.d.comb += shamt.eq(Mux(field == 0, 0, field - 1))
        m.d.sync += [p9.eq(meta), mag9.eq(sig << shamt)]
        p10 = Signal(stage, name="smp_p10")
        mag10 = Signal.like(mag9)
        prod10 = Signal(signed(34))
        m.d.sync += [p10.eq(p9), mag10.eq(mag9), prod10.eq(s_tq * g_rd.data)]
        p11 = Signal(stage, name="smp_p11")
        score11 = Signal(signed(48))
        twice = prod10 << 1
        m.d.sync += [
            p11.eq(p10),
            score11.eq(Mux(p10.bits[15], twice - mag10, twice + mag10)),
        ]

        # 4. the choice; done for one cycle after the scan's end marker
        best_score = Signal(signed(48))
        best_index = Signal(16)
        best_valid = Signal()
        better = Cat(~p11.index, score11).as_signed() > Cat(~best_index, best_score).as_signed()
        m.d.sync += self.result.done.eq(0)
        with m.If(f.start):
            m.d.sync += [best_valid.eq(0), best_index.eq(0)]
        with m.Else():
            with m.If(p11.valid & (~best_valid | better)):
                m.d.sync += [best_valid.eq(1), best_score.eq(score11), best_index.eq(p11.index)]
            with m.If(p11.end):
                m.d.sync += self.result.done.eq(1)
        m.d.comb += self.result.index.eq(best_index)
        return m
