"""GRPO with the VIGOR reward in TRL: an ordinary GRPOTrainer script plus one reward object.

    python examples/trl_grpo_vigor.py --tiny                       # offline smoke run: random tiny model, seconds
    python examples/trl_grpo_vigor.py --model Qwen/Qwen2.5-0.5B-Instruct --lora --bf16
    accelerate launch --num_processes 4 examples/trl_grpo_vigor.py --model Qwen/Qwen2.5-1.5B-Instruct --bf16

The only VIGOR-specific line is ``reward_funcs=[VigorReward()]``; ``--reward self_certainty`` swaps in the
INTUITOR baseline, and ``--accuracy-weight`` mixes in a ground-truth reward through TRL's ``reward_weights``.
The prompts are arithmetic questions built in memory, so the script needs no dataset download.
"""

from __future__ import annotations

import argparse
import random
import re

from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from vigor.integrations.trl import SelfCertaintyReward, VigorReward


def arithmetic_dataset(size: int, seed: int) -> Dataset:
    """Conversational prompts ("what is 3 + 4 ?") with their answers; TRL applies the chat template itself."""
    rng = random.Random(seed)
    rows = []
    for _ in range(size):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        question = f"what is {a} + {b} ?"
        rows.append({"prompt": [{"role": "user", "content": question}], "answer": str(a + b)})
    return Dataset.from_list(rows)


def accuracy(completions: list, answer: list, **kwargs) -> list[float]:
    """Ground-truth control: 1 when the last number in the completion is the answer."""
    scores = []
    for completion, truth in zip(completions, answer, strict=True):
        numbers = re.findall(r"\d+", completion[0]["content"])
        scores.append(1.0 if numbers and numbers[-1] == truth else 0.0)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="Qwen/Qwen2.5-0.5B-Instruct", help="hub id or local path")
    parser.add_argument("--tiny", action="store_true", help="random tiny Qwen2 and an offline tokenizer (no hub)")
    parser.add_argument("--reward", choices=["vigor", "self_certainty"], default="vigor")
    parser.add_argument("--accuracy-weight", type=float, default=0.0, help="weight of the ground-truth reward")
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters (theta = the adapters)")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even when a GPU is there")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8, help="completions per device and step")
    parser.add_argument("--max-completion-length", type=int, default=64)
    parser.add_argument("--output-dir", default="runs/trl_grpo_vigor")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if args.tiny:
        from vigor.tiny import char_tokenizer, tiny_model

        tokenizer = char_tokenizer(bos=True)
        model = tiny_model("qwen2", vocab=len(tokenizer), seed=args.seed)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype="bfloat16" if args.bf16 else "float32")

    # The one VIGOR line: rank-shaped -sqrt(T)||grad L|| per group, scored in one batched pass per process.
    rewards = [VigorReward() if args.reward == "vigor" else SelfCertaintyReward()]
    weights = [1.0]
    if args.accuracy_weight:
        rewards.append(accuracy)
        weights.append(args.accuracy_weight)

    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)

    config = GRPOConfig(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        reward_weights=weights,
        # TRL's defaults, spelled out: with them TRL's group normalization is VIGOR's group advantage (docs/reward.md).
        scale_rewards="group",
        multi_objective_aggregation="sum_then_normalize",
        learning_rate=1e-5 if not args.tiny else 1e-3,
        bf16=args.bf16,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=args.seed,
        use_cpu=args.cpu,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=rewards,
        args=config,
        train_dataset=arithmetic_dataset(256, args.seed),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.train()
    last = trainer.state.log_history[-2] if len(trainer.state.log_history) > 1 else {}
    shown = {k: v for k, v in last.items() if k.startswith((args.reward, "rewards/", "reward"))}
    print("last step:", shown)


if __name__ == "__main__":
    main()
