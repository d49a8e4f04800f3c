"""The one hierarchical byte model behind MEGABYTE, MambaByte and the vanilla byte transformer.

Read top-down: a residual `Block` (pre-norm, pluggable mixer, optional feed-forward), a `Stack` of
blocks, and `HierarchicalByteModel`, which follows MEGABYTE (Yu et al. 2023, section 2):

    tokens (B, T) bytes, T = K·P
    global embedding  E_G[x_t] + E_pos[t]               (B, T, D_G)      D_G = global d_model / P
    group into patches                                  (B, K, P·D_G)
    shift right by one patch (learned pad patch first)  (B, K, P·D_G)    patch k sees patches < k
    global stack                                        (B, K, P·D_G)
    ungroup, project to the local width                 (B, K, P, D_L)
    + E_L[x_{k,p-1}] (learned pad at p = 0)             (B, K, P, D_L)   byte p sees bytes < p
    local stack over each patch                         (B·K, P, D_L)
    norm + linear head                                  (B, T, 256)

With no local stack, the head reads the ungrouped global output directly; with P = 1 that is a
plain byte language model (attention: the vanilla transformer; Mamba: MambaByte).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from multibyte.config import VOCAB_SIZE, ModelConfig, StackConfig
from multibyte.mixers import build_mixer
from multibyte.patching import FixedPatching


class FeedForward(nn.Module):
    def __init__(self, d_model: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.gelu(self.up(x), approximate="tanh")))


class Block(nn.Module):
    """x + mixer(norm(x)), then x + feed_forward(norm(x)) when the stack has one."""

    def __init__(self, stack: StackConfig, dropout: float, norm_eps: float) -> None:
        super().__init__()
        self.mixer_norm = nn.RMSNorm(stack.d_model, eps=norm_eps)
        self.mixer = build_mixer(stack, dropout)
        self.mixer_dropout = nn.Dropout(dropout)
        # MambaByte's blocks are mixer-only; attention blocks carry the usual feed-forward layer.
        hidden = int(stack.mlp_ratio * stack.d_model) if stack.mixer == "attention" else 0
        self.ff_norm = nn.RMSNorm(stack.d_model, eps=norm_eps) if hidden else None
        self.feed_forward = FeedForward(stack.d_model, hidden, dropout) if hidden else None

    def forward(self, x: torch.Tensor, state=None) -> torch.Tensor:
        x = x + self.mixer_dropout(self.mixer(self.mixer_norm(x), state))
        if self.feed_forward is not None:
            x = x + self.feed_forward(self.ff_norm(x))
        return x


class Stack(nn.Module):
    """n_layers blocks and a final norm: (B, L, D) -> (B, L, D), causal along L."""

    def __init__(self, stack: StackConfig, dropout: float, norm_eps: float) -> None:
        super().__init__()
        self.config = stack
        self.blocks = nn.ModuleList(Block(stack, dropout, norm_eps) for _ in range(stack.n_layers))
        self.final_norm = nn.RMSNorm(stack.d_model, eps=norm_eps)

    def allocate_states(self, batch_size: int, max_len: int, device, dtype) -> list:
        """One decoding state per block (KV cache or recurrent state), allocated once."""
        return [b.mixer.allocate_state(batch_size, max_len, device, dtype) for b in self.blocks]

    def forward(self, x: torch.Tensor, states: list | None = None) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x, None if states is None else states[i])
        return self.final_norm(x)


class HierarchicalByteModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.patching = FixedPatching(config.patch_size)
        P, D_G = config.patch_size, config.global_byte_dim

        self.global_byte_embedding = nn.Embedding(VOCAB_SIZE, D_G)
        self.position_embedding = nn.Embedding(config.max_seq_len, D_G) if config.position_embedding else None
        self.global_pad_patch = nn.Parameter(torch.zeros(P * D_G))  # stands in for "patch -1"
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.global_stack = Stack(config.global_model, config.dropout, config.norm_eps)

        if config.local_model is not None:
            D_L = config.local_model.d_model
            self.global_to_local = nn.Linear(D_G, D_L, bias=False)
            self.local_byte_embedding = nn.Embedding(VOCAB_SIZE, D_L)
            self.local_pad_byte = nn.Parameter(torch.zeros(D_L))  # stands in for "byte -1" of a patch
            self.local_stack = Stack(config.local_model, config.dropout, config.norm_eps)
            head_dim = D_L
        else:
            self.local_stack = None
            head_dim = D_G
        self.head = nn.Linear(head_dim, VOCAB_SIZE, bias=False)
        self._init_weights()

    # ---------------------------------------------------------------- initialisation
    def _init_weights(self) -> None:
        std = self.config.init_std
        for name, p in self.named_parameters():
            if ".mixer." in name and self._is_mamba_param(name):
                continue  # Mamba mixers initialise themselves (A_log, dt bias, D need special values)
            if p.dim() >= 2:
                nn.init.normal_(p, mean=0.0, std=std)
            elif name.endswith(("pad_patch", "pad_byte")):
                nn.init.normal_(p, mean=0.0, std=std)
        # GPT-2's scaling: each residual branch's output projection shrinks with depth, so the
        # residual stream's variance stays O(1) however many blocks add into it.
        for stack in (self.global_stack, self.local_stack):
            if stack is None:
                continue
            scale = std / math.sqrt(2 * max(1, stack.config.n_layers))
            for block in stack.blocks:
                if hasattr(block.mixer, "out_proj") and not self._is_mamba_module(block.mixer):
                    nn.init.normal_(block.mixer.out_proj.weight, mean=0.0, std=scale)
                if block.feed_forward is not None:
                    nn.init.normal_(block.feed_forward.down.weight, mean=0.0, std=scale)

    def _is_mamba_param(self, name: str) -> bool:
        module = self.get_submodule(name.rsplit(".mixer.", 1)[0] + ".mixer")
        return self._is_mamba_module(module)

    @staticmethod
    def _is_mamba_module(module: nn.Module) -> bool:
        return getattr(module, "initialises_itself", False)

    # ---------------------------------------------------------------- the forward pass
    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= sum(e.weight.numel() for e in self.modules() if isinstance(e, nn.Embedding))
        return n

    def global_input(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) bytes, T a multiple of P -> (B, K, P·D_G): the global model's input, where
        position k holds the embedded bytes of patch k-1 (the pad patch at k = 0)."""
        B, T = tokens.shape
        h = self.global_byte_embedding(tokens)  # (B, T, D_G)
        if self.position_embedding is not None:
            h = h + self.position_embedding.weight[:T]
        patches = self.patching.group(h)  # (B, K, P·D_G)
        pad = self.global_pad_patch.to(patches.dtype).expand(B, 1, -1)
        return self.embedding_dropout(torch.cat([pad, patches[:, :-1]], dim=1))

    def local_input(self, global_output: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(B, K, P·D_G) global output and (B, T) bytes -> (B, K, P, D_L): the local model's input,
        where byte p of patch k gets its global slice plus the embedding of byte p-1 of the same
        patch (the pad byte at p = 0)."""
        B, K, _ = global_output.shape
        P = self.config.patch_size
        from_global = self.global_to_local(self.patching.ungroup(global_output))  # (B, K, P, D_L)
        previous = self.local_byte_embedding(tokens).view(B, K, P, -1)  # (B, K, P, D_L)
        pad = self.local_pad_byte.to(previous.dtype).expand(B, K, 1, -1)
        previous = torch.cat([pad, previous[:, :, :-1]], dim=2)
        return self.embedding_dropout(from_global + previous)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) bytes (any integer dtype) -> (B, T, 256) next-byte logits.

        The logit at position t depends only on bytes < t. T need not be a multiple of P: the
        sequence is right-padded to one and the padding's logits are dropped.
        """
        B, T = tokens.shape
        if T > self.config.max_seq_len:
            raise ValueError(f"sequence of {T} bytes exceeds max_seq_len={self.config.max_seq_len}")
        tokens = tokens.long()
        T_padded = self.patching.padded_length(T)
        if T_padded != T:
            tokens = F.pad(tokens, (0, T_padded - T))
        h = self.global_stack(self.global_input(tokens))  # (B, K, P·D_G)
        if self.local_stack is None:
            h = self.patching.ungroup(h).reshape(B, T_padded, -1)  # (B, T, D_G)
        else:
            x = self.local_input(h, tokens)  # (B, K, P, D_L)
            K, P, D_L = x.shape[1:]
            h = self.local_stack(x.reshape(B * K, P, D_L)).reshape(B, T_padded, D_L)
        logits = self.head(h)  # (B, T_padded, 256)
        return logits[:, :T]
