"""K small U-Net score heads run as one network (model.head = unet), for image x at MNIST scale (28×28) on a CPU.

Same call as ConvHeads: `heads(x_in [K, B, C·H·W], cond [K, B, cond_dim]) -> [K, B, C·H·W]`, with cond = [h(y), τ(t)].
The output is the head's raw output; ScoreModel turns it into ε̂ (its parametrisation), so nothing here assumes that
the head predicts ε. `cond_image` [K, B, C_y·H·W] (model.head_sees_y) enters as extra input channels.

Layout: the K tasks are stacked on the channel axis, [B, K·ch, H, W], and every convolution is grouped (groups = K),
so one call per layer serves all tasks and task k's weights only ever see task k's channels. GroupNorm uses K·g
groups over K·ch channels: each group lies inside one task's block of ch channels (g divides ch), so normalisation
never mixes tasks. Grouped convolutions are the faster of the two batched layouts on CPU (measured: the tasks on the
batch axis with per-task weights as im2col + bmm costs 3–5× more per layer at K = 9, B = 32–64, 28×28 and 14×14).

Architecture (Ho et al. 2020; Dhariwal & Nichol 2021 for AdaGN), per task:
  stem     3×3 conv on [x_in, (y), u, v] (CoordConv coordinates) at full resolution → width·mults[0] channels
  down     per level `depth` residual blocks, then a stride-2 3×3 conv (sides rounded up: 28 → 14 → 7, 8 → 4 → 2,
           odd sides work without padding); the last level's output is the bottleneck
  render   the conditioning MLP also renders a bottleneck-sized feature map from cond, added there: the code h(y)
           carries the image content (a point-mass posterior needs an image, not a per-channel scale), and FiLM
           alone only rescales channels
  up       nearest upsampling to the skip's size + 3×3 conv, concatenation with the skip, `depth` residual blocks
  out      GroupNorm, SiLU, 3×3 conv to C channels (zero-initialised when `zero_out`)
Residual block: GN → SiLU → conv → GN → AdaGN (h·(1 + s) + b, with (s, b) from cond) → SiLU → conv, plus the input
(1×1 conv when the width changes). (s, b) for every block and the rendered map come from one per-task MLP on cond
(BatchedHeads, one hidden layer).
"""

