"""The comparison: score the inputs, run every method, score its output with the same evaluator.

A method whose inputs are missing is skipped with the reason, one that fails is recorded with
its one-line error and the others go on; one whose result failed (recover: no repair held) is
recorded unscored, with what it reached. Each finished method leaves ``runs/<slug>.json``
beside its output in ``models/<slug>``: ``resume`` reuses those measured as this run would
measure them (:mod:`safealign.compare.fingerprint`) and runs the rest.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict
from pathlib import Path

from safealign.checkpoint.hub import is_adapter
from safealign.compare.fingerprint import row_fingerprint, run_fingerprint
from safealign.compare.measure import Usage, changed_share
from safealign.compare.methods import (
    DEFAULT_METHODS,
    FAMILIES,
    MethodSpec,
    NoRepair,
    Shortfall,
    join_specs,
    parse_method,
    with_options,
)
from safealign.compare.report import recommend, write_report
from safealign.compare.result import NO_REPAIR, CompareResult, MethodRow
from safealign.compare.settings import (
    CompareInputs,
    CompareSettings,
    check_checkpoints,
    check_inputs,
)
from safealign.eval import Evaluator, Scores
from safealign.progress import ProgressCallback
from safealign.settings import SettingsError


def score_checkpoint(evaluator: Evaluator, folder: Path, aligned: Path) -> Scores:
    """Score a model folder, or an adapter folder on the aligned model."""
    if is_adapter(folder):
        return evaluator.score_folder(aligned, adapter=folder)
    return evaluator.score_folder(folder)


def _input_row(name: str, evaluator: Evaluator, folder: Path, aligned: Path) -> MethodRow:
    scores = score_checkpoint(evaluator, Path(folder), aligned)
    return MethodRow(name, "input", "done", out=str(folder), scores=scores.to_dict())


def _check_out(out: Path, settings: CompareSettings) -> None:
    if out.exists() and any(out.iterdir()) and not (settings.resume or settings.overwrite):
        raise SettingsError(f"--out {out} is not empty: use --resume or --overwrite")


def _prepare_out(out: Path) -> None:
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "models").mkdir(exist_ok=True)


def _finished(record: Path, spec: MethodSpec, fingerprint: str) -> MethodRow | None:
    """The stored row of ``spec``, when it finished and was measured as this run would."""
    if not record.is_file():
        return None
    data = json.loads(record.read_text())
    same = data.pop("fingerprint", None) == fingerprint and data["name"] == spec.spec
    return MethodRow(**data) if same and data.get("status") in ("done", NO_REPAIR) else None


def _run_one(spec: MethodSpec, inputs: CompareInputs, evaluator: Evaluator, out: Path) -> MethodRow:
    family = FAMILIES.get(spec.family)
    reason = family.missing(spec, inputs)
    if reason:
        return MethodRow(spec.spec, spec.family, "skipped", reason=reason)
    try:
        with Usage() as usage:
            folder = family.run(spec, inputs, out / "models" / spec.slug)
        if isinstance(folder, NoRepair):  # no output: B's scores would pass for the method's
            return MethodRow(
                spec.spec,
                spec.family,
                NO_REPAIR,
                reason=folder.reason,
                seconds=round(usage.seconds, 2),
                peak_memory_bytes=usage.peak_bytes,
            )
        reason = None
        if isinstance(folder, Shortfall):  # written and scored, its own target missed
            folder, reason = folder.folder, f"short of its target: {folder.reason}"
        scores = score_checkpoint(evaluator, folder, Path(inputs.aligned))
        share = changed_share(folder, inputs.finetuned, inputs.aligned)
    except Exception as error:  # noqa: BLE001 - one method's failure is recorded, never fatal
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return MethodRow(
            spec.spec, spec.family, "failed", reason=f"{type(error).__name__}: {first}"
        )
    return MethodRow(
        spec.spec,
        spec.family,
        "done",
        reason=reason,
        out=str(folder),
        scores=scores.to_dict(),
        seconds=round(usage.seconds, 2),
        peak_memory_bytes=usage.peak_bytes,
        changed_share=share,
    )


def method_specs(settings: CompareSettings) -> list[MethodSpec]:
    """The methods to run; a retrain method takes the run's seed, then ``retrain_options``,
    then its own options, each over the one before. recover scores its checks as every row
    is scored (:func:`recover_scoring`) and safetylock runs on the run's device, unless their
    own options say otherwise."""
    specs = [parse_method(s) for s in join_specs(settings.methods or DEFAULT_METHODS)]
    shared = ",".join(o for o in (f"seed={settings.seed}", settings.retrain_options) if o)
    specs = [with_options(spec, "retrain", shared) for spec in specs]
    scoring = recover_scoring(settings)
    device = {"device": settings.device} if settings.device is not None else {}
    own = {"recover": scoring, "safetylock": device}
    specs = [
        dataclasses.replace(spec, options={**own[spec.family], **spec.options})
        if spec.family in own
        else spec
        for spec in specs
    ]
    for spec in specs:  # again with the shared options: every spec resolved before any work
        FAMILIES.get(spec.family).check(spec)
    return specs


def recover_scoring(settings: CompareSettings) -> dict[str, object]:
    """recover's scoring settings from compare's: the same judge, metric, generation batch,
    reply length and device as the evaluator every row is scored by."""
    scoring: dict[str, object] = {
        "judge": settings.judge,
        "metric": settings.metric,
        "batch_size": settings.batch_size,
        "max_new_tokens": settings.max_new_tokens,
    }
    if settings.device is not None:
        scoring["device"] = settings.device
    return scoring


def compare(
    inputs: CompareInputs,
    settings: CompareSettings | None = None,
    out: str | Path | None = None,
    progress: ProgressCallback = None,
) -> CompareResult:
    """Run and score every method on ``inputs`` with ``settings`` (default: the defaults);
    write the report into ``out`` (required); ``progress`` gets a line per input and method."""
    if out is None:
        raise ValueError("compare writes its report: give out")
    settings = settings or CompareSettings()
    log = progress or _silent
    check_inputs(inputs)
    if settings.utility == "drift" and inputs.benign is None:
        raise SettingsError("--utility drift needs --benign (drift is measured on its prompts)")
    if settings.harm == "durable" and settings.durability is None:
        raise SettingsError("--harm durable needs --durability STEPS and --durability-data")
    specs = method_specs(settings)
    check_checkpoints(inputs)
    evaluator = Evaluator(
        inputs.harmful,
        inputs.task,
        inputs.benign,
        judge=settings.judge,
        metric=settings.metric,
        batch_size=settings.batch_size,
        max_new_tokens=settings.max_new_tokens,
        limit=settings.limit,
        seed=settings.seed,
        drift_tokens=settings.drift_tokens,
        durability=settings.durability,
        durability_options=settings.durability_options,
        durability_data=inputs.durability_data,
        **drift_reference(inputs),
    )
    out = Path(out)
    _check_out(out, settings)
    aligned = Path(inputs.aligned)
    log("scoring the inputs (aligned, finetuned" + (", unaligned)" if inputs.unaligned else ")"))
    rows = [_input_row("aligned", evaluator, aligned, aligned)]
    rows.append(_input_row("finetuned", evaluator, Path(inputs.finetuned), aligned))
    if inputs.unaligned is not None:
        rows.append(_input_row("unaligned", evaluator, Path(inputs.unaligned), aligned))
    _prepare_out(out)  # only now: an input refused while scored leaves no folder behind
    run_print = run_fingerprint(inputs, settings)
    start = time.perf_counter()
    for index, spec in enumerate(specs, 1):
        record = out / "runs" / f"{spec.slug}.json"
        spent = (time.perf_counter() - start) / 60
        fingerprint = row_fingerprint(spec, run_print)
        row = _finished(record, spec, fingerprint) if settings.resume else None
        if row is not None:
            log(f"[{index}/{len(specs)}] {spec.spec}: reused ({record})")
        elif settings.budget_minutes is not None and spent >= settings.budget_minutes:
            reason = f"budget of {settings.budget_minutes:g} minutes spent"
            row = MethodRow(spec.spec, spec.family, "not run", reason=reason)
        else:
            stale = settings.resume and record.is_file()
            note = "; its stored row was measured otherwise or unfinished" if stale else ""
            log(f"[{index}/{len(specs)}] {spec.spec}: running ({spent:.1f} min elapsed{note})")
            row = _run_one(spec, inputs, evaluator, out)
            stored = {"fingerprint": fingerprint, **asdict(row)}
            record.write_text(json.dumps(stored, indent=2) + "\n")
        log(f"[{index}/{len(specs)}] {spec.spec}: {row.status}" + _detail(row))
        rows.append(row)
    result = CompareResult(
        out=out,
        rows=rows,
        settings=settings.to_dict(),
        inputs=inputs.to_dict(),
        evaluator={"judge": settings.judge, "metric": settings.metric},
    )
    result.utility = settings.utility
    result.harm = settings.harm
    recommend(result, settings.max_harmful_rate, settings.max_over_refusal)
    write_report(result)
    return result


def drift_reference(inputs: CompareInputs) -> dict[str, Path | None]:
    """The Evaluator's drift reference: the fine-tuned model B (an adapter on A when it is
    one), when there are benign prompts to measure drift on."""
    if inputs.benign is None:
        return {}
    finetuned = Path(inputs.finetuned)
    if is_adapter(finetuned):
        return {"drift_reference": Path(inputs.aligned), "drift_reference_adapter": finetuned}
    return {"drift_reference": finetuned}


def _silent(line: str) -> None:
    pass


def _detail(row: MethodRow) -> str:
    if row.status != "done":
        return f" ({row.reason})" if row.reason else ""
    keys = (
        "harmful_rate",
        "harmful_rate_after_finetune",
        "safe_and_coherent_rate",
        "utility",
        "over_refusal",
        "drift",
    )
    rates = {key: row.rate(key) for key in keys}
    parts = [f"{key} {value:.3f}" for key, value in rates.items() if value is not None]
    if row.seconds is not None:
        parts.append(f"{row.seconds:.1f} s")
    return " (" + ", ".join(parts) + ")"
