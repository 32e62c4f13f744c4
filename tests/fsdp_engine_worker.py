"""One process of a two-process CPU (gloo) run of the engine on FSDP2-sharded models; driven by test_fsdp.py.

Launched as ``python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_engine_worker.py OUT_DIR CASE...``.
A case is ``family,wrap,reshard,precision,lora,checkpoint`` (see ``shard``). For each, every process builds the
same tiny model twice (same seed): one is kept whole as the reference, the other is sharded with
``fully_shard``; each process scores its own GRPO-shaped batch on the sharded model with the engine and with
``vigor.oracle_grad_norms``, and with the oracle on the whole reference. It writes all three (per parameter)
to ``OUT_DIR/rank<r>.pt``; the test compares them.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn import Linear

import vigor
from vigor.tiny import group_batch, tiny_model
from vigor.verify import verify

VOCAB = 64


def build(family: str, lora: bool) -> torch.nn.Module:
    model = tiny_model(family, vocab=VOCAB)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
        torch.manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # peft starts B at 0: give the adapters a gradient that is not degenerate
                p.data.normal_(0, 0.1)
    return model


def shard(model: torch.nn.Module, wrap: str, reshard: bool, precision: str, checkpoint: bool) -> None:
    """``wrap``: ``layers`` (each decoder layer, then the root), ``linear`` (also every Linear) or ``root``."""
    policy = MixedPrecisionPolicy()
    if precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    if checkpoint:
        apply_activation_checkpointing(model, check_fn=lambda m: type(m).__name__.endswith("DecoderLayer"))
        layers = [m for m in model.modules() if type(m).__name__ == "CheckpointWrapper"]
    if wrap == "linear":
        for m in list(model.modules()):
            if isinstance(m, Linear) and m.weight.requires_grad and m is not model.get_output_embeddings():
                fully_shard(m, reshard_after_forward=reshard, mp_policy=policy)
    if wrap in ("layers", "linear"):
        for layer in layers:
            fully_shard(layer, reshard_after_forward=reshard, mp_policy=policy)
    fully_shard(model, reshard_after_forward=reshard, mp_policy=policy)


def run_case(case: str, rank: int) -> dict:
    family, wrap, reshard, precision, lora, checkpoint = case.split(",")
    reshard, lora, checkpoint = reshard == "1", lora == "1", checkpoint == "1"
    ids, attention, loss = group_batch(VOCAB, groups=1, group_size=3, seed=10 + rank)
    # FSDP2's bf16 policy casts the fp32 parameters (not the buffers) for the forward: the reference is the same
    reference = build(family, lora)
    if precision == "bf16":
        for p in reference.parameters():
            p.data = p.data.to(torch.bfloat16)
    _, want = vigor.oracle_grad_norms(reference, ids, attention, loss, per_param=True)
    model = build(family, lora)
    shard(model, wrap, reshard, precision, checkpoint)
    out = {"want": want}
    try:
        _, out["engine"] = vigor.per_sample_grad_norms(model, ids, attention, loss, per_param=True)
        _, out["engine_again"] = vigor.per_sample_grad_norms(model, ids, attention, loss, per_param=True)
        _, out["oracle"] = vigor.oracle_grad_norms(model, ids, attention, loss, per_param=True)
        _, out["engine_after_oracle"] = vigor.per_sample_grad_norms(model, ids, attention, loss, per_param=True)
        out["sharded_after"] = all(type(p).__name__ == "DTensor" for p in model.parameters())
    except Exception as err:  # recorded for the test to show; both processes fail alike
        out["error"] = f"{type(err).__name__}: {err}"
    return out


def run_collective_cases(rank: int) -> dict:
    """Process 1 has no completion to score while process 0 has some (it must still take part in the
    collectives, or process 0 hangs); ``fallback=True`` is refused on a sharded model."""
    ids, attention, loss = group_batch(VOCAB, groups=1, group_size=3, seed=20)
    if rank == 1:
        loss = torch.zeros_like(loss)
    model = build("qwen2", False)
    shard(model, "layers", True, "fp32", False)
    out = {"empty_rank_norms": vigor.per_sample_grad_norms(model, ids, attention, loss)}
    out["empty_rank_want"] = vigor.oracle_grad_norms(build("qwen2", False), ids, attention, loss)
    checked = verify(model, ids, attention, loss, repeats=1)  # what `vigor verify` runs
    out["verify"] = (checked.ok, checked.max_rel_err, checked.tolerance)
    try:
        vigor.per_sample_grad_norms(model, ids, attention, loss, fallback=True)
    except vigor.UnsupportedModuleError as err:
        out["fallback_error"] = str(err)
    return out


def main(out_dir: str, cases: list[str]) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    results = {case: run_case(case, rank) for case in cases}
    results["collective"] = run_collective_cases(rank)
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
