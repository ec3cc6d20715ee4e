"""The built-in demo providers behind ``tokenhub-sidecar demo``."""

from sidecar.demo.providers import (
    DEMO_SPECS,
    DemoModel,
    DemoProvider,
    DemoProviders,
    DemoSpec,
    create_demo_app,
    demo_config,
)

__all__ = [
    "DEMO_SPECS",
    "DemoModel",
    "DemoProvider",
    "DemoProviders",
    "DemoSpec",
    "create_demo_app",
    "demo_config",
]
