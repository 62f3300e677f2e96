"""One rank of a 2-process CPU (gloo) world, launched by test_conversion.py with
``python -m torch.distributed.run --nproc-per-node 2 _dist_worker.py SPEC.json``.

For each case of the spec: build our model under the case's TP/PP layout exactly as the trainer
does, load a native checkpoint written by ``hf-to-mcore`` (with the trainer's ``load_checkpoint``),
run a forward pass of the reference token ids (stage 0 sends its hidden states to stage 1 for
PP=2; TP ranks all-gather their vocabulary shards), compare the last stage's logits with the HF
reference, then save the loaded model again with the trainer's ``save_checkpoint`` under this
layout (for the test to convert back with ``mcore-to-hf``). Rank 0 writes the results.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main(spec_file: str) -> None:
    from loongforge.backends.cpu import CpuBackend
    from loongforge.plugins import get_plugin_manager
    from loongforge.trainer.checkpoint import load_checkpoint, save_checkpoint
    from loongforge.trainer.model import build_model_chunks, model_provider, run_settings
    from megatron.core import parallel_state as ps
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    spec = json.loads(Path(spec_file).read_text())
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    backend = CpuBackend()
    plugins = get_plugin_manager()
    results = []
    with backend.activate():
        for case in spec["cases"]:
            tp, pp = case["tp"], case["pp"]
            result = None
            ps.initialize_model_parallel(tp, pp)
            try:
                root = Path(case["ckpt"])
                cfg = OmegaConf.load(root / "config.yaml")
                cfg.parallel.tp, cfg.parallel.pp = tp, pp
                provider = model_provider(cfg, plugins)
                chunks = build_model_chunks(provider, run_settings(cfg), backend, plugins)
                load_checkpoint(root / "step_00000000", chunks, None, backend, load_rng=False)
                model = chunks[0].eval()
                ref = load_file(case["ref"])
                ids, ref_logits = ref["ids"], ref["logits"]
                pos = torch.arange(ids.shape[1]).expand_as(ids)
                with torch.no_grad():
                    if not ps.is_pipeline_first_stage():
                        hidden = torch.empty(ids.shape[1], ids.shape[0], int(cfg.model.hidden_size))
                        dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
                        model.set_input_tensor(hidden)
                    out = model(ids, pos, None)
                    if not ps.is_pipeline_last_stage():
                        dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
                    else:
                        if tp > 1:
                            parts = [torch.empty_like(out) for _ in range(tp)]
                            dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
                            out = torch.cat(parts, dim=-1)
                        vocab = ref_logits.shape[-1]
                        rel = ((out[..., :vocab] - ref_logits).norm() / ref_logits.norm()).item()
                        result = {"name": case["name"], "tp": tp, "pp": pp, "rel": rel,
                                  "padded_vocab": out.shape[-1]}
                # save under this layout, as a training run would
                resaved = Path(case["resave"])
                if rank == 0:
                    resaved.mkdir(parents=True, exist_ok=True)
                    shutil.copy(root / "config.yaml", resaved / "config.yaml")
                save_checkpoint(resaved, 1, chunks, None, {"step": 1, "consumed_samples": 0, "scheduler": None},
                                backend)
                gathered = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, result if ps.is_pipeline_last_stage() and
                                       ps.get_tensor_model_parallel_rank() == 0 else None)
                results.extend(r for r in gathered if r is not None)
            finally:
                ps.destroy_model_parallel()
    if rank == 0:
        Path(spec["out"]).write_text(json.dumps(results, indent=2))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
