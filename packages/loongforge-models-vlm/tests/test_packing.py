"""Packing several multimodal conversations into one row (``sft.packing``): with the document mask
the packed row gives the same loss sum and gradients as the conversations in rows of their own."""

from __future__ import annotations

import json

import torch
from loongforge.model_provider import RunSettings
from loongforge.trainer.batches import model_inputs
from loongforge_vlm.data.conversations import VLMConversationDataset, collate
from loongforge_vlm.data.qwen2_5_image import Qwen2_5ImageProcessor
from loongforge_vlm.data.shapes import shape_image
from loongforge_vlm.data.tokenizer import load_vision_tokenizer
from loongforge_vlm.provider import VLMProvider
from omegaconf import OmegaConf, open_dict

REL_TOL = 1e-5
TOKENS = dict(image_token="<|image_pad|>", vision_start="<|vision_start|>", vision_end="<|vision_end|>")


def write_conversations(tmp_path):
    images = [((84, 56), "red", "square"), ((56, 112), "blue", "circle"), ((112, 84), "green", "triangle")]
    lines = []
    for i, (size, colour, shape) in enumerate(images):
        shape_image(*size, colour, shape).save(tmp_path / f"{i}.png")
        question = "<image>\nWhat is it?" if i != 1 else "Look.\n<image>\nAnd now?"
        lines.append({"messages": [{"role": "user", "content": question},
                                   {"role": "assistant", "content": f"A {colour} {shape}."}], "images": [f"{i}.png"]})
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def loss_and_grads(model, batch, document_attention: bool):
    model.zero_grad(set_to_none=True)
    inputs = model_inputs(batch, torch.device("cpu"), document_attention)
    for key in ("pixel_values", "image_grid_thw", "mrope_position_ids"):
        inputs[key] = batch[key]
    per_token = model(**inputs)
    loss = (per_token * batch["loss_mask"]).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads


def test_packed_equals_unpacked(mcore, tiny_cfg, tmp_path):
    tokenizer = load_vision_tokenizer("builtin:tiny_stories")
    section = OmegaConf.create(OmegaConf.to_container(tiny_cfg.model, resolve=True))
    with open_dict(section):
        section.image_token_id = tokenizer.convert_tokens_to_ids(TOKENS["image_token"])
    provider = VLMProvider(section)
    processor = Qwen2_5ImageProcessor.from_encoder_section(provider.encoder_cfg)
    path = write_conversations(tmp_path)

    plain = VLMConversationDataset([path], tokenizer, processor, seq_length=128, **TOKENS)
    lengths = [len(ids) - 1 for _, ids, _ in plain.records]
    packed = VLMConversationDataset([path], tokenizer, processor, seq_length=sum(lengths) + 7, pack=True, **TOKENS)
    assert len(plain) == 3 and len(packed) == 1 and sorted(packed.bins[0]) == [0, 1, 2]
    assert "packed into 1 sequences" in packed.stats.summary()

    order = packed.bins[0]
    row = packed[0]
    rows = [plain[i] for i in order]
    # each conversation's tokens, positions (1D and the three mrope axes) are those of its own row
    at = 0
    for seg, alone in enumerate(rows):
        n = lengths[order[seg]]
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            assert torch.equal(row[key][at:at + n], alone[key][:n]), key
        assert torch.equal(row["mrope_position_ids"][:, at:at + n], alone["mrope_position_ids"][:, :n])
        assert (row["segment_ids"][at:at + n] == seg).all()
        at += n
    assert (row["segment_ids"][at:] == 3).all() and row["loss_mask"][at:].sum() == 0
    assert torch.equal(row["pixel_values"], torch.cat([r["pixel_values"] for r in rows]))
    assert torch.equal(row["image_grid_thw"], torch.cat([r["image_grid_thw"] for r in rows]))

    run = RunSettings()
    torch.manual_seed(0)
    model = provider.build(provider.transformer_config(run), run, backend=mcore)
    ref_loss, ref_grads = loss_and_grads(model, collate(rows), document_attention=True)
    loss, grads = loss_and_grads(model, collate([row]), document_attention=True)
    assert set(grads) == set(ref_grads)
    assert any(n.startswith("image_encoder.") for n in grads)  # the images' path is in the comparison
    diff = torch.cat([(grads[n] - ref_grads[n]).flatten() for n in ref_grads]).norm()
    total = torch.cat([g.flatten() for g in ref_grads.values()]).norm()
    worst = max(((grads[n] - ref_grads[n]).norm() / ref_grads[n].norm()).item()
                for n in ref_grads if ref_grads[n].norm() > 1e-3 * total)
    loss_rel = abs(loss - ref_loss) / abs(ref_loss)
    print(f"\nvlm packing: loss {loss:.6f} vs {ref_loss:.6f} (rel {loss_rel:.1e}); grads rel {diff / total:.1e}, "
          f"worst tensor {worst:.1e}")
    assert loss_rel < REL_TOL and diff / total < REL_TOL and worst < REL_TOL

    # without the document mask the later conversations see the earlier ones: the loss differs
    leaky, _ = loss_and_grads(model, collate([row]), document_attention=False)
    assert abs(leaky - ref_loss) / abs(ref_loss) > 1e-4
