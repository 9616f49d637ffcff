"""The chitchat_reply task's data, read from beside this file (lm-eval imports it through the
task YAML's ``custom_dataset: !function utils.load_chitchat_reply``), so the task runs from any
working directory."""

from pathlib import Path

import datasets


def load_chitchat_reply(**_: object) -> dict[str, datasets.Dataset]:
    return {"test": datasets.Dataset.from_json(str(Path(__file__).with_name("chitchat_reply.json")))}
