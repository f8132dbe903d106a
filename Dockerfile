# The service image KubeRay runs (k8s/rayservice.yaml): Ray's GPU image with the project installed.
# Weights are not baked in: the RayService's init container runs `longlive download` into a per-node cache.
#   docker build -t longlive/longlive:0.1.0-ray2.60.0-py311 .
# The tag names the project version, Ray and Python; tests/test_k8s.py checks that it matches
# pyproject.toml, this base image and the manifests.
FROM rayproject/ray:2.60.0-py311-gpu

ARG TORCH_VERSION=2.13.0
# FORWARDED_ALLOW_IPS: uvicorn in Ray's proxy believes no peer's X-Forwarded-For, as trust_forwarded_for:
# false wants (with trust_forwarded_for: true behind your own proxy, set it to "*" in the pod's env).
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/models/hf \
    FORWARDED_ALLOW_IPS=""

WORKDIR /home/ray/longlive
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users longlive_core ./longlive_core
COPY --chown=ray:users deployments ./deployments
COPY --chown=ray:users jobs ./jobs
COPY --chown=ray:users serve_config.yaml ./

# PyPI's Linux torch wheel carries CUDA. Ray stays the base image's: pinned so pip cannot move it.
# The train extra: the same image runs the training job (jobs/train.py) on the cluster.
RUN pip install "torch==${TORCH_VERSION}" "ray[serve,train]==2.60.0" ".[serve,train]"
# serveConfigV2's import_path deployments.app:build_app resolves to the installed package.
