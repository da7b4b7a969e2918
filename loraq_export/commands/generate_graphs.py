"""Which exported graphs ``loraq generate`` runs in place of the pipeline's own modules.

``--onnx`` names the transformer's graph: a model.onnx file, a folder holding ``model.onnx``, or
the ``--out`` folder of ``loraq export --component all`` (``transformer/model.onnx``, and
``text_encoder/model.onnx`` when present, which then replaces the text encoder too).
``--text-encoder-onnx`` names the text encoder's graph explicitly (it wins over the folder's);
``--engine`` / ``--text-encoder-engine`` run TensorRT engines built from those ONNX files. Each
graph is opened and checked against the pipeline folder's configs before any pipeline is loaded
and before anything is written.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from loraq_export.errors import UserError

COMPONENTS = ("transformer", "text_encoder")  # in pipeline order: what generate.json's "components" lists
ONNX_FIX = "pass the model.onnx written by loraq export, or the --out folder of loraq export --component all"


@dataclass
class Graph:
    module: object  # GraphTransformer / GraphTextEncoder
    onnx: Path
    engine: Optional[Path]
    source: str  # how errors name it: the ONNX, or the engine and the ONNX it was built from

    @property
    def backend(self) -> str:
        return self.module.runner.backend


@dataclass
class Graphs:
    parts: dict = field(default_factory=dict)  # component -> Graph, in COMPONENTS order

    @property
    def components(self) -> list[str]:
        return list(self.parts)

    def modules(self) -> dict:
        return {c: g.module for c, g in self.parts.items()}

    def backend(self, component: str) -> str:
        """The backend running ``component`` in the quantized pipeline (torch-fp where it is not replaced)."""
        return self.parts[component].backend if component in self.parts else "torch-fp"

    def record(self) -> dict:
        """generate.json's entries: the files each component came from."""
        out = {"components": self.components}
        for comp, prefix in (("transformer", ""), ("text_encoder", "text_encoder_")):
            g = self.parts.get(comp)
            out[prefix + "onnx"] = str(g.onnx.resolve()) if g is not None else None
            out[prefix + "engine"] = str(g.engine.resolve()) if g is not None and g.engine is not None else None
        return out


def onnx_paths(onnx) -> tuple[Optional[Path], Optional[Path]]:
    """(transformer ONNX, text encoder ONNX or None) from ``--onnx``: a file, or a folder holding
    model.onnx or the --component all layout."""
    from loraq_export.inputs import readable

    if onnx is None:
        return None, None
    path = readable(Path(onnx), "ONNX file or folder", ONNX_FIX)
    if not path.is_dir():
        return path, None
    if (path / "model.onnx").is_file():
        return path / "model.onnx", None
    transformer, text_encoder = path / "transformer" / "model.onnx", path / "text_encoder" / "model.onnx"
    if transformer.is_file():
        return transformer, text_encoder if text_encoder.is_file() else None
    raise UserError(f"{path} holds neither model.onnx nor transformer/model.onnx; {ONNX_FIX}")


def _open(onnx: Path, engine: Optional[Path]):
    from loraq_export.runtime import open_engine, open_onnx

    if engine is not None:
        return open_engine(engine, onnx), f"{engine} (built from {onnx})"
    return open_onnx(onnx), str(onnx)


def open_graphs(args, folder) -> Graphs:
    """The graphs named by the arguments, each opened and checked against ``folder`` (a
    runtime.pipeline.PipelineFolder); one UserError line for anything missing or misfitting."""
    from loraq_export.runtime import GraphTextEncoder, GraphTransformer, check_fits, check_text_encoder_fits

    transformer_onnx, text_encoder_onnx = onnx_paths(args.onnx)
    if args.text_encoder_onnx is not None:
        text_encoder_onnx = Path(args.text_encoder_onnx)
    if transformer_onnx is None and text_encoder_onnx is None:
        raise UserError("give a quantized model to run: --onnx (the transformer's model.onnx, or the --out folder of "
                        "loraq export --component all) and/or --text-encoder-onnx FILE")
    if args.engine is not None and transformer_onnx is None:
        raise UserError("--engine runs the transformer's TensorRT engine and needs the ONNX it was built from: add "
                        "--onnx model.onnx")
    if args.text_encoder_engine is not None and text_encoder_onnx is None:
        raise UserError("--text-encoder-engine needs the ONNX it was built from: add --text-encoder-onnx FILE (or "
                        "--onnx DIR holding text_encoder/model.onnx)")
    graphs = Graphs()
    if transformer_onnx is not None:
        runner, source = _open(transformer_onnx, args.engine)
        check_fits(runner, folder.transformer_config, source=source)  # channels and text width, before loading
        graphs.parts["transformer"] = Graph(GraphTransformer(runner, folder.transformer_config), transformer_onnx,
                                            args.engine, source)
    if text_encoder_onnx is not None:
        runner, source = _open(text_encoder_onnx, args.text_encoder_engine)
        check_text_encoder_fits(runner, folder, source=source)
        graphs.parts["text_encoder"] = Graph(GraphTextEncoder(runner, folder.text_encoder_config), text_encoder_onnx,
                                             args.text_encoder_engine, source)
    return graphs
