"""K small U-Net score heads run as one network (model.head = unet), for image x up to MNIST's 28×28 on CPU.

Same call as ConvHeads: `heads(x_in [K, B, C·H·W], cond [K, B, d + time_dim]) -> [K, B, C·H·W]`, cond = [h(y), τ(t)].
The output is the head's raw output; ScoreModel turns it into ε̂ (its parametrisation), so nothing here assumes the
head predicts ε. With `y_channels` (model.head_sees_y) the condition image y enters as extra input channels:
`heads(x_in, cond, cond_image [K, B, C_y·H·W])`.

Batching the K tasks: they sit on the channel axis, [B, K·ch, H, W], and every convolution is grouped (groups = K),
so one call per layer serves all tasks and task k's weights only ever see task k's channels. GroupNorm uses K·g
groups over K·ch channels, g dividing ch, so no normalisation group straddles two tasks. On CPU (one thread, fwd +
bwd of one 3×3 layer, K = 9, B = 32–64, 28×28 / 14×14 / 7×7) grouped convolutions cost the same as
torch.func.vmap over per-task weights (which lowers to them) and 3–10× less than the tasks on the batch axis as
im2col + bmm. A grouped convolution with one or two outputs per group runs at a few % of that speed, so the output
layer is a per-task 1×1 map done as one bmm.

Per task (Ho et al. 2020; AdaGN from Dhariwal & Nichol 2021):
  input    [x_in, y (head_sees_y), code map]: the code h(y) ∈ R^d laid out as an s×s image (s = ⌈√d⌉, zero-padded)
           and resized bilinearly to H×W. The code reaches the head spatially, read by convolutions whose weights
           are shared across positions; a dense per-task map from the code to an image (+ CoordConv coordinates,
           as ConvHeads does) had to be learnt from the m target samples alone and transferred worse (below).
  patch    sides ≥ 16: 2×2 pixel patches become channels (pixel_unshuffle; odd sides are padded), so the first level
           runs at 14×14 for MNIST: at full resolution the same network costs ~3× more per step.
  down     per level `depth` residual blocks, then a stride-2 3×3 conv (sides round up: 14 → 7 → 4, 8 → 4 → 2);
           levels stop before a side would drop below 2
  up       nearest upsampling to the skip's size + 3×3 conv, concatenation with the skip, `depth` residual blocks
  out      GroupNorm, SiLU, per-task 1×1 map to C·p² channels (pixel_shuffle back to H×W; zero-init with zero_out)
Residual block: GN → SiLU → conv → GN → AdaGN h·(1 + s) + b → SiLU → conv, plus the input (1×1 conv when the width
changes). (s, b) of every block come from one per-task MLP on cond (BatchedHeads, one hidden layer of 4·max width).

Design measurements, MNIST denoising at m = 10 with a frozen encoder and a new (randomly initialised) target head,
one seed (recipes/mnist-denoise.yaml, then with the EDM loss weighting): the dense code map with coordinates gave
12.6 dB posterior-mean PSNR, the spatial code map 14.1 dB (and a lower source validation DSM); FiLM from τ(t) alone
instead of [h(y), τ(t)] changed nothing (14.0 dB); a zero-initialised output layer gave 14.2 dB but trained more
slowly (its folds hit the 600-step cap at a higher validation DSM, 89 vs 74), so zero_out is off by default.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cdmtransfer.models import BatchedHeads


def norm_groups(ch: int, per_group: int = 4) -> int:
    """GroupNorm groups per task: the largest divisor of ch that leaves at least `per_group` channels per group."""
    g = max(1, ch // per_group)
    while ch % g:
        g -= 1
    return g


class TaskConv(nn.Conv2d):
    """K independent convolutions in one grouped call: [B, K·a, H, W] → [B, K·b, H', W']."""

    def __init__(self, K: int, a: int, b: int, kernel: int = 3, stride: int = 1):
        super().__init__(K * a, K * b, kernel, stride=stride, padding=kernel // 2, groups=K)


class TaskNorm(nn.GroupNorm):
    """GroupNorm whose groups never straddle two tasks' channel blocks (K·g groups over K·ch channels)."""

    def __init__(self, K: int, ch: int, affine: bool = True):
        super().__init__(K * norm_groups(ch), K * ch, affine=affine)


