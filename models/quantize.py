"""Builds the statically quantised (QDQ, int8) EfficientNet-Lite0 from the fp32 ONNX file with
onnxruntime's quantisation tools: weights int8 per channel, activations uint8, ranges calibrated
(MinMax) on photos that are not the test photos (ai-benchmark's, preprocessed by models/reference.py).
Deterministic: the same inputs give the same bytes.

usage: quantize.py FP32.onnx OUT.onnx SIZE CALIBRATION_PHOTO...
"""
import os
import sys
import tempfile

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference import tensor  # noqa: E402


class Photos(CalibrationDataReader):
    def __init__(self, input_name, size, photos):
        self.items = iter(photos)
        self.input_name, self.size = input_name, size

    def get_next(self):
        path = next(self.items, None)
        if path is None:
            return None
        with open(path, "rb") as f:
            return {self.input_name: tensor(f.read(), self.size)[np.newaxis]}


def main(fp32, out, size, photos):
    import onnx
    input_name = onnx.load(fp32).graph.input[0].name
    with tempfile.TemporaryDirectory() as tmp:
        prepared = os.path.join(tmp, "prepared.onnx")
        quant_pre_process(fp32, prepared, skip_symbolic_shape=True)
        quantize_static(prepared, out, Photos(input_name, size, sorted(photos)),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    print(f"wrote {out}: int8 QDQ, calibrated on {len(photos)} photos")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:])
