"""The Kubernetes manifests and the image definition: they parse, serveConfigV2 is a valid Serve config
by Ray's own schema, and every value the cluster shares with serve_config.yaml / pyproject.toml / the
Dockerfile agrees. No cluster and no Ray needed."""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from deployments.config import ServiceConfig

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"


def load_render():
    spec = importlib.util.spec_from_file_location("k8s_render", K8S / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = load_render()


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d is not None]


@pytest.fixture(scope="module")
def service() -> dict:
    (doc,) = documents("rayservice.yaml")
    return doc


@pytest.fixture(scope="module")
def serve_config(service) -> dict:
    return yaml.safe_load(service["spec"]["serveConfigV2"])


def base() -> dict:
    return yaml.safe_load((ROOT / "serve_config.yaml").read_text())


def cluster() -> dict:
    return yaml.safe_load((K8S / "cluster.yaml").read_text())


def dockerfile_base() -> tuple[str, str]:
    """(Ray version, Python tag) of the Dockerfile's base image."""
    text = (ROOT / "Dockerfile").read_text()
    match = re.search(r"^FROM rayproject/ray:(\d+\.\d+\.\d+)-(py3\d+)-gpu\s*$", text, re.M)
    assert match, "the Dockerfile's base must be a pinned rayproject/ray:<x.y.z>-py3<N>-gpu image"
    return match.group(1), match.group(2)


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_manifests_parse_and_kustomization_lists_them():
    kustomization = documents("kustomization.yaml")[0]
    for name in kustomization["resources"]:
        docs = documents(name)
        assert docs and all("apiVersion" in d and "kind" in d and d["metadata"]["name"] for d in docs)
    kinds = {d["kind"] for name in kustomization["resources"] for d in documents(name)}
    assert {"RayService", "StatefulSet", "Service", "Namespace"} <= kinds
    for name in ("secrets.example.yaml", "monitoring/podmonitor.yaml"):
        assert documents(name)


def test_committed_manifest_is_the_render_of_serve_config():
    assert (K8S / "rayservice.yaml").read_text() == render.render(), "run python k8s/render.py"
    assert render.main(["--check"]) == 0


def test_a_changed_serve_config_or_cluster_file_gives_another_manifest():
    committed = (K8S / "rayservice.yaml").read_text()
    changed = base()
    changed["applications"][0]["args"]["idle_timeout_s"] = 30
    assert render.render(changed, cluster()) != committed
    bigger = cluster()
    bigger["generator_autoscaling"]["max_replicas"] += 1
    assert render.render(base(), bigger) != committed


def test_serve_config_v2_validates_against_rays_schema(serve_config):
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema(**serve_config)
    (app,) = schema.applications
    ServiceConfig(**app.args)  # the builder's own validation of the args
    (generator,) = [d for d in app.deployments if d.name == "Generator"]
    assert generator.num_replicas == "auto"


def test_serve_config_v2_is_serve_config_with_the_cluster_args(serve_config):
    expected = base()
    expected["applications"][0]["args"].update(cluster()["args"])
    app, want = serve_config["applications"][0], expected["applications"][0]
    assert app["args"] == want["args"]
    for key in ("name", "route_prefix", "import_path"):
        assert app[key] == want[key]
    assert serve_config["http_options"] == expected["http_options"]
    assert serve_config["proxy_location"] == expected["proxy_location"]


