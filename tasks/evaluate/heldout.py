"""The held-out split as lm-eval tasks: documents with the rendered prompt, and the
task folder (data, YAMLs, metrics) ``TaskManager(include_path=...)`` loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from tasks.core import eval_metrics
from tasks.core.models import render_prompt
from tasks.evaluate.errors import EvalError

TASK_PREFIX = "slothflow_heldout"


def heldout_items(
    validation_path: str | Path, tokenizer: Any, limit: int | None = None
) -> list[dict[str, Any]]:
    """Held-out rows as task documents: rendered prompt, reference answer, and the
    loglikelihood target (answer + end-of-turn text). Rows whose last turn is not an
    assistant answer cannot be scored and are skipped."""
    items: list[dict[str, Any]] = []
    eos = tokenizer.eos_token or ""
    with open(validation_path, encoding="utf-8") as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            row = json.loads(line)
            messages = row["messages"]
            if not messages or messages[-1]["role"] != "assistant":
                continue
            answer = messages[-1]["content"]
            user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
            items.append(
                {
                    "id": str(row.get("id", n)),
                    "prompt": render_prompt(tokenizer, messages),
                    "question": user,
                    "answer": answer,
                    "target": answer + eos,
                }
            )
            if limit is not None and len(items) >= limit:
                break
    if not items:
        raise EvalError(f"no scorable held-out rows in {validation_path}")
    return items


def task_configs(
    name: str, data_file: Path, stop: list[str], max_new_tokens: int
) -> dict[str, dict[str, Any]]:
    """The two lm-eval task configs (YAML-ready dicts) over ``data_file``."""
    common = {
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "num_fewshot": 0,
        "doc_to_text": "prompt",
        "metadata": {"version": 1.0},
    }
    gen = {
        "task": f"{name}_gen",
        **common,
        "output_type": "generate_until",
        "doc_to_target": "answer",
        "generation_kwargs": {
            "until": stop,
            "max_gen_toks": max_new_tokens,
            "do_sample": False,
            "temperature": 0.0,
        },
        # lm-eval decodes without special tokens; whitespace at the start is not an answer.
        "filter_list": [
            {
                "name": "none",
                "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}],
            }
        ],
        "process_results": "!function utils.process_results",
        "metric_list": [
            {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True},
            {"metric": "f1", "aggregation": "mean", "higher_is_better": True},
        ],
    }
    ll = {
        "task": f"{name}_ll",
        **common,
        "output_type": "loglikelihood",
        "doc_to_target": "target",
        # The prompt ends with the generation prompt; the answer follows with no space.
        "target_delimiter": "",
        "metric_list": [
            {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
        ],
    }
    return {"gen": gen, "ll": ll}


def write_task_folder(
    folder: Path, items: list[dict[str, Any]], stop: list[str], max_new_tokens: int
) -> tuple[str, str]:
    """Write data + YAMLs + utils.py; returns the (generate, loglikelihood) task names.

    Task names carry the folder name so that two folders (candidate and champion
    templates) never register the same task twice."""
    folder.mkdir(parents=True, exist_ok=True)
    data_file = folder / "heldout.jsonl"
    with open(data_file, "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps(it, ensure_ascii=False) + "\n")
    name = f"{TASK_PREFIX}_{folder.name}".replace("-", "_")
    configs = task_configs(name, data_file, stop, max_new_tokens)
    for key, conf in configs.items():
        text = yaml.safe_dump(conf, sort_keys=False, allow_unicode=True)
        # `!function` is a YAML tag lm-eval resolves; safe_dump would quote it.
        text = text.replace("'!function utils.process_results'", "!function utils.process_results")
        (folder / f"{name}_{key}.yaml").write_text(text, encoding="utf-8")
    shutil.copyfile(eval_metrics.__file__, folder / "utils.py")
    return configs["gen"]["task"], configs["ll"]["task"]
