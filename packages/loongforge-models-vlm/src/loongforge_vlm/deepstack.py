"""DeepStack (Qwen3-VL): vision features of several encoder depths added to the hidden states that
the first LLM layers output, at the visual token positions.

How it enters megatron-core's decoder, through documented interfaces only:

* the layer spec: ``DeepStackGPTModel`` builds its layers from the LLM family's spec with the
  layer class replaced by a subclass (``with_deepstack``) whose public ``forward`` adds
  ``context[layer_number - 1]`` to the layer's output when the block hands it a ``context``;
* the data: ``TransformerBlock.forward`` takes ``context`` (the cross-attention input) and passes it
  to every layer, also in its activation-recompute path; GPT layers have no cross-attention, so a
  DeepStack layer gives its own layer ``context=None`` and uses the tensor itself. ``GPTModel``
  forwards it from ``extra_block_kwargs={"context": ...}``.

The tensor is dense, [k, s, b, h]: zero except at the visual positions, where row ``i`` holds the
``i``-th DeepStack features (adding zeros elsewhere is exact, so this equals HF's masked add).
Layers ``0 .. k-1`` must be on the first pipeline stage (the provider checks), since pipeline
stages exchange only the hidden states.
"""

from __future__ import annotations

import dataclasses
import functools

from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_layer import TransformerLayer

from loongforge_vlm.model import MRopeGPTModel


class DeepStackMixin:
    """Mixed into the spec's layer class (``with_deepstack``)."""

    def forward(self, *args, context=None, **kwargs):
        out, _ = super().forward(*args, context=None, **kwargs)
        index = self.layer_number - 1
        if context is not None and index < context.shape[0]:
            out = out + context[index].to(out.dtype)
        return out, context


@functools.cache
def _layer_class(base: type) -> type:
    return type(f"DeepStack{base.__name__}", (DeepStackMixin, base), {"__module__": __name__})


def with_deepstack(spec: ModuleSpec) -> ModuleSpec:
    """``spec`` (a transformer-layer ``ModuleSpec``, or a block spec listing one per layer, as
    backends with per-layer kernels give) with its layer classes made DeepStack-aware."""
    module = spec.module if isinstance(spec, ModuleSpec) else None
    if isinstance(module, type) and issubclass(module, TransformerLayer):
        return ModuleSpec(module=_layer_class(module), params=dict(spec.params or {}), submodules=spec.submodules)
    if isinstance(module, type) and issubclass(module, TransformerBlock):
        subs = dataclasses.replace(spec.submodules, layer_specs=[with_deepstack(s) for s in spec.submodules.layer_specs])
        return ModuleSpec(module=module, params=dict(spec.params or {}), submodules=subs)
    raise TypeError(f"DeepStack needs a TransformerLayer or TransformerBlock ModuleSpec as the LLM's layer spec, "
                    f"got {spec!r}")


class DeepStackGPTModel(MRopeGPTModel):
    """The multimodal-RoPE GPT model whose layers take DeepStack features from ``context``."""

    def __init__(self, *args, transformer_layer_spec, **kwargs):
        super().__init__(*args, transformer_layer_spec=with_deepstack(transformer_layer_spec), **kwargs)
