"""Test order: the slowest files first, so that `pytest -n 2 --dist loadfile` (make test) packs
the two workers evenly instead of ending on one long file."""

SLOWEST_FIRST = (
    "test_multihost.py", "test_train.py", "test_quickstart.py", "test_train_tokenizer.py",
    "test_planning.py", "test_remote_workdir.py", "test_benchmarks.py", "test_inception.py",
    "test_vqgan.py", "test_transformer.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise
