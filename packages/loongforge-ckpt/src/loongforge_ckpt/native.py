"""LoongForge native checkpoints (megatron-core ``torch_dist`` distributed checkpoints) without
materialising a model.

The converters build the model once on the ``meta`` device (tensor and pipeline parallel size 1)
only to get megatron-core's ``sharded_state_dict()``: the checkpoint keys, global shapes, the
layer axis megatron prepends and the factories it uses (the ``[gate; up]`` split of a gated MLP's
``linear_fc1``). A checkpoint written from that description holds every tensor whole (global), and
megatron-core's loader reads the part each rank needs under any TP/PP layout, the way it reshards
any checkpoint.

* :func:`write_checkpoint` saves such a state dict through ``torch.distributed.checkpoint`` with a
  planner whose ``resolve_data`` produces each tensor only when the writer asks for it (one file per
  tensor chunk, so the writer never holds more than the tensor it is writing);
* :func:`load_full_tensors` reads the full (TP=1) parameters of a group of state-dict entries from
  a checkpoint saved under any layout.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from loongforge.trainer.checkpoint import atomic_write_text
from torch.overrides import TorchFunctionMode

from loongforge_ckpt.errors import ConversionError

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
TOKENIZER_DIR = "tokenizer"
#: files of an HF directory that make up its tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "vocab.txt", "chat_template.jinja",
                   "chat_template.json")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


# --- process setup -------------------------------------------------------------------------------


@contextlib.contextmanager
def megatron_session():
    """A world of one gloo process with megatron-core's TP=1/PP=1 parallel state on the CPU backend.

    Reuses a process group / parallel state that already exists (a test's), if it is a world of one
    with TP=PP=1. The rendezvous uses its own free port, so environment variables left by torchrun
    in a parent process do not matter.
    """
    import torch.distributed as dist
    from loongforge.backends.cpu import CpuBackend
    from loongforge.testing import free_port
    from megatron.core import parallel_state

    owns_pg = not dist.is_initialized()
    if owns_pg:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    elif dist.get_world_size() != 1:
        raise ConversionError("the converters run in a single process (this one is part of a larger world)")
    rng = torch.random.get_rng_state()
    try:
        backend = CpuBackend()
        with backend.activate():
            owns_ps = not parallel_state.model_parallel_is_initialized()
            if owns_ps:
                parallel_state.initialize_model_parallel(1, 1)
            elif (parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_pipeline_model_parallel_world_size()) != (1, 1):
                raise ConversionError("the converters need tensor/pipeline parallel size 1 in this process")
            try:
                backend.manual_seed(1234)  # megatron's RNG tracker states, for any initialisation
                yield backend
            finally:
                if owns_ps:
                    parallel_state.destroy_model_parallel()
    finally:
        torch.random.set_rng_state(rng)
        if owns_pg:
            dist.destroy_process_group()


# --- model description -----------------------------------------------------------------------------


def _plugins(plugins=None):
    """``plugins`` or the process-wide plugin manager."""
    if plugins is not None:
        return plugins
    from loongforge.plugins import get_plugin_manager

    return get_plugin_manager()


def family_record(family: str, plugins=None):
    from loongforge.plugins import lookup

    plugins = _plugins(plugins)
    return lookup(plugins.registry().models, family, "model family (config key 'model.family')", plugins.failures)


def section_from_hf_config(hf: dict[str, Any], where: str, plugins=None) -> dict[str, Any]:
    """The ``model`` config section of an HF ``config.json`` (as ``model.pretrained`` reads it):
    its keys plus ``family`` (the registered family whose ``hf_model_types`` has its
    ``model_type``), normalised by the family's ``model_cfg_from_hf_config`` when its provider
    module has one."""
    import importlib

    model_type = hf.get("model_type")
    matches = [n for n, rec in _plugins(plugins).registry().models.items() if model_type in rec.hf_model_types]
    if not matches:
        raise ConversionError(f"{where}: no installed model family loads model_type {model_type!r}")
    if len(matches) > 1:
        raise ConversionError(f"{where}: model_type {model_type!r} is claimed by several families: {matches}")
    section = {k: v for k, v in hf.items() if not k.startswith("_")}
    section["family"] = matches[0]
    builder_module = family_record(matches[0], plugins).builder.partition(":")[0]
    normalise = getattr(importlib.import_module(builder_module), "model_cfg_from_hf_config", None)
    if normalise is not None:
        section = dict(normalise(section))
    return section


def provider_for(section: dict[str, Any], plugins=None):
    """The family's provider built from a ``model`` section."""
    from loongforge.registry import load_object

    family = section.get("family")
    if not family:
        raise ConversionError("the model section has no 'family'")
    section = {k: v for k, v in section.items() if k != "pretrained"}
    try:
        return load_object(family_record(family, plugins).builder)(section)
    except ValueError as exc:  # the providers' config errors are ValueErrors naming the key
        raise ConversionError(str(exc)) from exc


def weight_mapping(provider, model):
    """The provider's HF mapping for ``model`` (built by :func:`meta_model`, which configured the
    provider's run: vocabulary padding), with the parameter names that model uses."""
    return provider.weight_mapping().matching(dict(model.named_parameters()))


class _MetaDevices(TorchFunctionMode):
    """Inside :func:`meta_model`: every ``device=`` and ``Tensor.to(device)`` becomes ``meta``
    (megatron-core and the providers name devices explicitly in places)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if kwargs.get("device") is not None:
            kwargs = {**kwargs, "device": "meta"}
        if func is torch.Tensor.to and args[1:] and isinstance(args[1], (str, torch.device, int)) \
                and not isinstance(args[1], bool):
            args = (args[0], "meta", *args[2:])
        return func(*args, **kwargs)


def meta_model(provider, run, backend):
    """The whole model (one chunk with every layer) on the ``meta`` device: shapes, no memory."""
    config = provider.transformer_config(run)
    with torch.device("meta"), _MetaDevices():
        return provider.build(config, run, backend=backend, pre_process=True, post_process=True)


def layer_of(path: str) -> int | None:
    m = _LAYER.match(path)
    return int(m.group(1)) if m else None


def storage_key(t: torch.Tensor) -> int:
    """Identity of a tensor's storage (shared by its views and ``detach()``-ed aliases)."""
    return t.untyped_storage()._cdata


# --- writing ---------------------------------------------------------------------------------------


def _lazy_planner_class():
    from megatron.core.dist_checkpointing.strategies.torch import MCoreSavePlanner
    from torch.distributed.checkpoint.planner import WriteItemType

    class LazySavePlanner(MCoreSavePlanner):
        """megatron-core's save planner, with tensor data produced on demand.

        The state dict holds ``meta`` tensors; ``sources`` maps each one's storage to a state-dict
        path and ``produce(path)`` returns that parameter's full tensor. A write item is a view of
        such a meta tensor (a layer of a stacked key, a half of ``linear_fc1``); the same view of
        the produced tensor is what is written. The last produced tensor is kept for the next
        items of the same parameter.
        """

        def __init__(self, sources: dict[int, str], produce: Callable[[str], torch.Tensor], **kwargs):
            super().__init__(**kwargs)
            self._sources, self._produce = sources, produce
            self._cached: tuple[str, torch.Tensor] | None = None

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            meta = self.lookup_object(write_item.index)
            path = self._sources[storage_key(meta)]
            if self._cached is None or self._cached[0] != path:
                self._cached = None  # drop the previous parameter before producing the next
                self._cached = (path, self._produce(path))
            full = self._cached[1]
            if meta.dtype != full.dtype or meta.untyped_storage().nbytes() != full.nbytes:
                raise ConversionError(f"internal: parameter {path!r} produced {full.dtype} {tuple(full.shape)}, "
                                      f"planned {meta.dtype} with {meta.untyped_storage().nbytes()} bytes")
            if meta.storage_offset() == 0 and meta.numel() == full.numel() and meta.is_contiguous():
                return full.view(meta.shape)
            return torch.as_strided(full, meta.size(), meta.stride(), meta.storage_offset()).clone()

    return LazySavePlanner


def write_checkpoint(sharded_state_dict: dict, directory: Path, produce: Callable[[str], torch.Tensor]) -> None:
    """Save ``sharded_state_dict`` (a model's, with ``meta`` data) as a megatron-core torch_dist
    checkpoint in ``directory``; ``produce(path)`` returns the full tensor of a state-dict entry
    (same shape and dtype as its meta tensor) when the writer needs it.

    Mirrors ``megatron.core.dist_checkpointing.save``: factories applied, the common (non-sharded)
    part stored as the ``common_state`` object, ``metadata.json`` written last.
    """
    import torch.distributed.checkpoint as dcp
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess
    from megatron.core.dist_checkpointing.strategies.torch import (
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )

    sources: dict[int, str] = {}
    for path, value in sharded_state_dict.items():
        if isinstance(value, (ShardedTensor, ShardedTensorFactory)):
            if value.data.device.type != "meta":
                raise ValueError(f"{path}: write_checkpoint expects meta tensors")
            sources[storage_key(value.data)] = path
    sharded, common = save_preprocess(sharded_state_dict, validate_access_integrity=True)
    sharded["common_state"] = ShardedObject(key="common_state", data=common, global_shape=(1,), global_offset=(0,),
                                            replica_id=0)
    flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded, keep_only_main_replica=True)
    pyt_state_dict = mcore_to_pyt_state_dict(flat, is_loading=False)
    planner = _lazy_planner_class()(sources, produce, flatten_state_dict=False, flatten_sharded_tensors=False)
    # one file per tensor chunk: torch's writer keeps every tensor of a file until the file is done
    writer = dcp.FileSystemWriter(str(directory), single_file_per_rank=False, sync_files=True, thread_count=1)
    dcp.save(pyt_state_dict, storage_writer=writer, planner=planner, no_dist=True)
    save_config(CheckpointingConfig("torch_dist", 1), str(directory))


