"""Score model s_k(x_t, y, t) = −f_k(x_t, h(y), t)/σ_t: a shared condition encoder h and K batched heads f_k.

theory.md §1.3: s_{f,h}(x, y, t) := f(x, h(y), t). The K heads live in stacked weight tensors and run in one
batched matmul per layer (torch.baddbmm; MLP heads) or one grouped convolution per layer (conv heads on image x), so a
training step never loops over tasks in Python.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cdmtransfer.errors import ConfigError, DataError


class TimeFeatures(nn.Module):
    """Sinusoidal features of log t (no parameters); log t spreads [T0, T] evenly across scales."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("freqs", torch.pi * torch.logspace(0, math.log10(16), dim // 2), persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        u = torch.log(t)[..., None] / 4 * self.freqs
        return torch.cat([torch.sin(u), torch.cos(u)], dim=-1)


class MLPEncoder(nn.Module):
    """The learned condition encoder h: R^{D_y} → R^d (an MLP with SiLU activations). With `linear`, also a linear
    path: h(y) = P y + c + MLP(y), so that h can start as a closed-form linear summary of y (`start_linear`)."""

    def __init__(self, D_y: int, d: int, width: int, depth: int, linear: bool = False):
        super().__init__()
        layers, width_in = [], D_y
        for _ in range(depth):
            layers += [nn.Linear(width_in, width), nn.SiLU()]
            width_in = width
        layers.append(nn.Linear(width_in, d))
        self.net = nn.Sequential(*layers)
        self.linear = nn.Linear(D_y, d) if linear else None
        self.D_y, self.d = D_y, d

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        h = self.net(y)
        return h if self.linear is None else h + self.linear(y)

    @torch.no_grad()
    def start_linear(self, P: torch.Tensor, centre: torch.Tensor) -> None:
        """h(y) = P (y − centre) exactly: the linear path set to P [d, D_y], the MLP's output layer to 0 (it learns
        what the linear summary misses)."""
        self.linear.weight.copy_(P)
        self.linear.bias.copy_(-P @ centre)
        self.net[-1].weight.zero_()
        self.net[-1].bias.zero_()


class ConvEncoder(nn.Module):
    """h for image conditions: y [B, C·H·W] viewed as [B, C, H, W] → 3×3 convs (SiLU; stride 2 while the side is
    ≥ 8) → 2×2 average pool → linear to R^d. Translation-equivariant features, few parameters (model.encoder = conv)."""

    def __init__(self, D_y: int, d: int, width: int, depth: int, shape: tuple[int, int, int]):
        super().__init__()
        C, H, W = shape
        if C * H * W != D_y:
            raise ValueError(f"conv encoder: image shape {shape} does not hold D_y = {D_y} values")
        layers, ch, side = [], C, min(H, W)
        for _ in range(depth):
            stride = 2 if side >= 8 else 1
            layers += [nn.Conv2d(ch, width, 3, stride=stride, padding=1), nn.SiLU()]
            ch, side = width, (side + stride - 1) // stride
        layers += [nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * width, d)]
        self.net = nn.Sequential(*layers)
        self.D_y, self.d, self.shape, self.width, self.depth = D_y, d, tuple(shape), width, depth

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        lead = y.shape[:-1]  # [K, B] or [B]
        return self.net(y.reshape(-1, *self.shape)).view(*lead, self.d)


class FixedEncoder(nn.Module):
    """A known representation h*(y) = act(y Wᵀ + b), used by `adapt --mode oracle`. Buffers only: never trained."""

    ACTIVATIONS = {"identity": lambda z: z, "tanh": torch.tanh}

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, activation: str = "identity"):
        super().__init__()
        if activation not in self.ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}")
        self.register_buffer("weight", weight.detach().clone().float())
        self.register_buffer("bias", bias.detach().clone().float())
        self.activation = activation
        self.d, self.D_y = weight.shape

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.ACTIVATIONS[self.activation](y @ self.weight.T + self.bias)


