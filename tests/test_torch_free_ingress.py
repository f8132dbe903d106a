"""The CPU Ingress needs no torch: in an interpreter where `import torch` raises, its modules import and
its FastAPI app answers /healthz. No Ray is started: the route is called in-process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Everything the Ingress's process imports, the app builder's module included (it imports the Generator,
# and with it torch, only when it builds the app).
INGRESS_MODULES = (
    "deployments.ingress",
    "deployments.app",
    "deployments.errors",
    "deployments.store",
    "deployments.security",
    "deployments.metrics",
    "deployments.config",
    "longlive_client.schemas",
)

NO_TORCH = f"""
import importlib, sys, types

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"{{name}} is blocked: the ingress must not import it")

sys.meta_path.insert(0, NoTorch())
for module in {INGRESS_MODULES!r}:
    importlib.import_module(module)

from fastapi.testclient import TestClient
from ray import serve

from deployments import ingress
from deployments.config import ServiceConfig

# The route's `self` is the replica's Ingress, which Serve hands it through the replica context;
# /healthz reads nothing from it.
serve.get_replica_context = lambda: types.SimpleNamespace(servable_object=None)
ingress.guard.configure(ServiceConfig())  # what Ingress.__init__ does; opens no connection
response = TestClient(ingress.app).get("/healthz")
assert response.status_code == 200 and response.json() == {{"status": "ok"}}, response.text
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
print("ok")
"""


def test_the_ingress_app_builds_and_answers_healthz_without_torch():
    result = subprocess.run(
        [sys.executable, "-c", NO_TORCH], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_the_blocker_does_block_torch():
    # Control: the same interpreter set-up refuses the Generator, which does need torch.
    code = NO_TORCH.split("for module in")[0] + "import deployments.generator\n"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0 and "torch is blocked" in result.stderr


def test_the_installed_command_reads_its_arguments_and_runs_a_client_command_without_torch():
    """`longlive live` / `longlive job` on a laptop: the command's module (deployments.cli) names the models
    from longlive_core.hub, never longlive_core.weights, so torch is loaded only by the commands that run
    a model (the blocked import fails the script otherwise)."""
    code = NO_TORCH.split("for module in")[0] + (
        "from deployments.cli import main\n"
        "assert main(['job', 'status', 'no-such-job', '--token', 't', '--url', 'http://127.0.0.1:9']) == 1\n"
        "assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr
    assert "no longlive service at" in done.stderr
