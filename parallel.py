"""parallel: everything grpo_train.py needs to run on several processes, kept out of the training loop (torchtitan's
rule: the loop touches sharding only where it must: the rollout gather, the lock-step passes, the checkpoint).

- the process group and its collectives: init, rank, world_size, is_main, barrier, all_reduce, all_gather;
- the models: load_models (FSDP2-sharded with shard / load_sharded, or DDP replicas through accelerate);
- gathering for generation: full_weights (every shard gathered once for a whole rollout phase);
- lock-step: lockstep (every process runs as many forward/backward passes as the busiest), accumulate (DDP's one
  all-reduce per step), clip_grad_norm (the global norm, sharded or not);
- distributed checkpoints (torch.distributed.checkpoint: model, optimizer, scheduler, RNG) and the final HF checkpoint
  gathered to process 0.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

import common

# ---------------------------------------------------------------------------------------------------------------------
# Process group and collectives
# ---------------------------------------------------------------------------------------------------------------------


def init(bf16: bool, fsdp: bool, timeout_s: int):
    """The accelerator (process group, device, DDP for replicas); with --fsdp and one process, a 1-process group.
    Every collective times out after `timeout_s`: a desynchronised process raises instead of hanging."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, InitProcessGroupKwargs

    cuda, timeout = torch.cuda.is_available(), timedelta(seconds=timeout_s)
    # cpu=True when there is no GPU: without it accelerate 1.15 runs each torchrun process alone (DistributedType.NO)
    accelerator = Accelerator(mixed_precision="bf16" if bf16 and not fsdp else "no", cpu=not cuda,
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)])
    if accelerator.distributed_type == DistributedType.FSDP:
        common.die("accelerate's FSDP plugin is not used by grpo_train.py (it would shard twice): launch without an "
                   "FSDP config and pass --fsdp")
    if fsdp and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timeout)
    return accelerator


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_reduce(values: list[float], op: str, device) -> list[float]:
    """Sum ("sum") or maximum ("max") of each value over processes."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world_size() > 1:
        dist.all_reduce(t, dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def all_gather(obj) -> list:
    """`obj` of every process, in rank order."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------------
# FSDP2 sharding and loading; the models
# ---------------------------------------------------------------------------------------------------------------------


def shard(model, mesh, bf16: bool):
    """FSDP2: each vision block and each decoder layer is one all-gather unit; the root holds the rest (embeddings,
    patch embedding, merger, norm, lm_head). With bf16: bf16 compute and all-gathers, fp32 gradient reduction,
    fp32 master weights (AdamW on bf16 weights would round lr 3e-7 updates away)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()  # fp32: no casts
    for block in [*model.model.visual.blocks, *model.model.language_model.layers]:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def load_sharded(name: str, dtype: torch.dtype, mesh, bf16: bool, gradient_checkpointing: bool = False):
    """A sharded model without a full copy per process: every process builds it on the meta device and shards it;
    process 0 alone reads the checkpoint into host RAM and sends each process its shards (full_state_dict +
    broadcast_from_rank0). Buffers (rotary frequencies: not in the state dict) are broadcast from process 0 too."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(name), dtype=dtype)
    full = common.load_model(name, dtype=dtype) if dist.get_rank() == 0 else None
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    shard(model, mesh, bf16)
    model.to_empty(device=torch.device(mesh.device_type, torch.cuda.current_device()) if mesh.device_type == "cuda"
                   else "cpu")
    set_model_state_dict(model, full.state_dict() if full is not None else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    buffers = dict(full.named_buffers()) if full is not None else {}
    for key, buffer in model.named_buffers():
        if full is not None:
            buffer.copy_(buffers[key])
        dist.broadcast(buffer, src=0)
    try:  # the shipped generation config (special token ids); sampling never inherits its knobs (sampling.sample)
        model.generation_config = GenerationConfig.from_pretrained(name)
    except OSError:
        pass
    return model


def load_models(name: str, ref_name: str, accelerator, bf16: bool, fsdp: bool, shard_reference: bool,
                gradient_checkpointing: bool) -> tuple:
    """(policy as trained, policy as sampler, frozen reference), fp32 master weights (bf16 AdamW would round lr 3e-7
    updates away). FSDP: both sharded from one host copy (load_sharded); replicas: the policy on every process (DDP
    through accelerate), the reference beside it."""
    device, ref_dtype = accelerator.device, torch.bfloat16 if bf16 else torch.float32
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (world_size(),))
        model = load_sharded(name, torch.float32, mesh, bf16, gradient_checkpointing)
        reference = (load_sharded(ref_name, ref_dtype, mesh, bf16=False) if shard_reference
                     else common.load_model(ref_name, dtype=ref_dtype, device=device))
        with torch.no_grad():  # FSDP2 initialises on the first forward through the ROOT; sampling may start elsewhere
            model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device))
        model.reshard()  # the root stays gathered after a forward: the optimizer must see the sharded parameters
        generator = model
    else:
        policy = common.load_model(name, dtype=torch.float32)
        if gradient_checkpointing:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = accelerator.prepare(policy)
        generator = accelerator.unwrap_model(model)
        reference = common.load_model(ref_name, dtype=ref_dtype, device=device)
    return model, generator, reference.eval().requires_grad_(False)


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def unwrap(model):
    """The module itself (a DDP replica unwrapped; a sharded model is its own module)."""
    return getattr(model, "module", model)


