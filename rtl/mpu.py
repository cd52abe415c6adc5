"""The matrix unit (MPU): block-floating-point matrix-vector products, one weight tile per cycle."""

# No `from __future__ import annotations`: data.Struct reads its annotations as shapes.

from types import SimpleNamespace

from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, fifo, stream
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from tandem.geometry import CoreGeometry, is_pow2
from tandem.isa import MatFlag, WFmt
from tandem.numerics import BLOCK, MAX_DOT_LEN, acc_lsb_exponent

from .arith import (
    AccToFP16,
    AccumulatorShift,
    BlockAlign,
    BlockSum,
    NibbleDotPair,
    QuantScale,
    quant_sum_shape,
    xsum_shape,
)
from .component import GeometryComponent
from .quant import QUANT_FORMATS, quant_params
from .quant import log2_exact as _log2
from .sampler import KEY_SCHEDULE, MatvecSampling, Sampler, SampleResult, feed_layout

__all__ = ["Block", "MatrixUnit", "MatvecCommand", "MatvecFlags", "MatvecSampling"]

Block = data.ArrayLayout(unsigned(16), BLOCK)
"""One 64-element binary16 row: an input block, a bias row, a result row."""

_LAM0 = int(acc_lsb_exponent(0))
"""Accumulator LSB exponent for ``xe_max = 0``: ``lam = xe_max + _LAM0``."""

