"""Console scripts that need the `train` extra: on a base install (a Pi) they say so in one line."""

from __future__ import annotations

import sys


def _require_train_extra(command: str) -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        sys.stderr.write(f"error: {command} needs the train extra (torch): pip install 'itera-lite[train]'\n")
        sys.exit(1)


def train() -> None:
    _require_train_extra("itera-train")
    if sys.argv[1:2] == ["retrieval-index"]:  # a subcommand beside the training options
        from .cli import retrieval_index

        retrieval_index(args=sys.argv[2:], prog_name="itera-train retrieval-index")
        return
    from .cli import main

    main()


def export() -> None:
    _require_train_extra("itera-export")
    from itera_export.cli import main

    main()


def pipeline() -> None:
    _require_train_extra("itera-pipeline")
    from .pipeline import main

    main()
