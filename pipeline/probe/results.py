"""The probe results store: one JSON line per probe, append-only, and each probe's eval predictions.

    <results>/probes.jsonl               one record per probe
    <results>/predictions/<id>.npz       its eval predictions: top5 (n, <=5) class indices, labels (n,)
    <results>/heads/<id>.npz             a logreg probe's head: standardisation, weights, intercept, C, classes

Appends take an exclusive ``flock`` on the file and write in bounded blocks,
so concurrent probes never interleave lines however long a record is; an
append that fails (a full disk) is cut back off, so it leaves no torn line,
and a line torn by a crash is skipped by readers and never glued onto.
Predictions and heads are written (atomically) before their record, so a
record never names a file that is not there.
"""

from __future__ import annotations

import fnmatch
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cache import locks
from cache.errors import CacheError, did_you_mean, elsewhere, shown
from pipeline.configs import protocol_name
from pipeline.core import files
from pipeline.core.errors import TimecatError, is_finite_number
from pipeline.core.progress import get_logger

log = get_logger(__name__)

RESULTS_FILE = "probes.jsonl"
PREDICTIONS_DIR = "predictions"
HEADS_DIR = "heads"


@dataclass(frozen=True)
class Head:
    """A logreg probe's fitted head, to apply to cached features of the same members.

    Scores of rows X (n, d), the members' features concatenated in ``members``
    order: ``((X - mean) / scale) @ coef + intercept``. k = 1 is one binomial
    logit (the score of ``classes[1]`` against ``classes[0]``); otherwise one
    column per class.
    """

    members: tuple[str, ...]
    dims: tuple[int, ...]  # each member's feature width, in order (sum: d)
    mean: np.ndarray  # (d,) float32, the train columns' mean
    scale: np.ndarray  # (d,) float32, the train columns' std (1 for a constant column)
    coef: np.ndarray  # (d, k) float64
    intercept: np.ndarray  # (k,) float64
    C: float
    classes: tuple[str, ...]  # every class name, in label order

    def scores(self, X: np.ndarray, block_rows: int = 8192) -> np.ndarray:
        """(n, k) float64 scores of the rows X (n, d), standardised block by block."""
        out = np.empty((len(X), self.coef.shape[1]))
        for start in range(0, len(X), block_rows):
            part = (X[start : start + block_rows] - self.mean) / self.scale
            out[start : start + block_rows] = part.astype(np.float64) @ self.coef + self.intercept
        return out

    def topk(self, X: np.ndarray, k: int) -> np.ndarray:
        """(n, min(k, classes)) class indices of the highest scores, best first."""
        scores = self.scores(X)
        if scores.shape[1] == 1:  # the logit of class 1 against class 0
            scores = np.hstack([-scores, scores])
        k = min(k, scores.shape[1])
        return np.argsort(-scores, axis=1, kind="stable")[:, :k]

    def norms(self) -> dict[str, float]:
        """Each member's share of the weights: the Frobenius norm of its rows of coef (standardised columns)."""
        parts = np.split(self.coef, np.cumsum(self.dims)[:-1])
        return {m: float(np.linalg.norm(part)) for m, part in zip(self.members, parts, strict=True)}


def results_path(results_root: Path) -> Path:
    """The JSONL file that holds every probe record under ``results_root``."""
    return Path(results_root) / RESULTS_FILE


def append(results_root: Path, *records: dict) -> Path:
    """Append records as lines in one write, under an exclusive lock, all or nothing; return the file."""
    path = results_path(results_root)
    text = "".join(json.dumps(files.json_safe(r), sort_keys=True, allow_nan=False) + "\n" for r in records)
    with files.open_append(path) as fd:
        try:
            locks.lock_fd(fd, str(path))  # released when the descriptor closes
        except CacheError as e:  # a filesystem without locks
            raise TimecatError(str(e)) from None
        what = f"a record to {path}" if len(records) == 1 else f"{len(records)} records to {path}"
        files.append_all_or_nothing(fd, text.encode(), what)
    return path


def save(results_root: Path, record: dict, top5: np.ndarray, labels: np.ndarray, head: Head | None = None) -> Path:
    """Write a probe's eval predictions (and its head), then append its record (which names them); return the
    JSONL file."""
    write_outputs(results_root, record, top5, labels, head)
    return append(results_root, record)


