"""The towers: a ViT image encoder and a causal text transformer, laid out as OpenCLIP's so that parameter counts
match published figures (class token, learned positions, pre-LN blocks, a bias-free projection to the shared space).

Recipe options turn them into SigLIP's towers (transformers' SiglipModel), whose blocks are CLIP's: the ViT without a
class token or pre-LayerNorm, with a biased patch embedding, pooled by a multi-head attention pooling head
(vision.pool=map) and no projection; the text transformer bidirectional (text.causal=false), pooled at its last
position (text.pool=end) through a biased head (text.proj_bias); LayerNorms with SigLIP's epsilon (ln_eps). The
defaults are CLIP's, so every existing model is unchanged.

Both towers return unnormalised [batch, embed_dim] features; the multi-tower model normalises them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from towerlab.config.schema import SignalConfig, TextConfig, VisionConfig


class _ZeroBiasLinear(nn.Linear):
    """nn.MultiheadAttention's output projection: a Linear whose bias starts at zero. Zeroed inside its own
    __init__, because under deepspeed.zero.Init the parameters are partitioned as soon as __init__ returns."""

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameters, names and initialisation (same random
    stream), but calling its output projection as a module: ZeRO-3 gathers a module's parameters in that module's
    forward hooks, and nn.MultiheadAttention reads out_proj.weight without ever calling out_proj."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = _ZeroBiasLinear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                context: torch.Tensor | None = None) -> torch.Tensor:
        """Self-attention over `x`, or, given `context`, `x`'s queries attending over `context`'s keys and values
        (nn.MultiheadAttention(x, context, context): the packed in_proj's first third projects the queries)."""
        b, n, w = x.shape
        hd = w // self.heads
        if context is None:
            qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, n, 3, self.heads, hd)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
        else:
            wq, wkv = self.in_proj_weight.split([w, 2 * w])
            bq, bkv = self.in_proj_bias.split([w, 2 * w])
            q = F.linear(x, wq, bq).view(b, n, self.heads, hd).transpose(1, 2)
            k, v = F.linear(context, wkv, bkv).view(b, context.shape[1], 2, self.heads, hd).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, w))


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's CLIP weights were trained with (transformers' quick_gelu)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


# the MLP activations a tower can use (`act` in the recipe), named as transformers' hidden_act names them
ACTIVATIONS = {"gelu": nn.GELU, "quick_gelu": QuickGELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh")}


class Block(nn.Module):
    """Pre-LN transformer block (OpenCLIP's ResidualAttentionBlock)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, act: str = "gelu", eps: float = 1e-5):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), ACTIVATIONS[act](), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, act: str = "gelu", eps: float = 1e-5):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, act, eps) for _ in range(layers))
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, attn_mask, use_reentrant=False)
            else:
                x = block(x, attn_mask)
        return x


class PatchDropout(nn.Module):
    """FLIP's patch dropout (Li et al., 2023; OpenCLIP's PatchDropout): in training, each image keeps a random
    max(1, int(n * (1 - p))) of its n patch tokens (the class token is never dropped), so the transformer runs on
    a shorter sequence; in evaluation every token is kept. The draw is made on the tokens' device, from the
    default generator the feature cache records and replays."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"model.vision.patch_dropout={p}: must be in [0, 1)")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        b, n, w = x.shape
        keep = max(1, int(n * (1.0 - self.p)))
        idx = torch.rand(b, n, device=x.device).topk(keep, dim=1).indices
        return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, w))


