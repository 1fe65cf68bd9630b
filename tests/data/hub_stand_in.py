"""A stand-in for the Hugging Face hub's ScienceQA: tiny Datasets with the hub's columns."""

import datasets

HUB_COLUMNS = ["image", "question", "choices", "answer", "hint", "task", "grade", "subject",
               "topic", "category", "skill", "lecture", "solution"]


def hub_split(n, offset=0):
    """A tiny Dataset with the hub's columns. Image bytes are not a real image, so any
    attempt to decode them would raise: loading must never decode."""
    features = datasets.Features({
        "image": datasets.Image(), "question": datasets.Value("string"),
        "choices": datasets.Sequence(datasets.Value("string")), "answer": datasets.Value("int8"),
        **{name: datasets.Value("string") for name in HUB_COLUMNS[4:]},
    })
    rows = {name: [] for name in HUB_COLUMNS}
    for i in range(n):
        k = i + offset
        rows["image"].append({"bytes": b"not an image", "path": None} if k % 3 == 0 else None)
        rows["question"].append(f"Question {k}?")
        rows["choices"].append([f"c{k}a", f"c{k}b", f"c{k}c"][: 2 + k % 2])
        rows["answer"].append(k % 2)
        rows["hint"].append("" if k % 2 else f"Hint {k}.")
        for name in ("task", "grade", "subject", "topic", "category", "skill"):
            rows[name].append(f"{name}{k}")
        rows["lecture"].append(f"Lecture {k}." if k % 4 else "")
        rows["solution"].append(f"Solution {k}.")
    return datasets.Dataset.from_dict(rows, features=features)