# --- reading ---------------------------------------------------------------------------------------


def stored_dtypes(step_dir: Path) -> dict[str, torch.dtype]:
    """Checkpoint key -> dtype of the tensors stored in a torch_dist checkpoint (from its
    ``.metadata``, which torch.distributed.checkpoint reads with pickle: see the README)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(step_dir)).read_metadata()
    return {k: v.properties.dtype for k, v in metadata.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}


def _without_prepended_axes(sh):
    """The same request with megatron's prepended (layer) axes made ordinary axes of size 1.

    megatron-core turns a tensor with prepended axes into a torch ``ShardedTensor`` that must know
    every chunk of its grid, and in a world of one process it attributes the chunks not requested
    (the other layers) to this rank, which fails; as an ordinary chunk it reads just its slice.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    p = sh.prepend_axis_num
    if not p:
        return sh
    local = (1,) * p + tuple(sh.local_shape)
    return ShardedTensor(key=sh.key, data=sh.data.view(local), dtype=sh.dtype, local_shape=local,
                         global_shape=tuple(sh.global_shape), global_offset=tuple(sh.global_offset),
                         axis_fragmentations=sh.axis_fragmentations, replica_id=sh.replica_id,
                         prepend_axis_num=0, allow_shape_mismatch=sh.allow_shape_mismatch)


