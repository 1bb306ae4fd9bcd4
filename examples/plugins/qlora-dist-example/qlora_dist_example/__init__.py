"""An example qlora-dist plugin package: a data format and a callback, registered through entry points.

- ``data.format: qa`` reads rows with ``question`` and ``answer`` columns; the loss falls on the answer only.
- ``train.callbacks: [loss_log]`` appends every step's loss to ``<output.dir>/loss_log.jsonl`` (main process)
  and writes ``loss_log_done.json`` when the run ends.
- ``train.callbacks: ["qlora_dist_example:stop_after_3"]`` (an object by import path) ends a run cleanly after
  three optimizer steps.
"""

from __future__ import annotations

import json

from qlora_dist.formats import DataFormat

PROMPT = "Question: {question}\nAnswer: "


def tokenize_qa(row, tokenizer):
    """Prompt tokens take no loss; answer tokens and the closing eos do."""
    prompt = tokenizer(PROMPT.format(question=row["question"]))["input_ids"]
    answer = tokenizer(row["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt + answer, [-100] * len(prompt) + answer


def validate_qa(row):
    for column in ("question", "answer"):
        if not isinstance(row.get(column), str) or not row[column]:
            raise ValueError(f"field {column!r} must be a non-empty string")


QA_FORMAT = DataFormat(columns=("question", "answer"), tokenize=tokenize_qa, validate=validate_qa)


class LossLog:
    """Logs the loss of every optimizer step to a file of its own."""

    def on_step_end(self, event):
        if event.is_main_process:
            with (event.output_dir / "loss_log.jsonl").open("a") as f:
                f.write(json.dumps({"step": event.step, "loss": event.metrics["loss"]}) + "\n")

    def on_run_end(self, event):
        (event.output_dir / "loss_log_done.json").write_text(json.dumps({"steps": event.step}))


class StopAfter:
    """Ends the run after ``steps`` optimizer steps (a clean stop: checkpoint, merge and report as usual)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_step_end(self, event):
        if event.step >= self.steps:
            event.stop = True


stop_after_3 = StopAfter(3)
