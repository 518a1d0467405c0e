"""Flags as users bring them from the original GPT-2 scripts: `--top_k` is our `--top-k`, and a flag of
another tool's that gpt2kit spells differently (`--model_name`, `--text`, `--num_samples`, ...) is answered
with the gpt2kit flag that does its job, instead of argparse's bare "unrecognized arguments"."""

from __future__ import annotations

import argparse

_OPENAI = "OpenAI's gpt-2 scripts"
_GRAYKODE = "graykode's gpt-2-Pytorch"
_HF_GEN = "Hugging Face's run_generation.py"
_HF_CLM = "Hugging Face's run_clm.py"
_SIMPLE = "gpt-2-simple"
_NSHEPPERD = "nshepperd's train.py"

# another tool's flag -> (whose flag it is, {verb: the gpt2kit flag or argument that does its job}); only the
# verbs listed answer with a hint (elsewhere the flag has no counterpart and is simply unrecognized)
_GEN, _TRAIN, _EVAL = ("generate",), ("finetune",), ("eval",)
_MODEL_VERBS = ("generate", "eval", "finetune", "serve", "encode")
FOREIGN: dict[str, tuple[str, dict[str, str]]] = {
    "--model_name": (f"{_OPENAI} and gpt-2-simple", dict.fromkeys(_MODEL_VERBS, "--model")),
    "--models_dir": (_OPENAI, dict.fromkeys(_MODEL_VERBS, "--model (the model's own directory)")),
    "--text": (_GRAYKODE, dict.fromkeys(_GEN, "PROMPT (or --prompt)")),
    "--quiet": (_GRAYKODE, dict.fromkeys(_GEN, "--format jsonl for output without sample headers")),
    "--num_samples": (_HF_GEN, dict.fromkeys(_GEN, "--nsamples")),
    "--num_return_sequences": (_HF_GEN, dict.fromkeys(_GEN, "--nsamples")),
    "--model_name_or_path": (_HF_GEN, dict.fromkeys(_MODEL_VERBS, "--model")),
    "--model_type": (_HF_GEN, dict.fromkeys(_MODEL_VERBS, "--model (gpt2, gpt2-medium, ... or a directory)")),
    "--k": (_HF_GEN, dict.fromkeys(_GEN, "--top-k")),
    "--p": (_HF_GEN, dict.fromkeys(_GEN, "--top-p")),
    "--stop_token": (_HF_GEN, dict.fromkeys(_GEN, "--stop")),
    "--max_length": (_HF_GEN, dict.fromkeys(_GEN, "--length")),
    "--no_cuda": (_HF_GEN, dict.fromkeys(_MODEL_VERBS, "--device cpu")),
    "--use_cpu": (_HF_GEN, dict.fromkeys(_MODEL_VERBS, "--device cpu")),
    "--fp16": (_HF_GEN, dict.fromkeys(_MODEL_VERBS, "--dtype float16")),
    "--bf16": (_HF_CLM, dict.fromkeys(_MODEL_VERBS, "--dtype bfloat16")),
    "--prefix": (_SIMPLE, dict.fromkeys(_GEN, "PROMPT (or --prompt)")),
    "--include_prefix": (_SIMPLE, dict.fromkeys(_GEN, "--include-prompt")),
    "--truncate": (_SIMPLE, dict.fromkeys(_GEN, "--stop")),
    "--destination_path": (_SIMPLE, dict.fromkeys(_GEN, "--output")),
    "--run_name": (f"{_SIMPLE} and {_NSHEPPERD}", {"generate": "--model RUN_DIR", "finetune": "--out RUN_DIR"}),
    "--dataset": (f"{_SIMPLE} and {_NSHEPPERD}", dict.fromkeys(_TRAIN + _EVAL, "--data")),
    "--restore_from": (f"{_SIMPLE} and {_NSHEPPERD}",
                       dict.fromkeys(_TRAIN, "--resume RUN_DIR (or --model to start from a model)")),
    "--learning_rate": (f"{_NSHEPPERD} and {_HF_CLM}", dict.fromkeys(_TRAIN, "--lr")),
    "--sample_length": (_NSHEPPERD, dict.fromkeys(_TRAIN, "--sample-tokens")),
    "--val_dataset": (_NSHEPPERD, dict.fromkeys(_TRAIN, "--val-data")),
    "--val_every": (_NSHEPPERD, dict.fromkeys(_TRAIN, "--eval-every")),
    "--val_batch_count": (_NSHEPPERD, dict.fromkeys(_TRAIN, "--eval-batches")),
    "--train_file": (_HF_CLM, dict.fromkeys(_TRAIN + _EVAL, "--data")),
    "--validation_file": (_HF_CLM, dict.fromkeys(_TRAIN, "--val-data")),
    "--output_dir": (_HF_CLM, dict.fromkeys(_TRAIN, "--out")),
    "--num_train_epochs": (_HF_CLM, dict.fromkeys(_TRAIN, "--epochs")),
    "--max_steps": (_HF_CLM, dict.fromkeys(_TRAIN, "--steps")),
    "--per_device_train_batch_size": (_HF_CLM, dict.fromkeys(_TRAIN, "--batch-size")),
    "--gradient_accumulation_steps": (_HF_CLM, dict.fromkeys(_TRAIN, "--grad-accum")),
}


def translate(verb: str, parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`argv` (the verb's arguments) with underscore spellings of `parser`'s own flags (`--top_k`,
    `--batch_size=4`) written with hyphens; another tool's flag that gpt2kit spells differently is a
    parser error naming the gpt2kit flag. Values and everything after `--` are left alone."""
    own = {s for a in parser._actions for s in a.option_strings}
    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + argv[i:]
        name, eq, value = arg.partition("=")
        if not name.startswith("--") or name in own or _is_value(parser, argv, i):
            out.append(arg)
            continue
        hyphens = "--" + name[2:].replace("_", "-")
        if "_" in name and hyphens in own:
            out.append(hyphens + eq + value)
            continue
        whose, targets = FOREIGN.get(name, ("", {}))
        if verb in targets:
            parser.error(f"{name} is a flag of {whose}; gpt2kit {verb} uses {targets[verb]}")
        out.append(arg)
    return out


def _is_value(parser: argparse.ArgumentParser, argv: list[str], i: int) -> bool:
    """Whether argv[i] is the value of the option before it (`--prompt --text_of_mine`), not a flag."""
    prev, eq, _ = argv[i - 1].partition("=") if i else ("", "", "")
    if eq or not prev.startswith("-"):
        return False
    key = "--" + prev[2:].replace("_", "-") if prev.startswith("--") else prev
    action = parser._option_string_actions.get(key)
    return action is not None and action.nargs is None  # one value (flags such as store_true have nargs 0)