def load_full_tensors(entries: dict[str, Any], step_dir: Path, dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """Read the full (TP=1) tensors of some entries of a TP=1/PP=1 model's sharded state dict
    (their data may be ``meta``; replaced here) from a checkpoint saved under any layout, e.g. one
    decoder layer at a time. Tensors are returned in the stored dtype."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    buffers: dict[str, torch.Tensor] = {}
    request: dict[str, Any] = {}
    for path, value in entries.items():
        if not isinstance(value, (ShardedTensor, ShardedTensorFactory)):
            continue
        if value.key not in dtypes:
            raise ConversionError(f"{step_dir}: the checkpoint has no tensor {value.key!r} (parameter {path!r})")
        buf = buffers[path] = torch.empty(tuple(value.data.shape), dtype=dtypes[value.key])
        if isinstance(value, ShardedTensor):
            part = copy.copy(value)
            part.data, part.dtype = buf, buf.dtype
            parts = [part]
        else:  # e.g. linear_fc1's [gate; up] halves: views of the buffer, read in place
            parts = list(nested_values(value.build_fn(value.key, buf, value.replica_id, value.flattened_range)))
        for i, part in enumerate(parts):
            request[f"{path}/{i}"] = _without_prepended_axes(part)
    dist_checkpointing.load(request, str(step_dir), validate_access_integrity=False)
    return buffers


# --- checkpoint directories ------------------------------------------------------------------------


def resolve_checkpoint(checkpoint: str | os.PathLike) -> tuple[Path, Path]:
    """(checkpoints root holding ``config.yaml``, the step directory) for a run's checkpoints
    directory (its ``latest``) or one ``step_N`` directory."""
    path = Path(checkpoint)
    if not path.is_dir():
        raise ConversionError(f"{path}: no such checkpoint directory")
    root = path if (path / CONFIG_FILE).is_file() else path.parent
    if not (root / CONFIG_FILE).is_file():
        raise ConversionError(f"{path}: no {CONFIG_FILE} here or in its parent; pass a run's checkpoint directory")
    if path != root:  # one step directory: it must be complete (a killed save leaves step_N.tmp)
        if not (path / TRAINER_STATE).is_file():
            raise ConversionError(f"{path} is not a complete checkpoint (no {TRAINER_STATE}; an interrupted save?)")
        step = path
    else:
        pointer = root / LATEST
        if not pointer.is_file():
            raise ConversionError(f"{root} holds no complete checkpoint ('{LATEST}' is missing)")
        step = root / pointer.read_text().strip()
        if not (step / TRAINER_STATE).is_file():
            raise ConversionError(f"{pointer} names {step}, which is not a complete checkpoint")
    if not (step / "metadata.json").is_file():
        raise ConversionError(f"{step}: not a megatron-core distributed checkpoint (no metadata.json)")
    return root, step


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files of directory ``src`` into ``dst``; returns their names."""
    names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    if names:
        dst.mkdir(parents=True, exist_ok=True)
        for n in names:
            shutil.copyfile(src / n, dst / n)
    return names


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def group_by_layer(paths: Iterable[str]) -> list[tuple[int | None, list[str]]]:
    """Consecutive state-dict paths grouped by decoder layer (``None``: outside the layers)."""
    groups: list[tuple[int | None, list[str]]] = []
    for p in paths:
        layer = layer_of(p)
        if groups and groups[-1][0] == layer:
            groups[-1][1].append(p)
        else:
            groups.append((layer, [p]))
    return groups