# ---------------------------------------------------------------------------------------------------------------------
# Gathering for generation; lock-step passes and gradients
# ---------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def full_weights(model):
    """FSDP2: all-gather every shard ONCE for a whole rollout phase and keep it gathered between forwards, so that
    decoding runs with no collective per token (processes that decode different numbers of tokens or calls cannot
    desynchronise), then reshard. A no-op for a replica. The root already stays gathered after its forward.
    transformers' generate reads fully_shard's `_is_fsdp_managed_module` flag to turn on synced_gpus (an all-reduce
    per decoded token, which would make unequal sampling calls hang): with the weights gathered no process needs the
    others, so the flag is lowered for the phase."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units:
        yield
        return
    for unit in units:
        unit.unshard()
    for unit in units[1:]:
        unit.set_reshard_after_forward(False, recurse=False)
    model._is_fsdp_managed_module = False
    try:
        yield
    finally:
        model._is_fsdp_managed_module = True
        for unit in units[1:]:
            unit.set_reshard_after_forward(True, recurse=False)
        for unit in units:
            unit.reshard()


def lockstep(micro_batches: list, stand_in, device) -> list[tuple[object, bool]]:
    """(micro-batch, real) for every pass of this process: its own micro-batches, then zero-weight repeats of a real
    IMAGE micro-batch up to the largest count of any process. Under FSDP every forward and backward is a collective
    (under DDP every backward), so a process that ran fewer would leave the others waiting forever; a text-only
    stand-in would not do (it would skip the vision blocks' all-gathers)."""
    count = int(all_reduce([len(micro_batches)], "max", device)[0])
    return [(mb, True) for mb in micro_batches] + [(stand_in, False)] * (count - len(micro_batches))


def accumulate(model, last: bool):
    """The context of one backward: DDP all-reduces the gradients once, in the last backward of the pass over the
    micro-batches; FSDP reduces in every backward, one process not at all."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not last:
        return model.no_sync()
    return contextlib.nullcontext()


def clip_grad_norm(model, max_norm: float) -> float:
    """The global gradient norm (over every process's shards) before clipping it to `max_norm`."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor


# ---------------------------------------------------------------------------------------------------------------------
# Distributed checkpoints and the final save
# ---------------------------------------------------------------------------------------------------------------------


# What a checkpoint's .metadata is made of (listed from this program's checkpoints, sharded and not): the unpickler
# below builds these and torch dtypes, and nothing else, whatever the file asks for
METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorProperties",
                                              "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                                              "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name in METADATA_GLOBALS.get(module, ()) or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                           torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def _reader(checkpoint: Path):
    """torch.distributed.checkpoint's file reader without its two unpicklings of what the files supply: the metadata
    goes through _MetadataUnpickler (and may name no file outside the checkpoint), byte items (the optimizer's
    hyper-parameters) through torch.load(weights_only=True); tensors already load that way."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs) -> Metadata:
            with open(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
                raise pickle.UnpicklingError("not a checkpoint's metadata")
            for info in metadata.storage_data.values():
                name = getattr(info, "relative_path", None)
                if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
                    raise pickle.UnpicklingError(f"it names the data file {name!r}, not one inside the checkpoint")
            metadata.storage_meta = metadata.storage_meta or StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value) -> None:
            loaded = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return Reader(checkpoint), Planner()


def _first_failure(e: BaseException) -> BaseException:
    """The first process's error inside a CheckpointException (DCP gathers every process's failures into one)."""
    while getattr(e, "failures", None):
        e = next(iter(e.failures.values()))[0]
    return e


def _step_of(path: Path) -> Optional[int]:
    number = path.name.split("-", 1)[1] if path.name.startswith("step-") else ""
    return int(number) if number.isdigit() else None


def latest_checkpoint(out: Path) -> Optional[Path]:
    done = [p for p in (out / "checkpoints").glob("step-*") if p.is_dir() and _step_of(p) is not None
            and (p / "trainer_state.json").exists()]
    return max(done, key=_step_of, default=None)


def remove_interrupted_saves(out: Path) -> None:
    for stale in (out / "checkpoints").glob("step-*.tmp"):  # a save that a kill interrupted
        shutil.rmtree(stale, ignore_errors=True)


def save_checkpoint(out: Path, step: int, keep: int, model, optimizer, scheduler) -> None:
    """Model and optimizer through torch.distributed.checkpoint (each process writes its own shards; a replica's
    tensors once), the scheduler and RNG per process, the data position (the step): written to step-N.tmp and renamed,
    so a kill mid-save leaves no step-N folder that --resume would trust."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final, tmp = out / "checkpoints" / f"step-{step}", out / "checkpoints" / f"step-{step}.tmp"
    if is_main():
        tmp.parent.mkdir(parents=True, exist_ok=True)
        common.fresh_folder(tmp)  # made by this run: a link planted at the name is refused, not written through
    barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    try:
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
    except CheckpointException as e:  # every process gets it; step-N.tmp is removed by the next run
        failure = _first_failure(e)
        if not isinstance(failure, OSError):
            raise
        common.die(f"cannot write the checkpoint {tmp} ({failure.strerror or failure}); the previous checkpoint is "
                   "kept: free space or fix permissions, then rerun the same command with --resume")
    # tensors and plain values only: checkpoint_state reads it back with weights_only=True
    torch.save({"scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "python_rng": random.getstate()}, tmp / f"process-{rank()}.pt")
    barrier()
    if is_main():
        common.write_json_atomic(tmp / "trainer_state.json", {"step": step, "world_size": world_size()})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        steps = sorted(s for s in map(_step_of, (out / "checkpoints").glob("step-*")) if s is not None)
        for old in steps[:-keep] if keep > 0 else []:
            shutil.rmtree(out / "checkpoints" / f"step-{old}", ignore_errors=True)
    barrier()


def checkpoint_state(checkpoint: Path) -> dict:
    """The small part of a checkpoint, read before any model loads: its step (trainer_state.json) and this process's
    scheduler and RNG state. Loaded with weights_only=True: a file holding anything but tensors and plain values (a
    planted pickle) is refused, never run; so is a distributed checkpoint's .metadata holding anything but its own
    classes (_reader)."""
    trainer = common.read_json(checkpoint / "trainer_state.json")
    if not isinstance(trainer, dict) or not isinstance(trainer.get("step"), int):
        common.die(f"{checkpoint / 'trainer_state.json'}: no step recorded; delete {checkpoint} and rerun")
    own = checkpoint / f"process-{rank()}.pt"
    path = own if own.exists() else checkpoint / "process-0.pt"
    try:
        state = torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        common.die(f"{path}: not a training state this program wrote ({first}); it was not unpickled: delete "
                   f"{checkpoint} to resume from an earlier checkpoint")
    if not isinstance(state, dict) or not {"scheduler", "torch_rng", "cuda_rng", "python_rng"} <= set(state):
        common.die(f"{path}: not a training state this program wrote; delete {checkpoint} and rerun")
    reader, _ = _reader(checkpoint)
    try:
        reader.read_metadata()
    except Exception as e:  # anything a hostile or broken pickle raises, from a file that was not unpickled freely
        common.die(f"{checkpoint / '.metadata'}: not a checkpoint this program wrote ({type(e).__name__}: "
                   f"{str(e)[:200]}); it was not unpickled: delete {checkpoint} to resume from an earlier checkpoint")
    return {**state, "step": trainer["step"]}


def load_checkpoint(checkpoint: Path, state: dict, model, optimizer, scheduler) -> int:
    """The model and optimizer state save_checkpoint wrote, into this run's (sharded or replicated) model and
    optimizer, and `state` (checkpoint_state) into the scheduler and RNGs; the checkpoint's step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    tensors = {"model": model_state, "optim": optim_state}
    reader, planner = _reader(checkpoint)
    try:
        dcp.load(tensors, storage_reader=reader, planner=planner)
    except CheckpointException as e:
        failure = _first_failure(e)
        if not isinstance(failure, pickle.UnpicklingError):
            raise
        common.die(f"{checkpoint}: a data file holds more than tensors and plain values ({str(failure)[:200]}); it "
                   f"was not unpickled: delete {checkpoint} to resume from an earlier checkpoint")
    set_state_dict(model, optimizer, model_state_dict=tensors["model"], optim_state_dict=tensors["optim"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    random.setstate(state["python_rng"])
    return state["step"]


def save_final(out: Path, model, generator, processor, bf16: bool) -> None:
    """The loadable HF checkpoint in --out, gathered to process 0 in the model's dtype (bf16 for a bf16 run, like the
    released checkpoints): written to --out/.final.tmp, then renamed file by file with config.json last, so that
    --out never holds a config.json beside half-written weights. `generator` is the module itself (DDP unwrapped)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if is_main():
        if bf16:
            state_dict = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state_dict.items()}
        tmp = common.fresh_folder(out / ".final.tmp")  # made by this run: nothing planted there is written through
        generator.save_pretrained(tmp, state_dict=state_dict)
        if bf16:  # save_pretrained writes the dtype of the fp32 master weights into config.json
            config = generator.config
            for c in [config, *(getattr(config, key) for key in config.sub_configs)]:
                c.dtype = torch.bfloat16
            config.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        names = sorted((p.name for p in tmp.iterdir()), key=lambda name: name == "config.json")
        (out / "config.json").unlink(missing_ok=True)
        for name in names:
            os.replace(tmp / name, out / name)
        tmp.rmdir()
    barrier()
