"""Dense SiLU-gated MLP, the DeepSeek MoE gate (every routing variant) and the MoE layer.

Follows `DeepseekV2MLP`, `MoEGate` and `DeepseekV2MoE` of deepseek-ai/DeepSeek-VL2
`deepseek_vl2/models/modeling_deepseek.py` (commit 93bb502).

Only the selected experts run: tokens are sorted by expert and each expert that received
any token runs once on its group, so the work follows the experts used, not the experts that exist.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from vl2cli.engine.norm import fp16_safe

if TYPE_CHECKING:
    from vl2cli.engine.config import MoeShape


def expert_counts(idx: torch.Tensor, n_experts: int) -> list[int]:
    """Tokens routed to each expert, on the host: the expert loop slices by them and skips idle experts.

    The one host sync per MoE layer that the design keeps: on a GPU it waits for the queued kernels once per MoE
    layer per step (the reference syncs here too, through `.cpu().numpy()`). It buys reading only the chosen
    experts' weights; running every expert instead would read ~10x the expert bytes per decode step.
    """
    return torch.bincount(idx.flatten(), minlength=n_experts).tolist()


class DenseMlp(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float16: the expert products overflow first; clamp them and the projection (no-ops in other dtypes)
        return fp16_safe(self.down_proj(fp16_safe(F.silu(self.gate_proj(x)) * self.up_proj(x))))


class Gate(nn.Module):
    def __init__(self, hidden: int, cfg: MoeShape):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed, hidden))
        if cfg.topk_method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.n_routed))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, d] -> expert ids [N, k], float32 weights [N, k]. Scores are computed in float32."""
        cfg = self.cfg
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.softmax(dim=-1) if cfg.scoring_func == "softmax" else logits.sigmoid()
        k = cfg.top_k
        if cfg.topk_method == "greedy":
            weight, idx = torch.topk(scores, k, dim=-1, sorted=False)
        else:
            n = scores.shape[0]
            choice = scores
            if cfg.topk_method == "noaux_tc":
                choice = scores + self.e_score_correction_bias.float()[None]
                group_scores = choice.view(n, cfg.n_group, -1).topk(2, dim=-1).values.sum(-1)  # [N, groups]
            else:
                group_scores = choice.view(n, cfg.n_group, -1).max(dim=-1).values
            group_idx = torch.topk(group_scores, cfg.topk_group, dim=-1, sorted=False).indices
            group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1).bool()
            expert_mask = group_mask[:, :, None].expand(n, cfg.n_group, cfg.n_routed // cfg.n_group)
            # Unselected groups are masked to 0.0, not -inf, exactly as the reference does.
            masked = choice.masked_fill(~expert_mask.reshape(n, -1), 0.0)
            weight, idx = torch.topk(masked, k, dim=-1, sorted=False)
            if cfg.topk_method == "noaux_tc":  # the bias only chooses; weights are the raw scores
                weight = scores.gather(1, idx)
        if k > 1 and cfg.norm_topk_prob:
            weight = weight / (weight.sum(dim=-1, keepdim=True) + 1e-20)
        return idx, weight * cfg.routed_scaling_factor


class MoE(nn.Module):
    def __init__(self, hidden: int, inner: int, cfg: MoeShape):
        super().__init__()
        self.top_k = cfg.top_k
        self.experts = nn.ModuleList(DenseMlp(hidden, inner) for _ in range(cfg.n_routed))
        self.gate = Gate(hidden, cfg)
        self.shared_experts = DenseMlp(hidden, inner * cfg.n_shared) if cfg.n_shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [N, d]
        idx, weight = self.gate(flat)  # [N, k]
        order = idx.flatten().argsort()  # assignments grouped by expert
        counts = expert_counts(idx, len(self.experts))
        tokens = flat[order // self.top_k]  # [N*k, d] in expert order
        outs, begin = [], 0
        for expert, count in enumerate(counts):
            if count:
                outs.append(self.experts[expert](tokens[begin : begin + count]))
                begin += count
        grouped = torch.cat(outs)
        routed = torch.empty_like(grouped)
        routed[order] = grouped  # back to [token, slot] order
        y = (routed.view(-1, self.top_k, shape[-1]).float() * weight[..., None]).sum(dim=1).view(shape)
        if x.dtype == torch.float16:  # base scales this sum by 2.0: add the shared experts in float32, then clamp
            if self.shared_experts is not None:
                y = y + self.shared_experts(x).float()
            return fp16_safe(y).to(x.dtype)
        y = y.to(x.dtype)  # the reference's order: weighted sum cast to the model dtype, then the shared experts
        return y + self.shared_experts(x) if self.shared_experts is not None else y
