"""Sparse top-k Mixture-of-Experts with SwiGLU experts.

Glossary: T tokens (batch and time flattened), D model width, E experts, F expert inner
width, k experts per token.

Routing: softmax over the router logits, keep the top k, renormalise the k weights to sum
to one (what `com.microsoft::MoE` computes with normalize_routing_weights=1, so the
exporter can lower to it). Training adds the Switch-Transformer load-balancing loss and
the ST-MoE router z-loss.

Export: tracing the eager (sparse) dispatch would bake in only the experts the example
input happened to hit. Under `torch.export` the layer instead calls the custom op
`itera::moe`, whose ONNX decomposition (`moe_dense`) computes every expert with masked
gates, so every expert stays reachable whatever the tracing input.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def route(router_logits: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """(T, E) logits -> top-k weights (T, k) renormalised, expert ids (T, k)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, experts = probs.topk(top_k, dim=-1)
    return weights / weights.sum(-1, keepdim=True), experts


def moe_sparse(x, router_logits, w_gate, w_up, w_down, top_k: int) -> Tensor:
    """Eager dispatch: each expert runs only on the tokens routed to it. x (T, D)."""
    weights, experts = route(router_logits, top_k)
    out = torch.zeros_like(x)
    for e in range(w_gate.shape[0]):
        token, slot = torch.where(experts == e)
        if token.numel() == 0:
            continue
        h = x[token]  # (n, D)
        h = F.silu(h @ w_gate[e].T) * (h @ w_up[e].T)  # (n, F)
        out.index_add_(0, token, (h @ w_down[e].T) * weights[token, slot, None].to(x.dtype))
    return out


def moe_dense(x, router_logits, w_gate, w_up, w_down, top_k: int) -> Tensor:
    """Every expert on every token, gates zero outside the top k: static shapes for export."""
    weights, experts = route(router_logits, top_k)
    gates = torch.zeros_like(router_logits, dtype=weights.dtype).scatter(-1, experts, weights)  # (T, E)
    h = F.silu(torch.einsum("td,efd->tef", x, w_gate)) * torch.einsum("td,efd->tef", x, w_up)
    y = torch.einsum("tef,edf->ted", h, w_down)  # (T, E, D)
    return torch.einsum("ted,te->td", y, gates.to(x.dtype))


@torch.library.custom_op("itera::moe", mutates_args=())
def _moe_op(
    x: Tensor, router_logits: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, top_k: int
) -> Tensor:
    return moe_dense(x, router_logits, w_gate, w_up, w_down, top_k)


@_moe_op.register_fake
def _(x, router_logits, w_gate, w_up, w_down, top_k):
    return torch.empty_like(x)


def load_balancing_loss(router_logits: Tensor, experts: Tensor) -> Tensor:
    """Switch loss E * sum_e f_e * P_e: 1.0 when routing is uniform, E when all goes to one."""
    E = router_logits.shape[-1]
    probs = torch.softmax(router_logits.float(), dim=-1)
    f = F.one_hot(experts, E).float().mean(dim=(0, 1))  # fraction of assignments per expert
    return E * (f * probs.mean(0)).sum()


def router_z_loss(router_logits: Tensor) -> Tensor:
    """ST-MoE z-loss: keeps router logits small, which keeps the softmax well-conditioned."""
    return torch.logsumexp(router_logits.float(), dim=-1).pow(2).mean()


class SparseMoE(nn.Module):
    """Top-k routed SwiGLU experts; returns the output and the router's auxiliary terms."""

    def __init__(self, cfg):
        super().__init__()
        E, D, Fw = cfg.n_experts, cfg.d_model, cfg.d_expert
        self.top_k = cfg.top_k
        self.router = nn.Linear(D, E, bias=False)
        self.w_gate = nn.Parameter(torch.empty(E, Fw, D))
        self.w_up = nn.Parameter(torch.empty(E, Fw, D))
        self.w_down = nn.Parameter(torch.empty(E, D, Fw))
        for w, fan_in in ((self.w_gate, D), (self.w_up, D), (self.w_down, Fw)):
            nn.init.normal_(w, std=1 / math.sqrt(fan_in))
        nn.init.normal_(self.router.weight, std=0.02)

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """x (..., D) -> (..., D), aux {balance_loss, z_loss, load (E,)}."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (T, D)
        logits = self.router(flat)  # (T, E)
        if torch.compiler.is_exporting():
            return _moe_op(flat, logits, self.w_gate, self.w_up, self.w_down, self.top_k).reshape(shape), {}
        out = moe_sparse(flat, logits, self.w_gate, self.w_up, self.w_down, self.top_k)
        _, experts = route(logits, self.top_k)
        aux = {
            "balance_loss": load_balancing_loss(logits, experts),
            "z_loss": router_z_loss(logits),
            "load": torch.bincount(experts.flatten(), minlength=logits.shape[-1]).detach(),
        }
        return out.reshape(shape), aux