class AttentionPool(nn.Module):
    """SigLIP's multi-head attention pooling head (transformers' SiglipMultiheadAttentionPoolingHead, big_vision's
    MAPHead): a learned probe attends over the tokens, then a residual MLP behind a LayerNorm; the probe's output
    is the pooled vector. The attention has nn.MultiheadAttention's parameters (`Attention`, called as a module
    for ZeRO-3's hooks)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, act: str, eps: float):
        super().__init__()
        self.probe = nn.Parameter(width**-0.5 * torch.randn(1, 1, width))
        self.attn = Attention(width, heads)
        self.ln = nn.LayerNorm(width, eps=eps)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), ACTIVATIONS[act](), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.attn(self.probe.to(x.dtype).expand(x.shape[0], -1, -1), context=x)
        return (h + self.mlp(self.ln(h)))[:, 0]


class _Tower(nn.Module):
    transformer: Transformer

    def set_grad_checkpointing(self, on: bool) -> None:
        self.transformer.grad_checkpointing = on


class VisionTower(_Tower):
    def __init__(self, cfg: VisionConfig, embed_dim: int):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"vision.image_size={cfg.image_size} is not a multiple of patch_size={cfg.patch_size}")
        grid = cfg.image_size // cfg.patch_size
        scale = cfg.width**-0.5
        if cfg.pool not in ("token", "map") or cfg.pool == "token" and not cfg.class_token:
            raise ValueError(f"vision.pool={cfg.pool}, class_token={cfg.class_token}: pool=token pools the class "
                             "token, pool=map needs none")
        if not cfg.proj and cfg.width != embed_dim:
            raise ValueError(f"vision.proj=false: model.embed_dim={embed_dim} must equal vision.width={cfg.width}")
        grid = cfg.image_size // cfg.patch_size
        scale = cfg.width**-0.5
        eps = cfg.ln_eps
        self.conv1 = nn.Conv2d(cfg.channels, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=cfg.patch_bias)
        # the parameters are drawn in the same order as ever, so a CLIP-shaped tower's initial weights are unchanged
        self.class_embedding = nn.Parameter(scale * torch.randn(cfg.width)) if cfg.class_token else None
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + int(cfg.class_token), cfg.width))
        self.patch_dropout = PatchDropout(cfg.patch_dropout)
        self.ln_pre = nn.LayerNorm(cfg.width, eps=eps) if cfg.ln_pre else nn.Identity()
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, cfg.act, eps)
        self.ln_post = nn.LayerNorm(cfg.width, eps=eps)
        self.proj = nn.Parameter(scale * torch.randn(cfg.width, embed_dim)) if cfg.proj else None
        self.attn_pool = (AttentionPool(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.act, eps) if cfg.pool == "map"
                          else None)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv1(images).flatten(2).transpose(1, 2)  # [B, grid*grid, width]
        pos = self.positional_embedding.to(x.dtype)
        # positions are added before patch dropout, so a kept token keeps its own position
        if self.class_embedding is not None:
            cls = (self.class_embedding.to(x.dtype) + pos[0]).expand(x.shape[0], 1, -1)
            x = torch.cat([cls, self.patch_dropout(x + pos[1:])], dim=1)
        else:
            x = self.patch_dropout(x + pos)
        x = self.transformer(self.ln_pre(x))
        if self.attn_pool is not None:  # SigLIP: the post-LayerNorm over every token, then the pooling head
            x = self.attn_pool(self.ln_post(x))
        else:
            x = self.ln_post(x[:, 0])
        return x @ self.proj if self.proj is not None else x


class TextTower(_Tower):
    """Causal transformer over token ids (bidirectional with causal=false); the sequence is pooled at its end-of-text
    token, found as `cfg.pool` says (see `eot_index`; pool=auto: the largest id (argmax) for CLIP's BPE, the last
    non-padding token for the word vocabulary; pool=end: the last position, SigLIP's)."""

    def __init__(self, cfg: TextConfig, embed_dim: int):
        super().__init__()
        self.pool, self.eos_id = resolved_pool(cfg), cfg.eos_id
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, cfg.act, cfg.ln_eps)
        self.ln_final = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.text_projection = nn.Parameter(cfg.width**-0.5 * torch.randn(cfg.width, embed_dim))
        # SigLIP's text head is a Linear: the projection above plus this bias
        self.text_projection_bias = nn.Parameter(torch.zeros(embed_dim)) if cfg.proj_bias else None
        self.causal = cfg.causal
        mask = torch.full((cfg.context_length, cfg.context_length), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        L = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:L]
        mask = self.attn_mask[:L, :L].to(x.dtype) if self.causal else None
        x = self.ln_final(self.transformer(x, mask))
        eot = eot_index(tokens, self.pool, self.eos_id)
        x = x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection
        return x + self.text_projection_bias if self.text_projection_bias is not None else x


def resolved_pool(cfg: TextConfig) -> str:
    """`model.text.pool` with auto resolved: argmax for CLIP's BPE (its end-of-text is the largest id, and id 0,
    "!", may occur inside a caption), last for the word vocabulary (padding id 0, no word has it)."""
    if cfg.pool != "auto":
        return cfg.pool
    return "argmax" if cfg.tokenizer == "clip_bpe" else "last"


def eot_index(tokens: torch.Tensor, pool: str, eos_id: int) -> torch.Tensor:
    """Where each sequence's end-of-text token is. last: the last non-padding token (padding id 0: the word
    vocabulary ends every caption with its EOT); eos: the first `eos_id` (CLIP tokenizers, which may pad with the
    end-of-text token itself); argmax: the highest id (OpenAI's CLIP vocabulary, whose EOT is its last id); end:
    the last position (SigLIP, padded to the context length)."""
    if pool == "end":
        return torch.full((tokens.shape[0],), tokens.shape[1] - 1, dtype=torch.long, device=tokens.device)
    if pool == "eos":
        return (tokens == eos_id).int().argmax(dim=1)
    if pool == "argmax":
        return tokens.int().argmax(dim=1)
    return (tokens != 0).sum(dim=1).clamp(min=1) - 1


class SignalTower(nn.Module):
    """An MLP over a feature vector (the "signal" modality): `layers` x (Linear, GELU) at `width`, then LayerNorm
    and a projection, like the other towers' heads."""

    def __init__(self, cfg: SignalConfig, embed_dim: int):
        super().__init__()
        dims = [cfg.dim] + [cfg.width] * cfg.layers
        self.mlp = nn.Sequential(*(m for a, b in zip(dims, dims[1:]) for m in (nn.Linear(a, b), nn.GELU())))
        self.ln_final = nn.LayerNorm(dims[-1])
        self.proj = nn.Parameter(dims[-1] ** -0.5 * torch.randn(dims[-1], embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_final(self.mlp(x)) @ self.proj


def tower_input(tower: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`x` on the tower's device, and in its compute dtype when it holds values (images, signals; token ids stay
    integers). DeepSpeed's bf16 casts the parameters, never the inputs, and a conv or linear refuses mixed dtypes.
    Under ZeRO-3 a partitioned parameter still carries the device and dtype the tower computes in."""
    p = next(tower.parameters())
    return x.to(p.device, p.dtype) if x.is_floating_point() else x.to(p.device)


def normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)
