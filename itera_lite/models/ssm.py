"""Mamba-2 (SSD) mixer: chunked parallel scan, one-token step, sequential reference.

Glossary (shape letters used in comments):
    B  batch                 L  sequence length        D  model width (d_model)
    H  SSM heads             P  head dim               N  state size per head
    G  B/C groups            K  conv kernel width      Cc conv channels (H*P + 2*G*N)
    c  chunks, s / l  positions inside a chunk

The recurrence, per head h and token t (state layout (N, P), as onnxruntime's
`com.microsoft::LinearAttention` keeps it, so the exported state needs no transpose):

    state_t = exp(dt_t * A_h) * state_{t-1} + B_t ⊗ (dt_t * x_t)
    y_t     = C_t · state_t + D_h * x_t

Three implementations of the scan live here and are tested against each other:
`ssd_reference` (a plain loop, the definition), `ssd_chunked` (training and prefill) and
`ssd_step` (decode). During `torch.export` the mixer calls them through the custom ops
`itera::selective_scan`, `itera::ssm_step` and `itera::causal_conv1d`, which the exporter
turns into `ai.itera` ONNX nodes; in eager mode the plain functions run (with autograd).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .norms import GatedRMSNorm

# ---------------------------------------------------------------------------------------
# Scan kernels: x (B, L, H, P), dt (B, L, H) after softplus, A (H,) negative,
# Bm / Cm (B, L, G, N), state (B, H, N, P).


def _expand_groups(t: Tensor, heads: int) -> Tensor:
    """(..., G, N) -> (..., H, N): each group serves H/G consecutive heads."""
    return t.repeat_interleave(heads // t.shape[-2], dim=-2)


def ssd_reference(x: Tensor, dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, state: Tensor):
    """Sequential scan, one token at a time: the definition the fast paths are tested against."""
    ys = []
    for t in range(x.shape[1]):
        y, state = ssd_step(x[:, t], dt[:, t], A, Bm[:, t], Cm[:, t], state)
        ys.append(y)
    return torch.stack(ys, dim=1), state  # (B, L, H, P), (B, H, N, P)


def ssd_step(x: Tensor, dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, state: Tensor):
    """One token: x (B, H, P), dt (B, H), Bm/Cm (B, G, N), state (B, H, N, P)."""
    H = x.shape[1]
    Bh = _expand_groups(Bm, H)  # (B, H, N)
    Ch = _expand_groups(Cm, H)  # (B, H, N)
    decay = torch.exp(dt * A)[..., None, None]  # (B, H, 1, 1)
    state = decay * state + Bh[..., :, None] * (dt[..., None] * x)[..., None, :]  # (B, H, N, P)
    y = torch.einsum("bhn,bhnp->bhp", Ch, state)  # (B, H, P)
    return y, state


def ssd_token(x: Tensor, dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, state: Tensor):
    """`ssd_step` in the sequence layout of one token: x (B, 1, H, P), dt (B, 1, H), Bm/Cm (B, 1, G, N).

    The decode step keeps this (B, 1, ·) layout end to end, the layout onnxruntime's fused
    kernels read, so its exported graph needs no reshapes around them (bench/PROFILE.md).
    """
    y, state = ssd_step(x[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0], state)
    return y[:, None], state  # (B, 1, H, P), (B, H, N, P)


# exp() of a sum of dt·A is a decay in (0, 1]; its exponent is floored at DECAY_FLOOR. A term
# below e^-40 (~4e-18 of an input) is far under float32's resolution of any output it adds to,
# and onnxruntime's CPU Exp takes a ~18x slower path wherever its result is denormal or zero
# (inputs below about -87.3, and the -inf a causal mask would put above the diagonal): that path
# was ~15% of a tiny prompt's kernels (bench/PROFILE.md). So masks apply after exp, as zeros.
DECAY_FLOOR = -40.0


def _decay(exponent: Tensor) -> Tensor:
    """exp(exponent) for exponents <= 0, floored at DECAY_FLOOR (above)."""
    return torch.exp(exponent.clamp(min=DECAY_FLOOR))


def _segsum_decay(a: Tensor) -> Tensor:
    """(..., T) -> (..., T, T) with [i, j] = exp(sum(a[j+1 .. i])) for j <= i, 0 above.

    Summing masked copies instead of subtracting cumsums keeps the exponent exact for long
    chunks (cumsum differences lose precision when the decay is strong).
    """
    T = a.shape[-1]
    ones = torch.ones(T, T, dtype=a.dtype, device=a.device)
    # [..., i, j] = sum of a_k for j < k <= i; 0 on and above the diagonal. Constant masks by
    # broadcasting (Mul), not Expand + Where: exported, those ran on one thread and were ~15%
    # of a prompt's kernels at 2 threads (bench/PROFILE.md).
    seg = torch.cumsum(a[..., :, None] * torch.tril(ones, diagonal=-1), dim=-2)
    return _decay(seg) * torch.tril(ones)


def ssd_chunked(
    x: Tensor, dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, state: Tensor, chunk_size: int
):
    """Chunked SSD scan (Mamba-2 paper, Listing 1): quadratic inside chunks, linear across.

    Written as batched matmuls with heads as (G, H/G), so a group's B and C serve its heads by
    broadcasting: exported, this is what onnxruntime runs for a prompt, and its MatMul is ~2.5x
    faster than the einsum form's Einsum or the fused LinearAttention's token loop
    (bench/PROFILE.md).
    """
    b, L, H, P = x.shape
    G, N = Bm.shape[-2:]
    R = H // G
    pad = (-L) % chunk_size
    if pad:  # padded steps have dt = 0: no decay and no input, so the final state is unchanged
        x, dt, Bm, Cm = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, Bm, Cm))
    c, Q = x.shape[1] // chunk_size, chunk_size
    X = (x * dt[..., None]).reshape(b, c, Q, G, R, P).permute(0, 3, 4, 1, 2, 5)  # (B, G, R, c, Q, P)
    a = (dt * A).reshape(b, c, Q, G, R).permute(0, 3, 4, 1, 2)  # (B, G, R, c, Q)
    Bg = Bm.reshape(b, c, Q, G, N).permute(0, 3, 1, 2, 4)[:, :, None]  # (B, G, 1, c, Q, N)
    Cg = Cm.reshape(b, c, Q, G, N).permute(0, 3, 1, 2, 4)[:, :, None]
    a_cum = torch.cumsum(a, dim=-1)  # (B, G, R, c, Q)

    # 1. Outputs from inputs of the same chunk (the "diagonal blocks").
    y = ((Cg @ Bg.transpose(-1, -2)) * _segsum_decay(a)) @ X  # (B, G, R, c, Q, P)

    # 2. Each chunk's contribution to the state at its end.
    decay_to_end = _decay(a_cum[..., -1:] - a_cum)  # (B, G, R, c, Q)
    chunk_states = (Bg * decay_to_end[..., None]).transpose(-1, -2) @ X  # (B, G, R, c, N, P)

    # 3. Carry states across chunks, starting from the given state.
    states = torch.cat([state.reshape(b, G, R, 1, N, P), chunk_states], dim=3)  # (B, G, R, c+1, N, P)
    decay_chunk = _segsum_decay(F.pad(a_cum[..., -1], (1, 0)))  # (B, G, R, c+1, c+1)
    states = (decay_chunk @ states.flatten(-2)).unflatten(-1, (N, P))
    final_state = states[:, :, :, -1].reshape(b, H, N, P)

    # 4. Outputs from the state entering each chunk.
    y = y + (Cg @ states[:, :, :, :-1]) * _decay(a_cum)[..., None]
    return y.permute(0, 3, 4, 1, 2, 5).reshape(b, c * Q, H, P)[:, :L], final_state


def causal_conv1d(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor):
    """Depthwise causal conv + SiLU with carried state.

    x (B, L, Cc), conv_state (B, K-1, Cc) holding the previous K-1 inputs, channels last like
    the activations (so the decode graph's fused conv reads both as they are), weight (Cc, K),
    bias (Cc,) -> y (B, L, Cc), new conv_state.
    """
    window = torch.cat([conv_state, x], dim=1)  # (B, K-1+L, Cc)
    K = weight.shape[-1]
    if x.shape[1] == 1:
        y = (window * weight.T).sum(1, keepdim=True)  # (B, 1, Cc): a step needs no conv kernel
    else:
        y = F.conv1d(window.transpose(1, 2), weight[:, None, :], groups=weight.shape[0]).transpose(1, 2)
    return F.silu(y + bias), window[:, window.shape[1] - (K - 1):]


# ---------------------------------------------------------------------------------------
# Export boundaries. Eager code calls the kernels above directly (they have autograd);
# under torch.export each becomes one opaque op, which the exporter maps to an `ai.itera`
# ONNX node with a decomposition function, or lowers to onnxruntime's fused kernels.


@torch.library.custom_op("itera::selective_scan", mutates_args=())
def _selective_scan_op(
    x: Tensor, dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, state: Tensor
) -> tuple[Tensor, Tensor]:
    y, final = ssd_chunked(x, dt, A, Bm, Cm, state, chunk_size=max(1, x.shape[1]))
    return y.contiguous(), final.contiguous()


@_selective_scan_op.register_fake
def _(x, dt, A, Bm, Cm, state):
    return torch.empty_like(x), torch.empty_like(state)


@torch.library.custom_op("itera::ssm_step", mutates_args=())
def _ssm_step_op(
    x: Tensor, dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, state: Tensor
) -> tuple[Tensor, Tensor]:
    y, new = ssd_token(x, dt, A, Bm, Cm, state)
    return y.contiguous(), new.contiguous()


@_ssm_step_op.register_fake
def _(x, dt, A, Bm, Cm, state):
    return torch.empty_like(x), torch.empty_like(state)


@torch.library.custom_op("itera::causal_conv1d", mutates_args=())
def _causal_conv1d_op(
    x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor
) -> tuple[Tensor, Tensor]:
    y, new = causal_conv1d(x, conv_state, weight, bias)
    return y.contiguous(), new.contiguous()


@_causal_conv1d_op.register_fake
def _(x, conv_state, weight, bias):
    return torch.empty_like(x), torch.empty_like(conv_state)


def _exporting() -> bool:
    return torch.compiler.is_exporting()


# ---------------------------------------------------------------------------------------


class Mamba2Mixer(nn.Module):
    """in_proj → causal conv + SiLU → selective scan (+ D skip) → gated RMSNorm → out_proj."""

    def __init__(self, cfg):
        super().__init__()
        self.d_inner = cfg.expand * cfg.d_model
        assert self.d_inner % cfg.head_dim == 0, "expand * d_model must divide by head_dim"
        self.n_heads = self.d_inner // cfg.head_dim
        assert self.n_heads % cfg.n_groups == 0, "heads must divide into groups"
        self.head_dim, self.d_state, self.n_groups = cfg.head_dim, cfg.d_state, cfg.n_groups
        self.d_conv, self.chunk_size = cfg.d_conv, cfg.chunk_size
        self.conv_dim = self.d_inner + 2 * cfg.n_groups * cfg.d_state

        # One projection for z (gate), xBC (conv input) and dt, in HF Mamba2's order.
        self.in_proj = nn.Linear(cfg.d_model, self.d_inner + self.conv_dim + self.n_heads, bias=cfg.proj_bias)
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, cfg.d_conv))
        self.conv_bias = nn.Parameter(torch.zeros(self.conv_dim))
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.ones(self.n_heads))
        self.norm = GatedRMSNorm(self.d_inner, eps=cfg.norm_eps)
        self.out_proj = nn.Linear(self.d_inner, cfg.d_model, bias=cfg.proj_bias)
        self._init(cfg)

    @torch.no_grad()
    def _init(self, cfg):
        # Mamba-2 defaults: dt log-uniform in [dt_min, dt_max], A = -[1..16] spread over heads.
        nn.init.uniform_(self.conv_weight, -1 / math.sqrt(cfg.d_conv), 1 / math.sqrt(cfg.d_conv))
        dt = torch.exp(
            torch.rand(self.n_heads) * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min)
        ).clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log.copy_(torch.log(torch.linspace(1, 16, self.n_heads)))

    def state_shapes(self, batch: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of (conv_state, ssm_state) for this layer."""
        return (batch, self.d_conv - 1, self.conv_dim), (batch, self.n_heads, self.d_state, self.head_dim)

    def _project(self, u: Tensor):
        zxbcdt = self.in_proj(u)  # (B, L, d_inner + Cc + H)
        return torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.n_heads], dim=-1)

    def _split_xbc(self, xbc: Tensor):
        GN = self.n_groups * self.d_state
        x, Bm, Cm = torch.split(xbc, [self.d_inner, GN, GN], dim=-1)
        shape = xbc.shape[:-1]
        return (
            x.reshape(*shape, self.n_heads, self.head_dim),
            Bm.reshape(*shape, self.n_groups, self.d_state),
            Cm.reshape(*shape, self.n_groups, self.d_state),
        )

    def forward(self, u: Tensor, state: tuple[Tensor, Tensor] | None = None, scan: str = "chunked"):
        """Parallel form over a sequence. u (B, L, D) -> (B, L, D), (conv_state, ssm_state).

        scan: "chunked" (default) or "reference" (the sequential loop, for tests).
        """
        b, L, _ = u.shape
        if state is None:
            conv_shape, ssm_shape = self.state_shapes(b)
            state = (u.new_zeros(conv_shape), u.new_zeros(ssm_shape))
        conv_state, ssm_state = state
        z, xbc, dt = self._project(u)
        conv = _causal_conv1d_op if _exporting() else causal_conv1d
        xbc, conv_state = conv(xbc, conv_state, self.conv_weight, self.conv_bias)
        x, Bm, Cm = self._split_xbc(xbc)  # (B, L, H, P), (B, L, G, N) x2
        dt = F.softplus(dt + self.dt_bias)  # (B, L, H)
        A = -torch.exp(self.A_log)  # (H,)
        if _exporting():
            y, ssm_state = _selective_scan_op(x, dt, A, Bm, Cm, ssm_state)
        elif scan == "reference":
            y, ssm_state = ssd_reference(x, dt, A, Bm, Cm, ssm_state)
        else:
            y, ssm_state = ssd_chunked(x, dt, A, Bm, Cm, ssm_state, self.chunk_size)
        y = y + x * self.D[:, None]  # (B, L, H, P)
        y = self.norm(y.reshape(b, L, self.d_inner), z)
        return self.out_proj(y), (conv_state, ssm_state)

    def step(self, u: Tensor, state: tuple[Tensor, Tensor]):
        """One token. u (B, 1, D) -> (B, 1, D), new (conv_state, ssm_state).

        The one-token layout (B, 1, ·) is kept throughout (no squeezing to (B, ·)): it is the
        layout of the fused kernels the decode graph lowers to, and 3-D residual adds let
        onnxruntime fuse them into the next norm.
        """
        conv_state, ssm_state = state
        z, xbc, dt = self._project(u)  # (B, 1, d_inner), (B, 1, Cc), (B, 1, H)
        conv = _causal_conv1d_op if _exporting() else causal_conv1d
        xbc, conv_state = conv(xbc, conv_state, self.conv_weight, self.conv_bias)
        x, Bm, Cm = self._split_xbc(xbc)  # (B, 1, H, P), (B, 1, G, N) x2
        dt = F.softplus(dt + self.dt_bias)  # (B, 1, H)
        A = -torch.exp(self.A_log)
        step = _ssm_step_op if _exporting() else ssd_token
        y, ssm_state = step(x, dt, A, Bm, Cm, ssm_state)
        y = y + x * self.D[:, None]  # (B, 1, H, P)
        y = self.norm(y.reshape(*u.shape[:-1], self.d_inner), z)
        return self.out_proj(y), (conv_state, ssm_state)
