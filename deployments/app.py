"""The application builder that `serve run serve_config.yaml` and `longlive serve` both use."""

from __future__ import annotations

from ray.serve import Application

from .config import ServiceConfig
from .ingress import Ingress


def build_app(args: dict) -> Application:
    # The Generator (and torch) is imported only to build the app: importing this module, as the CPU
    # Ingress's process may, pulls in no torch.
    from .generator import generator_deployment

    config = ServiceConfig(**args)
    generator = generator_deployment(config).bind(config.model_dump())
    return Ingress.bind(generator, config.model_dump())
