"""Training from config: `loongforge run qwen2_5_vl_tiny` lowers the loss, and swapping the LLM
line of the config (Qwen2.5 -> Llama 3 -> Qwen3) trains with no code change."""

from __future__ import annotations

import re
from pathlib import Path

import loongforge_vlm
import pytest

CONFIG = Path(loongforge_vlm.__file__).parent / "configs" / "qwen2_5_vl_tiny.yaml"
FOUNDATION_LINE = "- /models/qwen2_5@model.foundation: qwen2.5_tiny"


@pytest.mark.parametrize("packing", [False, True])
def test_loongforge_run_lowers_loss(tmp_path, packing):
    """Also with ``sft.packing=true`` (several conversations and their images per row, kept apart
    by the document mask)."""
    from loongforge.testing import run_cli

    extra = ["sft.packing=true", "data.document_attention=true"] if packing else []
    out = run_cli("run", "qwen2_5_vl_tiny", f"output_dir={tmp_path}", "train.steps=8", *extra, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert "vlm data: 64 conversations with 64 images; 0 skipped" in text
    if packing:
        rows = int(re.search(r"packed into (\d+) sequences", text).group(1))
        assert rows < 64, rows
    first, last = map(float, re.search(r"loss: ([\d.]+) \(first step\) -> ([\d.]+) \(step 8\)", text).groups())
    assert last < first - 0.5, (first, last)
    assert (tmp_path / "checkpoints" / "step_00000008").is_dir()


@pytest.mark.parametrize("group,name", [("llama3", "llama3_tiny"), ("qwen3", "qwen3_tiny")])
def test_swapping_the_llm_trains(tmp_path, group, name):
    """The composed model really has the other LLM (Llama 3: tied embeddings, llama3 RoPE scaling;
    Qwen3: QK-norm, head_dim 32 -> MRoPE split 4/6/6) and its loss falls over 5 steps."""
    from loongforge.config import compose_config
    from loongforge.plugins import get_plugin_manager
    from loongforge_vlm.data.shapes import write_shapes
    from loongforge_vlm.task import run_vlm_sft

    text = CONFIG.read_text()
    assert FOUNDATION_LINE in text
    swapped = tmp_path / "vlm.yaml"
    swapped.write_text(text.replace(FOUNDATION_LINE, f"- /models/{group}@model.foundation: {name}"))
    data = write_shapes(tmp_path / "shapes", n=32)
    cfg = compose_config(str(swapped), [f"output_dir={tmp_path}", f"data.paths=[{data}]", "train.steps=5"])
    assert cfg.model.foundation.family == {"llama3": "llama", "qwen3": "qwen3"}[group]
    result = run_vlm_sft(cfg, get_plugin_manager())
    losses = [loss for _, loss in result["history"]]
    assert len(losses) == 5 and losses[-1] < losses[0] - 0.3, losses