class ResBlock(nn.Module):
    def __init__(self, K: int, a: int, b: int):
        super().__init__()
        self.channels = b
        self.norm1, self.conv1 = TaskNorm(K, a), TaskConv(K, a, b)
        self.norm2, self.conv2 = TaskNorm(K, b, affine=False), TaskConv(K, b, b)  # AdaGN supplies scale and shift
        self.skip = TaskConv(K, a, b, kernel=1) if a != b else None

    def forward(self, z: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(z)))
        h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
        return h + (z if self.skip is None else self.skip(z))


def level_sides(H: int, W: int, levels: int) -> list[tuple[int, int]]:
    """Spatial size at each level: stride-2 convs with padding 1 round up (28 → 14 → 7, 7 → 4)."""
    sides = [(H, W)]
    for _ in range(levels - 1):
        h, w = sides[-1]
        sides.append(((h + 1) // 2, (w + 1) // 2))
    return sides


class UNetHeads(nn.Module):
    """K U-Net heads f_k(x_in, cond[, y]) for image x of shape (C, H, W); all tasks in one batched call (module doc).

    width: channels at the first level (times mults[i] at level i); depth: residual blocks per level and path;
    code_dim: how many leading entries of cond are the code h(y) (laid out as an image; 0: none);
    y_channels: channels of the condition image fed as extra input (0: the head sees the code only);
    patch: pixel patch size (0: 2 when both sides are ≥ 16, else 1); zero_out: zero-initialised output layer.
    """

    def __init__(self, K: int, shape: tuple[int, int, int], cond_dim: int, width: int, depth: int,
                 mults: tuple[int, ...] = (1, 2, 2), code_dim: int = 0, y_channels: int = 0, patch: int = 0,
                 zero_out: bool = False):
        super().__init__()
        C, H, W = shape
        if depth < 1 or width < 1 or not mults or min(mults) < 1:
            raise ValueError(f"unet head: need width, depth >= 1 and positive multipliers, got {width}, {depth}, "
                             f"{list(mults)}")
        if not 0 <= code_dim <= cond_dim:
            raise ValueError(f"unet head: code_dim = {code_dim} is not within cond_dim = {cond_dim}")
        self.K, self.shape, self.width, self.depth = K, tuple(shape), width, depth
        self.mults, self.code_dim = tuple(map(int, mults)), code_dim
        self.y_channels, self.zero_out = y_channels, zero_out
        self.patch = p = patch or (2 if min(H, W) >= 16 else 1)
        self.code_side = math.isqrt(code_dim - 1) + 1 if code_dim else 0
        first = (-(-H // p), -(-W // p))
        levels = 1
        while levels < len(self.mults) and min(level_sides(*first, levels + 1)[-1]) >= 2:
            levels += 1
        self.sides = level_sides(*first, levels)
        chans = [width * m for m in self.mults[:levels]]

        self.stem = TaskConv(K, (C + y_channels + (1 if code_dim else 0)) * p * p, chans[0])
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        ch = chans[0]
        for i, c in enumerate(chans):
            self.down.append(nn.ModuleList(ResBlock(K, ch if j == 0 else c, c) for j in range(depth)))
            ch = c
            if i < levels - 1:
                self.downsample.append(TaskConv(K, c, chans[i + 1], stride=2))
                ch = chans[i + 1]
        self.mid = ResBlock(K, ch, ch)
        self.upsample, self.up = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(levels)):
            c = chans[i]
            if i < levels - 1:
                self.upsample.append(TaskConv(K, ch, c))
                ch = c
            self.up.append(nn.ModuleList(ResBlock(K, ch + c if j == 0 else c, c) for j in range(depth)))
            ch = c
        self.out_norm = TaskNorm(K, ch)
        bound = 1 / math.sqrt(ch)  # nn.Linear's initialisation, per task
        self.out_weight = nn.Parameter(torch.empty(K, ch, C * p * p).uniform_(-bound, bound))
        self.out_bias = nn.Parameter(torch.empty(K, 1, C * p * p).uniform_(-bound, bound))
        if zero_out:
            nn.init.zeros_(self.out_weight)
            nn.init.zeros_(self.out_bias)
        blocks = [*(b for level in self.down for b in level), self.mid, *(b for level in self.up for b in level)]
        self._film = [b.channels for b in blocks]  # each block's (scale, shift) width
        self.cond = BatchedHeads(K, cond_dim, 2 * sum(self._film), 4 * max(chans), 1)

    def forward(self, x_in: torch.Tensor, cond: torch.Tensor, cond_image: torch.Tensor | None = None) -> torch.Tensor:
        K, B = x_in.shape[:2]
        C, H, W = self.shape
        film = self.cond(cond)  # [K, B, 2·Σ widths]: every block's (scale, shift), per task
        films, at = [], 0
        for ch in self._film:  # → (scale, shift), each [B, K·ch, 1, 1] in the task-on-channels layout
            sb = film[..., at: at + 2 * ch].reshape(K, B, 2, ch).permute(2, 1, 0, 3)
            films.append(sb.reshape(2, B, K * ch, 1, 1))
            at += 2 * ch
        films = iter(films)

        parts = [x_in.reshape(K, B, C, H, W)]
        if self.y_channels:
            if cond_image is None:
                raise ValueError("this unet head was built to see the condition image (head_sees_y); none was given")
            parts.append(cond_image.reshape(K, B, self.y_channels, H, W))
        if self.code_dim:  # the code as an s×s image, resized to H×W
            s = self.code_side
            code = F.pad(cond[..., : self.code_dim], (0, s * s - self.code_dim)).reshape(K * B, 1, s, s)
            parts.append(F.interpolate(code, size=(H, W), mode="bilinear", align_corners=False).view(K, B, 1, H, W))
        z = torch.cat(parts, dim=2).transpose(0, 1).reshape(B, -1, H, W)  # [B, K·channels, H, W]: task-major
        p = self.patch
        if p > 1:  # space-to-depth on each task's channels (padded to a multiple of p)
            z = F.pad(z, (0, -W % p, 0, -H % p))
            z = F.pixel_unshuffle(z.view(B * K, -1, *z.shape[-2:]), p).view(B, -1, *self.sides[0])

        z = self.stem(z)
        skips = []
        for i, blocks in enumerate(self.down):
            for block in blocks:
                z = block(z, *next(films))
            skips.append(z)
            if i < len(self.downsample):
                z = self.downsample[i](z)
        z = self.mid(z, *next(films))
        for i, blocks in enumerate(self.up):
            skip = skips.pop()
            if i > 0:
                z = self.upsample[i - 1](F.interpolate(z, size=skip.shape[-2:], mode="nearest"))
            side = skip.shape[-2:]
            z = torch.cat([z.view(B, K, -1, *side), skip.view(B, K, -1, *side)], dim=2).view(B, -1, *side)  # per task
            for block in blocks:
                z = block(z, *next(films))

        Hp, Wp = self.sides[0]
        z = F.silu(self.out_norm(z)).view(B, K, -1, Hp * Wp).permute(1, 0, 3, 2).reshape(K, B * Hp * Wp, -1)
        z = torch.baddbmm(self.out_bias, z, self.out_weight)  # per-task 1×1 map: [K, B·Hp·Wp, C·p²]
        z = z.view(K, B, Hp, Wp, -1).permute(0, 1, 4, 2, 3)
        if p > 1:
            z = F.pixel_shuffle(z.reshape(K * B, -1, Hp, Wp), p)[..., :H, :W]
        return z.reshape(K, B, C * H * W)

    def spec(self) -> dict:
        """model_spec entries that rebuild these heads (ScoreModel's head_width, head_depth and head_config)."""
        return {"head_width": self.width, "head_depth": self.depth,
                "head_config": {"mults": list(self.mults), "patch": self.patch, "zero_out": self.zero_out,
                                "sees_y": self.y_channels > 0}}