_MAX_GROUPS = -(-0xFFFF // BLOCK)
"""Row groups of the largest command (``rows`` is a 16-bit field)."""

_BIAS_XE = 25
"""A bias element is placed like a block sum ``sig * 2**(exp - 25)`` with ``xe = 25``:
``numerics.bias_to_acc`` shifts by ``exp - 25 - lam`` = ``block_shift(exp, 25, xe_max)``."""


class MatvecFlags(data.Struct):
    """``MATVEC`` flags in the bit order of :class:`tandem.isa.MatFlag`, so that the instruction's
    flag field casts to it unchanged. The MPU reads ``bias`` and ``argmax``; the ``live_*`` bits
    are resolved by the controller into the command's ``live_rows`` and ``live_cols``."""

    bias: 1
    argmax: 1
    live_rows: 1
    live_cols: 1


for _name, _field in data.Layout.cast(MatvecFlags):
    if 1 << _field.offset != MatFlag[_name.upper()]:
        raise AssertionError(f"MatvecFlags.{_name} is not at MatFlag's bit position")


class MatvecCommand(data.Struct):
    """One ``MATVEC`` as the MPU sees it.

    ``rows``/``cols`` are the allocated shape; ``live_rows``/``live_cols`` the part to compute
    (equal to ``rows``/``cols`` unless a ``LIVE_*`` flag is set). The MPU uses
    ``min(live, allocated)`` of each. ``sampling`` matters only with ``flags.argmax``.
    ``wfmt``/``wgroup`` are the instruction's fields (:class:`tandem.isa.WFmt`,
    :data:`tandem.isa.WGROUPS`): a quantized matrix (``wfmt`` 1 or 2) is dense, ``live_*`` equal
    to ``rows``/``cols`` (the controller refuses anything else as an illegal instruction).
    ``fwd``: a forwarding product (tandem.isa): after the x blocks one more transfer on ``x``
    carries a row that replaces matrix row ``fwd_index`` (FP16, one column block; set only
    with a live row and column); with ``fwd_col`` it replaces column ``fwd_index`` instead (its
    element ``r`` is row ``r``; FP16, one row group, ``fwd_index`` the last live column).
    """

    rows: unsigned(16)
    cols: unsigned(16)
    live_rows: unsigned(16)
    live_cols: unsigned(16)
    flags: MatvecFlags
    sampling: MatvecSampling
    wfmt: unsigned(2)
    wgroup: unsigned(2)
    fwd: 1
    fwd_col: 1
    fwd_index: unsigned(16)

    def eff_rows(self):
        """``min(live_rows, rows)``: the rows computed."""
        return Mux(self.live_rows < self.rows, self.live_rows, self.rows)

    def eff_cols(self):
        """``min(live_cols, cols)``: the columns computed."""
        return Mux(self.live_cols < self.cols, self.live_cols, self.cols)


def _probe(unit):
    """A unit built only to read its latency: it is never elaborated, so silence Amaranth's
    unused-elaboratable warning for it."""
    unit._MustUse__silence = True
    return unit


class MatrixUnit(GeometryComponent):
    """Matrix-vector unit: ``lanes`` rows x 64 columns of block-floating-point products per cycle.

    For each command it loads the input vector ``x`` (``n_cb = ceil(live_cols / 64)`` blocks,
    aligned once into an on-chip buffer), then consumes the weight tiles of the live part in the
    tiled order of :mod:`tandem.layout`: for each row group ``g`` (64 rows), for each column block
    ``cb``, for each row block ``rb`` (``64 / lanes`` of them), one tile of ``lanes`` rows x 64
    columns (quantized: ``span`` columns, below). The arithmetic is
    :func:`tandem.numerics.matvec`, bit for bit: per lane and tile, ``BlockAlign`` of the 64
    weights, the lane pair's ``NibbleDotPair`` with x block ``cb``,
    ``AccumulatorShift`` into the row's 64-bit accumulator; after the last ``cb`` the bias
    (``numerics.bias_to_acc``) is added and ``AccToFP16`` rounds, with the canonical NaN for rows
    that saw a non-finite operand. Columns at or past ``live_cols`` in the last block count as +0
    for x and the weights (stale HBM data there does not matter), also for the block exponents.

    Quantized matrices (``wfmt`` INT8 or INT4; dense) follow :func:`tandem.numerics.matvec_quant`
    on the same DSP array: a tile is one beat of every channel, ``span`` = 128 (INT8) or 256
    (INT4) columns per lane, i.e. 2 or 4 blocks, and a scale beat precedes every ``K`` tiles
    (tandem.layout's quantized tiled form). Per lane and block, ``NibbleDotPair`` gives ``P =
    sum (q - zero) * x``, a ``QuantScale`` places ``+-m_s * P``, and the blocks' terms are summed
    into the accumulator, whose LSB is ``bits`` higher (``quant_lsb_exponent``); the bias is
    placed there too. The scale beat's entries (32 per lane: binary16 scales, then zero points)
    wait in per-lane registers; block ``b`` of a tile takes entry ``b // (k / e)`` of the
    tile's ``e``.

    The code follows the datapath: :meth:`_command`, :meth:`_x_load`, :meth:`_credits` (output
    FIFO and bias buffer), :meth:`_tiles` (acceptance and the per-stage tags),
    :meth:`_tile_pipeline` (the lanes), :meth:`_result_rows`, :meth:`_argmax` and
    :meth:`_sequence` (the command FSM).

    Parameters
    ----------
    geom : CoreGeometry
        Only ``lanes`` and ``tree`` (must be 64) matter; the tile is one beat of every channel.
    max_cols : int
        Longest input vector (size of the aligned x buffer); default the VBUF capacity, at most
        :data:`tandem.numerics.MAX_DOT_LEN`. A command with more live columns is not defined
        (the controller must not issue one).
    external_sampler : bool
        Leave the :class:`rtl.sampler.Sampler` out and expose its ports instead
        (``sample_feed``, ``sample_result``): the core places it in another SLR
        (:mod:`tandem.floorplan`). Default: the unit holds its own.

    Members
    -------
    cmd : In(stream.Signature(MatvecCommand))
    x : In(stream.Signature(Block))
        The ``n_cb`` live input blocks, in order, at the start of each command; with
        ``fwd`` (a forwarding product, tandem.isa) then one more transfer, the row that
        replaces matrix row ``fwd_index`` (taken raw and put in that row's lane in place of its
        tile's: the row's HBM copy may be stale, a store to it still in flight); with
        ``fwd_col``, the column that replaces matrix column ``fwd_index`` (element ``r`` in place
        of row ``r``'s element there).
    weights : In(stream.Signature(ArrayLayout(Block, lanes)))
        One tile per transfer; ``payload[lane][j]`` is row ``rb*lanes + lane`` of the group,
        column ``cb*64 + j``. Its bits are the channel beats of one tile concatenated (channel 0
        in the low bits), exactly as :func:`tandem.layout.pack_tiled` stores them.
    bias : In(stream.Signature(Block))
        With ``flags.bias``: one row per row group (bias of rows ``g*64 .. g*64+63``). Accepted
        from the command's start, up to ``n_groups`` rows.
    result : Out(stream.Signature(Block))
        Without ``flags.argmax``: one row per row group, element ``i`` = row ``g*64 + i``. Rows at
        or past ``live_rows`` are +0 (the controller writes only live rows).
    argmax : Out(stream.Signature(unsigned(16)))
        With ``flags.argmax``: one transfer per command, the lowest row index of the largest
        accumulator (bias included, non-finite flags ignored) among the live rows; or, when
        the command's ``sampling`` word has a temperature, the row :mod:`tandem.sampling`
        draws (:meth:`_sample`).
    busy : Out(1)
        A command is in progress or result rows are still to leave (``cmd.ready`` may be high
        while the last command drains).
    sample_feed : Out(rtl.sampler.feed_layout(lanes)), sample_result : In(SampleResult)
        Only with ``external_sampler``: the sampler's input, every cycle (the command's start,
        the rounded candidate rows), and its one-cycle answer, which the unit keeps until the
        index transfer. Each register the core puts on either adds a cycle to a sampling
        command's tail.

    Timing
    ------
    Throughput: one tile (``lanes x 64`` MACs) per cycle, with no bubble between tiles, column
    blocks or row groups while the weight stream is valid and the outputs are ready. Group ends
    are not a pipeline step: the final sum of a row block leaves the accumulators the cycle it is
    formed and is rounded by ``lanes`` AccToFP16 units (one row block per cycle, the rate tiles
    arrive), into a :attr:`result_depth`-row output FIFO. Tiles stall only when that FIFO, or
    with a bias the :attr:`bias_depth`-row bias buffer, could run out (credits are taken when
    the tile that needs them is accepted), or before ``x`` is loaded.

    Cycles of one command whose streams never stall, from the cycle ``cmd`` is accepted up to
    the first cycle ``cmd.ready`` is high again::

        1 + n_cb + x_latency + beats + tail

        n_groups = ceil(min(live_rows, rows) / 64),  n_cb = ceil(min(live_cols, cols) / 64)
        beats = n_groups * n_cb * (64 / lanes)          FP16 (the tiles)
        beats = T + ceil(T / K),                        quantized: T = n_groups * ceil(n_cb / k)
                                                        * (64 / lanes) tiles, k = 2 (INT8) or 4
                                                        (INT4) blocks per tile, and the scale
                                                        beats (:meth:`weight_beats`)
        x_latency = A + X + 1                    (7)    x alignment, block sum, buffer write
        tail = 0                                        the next command is taken in the cycle
                                                        after the last tile (results drain)
        tail = argmax_latency = A+D+L+4+log2(lanes)     with ARGMAX (tiny 22, u55c 25);
                                                        the index transfer is 1 cycle earlier
        P = pipeline_depth = 1 + A + D + L + 2 + R   (25)

    with the unit latencies of rtl/arith.py (:attr:`latencies`): BlockAlign ``A`` = 3,
    BlockSum ``X`` = 3, NibbleDotPair ``D`` = 8, the place step ``L`` = 6 (QuantScale, 4, and
    the two-stage sum of a tile's block terms; FP16's AccumulatorShift, 2, is delayed to the
    same stage so that commands of different formats overlap), AccToFP16 ``R`` = 5. The x load
    is ``n_cb`` cycles at one block per cycle; a forwarding product's row is one more
    transfer, during the x latency (it adds no cycle when it arrives within it). Commands
    overlap: after the last tile of a command without ARGMAX the unit takes the next command
    and loads its x while the pipeline drains (every stage after the input takes the
    command's state, xe_max, the x non-finite flag, BIAS and ARGMAX, from the tile's tag), so
    a run of commands costs the sum of the formula. The
    last result row leaves :attr:`drain_latency` (P + 3, 28) cycles after the last tile;
    ``busy`` stays high until then. An ARGMAX command's index transfer is the last thing it
    does: the next command waits for it.

    Sampling (an ARGMAX whose ``sampling`` word has ``T_q != 0``) adds no cycle to the tiles:
    each lane inserts its rows' binary16 results into a sorted list as they are rounded. Its
    tail after the last tile (:meth:`sample_tail`) is::

        tail = sample_latency + sum over lanes (n_l + 1) + min(K, rows)
        sample_latency = P + 16 = st_out + 17             (tiny and u55c 41)
        n_l = min(K, live rows of lane l)                 (the lane of row i is i mod lanes)

    the merge of the lane lists (``n_l`` entries and one cycle to move on, per lane), then the
    scan of the top ``K`` through the stream. At most ``sample_latency + lanes * (K + 1) + K``:
    for u55c and K = 64, 1,145 cycles, about 0.6% of a gpt2 token (about 188,000 cycles).
    The scan also waits for the key schedule (29 cycles from the command's acceptance), which
    no command of one or more tiles reaches (``cycles`` keeps the bound anyway).
    The lists, the merge, the scan and the choice are the :class:`rtl.sampler.Sampler`'s, the
    unit's own submodule; in the u55c core it is a block of its own in SLR2, and the 2 + 2
    registers of its feed and answer add 4 cycles to this tail (rtl/core.py).

    Cost of sampling (the sampler; one list of K = 64 entries of 33 bits per lane, one more
    for the merge): ``(lanes + 1) * 64 * 33`` flip-flops (tiny 6,336, u55c 35,904) and as
    many 32-bit comparators as entries; one Simon32/64 pipeline (32 rounds, 8 stages), one
    4,096 x 16-bit table, one 16 x 16 multiply. Every path is a compare, a few muxes, four
    cipher rounds (one LUT level each) or one add. Measured on the tiny MPU synthesized alone
    (Yosys, ``scripts/timing.py`` walking its netlist, 2026-12-06): no sampling register is
    more than 6 LUT levels from the registers before it; the unit's deepest paths (7 and 8
    levels) are the bias shifter's and the x mask's, as before sampling. Sampling costs the tiny
    MPU 14,555 LUTs, 7,905 flip-flops and 1 DSP (37,681 / 29,796 / 129 against 23,126 /
    21,891 / 128 without; same synthesis), nearly all in its three lists (about 4,300 LUTs
    each); for u55c's 17 lists that extrapolates to about 75,000 LUTs (under 6% of the U55C's
    1.3M) and 36,000 flip-flops (docs/numerics.md, Sampling). A smaller TOP_K_MAX would cut
    the lists in proportion.

    Degenerate commands, as :mod:`tandem.golden.isasim` defines them: with no live column the unit
    takes neither x nor tiles but computes as if on one all-zero block (``n_cb`` = 1 in the
    formula; the result rows are the bias rounded, or +0, and the bias stream is consumed as
    usual). With no live row it takes nothing but the command and produces no rows (argmax:
    index 0), in 2 cycles.
    """

    def __init__(
        self,
        geom: CoreGeometry,
        *,
        max_cols: int | None = None,
        external_sampler: bool = False,
    ):
        if not isinstance(geom, CoreGeometry):
            raise ValueError(f"geom must be a tandem.geometry.CoreGeometry, not {geom!r}")
        if not is_pow2(geom.lanes) or geom.lanes > BLOCK:
            raise ValueError(
                f"lanes must be a power of two from 1 to {BLOCK} (a row group of 64 rows is "
                f"64/lanes tiles), not {geom.lanes!r}"
            )
        geom.check_rules()  # tree == BLOCK, and a tile is one beat of every channel
        if max_cols is None:
            max_cols = min(MAX_DOT_LEN, geom.vbuf_elems)
        if not isinstance(max_cols, int) or not BLOCK <= max_cols <= MAX_DOT_LEN:
            raise ValueError(f"max_cols must be an int in {BLOCK}..{MAX_DOT_LEN}, not {max_cols!r}")
        if max_cols % BLOCK:
            raise ValueError(f"max_cols must be a multiple of {BLOCK}, not {max_cols}")
        self._lanes = geom.lanes
        self._external_sampler = bool(external_sampler)
        self._stride = BLOCK // geom.lanes
        self._x_blocks = max_cols // BLOCK
        nib = _probe(NibbleDotPair())
        a = _probe(BlockAlign()).latency
        d = nib.latency
        h = _probe(AccumulatorShift()).latency
        q = _probe(QuantScale()).latency
        r = _probe(AccToFP16()).latency
        xs = _probe(BlockSum()).latency
        if a < 2:
            raise ValueError(f"BlockAlign must take 2 or more cycles ({a}): x is read at A-2")
        # place: from the block sums to the accumulator, the same for every format (commands of
        # different formats overlap in the pipeline): QuantScale and a two-stage sum of the
        # four blocks' terms, or AccumulatorShift and a delay
        place = max(q + 2, h)
        self._lat = {"align": a, "dot": d, "shift": h, "scale": q, "round": r, "xsum": xs}
        self._lat["place"] = place
        # Stages count cycles after the input register (stage 0) that holds an accepted tile.
        self._st_acc = a + d + place  # accumulate (the placed block term arrives)
        self._st_out = self._st_acc + 2 + r  # result assembly: +1 final sum, +1 bias added, round
        self._st_amax = self._st_acc + 2 + (self._lanes - 1).bit_length()  # argmax compare
        # Output FIFO: a group claims a row when its last tile is accepted and frees it when the
        # row leaves, st_out + 3 cycles later without stalls; one group ends every 64/lanes
        # cycles at most, so this depth never stalls an unstalled stream.
        self._result_depth = max(2, -(-(self._st_out + 3) // self._stride) + 1)
        # Bias rows: claimed at a group's first last-column-block tile, popped when the group's
        # last tile reaches the bias shifter (stride + st_acc - h cycles), refilled 2 cycles later.
        self._bias_depth = max(2, -(-(self._st_acc - h + self._stride + 3) // self._stride) + 1)
        super().__init__(
            geom,
            {
                "cmd": In(stream.Signature(MatvecCommand)),
                "x": In(stream.Signature(Block)),
                "weights": In(stream.Signature(data.ArrayLayout(Block, self._lanes))),
                "bias": In(stream.Signature(Block)),
                "result": Out(stream.Signature(Block)),
                "argmax": Out(stream.Signature(unsigned(16))),
                "busy": Out(1),
            }
            | (
                {"sample_feed": Out(feed_layout(self._lanes)), "sample_result": In(SampleResult)}
                if external_sampler
                else {}
            ),
        )

    # read-only parameters -------------------------------------------------------------------

    @property
    def lanes(self) -> int:
        return self._lanes

    @property
    def max_cols(self) -> int:
        return self._x_blocks * BLOCK

    @property
    def latencies(self) -> dict[str, int]:
        """Latencies of the arithmetic units the pipeline is built from (rtl/arith.py)."""
        return dict(self._lat)

    @property
    def x_latency(self) -> int:
        """Cycles from the last x transfer to the first cycle a tile can be accepted, minus one:
        the x block's alignment (BlockAlign), its sum (BlockSum) and its write into the x
        buffer."""
        return self._lat["align"] + self._lat["xsum"] + 1

    @property
    def pipeline_depth(self) -> int:
        """Register stages from an accepted tile to its group's result row: input register,
        BlockAlign, NibbleDotPair, the place step (QuantScale and the blocks' sum, or
        AccumulatorShift), accumulate, bias add, AccToFP16."""
        return self._st_out + 1

    @property
    def drain_latency(self) -> int:
        """Cycles from the last tile transfer to ``busy`` falling, when the result stream is
        ready: the pipeline, the output FIFO (write, read-out: 2), the transfer and the credit
        return."""
        return self.pipeline_depth + 3

    @property
    def argmax_latency(self) -> int:
        """As :attr:`drain_latency` with ``ARGMAX``: input register, BlockAlign, NibbleDotPair,
        the place step, accumulate, bias add, a log2(lanes)-level max tree, the running
        compare, and the index transfer."""
        return self._st_amax + 2

    @property
    def result_depth(self) -> int:
        """Rows the output FIFO holds (enough for no stall at one tile per cycle)."""
        return self._result_depth

    @property
    def bias_depth(self) -> int:
        """Rows the bias buffer holds."""
        return self._bias_depth

    @property
    def sample_latency(self) -> int:
        """The fixed part of a sampling command's tail (see Timing): the pipeline to the
        rounded rows (``st_out``), the lane lists (2), the start of the scan (1), the scan's end
        marker (1), the stream (8 stages of 4 rounds), the Gumbel table, ``T_q * g_q``, the
        score, the running maximum and the index transfer (6)."""
        return self._st_out + 17

    def sample_tail(self, k: int, rows: int | None = None) -> int:
        """Cycles a sampling command adds after its last tile (``tail`` in Timing) with top-k
        ``k`` over ``rows`` live rows (default: enough to fill every lane's list), for
        commands long enough that the key schedule is done (all but the shortest)."""
        if rows is None:
            rows = self._lanes * k
        per_lane = [len(range(lane, rows, self._lanes)) for lane in range(self._lanes)]
        merge = sum(min(k, n) + 1 for n in per_lane)
        return self.sample_latency + merge + min(k, rows)

    def weight_beats(self, n_groups: int, n_cb: int, wfmt=0, wgroup: int = 0) -> int:
        """Transfers on ``weights`` of a command with ``n_groups`` row groups and ``n_cb``
        64-column blocks: its tiles, and for a quantized matrix (``wfmt`` INT8/INT4) its scale
        beats, one before every ``K`` tiles (tandem.layout)."""
        if n_groups == 0 or n_cb == 0:
            return 0
        if wfmt == WFmt.FP16:
            return n_groups * n_cb * self._stride
        q = quant_params(wfmt, wgroup)
        tiles = n_groups * -(-n_cb // q.blocks) * self._stride
        return tiles + -(-tiles // q.run)

    def cycles(
        self,
        n_groups: int,
        n_cb: int,
        *,
        argmax: bool = False,
        sample: tuple | None = None,
        wfmt=0,
        wgroup: int = 0,
    ) -> int:
        """The documented cycle count of one command whose streams never stall (see Timing).
        ``sample``: ``(K, live rows)`` of an ARGMAX that samples; ``wfmt``/``wgroup``: a
        quantized matrix (its tiles and scale beats, :meth:`weight_beats`)."""
        if n_groups == 0:
            return 2
        if n_cb == 0:  # no live column: one all-zero FP16 block of the unit's own
            n_cb, wfmt = 1, WFmt.FP16
        base = 1 + n_cb + self.x_latency + self.weight_beats(n_groups, n_cb, wfmt, wgroup)
        if sample is not None:
            k, rows = sample
            tail = self.sample_tail(k, rows)
            # the scan waits for the key schedule (29 cycles after the command's acceptance)
            return max(base + tail, KEY_SCHEDULE + 15 + min(k, rows))
        tail = self.argmax_latency if argmax else 0
        return base + tail

    # ----------------------------------------------------------------------------------------

    def elaborate(self, platform):
        m = Module()
        c = self._command(m)
        x = self._x_load(m, c)
        cr = self._credits(m)
        t = self._tiles(m, c, x, cr)
        rounded, total = self._tile_pipeline(m, x, cr, t)
        self._result_rows(m, t.tags, rounded, cr.out_fifo)
        best, amax_done = self._argmax(m, t.tags, total)
        smp = self._sample(m, c, t.tags, rounded)
        self._sequence(m, c, x, cr, t, best, amax_done, smp)
        return m

    def _command(self, m):
        """The command's registers (set when it is accepted, :meth:`_sequence`) and its shape."""
        cmd = self.cmd.payload
        last_cb = Signal(range(self._x_blocks))  # the last x block
        last_tcb = Signal(range(self._x_blocks))  # the last tile column (quantized: span wide)
        fmt = Signal(2)  # WFmt of the tiles (FP16 when there is no live column)
        # quantized: log2 of the scale beat's run K, of the entries per tile e, of the blocks
        # per entry k / e (tandem.layout, through quant_params)
        run_log2 = Signal(range(6))
        ent_log2 = Signal(2)
        per_log2 = Signal(2)
        last_grp = Signal(range(_MAX_GROUPS))
        do_bias = Signal()
        do_argmax = Signal()
        do_fwd = Signal()  # a forwarding product: one more x transfer, its row patched in
        do_fwd_col = Signal()  # ... its column patched in instead (the last live column)
        fwd_sel = Signal(BLOCK)  # one-hot: the forwarded column within its block
        fwd_index = Signal(16)
        fwd_vec = Signal(Block)
        rows_left = Signal(17)  # live rows from the current group on
        # sampling (an ARGMAX whose sampling word has a temperature; tandem.sampling)
        do_sample = Signal()
        accept = Signal()  # the command is taken this cycle

        eff_rows = Signal(16)
        eff_cols = Signal(16)
        m.d.comb += [eff_rows.eq(cmd.eff_rows()), eff_cols.eq(cmd.eff_cols())]
        return SimpleNamespace(
            payload=cmd,
            last_cb=last_cb,
            last_tcb=last_tcb,
            fmt=fmt,
            run_log2=run_log2,
            ent_log2=ent_log2,
            per_log2=per_log2,
            last_grp=last_grp,
            do_bias=do_bias,
            do_argmax=do_argmax,
            do_fwd=do_fwd,
            do_fwd_col=do_fwd_col,
            fwd_sel=fwd_sel,
            fwd_index=fwd_index,
            fwd_vec=fwd_vec,
            fwd_loading=Signal(),
            do_sample=do_sample,
            accept=accept,
            rows_left=rows_left,
            eff_rows=eff_rows,
            eff_cols=eff_cols,
            groups=(eff_rows + BLOCK - 1) >> 6,
            cbs=(eff_cols + BLOCK - 1) >> 6,
        )

    def _x_load(self, m, c):
        """The x load: each block is aligned once (:class:`BlockAlign`) and summed
        (:class:`BlockSum`, for the quantized formats) into the x buffer, and the command's
        ``xe_max`` and x non-finite flag are gathered on the way. The buffer is four banks (block
        ``b`` in bank ``b % 4`` at ``b // 4``), so that an INT4 tile reads its four blocks, an
        INT8 tile its two, in one cycle."""
        A, S_, xb = self._lat["align"], self._lat["xsum"], self._x_blocks
        x_entry = data.StructLayout(
            {"q": data.ArrayLayout(signed(12), BLOCK), "e": unsigned(5), "sum": xsum_shape(BLOCK)}
        )
        banks, wrs, rds = [], [], []
        for b in range(4):
            mem = Memory(shape=x_entry, depth=max(1, -(-xb // 4)), init=[])
            m.submodules[f"xbuf{b}"] = mem
            banks.append(mem)
            wrs.append(mem.write_port())
            rds.append(mem.read_port(domain="sync"))

        m.submodules.x_align = x_align = BlockAlign()
        m.submodules.x_sum = x_sum = BlockSum()
        x_count = Signal(range(xb))
        x_in = Signal(Block)
        # Dead columns of the last block become +0 by one wide AND with an element mask, not per
        # element: simulators (Icarus most of all) re-run a piecewise-written register's whole
        # process for every changed piece (it cost the tile path 1.8x on Icarus). The mask is a
        # register so that its uses stay one name in the Verilog (Verilator refuses lines of
        # over 40,000 tokens, which a mask expanded bit by bit into 16 lanes makes).
        last_keep = Signal(BLOCK * 16)  # all ones for live columns of the last block
        W = A + S_  # the stage that writes the buffer
        xv = [Signal(name=f"x_valid{i}") for i in range(W + 1)]
        xa = [Signal(range(xb), name=f"x_addr{i}") for i in range(W + 1)]
        for i in range(W):
            m.d.sync += [xv[i + 1].eq(xv[i]), xa[i + 1].eq(xa[i])]
        xe_max = Signal(5)
        x_nonfinite = Signal()
        # With no live column the unit computes on one all-zero x block and all-zero tiles of
        # its own (consuming neither stream), as the ISA simulator defines: results = bias.
        no_cols = Signal()
        loading = Signal()
        x_take = loading & (self.x.valid | no_cols)
        m.d.comb += self.x.ready.eq((loading & ~no_cols) | c.fwd_loading)
        with m.If(c.fwd_loading & self.x.valid):  # the forwarded row, as it comes (no align)
            m.d.sync += c.fwd_vec.eq(self.x.payload)
        m.d.sync += [xv[0].eq(x_take), xa[0].eq(x_count)]
        x_last_block = x_count == c.last_cb
        with m.If(x_take):
            x_keep = Mux(x_last_block, last_keep, Const(-1, BLOCK * 16))
            m.d.sync += x_in.eq(Mux(no_cols, 0, self.x.payload.as_value() & x_keep))
        xo = x_align.o.payload
        q_d, e_d = xo.q.as_value(), xo.exp
        for i in range(S_):  # q and the exponent wait for the block's sum
            q_n = Signal(len(q_d), name=f"x_q_d{i + 1}")
            e_n = Signal(5, name=f"x_e_d{i + 1}")
            m.d.sync += [q_n.eq(q_d), e_n.eq(e_d)]
            q_d, e_d = q_n, e_n
        m.d.comb += [
            x_align.i.payload.x.as_value().eq(x_in.as_value()),
            x_align.i.valid.eq(xv[0]),
            x_align.o.ready.eq(1),  # never stalls: every unit below advances each cycle
            x_sum.i.payload.x.eq(xo.q),
            x_sum.i.valid.eq(1),
            x_sum.o.ready.eq(1),
        ]
        for b, wr in enumerate(wrs):
            m.d.comb += [
                wr.en.eq(xv[W] & (xa[W][:2] == b)),
                wr.addr.eq(xa[W] >> 2),
                wr.data.q.as_value().eq(q_d),
                wr.data.e.eq(e_d),
                wr.data.sum.eq(x_sum.o.payload.sum),
            ]
        with m.If(xv[A]):
            with m.If(xo.exp > xe_max):
                m.d.sync += xe_max.eq(xo.exp)
            with m.If(xo.nonfinite):
                m.d.sync += x_nonfinite.eq(1)
        return SimpleNamespace(
            rd=rds,
            count=x_count,
            last_keep=last_keep,
            valid=xv,
            xe_max=xe_max,
            nonfinite=x_nonfinite,
            no_cols=no_cols,
            loading=loading,
            take=x_take,
            last_block=x_last_block,
        )

    def _credits(self, m):
        """The output FIFO and the bias buffer, with the credits tiles take from them."""
        rd = self._result_depth
        m.submodules.out_fifo = out_fifo = fifo.SyncFIFOBuffered(width=BLOCK * 16, depth=rd)
        m.submodules.bias_fifo = bias_fifo = fifo.SyncFIFO(width=BLOCK * 16, depth=self._bias_depth)
        out_free = Signal(range(rd + 1), init=rd)
        bias_avail = Signal(range(self._bias_depth + 1))
        bias_todo = Signal(range(_MAX_GROUPS + 1))
        out_claim = Signal()
        bias_claim = Signal()
        result_taken = self.result.valid & self.result.ready
        bias_taken = self.bias.valid & self.bias.ready
        m.d.sync += out_free.eq(out_free + result_taken - out_claim)
        m.d.sync += bias_avail.eq(bias_avail + bias_taken - bias_claim)
        with m.If(bias_taken):
            m.d.sync += bias_todo.eq(bias_todo - 1)
        m.d.comb += [
            bias_fifo.w_data.eq(self.bias.payload.as_value()),
            bias_fifo.w_en.eq(bias_taken),
            self.result.payload.eq(out_fifo.r_data),
            self.result.valid.eq(out_fifo.r_rdy),
            out_fifo.r_en.eq(self.result.ready),
        ]
        return SimpleNamespace(
            out_fifo=out_fifo,
            bias_fifo=bias_fifo,
            out_free=out_free,
            bias_avail=bias_avail,
            bias_todo=bias_todo,
            out_claim=out_claim,
            bias_claim=bias_claim,
        )

    def _tiles(self, m, c, x, cr):
        """Tile counters and acceptance, the input register, and the tags that carry each
        tile's position and its command's state down the pipeline (``tags[i]`` is stage i)."""
        lanes, stride, xb = self._lanes, self._stride, self._x_blocks
        n_stages = max(self._st_out, self._st_amax) + 1
        rb = Signal(range(stride))
        cb = Signal(range(xb))  # the tile's column: 64 columns at FP16, span when quantized
        grp = Signal(range(_MAX_GROUPS))
        is_last_cb = cb == c.last_tcb
        is_group_end = is_last_cb & (rb == stride - 1)
        is_cmd_end = is_group_end & (grp == c.last_grp)
        need_out = is_group_end & ~c.do_argmax
        need_bias = is_last_cb & (rb == 0) & c.do_bias
        streaming = Signal()
        # Quantized: a scale beat comes before every K tiles (tandem.layout); it is taken with no
        # credit and computes nothing, its entries move into the lanes' scale registers.
        need_scale = Signal()
        run_left = Signal(range(64))  # tiles left in the current scale beat's run
        can_take = (
            streaming
            & ~need_scale
            & (~need_out | (cr.out_free != 0))
            & (~need_bias | (cr.bias_avail != 0))
        )
        scale_take = streaming & need_scale & self.weights.valid
        m.d.comb += self.weights.ready.eq(((streaming & need_scale) | can_take) & ~x.no_cols)
        tile_take = can_take & (self.weights.valid | x.no_cols)
        quant = c.fmt != WFmt.FP16
        with m.If(scale_take):
            m.d.sync += [need_scale.eq(0), run_left.eq(1 << c.run_log2)]
        with m.Elif(tile_take & quant):
            m.d.sync += run_left.eq(run_left - 1)
            with m.If(run_left == 1):
                m.d.sync += need_scale.eq(1)
        m.d.comb += [
            cr.out_claim.eq(tile_take & need_out),
            cr.bias_claim.eq(tile_take & need_bias),
        ]

        tag_layout = data.StructLayout(
            {
                "valid": 1,
                "rb": range(stride),
                "cb": range(xb),
                "grp": range(_MAX_GROUPS),
                "first": 1,
                "last": 1,
                "group_end": 1,
                "cmd_end": 1,
                "live": lanes,
                # the command's state the later stages use, so the next command may start while
                # this one drains
                "xe_max": 5,
                "x_nonfinite": 1,
                "bias": 1,
                "argmax": 1,
                "sample": 1,
                "fmt": 2,
            }
        )
        tags = [Signal(tag_layout, name=f"tag{i}") for i in range(n_stages)]
        for i in range(n_stages - 1):
            m.d.sync += tags[i + 1].eq(tags[i])
        live = Signal(lanes)
        for lane in range(lanes):
            m.d.comb += live[lane].eq(rb * lanes + lane < c.rows_left)
        m.d.sync += [
            tags[0].valid.eq(tile_take),
            tags[0].rb.eq(rb),
            tags[0].cb.eq(cb),
            tags[0].grp.eq(grp),
            tags[0].first.eq(cb == 0),
            tags[0].last.eq(is_last_cb),
            tags[0].group_end.eq(is_group_end),
            tags[0].cmd_end.eq(is_cmd_end),
            tags[0].live.eq(live),
            tags[0].xe_max.eq(x.xe_max),
            tags[0].x_nonfinite.eq(x.nonfinite),
            tags[0].bias.eq(c.do_bias),
            tags[0].argmax.eq(c.do_argmax),
            tags[0].sample.eq(c.do_sample),
            tags[0].fmt.eq(c.fmt),
        ]
        tile_in = Signal(data.ArrayLayout(Block, lanes))
        # Each lane's scale beat share (tandem.layout.pack_quant_tiled): 32 binary16 scales in
        # bits 0..511, then 32 zero points of `bits` bits. The registers shift by the tile's e
        # entries as tiles are taken, so the tile's entries are always the first ones; block b
        # of the tile takes entry b // (k / e). They are registered with the tile (stage 0).
        int8 = c.fmt == WFmt.INT8
        q_scale = Signal(data.ArrayLayout(data.ArrayLayout(unsigned(16), 4), lanes))
        q_zero = Signal(data.ArrayLayout(data.ArrayLayout(unsigned(8), 4), lanes))
        for lane in range(lanes):
            beat = self.weights.payload[lane].as_value()
            ssc = Signal(32 * 16, name=f"scales{lane}")
            szr = Signal(32 * 8, name=f"zeros{lane}")
            with m.If(scale_take):
                m.d.sync += [ssc.eq(beat[: 32 * 16]), szr.eq(beat[32 * 16 : 32 * 24])]
            with m.Elif(tile_take & quant), m.Switch(c.ent_log2):
                for el in range(3):
                    with m.Case(el):
                        e = 1 << el
                        m.d.sync += [
                            ssc.eq(ssc >> (16 * e)),
                            szr.eq(Mux(int8, szr >> (8 * e), szr >> (4 * e))),
                        ]
            for b in range(4):
                j = [b >> pl for pl in range(3)]  # the entry of block b, by log2(k / e)
                sc = Mux(
                    c.per_log2 == 0,
                    ssc.word_select(j[0], 16),
                    Mux(c.per_log2 == 1, ssc.word_select(j[1], 16), ssc.word_select(j[2], 16)),
                )
                z8 = [szr.word_select(jj, 8) for jj in j]
                z4 = [szr.word_select(jj, 4) for jj in j]
                zr = Mux(
                    c.per_log2 == 0,
                    Mux(int8, z8[0], z4[0]),
                    Mux(c.per_log2 == 1, Mux(int8, z8[1], z4[1]), Mux(int8, z8[2], z4[2])),
                )
                with m.If(tile_take):
                    m.d.sync += [q_scale[lane][b].eq(sc), q_zero[lane][b].eq(zr)]
        # A forwarding product's row fwd_index comes from fwd_vec, not from its tile: the lane
        # whose row it is takes it (one compare of the tile's row and the registered index; in
        # the same LUT as the column mask, one more input per bit). A forwarded column is the
        # last live one, so it lies in the last column block: there each lane's element
        # fwd_index % 64 (one-hot fwd_sel) is the lane's row of fwd_vec, which shifts down by a
        # row block per tile so that the lane always takes element `lane` (no index mux).
        lanes_log2 = _log2(lanes)
        row_hit = c.do_fwd & (c.fwd_index[lanes_log2:] == Cat(rb, grp))
        col_hit = Signal()
        col_mask = Signal(BLOCK * 16)  # the forwarded column's bits (whole-word ops, as in
        m.d.comb += [  # the x load's mask)
            col_hit.eq(c.do_fwd_col & is_last_cb),
            col_mask.eq(Cat(*(b.replicate(16) for b in c.fwd_sel)) & col_hit.replicate(16 * BLOCK)),
        ]
        # The bits every lane keeps from its row: the live columns (the dead ones of the last
        # block are +0), none without a live column, not the forwarded column's. One mask for
        # all lanes, so that each bit of a lane is one LUT of six inputs: its tile bit, the
        # forwarded row's, the lane's row hit, the kept and column masks, the column element.
        keep = Signal(BLOCK * 16)
        m.d.comb += keep.eq(
            Mux(
                x.no_cols,
                0,
                Mux(is_last_cb & ~quant, x.last_keep, Const(-1, BLOCK * 16)) & ~col_mask,
            )
        )
        beat_in = Signal(data.ArrayLayout(Block, lanes))
        for lane in range(lanes):
            hit = row_hit & (c.fwd_index[:lanes_log2] == lane) if lanes_log2 else row_hit
            row = Mux(hit, c.fwd_vec.as_value(), self.weights.payload[lane].as_value())
            elem = c.fwd_vec[lane].replicate(BLOCK)
            m.d.comb += beat_in[lane].eq((row & keep) | (elem & col_mask))
        with m.If(tile_take & col_hit):
            m.d.sync += c.fwd_vec.eq(c.fwd_vec.as_value() >> (16 * lanes))
        with m.If(tile_take):
            m.d.sync += tile_in.eq(beat_in)
            with m.If(rb == stride - 1):
                m.d.sync += rb.eq(0)
                with m.If(is_last_cb):
                    m.d.sync += [cb.eq(0), grp.eq(grp + 1), c.rows_left.eq(c.rows_left - BLOCK)]
                with m.Else():
                    m.d.sync += cb.eq(cb + 1)
            with m.Else():
                m.d.sync += rb.eq(rb + 1)
        return SimpleNamespace(
            rb=rb,
            cb=cb,
            grp=grp,
            streaming=streaming,
            take=tile_take,
            cmd_end=is_cmd_end,
            tags=tags,
            tile_in=tile_in,
            q_scale=q_scale,
            q_zero=q_zero,
            need_scale=need_scale,
        )

    def _tile_pipeline(self, m, x, cr, t):
        """Per lane: BlockAlign of the tile's row (FP16), the lane pair's NibbleDotPair with the
        x blocks (every format), the place step (FP16: AccumulatorShift; quantized: a
        QuantScale per block and the sum of the blocks' terms), the accumulate stage (``K``),
        the bias added (``K + 1``) and AccToFP16. Returns each lane's rounded result and its
        total (for the argmax)."""
        lanes, stride = self._lanes, self._stride
        A, D, H = self._lat["align"], self._lat["dot"], self._lat["shift"]
        Q, P = self._lat["scale"], self._lat["place"]
        K = self._st_acc
        tags = t.tags

        def delay(sig, n, name):
            """``sig`` delayed by ``n`` cycles through registers."""
            for i in range(n):
                nxt = Signal.like(sig, name=f"{name}_d{i + 1}")
                m.d.sync += nxt.eq(sig)
                sig = nxt
            return sig

        def qbits(fmt):
            """The weight width of a quantized format, 0 for FP16 (the accumulator's LSB is
            ``bits`` above FP16's: numerics.quant_lsb_exponent)."""
            return Mux(fmt == WFmt.INT8, 8, Mux(fmt == WFmt.INT4, 4, 0))

        # x blocks for the tile: the banks are read at stage A-2 and the blocks the format
        # needs put in slots 0..3 at A-1, registered, so that they arrive with the aligned
        # weights (FP16: block cb in slot 0; INT8: 2cb, 2cb+1; INT4: 4cb .. 4cb+3).
        t_rd, t_sel = tags[A - 2], tags[A - 1]
        row = Signal(range(max(2, -(-self._x_blocks // 4))), name="x_row")
        with m.Switch(t_rd.fmt):
            with m.Case(WFmt.INT4):
                m.d.comb += row.eq(t_rd.cb)
            with m.Case(WFmt.INT8):
                m.d.comb += row.eq(t_rd.cb >> 1)
            with m.Default():
                m.d.comb += row.eq(t_rd.cb >> 2)
        for rd in x.rd:
            m.d.comb += rd.addr.eq(row)
        x_slot = Signal(data.ArrayLayout(x.rd[0].data.shape(), 4), name="x_slot")
        bank = [rd.data for rd in x.rd]
        half = t_sel.cb[0]
        quarter = t_sel.cb[:2]
        with m.Switch(t_sel.fmt):
            with m.Case(WFmt.INT4):
                m.d.sync += [x_slot[b].eq(bank[b]) for b in range(4)]
            with m.Case(WFmt.INT8):
                m.d.sync += [
                    x_slot[0].eq(Mux(half, bank[2], bank[0])),
                    x_slot[1].eq(Mux(half, bank[3], bank[1])),
                ]
            with m.Default():
                m.d.sync += x_slot[0].eq(Array(v.as_value() for v in bank)[quarter])
        x_exp = [delay(x_slot[b].e, D, f"x_e{b}") for b in range(4)]  # at stage A + D

        t_dot = tags[A]
        t_plc = tags[A + D]  # the place step's input stage
        t_sum = tags[A + D + Q]  # QuantScale's output: the blocks' terms are summed
        t_bias = tags[K - H]
        bias_head = data.ArrayLayout(data.ArrayLayout(unsigned(16), lanes), stride)(
            cr.bias_fifo.r_data
        )
        m.d.comb += cr.bias_fifo.r_en.eq(
            t_bias.valid & t_bias.last & (t_bias.rb == stride - 1) & t_bias.bias
        )
        # the blocks a quantized format fills: INT8 slots 0 and 1, INT4 all four
        q_slots = Signal(4, name="q_slots")
        m.d.comb += q_slots.eq(
            Mux(t_sum.fmt == WFmt.INT4, 0b1111, Mux(t_sum.fmt == WFmt.INT8, 0b0011, 0))
        )

        t_acc = tags[K]
        t_fin = tags[K + 1]
        t_rnd = tags[K + 2]  # AccToFP16's input stage
        # Each lane's 64/lanes accumulators (and their non-finite flags) are a small memory
        # read asynchronously at the accumulate stage and written at its end: distributed RAM
        # on the FPGA, and one process in a simulator instead of one per accumulator.
        acc_entry = data.StructLayout({"value": signed(64), "nonfinite": 1})
        fin = [Signal(signed(64), name=f"fin{ln}") for ln in range(lanes)]
        fin_b = [Signal(signed(64), name=f"fin_b{ln}") for ln in range(lanes)]
        fin_nf = Signal(lanes)
        total = [Signal(signed(64), name=f"total{ln}") for ln in range(lanes)]
        total_nf = Signal(lanes)
        rounded = []
        aligns = []
        for lane in range(lanes):
            align = BlockAlign()
            m.submodules[f"align{lane}"] = align
            m.d.comb += [
                align.i.valid.eq(1),
                align.o.ready.eq(1),
                align.i.payload.x.as_value().eq(t.tile_in[lane].as_value()),
            ]
            aligns.append(align)
        # the quantized words and zero points wait for BlockAlign (stage A)
        q_words = [delay(t.tile_in[lane].as_value(), A, f"qword{lane}") for lane in range(lanes)]
        q_zero = [delay(t.q_zero[lane].as_value(), A, f"qzero{lane}") for lane in range(lanes)]
        sums = []  # per lane: the NibbleDotPair's four block sums (stage A + D)
        for pair in range(-(-lanes // 2)):
            nib = NibbleDotPair()
            m.submodules[f"dot{pair}"] = nib
            m.d.comb += [
                nib.i.valid.eq(1),
                nib.o.ready.eq(1),
                nib.i.payload.fmt.eq(t_dot.fmt),
                nib.i.payload.x.eq(Cat(*(x_slot[b].q.as_value() for b in range(4)))),
                nib.i.payload.xsum.eq(Cat(*(x_slot[b].sum for b in range(4)))),
            ]
            for side, lane in (("a", 2 * pair), ("b", 2 * pair + 1)):
                w_in, z_in = getattr(nib.i.payload, f"w{side}"), getattr(nib.i.payload, f"z{side}")
                if lane >= lanes:  # an odd lane count: the pair's second lane computes zeros
                    m.d.comb += [w_in.eq(0), z_in.eq(0)]
                    continue
                fp_word = aligns[lane].o.payload.q.as_value()
                m.d.comb += [
                    w_in.eq(Mux(t_dot.fmt == WFmt.FP16, fp_word, q_words[lane])),
                    z_in.eq(q_zero[lane]),
                ]
                sums.append(getattr(nib.o.payload, f"s{side}"))

        q_sum_shape = quant_sum_shape(8)
        for lane in range(lanes):
            align = aligns[lane]
            shift = AccumulatorShift(sum_shape=sums[lane][0].shape())
            bshift = AccumulatorShift(sum_shape=signed(12))
            rnd = AccToFP16()
            m.submodules[f"shift{lane}"] = shift
            m.submodules[f"bias_shift{lane}"] = bshift
            m.submodules[f"round{lane}"] = rnd
            for unit in (shift, bshift, rnd):
                m.d.comb += [unit.i.valid.eq(1), unit.o.ready.eq(1)]
            # FP16: block 0's sum placed by AccumulatorShift, then waits for the quantized path
            m.d.comb += [
                shift.i.payload.sum.eq(sums[lane][0]),
                shift.i.payload.w_exp.eq(delay(align.o.payload.exp, D, f"we{lane}")),
                shift.i.payload.x_exp.eq(x_exp[0]),
                shift.i.payload.xe_max.eq(t_plc.xe_max),
            ]
            fp_value = delay(shift.o.payload.value, P - H, f"fp_value{lane}")
            fp_nf = delay(align.o.payload.nonfinite, D + P, f"w_nf{lane}")
            # quantized: each block's term T = +-m_s * P placed by QuantScale, then their sum
            scales = delay(t.q_scale[lane].as_value(), A + D, f"qscale{lane}")
            terms, t_nf = [], []
            for b in range(4):
                qs = QuantScale(sum_shape=q_sum_shape)
                m.submodules[f"qscale{lane}_{b}"] = qs
                m.d.comb += [
                    qs.i.valid.eq(1),
                    qs.o.ready.eq(1),
                    qs.i.payload.sum.eq(sums[lane][b]),  # |P| < 2**25: the low 26 bits
                    qs.i.payload.scale.as_value().eq(scales.word_select(b, 16)),
                    qs.i.payload.x_exp.eq(x_exp[b]),
                    qs.i.payload.xe_max.eq(t_plc.xe_max),
                    qs.i.payload.bits.eq(qbits(t_plc.fmt)),
                ]
                terms.append(Mux(q_slots[b], qs.o.payload.value, 0))
                t_nf.append(q_slots[b] & qs.o.payload.nonfinite)
            s01 = Signal(signed(64), name=f"qs01_{lane}")
            s23 = Signal(signed(64), name=f"qs23_{lane}")
            nf1 = Signal(name=f"qnf1_{lane}")
            q_value = Signal(signed(64), name=f"q_value{lane}")
            q_nf = Signal(name=f"q_nf{lane}")
            m.d.sync += [
                s01.eq(terms[0] + terms[1]),
                s23.eq(terms[2] + terms[3]),
                nf1.eq(Cat(*t_nf).any()),
                q_value.eq(s01 + s23),
                q_nf.eq(nf1),
            ]
            fp_at_acc = t_acc.fmt == WFmt.FP16
            term = Mux(fp_at_acc, fp_value, q_value)
            term_nf = Mux(fp_at_acc, fp_nf, q_nf)
            # bias element of this lane's row, placed by the same shifter as an FP16 block sum,
            # `bits` higher for a quantized matrix (x_exp = 25 - bits: numerics.bias_at at
            # quant_lsb_exponent)
            b_bits = bias_head[t_bias.rb][lane]
            b_field = b_bits[10:15]
            b_sig = Cat(b_bits[:10], b_field != 0)
            m.d.comb += [
                bshift.i.payload.sum.eq(Mux(b_bits[15], -b_sig, b_sig)),
                bshift.i.payload.w_exp.eq(Mux(b_field == 0, 1, b_field)),
                bshift.i.payload.x_exp.eq(_BIAS_XE - qbits(t_bias.fmt)),
                bshift.i.payload.xe_max.eq(t_bias.xe_max),
            ]
            b_nf = delay(b_field == 31, H, f"b_nf{lane}")

            # accumulate (stage K): the first column block starts the row afresh
            accs = Memory(shape=acc_entry, depth=stride, init=[])
            m.submodules[f"acc{lane}"] = accs
            acc_rd = accs.read_port(domain="comb")
            acc_wr = accs.write_port()
            base = Mux(t_acc.first, 0, acc_rd.data.value)
            base_nf = Mux(t_acc.first, 0, acc_rd.data.nonfinite)
            s = Signal(signed(64), name=f"sum{lane}")
            s_nf = Signal(name=f"sum_nf{lane}")
            m.d.comb += [
                acc_rd.addr.eq(t_acc.rb),
                s.eq(base + term),
                s_nf.eq(base_nf | term_nf),
                acc_wr.addr.eq(t_acc.rb),
                acc_wr.data.value.eq(s),
                acc_wr.data.nonfinite.eq(s_nf),
                acc_wr.en.eq(t_acc.valid & ~t_acc.last),  # a last block's sum leaves as `fin`
            ]
            # final sums only move when there is one (fewer toggles, in silicon and simulators)
            with m.If(t_acc.valid & t_acc.last):
                m.d.sync += [
                    fin[lane].eq(s),
                    fin_b[lane].eq(Mux(t_acc.bias, bshift.o.payload.value, 0)),
                    fin_nf[lane].eq(s_nf | (t_acc.bias & b_nf)),
                ]
            with m.If(t_fin.valid & t_fin.last):  # stage K+2: bias added
                m.d.sync += [
                    total[lane].eq(fin[lane] + fin_b[lane]),
                    total_nf[lane].eq(fin_nf[lane]),
                ]
            m.d.comb += [
                rnd.i.payload.acc.eq(total[lane]),
                rnd.i.payload.lam.eq(t_rnd.xe_max + _LAM0 + qbits(t_rnd.fmt)),
                rnd.i.payload.nonfinite.eq(total_nf[lane] | t_rnd.x_nonfinite),
            ]
            rounded.append(rnd.o.payload.value.as_value())
        return rounded, total

    def _result_rows(self, m, tags, rounded, out_fifo):
        """Result rows (stage Z): a group's row blocks, in order, assembled into one row for
        the output FIFO."""
        lanes, stride = self._lanes, self._stride
        t_out = tags[self._st_out]
        vals = Signal(data.ArrayLayout(unsigned(16), lanes))
        for lane in range(lanes):
            m.d.comb += vals[lane].eq(Mux(t_out.live[lane], rounded[lane], 0))
        # Row blocks of a group arrive in order (rb = 0, 1, ...): shift them into the row, so
        # that the group's last one completes it; the row is written whole, never piecewise.
        out_valid = t_out.valid & t_out.last
        if stride > 1:
            row = Signal((stride - 1) * lanes * 16)  # row blocks 0 .. stride-2 of the group
            with m.If(out_valid):
                m.d.sync += row.eq(Cat(row[lanes * 16 :], vals))
            m.d.comb += out_fifo.w_data.eq(Cat(row, vals))
        else:
            m.d.comb += out_fifo.w_data.eq(vals)
        m.d.comb += out_fifo.w_en.eq(out_valid & t_out.group_end & ~t_out.argmax)

    def _argmax(self, m, tags, total):
        """ARGMAX (stages K+2 .. AM): a log2(lanes)-level tree of the lanes' totals, then the
        running compare. Returns the best candidate so far and the command's done flag."""
        lanes = self._lanes
        cand_layout = data.StructLayout({"valid": 1, "value": signed(64), "index": 16})
        t_tot = tags[self._st_acc + 2]
        level = []
        for lane in range(lanes):
            c = Signal(cand_layout, name=f"cand{lane}")
            m.d.comb += [
                c.valid.eq(t_tot.valid & t_tot.last & t_tot.live[lane] & t_tot.argmax),
                c.value.eq(total[lane]),
                c.index.eq(
                    Cat(Const(lane, (lanes - 1).bit_length()), t_tot.rb, t_tot.grp)
                    if lanes > 1
                    else Cat(t_tot.rb, t_tot.grp)
                ),
            ]
            level.append(c)
        depth = 0
        while len(level) > 1:
            nxt = []
            for i in range(0, len(level), 2):
                a_, b_ = level[i], level[i + 1]
                c = Signal(cand_layout, name=f"cand_l{depth}_{i // 2}")
                take_b = b_.valid & (~a_.valid | (b_.value > a_.value))  # ties: lower index
                m.d.sync += c.eq(Mux(take_b, b_, a_))
                nxt.append(c)
            level = nxt
            depth += 1
        cand = level[0]
        best = Signal(cand_layout)
        amax_done = Signal()
        t_am = tags[self._st_amax]
        with m.If(cand.valid & (~best.valid | (cand.value > best.value))):
            m.d.sync += best.eq(cand)
        with m.If(t_am.valid & t_am.cmd_end & t_am.argmax):
            m.d.sync += amax_done.eq(1)
        return best, amax_done

    def _sample(self, m, c, tags, rounded):
        """Sampling (an ``ARGMAX`` whose sampling word has a temperature) is the
        :class:`rtl.sampler.Sampler`'s: this feeds it the command's start and its rounded rows
        (stage ``st_out``) and keeps its answer until the index transfer. The sampler is the
        unit's own submodule, or with ``external_sampler`` a block of the core's, reached
        through :attr:`sample_feed` and :attr:`sample_result`.

        Returns the chosen index and the done flag (the index transfer may go)."""
        lanes = self._lanes
        if self._external_sampler:
            feed, res = self.sample_feed, self.sample_result
        else:
            m.submodules.sampler = smp = Sampler(self._geom)
            feed = Signal(feed_layout(lanes))
            res = smp.result
            m.d.comb += smp.feed.eq(feed)
        t_out = tags[self._st_out]
        row0 = Cat(Const(0, (lanes - 1).bit_length()), t_out.rb, t_out.grp) if lanes > 1 else Cat(
            t_out.rb, t_out.grp
        )
        m.d.comb += [
            feed.start.eq(c.accept),
            feed.sampling.eq(self.cmd.payload.sampling),
            feed.row0.eq(row0),
            feed.end.eq(t_out.valid & t_out.cmd_end & t_out.sample),
        ]
        for lane in range(lanes):
            m.d.comb += [
                feed.valid[lane].eq(t_out.valid & t_out.last & t_out.live[lane] & t_out.sample),
                feed.bits[lane].eq(rounded[lane]),
            ]
        done = Signal()
        index = Signal(16)
        with m.If(c.accept):  # a command with no live row reports index 0
            m.d.sync += [done.eq(0), index.eq(0)]
        with m.Elif(res.done):
            m.d.sync += [done.eq(1), index.eq(res.index)]
        return SimpleNamespace(index=Mux(res.done, res.index, index), done=done | res.done)

    def _sequence(self, m, c, x, cr, t, best, amax_done, smp):
        """The command FSM: accept, load x, stream the tiles, report the argmax (or the
        sampled index)."""
        cmd = c.payload
        m.d.comb += self.argmax.payload.eq(Mux(c.do_sample, smp.index, best.index))
        word = cmd.sampling.word
        with m.FSM(name="mpu_fsm"):
            with m.State("Idle"):
                m.d.comb += self.cmd.ready.eq(1)
                with m.If(self.cmd.valid):
                    m.d.comb += c.accept.eq(1)
                    m.d.sync += [
                        c.do_sample.eq(cmd.flags.argmax & (word[:16] != 0)),
                    ]
                    rem = c.eff_cols[:6]
                    # the tiles' format and columns: FP16 with no live column (the unit's own
                    # zero block); quantized, span columns per tile and its scale beats
                    m.d.sync += [
                        c.fmt.eq(WFmt.FP16),
                        c.last_tcb.eq(Mux(c.cbs == 0, 0, c.cbs - 1)),
                        t.need_scale.eq(0),
                    ]
                    with m.If(c.cbs != 0), m.Switch(Cat(cmd.wgroup, cmd.wfmt)):
                        for wfmt in QUANT_FORMATS:
                            for wgroup in range(4):
                                qp = quant_params(wfmt, wgroup)
                                with m.Case(wgroup | (int(wfmt) << 2)):
                                    span = _log2(qp.span)
                                    tcb = (c.eff_cols + qp.span - 1) >> span
                                    m.d.sync += [
                                        c.fmt.eq(wfmt),
                                        c.last_tcb.eq(tcb - 1),
                                        c.run_log2.eq(_log2(qp.run)),
                                        c.ent_log2.eq(_log2(qp.entries)),
                                        c.per_log2.eq(_log2(qp.per)),
                                        t.need_scale.eq(1),
                                    ]
                    m.d.sync += [
                        c.last_grp.eq(c.groups - 1),
                        c.last_cb.eq(Mux(c.cbs == 0, 0, c.cbs - 1)),
                        x.no_cols.eq(c.cbs == 0),
                        x.last_keep.eq(
                            Cat(*(((rem == 0) | (j < rem)).replicate(16) for j in range(BLOCK)))
                        ),
                        c.do_bias.eq(cmd.flags.bias),
                        c.do_argmax.eq(cmd.flags.argmax),
                        c.do_fwd.eq(cmd.fwd & ~cmd.fwd_col & (c.cbs != 0)),
                        c.do_fwd_col.eq(cmd.fwd & cmd.fwd_col & (c.cbs != 0)),
                        c.fwd_sel.eq(Cat(*(cmd.fwd_index[:6] == j for j in range(BLOCK)))),
                        c.fwd_index.eq(cmd.fwd_index),
                        cr.bias_todo.eq(Mux(cmd.flags.bias, c.groups, 0)),
                        c.rows_left.eq(c.eff_rows),
                        x.count.eq(0),
                        t.rb.eq(0),
                        t.cb.eq(0),
                        t.grp.eq(0),
                        x.xe_max.eq(0),
                        x.nonfinite.eq(0),
                        best.valid.eq(0),
                        best.index.eq(0),
                        amax_done.eq(0),
                    ]
                    with m.If(c.groups == 0):
                        m.next = "Finish"
                    with m.Else():
                        m.next = "Load-X"
            with m.State("Load-X"):
                m.d.comb += x.loading.eq(1)
                with m.If(x.take):
                    m.d.sync += x.count.eq(x.count + 1)
                    with m.If(x.last_block):
                        m.next = "Wait-X"
                        with m.If(c.do_fwd | c.do_fwd_col):
                            m.next = "Load-F"
            with m.State("Load-F"):  # a forwarding product's row, after the x blocks
                m.d.comb += c.fwd_loading.eq(1)
                with m.If(self.x.valid):
                    m.next = "Wait-X"
            # The last x block is written in the cycle xv[A + xsum] is high (xe_max is final
            # after xv[A]).
            with m.State("Wait-X"), m.If(~Cat(*x.valid[:-1]).any()):
                m.next = "Stream"
            # After the last tile the next command may start while this one's results drain
            # (the later stages take the command's state from the tags); an ARGMAX command
            # waits for its index transfer.
            with m.State("Stream"):
                m.d.comb += t.streaming.eq(1)
                with m.If(t.take & t.cmd_end):
                    with m.If(c.do_argmax):
                        m.next = "Drain"
                    with m.Else():
                        m.next = "Idle"
            with m.State("Drain"):
                m.d.comb += self.argmax.valid.eq(Mux(c.do_sample, smp.done, amax_done))
                with m.If(self.argmax.valid & self.argmax.ready):
                    m.next = "Idle"
            with m.State("Finish"):  # no live row: no result rows; argmax reports index 0
                with m.If(c.do_argmax):
                    m.d.comb += self.argmax.valid.eq(1)
                    with m.If(self.argmax.ready):
                        m.next = "Idle"
                with m.Else():
                    m.next = "Idle"
        m.d.comb += self.busy.eq(~self.cmd.ready | (cr.out_free != self._result_depth))

        bias_open = Signal()
        m.d.comb += [
            bias_open.eq(cr.bias_todo != 0),
            self.bias.ready.eq(bias_open & cr.bias_fifo.w_rdy),
        ]
