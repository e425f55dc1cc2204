"""``robustserve zoo serve NAME``: one command from a zoo entry to a model answering over HTTP with a token."""
import pytest
import torch

from serving.cli import main
from serving.client import Client, Instance
from serving.serve import ServeConfig, stop
from serving.zoo.commands import REPO_ZOO as ZOO, best, load
from tests.integration.conftest import free_ports
from tests.unit.serving.builders import encode, sample_images

pytestmark = pytest.mark.integration


def test_zoo_serve_archives_and_serves_in_one_command(tmp_path, capsys):
    name = best(ZOO, "classification")
    assert name, "the zoo holds no classifier"
    p = free_ports(5)
    ports = dict(zip(("inference", "management", "metrics", "grpc_inference", "grpc_management"), p))
    cfg = ServeConfig(model_store=str(tmp_path / "store"), workdir=str(tmp_path / "w"), ports=ports, models=(name,))
    sets = [f"zoo_dir={ZOO}", f"exports_dir={tmp_path / 'exports'}", f"serve.model_store={cfg.model_store}",
            f"serve.workdir={cfg.workdir}", *(f"serve.ports.{k}={v}" for k, v in ports.items())]
    try:
        assert main(["zoo", "serve", name, *(a for s in sets for a in ("--set", s))]) == 0
        assert f"{name}: 1/1 workers ready" in capsys.readouterr().out
        x, y = sample_images(8, seed=3)
        client = Client(Instance(cfg))
        answers = [client.predict(name, encode(img)) for img in x]
        client.close()
        assert [r.status for r in answers] == [200] * 8
        labels = [r.body["predictions"][0]["label"] for r in answers]
        # The served model is the zoo's: the same top-1 as its weights loaded here, image by image.
        model, spec, _ = load(ZOO, name)
        with torch.no_grad():
            expected = model(torch.from_numpy(x[:, None].astype("float32") / 255)).argmax(1).tolist()
        assert labels == [spec.class_names[i] for i in expected]
    finally:
        stop(cfg)
