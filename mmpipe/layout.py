"""Where each stage reads and writes, relative to the project directory (what dvc.yaml declares)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    """Output locations of every stage under one project directory ``root``."""

    root: Path = Path(".")

    @property
    def ingest_dir(self) -> Path:
        """records.parquet, images.parquet, rejects.jsonl, report.json (+ source/ for synthetic)."""
        return self.root / "data" / "ingest"

    @property
    def align_dir(self) -> Path:
        """pairs.parquet, orphans.jsonl, report.json."""
        return self.root / "data" / "align"

    @property
    def shard_dir(self) -> Path:
        """{train,val,test}-NNNNNN.tar + manifest.json."""
        return self.root / "data" / "shards"

    @property
    def model_dir(self) -> Path:
        """last.pt, best.pt, train_report.json."""
        return self.root / "models"

    @property
    def eval_dir(self) -> Path:
        """metrics.json, ablation.json, plots/."""
        return self.root / "reports"

    @property
    def state_dir(self) -> Path:
        """Local service state: mlflow.db, mlartifacts/, prefect/ (never committed)."""
        return self.root / ".mmpipe"
