"""Loading a handler the way a TorchServe worker does must not import ``training``: the serving image ships
without it."""
import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import importlib, json, sys
    model_dir, module_name, body_file = sys.argv[1:4]
    sys.path.insert(0, model_dir)  # what the worker does with the unpacked archive
    mod = importlib.import_module(module_name)
    [cls] = [c for c in vars(mod).values() if isinstance(c, type) and c.__module__ == mod.__name__]

    class Ctx:
        model_name = "m"
        system_properties = {"model_dir": model_dir, "gpu_id": None}
        model_yaml_config = {}
        manifest = {"model": {"modelVersion": "1"}}
        metrics = None
        status = {}
        def set_response_status(self, code=200, phrase="", idx=0): self.status[idx] = code
        def set_response_content_type(self, idx, value): pass
        def set_response_header(self, idx, key, value): pass
        def get_all_request_header(self, idx): return {}

    h = cls()
    ctx = Ctx()
    h.initialize(ctx)
    out = h.handle([{"body": open(body_file, "rb").read()}], ctx)
    import serving.runtime
    print(json.dumps({
        "training": sorted(m for m in sys.modules if m == "training" or m.startswith("training.")),
        "handler_class": cls.__name__, "answer": json.loads(out[0]), "status": ctx.status.get(0, 200),
        "runtime_from": serving.runtime.__file__,
    }))
""")


@pytest.mark.parametrize("fixture,module", [("classifier_model_dir", "classification"),
                                            ("retrieval_model_dir", "retrieval"),
                                            ("retrieval_model_dir", "handlers.served")])
def test_loading_a_handler_imports_no_training_module(request, fixture, module, tmp_path):
    import numpy as np

    from tests.unit.serving.builders import encode

    model_dir = request.getfixturevalue(fixture)
    body = tmp_path / "img.png"
    body.write_bytes(encode(np.full((28, 28), 128, np.uint8)))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(model_dir), module, str(body)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["training"] == []
    assert res["status"] == 200 and ("predictions" in res["answer"] or "neighbors" in res["answer"])
    # The archive is self-contained: the runtime it runs is the copy packed beside the handler.
    assert res["runtime_from"].startswith(str(model_dir))