def test_resources_match_the_args(service, serve_config):
    args = ServiceConfig(**serve_config["applications"][0]["args"])
    spec = service["spec"]["rayClusterConfig"]
    (group,) = spec["workerGroupSpecs"]
    pod = group["template"]["spec"]
    (container,) = pod["containers"]
    limits = container["resources"]["limits"]
    # One Generator replica per GPU pod: the pod has exactly the replica's GPUs, and CPUs for it.
    assert args.replica_gpus == 1 and int(limits["nvidia.com/gpu"]) == args.replica_gpus
    assert float(limits["cpu"]) >= args.replica_cpus + 1  # + the node's proxy and Ray's own
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    # The worker group can hold every replica the autoscaler may ask for, and no more.
    (generator,) = [d for d in serve_config["applications"][0]["deployments"] if d["name"] == "Generator"]
    scaling = generator["autoscaling_config"]
    assert group["minReplicas"] == scaling["min_replicas"] and group["maxReplicas"] == scaling["max_replicas"]
    assert spec["enableInTreeAutoscaling"] is True
    policy = scaling["policy"]
    assert policy["policy_function"] == "deployments.autoscaling:SessionAutoscaler"
    assert policy["policy_kwargs"]["capacity"] == args.max_sessions
    # The spool volume is mounted where the args put it.
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert args.spool_dir in mounts


def test_drain_times_outlast_the_longest_session(service, serve_config):
    args = ServiceConfig(**serve_config["applications"][0]["args"])
    longest = max(args.max_session_seconds, args.max_job_seconds)
    assert args.graceful_shutdown_timeout_s > longest
    assert service["spec"]["rayClusterDeletionDelaySeconds"] > args.graceful_shutdown_timeout_s
    pod = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > args.graceful_shutdown_timeout_s


def test_redis_is_durable_and_is_the_one_the_args_name(serve_config):
    docs = {(d["kind"], d["metadata"]["name"]): d for d in documents("redis.yaml")}
    statefulset = docs[("StatefulSet", "longlive-redis")]
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    flags = container["args"]
    assert flags[flags.index("--appendonly") + 1] == "yes"
    assert flags[flags.index("--appendfsync") + 1] == "always"
    assert statefulset["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    url = serve_config["applications"][0]["args"]["redis_url"]
    host, port = re.match(r"redis://([^:/]+):(\d+)/", url).groups()
    service = docs[("Service", host)]
    assert service["spec"]["ports"][0]["port"] == int(port)


def test_weights_come_from_an_init_container_not_the_image(service):
    pod = service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["command"][:2] == ["longlive", "download"]
    assert init["command"][2] == cluster()["args"]["model"]
    volume = {v["name"]: v for v in pod["volumes"]}["weights"]
    assert "hostPath" in volume  # once per node
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    assert env["HF_HUB_OFFLINE"] == "1" and env["HF_HOME"] == init["env"][0]["value"]
    steps = [
        line for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith(("RUN", "COPY"))
    ]
    assert not any("download" in line or "models" in line or "hf" in line.split() for line in steps)


def test_dockerfile_ray_matches_pyproject_and_the_manifests(service):
    ray_version, python_tag = dockerfile_base()
    extras = pyproject()["project"]["optional-dependencies"]
    for extra in ("serve", "train"):  # the image serves and runs the training job
        (ray_req,) = [r for r in map(Requirement, extras[extra]) if r.name == "ray"]
        assert Version(ray_version) in ray_req.specifier, f"base image Ray {ray_version} vs {ray_req}"
        assert extra in ray_req.extras
    text = (ROOT / "Dockerfile").read_text()
    assert f'"ray[serve,train]=={ray_version}"' in text, "pip must keep the base image's Ray"
    assert '".[serve,train]"' in text
    python = f"{python_tag[2]}.{python_tag[3:]}"
    assert Version(python) in SpecifierSet(pyproject()["project"]["requires-python"])
    # The manifests run the image this Dockerfile builds: tag = version, Ray, Python.
    version = pyproject()["project"]["version"]
    image = f"longlive/longlive:{version}-ray{ray_version}-{python_tag}"
    spec = service["spec"]["rayClusterConfig"]
    assert spec["rayVersion"] == ray_version
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in spec["workerGroupSpecs"]
    ]
    images = {c["image"] for pod in pods for c in pod["containers"] + pod.get("initContainers", [])}
    assert images == {image}
    assert f"docker build -t {image} ." in text
