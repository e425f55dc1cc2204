"""The plainest possible TorchServe handler for an image classifier, the anchor of the serving benchmark: PIL
decode, ONNX Runtime on one thread, softmax, top-3 as a list of dicts. No validation, no limits, no per-item errors,
no metrics, no probes. Archived alone (it imports nothing from this repository) on the same ONNX file as the
robustserve archive it is compared with."""
import io
import json
import os

import numpy as np
import onnxruntime as ort
from PIL import Image


class PlainHandler:
    def initialize(self, context):
        model_dir = context.system_properties["model_dir"]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(os.path.join(model_dir, "model.onnx"), opts,
                                            providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        with open(os.path.join(model_dir, "index_to_name.json")) as f:
            self.labels = json.load(f)
        self.initialized = True

    def handle(self, data, context):
        images = []
        for row in data:
            raw = row.get("data") or row.get("body")
            img = Image.open(io.BytesIO(raw)).convert("L").resize((28, 28))
            images.append(np.asarray(img, dtype=np.float32)[None] / 255.0)
        logits = self.session.run(None, {self.input_name: np.stack(images)})[0]
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = e / e.sum(axis=1, keepdims=True)
        out = []
        for p in probs:
            top = np.argsort(-p)[:3]
            out.append([{"label": self.labels[str(i)], "probability": float(p[i])} for i in top])
        return out