class BatchedHeads(nn.Module):
    """K MLP heads f_k(x_t, w, t) → ε̂ with weights stacked on a leading task axis; inputs are [K, B, ·]."""

    def __init__(self, K: int, in_dim: int, out_dim: int, width: int, depth: int):
        super().__init__()
        dims = [in_dim] + [width] * depth + [out_dim]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(dims[:-1], dims[1:]):
            bound = 1 / math.sqrt(fan_in)  # the nn.Linear initialisation, per head
            self.weights.append(nn.Parameter(torch.empty(K, fan_in, fan_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(K, 1, fan_out).uniform_(-bound, bound)))
        self.K = K
        self.active: torch.Tensor | None = None  # when set, only these heads run (batched cells still training)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            if self.active is not None:
                w, b = w[self.active], b[self.active]
            z = torch.baddbmm(b, z, w)  # all K heads in one call: z_k ← b_k + z_k W_k
            if i < last:
                z = nn.functional.silu(z)
        return z


class ConvHeads(nn.Module):
    """K convolutional heads f_k(x_t, c) → ε̂ for image-shaped x (model.head = conv); inputs [K, B, ·], c = [w, τ(t)].

    For a point mass p(x | y) the ideal output is ε̂ = (x_t − α_t x*(y))/σ_t: per pixel, x_t combined with a rendering
    of x*(y) at a time-dependent scale. So a per-task conditioning MLP on c (a BatchedHeads) renders one H×W map and
    gives each conv block a FiLM scale and shift; the convs see [x_t, coordinates (CoordConv), map] and are 3×3 with
    SiLU. The K tasks are stacked on the channel axis of grouped convolutions (groups = K): one call per layer, no loop
    over tasks, and task k's weights only ever see task k's channels.
    """

    def __init__(self, K: int, shape: tuple[int, int, int], cond_dim: int, width: int, depth: int):
        super().__init__()
        C, H, W = shape
        self.K, self.shape, self.width, self.depth = K, tuple(shape), width, depth
        self.cond = BatchedHeads(K, cond_dim, H * W + 2 * width * depth, 4 * width, 1)  # map + FiLM per block
        chans = [C + 3] + [width] * depth  # x_t, u, v, map → width → … → width
        self.convs = nn.ModuleList(nn.Conv2d(K * a, K * b, 3, padding=1, groups=K) for a, b in zip(chans, chans[1:]))
        self.out = nn.Conv2d(K * width, K * C, 3, padding=1, groups=K)
        v, u = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, W), indexing="ij")
        self.register_buffer("coords", torch.stack([u, v]), persistent=False)  # [2, H, W]

    def forward(self, x_t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        K, B = x_t.shape[:2]
        C, H, W = self.shape
        c = self.cond(cond)  # [K, B, H·W + 2·width·depth]
        film = c[..., H * W:].reshape(K, B, self.depth, 2, self.width).permute(2, 3, 1, 0, 4)[..., None, None]
        maps = [x_t.reshape(K, B, C, H, W), self.coords.expand(K, B, 2, H, W), c[..., : H * W].reshape(K, B, 1, H, W)]
        z = torch.cat(maps, dim=2)
        z = z.transpose(0, 1).reshape(B, -1, H, W)  # [B, K·(C+3), H, W]: task k owns channel group k
        for conv, (scale, shift) in zip(self.convs, film):  # scale, shift [B, K, width, 1, 1]
            z = conv(z).view(B, K, self.width, H, W)
            z = nn.functional.silu(z * (1 + scale) + shift).view(B, -1, H, W)
        return self.out(z).view(B, K, C * H * W).transpose(0, 1)


def image_channels(d_x: int, image_shape) -> tuple[int, int, int]:
    """(C, H, W) of a flattened x with d_x = C·H·W values, from the suite's (H, W)."""
    H, W = image_shape[-2:]
    if d_x % (H * W):
        raise ValueError(f"conv head: image shape {tuple(image_shape)} does not divide d_x = {d_x}")
    return d_x // (H * W), H, W


class Preconditioning:
    """EDM preconditioning (Karras et al. 2022, §5 and Table 1) for the OU process x_t = α_t x_0 + σ_t ε.

    With σ_d² = E‖x_0‖²/d_x (the data's second moment per coordinate), Var(x_t) ≈ v_t = α_t² σ_d² + σ_t². The head F
    sees c_in x_t (c_in = v_t^{-1/2}: unit variance) and the denoiser is D = c_skip x_t + c_out F with
        c_skip = α_t σ_d² / v_t,   c_out = σ_t σ_d / √v_t,
    the choice that makes the regression target F* = (x_0 − c_skip x_t)/c_out unit-variance at every t. In ε-space
    ε̂ = (x_t − α_t D)/σ_t = c_in (σ_t c_in x_t − α_t σ_d F) (no division by σ_t, stable as t → T0), and the EDM loss
    ‖F − F*‖² = w_t ‖ε̂ − ε‖² with w_t = v_t / (α_t σ_d)² = 1 + σ_t²/(α_t σ_d)²: unit-scale targets at every t.
    """

    def __init__(self, sigma_data: float):
        self.sd = float(sigma_data)

    @staticmethod
    def _alpha_sigma(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.exp(-t)[..., None], torch.sqrt(-torch.expm1(-2 * t))[..., None]

    def c_in(self, t: torch.Tensor, sd=None) -> torch.Tensor:
        """c_in for the model's σ_d, or for `sd` (one per coordinate [K, 1, d_x]: ScoreModel's covariance)."""
        alpha, sigma = self._alpha_sigma(t)
        sd = self.sd if sd is None else sd
        return torch.rsqrt(alpha**2 * sd**2 + sigma**2)

    def eps(self, x_t: torch.Tensor, F: torch.Tensor, t: torch.Tensor, sd=None) -> torch.Tensor:
        alpha, sigma = self._alpha_sigma(t)
        sd = self.sd if sd is None else sd
        c_in = torch.rsqrt(alpha**2 * sd**2 + sigma**2)
        return c_in * (sigma * c_in * x_t - alpha * sd * F)

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = self._alpha_sigma(t)
        return (1 + sigma**2 / (alpha * self.sd) ** 2)[..., 0]


class ScoreModel(nn.Module):
    """ε̂_k(x_t, y, t) from heads f_k(x_in, h(y), τ(t)); the score is −ε̂/σ_t (diffusion.py).

    head = mlp: BatchedHeads on the concatenation; head = conv: ConvHeads on x_t as an image (needs image_shape).
    parametrization = eps: the head's output is ε̂ itself. edm: the head F is preconditioned as in Karras et al.
    (2022), rewritten for the OU process (`Preconditioning`): it sees c_in·x_t (unit variance at every t) and its
    output is a unit-variance correction to the skip term of the denoiser D = c_skip x_t + c_out F. Either way
    forward() returns ε̂, so losses, samplers and metrics are the same code for both.

    linear_mean: each head also owns a linear map μ_k(w) = A_k w + b_k of the code (`heads.mean`; zero when built,
    adapt starts a new head's at least squares on its rows: head_start.fit_linear_means),
    and sees x_t centred on it, x_t − α_t μ_k(w). With edm the denoiser becomes D = μ + c_skip (x_t − α_t μ) + c_out F:
    for F = 0 it is the exact denoiser of x_0 | y ~ N(μ_k(h(y)), σ_d² I), so a linear-Gaussian model is the starting
    point and F only learns what that model misses (at large t, D → μ: DSM there is least squares of x_0 on h(y)).

    mean_covariance = full (with linear_mean, edm and MLP heads): each head also owns a covariance Σ_k = U_k diag(s_k²)
    U_kᵀ (buffers `heads.mean.basis` [K, d_x, d_x] and `heads.mean.scale` [K, 1, d_x]), set in closed form and never
    by gradient (head_start.set_source_covariances in pretrain, head_start.fit_linear_means in adapt). The head works
    in Σ_k's eigenbasis, z = U_kᵀ(x_t − α_t μ), with the preconditioning's σ_d per coordinate (s_k): for F = 0 the
    denoiser is the exact one of x_0 | y ~ N(μ_k(h(y)), Σ_k). Built as U = I, s = σ_d: the same model as without it.
    """

    def __init__(self, encoder: nn.Module, K: int, d_x: int, head_width: int, head_depth: int, time_dim: int,
                 head: str = "mlp", image_shape: tuple[int, ...] | None = None, parametrization: str = "eps",
                 sigma_data: float = 1.0, head_config: dict | None = None, linear_mean: bool = False,
                 mean_covariance: str = "scalar"):
        super().__init__()
        if parametrization not in ("eps", "edm"):
            raise ValueError(f"unknown parametrization {parametrization!r}")
        self.parametrization, self.sigma_data = parametrization, float(sigma_data)
        self.precond = Preconditioning(self.sigma_data) if parametrization == "edm" else None
        self.edm_weighting = True  # a training choice (model.edm_weighting), not part of the saved spec
        self.encoder = encoder
        self.time = TimeFeatures(time_dim)
        if head == "conv":
            if image_shape is None:
                raise ValueError("conv head needs the image shape of x")
            shape = image_channels(d_x, image_shape)
            self.heads = ConvHeads(K, shape, encoder.d + time_dim, head_width, head_depth)
        elif head == "unet":  # unet.UNetHeads; head_config: mults, patch, zero_out, sees_y (y as input channels)
            from cdmtransfer.unet import UNetHeads  # noqa: PLC0415 (unet imports this module)

            if image_shape is None:
                raise ValueError("unet head needs the image shape of x")
            shape, opts = image_channels(d_x, image_shape), dict(head_config or {})
            sees_y, side = bool(opts.pop("sees_y", False)), shape[1] * shape[2]
            if sees_y and encoder.D_y % side:
                raise ValueError(f"head_sees_y: the condition (D_y = {encoder.D_y}) is not an image of x's size "
                                 f"{shape[1]}x{shape[2]}")
            self.heads = UNetHeads(K, shape, encoder.d + time_dim, head_width, head_depth,
                                   y_channels=encoder.D_y // side if sees_y else 0, code_dim=encoder.d, **opts)
        elif head == "mlp":
            self.heads = BatchedHeads(K, d_x + encoder.d + time_dim, d_x, head_width, head_depth)
        else:
            raise ValueError(f"unknown head kind {head!r}")
        self.d_x, self.head, self.linear_mean = d_x, head, bool(linear_mean)
        if self.linear_mean:  # inside `heads`: copied, stacked, clipped and saved with each task's head
            self.heads.mean = BatchedHeads(K, encoder.d, d_x, 1, 0)
            nn.init.zeros_(self.heads.mean.weights[0])
            nn.init.zeros_(self.heads.mean.biases[0])
        if mean_covariance not in ("scalar", "full"):
            raise ValueError(f"unknown mean_covariance {mean_covariance!r}")
        self.full_covariance = (mean_covariance == "full" and self.linear_mean and self.precond is not None
                                and head == "mlp")
        if self.full_covariance:  # buffers: saved and stacked with each head, not trained
            self.heads.mean.register_buffer("basis", torch.eye(d_x).expand(K, d_x, d_x).clone())
            self.heads.mean.register_buffer("scale", torch.full((K, 1, d_x), self.sigma_data))

    @property
    def head_sees_y(self) -> bool:
        """True when the heads also take the condition y itself (model.head_sees_y; U-Net heads on restoration)."""
        return bool(getattr(self.heads, "y_channels", 0))

    def head_output(self, x_in: torch.Tensor, code: torch.Tensor, t: torch.Tensor,
                    y: torch.Tensor | None = None) -> torch.Tensor:
        """The heads' raw output for input x_in and code w = h(y); y itself only reaches heads that see it.
        Shapes [K, B, ·] and t [K, B]."""
        if self.head == "mlp":
            return self.heads(torch.cat([x_in, code, self.time(t)], dim=-1))
        extra = (y,) if self.head_sees_y else ()
        return self.heads(x_in, torch.cat([code, self.time(t)], dim=-1), *extra)

    def eps_from_code(self, x_t: torch.Tensor, code: torch.Tensor, t: torch.Tensor,
                      y: torch.Tensor | None = None) -> torch.Tensor:
        """ε̂ for a precomputed code w = h(y) (heads only); pass y too when `head_sees_y`. Shapes [K, B, ·], t [K, B]."""
        if self.linear_mean:  # x_t − α_t μ(w): ε̂ is unchanged by the shift, so the formulas below apply as written
            x_t = x_t - torch.exp(-t)[..., None] * self.mean_of_code(code)
        if self.precond is None:
            return self.head_output(x_t, code, t, y)
        if self.full_covariance:  # in Σ_k's eigenbasis (ε is N(0, I) there too), σ_d per coordinate, then back
            basis, sd = self.covariance()
            z = torch.bmm(x_t, basis)
            c_in = self.precond.c_in(t, sd)
            return torch.bmm(self.precond.eps(z, self.head_output(c_in * z, code, t, y), t, sd), basis.transpose(1, 2))
        c_in = self.precond.c_in(t)
        return self.precond.eps(x_t, self.head_output(c_in * x_t, code, t, y), t)

    @torch.no_grad()
    def sampling_eps(self, code: torch.Tensor, y: torch.Tensor | None = None, head: int | None = 0):
        """eps(x, t: a 0-d time, out=None) -> ε̂ for fixed conditions at one time for all rows: a sampler's step.
        Head `head` on codes [B, d] and x [B, d_x]; or, with head = None, every head k on its own codes [K, B, d]
        and x [K, B, d_x] (several models stacked as one: evaluation's batched sampling). Pass y too when the heads
        see it. Equal to eps_from_code up to float rounding, without its per-row work that does not depend on the row
        or on t: for MLP heads the code's share of the first layer (W_c w + b) and μ(w) are computed once, the time's
        share (W_τ τ(t)) and the preconditioning coefficients (vectors over coordinates) once per call, so a step is
        three batched matmuls and a few passes over x. Other heads, stacks with `heads.active` set and subclasses with
        an ε̂ of their own run eps_from_code as is."""
        heads, active = self.heads, getattr(self.heads, "active", None)
        own_eps = type(self).eps_from_code is not ScoreModel.eps_from_code
        stacked = head is None
        if self.head != "mlp" or active is not None or own_eps:
            K = heads.K if active is None else len(active)  # every running head, `head` kept
            code_k = code if stacked else code.expand(K, *code.shape)
            y_k = y if stacked or y is None else y.expand(K, *y.shape)

            def generic(x, t, out=None):
                x_k = x if stacked else x.expand(K, *x.shape)
                eps = self.eps_from_code(x_k, code_k, t.expand(x_k.shape[:-1]), y_k)
                eps = eps if stacked else eps[head]
                return eps if out is None else out.copy_(eps)

            return generic
        pick = slice(None) if stacked else slice(head, head + 1)  # the heads that run, as a [K', ...] stack
        code = code if stacked else code[None]
        W = [w[pick] for w in heads.weights]
        b = [bias[pick] for bias in heads.biases]
        d_x, d = self.d_x, code.shape[-1]
        row_part = torch.baddbmm(b[0], code, W[0][:, d_x:d_x + d])  # [K', B, width]: b₀ + W_c h(y)
        mu = None
        if self.linear_mean:
            mean = heads.mean
            mu = torch.baddbmm(mean.biases[0][pick], code, mean.weights[0][pick])  # μ(w) = A w + b
        basis, sd = None, getattr(self.precond, "sd", None)  # σ_d: a float, or one per head [K, 1, 1]
        if self.full_covariance:
            basis, sd = heads.mean.basis[pick], heads.mean.scale[pick]  # U, and σ_d per coordinate [K', 1, d_x]
        elif torch.is_tensor(sd):
            sd = sd[pick]

        def eps(x, t, out=None):
            alpha, sigma = Preconditioning._alpha_sigma(t)  # [1] each
            time_part = self.time(t.reshape(1)) @ W[0][:, d_x + d:]  # [K', 1, width]: W_τ τ(t)
            z = x if stacked else x[None]
            if mu is not None:
                z = z - alpha * mu  # x_t − α_t μ(w)
            if basis is not None:
                z = torch.bmm(z, basis)  # Σ's eigenbasis
            if self.precond is None:
                x_in = z
            else:
                c_in = self.precond.c_in(t, sd)  # one per coordinate (or one for all)
                x_in = z * c_in
            h = torch.baddbmm(row_part + time_part, x_in, W[0][:, :d_x])
            for w, bias in zip(W[1:], b[1:]):
                h = torch.baddbmm(bias, nn.functional.silu(h), w)
            if self.precond is not None:  # Preconditioning.eps: c_in (σ c_in z − α σ_d F)
                h = torch.addcmul(z * (sigma * c_in**2), h, -(c_in * alpha * sd))
            if basis is not None and out is not None and out.is_contiguous():  # straight into the caller's rows
                return torch.bmm(h, basis.transpose(1, 2), out=out if stacked else out[None])
            if basis is not None:
                h = torch.bmm(h, basis.transpose(1, 2))
            h = h if stacked else h[0]
            return h if out is None else out.copy_(h)

        return eps

    def covariance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(U_k [K, d_x, d_x], s_k [K, 1, d_x]) of the heads that run (mean_covariance = full): Σ_k = U diag(s²) Uᵀ."""
        mean, active = self.heads.mean, getattr(self.heads, "active", None)
        if active is None:
            return mean.basis, mean.scale
        return mean.basis[active], mean.scale[active]

    def mean_fit_loss(self, code: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Per-sample ‖μ_k(w) − x_0‖² [K, B] of the linear mean (linear_mean; else 0): least squares of x_0 on the
        code, the t → ∞ limit of the denoiser's regression, which the σ_t²-weighted DSM alone weighs by ~α_t²/σ_t²
        only. The code is detached: this term trains A_k, b_k, not the encoder."""
        if not self.linear_mean:
            return x0.new_zeros(x0.shape[:-1])
        return (self.mean_of_code(code.detach()) - x0).pow(2).sum(-1)

    def mean_of_code(self, code: torch.Tensor) -> torch.Tensor:
        """μ_k(w) = A_k w + b_k [K, B, d_x] of the heads that run (linear_mean)."""
        mean = self.heads.mean
        mean.active = getattr(self.heads, "active", None)
        return mean(code)

    def dsm_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample weight of ‖ε̂ − ε‖² in the training loss: the EDM weight (Preconditioning) when preconditioned
        and `edm_weighting` is on; else 1 (the paper's σ²-weighted score loss)."""
        if self.precond is None or not self.edm_weighting:
            return torch.ones_like(t)
        return self.precond.loss_weight(t)

    def forward(self, x_t: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.eps_from_code(x_t, self.encoder(y), t, y)


def head_options(model_cfg, image_shape) -> dict:
    """ScoreModel keyword arguments for the recipe's model.head (a conv head needs the suite's image shape)."""
    if model_cfg.head in ("conv", "unet") and image_shape is None:
        raise ConfigError(f"model.head = {model_cfg.head} needs image data x; this suite has none (use model.head=mlp)")
    if model_cfg.head_sees_y and model_cfg.head != "unet":
        raise ConfigError(f"model.head_sees_y needs model.head = unet (got {model_cfg.head})")
    if model_cfg.head == "unet":
        if not model_cfg.unet_mults or min(model_cfg.unet_mults) < 1:
            raise ConfigError(f"model.unet_mults must be a non-empty list of positive integers, got "
                              f"{model_cfg.unet_mults}")
        config = {"mults": list(model_cfg.unet_mults), "patch": model_cfg.unet_patch,
                  "zero_out": model_cfg.unet_zero_out, "sees_y": model_cfg.head_sees_y}
        return {"head": "unet", "image_shape": image_shape, "head_config": config}
    return {"head": model_cfg.head, "image_shape": image_shape}


def build_encoder(spec: dict) -> nn.Module:
    """Rebuild an encoder from its plain-dict spec (as stored in a checkpoint's meta.json)."""
    if spec["kind"] == "mlp":
        return MLPEncoder(spec["D_y"], spec["d"], spec["width"], spec["depth"], spec.get("linear", False))
    if spec["kind"] == "conv":
        return ConvEncoder(spec["D_y"], spec["d"], spec["width"], spec["depth"], tuple(spec["shape"]))
    if spec["kind"] == "fixed":
        return FixedEncoder(torch.zeros(spec["d"], spec["D_y"]), torch.zeros(spec["d"]), spec["activation"])
    if spec["kind"] == "stacked":
        from cdmtransfer.validation import StackedEncoder  # noqa: PLC0415 (validation imports this module)

        return StackedEncoder(build_encoder(spec["base"]), spec["copies"])
    if spec["kind"] == "grid":
        from cdmtransfer.validation import GridEncoder  # noqa: PLC0415

        return GridEncoder([build_encoder(p) for p in spec["parts"]], spec["copies"], spec.get("sizes"))
    raise ValueError(f"unknown encoder kind {spec['kind']!r}")


def encoder_spec(encoder: nn.Module) -> dict:
    if isinstance(encoder, MLPEncoder):
        linears = [m for m in encoder.net if isinstance(m, nn.Linear)]
        return {"kind": "mlp", "D_y": encoder.D_y, "d": encoder.d, "width": linears[0].out_features,
                "depth": len(linears) - 1, **({"linear": True} if encoder.linear is not None else {})}
    if isinstance(encoder, ConvEncoder):
        return {"kind": "conv", "D_y": encoder.D_y, "d": encoder.d, "width": encoder.width, "depth": encoder.depth,
                "shape": list(encoder.shape)}
    if isinstance(encoder, FixedEncoder):
        return {"kind": "fixed", "D_y": encoder.D_y, "d": encoder.d, "activation": encoder.activation}
    if hasattr(encoder, "parts"):  # validation.GridEncoder: adapt's fold models of several candidate settings
        return {"kind": "grid", "D_y": encoder.D_y, "d": encoder.d, "copies": encoder.copies,
                "parts": [encoder_spec(p) for p in encoder.parts],
                **({"sizes": list(encoder.sizes)} if getattr(encoder, "sizes", None) else {})}
    if hasattr(encoder, "copies"):  # validation.StackedEncoder: adapt's fold models
        return {"kind": "stacked", "D_y": encoder.D_y, "d": encoder.d, "copies": encoder.copies,
                "base": encoder_spec(encoder._base)}
    raise TypeError(f"no spec for encoder {type(encoder).__name__}")


def model_spec(model: ScoreModel) -> dict:
    """Everything needed to rebuild `model` with the same shapes (plain dict, JSON-safe); for an ensemble of
    adapted models (ensemble.MeanPrediction) {"ensemble": [each member's spec]}."""
    if hasattr(model, "members"):
        return {"ensemble": [model_spec(member) for member in model.members]}
    spec = {"encoder": encoder_spec(model.encoder), "K": model.heads.K, "d_x": model.d_x,
            "time_dim": 2 * model.time.freqs.numel(), "parametrization": model.parametrization,
            "sigma_data": model.sigma_data, "linear_mean": model.linear_mean,
            "mean_covariance": "full" if model.full_covariance else "scalar"}
    if model.head == "conv":
        return {**spec, "head": "conv", "head_width": model.heads.width, "head_depth": model.heads.depth,
                "image_shape": list(model.heads.shape)}
    if model.head == "unet":
        return {**spec, "head": "unet", "image_shape": list(model.heads.shape), **model.heads.spec()}
    return {**spec, "head_width": model.heads.weights[0].shape[2], "head_depth": len(model.heads.weights) - 1}


def build_model(spec: dict) -> ScoreModel:
    """Inverse of model_spec; older specs without "head" / "parametrization" are MLP heads predicting ε."""
    if "ensemble" in spec:
        from cdmtransfer.ensemble import MeanPrediction  # noqa: PLC0415 (ensemble imports metrics, which imports this)

        members = spec["ensemble"]
        if not isinstance(members, list) or len(members) < 2:
            raise ValueError(f"an ensemble needs a list of at least two member specs, got {members!r:.80}")
        return MeanPrediction([build_model(member) for member in members])
    return ScoreModel(build_encoder(spec["encoder"]), spec["K"], spec["d_x"], spec["head_width"],
                      spec["head_depth"], spec["time_dim"], spec.get("head", "mlp"), spec.get("image_shape"),
                      spec.get("parametrization", "eps"), spec.get("sigma_data", 1.0), spec.get("head_config"),
                      spec.get("linear_mean", False), spec.get("mean_covariance", "scalar"))


def rebuild(spec, source: str, part: str = "model") -> nn.Module:
    """build_model (part "model") or build_encoder (part "encoder") on a spec read from a checkpoint's meta.json.

    The file may be damaged or foreign: any failure to build from it is a DataError naming `source`.
    """
    if not isinstance(spec, dict):
        raise DataError(f"{source}: checkpoint holds no {part} spec")
    try:
        return build_model(spec) if part == "model" else build_encoder(spec)
    except Exception as exc:  # noqa: BLE001 (KeyError, TypeError, ValueError, RuntimeError, ... from a bad spec)
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise DataError(f"{source}: the {part} spec in meta.json cannot be built ({type(exc).__name__}: "
                        f"{first})") from None


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
