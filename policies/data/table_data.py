"""Problems from JSON, parquet and arrow files and saved dataset directories, through `datasets`.

What a TRL or verl user has on disk is usually a `datasets` artefact: a parquet dump of GSM8K, a
`save_to_disk` directory, a JSON array. This reads them offline (HF_DATASETS_OFFLINE: nothing is
ever downloaded) and runs every row through the same parser as the JSONL reader
(policies.data.rows), so the key mapping, the answer formats, the unique-id rule and
`skip_malformed` behave alike; errors name the file and the row (0-based, as `dataset[i]`).
"""
from __future__ import annotations

import os
from pathlib import Path

from policies.data.records import DatasetError, Layout, Records
from policies.data.rows import problem_parser, read_rows

BUILDERS = {".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
SAVED_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")
TABLE_SUFFIXES = tuple(BUILDERS)


def open_table(path: Path, split: str = "train"):
    """A `datasets.Dataset` for a file (by suffix) or a `save_to_disk` directory; DatasetError if not."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - a dependency of the project
        raise DatasetError(f"{path}: reading it needs the `datasets` package ({e})") from None
    datasets.disable_progress_bars()
    if path.is_dir():
        if not any((path / m).is_file() for m in SAVED_MARKERS):
            raise DatasetError(f"{path}: a directory, but not one written by datasets' save_to_disk "
                               f"(none of {', '.join(SAVED_MARKERS)})")
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:
            raise DatasetError(f"{path}: cannot load the saved dataset: {type(e).__name__}: {e}") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DatasetError(f"{path}: no split {split!r} (data.split); it has {', '.join(ds)}")
            ds = ds[split]
        return ds
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DatasetError(f"{path}: unknown file type {path.suffix!r}; expected .jsonl, "
                           f"{', '.join(BUILDERS)} or a saved dataset directory")
    if not path.is_file():
        raise DatasetError(f"{path}: cannot read: No such file or directory")
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:
        raise DatasetError(f"{path}: cannot read as {builder}: {type(e).__name__}: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def load_table_problems(path: Path, layout: Layout, *, skip_malformed: bool = False) -> Records:
    """Every row of the table as a `Problem` (see policies.data.dataset.load_problems)."""
    ds = open_table(path, layout.split)
    parse = problem_parser(path.name, layout, unit="row")
    rows = ((f"{path}: row {i}", i, lambda row=row: dict(row)) for i, row in enumerate(ds))
    return read_rows(rows, parse, source=path, unit="row", skip_malformed=skip_malformed,
                     empty_note=f"; its columns: {', '.join(ds.column_names)}")
