"""One process of a two-process CPU (gloo) GRPOTrainer run with the VIGOR reward; driven by test_trl_bridge.py.

Launched as ``python -m torch.distributed.run --nproc_per_node 2 tests/trl_ddp_worker.py OUT_DIR [fsdp2]``
(``fsdp2``: the model is sharded by accelerate's FSDP2, each decoder layer and the root). Each
process generates 6 completions per step with ``num_generations=4``, so the second of the step's three groups
is split between the processes. Each writes what it scored and what TRL received to ``OUT_DIR/rank<r>.pt``.
"""

from __future__ import annotations

import sys

import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

import vigor.integrations.trl as bridge
from vigor.integrations.trl import VigorReward
from vigor.tiny import char_tokenizer, tiny_model

PROMPTS = [
    "what is 1 + 2 ?",
    "what is the sum of 3 and 4 ?",
    "x plus y",
    "think step by step",
    "a times b",
    "yes or no",
]


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole weights (gathered from every process if sharded: a collective)."""
    state = {}
    for k, v in model.state_dict().items():
        state[k] = (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
    return state


def allow_fsdp_on_cpu() -> None:
    """accelerate turns its FSDP plugin on for GPU-like devices only (a CPU run silently falls back to DDP);
    this lets the CPU run take accelerate's FSDP2 path (``fully_shard`` of each decoder layer and the root)
    so that the test exercises what a GPU run does."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin
            # later AcceleratorState() calls copy PartialState's shared state over their own
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = patched


def main(out_dir: str, sharding: str = "ddp") -> None:
    if sharding == "fsdp2":
        allow_fsdp_on_cpu()
    tokenizer = char_tokenizer(bos=True)
    model = tiny_model("qwen2", vocab=len(tokenizer))
    args = GRPOConfig(
        output_dir=f"{out_dir}/trainer",
        per_device_train_batch_size=6,
        num_generations=4,
        max_completion_length=5,
        max_steps=2,
        learning_rate=1e-2,
        logging_steps=1,
        report_to="none",
        bf16=False,
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        **(
            dict(fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer"]})
            if sharding == "fsdp2"
            else {}
        ),
    )
    reward = VigorReward()
    dataset = Dataset.from_list([{"prompt": p} for p in PROMPTS])
    trainer = GRPOTrainer(
        model=model, reward_funcs=reward, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    steps, scored_sizes = [], []

    score = bridge.per_sample_grad_norms

    def counting_score(model, input_ids, *rest, **kwargs):
        scored_sizes.append(input_ids.shape[0])
        return score(model, input_ids, *rest, **kwargs)

    bridge.per_sample_grad_norms = counting_score
    sharded_when_scored = []

    def check_sharded(model, *args, **kwargs):
        sharded_when_scored.append(sum(type(p).__name__ == "DTensor" for p in model.parameters()))
        return counting_score(model, *args, **kwargs)

    bridge.per_sample_grad_norms = check_sharded
    calculate = trainer._calculate_rewards

    def spy_calculate(inputs, prompts, completions, completion_ids):
        state = full_state(trainer.model)
        gathered = calculate(inputs, prompts, completions, completion_ids)
        steps.append({"state": state, "prompts": list(prompts), "gathered": gathered[:, 0].clone()})
        return gathered

    trainer._calculate_rewards = spy_calculate
    generate_and_score = trainer._generate_and_score_completions

    def spy_generate(inputs):
        out = generate_and_score(inputs)
        keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages")
        steps[-1].update({k: out[k].detach().clone() for k in keys})
        return out

    trainer._generate_and_score_completions = spy_generate
    trainer.train()
    rank = trainer.accelerator.process_index
    torch.save(
        {
            "rank": rank,
            "world": trainer.accelerator.num_processes,
            "sharded_when_scored": sharded_when_scored,
            "steps": steps,
            "scored_sizes": scored_sizes,
            "log_history": trainer.state.log_history,
        },
        f"{out_dir}/rank{rank}.pt",
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