def write_outputs(results_root: Path, record: dict, top5: np.ndarray, labels: np.ndarray, head: Head | None) -> None:
    """Write a probe's eval predictions (and its head) and name them in its record, which is not appended yet."""
    relative = f"{PREDICTIONS_DIR}/{record['id']}.npz"

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a path
            np.savez_compressed(f, top5=np.asarray(top5, dtype=np.int32), labels=np.asarray(labels, dtype=np.int64))

    files.replace(Path(results_root) / relative, write)
    record["predictions"] = relative
    if head is not None:
        record["head"] = save_head(results_root, record["id"], head)


def save_head(results_root: Path, record_id: str, head: Head) -> str:
    """Write ``heads/<id>.npz`` atomically; return its path relative to ``results_root``."""
    relative = f"{HEADS_DIR}/{record_id}.npz"

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(
                f,
                members=np.array(head.members),
                dims=np.array(head.dims, dtype=np.int64),
                mean=np.asarray(head.mean, dtype=np.float32),
                scale=np.asarray(head.scale, dtype=np.float32),
                coef=np.asarray(head.coef, dtype=np.float64),
                intercept=np.asarray(head.intercept, dtype=np.float64),
                C=np.float64(head.C),
                classes=np.array(head.classes),
            )

    files.replace(Path(results_root) / relative, write)
    return relative


def head(results_root: Path, record_id: str) -> Head:
    """The saved head of probe ``record_id``: ``Head.scores``/``topk`` apply it to features of its members."""
    root = Path(results_root)
    record = find(load(root), record_id, root)
    relative, record_id = record.get("head"), record["id"]
    if not relative:
        raise TimecatError(
            f"record {record_id} has no saved head: only logreg probes save one, and only since timecat saved "
            "heads; rerun the probe to get it"
        )
    path = root / relative
    keys = ("members", "dims", "mean", "scale", "coef", "intercept", "C", "classes")
    data = read_npz(path, keys, f"record {record_id}: its head file")
    try:
        return Head(
            members=tuple(str(m) for m in data["members"]),
            dims=tuple(int(d) for d in data["dims"]),
            mean=data["mean"],
            scale=data["scale"],
            coef=data["coef"],
            intercept=data["intercept"],
            C=float(data["C"]),
            classes=tuple(str(c) for c in data["classes"]),
        )
    except (TypeError, ValueError) as e:  # arrays of the wrong shape or kind: another program's file
        raise TimecatError(f"record {record_id}: its head file {path} is not a timecat head ({e}); {RERUN}") from None


def load_predictions(results_root: Path, record: dict) -> dict[str, np.ndarray]:
    """A record's eval predictions: ``top5`` (n, <=5) class indices, best first, and ``labels`` (n,)."""
    relative = record.get("predictions")
    if not relative:
        raise TimecatError(f"record {record.get('id')} has no saved predictions (made before timecat saved them)")
    path = Path(results_root) / relative
    what = f"record {record['id']}: its predictions file"
    data = read_npz(path, ("top5", "labels"), what)
    top5, labels = data["top5"], data["labels"]
    shapes_ok = top5.ndim == 2 and labels.ndim == 1 and len(top5) == len(labels) and top5.shape[1] >= 1
    if not shapes_ok or not all(np.issubdtype(a.dtype, np.integer) for a in (top5, labels)):
        raise TimecatError(
            f"{what} {path} is not timecat's (top5 {top5.dtype} {top5.shape}, labels {labels.dtype} "
            f"{labels.shape}; expected integer (n, <=5) and (n,)); {RERUN}"
        )
    return {"top5": top5, "labels": labels}


RERUN = "run the probe again to write it anew"


