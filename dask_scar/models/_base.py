"""What every model provides to the trainer. Pure maths: no Dask in this package.

A model's parameters are named 2-D arrays split by rows into chunks. One training
iteration runs the model's *phases* in order; in each phase

1. every data block computes a :class:`Contribution` (partial sums: a gradient, or
   normal-equation statistics, plus its loss) from the current parameter values;
2. for each parameter chunk updated in that phase, the contributions of all blocks
   are combined for the chunk's rows and :meth:`Model.update` computes the chunk's
   new state (:meth:`Model.update_chunks` sees the chunks together, for optimizers
   that need more than one chunk's rows, such as L-BFGS).

Array code takes ``xp`` (``numpy`` or ``cupy``) so that the same maths runs on both.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
import threading
import types
import warnings
import zlib
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pandas as pd

from ..exceptions import DataError, DataWarning, NotFittedError, ScarError, callers_level

#: The models a fit of this process trains now (their ids), under the lock
#: (:meth:`Model.fitting`).
_FITTING: set[int] = set()
_FITTING_LOCK = threading.Lock()


#: Key of a data block under which a model keeps per-block state between iterations
#: (e.g. LDA's topic assignments): ``block[LOCAL_STATE]``. It is lost with the block's
#: worker (Dask rebuilds the block from lineage without it), so a model must then
#: rebuild it from the current parameters.
LOCAL_STATE = "local"


@dataclass
class ColumnSummary:
    """What one pass over the data learned about a column."""

    name: str
    count: int = 0
    nonfinite: int = 0
    min: float = np.inf
    max: float = -np.inf
    integral: bool = True
    #: The distinct values, for an integer target with at most :data:`DISTINCT_VALUES`
    #: of them (class labels); None otherwise.
    values: frozenset | None = None

    def merge(self, other: ColumnSummary) -> ColumnSummary:
        values = None if self.values is None or other.values is None else self.values | other.values
        return ColumnSummary(
            self.name,
            self.count + other.count,
            self.nonfinite + other.nonfinite,
            min(self.min, other.min),
            max(self.max, other.max),
            self.integral and other.integral,
            values if values is None or len(values) <= DISTINCT_VALUES else None,
        )


#: The most distinct values of an integer target a summary keeps.
DISTINCT_VALUES = 1024


@dataclass
class DataSummary:
    """Rows and per-column summaries of the training data."""

    n_rows: int
    features: list[ColumnSummary]
    target: ColumnSummary | None


@dataclass
class Contribution:
    """One data block's share of a phase: partial sums for some parameters.

    ``parts`` maps a parameter name to whatever :meth:`Model.combine` sums for a
    row range (a dense array of the parameter's shape, or sparse row statistics).
    ``loss`` is the block's summed data loss (None where the phase reports none),
    ``penalty`` the regularisation term of the whole model (same on every block),
    ``count`` the rows it used.
    """

    parts: dict[str, Any]
    count: int
    loss: float | None = None
    penalty: float = 0.0


def objective(contributions: list[Contribution]) -> float:
    """Mean data loss plus penalty over the blocks' contributions (NaN where the phase reports none)."""
    if any(c.loss is None for c in contributions):
        return float("nan")
    return sum(c.loss for c in contributions) / sum(c.count for c in contributions) + contributions[0].penalty


@dataclass
class ParameterSpec:
    """Shape and dtype of a named parameter; chunks split its rows."""

    shape: tuple[int, int]
    dtype: str = "float32"


class Model:
    """Base class of dask_scar models (see the module docstring for the protocol)."""

    #: Parameter names updated by each phase of one iteration, in order.
    phases: tuple[tuple[str, ...], ...] = ()
    #: dtype of the feature matrix handed to :meth:`contribution`.
    feature_dtype: str = "float32"
    #: dtype of the target vector, or None when the model has no separate target.
    target_dtype: str | None = "float32"
    #: Array libraries the model's maths runs on (``Trainer(backend=...)`` names one).
    backends: tuple[str, ...] = ("numpy", "cupy")
    #: Whether a block restored from the store may be extrapolated along its drift
    #: between its last two saved versions (``scar.recovery.extrapolate``): for
    #: parameters that move smoothly with the iterations, not sampled counts.
    extrapolate_restores: bool = True
    #: Whether the model searches its own step: a trial whose loss is too high (or
    #: not finite) is retried shorter, so a high loss is no sign of divergence.
    line_search: bool = False

    def replicate_updates(self, block_rows: int) -> bool:
        """Whether every worker's update task should update every chunk of this one-phase
        model, as replicas (the next contribution then finds all of them on its own
        worker, and recovery finds current copies), when the smallest data block has
        ``block_rows`` rows: True where that costs little next to a contribution."""
        return False

    # -- parameters, scikit-learn style -------------------------------------
    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor arguments, as given (JSON-friendly: a NumPy number as Python's).
        ``deep`` is scikit-learn's (a model holds no other estimator), so that
        ``sklearn.base.clone`` copies a model."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {name: _python(getattr(self, name)) for name in names}

    def set_params(self, **params: Any) -> Model:
        """Change constructor arguments, checked as a fit checks them (a bad value raises
        and changes nothing); returns the model (scikit-learn's convention). A fitted
        model keeps its fitted parameters."""
        current = self.get_params()
        unknown = sorted(set(params) - set(current))
        if unknown:
            raise ValueError(f"{type(self).__name__} has no parameter {', '.join(map(repr, unknown))}: "
                             f"it takes {', '.join(current)}")
        type(self)(**{**current, **params}).check_params()
        for name, value in params.items():
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    # -- data ------------------------------------------------------------------
    def select_columns(
        self, columns: list[str], target: str | None, features: list[str] | None
    ) -> tuple[list[str], str | None]:
        """Feature and target column names to train on, given the frame's columns."""
        if target is None:
            raise DataError(f"{type(self).__name__} needs target=: one of {columns}")
        if features is None:
            features = [c for c in columns if c != target]
        if not features:
            raise DataError(f"{type(self).__name__} needs at least one feature column besides the target {target!r}: "
                            "name them with features=[...]")
        return list(features), target

    def _fixed_columns(self, features: list[str] | None, target: str | None, default_target: str,
                       **columns: str) -> tuple[list[str], str]:
        """``select_columns`` of a model that reads id columns named in the model itself
        (``columns``: parameter name -> column), not chosen with ``features=``."""
        names = list(columns.values())
        named = " and ".join(f"{key}={value!r}" for key, value in columns.items())
        if features is not None and list(features) != names:
            raise DataError(f"{type(self).__name__} reads the columns {named}; "
                            "set them in the model, not with features=")
        target = default_target if target is None else target
        roles: dict[Any, str] = {}
        for role, column in [*columns.items(), ("the target", target)]:
            if column in roles:
                raise DataError(f"{type(self).__name__} would read column {column!r} as {roles[column]} and as "
                                f"{role}: it reads {named}, and the target {target!r}; give each its own column")
            roles[column] = role
        return names, target

    def check_params(self) -> None:
        """Raise ``ValueError`` for a constructor argument the model cannot train with
        (the trainer asks before it reads any data)."""

    def feature_help(self) -> str:
        """What to do about feature columns that do not hold numbers."""
        return (f"{type(self).__name__} needs real numbers. Encode them (e.g. dd.get_dummies or pandas.factorize), "
                "convert numbers held as text (ddf[column] = dd.to_numeric(ddf[column])), or leave them out with "
                "features=[...]")

    def target_help(self) -> str:
        """What to do about a target column that does not hold numbers."""
        return "convert it to numbers (e.g. ddf[column].astype(float)), or name another column with target="

    def setup(self, summary: DataSummary) -> None:
        """Check the data summary (raise :class:`DataError`) and size the parameters."""
        self.check_params()
        self.n_rows_ = summary.n_rows

    def parameter_specs(self) -> dict[str, ParameterSpec]:
        raise NotImplementedError

    def init_rows(self, name: str, start: int, stop: int, xp: types.ModuleType = np) -> Any:
        """Initial value of rows ``start:stop`` of parameter ``name``.

        Deterministic and independent of how the rows are chunked, so a chunk can
        be re-created alone (and a single-process run starts from the same point).
        """
        spec = self.parameter_specs()[name]
        return xp.zeros((stop - start, spec.shape[1]), dtype=spec.dtype)

    def phase_inputs(self, phase: int) -> tuple[str, ...]:
        """Parameters whose full value the contributions of ``phase`` read."""
        return tuple(self.parameter_specs())

    # -- maths -------------------------------------------------------------------
    def contribution(
        self, phase: int, block: dict[str, Any], params: dict[str, Any], xp: types.ModuleType,
        iteration: int = 0, block_id: int = 0,
    ) -> Contribution:
        raise NotImplementedError

    def combine(self, name: str, parts: list[Any], start: int, stop: int, xp: types.ModuleType) -> Any:
        """Sum of the contributions' ``parts`` for rows ``start:stop`` of ``name``."""
        total = parts[0][start:stop].copy()
        for part in parts[1:]:
            total += part[start:stop]
        return total

    def new_state(self, name: str, value: Any) -> dict[str, Any]:
        """Per-chunk state kept with a parameter chunk (its value plus optimizer slots)."""
        return {"value": value}

    def restore_slots(self, state: dict[str, Any], step: Any) -> None:
        """Seed the optimizer slots of ``state``, a chunk restored from the store along its
        blocks' drift, from ``step``: its rows' estimated step per iteration (an array
        like its value; zero for blocks with no drift to go by). By default the slots
        keep their fresh values."""

    def update(
        self, name: str, state: dict[str, Any], total: Any, count: int, start: int, stop: int,
        xp: types.ModuleType,
    ) -> dict[str, Any]:
        """New state of rows ``start:stop`` of ``name`` from the combined contribution."""
        raise NotImplementedError

    def update_chunks(self, states: dict[Any, dict[str, Any]], totals: dict[Any, Any], count: int,
                      loss: float, xp: types.ModuleType) -> dict[Any, dict[str, Any]]:
        """New states of the chunks one update task holds: every chunk of the phase's
        parameters where updates are replicated, else the worker's own.

        ``states`` and ``totals`` are keyed by chunk ids (``name``, ``start``, ``stop``);
        ``loss`` is the objective at the current values (mean data loss + penalty).
        By default, :meth:`update` for each chunk on its own.
        """
        return {c: self.update(c.name, states[c], totals[c], count, c.start, c.stop, xp) for c in states}

    def apply(self, states: dict[Any, dict[str, Any]], contributions: list[Contribution],
              xp: types.ModuleType) -> tuple[dict[Any, dict[str, Any]], float]:
        """The blocks' ``contributions`` combined for each chunk of ``states`` and handed
        to :meth:`update_chunks`; returns the new states and the objective."""
        totals = {c: self.combine(c.name, [part.parts[c.name] for part in contributions], c.start, c.stop, xp)
                  for c in states}
        loss = objective(contributions)
        return self.update_chunks(states, totals, sum(c.count for c in contributions), loss, xp), loss

    def fitted_value(self, state: dict[str, Any]) -> Any:
        """The value a fitted model keeps from a chunk's final state."""
        return state["value"]

    # -- fitted model --------------------------------------------------------------
    @contextlib.contextmanager
    def fitting(self) -> Iterator[None]:
        """Around a fit: one that raises (bad data, a store for another model, an
        interrupt) leaves the fitted attributes (``name_``) as they were before it, so
        a fitted model stays fitted and consistent, and an unfitted one unfitted.
        A model fits one fit at a time: two at once (two threads, or a fit in another's
        callback) would set, and on an error take back, each other's attributes."""
        def fitted() -> dict[str, Any]:
            return {k: v for k, v in vars(self).items() if k.endswith("_") and not k.startswith("_")}

        with _FITTING_LOCK:
            if id(self) in _FITTING:
                raise ScarError(f"this {type(self).__name__} is being fitted by another fit (another thread, or a "
                                "fit whose callback this is): fit a copy of it, sklearn.base.clone(model) or "
                                f"{type(self).__name__}(**model.get_params()), or wait for that fit to end")
            _FITTING.add(id(self))
        before = fitted()
        try:
            yield
        except BaseException:
            for name in fitted():
                delattr(self, name)
            vars(self).update(before)
            raise
        finally:
            with _FITTING_LOCK:
                _FITTING.discard(id(self))

    def _fitted(self) -> dict[str, np.ndarray]:
        params = getattr(self, "params_", None)
        if params is None:
            raise NotFittedError(f"{type(self).__name__} is not fitted yet: call Trainer(...).fit(...) first")
        return params


def stable_seed(*parts: Any) -> list[int]:
    """A seed sequence from ints and strings that is the same in every process."""
    return [int(p) if isinstance(p, numbers.Integral) else zlib.crc32(str(p).encode()) for p in parts]


def _python(value: Any) -> Any:
    """A NumPy scalar as the Python number it holds (``np.int64(500)`` from a grid)."""
    return value.item() if isinstance(value, np.generic) else value


def check_number(name: str, value: Any, low: float = -np.inf, high: float = np.inf, *,
                 integer: bool = False, low_open: bool = False, high_open: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number (an integer if
    ``integer``) within ``low``..``high`` (bounds excluded where ``*_open``)."""
    kind = numbers.Integral if integer else numbers.Real
    ok = isinstance(value, kind) and not isinstance(value, bool) and (
        isinstance(value, numbers.Integral) or math.isfinite(value)) and (
        (low < value if low_open else low <= value) and (value < high if high_open else value <= high))
    if not ok:
        what = "an integer" if integer else "a finite number"
        if low > -np.inf:
            what += f" {'>' if low_open else '>='} {low:g}"
        if high < np.inf:
            what += f"{' and' if low > -np.inf else ''} {'<' if high_open else '<='} {high:g}"
        raise ValueError(f"{name} must be {what}, got {value!r}")


def numeric(dtype) -> bool:
    """Real numbers or booleans (complex numbers would lose their imaginary part)."""
    return ((pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype))
            and not pd.api.types.is_complex_dtype(dtype))


def require_numeric(dtypes: Any, columns: list, fix: str) -> None:
    """:class:`DataError` naming the ``columns`` whose ``dtypes`` are not real numbers, and ``fix``."""
    bad = [c for c in columns if not numeric(dtypes[c])]
    if bad:
        raise DataError(f"column(s) {', '.join(f'{c!r} ({dtypes[c]})' for c in bad)} are not numeric; {fix}")


def is_column_name(value: Any) -> bool:
    """Whether ``value`` can name a column (a string, a number, a tuple), rather than hold
    labels (a list, an array, a pandas or Dask Series)."""
    return pd.api.types.is_hashable(value) and not hasattr(value, "compute")


def require_unique(columns: Any, needed: list) -> None:
    """:class:`DataError` naming the ``needed`` columns that appear more than once among ``columns``."""
    names = pd.Index(columns)
    twice = sorted({str(c) for c in names[names.duplicated()] if c in needed})
    if twice:
        raise DataError(f"the data has more than one column named {', '.join(map(repr, twice))}: "
                        "rename them (ddf.columns = [...]) so that every column name is unique")


def require_columns(columns: Any, needed: list, why: str) -> None:
    """:class:`DataError` naming the ``needed`` columns not among ``columns``, and ``why``
    (what the caller says after "not in the data"), or those among them that appear more
    than once (:func:`require_unique`)."""
    missing = [c for c in needed if c not in columns]
    if missing:
        raise DataError(f"column(s) {missing} not in the data{why}")
    require_unique(columns, needed)


#: :meth:`Model.feature_help` of the models whose columns hold ids
ID_HELP = ("{model} reads integer ids 0, 1, 2, ...: encode them (column.cat.codes for a category column, "
           "or codes, uniques = pandas.factorize(column))")


def check_integers(column: ColumnSummary, what: str, fix: str = " Encode it, e.g. with pandas.factorize") -> None:
    """:class:`DataError` unless ``column`` holds non-negative integers (``what``: ids,
    labels...; ``fix``: what to do about it)."""
    if column.min < 0 or not column.integral:
        found = "negative values" if column.min < 0 else "non-integer values"
        raise DataError(f"column {column.name!r} must hold {what} 0, 1, 2, ...; found {found} "
                        f"(min {column.min:.17g}, max {column.max:.17g}).{fix}")


def check_ids(column: ColumnSummary, n_rows: int, what: str) -> int:
    """The number of rows a parameter indexed by ``column``'s non-negative integer ids
    needs (its largest id + 1); :class:`DataError` where the ids are not such, or are
    so sparse that the parameter would hold far more rows than the data (an id column
    that was never encoded, or one stray value)."""
    check_integers(column, what)
    size = int(column.max) + 1
    if size > MAX_IDS_PER_ROW * n_rows:
        said = (f"column {column.name!r} holds {what} up to {column.max:,.0f}: the model would need {size:,} of "
                f"them for {n_rows:,} rows. Encode the column as 0, 1, 2, ... (e.g. codes, values = "
                "pandas.factorize(column)), or drop the rows with stray values")
        if size > MAX_IDS_ANYWAY:
            raise DataError(said)
        warnings.warn(said.replace("would need", "trains"), DataWarning, stacklevel=callers_level())
    return size


#: :func:`check_ids` warns of ids that size a parameter beyond this many rows per data
#: row, and refuses them beyond :data:`MAX_IDS_ANYWAY` rows too.
MAX_IDS_PER_ROW, MAX_IDS_ANYWAY = 10, 1_000_000


def score_with(model: Model, data: Any, target: Any, metric, valid=np.isfinite, what: str = "finite numbers",
               finish=float) -> float:
    """``finish(metric(predictions, labels))`` as a float; lazy (Dask) inputs are computed
    once: a column of Dask data in the same tasks as the predictions
    (:func:`predicted_with`), other Dask labels partition by partition (:func:`side_by_side`).
    ``metric`` reduces the rows (lazily, for Dask inputs); ``finish`` runs here, on
    its computed value, only once the labels passed: arithmetic that bad labels would
    break (a division) goes there, so they raise :class:`DataError` and no NumPy warning.
    :class:`DataError` where the labels are not numbers, or some fail ``valid`` (an
    elementwise test; ``what`` the labels must be), or there are none."""
    columns = list(getattr(data, "columns", ()))
    # a name (a string, a number), or a tuple that names a column; other tuples are labels
    column = is_column_name(target) and (np.ndim(target) == 0 or target in columns)
    if column:
        require_columns(columns, [target], f"; available columns: {columns}")
        labels, name = data[target], f"the target column {target!r}"
    else:
        labels, name = (target if hasattr(target, "compute") else np.asarray(target)), "the labels"
        if labels.ndim != 1:
            raise DataError(f"the labels must be one column (a Series, or a 1-d array), got {type(target).__name__} "
                            f"of {labels.ndim} dimensions: pass the column itself (df['label']) or its name")
    if not numeric(labels.dtype):
        raise DataError(f"{name} ({labels.dtype}): score needs {what}")
    labels = labels.astype(np.float64)      # nullable integers: NA becomes NaN, and fails ``valid``
    pred = model.predict(data)
    if hasattr(pred, "map_partitions") and hasattr(labels, "map_partitions"):   # both Dask's: one computation
        from dask import compute

        pred, labels = predicted_with(model, data, target) if column else side_by_side(pred, labels)
        value, bad, count = compute(metric(pred, labels), (~valid(labels)).sum(), labels.size)
    else:
        pred, labels = (np.asarray(x.compute() if hasattr(x, "compute") else x) for x in (pred, labels))
        if pred.shape != labels.shape:
            raise DataError(f"{len(labels):,} labels for {len(pred):,} rows of data")
        with np.errstate(invalid="ignore"):
            bad, count = (~valid(labels)).sum(), labels.size
        value = metric(pred, labels) if count and not bad else np.nan
    if not count:
        raise DataError("no rows to score")
    if bad:
        raise DataError(f"{name}: {bad:,} of {count:,} values are not {what} (NaN, inf or out of range); "
                        "drop or fix those rows before scoring")
    return float(finish(value))


def predicted_with(model: Model, data: Any, target: Any) -> tuple[Any, Any]:
    """Lazy predictions of ``model`` for the Dask frame ``data`` and its column ``target``
    (as float64, NA as NaN), made by one task per partition. Not the predictions beside
    ``data[target]``: Dask plans a column's read apart from the whole frame's, and may
    read a Parquet dataset of several files into fewer partitions for it."""

    def pair(frame: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame({"pred": np.asarray(model.predict(frame)),
                             "label": frame[target].to_numpy(np.float64, na_value=np.nan)}, index=frame.index)

    both = data.map_partitions(pair, meta=pair(data._meta))
    return both["pred"], both["label"]


def side_by_side(pred: Any, labels: Any) -> tuple[Any, Any]:
    """Lazy predictions and labels (Dask Series) as two columns of one frame, each partition
    of the labels beside the same partition of the predictions, whatever their indexes
    (as labels in memory are taken in order). :class:`DataError` where they do not line
    up: another number of partitions (here, as Dask will read them), or of rows in a
    partition (when computed)."""
    fix = ("pass the target's column name (score(ddf, 'label')), or labels with the same partitions as the data "
           "(Dask may read a column of a Parquet dataset into fewer partitions than the whole frame: its name "
           "avoids that)")
    pred, labels = pred.optimize(), labels.optimize()
    if labels.npartitions != pred.npartitions:
        raise DataError(f"the labels have {labels.npartitions} partitions, the data {pred.npartitions}: {fix}")

    def pair(pred: pd.Series, labels: pd.Series) -> pd.DataFrame:
        if len(pred) != len(labels):
            raise DataError(f"a partition of the data has {len(pred):,} rows, its labels {len(labels):,}: {fix}")
        return pd.DataFrame({"pred": pred.to_numpy(), "label": labels.to_numpy()}, index=pred.index)

    both = pred.map_partitions(pair, labels, align_dataframes=False, meta=pair(pred._meta, labels._meta))
    return both["pred"], both["label"]
