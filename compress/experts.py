"""Importance of a mixture of experts' routed experts and of each expert's FFN neurons, recorded by hooks on an MoE
layer's router and experts during the importance pass (compactlm.compress.importance)."""

from __future__ import annotations

import torch

from compactlm.compress.arch import MOE_EXPERTS, MOE_ROUTER, submodule
from compactlm.compress.running import Accumulator

EXPERT_METRICS = ("contribution", "router_prob", "frequency", "reap")
"""How a routed expert is scored (per token of the calibration set; higher is more important):
- contribution: the mean over all tokens of routing weight x L2 norm of the expert's output (0 where not routed):
  how much the expert adds to the residual stream;
- router_prob: the mean router probability (softmax over all experts), the router's own probability mass;
- frequency: the share of tokens whose top-k includes the expert;
- reap: the mean of routing weight x output norm over the tokens routed to the expert only (REAP, Lasby et al.
  2025), which does not reward an expert for being picked often."""


class ExpertStats:
    """One MoE layer's running statistics: per-expert scores (EXPERT_METRICS) and each expert's FFN neurons, whose
    activations are reduced over the tokens of a sample routed to the expert (`seq_agg`), then over the samples
    that routed any token to it (`batch_agg`)."""

    def __init__(self, experts: int, ffn: int, seq_agg: str, batch_agg: str):
        self.neurons = [Accumulator(ffn, seq_agg, batch_agg) for _ in range(experts)]
        self.seq_agg = seq_agg
        self.prob = torch.zeros(experts, dtype=torch.float64)
        self.routed = torch.zeros(experts, dtype=torch.float64)
        self.contribution = torch.zeros(experts, dtype=torch.float64)
        self.tokens = 0
        self.seq_len = 1

    def router(self, router, hidden: torch.Tensor) -> None:
        """The router's probabilities over all experts, from its input (every family: softmax of a linear map)."""
        logits = torch.nn.functional.linear(hidden.reshape(-1, router.weight.shape[1]), router.weight)
        self.prob += torch.softmax(logits.float(), dim=-1).sum(0).double()
        self.tokens += logits.shape[0]

    def experts(self, module, hidden: torch.Tensor, top_index: torch.Tensor, top_weight: torch.Tensor) -> None:
        """What each routed expert computes on its tokens (recomputed from its weights: [gate; up] -> act * up)."""
        ffn = module.down_proj.shape[-1]
        for expert in torch.unique(top_index).tolist():
            if not 0 <= expert < len(self.neurons):
                continue
            token, slot = torch.where(top_index == expert)
            x = hidden[token]
            gate, up = torch.nn.functional.linear(x, module.gate_up_proj[expert]).split(ffn, dim=-1)
            act = module.act_fn(gate) * up
            out_norm = torch.linalg.vector_norm(
                torch.nn.functional.linear(act, module.down_proj[expert]).float(), dim=-1
            )
            weight = top_weight[token, slot].float()
            self.routed[expert] += len(token)
            self.contribution[expert] += (weight * out_norm).sum().double()
            self.neurons[expert].add_samples(self._per_sample(act.abs().float(), token // self.seq_len))

    def _per_sample(self, values: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """[tokens, ffn] -> [samples that have tokens here, ffn], reduced over each sample's tokens by `seq_agg`."""
        ids, sample = torch.unique(sample, return_inverse=True)
        count = torch.zeros(len(ids)).index_add_(0, sample, torch.ones(len(sample)))[:, None]
        total = torch.zeros(len(ids), values.shape[1]).index_add_(0, sample, values)
        squares = torch.zeros(len(ids), values.shape[1]).index_add_(0, sample, values.pow(2))
        if self.seq_agg == "mean":
            return total / count
        if self.seq_agg == "l2":
            return squares.sqrt()
        return (squares / count - (total / count) ** 2).clamp_min(0.0)

    def result(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        tokens = max(self.tokens, 1)
        scores = {
            "contribution": self.contribution / tokens,
            "router_prob": self.prob / tokens,
            "frequency": self.routed / tokens,
            "reap": self.contribution / self.routed.clamp_min(1.0),
        }
        return scores, torch.stack([n.result() for n in self.neurons])


def hook_experts(layer, stats: ExpertStats) -> list:
    """Hooks on one MoE layer: the sequence length (from the block's input), the router, the experts."""

    def block(_m, args):
        stats.seq_len = args[0].shape[1] if args[0].ndim == 3 else 1

    def experts(module, args, kwargs):
        names = ("hidden_states", "top_k_index", "top_k_weights")
        values = list(args) + [kwargs[n] for n in names[len(args) :] if n in kwargs]
        stats.experts(module, *(v.detach() for v in values[:3]))

    router = submodule(layer, MOE_ROUTER)
    return [
        layer.mlp.register_forward_pre_hook(block),
        router.register_forward_pre_hook(lambda m, args: stats.router(m, args[0].detach())),
        submodule(layer, MOE_EXPERTS).register_forward_pre_hook(experts, with_kwargs=True),
    ]
