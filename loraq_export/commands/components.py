"""``--component all``: each quantizable component of a pipeline (transformer, text encoder) run
through the one-model command (export or quantize) into its own subfolder of --out, then the
pipeline's memory table (evaluate/memory.py) in OUT/report.json and the summary. The whole OUT is
assembled aside and renamed into place: a failure in any component leaves nothing."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from loraq_export.evaluate.memory import format_memory, memory_table, other_components, row_from_report
from loraq_export.models.pipeline_components import components_of, is_pipeline_folder
from loraq_export.store.outputs import staged_dir, write_json_atomic


def run_components(opts, run_one, echo=print) -> dict:
    comps = components_of(opts.model)  # refuses a model that is no pipeline, before anything is written
    reports = {}
    with staged_dir(opts.out, opts.overwrite) as stage:
        for comp in comps:
            sub = replace(opts, component=comp, out=stage / comp, overwrite=False)
            if comp != "transformer":  # pipelines' LoRA files (and slots) target the denoising transformer
                sub = replace(sub, lora=None, lora_scale=None, lora_slot=None)
            reports[comp] = run_one(sub, echo=lambda s: echo(s.replace(str(stage), str(opts.out))))
        rows = [row_from_report(c, r) for c, r in reports.items()]
        note = None
        if is_pipeline_folder(opts.model):
            rows += other_components(Path(opts.model), comps)
        else:
            note = "preset: the VAE is not counted"
        table = memory_table(rows, note)
        report = {"pipeline": str(opts.model), "components": {c: f"{c}/report.json" for c in comps},
                  "memory": table}
        write_json_atomic(stage / "report.json", report)
    echo(f"loraq: pipeline {opts.model}: memory (weights; quantized = stored bits of the quantized layers + the "
         f"rest in float16)\n{format_memory(table)}\n  -> {opts.out}")
    return report
