"""Verifiable-reward tasks: the generated arithmetic task, JSONL problem files, tokenizers and verifiers.

A problem is three strings: the `prompt`, the reference `answer` a verifier compares against, and a `solution`
(the text a supervised warm start imitates; the answer itself when a file has none).

The generated task (made by this project, not a real dataset): chains of 2..max_operands integers in 0..max_number
joined by + and -, evaluated left to right. The solution writes the running total after each operation, so longer
chains need longer responses (the heterogeneous lengths VAPO's length-adaptive GAE is about):

    prompt   "12+7-5="          solution "19 14"          answer "14"
    prompt   "3+4="             solution "7"              answer "7"

Verifiers map (response, answer) -> reward in {correct, wrong}: "last_number" compares the last integer of the
response with the answer, "exact" compares the stripped strings, and "module:function" names any callable
f(response: str, answer: str) -> bool a user provides (e.g. a symbolic math checker).
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

Verifier = Callable[[str, str], bool]


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str
    solution: str


def arithmetic_problems(n: int, seed: int, max_operands: int = 4, max_number: int = 99) -> list[Problem]:
    """`n` chains with 2..max_operands operands, operand counts uniform; the same for a given seed everywhere."""
    if max_operands < 2 or max_number < 1:
        raise ValueError(f"arithmetic problems need max_operands >= 2 and max_number >= 1, found {max_operands} "
                         f"and {max_number}")
    rng = np.random.Generator(np.random.PCG64(seed))
    problems = []
    for _ in range(n):
        count = int(rng.integers(2, max_operands + 1))
        numbers = rng.integers(0, max_number + 1, count).tolist()
        signs = rng.choice(["+", "-"], count - 1).tolist()
        total, partials, prompt = numbers[0], [], str(numbers[0])
        for sign, number in zip(signs, numbers[1:]):
            total = total + number if sign == "+" else total - number
            partials.append(str(total))
            prompt += f"{sign}{number}"
        problems.append(Problem(prompt + "=", str(total), " ".join(partials)))
    return problems


def read_jsonl(path: str | Path) -> list[Problem]:
    """Problems of a JSONL file: one object per line with "prompt" and "answer" (strings or numbers) and an
    optional "solution". ValueError names the file, the line and the missing key."""
    problems = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not a JSON object ({err.msg})") from None
            missing = [key for key in ("prompt", "answer") if not isinstance(record, dict) or key not in record]
            if missing:
                raise ValueError(f"{path}:{number}: expected the keys 'prompt' and 'answer', missing {missing}")
            answer = str(record["answer"])
            problems.append(Problem(str(record["prompt"]), answer, str(record.get("solution", answer))))
    if not problems:
        raise ValueError(f"{path}: no problems (expected JSON lines with 'prompt' and 'answer')")
    return problems


# ------------------------------------------------------------------------------------------------ verifiers


def last_number(response: str, answer: str) -> bool:
    numbers = re.findall(r"-?\d+", response)
    return bool(numbers) and numbers[-1] == answer.strip()


def exact(response: str, answer: str) -> bool:
    return response.strip() == answer.strip()


VERIFIERS: dict[str, Verifier] = {"last_number": last_number, "exact": exact}


def get_verifier(name: str) -> Verifier:
    """A built-in verifier by name, or "package.module:function"; ValueError (TypeError: not callable) says what
    was wrong."""
    if name in VERIFIERS:
        return VERIFIERS[name]
    module, _, attribute = name.partition(":")
    if not attribute:
        raise ValueError(f"verifier {name!r}: expected one of {', '.join(VERIFIERS)} or 'module:function'")
    try:
        found = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"verifier {name!r}: cannot import it ({err})") from None
    if not callable(found):
        raise TypeError(f"verifier {name!r} is not callable")
    return found


# ------------------------------------------------------------------------------------------------ tokenizers


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus padding (256) and end of sequence (257): the tiny policy's vocabulary,
    which needs no training and reads any text."""

    pad_id, eos_id, vocab_size = 256, 257, 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer from a local model directory; padding falls back to the end-of-sequence token."""

    def __init__(self, directory: str):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(directory)
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer of {directory}: it has no end-of-sequence token")
        self.eos_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def to_bytes(texts: list[str]) -> np.ndarray:
    """Strings as zero-padded UTF-8 rows: (N, W) uint8, W the longest (how batches carry text: a tensor collates,
    a string does not)."""
    encoded = [t.encode("utf-8") for t in texts]
    width = max(1, max(len(e) for e in encoded))
    out = np.zeros((len(encoded), width), dtype=np.uint8)
    for row, data in enumerate(encoded):
        out[row, : len(data)] = np.frombuffer(data, dtype=np.uint8)
    return out


def from_bytes(rows: np.ndarray) -> list[str]:
    """The inverse of to_bytes: (N, width) uint8 -> N strings."""
    return [bytes(row).rstrip(b"\0").decode("utf-8", errors="replace") for row in rows]
