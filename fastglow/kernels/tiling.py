"""Tile sizes and launch grids of the flow-step and LU kernels, chosen from a register budget (the one
place they are chosen; the interpreter and a GPU get the same ones).

H100 (sm_90): 65,536 32-bit registers per SM, at most 255 per thread. A program of ``num_warps`` warps
(T = 32 num_warps threads) holding a tile of n elements spends n / T registers per live tile in float32,
2 n / T in float64. The compile gate (``python -m benchmarks.compile_report``) measured what the kernels
keep live and sets the budgets here, so that float32 never spills and large launches keep >= 2 CTAs/SM:

- elementwise tiles (coupling, LU columns):  rows x cols <= ELEMS_PER_THREAD * T,
- the channel mix's accumulator (rows x BLOCK_P) <= ACC_PER_THREAD * T, with its reduction over channels
  in chunks of BLOCK_K (operands rows x BLOCK_K and BLOCK_K x BLOCK_P): never a whole C x P tile.

Channel counts are 3 * 2^k (12, 24, ..., 384): :func:`chunk` picks the power-of-two block with the least
padding, e.g. 384 = 3 x 128 rather than one padded 512. Pixel blocks shrink (to 16, ``tl.dot``'s least
size) until a launch has >= MIN_PROGRAMS programs, so the large levels fill the 132 SMs several times.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

N_SM = 132
MIN_PROGRAMS = 4 * N_SM
ELEMS_PER_THREAD = {torch.float32: 8, torch.float64: 4}
ACC_PER_THREAD = {torch.float32: 32, torch.float64: 16}
BLOCK_K = 16  # channels per step of the mix's reduction (tl.dot's least K)
MAX_BLOCK_P = 128


def pow2(n: int, lo: int = 16) -> int:
    """The least power of two >= n (and >= lo)."""
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def chunk(n: int, cap: int, lo: int = 16) -> int:
    """A power-of-two block for n rows, at most ``cap``: pow2(n) if that fits, else the one that pads n
    least (the larger on a tie)."""
    if pow2(n, lo) <= cap:
        return pow2(n, lo)
    sizes = [1 << k for k in range(lo.bit_length() - 1, cap.bit_length())]
    return min(reversed(sizes), key=lambda s: triton.cdiv(n, s) * s)


def pixel_block(b: int, p: int, cap: int, programs_per_block: int = 1) -> int:
    """Pixels per program: pow2(P) up to ``cap``, halved (down to 16) while the launch would have fewer
    than MIN_PROGRAMS programs (``programs_per_block`` programs share one pixel block)."""
    bp = max(16, min(pow2(p), cap))
    while bp > 16 and programs_per_block * b * triton.cdiv(p, bp) < MIN_PROGRAMS:
        bp //= 2
    return bp


@dataclass(frozen=True)
class MixTiles:
    """Grid (n_rows, n_pix, B): program (r, q, b) owns rows r*block_rows.. and pixels q*block_p.. of
    sample b, reducing over channels in chunks of block_k."""
    block_rows: int
    block_k: int
    block_p: int
    n_rows: int
    n_pix: int
    num_warps: int = 4

    def grid(self, b: int) -> tuple[int, int, int]:
        return self.n_rows, self.n_pix, b


@triton.jit
def grid_tile(ROWS, P, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    """The device side of :meth:`MixTiles.grid`: program (r, q, b) -> (b as int64, r, q, row offsets r*BLOCK_R..,
    their mask < ROWS, pixel offsets q*BLOCK_P.., their mask < P)."""
    pid_r = tl.program_id(0)
    pid_p = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    return b, pid_r, pid_p, offs_r, offs_r < ROWS, offs_p, offs_p < P


def mix_tiles(rows: int, b: int, p: int, dtype: torch.dtype, accumulators: int = 1) -> MixTiles:
    """Tiles of a per-pixel channel mix with ``rows`` outputs per pixel and ``accumulators`` live
    (rows x pixels) accumulators (the backward rebuilding its input keeps two)."""
    threads = 32 * 4
    acc = ACC_PER_THREAD[dtype] * threads // accumulators
    block_rows = chunk(rows, max(16, acc // 32))
    n_rows = triton.cdiv(rows, block_rows)
    operand = ELEMS_PER_THREAD[dtype] * threads // BLOCK_K  # a (BLOCK_K x pixels) chunk is elementwise work
    block_p = pixel_block(b, p, min(MAX_BLOCK_P, operand, max(16, acc // block_rows)), n_rows)
    return MixTiles(block_rows, BLOCK_K, block_p, n_rows, triton.cdiv(p, block_p))


def elementwise_tiles(rows: int, b: int, p: int, dtype: torch.dtype, rows_in_grid: bool = True) -> MixTiles:
    """Tiles of an elementwise pass over ``rows`` channels per pixel (the coupling): chunks of <= 16 rows,
    across the grid (or looped over by one program: ``rows_in_grid=False``, n_rows = 1), at most
    ELEMS_PER_THREAD elements per thread."""
    budget = ELEMS_PER_THREAD[dtype] * 32 * 4
    block_rows = chunk(rows, 16, lo=1)
    n_rows = triton.cdiv(rows, block_rows) if rows_in_grid else 1
    block_p = pixel_block(b, p, min(MAX_BLOCK_P, budget // block_rows), n_rows)
    return MixTiles(block_rows, block_rows, block_p, n_rows, triton.cdiv(p, block_p))


@dataclass(frozen=True)
class WeightGradTiles:
    """dW = sum over (sample, pixel-block) tiles of g x^T: grid (n_o, n_i, split); program (o, i, s) sums
    tiles s*tiles_per_program.. of its (block_o x block_i) block into partial s."""
    block_o: int
    block_i: int
    block_p: int
    n_o: int
    n_i: int
    n_pix: int
    tiles_per_program: int
    split: int
    num_warps: int = 4

    @property
    def grid(self) -> tuple[int, int, int]:
        return self.n_o, self.n_i, self.split


def weight_grad_tiles(c_in: int, c_out: int, b: int, p: int, dtype: torch.dtype) -> WeightGradTiles:
    """Blocks of dW (accumulator within ACC_PER_THREAD) and a split of the B*P pixels into partials:
    enough programs to fill the GPU, but partials (split x C_out x C_in) at most a quarter of grad_y."""
    acc = ACC_PER_THREAD[dtype] * 32 * 4
    block_o = chunk(c_out, max(16, int(acc ** 0.5)))
    block_i = chunk(c_in, max(16, acc // block_o))
    block_p = max(16, min(pow2(p), 32))  # the dot's K: its operands (tf32x3 splits them in two) stay small
    n_o, n_i, n_pix = triton.cdiv(c_out, block_o), triton.cdiv(c_in, block_i), triton.cdiv(p, block_p)
    tiles = b * n_pix
    split = min(tiles, triton.cdiv(MIN_PROGRAMS, n_o * n_i), max(1, b * p // (4 * c_in)))
    per_program = triton.cdiv(tiles, split)
    return WeightGradTiles(block_o, block_i, block_p, n_o, n_i, n_pix, per_program,
                           triton.cdiv(tiles, per_program))


def lu_tiles(c: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(CP, BN, num_warps) of the LU kernels: all CP = pow2(C) rows, BN columns within the elementwise
    budget (8 warps from CP = 256)."""
    cp = pow2(c)
    warps = 8 if cp >= 256 else 4
    bn = max(1, min(cp, ELEMS_PER_THREAD[dtype] * 32 * warps // cp))
    return cp, bn, warps
