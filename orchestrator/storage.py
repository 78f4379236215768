"""A run's directory under `storage_path`: local disk, NFS, or any pyarrow filesystem URI (s3://, gs://, hdfs://).

Ray Train keeps checkpoints and run state there; the orchestrator adds three small files: `experiment.yaml` (the
recipe being run, compared on resume), `mlflow_run.json` (the MLflow run it continues) and, while a driver runs
it, `orchestrator.lock` (orchestrator/run_lock.py).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    return "://" in path


def absolute(path: str) -> str:
    """Local paths are resolved against the driver's working directory (Ray workers run elsewhere)."""
    return path if is_uri(path) else str(Path(path).expanduser().resolve())


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of a storage path or URI, and the path within it (a local one made absolute)."""
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), absolute(path)


class RunDir:
    def __init__(self, storage_path: str, name: str):
        self.fs, root = filesystem(storage_path)
        self.path = f"{root.rstrip('/')}/{name}"
        self.display = f"{storage_path.rstrip('/')}/{name}"

    def read(self, file: str) -> str | None:
        """The file's text, or None when it does not exist."""
        if self.fs.get_file_info(f"{self.path}/{file}").type == pafs.FileType.NotFound:
            return None
        with self.fs.open_input_stream(f"{self.path}/{file}") as stream:
            return stream.read().decode()

    def write(self, file: str, text: str) -> None:
        self.fs.create_dir(self.path, recursive=True)
        with self.fs.open_output_stream(f"{self.path}/{file}") as stream:
            stream.write(text.encode())

    def __str__(self) -> str:
        return self.display
