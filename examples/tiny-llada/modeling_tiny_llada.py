"""A tiny bidirectional transformer laid out like LLaDA-8B, for tests.

What it keeps from LLaDA, because mdu depends on it: loaded through `auto_map`
with trust_remote_code; parameter names `model.transformer.blocks.N.{q_proj,
k_proj, v_proj, attn_out, ff_proj, up_proj, ff_out}` and a head also named
`model.transformer.ff_out`; bidirectional attention that honours
`attention_mask`; and an `__init__` that never calls `post_init()`.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_tiny_llada import TinyLLaDAConfig


class RMSNorm(nn.Module):
    def __init__(self, size, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        scale = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (x.float() * scale).to(x.dtype) * self.weight


def rotary(x, theta):
    """Rotary position embedding on (batch, heads, seq, head_dim)."""
    seq, dim = x.shape[-2], x.shape[-1]
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim)
    angles = torch.outer(torch.arange(seq, device=x.device, dtype=torch.float32), freqs)
    cos, sin = angles.cos().repeat(1, 2).to(x.dtype), angles.sin().repeat(1, 2).to(x.dtype)
    first, second = x[..., : dim // 2], x[..., dim // 2:]
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        d, hidden = config.d_model, config.mlp_hidden_size
        self.n_heads, self.theta = config.n_heads, config.rope_theta
        self.attn_norm, self.ff_norm = RMSNorm(d), RMSNorm(d)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.ff_out = nn.Linear(hidden, d, bias=False)

    def forward(self, x, attn_bias):
        batch, seq, d = x.shape
        h = self.attn_norm(x)
        heads = [p(h).view(batch, seq, self.n_heads, d // self.n_heads).transpose(1, 2)
                 for p in (self.q_proj, self.k_proj, self.v_proj)]
        q, k, v = rotary(heads[0], self.theta), rotary(heads[1], self.theta), heads[2]
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias)
        x = x + self.attn_out(attended.transpose(1, 2).reshape(batch, seq, d))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class TinyLLaDAModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.d_model),
            blocks=nn.ModuleList(Block(config) for _ in range(config.n_layers)),
            ln_f=RMSNorm(config.d_model),
            ff_out=nn.Linear(config.d_model, config.vocab_size, bias=False),
        ))

    def forward(self, input_ids, attention_mask=None):
        x = self.transformer.wte(input_ids)
        bias = None
        if attention_mask is not None:
            # Key padding only: attention stays bidirectional.
            bias = torch.zeros(attention_mask.shape, dtype=x.dtype, device=x.device)
            bias = bias.masked_fill(attention_mask == 0, torch.finfo(x.dtype).min)[:, None, None, :]
        for block in self.transformer.blocks:
            x = block(x, bias)
        return self.transformer.ff_out(self.transformer.ln_f(x))


class TinyLLaDAModelLM(PreTrainedModel):
    config_class = TinyLLaDAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False

    def __init__(self, config):
        super().__init__(config)
        self.model = TinyLLaDAModel(config)
        # Deliberately no self.post_init(): LLaDA's published code does not call it.

    def get_input_embeddings(self):
        return self.model.transformer.wte

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return CausalLMOutputWithPast(logits=self.model(input_ids, attention_mask))
