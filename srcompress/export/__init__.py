"""Deployment export: verified ONNX (fp32, fp16, INT8 QDQ), TensorRT build commands and engines, a manifest, and a bench.

``srcompress export`` and ``srcompress bench`` (``srcompress/export_cli.py``) drive these modules:

* :mod:`.onnx`: torch.export → ONNX with named inputs/outputs and dynamic batch (and sequence) axes, onnxslim,
  ``onnx.checker`` by path, and parity against PyTorch in ONNX Runtime;
* :mod:`.quantize`: static INT8 QDQ from srcompress calibration data, fp16 conversion, fidelity figures;
* :mod:`.tensorrt`: the ``trtexec`` command (always) and the TensorRT 10/11 Python build (only with ``tensorrt``);
* :mod:`.manifest`: ``manifest.json`` and its JSON schema;
* :mod:`.bench`: latency of every artifact, dense vs compressed.
"""