from __future__ import annotations

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
        self.K, self.b = K, b
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
    """K U-Net heads f_k(x_in, cond[, y]) for image x [C, H, W]; all tasks in one batched call (see module doc).

    width: channels at full resolution (times mults[i] at level i); depth: residual blocks per level and path;
    mults: one entry per resolution level (levels past a 2-pixel side are dropped: 8×8 keeps 8, 4, 2);
    y_channels: channels of an image condition fed as extra input (0: the head sees the code only);
    zero_out: zero-initialise the output convolution (the head starts at output 0).
    """

    def __init__(self, K: int, shape: tuple[int, int, int], cond_dim: int, width: int, depth: int,
                 mults: tuple[int, ...] = (1, 2, 2), y_channels: int = 0, zero_out: bool = False,
                 patch: int = 0, cond_hidden: int | None = None, code_dim: int = 0, code_map: bool = True,
                 render: bool = False, coords: bool = False, film_code: bool = True):
        super().__init__()
        C, H, W = shape
        if depth < 1 or width < 1 or not mults:
            raise ValueError(f"unet head: need width, depth >= 1 and at least one level, got {width}, {depth}, {mults}")
        self.patch = patch or (2 if min(H, W) >= 16 else 1)
        p = self.patch
        Hp, Wp = -(-H // p), -(-W // p)
        levels = 1
        while levels < len(mults) and min(level_sides(Hp, Wp, levels + 1)[-1]) >= 2:
            levels += 1
        self.K, self.shape, self.width, self.depth = K, tuple(shape), width, depth
        self.mults, self.y_channels, self.zero_out = tuple(int(m) for m in mults), y_channels, zero_out
        self.sides = level_sides(Hp, Wp, levels)
        chans = [width * int(m) for m in self.mults[:levels]]
        self.chans = chans
        self.code_dim = code_dim if code_map else 0
        self.code_side = int(-(-code_dim**0.5 // 1)) if self.code_dim else 0
        self.render, self.use_coords = render, coords
        extra = (1 if self.code_dim else 0) + (2 if coords else 0)
        self.stem = TaskConv(K, (C + y_channels + extra) * p * p, chans[0])
        self.down = nn.ModuleList()  # per level: `depth` blocks
        self.downsample = nn.ModuleList()
        ch = chans[0]
        for i, c in enumerate(chans):
            self.down.append(nn.ModuleList(ResBlock(K, ch if j == 0 else c, c) for j in range(depth)))
            ch = c
            if i < levels - 1:
                self.downsample.append(TaskConv(K, c, chans[i + 1], stride=2))
                ch = chans[i + 1]
        self.mid = ResBlock(K, ch, ch)
        self.upsample = nn.ModuleList()
        self.up = nn.ModuleList()
        for i in reversed(range(levels)):
            c = chans[i]
            if i < levels - 1:
                self.upsample.append(TaskConv(K, ch, c))
                ch = c
            self.up.append(nn.ModuleList(ResBlock(K, (ch + c) if j == 0 else c, c) for j in range(depth)))
            ch = c
        self.out_norm = TaskNorm(K, ch)
        # 1×1 output (per task a [ch → C·p²] matrix, one bmm): a grouped conv with so few outputs per group runs at
        # a few % of the speed of the others on CPU
        bound = 1 / ch**0.5
        self.out_weight = nn.Parameter(torch.empty(K, ch, C * p * p).uniform_(-bound, bound))
        self.out_bias = nn.Parameter(torch.empty(K, 1, C * p * p).uniform_(-bound, bound))
        if zero_out:
            nn.init.zeros_(self.out_weight)
            nn.init.zeros_(self.out_bias)

        blocks = [b for level in self.down for b in level] + [self.mid] + [b for level in self.up for b in level]
        self._film = [b.b for b in blocks]  # channels of each block's (scale, shift)
        h_low, w_low = self.sides[-1]
        self._render = (chans[-1], h_low, w_low)
        n_out = 2 * sum(self._film) + (chans[-1] * h_low * w_low if render else 0)
        self.film_code = film_code or not self.code_dim
        self._film_from = 0 if self.film_code else self.code_dim  # FiLM from [code, τ(t)], or from τ(t) alone
        self.cond = BatchedHeads(K, cond_dim - self._film_from, n_out, cond_hidden or 4 * max(chans), 1)
        v, u = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, W), indexing="ij")
        self.register_buffer("coords", torch.stack([u, v]), persistent=False)  # [2, H, W]

    def _task_channels(self, a: torch.Tensor, ch: int, H: int, W: int) -> torch.Tensor:
        """[K, B, ch·H·W] → [B, K·ch, H, W] (task k owns channel block k)."""
        K, B = a.shape[:2]
        return a.reshape(K, B, ch, H, W).transpose(0, 1).reshape(B, K * ch, H, W)

    def forward(self, x_in: torch.Tensor, cond: torch.Tensor, cond_image: torch.Tensor | None = None) -> torch.Tensor:
        K, B = x_in.shape[:2]
        C, H, W = self.shape
        c = self.cond(cond[..., self._film_from:])  # [K, B, n_out]: (scale, shift) of every block, then the rendered bottleneck map
        films, at = [], 0
        for ch in self._film:
            sb = c[..., at: at + 2 * ch].reshape(K, B, 2, ch).permute(2, 1, 0, 3).reshape(2, B, K * ch, 1, 1)
            films.append(sb)
            at += 2 * ch
        rendered = self._task_channels(c[..., at:], *self._render) if self.render else 0
        films = iter(films)

        parts = [x_in.reshape(K, B, C, H, W)]
        if self.y_channels:
            if cond_image is None:
                raise ValueError("this unet head was built to see the condition image (head_sees_y); none was given")
            parts.append(cond_image.reshape(K, B, self.y_channels, H, W))
        if self.code_dim:  # the code h(y) laid out as an s×s image (zero-padded to s²), resized to H×W
            s_ = self.code_side
            code = F.pad(cond[..., : self.code_dim], (0, s_ * s_ - self.code_dim)).reshape(K * B, 1, s_, s_)
            parts.append(F.interpolate(code, size=(H, W), mode="bilinear", align_corners=False).view(K, B, 1, H, W))
        if self.use_coords:
            parts.append(self.coords.expand(K, B, 2, H, W))
        z = torch.cat(parts, dim=2).transpose(0, 1).reshape(B, -1, H, W)  # [B, K·(C + C_y + 2), H, W]
        p = self.patch
        if p > 1:  # space-to-depth: p×p pixel patches become channels (padded to a multiple of p)
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
        z = self.mid(z + rendered, *next(films))
        for i, blocks in enumerate(self.up):
            skip = skips.pop()
            if i > 0:
                z = self.upsample[i - 1](F.interpolate(z, size=skip.shape[-2:], mode="nearest"))
            z = torch.cat([z.view(B, K, -1, *z.shape[-2:]), skip.view(B, K, -1, *skip.shape[-2:])], dim=2)
            z = z.view(B, -1, *skip.shape[-2:])  # per task: [upsampled, skip], so groups still follow tasks
            for block in blocks:
                z = block(z, *next(films))
        z = F.silu(self.out_norm(z))
        Hp, Wp = self.sides[0]
        z = z.view(B, K, -1, Hp * Wp).permute(1, 0, 3, 2).reshape(K, B * Hp * Wp, -1)
        z = torch.baddbmm(self.out_bias, z, self.out_weight)  # [K, B·Hp·Wp, C·p²]
        z = z.view(K, B, Hp, Wp, -1).permute(0, 1, 4, 2, 3)  # [K, B, C·p², Hp, Wp]
        if p > 1:
            z = F.pixel_shuffle(z.reshape(K * B, -1, Hp, Wp), p)[..., :H, :W]
        return z.reshape(K, B, C * H * W)

    def spec(self) -> dict:
        """model_spec entries that rebuild these heads (ScoreModel's head_width, head_depth and head_config)."""
        return {"head_width": self.width, "head_depth": self.depth,
                "head_config": {"mults": list(self.mults), "patch": self.patch, "zero_out": self.zero_out,
                                "sees_y": self.y_channels > 0, "code_map": self.code_dim > 0, "render": self.render,
                                "coords": self.use_coords, "film_code": self.film_code}}
