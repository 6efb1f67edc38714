"""Names inside an output root OUT (README "Architecture": output contract), in one place."""

from __future__ import annotations

from dataclasses import dataclass

from semclip_batch.io.storage import join


@dataclass(frozen=True)
class OutLayout:
    root: str

    @property
    def predictions(self) -> str:
        return join(self.root, "predictions")

    @property
    def masks(self) -> str:
        return join(self.root, "masks.zarr")

    @property
    def lot_stats(self) -> str:
        return join(self.root, "lot_stats")

    @property
    def excursions(self) -> str:
        return join(self.root, "excursions")

    @property
    def lot_times(self) -> str:
        """``lot_id, lot_time`` of the manifest's lots (when it has lot_time), for excursion limits."""
        return join(self.state, "lot_times.parquet")

    @property
    def reports(self) -> str:
        return join(self.root, "reports")

    @property
    def metrics(self) -> str:
        return join(self.root, "metrics.json")

    @property
    def runs(self) -> str:
        return join(self.root, "runs")

    @property
    def state(self) -> str:
        """Shard plan and done markers (removed by ``--overwrite``)."""
        return join(self.root, "_state")

    @property
    def plan(self) -> str:
        """The shard plan: Parquet files of whole shards, read by Ray as the pipeline's input."""
        return join(self.state, "plan")

    def plan_file(self, number: int) -> str:
        return join(self.plan, f"p{number:05d}.parquet")

    @property
    def run_info(self) -> str:
        return join(self.state, "run.json")

    def marker(self, lot_id: str, shard: str) -> str:
        return join(self.state, "done", lot_id, f"{shard}.json")

    @property
    def markers(self) -> str:
        return join(self.state, "done")

    def prediction_folder(self, lot_id: str) -> str:
        return join(self.predictions, f"lot_id={lot_id}")

    def prediction_file(self, lot_id: str, shard: str) -> str:
        """A finalised shard's one Parquet file."""
        return join(self.prediction_folder(lot_id), f"{shard}.parquet")

    @property
    def parts(self) -> str:
        """Writers' parts of shards not yet finalised (kept out of ``predictions/`` so readers never see them)."""
        return join(self.state, "parts")

    def shard_parts(self, lot_id: str, shard: str) -> str:
        return join(self.parts, lot_id, shard)

    def part_file(self, lot_id: str, shard: str, part: str) -> str:
        return join(self.shard_parts(lot_id, shard), f"{part}.parquet")

    def attempt(self, run_id: str, attempt: int) -> str:
        return join(self.runs, run_id, f"attempt-{attempt}.json")

    def owned_outputs(self) -> list[str]:
        """What ``--overwrite`` deletes (``runs/`` is kept)."""
        # the state first: a kill part-way must not leave markers that vouch for outputs already removed
        return [self.state, self.predictions, self.masks, self.lot_stats, self.excursions, self.reports, self.metrics]
