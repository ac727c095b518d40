"""KuaiRand-Pure (Kuaishou short-video logs with many feedback signals).

The raw ``data/`` directory of KuaiRand-Pure holds ``log_standard_*_pure.csv``
(the standard, non-randomised exposure logs), ``user_features_pure.csv`` and
``video_features_basic_pure.csv``. The loader joins the logs with both feature
tables (or reads the joined file that ``datasets/kuairand/prepare.py`` writes)
and keeps only information available at request time: watch durations, stay
times and other post-exposure signals are dropped, since they leak the labels.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import polars as pl

from mtl.data.features import ColumnRoles
from mtl.data.sources.base import SourceData, read_table, require_file, resolve_path, validate_frame
from mtl.data.validation import check_row_limit, check_unique

KUAIRAND_TASKS: tuple[str, ...] = (
    "is_click",
    "long_view",
    "is_like",
    "is_follow",
    "is_comment",
    "is_forward",
    "is_hate",
)
DEFAULT_TASKS: tuple[str, ...] = ("is_click", "long_view", "is_like", "is_follow")
PREPARED_FILE = "kuairand_pure.parquet"
USER_FILE, VIDEO_FILE, LOG_GLOB = (
    "user_features_pure.csv",
    "video_features_basic_pure.csv",
    "log_standard_*.csv",
)

_LOG_CATEGORICAL = ("user_id", "video_id", "tab", "hour")
_USER_CATEGORICAL = (
    "user_active_degree",
    "is_lowactive_period",
    "is_live_streamer",
    "is_video_author",
    "follow_user_num_range",
    "fans_user_num_range",
    "friend_user_num_range",
    "register_days_range",
    *(f"onehot_feat{i}" for i in range(18)),
)
_VIDEO_CATEGORICAL = (
    "author_id",
    "video_type",
    "upload_type",
    "visible_status",
    "music_type",
    "tag",
)
# Counts and durations are heavy-tailed: log1p before standardisation.
_LOG1P_NUMERIC = (
    "duration_ms",
    "follow_user_num",
    "fans_user_num",
    "friend_user_num",
    "register_days",
)
_HINT = "see datasets/kuairand/README.md (expected the KuaiRand-Pure data/ directory or a prepared file)"


def join_kuairand(root: Path) -> pl.DataFrame:
    """Join the raw standard logs with user and video features (left joins on the ids).

    Example:
        >>> df = join_kuairand(Path("KuaiRand-Pure/data"))  # doctest: +SKIP
    """
    logs = sorted(root.glob(LOG_GLOB))
    if not logs:
        raise FileNotFoundError(f"no {LOG_GLOB} files in {root}; {_HINT}")
    for log in logs:
        require_file(log, "KuaiRand log file")
    user_file = require_file(root / USER_FILE, "KuaiRand user features", _HINT)
    video_file = require_file(root / VIDEO_FILE, "KuaiRand video features", _HINT)
    # Feature tables are small (tens of thousands of rows): infer from all rows;
    # tags look numeric ("28") until a multi-tag row ("10,28") appears.
    users = read_table(user_file, "KuaiRand user features", infer_schema_length=None)
    videos = read_table(
        video_file,
        "KuaiRand video features",
        infer_schema_length=None,
        schema_overrides={"tag": pl.String},
    )
    frames = [read_table(log, "KuaiRand log file", infer_schema_length=10_000) for log in logs]
    log_df = pl.concat(frames, how="diagonal_relaxed")
    video_cols = [c for c in videos.columns if c == "video_id" or c in _VIDEO_CATEGORICAL]
    # Row order must not depend on the join algorithm: splits are drawn over row positions.
    return log_df.join(users, on="user_id", how="left", maintain_order="left", validate="m:1").join(
        videos.select(video_cols), on="video_id", how="left", maintain_order="left", validate="m:1"
    )


def kuairand(
    path: str | os.PathLike[str],
    *,
    tasks: Sequence[str] = DEFAULT_TASKS,
    test_start_date: int | None = 20220501,
    n_rows: int | None = None,
    fill_numeric_nulls: float | None = None,
) -> SourceData:
    """Load KuaiRand-Pure for multi-task ranking.

    Args:
        path: the KuaiRand-Pure ``data/`` directory (raw files or ``kuairand_pure.parquet``
            from ``prepare.py``), or the path of a joined CSV/Parquet file.
        tasks: label columns, a subset of ``is_click, long_view, is_like, is_follow,
            is_comment, is_forward, is_hate``.
        test_start_date: rows with ``date >= test_start_date`` (YYYYMMDD) form the
            test split, a temporal hold-out; None leaves the split to the data module.
        n_rows: keep only the first rows of the joined frame (quick runs).
        fill_numeric_nulls: None (default) raises on null numeric features (e.g. a
            user missing from the feature table); a number fills them.

    Returns:
        :class:`SourceData` with categorical ids and profile fields, log1p-scaled
        numeric counts/durations, binary ``tasks`` and user column ``user_id``.

    Example:
        >>> data = kuairand("KuaiRand-Pure/data", tasks=("is_click", "long_view"))  # doctest: +SKIP
        >>> data.roles.label_names  # doctest: +SKIP
        ['is_click', 'long_view']
    """
    tasks = list(tasks)
    check_unique(tasks, key="tasks")
    check_row_limit(n_rows)
    unknown = [t for t in tasks if t not in KUAIRAND_TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown KuaiRand tasks {unknown}; choose from {list(KUAIRAND_TASKS)}")
    root = resolve_path(path)
    if root.is_dir() and (root / PREPARED_FILE).is_file():
        df, origin = (
            read_table(root / PREPARED_FILE, "KuaiRand prepared file"),
            str(root / PREPARED_FILE),
        )
    elif root.is_dir():
        df, origin = join_kuairand(root), str(root)
    elif root.is_file():
        df, origin = read_table(root, "KuaiRand joined file", infer_schema_length=10_000), str(root)
    else:
        raise FileNotFoundError(f"KuaiRand path not found: {root}; {_HINT}")
    if n_rows is not None:
        df = df.head(n_rows)

    if "hour" not in df.columns and "hourmin" in df.columns:
        df = df.with_columns((pl.col("hourmin") // 100).alias("hour"))
    categorical = [
        c for c in (*_LOG_CATEGORICAL, *_USER_CATEGORICAL, *_VIDEO_CATEGORICAL) if c in df.columns
    ]
    numeric = [c for c in _LOG1P_NUMERIC if c in df.columns]
    for required in ("user_id", "video_id", "date"):
        if required not in df.columns:
            raise ValueError(
                f"{origin}: missing column {required!r} (expected an integer id/date column)"
            )
    roles = ColumnRoles(
        categorical=categorical,
        numeric=numeric,
        labels=dict.fromkeys(tasks, "binary"),
        user_column="user_id",
    )  # type: ignore[arg-type]
    df = validate_frame(
        df.select([*roles.columns(), "date"]),
        roles,
        origin=origin,
        fill_numeric_nulls=fill_numeric_nulls,
    )
    df = df.with_columns([pl.col(c).cast(pl.Float64).clip(lower_bound=0).log1p() for c in numeric])

    if test_start_date is None:
        return SourceData(name="kuairand", train=df, roles=roles, files={"rows": [origin]})
    is_test = pl.col("date") >= test_start_date
    train, test = df.filter(~is_test), df.filter(is_test)
    if train.height == 0 or test.height == 0:
        raise ValueError(
            f"{origin}: test_start_date={test_start_date} leaves {train.height} train and {test.height} test rows "
            f"(dates span {df['date'].min()}..{df['date'].max()}); pick a date inside that range or None"
        )
    return SourceData(
        name="kuairand",
        train=train,
        roles=roles,
        test=test,
        files={"rows": [origin]},
        description=f"kuairand: test is the rows dated {test_start_date} or later",
    )
