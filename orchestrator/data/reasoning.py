"""Problems with verifiable answers for RL fine-tuning (the "problems" view of the sft, ppo, grpo and vapo methods).

- dataset `arithmetic`: the generated chains of trainers/rl/tasks.py (made by this project, not a real dataset):
  data.num_problems training problems from the experiment's seed, and a fixed test set of data.num_test problems
  from another seed, with the operand count and size of data.max_operands / data.max_number.
- dataset `jsonl`: `root` is a directory holding train.jsonl and test.jsonl, one object per line with "prompt",
  "answer" and optionally "solution" (e.g. a math problem set with its reference solutions).

Items are {"prompt", "answer", "solution"}: zero-padded UTF-8 rows (W,) uint8, each as wide as the longest in the
dataset, plus "idx"; the method tokenizes them with its policy's tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from orchestrator.spec import DataSpec
from trainers.rl.tasks import Problem, arithmetic_problems, read_jsonl, to_bytes

TEST_SEED = 1_000_003  # the arithmetic test set is the same for every experiment seed


class Problems(Dataset):
    def __init__(self, problems: list[Problem]):
        self.problems = problems
        self.columns = {name: torch.from_numpy(to_bytes([getattr(p, name) for p in problems]))
                        for name in ("prompt", "answer", "solution")}

    def __len__(self) -> int:
        return len(self.problems)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**{name: column[i] for name, column in self.columns.items()}, "idx": torch.tensor(i)}


def load_problems(spec: DataSpec, seed: int) -> tuple[Problems, Problems, dict[str, object]]:
    """Train and test problems of `spec`, and an artifact describing them."""
    if spec.dataset == "arithmetic":
        train = arithmetic_problems(spec.num_problems, seed, spec.max_operands, spec.max_number)
        test = arithmetic_problems(spec.num_test, TEST_SEED, spec.max_operands, spec.max_number)
        train_keys = {p.prompt for p in train}
        overlap = sum(p.prompt in train_keys for p in test)
        source = {"generated": "arithmetic chains (trainers/rl/tasks.py)", "max_operands": spec.max_operands,
                  "max_number": spec.max_number, "test_prompts_also_in_train": overlap}
    else:
        root = Path(spec.root).expanduser()
        train, test = read_jsonl(root / "train.jsonl"), read_jsonl(root / "test.jsonl")
        source = {"root": str(root)}
    lengths = np.array([len(p.solution) for p in train])
    artifact = {**source, "train": len(train), "test": len(test), "solution_chars_mean": float(lengths.mean()),
                "examples": [vars(p) for p in train[:5]]}
    return Problems(train), Problems(test), artifact
