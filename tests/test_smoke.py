import importlib

def test_packages_import():
    for name in ["bus", "tensors", "policies", "actors", "launcher"]:
        assert importlib.import_module(name).__name__ == name
