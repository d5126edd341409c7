"""Export time and output parity of the ways to write a retrained network: torch's ONNX
exporter (``dynamo=True``, what ``python -m nas_trial export`` uses; and the deprecated
TorchScript-based ``dynamo=False``) and ``torch.jit.trace``, on the evaluation networks a user
ships, with random weights (export does not depend on their values).

    .venv/bin/python benchmarks/bench_export.py                     # DARTS_V2 C36/20 and NB201 C16/N5
    .venv/bin/python benchmarks/bench_export.py --networks nb201

One JSON line per network and exporter: seconds to export, file bytes, the largest absolute
difference of the file's logits from PyTorch's on 8 random 32x32 images (ONNX Runtime for
ONNX), and whether a batch of another size ran.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
NETWORKS = {"darts": ("DARTS_V2", {"C": 36, "layers": 20}),
            "nb201": ("|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_3x3~2|",
                      {"C": 16, "layers": 5})}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    args = p.parse_args()
    import numpy as np
    import onnxruntime as ort
    import torch

    import search_spaces
    from nas_trial.export import ONNX_OPSET, Deployable
    from search_spaces import cpu_kernels

    torch.set_flush_denormal(True)
    for name in args.networks:
        genotype, size = NETWORKS[name]
        torch.manual_seed(0)
        net = search_spaces.create_network(search_spaces.parse_genotype(genotype), num_classes=10, auxiliary=False,
                                           **size).eval()
        model = Deployable(net).eval()
        x = torch.randn(8, 3, 32, 32)
        with torch.no_grad():
            expected = model(x).numpy()
        for exporter in ("onnx-dynamo", "onnx-torchscript-based", "torch.jit.trace"):
            with tempfile.TemporaryDirectory() as tmp, torch.no_grad(), cpu_kernels.disabled(), \
                    warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                path = Path(tmp) / "m"
                t0 = time.perf_counter()
                if exporter == "onnx-dynamo":
                    torch.onnx.export(model, (x[:2],), str(path), input_names=["images"], output_names=["logits"],
                                      dynamo=True, dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1,
                                                                                              max=65536)}},
                                      opset_version=ONNX_OPSET, external_data=False)
                elif exporter == "onnx-torchscript-based":
                    torch.onnx.export(model, (x[:2],), str(path), input_names=["images"], output_names=["logits"],
                                      dynamo=False, dynamic_axes={"images": {0: "batch"}}, opset_version=17)
                else:
                    torch.jit.save(torch.jit.trace(model, x[:2]), str(path))
                seconds = time.perf_counter() - t0
                if exporter.startswith("onnx"):
                    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                    got = session.run(None, {"images": x.numpy()})[0]
                else:
                    got = torch.jit.load(str(path))(x).numpy()
                size_bytes = path.stat().st_size
            print(json.dumps({"bench": "export", "network": name, "genotype": genotype, **size,
                              "exporter": exporter, "export_s": round(seconds, 2), "bytes": size_bytes,
                              "max_abs_diff": float(np.abs(got - expected).max()), "batch_run": len(got),
                              "torch": torch.__version__, "onnxruntime": ort.__version__,
                              "date": time.strftime("%Y-%m-%d")}), flush=True)


if __name__ == "__main__":
    main()
