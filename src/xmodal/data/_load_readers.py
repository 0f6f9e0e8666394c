"""Import every reader module so that each registers itself in ``DATASETS``."""
import importlib

for _name in ("precomp", "karpathy", "vinvl", "foodiml", "recipe1m", "table", "emoji"):
    try:
        importlib.import_module(f"{__package__}.{_name}")
    except ModuleNotFoundError as exc:  # a reader not written yet, or its optional dependency
        if exc.name and exc.name.startswith(f"{__package__}.{_name}"):
            continue
        raise
