"""Un-rotate and re-rotate keys with the model's own rotary embedding.

Blocks are stored with *pre-RoPE* keys: RoPE is an orthogonal rotation (times the model's attention
scaling, if any), so it is exactly invertible, and a key stored before rotation can be placed at any
offset at assembly time. The cos/sin come from the model's own rotary module, so every rope type
transformers implements (default, linear, dynamic, yarn, llama3, partial rotary, per-layer-type
parameters as in Gemma 3) is handled without re-implementing it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass(frozen=True)
class LayerGroup:
    """Layers that share one set of rotary parameters."""

    layer_type: str | None
    layers: tuple[int, ...]


class ModelRope:
    """Rotary parameters of one model, grouped by layer type."""

    def __init__(self, model: PreTrainedModel) -> None:
        decoder = model.get_decoder()
        rotary = getattr(decoder, "rotary_emb", None)
        if not isinstance(rotary, nn.Module):
            raise ValueError(f"{type(model).__name__} has no rotary embedding: kvrag needs a RoPE decoder")
        self._rotary = rotary
        self._takes_layer_type = "layer_type" in inspect.signature(rotary.forward).parameters
        config = model.config.get_text_config(decoder=True)
        self.num_layers: int = config.num_hidden_layers
        layer_types: list[str] | None = getattr(config, "layer_types", None) if self._takes_layer_type else None
        if layer_types:
            by_type: dict[str, list[int]] = {}
            for i, t in enumerate(layer_types[: self.num_layers]):
                by_type.setdefault(t, []).append(i)
            self.groups = [LayerGroup(t, tuple(ls)) for t, ls in by_type.items()]
        else:
            self.groups = [LayerGroup(None, tuple(range(self.num_layers)))]
        self._device = next(model.parameters()).device

    def cos_sin(self, group: LayerGroup, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: [tokens, rotary_dim] in fp32 for integer ``positions: [tokens]``."""
        dummy = torch.zeros(1, dtype=torch.float32, device=self._device)
        pos = positions.to(self._device).long()[None, :]
        kwargs = {"layer_type": group.layer_type} if group.layer_type is not None else {}
        cos, sin = self._rotary(dummy, pos, **kwargs)
        return cos[0].float(), sin[0].float()

    def _apply(self, k: torch.Tensor, positions: torch.Tensor, inverse: bool) -> torch.Tensor:
        # k: [layers, kv_heads, tokens, head_dim]; positions: [tokens]
        if len(self.groups) == 1:
            cos, sin = self.cos_sin(self.groups[0], positions)
            return self._rotate_group(k, cos.to(k.device), sin.to(k.device), inverse)
        out = torch.empty_like(k)
        for group in self.groups:
            cos, sin = self.cos_sin(group, positions)  # [tokens, rot]
            idx = torch.tensor(group.layers, device=k.device)
            rotated = self._rotate_group(k.index_select(0, idx), cos.to(k.device), sin.to(k.device), inverse)
            out.index_copy_(0, idx, rotated)
        return out

    @staticmethod
    def _rotate_group(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
        rot = cos.shape[-1]
        kg = k.float()
        kr = kg[..., :rot]
        if inverse:
            # The rotary module may fold an attention scale into cos/sin: divide it back out.
            kr = (kr * cos - rotate_half(kr) * sin) / (cos * cos + sin * sin)
        else:
            kr = kr * cos + rotate_half(kr) * sin
        if rot < kg.shape[-1]:
            kr = torch.cat((kr, kg[..., rot:]), dim=-1)
        return kr.to(k.dtype)

    @staticmethod
    def rotate_inplace(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Rotate ``k: [..., tokens, head_dim]`` in place with a table from :meth:`cos_sin` (``[tokens, rot]``).

        The same ``k * cos + rotate_half(k) * sin`` as the model, written per half with in-place multiply-adds:
        one half-size temporary instead of five full-size ones, and no copy back (4x faster on a CPU).
        """
        rot = cos.shape[-1]
        half = rot // 2
        cos, sin = cos.to(k.device, k.dtype), sin.to(k.device, k.dtype)
        x1, x2 = k[..., :half], k[..., half:rot]
        first = x1.clone()
        x1.mul_(cos[..., :half]).addcmul_(x2, sin[..., :half], value=-1)
        x2.mul_(cos[..., half:]).addcmul_(first, sin[..., half:])

    def place_inplace(self, k_pre: torch.Tensor, positions: torch.Tensor) -> None:
        """:meth:`rotate` in place: ``k_pre: [layers, kv_heads, tokens, head_dim]`` at ``positions: [tokens]``."""
        for group in self.groups:
            cos, sin = self.cos_sin(group, positions)
            if len(self.groups) == 1:
                self.rotate_inplace(k_pre, cos, sin)
            else:
                for layer in group.layers:
                    self.rotate_inplace(k_pre[layer], cos, sin)

    def rotate(self, k_pre: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Place pre-RoPE keys ``[layers, kv_heads, tokens, head_dim]`` at ``positions: [tokens]``."""
        return self._apply(k_pre, positions, inverse=False)

    def unrotate(self, k_post: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Undo the rotation of keys that were computed at ``positions``."""
        return self._apply(k_post, positions, inverse=True)
