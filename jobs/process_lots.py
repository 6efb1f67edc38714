"""Ray job entrypoint: score historical lots on the cluster this job was submitted to.

    ray job submit --runtime-env cluster/runtime_env.yaml --working-dir . -- \\
        python jobs/process_lots.py s3://fab/archive/manifest.parquet --out s3://fab/semclip/2026-11 \\
        --pretrained s3://fab/models/vit-b-16-plus-240.safetensors --actors 8 --num-gpus 1 --aggregate

Same options as ``semclip-batch run``, plus ``--aggregate`` (write lot_stats after the run) and ``--report``
(write OUT/reports/ after that). Inside a Ray job RAY_ADDRESS points at the job's own cluster, so the pipeline
attaches there (never a private local Ray).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the uploaded working dir holds the package

from semclip_batch.cli.options import (
    parse_storage_options,
    print_result,
    report_flag,
    run_config,
    run_options,
    user_errors,
    write_report_line,
)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@run_options
@click.option("--aggregate", "do_aggregate", is_flag=True, help="Also write OUT/lot_stats after the run.")
@report_flag
@user_errors
def main(do_aggregate: bool, report: bool, **options: Any) -> None:
    """Score every row of INPUT into OUT on the job's Ray cluster.

    \b
    Example:
      python jobs/process_lots.py data/manifest.csv --out s3://bucket/out --backbone semclip-tiny \\
          --pretrained none --aggregate --report
    """
    import logging

    from semclip_batch.analysis.aggregate import aggregate
    from semclip_batch.config import LOG_FORMAT
    from semclip_batch.pipeline.driver import run

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    if options["address"] is None and "RAY_ADDRESS" not in os.environ:
        click.echo("note: RAY_ADDRESS is not set (not inside `ray job submit`?); starting a private local Ray", err=True)
    result = run(run_config(**options))
    print_result(result.record, result.out)
    if do_aggregate:
        stats = aggregate(result.out, parse_storage_options(options["storage_option"]))
        click.echo(f"lot_stats: {len(stats)} rows for {stats['lot_id'].nunique()} lots in {result.out}/lot_stats")
    if report:
        write_report_line(result.out, options["storage_option"])


if __name__ == "__main__":
    main()
