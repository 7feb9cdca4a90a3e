"""Access to the files in policies/, installed (as the sandboxd.policies package) or in a checkout."""

from __future__ import annotations


def read_policy_file(filename: str) -> str:
    from importlib import resources  # imported on use: the zygote, which never calls this, stays small

    try:
        return resources.files("sandboxd.policies").joinpath(filename).read_text(encoding="utf-8")
    except ModuleNotFoundError:
        from pathlib import Path

        # Running from a source tree on sys.path: policies/ sits beside the package.
        return (Path(__file__).resolve().parent.parent / "policies" / filename).read_text(encoding="utf-8")
