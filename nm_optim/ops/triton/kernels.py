"""The Triton kernels: the fused step and every track's statistics, in one pass over memory.

Launches per bucket, whatever the number of tensors (the plan of nm_optim/ops/plan.py, shared
with csrc/cuda; the launches are in launch.py):

1. `step_kernel`, one program per flat tile: WITH_STATS=False for the plan's plain tiles
   (untracked tensors), WITH_STATS=True for the tracked ones (tensors whose rows are single
   elements, 1-D biases and BatchNorm weights): step, and write the tile's 9 partial sums (and,
   for a "rows" track of such a tensor, each element's own 9 values).
2. `stats_kernel`, one program per 2-D tile (TILE_ROWS rows x BLOCK_COLS row elements) of a
   tensor with a "rows", "cols" or "all" track, viewed as [d0, d1 * rest]: step, then write
   per-row partials (reduced over the tile's columns, within a warp), per-column partials
   (accumulated element-wise in registers, reduced over rows once per tile) and the tile's
   total into a float64 scratch buffer. COLS=True only for tiles with column partials.
   PRODUCTS=True (both kernels) for the tiles of tensors whose groups hold only the 6 product
   sums (names.PRODUCT_SUMS, what the scale and rescale laws read): 6 accumulators instead of 9,
   and only their partials written.
3. `reduce_kernel`, one program per REDUCE_TASKS output groups: sums their partials in a fixed
   order in float64 and writes the groups' rows of `stats`, NaN in the columns of sums a group's
   tensor does not hold (its task's mask); long groups in two levels (chunks into scratch, then
   the chunks). No atomics: bitwise identical from run to run.

Tensors are reached through a table of raw addresses (param, grad, buffer, is_first per tensor),
cast to pointers inside the kernels, so nothing recompiles when the tensors change. ALIGNED
variants (every address of the launch 16-byte aligned, checked by the launch; the tiles' rows or
bounds multiples of 16 bytes, grouped by the plan) tell the compiler so, and loads and stores
become 16-byte vector accesses; the others are the same code without the hint. Loads and stores go
through integer bit patterns (a bitcast to the float type), which the Triton interpreter handles
for every dtype: with ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors, which is how
CI tests them. Hyper-parameters are runtime arguments; only structural switches (momentum or
not, nesterov, weight decay or not, lr from a tensor) are compile-time. Offsets are 64-bit
throughout.

No ``from __future__ import annotations`` here: Triton reads a kernel's annotations to type its
arguments, and under that import ``lr: tl.float64`` would reach it as a string; a quoted string
(``lr: "fp64"``) even becomes ``'"fp64"'``, which Triton does not recognise, and it then binds a
Python float as fp32 (tests/test_triton_binder.py builds the launch binder for sm_90 and checks
every scalar's type).
"""

import torch
import triton
import triton.language as tl

from nm_optim.ops.registry import triton_interpreting

# Flat tiles of the step kernel, and the 2-D tiles of the statistics kernel (rows x columns of
# the [d0, d1 * rest] view; processed SUB_ROWS rows at a time, each warp holding whole rows of a
# sub-block, so that a row's sum stays within a warp). Partials written per element: 9 float64
# per BLOCK_COLS (row partials) and per TILE_ROWS (column partials), about 1.1 bytes per element
# with both (read again by the reduction) next to the 20 bytes of an fp32 step with momentum.
FLAT_TILE = 16384
FLAT_BLOCK = 1024
TILE_ROWS = 128
BLOCK_COLS = 128
# Rows per sub-block, by variant (COLS, ALIGNED): chosen from ptxas's register counts (tools/
# kernel_resources.py) for 2 blocks of 8 warps per SM without spills (16 rows without column
# partials: 128 registers and an 8-byte spill). The element-wise (unaligned) layout spreads a row
# over 4 warps and needs fewer rows.
SUB_ROWS = {(True, True): 8, (False, True): 8, (True, False): 2, (False, False): 4}


