"""Export a ``DynamicNet`` as one file per stage, and run it back from those files.

Each stage file takes the image and the cached features of the previous stage
(``image``, ``cache_<node>``...) and returns its logits and the features later stages
need (``logits``, ``next_cache_<node>``...); stage s's outputs after the logits are
stage s+1's cache inputs, in the same order. ``dynamic.json`` beside them
holds the arch, the exit rule, the thresholds and the tensor names, so a runner in
any language can reproduce the early-exit loop. ``ExportedDynamicNet`` is that runner
for TorchScript (plain PyTorch) and ONNX (onnxruntime); it shares the exit rule code
with ``DynamicNet``.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from s2d.errors import S2DError
from s2d.runs import write_json_atomic
from s2d.transform.arch import MultiStageArch
from s2d.transform.dynamic import DynamicNet, early_exit
from s2d.transform.fold import unfolded

FORMATS = ("torchscript", "onnx")
META = "dynamic.json"


def _stage_inputs(net: DynamicNet, input_shape: tuple[int, int, int], batch: int = 2) -> list[tuple[torch.Tensor, ...]]:
    """Example inputs of every stage (image + caches), from a real forward pass."""
    x = torch.randn(batch, *input_shape)
    out, cache = [], ()
    with torch.no_grad():
        for stage in net.stages:
            out.append((x, *cache))
            cache = tuple(stage(x, *cache)[1:])
    return out


def _atomic_path(dst: Path) -> Path:
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def export(net: DynamicNet, input_shape: tuple[int, int, int], out_dir: str | Path, fmt: str) -> dict[str, Any]:
    """Write the stages of ``net`` in ``fmt`` to ``out_dir`` and return the metadata written."""
    if fmt not in FORMATS:
        raise S2DError(f"unknown export format {fmt!r}; valid: {', '.join(FORMATS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    net = net.cpu().eval()
    examples = _stage_inputs(net, input_shape)
    stages_meta = []
    for s, (stage, ex) in enumerate(zip(net.stages, examples, strict=True)):
        stage = unfolded(stage)  # the plain graph: a folded one is a CPU kernel choice of PyTorch's, not the network
        inputs = ["image", *(f"cache_{n}" for n in net.cache_in[s])]
        # Output names differ from input names: a stage often reads node n's cached channels and
        # passes n on with its own channels added (or unchanged), and ONNX values must have
        # unique names (the exporter would otherwise rename the input, and feeding it fails).
        outputs = ["logits", *(f"next_cache_{n}" for n in net.cache_out[s])]
        file = f"stage{s + 1}.{'pt' if fmt == 'torchscript' else 'onnx'}"
        tmp = _atomic_path(out_dir / file)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit/onnx deprecation and tracer notices
                if fmt == "torchscript":
                    with torch.no_grad():
                        scripted = torch.jit.trace(stage, ex, check_trace=False)
                    torch.jit.save(scripted, str(tmp))
                else:
                    dynamic = {name: {0: "batch"} for name in inputs + outputs}
                    torch.onnx.export(stage, ex, str(tmp), input_names=inputs, output_names=outputs,
                                      dynamic_axes=dynamic, opset_version=17, dynamo=False)
            os.replace(tmp, out_dir / file)
        finally:
            tmp.unlink(missing_ok=True)
        stages_meta.append({"file": file, "inputs": inputs, "outputs": outputs})
    meta = {"format": fmt, "input_shape": list(input_shape), "arch": net.arch.to_dict(), "stages": stages_meta}
    write_json_atomic(out_dir / META, meta)
    return meta


class ExportedDynamicNet:
    """Dynamic inference from exported stage files (TorchScript or ONNX)."""

    def __init__(self, out_dir: str | Path, threads: int | None = None) -> None:
        """``threads``: onnxruntime's intra-op threads (default: torch's, so both runtimes get the same cores)."""
        out_dir = Path(out_dir)
        try:
            self.meta = json.loads((out_dir / META).read_text())
        except (FileNotFoundError, json.JSONDecodeError) as e:
            raise S2DError(f"{out_dir} is not an s2d export ({META}: {e}); run `s2d export` first") from None
        self.arch = MultiStageArch.from_dict(self.meta["arch"])
        self.format = self.meta["format"]
        self.stages: list[Any] = []
        for st in self.meta["stages"]:
            path = str(out_dir / st["file"])
            if self.format == "torchscript":
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self.stages.append(torch.jit.load(path).eval())
            else:
                import onnxruntime as ort

                opts = ort.SessionOptions()
                opts.log_severity_level = 3
                opts.intra_op_num_threads = threads or torch.get_num_threads()
                # Each stage is a session with its own thread pool; spinning pools of the stages not running
                # steal the cores from the one that is (a 4-stage MobileNetV2 at 2 threads on a loaded machine:
                # batch-256 throughput 0.79x the static export's with spinning, 1.38x without).
                opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
                self.stages.append(ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"]))

    def _run(self, s: int, x: torch.Tensor, cache: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        stage = self.stages[s]
        if self.format == "torchscript":
            with torch.no_grad():
                return tuple(stage(x, *cache))
        names = self.meta["stages"][s]["inputs"]
        used = {i.name for i in stage.get_inputs()}  # the exporter drops inputs a stage never reads
        feeds = {n: t.numpy() for n, t in zip(names, (x, *cache), strict=True) if n in used}
        return tuple(torch.from_numpy(o) for o in stage.run(None, feeds))

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and exit stage per sample, with the same early-exit loop as ``DynamicNet``."""
        return early_exit(lambda s, xs, cache: self._run(s, xs.contiguous(), cache), x, self.arch)
