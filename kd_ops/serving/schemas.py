"""Request and error bodies of `kd-ops serve`, validated by pydantic; errors name the field."""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

import orjson
from fastapi import Response
from pydantic import BaseModel, ConfigDict, Field, Strict, StringConstraints, TypeAdapter, ValidationError

from kd_ops.prediction_log.feedback import REQUEST_ID_PATTERN

log = logging.getLogger(__name__)


# -- request bodies ---------------------------------------------------------------------------
Finite = Annotated[float, Strict(), Field(allow_inf_nan=False)]  # no "1.5" strings, no bools, no NaN/inf
SLICE_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
SliceName = Annotated[str, StringConstraints(pattern=SLICE_NAME)]
SliceValue = Annotated[str, StringConstraints(max_length=256)]
Slices = dict[SliceName, SliceValue]
Rows = Annotated[list[list[Finite]], Field(min_length=1)]
# A table's records: JSON objects, one per row, values as the user's columns hold them. Parsed as
# any JSON here and checked per value by the handler against the served version's schema (the
# kinds are the version's, not the request model's), so every message names record and column.
Records = Annotated[list[dict[str, Any]], Field(min_length=1)]
Loose = Annotated[list[Any], Field(min_length=1)]  # rows or records: which depends on the served version


class PredictRequest(BaseModel):
    """`rows`: feature rows (raw values, as in training) for a model of images or plain features;
    `records`: for a table model, one JSON object per row keyed by the original column names
    (null for a missing value). Exactly one of the two. `slices`: optional labels to cut the
    traffic by later (one dict for the whole batch, or one per row), e.g. {"site": "berlin"}."""

    model_config = ConfigDict(extra="forbid")
    rows: Rows | None = None
    records: Records | None = None
    slices: Slices | list[Slices] | None = None


class DataframeSplit(BaseModel):
    """pandas' `to_dict(orient="split")`: column names, then rows of values in that order."""

    model_config = ConfigDict(extra="forbid")
    columns: Annotated[list[Any], Field(min_length=1)]  # names (strings or integers), checked by the handler
    data: Annotated[list[list[Any]], Field(min_length=1)]  # numbers for rows, typed values for a table
    index: list[Any] | None = None  # pandas writes one; not used


class InvocationsRequest(BaseModel):
    """MLflow's scoring protocol (`mlflow models serve`): exactly one of the four. Values are
    checked by the handler, against the served version (numbers for rows, typed columns for a table)."""

    model_config = ConfigDict(extra="forbid")
    inputs: Loose | None = None
    instances: Loose | None = None
    dataframe_split: DataframeSplit | None = None
    dataframe_records: Records | None = None


class Label(BaseModel):
    """`label`: a class index (0..classes-1) for a model of rows; the user's own label ("Yes",
    true, 3) for a table model. Checked by the handler against the served version's classes."""

    model_config = ConfigDict(extra="forbid")
    prediction_id: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    label: Any


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    labels: Annotated[list[Label], Field(min_length=1)]
    request_id: Annotated[str, StringConstraints(pattern=REQUEST_ID_PATTERN)] | None = None


_PREDICT = TypeAdapter(PredictRequest)
_INVOCATIONS = TypeAdapter(InvocationsRequest)
_FEEDBACK = TypeAdapter(FeedbackRequest)

# -- response bodies: documentation (the OpenAPI schema); the handlers write JSON with orjson ---
MAX_ERRORS = 20  # problems listed in an error body; `detail` counts them all


class Problem(BaseModel):
    field: str
    message: str


class ErrorBody(BaseModel):
    """Every refusal: `detail` is one line that names the field (and counts all problems), `field`
    the first one, `errors` at most 20 problems."""

    detail: str
    field: str
    errors: Annotated[list[Problem], Field(max_length=MAX_ERRORS)]
    unknown_ids: int | None = Field(None, description="/feedback 422: how many of the ids the log does not hold")


class ModelRef(BaseModel):
    name: str
    version: str
    alias: str


ClassLabel = int | bool | str | float  # a table's classes are the user's labels; a model of rows answers indices