def read_npz(path: Path, keys: tuple[str, ...], what: str) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of an .npz timecat wrote, or one error naming ``what`` and the file: missing, truncated,
    another format, pickled objects (never loaded: numpy's advice to allow them is not for a results file)."""
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise TimecatError(f"{what} {path} is a single .npy array, not an .npz of {list(keys)}; {RERUN}")
        with data:
            missing = [k for k in keys if k not in data.files]
            if missing:
                raise TimecatError(f"{what} {path} lacks {missing} (it holds {data.files[:10]}); {RERUN}")
            return {k: data[k] for k in keys}
    except FileNotFoundError:
        raise TimecatError(f"{what} {path} is missing (moved or deleted); {RERUN}") from None
    except PermissionError as e:
        raise TimecatError(f"{what} {path} cannot be read ({e.strerror}): check its permissions") from None
    except OSError as e:
        raise TimecatError(f"{what} {path} cannot be read ({e.strerror or e}); {RERUN}") from None
    except ValueError as e:
        # numpy's own text advises allow_pickle=True: wrong for a results file, which holds plain arrays.
        pickled = "pickle" in str(e)
        why = "is not an .npz of plain arrays (numpy would read it as a pickle, which timecat never loads)"
        raise TimecatError(f"{what} {path} {why if pickled else f'is damaged ({e})'}; {RERUN}") from None
    except (zipfile.BadZipFile, EOFError) as e:
        raise TimecatError(f"{what} {path} is damaged ({e}); {RERUN}") from None


ID_PREFIX = 4  # the shortest id prefix accepted in place of a whole id (as git accepts short hashes)


def find(records: list[dict], record_id: str, results_root: Path) -> dict:
    """The record with this id, or whose id starts with it (at least ID_PREFIX characters, one id only); the
    newest if a file was merged twice. Otherwise an error naming the file, or the ids a prefix matches."""
    found = [r for r in records if r.get("id") == record_id]
    if not found and len(record_id) >= ID_PREFIX:
        found = [r for r in records if str(r.get("id", "")).startswith(record_id)]
        ids = sorted({r["id"] for r in found})
        if len(ids) > 1:
            shown_ids = ", ".join(ids[:5]) + (", ..." if len(ids) > 5 else "")
            raise TimecatError(f"id prefix {record_id!r} is ambiguous: {len(ids)} records ({shown_ids}); give more")
    if not found:
        short = f" (a prefix needs at least {ID_PREFIX} characters)" if len(record_id) < ID_PREFIX else ""
        raise TimecatError(
            f"no record with id {record_id!r}{short} in {results_path(results_root)}; `timecat results` lists the ids"
        )
    return found[-1]


def load(results_root: Path) -> list[dict]:
    """Every probe record in ``results_root``/probes.jsonl, oldest first, as dicts (one per probe).

    A record holds what was probed (``dataset``, ``members``, ``protocol``, ``backend``,
    the splits), what it scored (``top1``, ``top5``, ``top1_ci95``), what was chosen and
    how (``chosen``, ``search``, ``holdout``), and each member's provenance. A line that
    is not a probe record (torn by a crash mid-write, edited, or of another schema:
    ``record_problem``) is skipped with a warning naming its number and what is wrong,
    so one bad line never hides the others. A protocol's former name (``tc``) is read as its
    current one (``bn-linear``), in ``protocol`` and ``config.protocol``, so every reader sees one
    name. ``to_dataframe`` makes a table of them.
    """
    path = results_path(results_root)
    try:
        if not path.is_file():
            raise TimecatError(
                f"no probe records at {shown(path)}: run `timecat probe` first, or name another folder "
                f"({elsewhere('results')})"
            )
        lines, torn = files.read_jsonl(path)
    except OSError as e:  # unreadable (permissions): not a torn line, so not something to skip
        raise TimecatError(
            f"cannot read the probe records {shown(path)} ({e.strerror or e}): give yourself read access "
            f"(chmod u+r), or name another folder ({elsewhere('results')})"
        ) from None
    problems = {n: "not a JSON object (torn by a crash, or edited)" for n in torn}
    problems.update({n: why for n, r in lines if (why := record_problem(r))})
    if problems:
        bad = sorted(problems)
        why = "; ".join(f"line {n}: {problems[n]}" for n in bad[:5])
        log.warning(
            "%s: skipped %d line(s) that are not probe records (torn or edited): %s (%s)", path, len(bad), bad[:10], why
        )
    return [_current_names(r) for n, r in lines if n not in problems]


def _current_names(record: dict) -> dict:
    """The record with its protocol under its current name (records made before the rename say ``tc``)."""
    record["protocol"] = protocol_name(record["protocol"])
    if isinstance(record.get("config"), dict) and isinstance(record["config"].get("protocol"), str):
        record["config"]["protocol"] = protocol_name(record["config"]["protocol"])
    return record


def _names(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def _optional(check):
    return lambda value: value is None or check(value)


def _provenance(value) -> bool:
    """Each member's provenance: a dict whose fields the report reads have their types (or are null)."""
    fields = {"steps": _optional(is_finite_number), "params": _optional(is_finite_number), "arch": _optional(_is(str))}
    fields["pretrain_dataset"] = _optional(_is(str))
    return isinstance(value, dict) and all(
        isinstance(p, dict) and all(check(p.get(key)) for key, check in fields.items()) for p in value.values()
    )


def _is(kind):
    return lambda value: isinstance(value, kind)


def _shots(value) -> bool:
    return value is None or (
        isinstance(value, dict) and all(isinstance(value.get(k), int) for k in ("per_class", "draw"))
    )


# What the readers (results, report, compare, predict, a probe's reuse) index in a record: field -> (required,
# check, what it must be). A line of another schema fails one of these and is skipped, not a traceback for all.
RECORD_FIELDS = {
    "dataset": (True, _is(str), "a name"),
    "members": (True, _names, "a list of member names"),
    "protocol": (True, _is(str), "a name"),
    "top1": (True, is_finite_number, "a finite number"),
    "n_members": (True, lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "train_split": (True, _is(str), "a split name"),
    "eval_split": (True, _is(str), "a split name"),
    "member_provenance": (True, _provenance, "a dict of each member's provenance (dicts)"),
    "id": (False, _is(str), "a string"),
    "time": (False, _is(str), "a string"),
    "backend": (False, _is(str), "a name"),
    "top5": (False, is_finite_number, "a finite number"),
    "top1_eval_selected": (False, is_finite_number, "a finite number"),
    "wall_s": (False, is_finite_number, "a finite number"),
    "top1_ci95": (
        False,
        lambda v: isinstance(v, list) and len(v) == 2 and all(map(is_finite_number, v)),
        "[low, high]",
    ),
    "chosen": (False, _is(dict), "a dict"),
    "holdout": (False, _is(dict), "a dict"),
    "eval_rows": (False, _is(dict), "a dict"),
    "config": (False, _is(dict), "a dict"),
    "sweep": (False, _is(dict), "a dict"),
    "shots": (False, _shots, "null or a dict with integer per_class and draw"),
    "search": (False, _is(list), "a list"),
    "predictions": (False, _is(str), "a path"),
    "head": (False, _is(str), "a path"),
}


def record_problem(record: dict) -> str | None:
    """What makes a parsed line unusable as a probe record (a field missing, or of the wrong type), or None."""
    for field, (required, check, what) in RECORD_FIELDS.items():
        if field not in record:
            if required:
                return f"no {field!r}"
        elif not check(record[field]):
            return f"{field} is {_clipped(record[field])}, not {what}"
    return None


def _clipped(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def augmented(record: dict) -> bool | None:
    """Protocol bn-linear: whether the head trained on cached augmented views (None for other protocols)."""
    if record.get("protocol") != "bn-linear":
        return None
    return bool(record.get("augmented", record.get("trained_on", "features") != "features"))


def shots_key(record: dict) -> tuple[int, int] | None:
    """A few-shot record's (shots per class, draw); None for a probe on the whole train split."""
    shots = record.get("shots")
    return None if not shots else (shots["per_class"], shots["draw"])


def to_dataframe(records: list[dict]):
    """The records as a pandas DataFrame, one row each, nested fields flattened into dotted columns
    (``chosen.C``, ``holdout.held_out_rows``, ``member_provenance.run0.steps``); lists of names, such as
    ``members``, become comma-joined strings, so they can index a pivot table. Needs pandas (the
    ``notebook`` extra)."""
    try:
        import pandas as pd  # optional: only this function uses it
    except ImportError:
        raise TimecatError(
            "to_dataframe needs pandas: pip install 'timecat[notebook]' (or pip install pandas)"
        ) from None

    def flat(value):
        names = isinstance(value, list) and value and all(isinstance(v, str) for v in value)
        return ",".join(value) if names else value

    return pd.json_normalize([{k: flat(v) for k, v in r.items()} for r in records], sep=".")


def latest_per_probe(records: list[dict]) -> list[dict]:
    """Keep the newest record for each (dataset, members, protocol, splits, views, few-shot draw): reruns replace
    older runs."""
    latest = {}
    for r in records:
        key = (r["dataset"], tuple(r["members"]), r["protocol"], r["train_split"], r["eval_split"], augmented(r))
        key += (shots_key(r),)
        latest[key] = r
    return list(latest.values())


PATTERN = re.compile(r"^(?P<field>[A-Za-z_][\w.]*)(?P<op>>=|<=|=|>|<)(?P<value>.*)$")
# FIELD=gt:X and its kin: number comparisons a shell cannot mistake for a redirect (unquoted top1>99 writes a file).
SHELL_SAFE = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
SHELL_SAFE_VALUE = re.compile(r"^(?P<op>gt|ge|lt|le):(?P<value>.+)$")


def _members_steps(record: dict) -> list:
    return [p.get("steps") for p in record.get("member_provenance", {}).values()]


def _common(values) -> object:
    values = set(values)
    return values.pop() if len(values) == 1 else None


# Fields the records imply rather than store, for patterns (``timecat results`` and ``timecat report``).
DERIVED = {
    "total_steps": lambda r: sum(s) if (s := _members_steps(r)) and None not in s else None,
    "steps_per_member": lambda r: _common(_members_steps(r)),
    "arch": lambda r: _common(p.get("arch") for p in r.get("member_provenance", {}).values()),
    "pretrained_on": lambda r: _common(p.get("pretrain_dataset") for p in r.get("member_provenance", {}).values()),
}


def parse_pattern(pattern: str) -> tuple[str, str, str] | None:
    """(field, operator, value) of ``FIELD=GLOB``, ``FIELD>X`` or ``FIELD=gt:X`` (also ge, lt, le); None for a glob."""
    parsed = PATTERN.match(pattern)
    if parsed is None:
        return None
    field, op, value = parsed["field"], parsed["op"], parsed["value"]
    safe = SHELL_SAFE_VALUE.match(value) if op == "=" else None
    return (field, SHELL_SAFE[safe["op"]], safe["value"]) if safe else (field, op, value)


def record_path(record: dict) -> str:
    """A path-like name of a record, for bare patterns: dataset/protocol/backend/members."""
    return "/".join(
        [record.get("dataset", "?"), record.get("protocol", "?"), record.get("backend", "?"), *record["members"]]
    )


def field_value(record: dict, field: str):
    """The value of a dotted field (``chosen.C``) or of a DERIVED one (``total_steps``), or None when the record
    lacks it."""
    if field in DERIVED and field not in record:
        return DERIVED[field](record)
    value = record
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def matches(record: dict, pattern: str) -> bool:
    """One pattern: ``field=glob``, ``field>x`` / ``<`` / ``>=`` / ``<=`` or ``field=gt:x`` / ``lt:`` / ``ge:`` /
    ``le:`` (numbers), or a bare glob of the path."""
    parsed = parse_pattern(pattern)
    if parsed is None:
        return fnmatch.fnmatchcase(record_path(record), f"*{pattern}*")
    field, op, wanted = parsed
    value = field_value(record, field)
    if value is None:
        return False
    if op == "=":
        if field in ("protocol", "config.protocol"):
            wanted = protocol_name(wanted)  # records are read under the current name: protocol=tc finds them
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        return fnmatch.fnmatchcase(text, wanted)
    try:
        number, bound = float(value), float(wanted)
    except (TypeError, ValueError):
        raise TimecatError(f"pattern {pattern!r}: {field} is {value!r}, not a number to compare") from None
    return {">": number > bound, "<": number < bound, ">=": number >= bound, "<=": number <= bound}[op]


def select(records: list[dict], patterns: list[str]) -> list[dict]:
    """The records that match every pattern; a field no record has is an error that suggests the closest and lists
    them all, and a bare field name (what an unquoted ``top1>99`` leaves after the shell's redirect) is refused."""
    import difflib

    known = sorted({key for r in records for key in r} | set(DERIVED))
    for pattern in patterns:
        parsed = parse_pattern(pattern)
        if parsed is None and pattern in known:
            raise TimecatError(
                f"pattern {pattern!r} is a field name without a condition. If you typed {pattern}>X unquoted, the "
                f"shell took > as a redirect and wrote a file named X: quote it ('{pattern}>X') or write "
                f"{pattern}=gt:X (also ge:, lt:, le:)"
            )
        top = parsed[0].split(".")[0] if parsed else None
        if parsed and top not in known:
            close = difflib.get_close_matches(top, known, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TimecatError(f"pattern {pattern!r}: no record has a field {top!r}{hint}; fields: {known}")
        if parsed:
            _check_nested(pattern, parsed[0], records)
            _check_bound(pattern, *parsed)
    return [r for r in records if all(matches(r, p) for p in patterns)]


def _dotted(value: dict, prefix: str = "") -> set[str]:
    """Every dotted path into nested dicts: ``chosen``, ``chosen.C``, ``member_provenance.run0.steps``."""
    paths = set()
    for key, inner in value.items():
        paths.add(prefix + key)
        if isinstance(inner, dict):
            paths |= _dotted(inner, f"{prefix}{key}.")
    return paths


def _check_nested(pattern: str, field: str, records: list[dict]) -> None:
    """Refuse a dotted field no record has (``chosen.nosuch`` silently matched nothing), naming its siblings."""
    if "." not in field or field in DERIVED:
        return
    known = set().union(*(_dotted(r) for r in records))
    if field in known:
        return
    parent = field.rsplit(".", 1)[0]
    while parent not in known and "." in parent:
        parent = parent.rsplit(".", 1)[0]
    siblings = sorted(p for p in known if "." in p and p.rsplit(".", 1)[0] == parent)
    shown_ones = ", ".join(siblings[:20]) + (f", ... ({len(siblings)} in all)" if len(siblings) > 20 else "")
    raise TimecatError(
        f"pattern {pattern!r}: no record has a field {field!r}{did_you_mean(field, siblings)}; "
        f"fields of {parent}: {shown_ones or 'none (it is not a dict)'}"
    )


def _check_bound(pattern: str, field: str, op: str, wanted: str) -> None:
    """A comparison's bound must be a number: ``top1>=abc`` is the pattern's fault, not the records'."""
    if op == "=":
        return
    try:
        float(wanted)
    except ValueError:
        raise TimecatError(
            f"pattern {pattern!r}: the bound {wanted!r} is not a number; compare {field} with a number, e.g. "
            f"'{field}>=90' or {field}=ge:90"
        ) from None


# --- text for the command line ---------------------------------------------------


def chosen_text(record: dict, keys=("C", "weight_decay", "k", "temperature")) -> str:
    """What a probe chose, as ``C=0.316`` (or ``weight_decay=...``, ``k=10, temperature=0.07``)."""
    return ", ".join(f"{k}={v:.3g}" for k, v in record["chosen"].items() if k in keys)


def format_record(record: dict, path) -> str:
    """One probe record as the line ``timecat probe`` prints (with the paper's optimistic figure, if any)."""
    how = ", ".join(filter(None, [record["protocol"], chosen_text(record)]))  # "knn, k=10, temperature=0.07"
    lo, hi = record["top1_ci95"]
    held = record["holdout"]
    precision = " " + record["precision"] if "precision" in record else ""
    line = (
        f"{record['id']}  {','.join(record['members'])} on {record['dataset']}: top-1 {record['top1']:.2f}% "
        f"[95% CI {lo:.2f}, {hi:.2f}], top-5 {record['top5']:.2f}% ({how}, "
        f"{record['dim']} dims, held out {held['held_out_rows']:,} rows of {held['held_out_classes']:,} / "
        f"{held['classes']:,} classes, {record['backend']}{precision}) -> {path}"
    )
    if "top1_eval_selected" in record:
        line += f"\n  paper's selection on the eval split (optimistic): {record['top1_eval_selected']:.2f}%"
    return line


def format_many(records: list[dict], summary: dict, what: str, over: str, path) -> list[str]:
    """A sweep's or few-shot probe's records, then their mean ± sample std over ``over``."""
    top1, top5 = summary["top1"], summary["top5"]
    return [format_record(record, path) for record in records] + [
        f"{what} on {records[0]['dataset']}: top-1 {top1['mean']:.2f} ± {top1['std']:.2f}%, "
        f"top-5 {top5['mean']:.2f} ± {top5['std']:.2f}% (mean ± sample std over {over})"
    ]


def format_row(r: dict) -> str:
    """One record as ``timecat results`` lists it."""
    ci = "[{:.2f}, {:.2f}]  ".format(*r["top1_ci95"]) if r.get("top1_ci95") else ""
    # id, time, top5 and wall_s are optional (record_problem): a hand-made record shows "?" for them.
    top5, wall_s = (f"{r[k]:{f}}" if k in r else "?" for k, f in (("top5", ".2f"), ("wall_s", ".1f")))
    return (
        f"{r.get('id', '?')}  {r.get('time', '?')[:19]}  {r['dataset']}  {r['protocol']}/{r.get('backend', '?')}  "
        f"{','.join(r['members'])}  top-1 {r['top1']:.2f} {ci} top-5 {top5}  {wall_s} s"
    )