def sub_rows(cols: bool, aligned: bool, float64: bool) -> int:
    """SUB_R of a statistics variant: SUB_ROWS, halved for float64 (twice the registers), but
    never below 2 rows: a [1, BLOCK_COLS] sub-block leaves half of the 256 threads holding
    copies, and ptxas then spilled the float64 column-partials variant without alignment on
    Triton 3.6 (128 registers, 8 bytes of stack; 2 rows: 122 registers, no spill; Triton 3.9:
    78 -> 80 registers; docs/kernel_resources.md)."""
    return max(SUB_ROWS[cols, aligned] // (2 if float64 else 1), 2)


def flat_block(with_stats: bool, float64: bool) -> int:
    """BLOCK of a step variant: FLAT_BLOCK, halved for the float64 statistics step, whose nine
    float64 accumulators per element took 184-196 registers (one block of 8 warps per SM) on
    Triton 3.6 and 3.9 alike at 1024; 106-108 at 512 (two blocks)."""
    return FLAT_BLOCK // 2 if with_stats and float64 else FLAT_BLOCK


# The reduction: tasks per program, partials per task and iteration (the plan's REDUCE_CHUNK, the
# size of a first-level chunk, is another thing).
REDUCE_TASKS = 16
REDUCE_CHUNK = 4
# Warps per program. Chosen without a GPU from ptxas's register counts (tools/kernel_resources.py
# prints them with the occupancy they allow).
NUM_WARPS = {"step": 8, "stats": 8, "reduce": 4}
# Elements per 16 bytes: the vector width of the aligned paths.
VEC = {torch.float32: 4, torch.float16: 8, torch.bfloat16: 8, torch.float64: 2}

# The type of each runtime argument of the kernels as Triton binds it at a launch (launch.py):
# the address tables and scratch as pointers, counts as 32-bit ints, the hyper-parameters as
# float64 (the annotations below), the AMP scalars and a tensor lr as float32 pointers.
# tools/compile_triton_kernels.py compiles with these types; tests/test_triton_binder.py checks
# that Triton's own launch binder agrees.
ARG_TYPES = {
    "ptrs": "*i64", "n_tensors": "i32", "tiles": "*i64", "lr": "fp64", "lr_ptr": "*fp32", "wd": "fp64",
    "mom": "fp64", "one_minus_damp": "fp64", "gmul": "fp64", "scale_ptr": "*fp32", "inf_ptr": "*fp32",
    "scratch": "*fp64", "out": "*fp64", "tasks": "*i64", "n_tasks": "i32",
}

BITS = {torch.float32: tl.int32, torch.float16: tl.int16, torch.bfloat16: tl.int16, torch.float64: tl.int64}
FLOAT = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float64: tl.float64}


# -- device code ----------------------------------------------------------------------------------


def _device_function(fn):
    """A helper called from the kernels: a Triton device function when compiling; under the
    interpreter a plain Python function (the interpreter re-patches triton.language on every
    device-function call, which would make the tests minutes slower, not more thorough)."""
    return fn if triton_interpreting() else triton.jit(fn)


if triton_interpreting():

    def _sum(x, axis, keep_dims=False):
        # tl.sum is itself a device function (see above); its builtin core is reduce + add.
        return tl.reduce(x, axis, tl.standard._sum_combine, keep_dims=keep_dims)

else:

    @triton.jit
    def _sum(x, axis: tl.constexpr, keep_dims: tl.constexpr = False):
        return tl.sum(x, axis=axis, keep_dims=keep_dims)


if triton_interpreting():

    def _bound(x):
        """A loop bound computed from loaded values, as a Python int. Python's range() asks the
        interpreter's tensor for __index__, which Triton 3.6 answers with int() of a 1-element
        1-D array: numpy 2.4 and later refuse that ("only 0-dimensional arrays can be converted
        to Python scalars"; Triton 3.9 squeezes the array first)."""
        return int(x.handle.data.reshape(-1)[0]) if hasattr(x, "handle") else int(x)

else:

    @triton.jit
    def _bound(x):
        return x


@_device_function
def _pointer(base, BITS: tl.constexpr, ALIGNED: tl.constexpr):
    """The address `base` as a pointer; ALIGNED: a 16-byte aligned one (the caller checked it at
    run time), which lets the compiler vectorise the accesses through it. The hint goes on this
    cast, made on the aligned path only (a hint on `base` itself would mark the op that loaded
    it, asserting the alignment on the unaligned path too)."""
    ptr = base.to(tl.pointer_type(BITS))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@_device_function
def _load(base, offs, mask, BITS: tl.constexpr, DT: tl.constexpr, CT: tl.constexpr, ALIGNED: tl.constexpr):
    ptr = _pointer(base, BITS, ALIGNED)
    return tl.load(ptr + offs, mask=mask, other=0).to(DT, bitcast=True).to(CT)


