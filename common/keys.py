"""Keys of the run store, one builder per kind (torch-free). A key is a POSIX path relative to the run's root::

    images/<id>.png               the image of record <id>                    image_key
    heatmaps/<id>-<name>.png      its heatmaps                                 heatmap_key
    records/<id>.json             its ImageRecord: finished work               record_key
    errors/<id>.json              the error record of a failed item            error_key
    errors/repair-<id>.json       why the repair of <id> failed                repair_error_key
    repairs/<id>.json             the repair decision about <id>               repair_key
    manifest.jsonl                every record, one line each                  manifest_key
    selection.json                what was selected for finetuning             selection_key
    finetune-data/                the exported finetuning image folder         finetune_data_key
    finetune/adapter/, finetune/summary.json    the trained adapter, its summary   finetune_adapter_key, ...
    compare/<a|b>/, compare/comparison.json, compare/summary.json, compare/report/   compare_*_key

Ids and heatmap names are single path parts: non-empty, without ``/`` or ``\\``, not starting with ``.``.
"""

from __future__ import annotations

IMAGES = "images"
HEATMAPS = "heatmaps"
RECORDS = "records"
ERRORS = "errors"
REPAIRS = "repairs"
FINETUNE = "finetune"
COMPARE = "compare"
CLAIMS = "claims"
_REPAIR_ERROR_PREFIX = "repair-"


def check_id(id: str, what: str = "id") -> str:
    """``id`` unchanged when it is a safe single path part; else ValueError naming ``what``."""
    if not isinstance(id, str) or not id or "/" in id or "\\" in id or id.startswith("."):
        raise ValueError(f"{what} must be a non-empty name without '/' and not starting with '.', got {id!r}")
    return id


def image_key(id: str) -> str:
    """``images/<id>.png``."""
    return f"{IMAGES}/{check_id(id)}.png"


def heatmap_key(id: str, name: str) -> str:
    """``heatmaps/<id>-<name>.png``, e.g. ``name="implausibility"``."""
    return f"{HEATMAPS}/{check_id(id)}-{check_id(name, 'heatmap name')}.png"


def record_key(id: str) -> str:
    """``records/<id>.json``."""
    return f"{RECORDS}/{check_id(id)}.json"


def error_key(id: str) -> str:
    """``errors/<id>.json``: the error record of an item that failed (retried by the next run)."""
    return f"{ERRORS}/{check_id(id)}.json"


def repair_error_key(id: str) -> str:
    """``errors/repair-<id>.json``: why the repair of ``id`` failed."""
    return f"{ERRORS}/{_REPAIR_ERROR_PREFIX}{check_id(id)}.json"


def repair_key(id: str) -> str:
    """``repairs/<id>.json``: the repair decision about ``id`` (its existence marks the id as decided)."""
    return f"{REPAIRS}/{check_id(id)}.json"


def claim_key(id: str) -> str:
    """``claims/<id>.json``: the write-once claim of a process that is making image ``id``."""
    return f"{CLAIMS}/{check_id(id)}.json"


def run_key() -> str:
    """``run.json``: the generator and RAHF a run folder (or an exported dataset) was made with."""
    return "run.json"


def dataset_run_key() -> str:
    """``finetune-data/run.json``: the run's sources, copied beside the exported finetuning images."""
    return f"{finetune_data_key()}/{run_key()}"


def repair_summary_key() -> str:
    """``repair.json``: the summary of the last repair stage."""
    return "repair.json"


def loop_summary_key() -> str:
    """``loop.json``: the summary of the last feedback loop."""
    return "loop.json"


def manifest_key() -> str:
    """``manifest.jsonl``."""
    return "manifest.jsonl"


def selection_key() -> str:
    """``selection.json``: the summary of the finetuning-data selection."""
    return "selection.json"


def finetune_data_key() -> str:
    """``finetune-data``: the folder of the exported finetuning images and their ``metadata.jsonl``."""
    return "finetune-data"


def dataset_image_name(id: str) -> str:
    """``<id>.png``: the file name of an image inside an exported finetuning folder."""
    return f"{check_id(id)}.png"


def finetune_key() -> str:
    """``finetune``: the folder of a finetuning run (checkpoints, adapter, summary)."""
    return FINETUNE


def finetune_adapter_key(adapter_dir: str = "adapter") -> str:
    """``finetune/<adapter_dir>``: the trained adapter's folder."""
    return f"{FINETUNE}/{check_id(adapter_dir, 'adapter folder')}"


def finetune_summary_key() -> str:
    """``finetune/summary.json``: written after the adapter; its presence means the finetuning finished."""
    return f"{FINETUNE}/summary.json"


def compare_side_key(side: str) -> str:
    """``compare/<side>``: the run folder of checkpoint ``a`` or ``b`` of a comparison."""
    if side not in ("a", "b"):
        raise ValueError(f"side must be 'a' or 'b', got {side!r}")
    return f"{COMPARE}/{side}"


def comparison_key() -> str:
    """``compare/comparison.json``: the paired statistics."""
    return f"{COMPARE}/comparison.json"


def compare_summary_key() -> str:
    """``compare/summary.json``: the comparison's summary."""
    return f"{COMPARE}/summary.json"


def compare_report_key() -> str:
    """``compare/report``: the folder of the HTML report."""
    return f"{COMPARE}/report"


def _id_in(key: str, folder: str, suffix: str) -> str | None:
    head = f"{folder}/"
    if not (key.startswith(head) and key.endswith(suffix)):
        return None
    id = key[len(head) : len(key) - len(suffix)]
    return id if id and "/" not in id else None


def id_of_image_key(key: str) -> str | None:
    """The id of an :func:`image_key`, or None when ``key`` is not one."""
    return _id_in(key, IMAGES, ".png")


def id_of_record_key(key: str) -> str | None:
    """The id of a :func:`record_key`, or None when ``key`` is not one."""
    return _id_in(key, RECORDS, ".json")


def id_of_claim_key(key: str) -> str | None:
    """The id of a :func:`claim_key`, or None when ``key`` is not one."""
    return _id_in(key, CLAIMS, ".json")


def id_of_repair_key(key: str) -> str | None:
    """The id of a :func:`repair_key`, or None when ``key`` is not one."""
    return _id_in(key, REPAIRS, ".json")
