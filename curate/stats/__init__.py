"""Per-shard statistics of a run, mergeable across shards; loading, plots, run diffs.

Every run writes, next to its outputs (after ``manifest.json``), one stats file per
output shard and rejects file and ``stats/summary.json``, the merged totals; see
:mod:`curate.stats.run`.  The package is split by concern:

- :mod:`curate.stats.records`: fixed-bin histograms, the records of rows and of
  rejected rows, their exact merge, quantiles and means read back from them;
- :mod:`curate.stats.run`: measuring a run's files in Ray tasks, writing the stats
  files and the summary, and :class:`RunStats` to read a finished run back;
- :mod:`curate.stats.plots`: matplotlib figures of a run (funnel, scores, mixture);
- :mod:`curate.stats.diff`: what changed between two runs, manifests and records.

Every public name is re-exported here: ``from curate.stats import X`` works for all.
"""

from curate.stats.diff import (
    compare_ids,
    diff_manifests,
    diff_records,
    flatten,
    id_files,
    read_ids,
    spec_changes,
    spec_unified_diff,
)
from curate.stats.plots import plot_funnel, plot_mixture, plot_scores, png_bytes, write_plots
from curate.stats.records import (
    TINY,
    Array,
    Record,
    bin_edges,
    bin_width,
    column_stats,
    dumps,
    histogram,
    integral,
    mean,
    merge,
    merge_all,
    quantile,
    rejects_record,
    table_record,
)
from curate.stats.run import (
    BATCH_ROWS,
    FORMAT,
    MIX_SCHEMA,
    SHARD_SCHEMA,
    STATS_DIR,
    FileJob,
    RunStats,
    file_jobs,
    file_record,
    measure_file,
    run_options,
    stats_path,
    write_run_stats,
)

__all__ = [
    "BATCH_ROWS",
    "FORMAT",
    "MIX_SCHEMA",
    "SHARD_SCHEMA",
    "STATS_DIR",
    "TINY",
    "Array",
    "FileJob",
    "Record",
    "RunStats",
    "bin_edges",
    "bin_width",
    "column_stats",
    "compare_ids",
    "diff_manifests",
    "diff_records",
    "dumps",
    "file_jobs",
    "file_record",
    "flatten",
    "histogram",
    "id_files",
    "integral",
    "mean",
    "measure_file",
    "merge",
    "merge_all",
    "plot_funnel",
    "plot_mixture",
    "plot_scores",
    "png_bytes",
    "quantile",
    "read_ids",
    "rejects_record",
    "run_options",
    "spec_changes",
    "spec_unified_diff",
    "stats_path",
    "table_record",
    "write_plots",
    "write_run_stats",
]
