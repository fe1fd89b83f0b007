"""Where each architecture keeps its residual stream, attention, heads and MLPs.

An Adapter names modules, it does not wrap them: the engine hooks the model's own modules, so the
numbers it patches are exactly the numbers the Hugging Face forward computes.

Hook points, per layer l:
  resid_pre  the hidden state entering decoder layer l
  attn_out   the attention module's output (before any post-attention norm and the residual add)
  mlp_out    the MLP module's output
  head       head h's slice of the input to the attention output projection (o_proj / c_proj / dense)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# model_type (config.json) -> family. The families differ only in module paths.
LLAMA_LIKE = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "olmo", "olmo2", "smollm3")
FAMILIES = {**{t: "llama" for t in LLAMA_LIKE}, "gpt2": "gpt2", "gpt_neox": "gpt_neox"}


class UnsupportedArchitecture(ValueError):
    pass


@dataclass(frozen=True)
class Adapter:
    family: str
    layers: nn.ModuleList
    attn: list[nn.Module]  # per layer: the attention module (its output[0] is attn_out)
    out_proj: list[nn.Module]  # per layer: attention output projection (its input holds the heads)
    mlp: list[nn.Module]
    final_norm: nn.Module
    unembed: nn.Module  # lm_head: weight [vocab, d_model], optional bias
    n_layers: int
    n_heads: int
    d_model: int
    d_head: int
    logit_softcap: float | None  # Gemma 2 caps final logits with tanh

    def hook_module(self, component: str, layer: int) -> nn.Module:
        """The module whose forward (pre-hook for resid_pre/head, output hook otherwise) carries `component`."""
        return {
            "resid_pre": self.layers,
            "attn_out": self.attn,
            "mlp_out": self.mlp,
            "head": self.out_proj,
        }[component][layer]

    def logits(self, final_resid: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Unembed final-position residuals [..., d]; only the rows in token_ids [..., K] when given."""
        h = self.final_norm(final_resid)
        weight, bias = self.unembed.weight, getattr(self.unembed, "bias", None)
        if token_ids is None:
            out = h @ weight.T + (bias if bias is not None else 0)
        else:
            safe = token_ids.clamp(min=0)
            out = torch.einsum("...d,...kd->...k", h, weight[safe])
            if bias is not None:
                out = out + bias[safe]
        if self.logit_softcap:
            out = torch.tanh(out / self.logit_softcap) * self.logit_softcap
        return out


def get_adapter(model: nn.Module) -> Adapter:
    config = model.config
    model_type = getattr(config, "model_type", type(model).__name__)
    family = FAMILIES.get(model_type)
    if family is None:
        raise UnsupportedArchitecture(
            f"unsupported architecture {model_type!r}: supported model_types are {sorted(FAMILIES)}; "
            "to add one, map its model_type to a family in pipeline/engine/adapters.py (FAMILIES) "
            "or add a family branch naming its layer, attention, output-projection and MLP modules"
        )
    n_heads = config.num_attention_heads
    d_model = config.hidden_size
    d_head = getattr(config, "head_dim", None) or d_model // n_heads
    if family == "llama":
        body, layers = model.model, model.model.layers
        attn = [layer.self_attn for layer in layers]
        out_proj = [a.o_proj for a in attn]
        final_norm = body.norm
    elif family == "gpt2":
        body, layers = model.transformer, model.transformer.h
        attn = [layer.attn for layer in layers]
        out_proj = [a.c_proj for a in attn]
        final_norm = body.ln_f
    else:  # gpt_neox
        body, layers = model.gpt_neox, model.gpt_neox.layers
        attn = [layer.attention for layer in layers]
        out_proj = [a.dense for a in attn]
        final_norm = body.final_layer_norm
    return Adapter(
        family=family,
        layers=layers,
        attn=attn,
        out_proj=out_proj,
        mlp=[layer.mlp for layer in layers],
        final_norm=final_norm,
        unembed=model.get_output_embeddings(),
        n_layers=len(layers),
        n_heads=n_heads,
        d_model=d_model,
        d_head=d_head,
        logit_softcap=getattr(config, "final_logit_softcapping", None),
    )
