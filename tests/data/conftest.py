"""Fixtures of the data tests: the hub's load_dataset answered by a stand-in."""

import datasets
import pytest

from tests.data.hub_stand_in import hub_split


@pytest.fixture
def fake_hub(monkeypatch):
    hub = datasets.DatasetDict({"train": hub_split(30), "validation": hub_split(9, 100), "test": hub_split(8, 200)})
    calls = []

    def load_dataset(path, *args, revision=None, split=None, **kwargs):
        calls.append({"path": path, "args": args, "revision": revision, "split": split, **kwargs})
        return hub[split] if split is not None else hub

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return hub, calls