@_device_function
def _store(base, offs, x, mask, BITS: tl.constexpr, DT: tl.constexpr, ALIGNED: tl.constexpr):
    ptr = _pointer(base, BITS, ALIGNED)
    if DT == tl.bfloat16:
        # Round to nearest even by hand, as torch does: the interpreter's float32 -> bfloat16
        # cast truncates, and the kernel must give the same bits on the CPU and on the GPU.
        b = x.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        rounded = tl.where((b & 0x7FFFFFFF) > 0x7F800000, (b >> 16) | 0x40, rounded)  # NaN stays NaN
        tl.store(ptr + offs, rounded.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    else:
        tl.store(ptr + offs, x.to(DT).to(BITS, bitcast=True), mask=mask)


@_device_function
def _update(p, g, v, first, lr, wd, mom, one_minus_damp,
            HAS_WD: tl.constexpr, HAS_MOM: tl.constexpr, NESTEROV: tl.constexpr):
    """torch's fused CUDA SGD, element-wise (FusedSgdKernel.cu sgd_math; csrc/sgd_math.h,
    sgd_update_cuda): returns (p', v'). p, g, v are in the compute type (torch's opmath), the
    hyper-parameters float64 (_scalars), so every expression is evaluated in float64 and rounded
    to the compute type where torch assigns it to an opmath variable. nvcc contracts torch's
    a * b + c into one fma (the first product of a sum): the same contractions are written out
    with tl.fma here, so the interpreter and the GPU agree where the interpreter's tl.fma is a
    true fma (Triton 3.9: one rounding; Triton 3.6's interpreter multiplies and adds in float64,
    two roundings, so there its float64 results may differ from the GPU's in the last bit)."""
    CT = p.dtype
    p64 = p.to(tl.float64)
    if HAS_WD:
        g = tl.fma(wd, p64, g.to(tl.float64)).to(CT)  # g += weight_decay * p
    u = g
    v_new = g
    if HAS_MOM:
        g64 = g.to(tl.float64)
        # momentum_buffer = first ? g : momentum * v + (1 - dampening) * g   (a double)
        buf = tl.where(first != 0, g64, tl.fma(mom, v.to(tl.float64), one_minus_damp * g64))
        v_new = buf.to(CT)
        u = v_new  # g = momentum_buffer
        if NESTEROV:
            u = tl.fma(mom, buf, g64).to(CT)  # g = g + momentum * momentum_buffer
    return tl.fma(-lr, u.to(tl.float64), p64).to(CT), v_new  # p -= lr * g


@_device_function
def _scalars(lr, lr_ptr, wd, mom, one_minus_damp, gmul, scale_ptr,
             HAS_LR_PTR: tl.constexpr, HAS_SCALE: tl.constexpr, CT: tl.constexpr):
    """The step's scalars: lr, weight decay, momentum and 1 - dampening in float64, as torch's
    fused CUDA kernel takes them (a float32 lr tensor is widened, as its lr_ptr); gmul (+-1, the
    maximize sign) in the compute type; GradScaler's scale in float64 (1 without one)."""
    lr = tl.full([], lr, tl.float64)
    if HAS_LR_PTR:
        lr = tl.load(lr_ptr).to(tl.float64)
    scale = tl.full([], 1.0, tl.float64)
    if HAS_SCALE:
        scale = tl.load(scale_ptr).to(tl.float64)
    return (lr, tl.full([], wd, tl.float64), tl.full([], mom, tl.float64),
            tl.full([], one_minus_damp, tl.float64), tl.full([], gmul, CT), scale)


@_device_function
def _load_grad(g_base, offs, mask, gmul, scale, BITS: tl.constexpr, DT: tl.constexpr, CT: tl.constexpr,
               ALIGNED: tl.constexpr, HAS_SCALE: tl.constexpr):
    """The gradient the update and the statistics see: grad / scale * gmul. HAS_SCALE: as torch's
    fused CUDA kernel (FusedSgdKernel.cu: g /= (double)*grad_scale, a float64 division rounded to
    the compute type, the same bits as a correctly rounded division in it), and the quotient is
    written back to the grad before the maximize sign, as torch's kernel stores it. Without a
    scale the grad is only read."""
    g = _load(g_base, offs, mask, BITS, DT, CT, ALIGNED)
    if HAS_SCALE:
        g = (g.to(tl.float64) / scale).to(CT)
        _store(g_base, offs, g, mask, BITS, DT, ALIGNED)
    return g * gmul


@_device_function
def _store9(base, mask, a, b, c, d, e, f, g, h, i, PRODUCTS: tl.constexpr):
    """Nine float64 values per position: base[9 k + j] for the j-th statistic (mask None: a
    single position, e.g. a tile's totals). PRODUCTS: the last 6 only (a, b, c are not read)."""
    if not PRODUCTS:
        tl.store(base + 0, a.to(tl.float64), mask=mask)
        tl.store(base + 1, b.to(tl.float64), mask=mask)
        tl.store(base + 2, c.to(tl.float64), mask=mask)
    tl.store(base + 3, d.to(tl.float64), mask=mask)
    tl.store(base + 4, e.to(tl.float64), mask=mask)
    tl.store(base + 5, f.to(tl.float64), mask=mask)
    tl.store(base + 6, g.to(tl.float64), mask=mask)
    tl.store(base + 7, h.to(tl.float64), mask=mask)
    tl.store(base + 8, i.to(tl.float64), mask=mask)


@_device_function
def _aligned(x, n: tl.constexpr):
    """x rounded down to a multiple of n, so that Triton's alignment analysis knows it is one:
    where x is already a multiple (checked at run time, see the callers) it is x itself.
    (tl.multiple_of would mark the op that produced x, asserting it on the unaligned path too.)"""
    return (x // n) * n


@_device_function
def _step_flat(p_base, g_base, v_base, first, begin, end, slot, elem_row, scratch, out,
               lr, wd, mom, one_minus_damp, gmul, scale,
               BLOCK: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr, CT: tl.constexpr,
               HAS_WD: tl.constexpr, HAS_MOM: tl.constexpr, NESTEROV: tl.constexpr, WITH_STATS: tl.constexpr,
               PRODUCTS: tl.constexpr, ALIGNED: tl.constexpr, HAS_SCALE: tl.constexpr):
    """Steps elements [begin, end) of one tensor, BLOCK at a time; WITH_STATS: also the tile's 9
    sums (accumulated element-wise in registers, reduced once at the end) into its slot, and,
    for a "rows" track of a tensor whose rows are single elements, each element's own 9 values.
    PRODUCTS: the 6 product sums only; an element's own Σp, Σg, Σv are written NaN (the groups'
    columns of sums their tensor does not hold; the tile's slot goes through the reduction, which
    writes those NaN)."""
    lane = tl.arange(0, BLOCK)
    v_end = tl.where(first == 0, end, begin)
    if WITH_STATS:
        if not PRODUCTS:
            a_p = tl.zeros([BLOCK], CT)
            a_g = tl.zeros([BLOCK], CT)
            a_v = tl.zeros([BLOCK], CT)
        a_pp = tl.zeros([BLOCK], CT)
        a_gg = tl.zeros([BLOCK], CT)
        a_vv = tl.zeros([BLOCK], CT)
        a_pg = tl.zeros([BLOCK], CT)
        a_pv = tl.zeros([BLOCK], CT)
        a_gv = tl.zeros([BLOCK], CT)
    for start in range(_bound(begin), _bound(end), BLOCK):
        offs = start + lane
        mask = offs < end
        p = _load(p_base, offs, mask, BITS, DT, CT, ALIGNED)
        g = _load_grad(g_base, offs, mask, gmul, scale, BITS, DT, CT, ALIGNED, HAS_SCALE)
        v = tl.zeros([BLOCK], CT)
        if HAS_MOM:  # a buffer created by this step is not read (it may hold anything)
            v = _load(v_base, offs, offs < v_end, BITS, DT, CT, ALIGNED)
        p_new, v_new = _update(p, g, v, first, lr, wd, mom, one_minus_damp, HAS_WD, HAS_MOM, NESTEROV)
        _store(p_base, offs, p_new, mask, BITS, DT, ALIGNED)
        if HAS_MOM:
            _store(v_base, offs, v_new, mask, BITS, DT, ALIGNED)
        if WITH_STATS:
            if elem_row >= 0:  # a "rows" track whose rows are single elements
                if PRODUCTS:  # (Σp, Σg, Σv: NaN, after the loop)
                    _store9(out + 9 * (elem_row + offs), mask, p, g, v, p * p, g * g, v * v, p * g, p * v,
                            g * v, True)
                else:
                    _store9(out + 9 * (elem_row + offs), mask, p, g, v, p * p, g * g, v * v, p * g, p * v, g * v,
                            False)
            if not PRODUCTS:
                a_p += p
                a_g += g
                a_v += v
            a_pp += p * p
            a_gg += g * g
            a_vv += v * v
            a_pg += p * g
            a_pv += p * v
            a_gv += g * v
    if WITH_STATS:
        if PRODUCTS:
            if elem_row >= 0:
                # The elements' own Σp, Σg, Σv: NaN, in a loop of their own (in the loop above
                # the NaN stores cost an 8-byte spill in the unaligned float32 variant, Triton
                # 3.9, sm_90).
                nan = tl.full([BLOCK], float("nan"), tl.float64)
                for start in range(_bound(begin), _bound(end), BLOCK):
                    offs = start + lane
                    e = out + 9 * (elem_row + offs)
                    tl.store(e + 0, nan, mask=offs < end)
                    tl.store(e + 1, nan, mask=offs < end)
                    tl.store(e + 2, nan, mask=offs < end)
        if slot >= 0:
            if PRODUCTS:  # (s_pp thrice in place of the sums not reduced: not read)
                s_pp = _sum(a_pp, 0)
                _store9(scratch + 9 * slot, None, s_pp, s_pp, s_pp,
                        s_pp, _sum(a_gg, 0), _sum(a_vv, 0), _sum(a_pg, 0), _sum(a_pv, 0),
                        _sum(a_gv, 0), True)
            else:
                _store9(scratch + 9 * slot, None, _sum(a_p, 0), _sum(a_g, 0), _sum(a_v, 0),
                        _sum(a_pp, 0), _sum(a_gg, 0), _sum(a_vv, 0), _sum(a_pg, 0), _sum(a_pv, 0),
                        _sum(a_gv, 0), False)


@triton.jit
def step_kernel(  # float64 scalars, as the C++ kernels and torch's fused kernel take them
    ptrs, n_tensors, tiles, lr: tl.float64, lr_ptr, wd: tl.float64, mom: tl.float64, one_minus_damp: tl.float64,
    gmul: tl.float64, scale_ptr, inf_ptr,
    scratch, out,
    BLOCK: tl.constexpr, VEC: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr, CT: tl.constexpr,
    HAS_LR_PTR: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr,
    HAS_WD: tl.constexpr, HAS_MOM: tl.constexpr, NESTEROV: tl.constexpr, WITH_STATS: tl.constexpr,
    PRODUCTS: tl.constexpr, ALIGNED: tl.constexpr,
):
    # tiles[5 * pid:]: tensor, begin, end, tile slot in scratch (-1: none), first output row of
    # per-element statistics (-1: none). WITH_STATS=False runs the plan's plain tiles (untracked
    # tensors), WITH_STATS=True the tracked ones (the launch offsets `tiles` to them), those of
    # tensors that need only the 6 product sums with PRODUCTS=True.
    pid = tl.program_id(0).to(tl.int64)
    if HAS_INF:
        if tl.load(inf_ptr) != 0:
            return
    t = tl.load(tiles + 5 * pid)
    begin = tl.load(tiles + 5 * pid + 1)
    end = tl.load(tiles + 5 * pid + 2)
    slot = tl.load(tiles + 5 * pid + 3)
    elem_row = tl.load(tiles + 5 * pid + 4)
    p_base = tl.load(ptrs + t)
    g_base = tl.load(ptrs + n_tensors + t)
    v_base = tl.load(ptrs + 2 * n_tensors + t)
    first = tl.load(ptrs + 3 * n_tensors + t)
    lr, wd, mom, one_minus_damp, gmul, scale = _scalars(lr, lr_ptr, wd, mom, one_minus_damp, gmul, scale_ptr,
                                                        HAS_LR_PTR, HAS_SCALE, CT)
    # ALIGNED (the launch checked the addresses, the plan the tile bounds): VEC elements = 16
    # bytes, vector loads and stores.
    if ALIGNED:
        begin = _aligned(begin, VEC)
        end = _aligned(end, VEC)
    _step_flat(p_base, g_base, v_base, first, begin, end, slot, elem_row, scratch, out,
               lr, wd, mom, one_minus_damp, gmul, scale,
               BLOCK, BITS, DT, CT, HAS_WD, HAS_MOM, NESTEROV, WITH_STATS, PRODUCTS, ALIGNED, HAS_SCALE)


@_device_function
def _stats_tile(p_base, g_base, v_base, first, rb, cb, d0, rowlen, row_base, col_base, slot, scratch,
                lr, wd, mom, one_minus_damp, gmul, scale,
                TILE_R: tl.constexpr, SUB_R: tl.constexpr, BLOCK_C: tl.constexpr,
                BITS: tl.constexpr, DT: tl.constexpr, CT: tl.constexpr,
                HAS_WD: tl.constexpr, HAS_MOM: tl.constexpr, NESTEROV: tl.constexpr, COLS: tl.constexpr,
                PRODUCTS: tl.constexpr, ALIGNED: tl.constexpr, HAS_SCALE: tl.constexpr):
    """One 2-D tile: rows [rb * TILE_R, +TILE_R) x row elements [cb * BLOCK_C, +BLOCK_C), SUB_R
    rows at a time. Per sub-block: load, step, store; each row's 9 sums (one reduction along the
    row: within a warp, each warp holding whole rows) go to the row partials and, in float64, to
    the tile's running total. COLS: the column terms are accumulated element-wise in 2-D
    [SUB_R, BLOCK_C] registers and reduced across rows once, at the end of the tile. PRODUCTS:
    the 6 product sums only (no accumulators, reductions or partials for Σp, Σg, Σv; the
    reduction writes those columns NaN)."""
    # Everything stays 2-D ([SUB_R, 1] per row, [1, BLOCK_C] per column) in the layout of the
    # tile, so that sums, partial stores and totals never move between layouts (through shared
    # memory) inside the loop.
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    col_ok = cols < rowlen
    v_rows = tl.where(first == 0, d0, 0)
    want_rows = (row_base >= 0) | (slot >= 0)
    if not PRODUCTS:
        t_p = tl.zeros([SUB_R, 1], tl.float64)
        t_g = tl.zeros([SUB_R, 1], tl.float64)
        t_v = tl.zeros([SUB_R, 1], tl.float64)
    t_pp = tl.zeros([SUB_R, 1], tl.float64)
    t_gg = tl.zeros([SUB_R, 1], tl.float64)
    t_vv = tl.zeros([SUB_R, 1], tl.float64)
    t_pg = tl.zeros([SUB_R, 1], tl.float64)
    t_pv = tl.zeros([SUB_R, 1], tl.float64)
    t_gv = tl.zeros([SUB_R, 1], tl.float64)
    if COLS:
        if not PRODUCTS:
            c_p = tl.zeros([SUB_R, BLOCK_C], CT)
            c_g = tl.zeros([SUB_R, BLOCK_C], CT)
            c_v = tl.zeros([SUB_R, BLOCK_C], CT)
        c_pp = tl.zeros([SUB_R, BLOCK_C], CT)
        c_gg = tl.zeros([SUB_R, BLOCK_C], CT)
        c_vv = tl.zeros([SUB_R, BLOCK_C], CT)
        c_pg = tl.zeros([SUB_R, BLOCK_C], CT)
        c_pv = tl.zeros([SUB_R, BLOCK_C], CT)
        c_gv = tl.zeros([SUB_R, BLOCK_C], CT)
    r_first = rb * TILE_R
    n_rows = tl.minimum(d0 - r_first, TILE_R)  # the last row block may be partial: no empty sub-blocks
    for r0 in range(0, _bound(n_rows), SUB_R):
        rows = r_first + r0 + tl.arange(0, SUB_R)[:, None]
        row_ok = rows < d0
        mask = row_ok & col_ok
        offs = rows * rowlen + cols
        p = _load(p_base, offs, mask, BITS, DT, CT, ALIGNED)
        g = _load_grad(g_base, offs, mask, gmul, scale, BITS, DT, CT, ALIGNED, HAS_SCALE)
        v = tl.zeros([SUB_R, BLOCK_C], CT)
        if HAS_MOM:  # a buffer created by this step is not read (it may hold anything)
            v = _load(v_base, offs, (rows < v_rows) & col_ok, BITS, DT, CT, ALIGNED)
        p_new, v_new = _update(p, g, v, first, lr, wd, mom, one_minus_damp, HAS_WD, HAS_MOM, NESTEROV)
        _store(p_base, offs, p_new, mask, BITS, DT, ALIGNED)
        if HAS_MOM:
            _store(v_base, offs, v_new, mask, BITS, DT, ALIGNED)
        pp = p * p
        gg = g * g
        vv = v * v
        pg = p * g
        pv = p * v
        gv = g * v
        if COLS:
            if not PRODUCTS:
                c_p += p
                c_g += g
                c_v += v
            c_pp += pp
            c_gg += gg
            c_vv += vv
            c_pg += pg
            c_pv += pv
            c_gv += gv
        if want_rows:
            s_pp = _sum(pp, 1, True)
            s_gg = _sum(gg, 1, True)
            s_vv = _sum(vv, 1, True)
            s_pg = _sum(pg, 1, True)
            s_pv = _sum(pv, 1, True)
            s_gv = _sum(gv, 1, True)
            if PRODUCTS:  # placeholders in the store below, whose mask leaves their columns out
                s_p = s_pp
                s_g = s_pp
                s_v = s_pp
            else:
                s_p = _sum(p, 1, True)
                s_g = _sum(g, 1, True)
                s_v = _sum(v, 1, True)
            if row_base >= 0:
                # One [SUB_R, 16] store of each row's 9 consecutive float64 (one re-layout for
                # the store instead of nine); PRODUCTS: columns 3..8.
                stat = tl.arange(0, 16)[None, :]
                x = tl.where(stat == 0, s_p.to(tl.float64), tl.where(stat == 1, s_g.to(tl.float64), tl.where(
                    stat == 2, s_v.to(tl.float64), tl.where(stat == 3, s_pp.to(tl.float64), tl.where(
                        stat == 4, s_gg.to(tl.float64), tl.where(stat == 5, s_vv.to(tl.float64), tl.where(
                            stat == 6, s_pg.to(tl.float64), tl.where(stat == 7, s_pv.to(tl.float64),
                                                                     s_gv.to(tl.float64)))))))))
                written = stat < 9
                if PRODUCTS:
                    written = written & (stat >= 3)
                tl.store(scratch + 9 * (row_base + cb * d0 + rows) + stat, x, mask=row_ok & written)
            if not PRODUCTS:
                t_p += s_p.to(tl.float64)
                t_g += s_g.to(tl.float64)
                t_v += s_v.to(tl.float64)
            t_pp += s_pp.to(tl.float64)
            t_gg += s_gg.to(tl.float64)
            t_vv += s_vv.to(tl.float64)
            t_pg += s_pg.to(tl.float64)
            t_pv += s_pv.to(tl.float64)
            t_gv += s_gv.to(tl.float64)
    if COLS:
        if col_base >= 0:
            x_pp = _sum(c_pp, 0, True)
            if PRODUCTS:  # (x_pp in place of the sums not reduced: not read)
                _store9(scratch + 9 * (col_base + rb * rowlen + cols), col_ok,
                        x_pp, x_pp, x_pp, x_pp, _sum(c_gg, 0, True), _sum(c_vv, 0, True), _sum(c_pg, 0, True),
                        _sum(c_pv, 0, True), _sum(c_gv, 0, True), True)
            else:
                _store9(scratch + 9 * (col_base + rb * rowlen + cols), col_ok,
                        _sum(c_p, 0, True), _sum(c_g, 0, True), _sum(c_v, 0, True), x_pp,
                        _sum(c_gg, 0, True), _sum(c_vv, 0, True), _sum(c_pg, 0, True), _sum(c_pv, 0, True),
                        _sum(c_gv, 0, True), False)
    if slot >= 0:
        y_pp = _sum(_sum(t_pp, 0), 0)
        if PRODUCTS:
            _store9(scratch + 9 * slot, None, y_pp, y_pp, y_pp, y_pp, _sum(_sum(t_gg, 0), 0),
                    _sum(_sum(t_vv, 0), 0), _sum(_sum(t_pg, 0), 0), _sum(_sum(t_pv, 0), 0),
                    _sum(_sum(t_gv, 0), 0), True)
        else:
            _store9(scratch + 9 * slot, None, _sum(_sum(t_p, 0), 0), _sum(_sum(t_g, 0), 0),
                    _sum(_sum(t_v, 0), 0), y_pp, _sum(_sum(t_gg, 0), 0), _sum(_sum(t_vv, 0), 0),
                    _sum(_sum(t_pg, 0), 0), _sum(_sum(t_pv, 0), 0), _sum(_sum(t_gv, 0), 0), False)


@triton.jit
def stats_kernel(  # float64 scalars, as the C++ kernels and torch's fused kernel take them
    ptrs, n_tensors, tiles, lr: tl.float64, lr_ptr, wd: tl.float64, mom: tl.float64, one_minus_damp: tl.float64,
    gmul: tl.float64, scale_ptr, inf_ptr,
    scratch,
    TILE_R: tl.constexpr, SUB_R: tl.constexpr, BLOCK_C: tl.constexpr, VEC: tl.constexpr,
    BITS: tl.constexpr, DT: tl.constexpr, CT: tl.constexpr,
    HAS_LR_PTR: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr,
    HAS_WD: tl.constexpr, HAS_MOM: tl.constexpr, NESTEROV: tl.constexpr, COLS: tl.constexpr,
    PRODUCTS: tl.constexpr, ALIGNED: tl.constexpr,
):
    # tiles[8 * pid:]: tensor, row block, column block, d0, row length, row-partials base,
    # column-partials base, tile slot (bases and slot in units of 9 float64; -1: not needed).
    # Row partial of (row r, column block cb): row_base + cb * d0 + r; column partial of
    # (row block rb, column c): col_base + rb * rowlen + c. COLS=True runs the plan's tiles with
    # column partials, COLS=False the others (the launch offsets `tiles` to them); PRODUCTS=True
    # the tiles of tensors that need only the 6 product sums.
    pid = tl.program_id(0).to(tl.int64)
    if HAS_INF:
        if tl.load(inf_ptr) != 0:
            return
    e = tiles + 8 * pid
    t = tl.load(e)
    rb = tl.load(e + 1)
    cb = tl.load(e + 2)
    d0 = tl.load(e + 3)
    rowlen = tl.load(e + 4)
    row_base = tl.load(e + 5)
    col_base = tl.load(e + 6)
    slot = tl.load(e + 7)
    p_base = tl.load(ptrs + t)
    g_base = tl.load(ptrs + n_tensors + t)
    v_base = tl.load(ptrs + 2 * n_tensors + t)
    first = tl.load(ptrs + 3 * n_tensors + t)
    lr, wd, mom, one_minus_damp, gmul, scale = _scalars(lr, lr_ptr, wd, mom, one_minus_damp, gmul, scale_ptr,
                                                        HAS_LR_PTR, HAS_SCALE, CT)
    # ALIGNED (the launch checked the addresses, the plan the row lengths): rows start on 16
    # bytes, VEC elements, so loads and stores are 16-byte vector accesses.
    if ALIGNED:
        rowlen = _aligned(rowlen, VEC)
    _stats_tile(p_base, g_base, v_base, first, rb, cb, d0, rowlen, row_base, col_base, slot, scratch,
                lr, wd, mom, one_minus_damp, gmul, scale,
                TILE_R, SUB_R, BLOCK_C, BITS, DT, CT, HAS_WD, HAS_MOM, NESTEROV, COLS, PRODUCTS, ALIGNED, HAS_SCALE)


@triton.jit
def reduce_kernel(tasks, n_tasks, scratch, out, inf_ptr,
                  TASKS: tl.constexpr, CHUNK: tl.constexpr, HAS_INF: tl.constexpr):
    # TASKS tasks per program (the host sorts them by size, so a program's tasks are alike);
    # tasks[6 * k:]: base, count, inner, outer stride, destination row, sums (a bit mask: bit s
    # for statistic s, names.STAT_NAMES). Partial j of a task is the 9 float64 at
    # scratch[9 * (base + (j // inner) * outer + j % inner)]; they are summed in float64 in the
    # same order every run, into out[9 * row:]; the statistics not in the mask are not read (the
    # tiles did not write them) and are written NaN. The plan's two levels are two launches:
    # first-level tasks with out = scratch (chunks of long tasks), then the rest.
    pid = tl.program_id(0).to(tl.int64)
    task = pid * TASKS + tl.arange(0, TASKS).to(tl.int64)
    live = task < n_tasks
    base = tl.load(tasks + 6 * task, mask=live, other=0)
    count = tl.load(tasks + 6 * task + 1, mask=live, other=0)
    inner = tl.load(tasks + 6 * task + 2, mask=live, other=1)
    outer = tl.load(tasks + 6 * task + 3, mask=live, other=0)
    row = tl.load(tasks + 6 * task + 4, mask=live, other=0)
    sums = tl.load(tasks + 6 * task + 5, mask=live, other=0)
    stat = tl.arange(0, 16)
    held = ((sums[:, None] >> stat[None, :].to(tl.int64)) & 1) != 0  # [TASKS, 16]
    acc = tl.zeros([TASKS, CHUNK, 16], tl.float64)
    for j0 in range(0, _bound(tl.max(count, axis=0)), CHUNK):
        j = j0 + tl.arange(0, CHUNK).to(tl.int64)
        idx = base[:, None] + (j[None, :] // inner[:, None]) * outer[:, None] + j[None, :] % inner[:, None]
        m = (j[None, :] < count[:, None])[:, :, None] & held[:, None, :]
        acc += tl.load(scratch + 9 * idx[:, :, None] + stat[None, None, :], mask=m, other=0.0)
    total = tl.where(held, _sum(acc, 1), float("nan"))
    if HAS_INF:
        if tl.load(inf_ptr) != 0:
            total = tl.full([TASKS, 16], float("nan"), tl.float64)
    tl.store(out + 9 * row[:, None] + stat[None, :], total, mask=live[:, None] & (stat < 9)[None, :])
