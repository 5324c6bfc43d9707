"""onnxruntime's own quantizers as benchmarks/deploy_latency.py runs them (the baselines thrifty's deployed forms
are measured against): `quantize_dynamic` and `quantize_static` with their defaults a user gets, a sweep of static
settings chosen on a validation split (never test), and the weight-only int4 `MatMulNBitsQuantizer`."""

from __future__ import annotations

import os
import time


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class _Reader:
    """onnxruntime CalibrationDataReader over thrifty calibration batches."""

    def __init__(self, batches, names):
        from thrifty.compress.calibration import batch_inputs
        from thrifty.compress.quant.onnx_export import ort_feed

        self.feeds = iter([ort_feed(batch_inputs(b), names) for b in batches])

    def get_next(self):
        return next(self.feeds, None)


def ort_quantizers(float_path: str, work: str, calib_batches, names) -> dict[str, str]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = {}
    dyn = os.path.join(work, "ort-dynamic.onnx")
    quantize_dynamic(float_path, dyn)  # the defaults a user gets: int8 weights (per tensor), dynamic uint8 activations
    out["ort-dynamic"] = dyn
    pre = os.path.join(work, "float-pre.onnx")
    try:
        quant_pre_process(float_path, pre)
    except Exception as exc:
        log(f"quant_pre_process failed ({exc}); static quantization of the raw float file")
        pre = float_path
    static = os.path.join(work, "ort-static.onnx")
    quantize_static(
        pre,
        static,
        _Reader(calib_batches, names),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        calibrate_method=CalibrationMethod.MinMax,
    )
    out["ort-static"] = static
    return out


def ort_int4(float_path: str, work: str) -> dict[str, str]:
    """onnxruntime's own weight-only int4 quantizer (MatMulNBitsQuantizer, its defaults: block 128, asymmetric,
    MatMul weights only) and the same with the Gather tables too (GatherBlockQuantized, where the model has them)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    out = {}
    for name, ops in (("ort-int4", None), ("ort-int4-gather", ("MatMul", "Gather"))):
        path = os.path.join(work, f"{name}.onnx")
        if not os.path.exists(path):
            kw = {} if ops is None else {"op_types_to_quantize": ops, "quant_axes": (("MatMul", 0), ("Gather", 1))}
            q = MatMulNBitsQuantizer(onnx.load(float_path), bits=4, block_size=128, **kw)
            q.process()
            q.model.save_model_to_file(path, use_external_data_format=False)
        out[name] = path
    return out


ORT_SWEEP = {  # name -> quantize_static options (QDQ; calibration: the CLI's 512 samples)
    "u8-s8pc-minmax": dict(activation_type="QUInt8", per_channel=True, calibrate_method="MinMax"),
    "u8-s8pt-minmax": dict(activation_type="QUInt8", per_channel=False, calibrate_method="MinMax"),
    "u8-s8pc-minmax-reduce": dict(
        activation_type="QUInt8", per_channel=True, calibrate_method="MinMax", reduce_range=True
    ),
    "s8sym-s8pc-minmax": dict(
        activation_type="QInt8",
        per_channel=True,
        calibrate_method="MinMax",
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    ),
    "u8-s8pc-entropy": dict(activation_type="QUInt8", per_channel=True, calibrate_method="Entropy"),
    "u8-s8pc-percentile": dict(activation_type="QUInt8", per_channel=True, calibrate_method="Percentile"),
    # the usual transformer recipe: only the MatMul / Gemm inputs quantized (adds, softmax, LayerNorm stay float)
    "u8-s8pc-minmax-matmul": dict(
        activation_type="QUInt8", per_channel=True, calibrate_method="MinMax", op_types_to_quantize=["MatMul", "Gemm"]
    ),
    "u8-s8pc-percentile-matmul": dict(
        activation_type="QUInt8",
        per_channel=True,
        calibrate_method="Percentile",
        op_types_to_quantize=["MatMul", "Gemm"],
    ),
}


def ort_static_sweep(pre: str, work: str, calib_batches, names, val, log_rows: dict) -> tuple[str, str]:
    """quantize_static under each ORT_SWEEP setting; the best by VALIDATION accuracy (never test) is returned as
    (name, path). `log_rows` gets every setting's validation accuracy and bytes."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from thrifty.compress.quant.onnx_export import evaluate_onnx

    best = None
    for name, opts in ORT_SWEEP.items():
        opts = dict(opts)
        path = os.path.join(work, f"ort-static-{name}.onnx")
        if not os.path.exists(path):
            t0 = time.perf_counter()
            try:
                quantize_static(
                    pre,
                    path,
                    _Reader(calib_batches, names),
                    quant_format=QuantFormat.QDQ,
                    activation_type=getattr(QuantType, opts.pop("activation_type")),
                    weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, opts.pop("calibrate_method")),
                    **opts,
                )
            except Exception as e:  # a setting onnxruntime cannot calibrate on this model: recorded, not fatal
                log_rows[name] = {"error": f"{type(e).__name__}: {e}", "options": ORT_SWEEP[name]}
                log(f"ort-static {name}: failed ({log_rows[name]['error']})")
                continue
            log(f"ort-static {name}: {time.perf_counter() - t0:.0f} s")
        acc = evaluate_onnx(path, val, 64, threads=2)["accuracy"]
        log_rows[name] = {"val_accuracy": acc, "bytes": os.path.getsize(path), "options": ORT_SWEEP[name]}
        log(f"ort-static {name}: val acc {acc:.4f}")
        if best is None or acc > best[0]:
            best = (acc, name, path)
    return best[1], best[2]