class RowPrediction(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    id: str = Field(description="prediction id: send it back with the true label to /feedback")
    class_: ClassLabel = Field(
        alias="class", description="the class index; for a table model the user's label (as /model's classes)"
    )
    probabilities: list[float] = Field(description="one per class, in the order of /model's classes")
    model_version: str


class PredictResponse(BaseModel):
    model: ModelRef
    predictions: list[RowPrediction]


class InvocationPrediction(BaseModel):
    class_: ClassLabel = Field(
        alias="class", description="the class index; for a table model the user's label (as /model's classes)"
    )
    probabilities: list[float] = Field(description="one per class, in the order of /model's classes")
    prediction_id: str = Field(description="send it back with the true label to /feedback")


class InvocationsResponse(BaseModel):
    predictions: list[InvocationPrediction] = Field(description="per row: class, probabilities, prediction id")
    prediction_ids: list[str] = Field(description="kd-ops: the prediction id of each row, for /feedback")


class FeedbackResponse(BaseModel):
    stored: int
    replayed: bool = Field(False, description="true: this request_id was stored before; nothing new was")


class AliasWatch(BaseModel):
    interval_s: float
    last_checked: str | None
    error: str | None
    swaps: list[dict[str, str]]


class LogHealth(BaseModel):
    store: str
    rows_written: int
    commits: int
    failed_commits: int
    consecutive_failed_commits: int
    last_commit_error: str | None
    queued: int


class Health(BaseModel):
    status: Literal["ok", "degraded", "failing"]
    model: ModelRef
    served_rows: int
    alias_watch: AliasWatch
    log: LogHealth | None
    shadow: dict[str, Any] | None


class ColumnInfo(BaseModel):
    name: str
    kind: Literal["numeric", "categorical", "boolean", "text"]


class ModelInfo(BaseModel):
    name: str
    version: str
    alias: str
    uri: str
    run_id: str | None
    source: str | None
    input: Literal["rows", "records"] = Field(
        description="what /predict takes: feature rows, or (a table model) records keyed by column"
    )
    n_features: int
    n_classes: int
    classes: list[ClassLabel] = Field(
        description="the classes in the order of every `probabilities` list: indices 0..n-1, or a table's labels"
    )
    columns: list[ColumnInfo] | None = Field(description="a table model's columns, in order (else null)")
    slices: list[str]
    loaded_at: str
    lineage: dict[str, str]


class RequestError(Exception):
    """A client error: HTTP status, the field it concerns (`rows[3][7]`), and what is wrong."""

    def __init__(
        self,
        status: int,
        field: str,
        message: str,
        errors: list[dict[str, str]] | None = None,
        extra: dict[str, Any] | None = None,
    ):
        super().__init__(message)
        self.status, self.field, self.message = status, field, message
        self.errors = (errors or [{"field": field, "message": message}])[:MAX_ERRORS]
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        return {"detail": self.message, "field": self.field, "errors": self.errors, **self.extra}


def _field(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def _refusal(exc: ValidationError, prefix: tuple[Any, ...] = ()) -> RequestError:
    """A pydantic error as the 422 every refusal is: fields as `rows[3][7]` (under `prefix`), one
    message per field, the first one in `detail` with a count of the rest."""
    raw = exc.errors(include_url=False)

    def union_branch(e: dict) -> bool:
        # `slices` (one dict, or a list of dicts) reports a type error for the branch not taken,
        # located at the branch's tag ("list[...]"); errors inside the taken branch are kept.
        last = e["loc"][-1] if e["loc"] else None
        return e["type"] in ("list_type", "dict_type") and isinstance(last, str) and "[" in last

    if len(raw) > 1:
        raw = [e for e in raw if not union_branch(e)] or raw
    errors = []
    for err in raw:
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in ("dict", "list"))))
        got = err.get("input")
        shown = f", got {got!r}" if isinstance(got, (str, int, float, bool)) and len(repr(got)) <= 40 else ""
        errors.append({"field": _field((*prefix, *loc)), "message": err["msg"] + shown})
    errors = list({(e["field"], e["message"]): e for e in errors}.values())
    first = errors[0]
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return RequestError(422, first["field"], f"{first['field']}: {first['message']}{more}", errors)


def _parse(adapter: TypeAdapter, body: bytes) -> Any:
    try:
        return adapter.validate_json(body)
    except ValidationError as exc:
        raise _refusal(exc) from None


def _check(adapter: TypeAdapter, value: Any, *prefix: Any) -> Any:
    """`value` (already parsed from JSON) validated by `adapter`; errors located under `prefix`:
    the second stage of a body whose shape depends on the served version (rows or records)."""
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        raise _refusal(exc, prefix) from None


ROWS = TypeAdapter(Rows)


def _json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(body, status_code=status, media_type="application/json", headers=headers)
